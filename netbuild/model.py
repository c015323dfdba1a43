"""A trained model: the resolved spec and the network with its parameters, ready to predict,
evaluate and export.

Loaded from a run directory or a ``model.npz``; ``netbuild eval``, ``predict`` and ``export`` and
the Python API use the same :class:`Model`. Inputs and targets are checked as the data files of
a spec are (shape, dtype, id and class ranges, finite values), and a mistake is a
:class:`DataError` naming ``x`` or ``y``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from . import backend
from . import data as data_mod
from . import losses
from .compile import compile_eval, compile_predict
from .metrics import scores
from .errors import DataError, MissingExtra, NetbuildError, RunError, SpecError, UsageError, format_path, printable
from .network import Network
from .runs import SPEC_FILE, atomic_write, resolved_spec_data
from .runs import load_model as load_model_file
from .spec import Spec, load_spec, validate

#: Examples per batch when predicting and evaluating.
BATCH_SIZE = 256


@dataclass
class Exported:
    """What :meth:`Model.export_onnx` wrote, and how closely onnxruntime's outputs on a batch
    of random inputs matched netbuild's."""

    path: Path
    opset: int
    nodes: int
    bytes: int
    examples_checked: int
    max_difference: float


class Model:
    """A trained network and its resolved spec (``spec``, a :class:`netbuild.spec.Spec`).

    :meth:`predict`, :meth:`evaluate` and :meth:`export_onnx` are the API; :meth:`inputs`,
    :meth:`targets`, :meth:`predict_checked`, :meth:`predict_function`, :meth:`evaluate_dataset`
    and :meth:`refit` are the lower-level steps they (and ``netbuild eval``) are made of.
    """

    def __init__(self, spec: Spec, network: Network, source: str):
        self.spec = spec
        self.network = network
        self.source = source
        self._predict: dict[str, Callable] = {}  # by backend: each compiles its own
        self._evaluate: dict[tuple, Callable] = {}

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Model":
        """The model of a run directory or a ``model.npz``; :class:`RunError` when it is not one."""
        raw_spec, params = load_model_file(path)
        try:
            spec = _located(validate(raw_spec))
            network = Network.from_spec(spec)
        except SpecError as exc:
            first = exc.issues[0]
            raise RunError(f"{raw_spec.source}: the stored spec is not valid for this netbuild: "
                           f"{format_path(first.path)}: {first.message}") from None
        try:
            network.set_param_values(params)
        except KeyError as exc:
            raise RunError(f"{raw_spec.source}: parameter {exc} is missing") from None
        except ValueError as exc:
            raise RunError(f"{raw_spec.source}: {exc}") from None
        return cls(spec, network, str(path))

    # -- what it is -------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return str(self.spec.data["name"])

    @property
    def input_shape(self) -> tuple:
        """One example's shape (no batch axis) of the only input."""
        return tuple(self.network.input_shape)

    @property
    def output_shape(self) -> tuple:
        """One example's shape of the only output."""
        return tuple(self.network.output_shape)

    @property
    def input_shapes(self) -> dict[str, tuple]:
        """Each input's example shape, by name (``input`` for a spec's ``input_shape``)."""
        return dict(self.network.inputs)

    @property
    def output_shapes(self) -> dict[str, tuple]:
        """Each output's example shape, by name (``output`` for the shorthand's one output)."""
        return self.network.output_shapes()

    @property
    def metrics(self) -> list[str]:
        """What :meth:`evaluate` reports besides the loss: the metrics' names (and each output's
        loss, prefixed by the output's name, for ``model.outputs``)."""
        return [k for k in self.network.signature.recorded(False) if k != "loss"]

    def __repr__(self) -> str:
        shapes = (lambda d: next(iter(d.values())) if len(d) == 1 else d)
        return (f"<netbuild.Model {self.name!r}: {shapes(self.input_shapes)} -> "
                f"{shapes(self.output_shapes)}, {self.network.n_params():,} parameters>")

    # -- predict and evaluate ---------------------------------------------------------------
    def inputs(self, x, name: str = "x") -> list[np.ndarray]:
        """``x`` checked and cast as the network reads it, one array per input: an array for a
        model with one input, else a mapping from each input's name to its array;
        :class:`DataError` naming ``name``."""
        arrays = _by_name(x, list(self.network.inputs), name, "input")
        xs = []
        for (label, value), input_name in zip(arrays, self.network.inputs):
            report = data_mod.reporter(label)
            xs.append(data_mod.prepare_x(_array(value, report), self.network, report, None, input_name))
        for (label, _), x_ in zip(arrays[1:], xs[1:]):
            if len(x_) != len(xs[0]):
                raise DataError(f"{label}: holds {len(x_)} examples; expected {len(xs[0])}, as many "
                                f"as {arrays[0][0]}")
        return xs

    def targets(self, y, n: int, name: str = "y") -> list[np.ndarray]:
        """``y`` checked and cast for the outputs' losses, one array per output (an array, or a
        mapping from each output's name to its array)."""
        heads = self.network.signature.outputs
        arrays = _by_name(y, [h.name for h in heads], name, "output")
        ys = []
        for (label, value), head in zip(arrays, heads):
            report = data_mod.reporter(label)
            shape = self.network.nodes[self.network.outputs[head.name]].output_shape
            ys.append(data_mod.prepare_y(_array(value, report), n, shape, losses.name_of(head.loss),
                                         report, None))
        return ys

    def predict(self, x, batch_size: int = BATCH_SIZE):
        """The network's outputs for the inputs ``x`` (an array ``(n, *input_shape)``, or a
        mapping from each input's name to its array): what ``netbuild predict`` writes, class
        probabilities for a softmax output. An array for the shorthand's one output, else
        (``model.outputs``) a mapping from each output's name to its array."""
        return self.predict_checked(self.inputs(x), batch_size)

    def predict_checked(self, xs: list[np.ndarray], batch_size: int = BATCH_SIZE):
        """:meth:`predict` for inputs already checked (by :meth:`inputs`, or as a data file's),
        one array per input."""
        fn = self.predict_function()
        names = list(self.network.outputs)
        with ids_in_range(self.network):
            parts = [fn(*[data_mod.gather(x, idx) for x in xs])
                     for idx in data_mod.batches(len(xs[0]), _batch(batch_size))]
        parts = [p if isinstance(p, list) else [p] for p in parts]
        if self.network.signature.shorthand_outputs:
            return np.concatenate([p[0] for p in parts])
        return {name: np.concatenate([p[i] for p in parts]) for i, name in enumerate(names)}

    def write_predictions(self, xs: list[np.ndarray], path: Path,
                          batch_size: int = BATCH_SIZE) -> dict[str, tuple]:
        """Write the outputs for checked inputs ``xs`` to ``path`` (an uncompressed .npz, each
        output under its key; the shorthand's under ``y``) as they are computed: each batch's
        outputs go to a memory-mapped .npy file beside ``path``, streamed into the archive at the
        end, so the outputs are never all in memory. The write is atomic. Returns each key's
        shape."""
        import shutil
        import tempfile
        import zipfile

        from . import npz
        from .runs import atomic_write_with

        sig = self.network.signature
        keys = ["y"] if sig.shorthand_outputs else [h.key for h in sig.outputs]
        fn = self.predict_function()
        n = len(xs[0])
        with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as tmp, \
                ids_in_range(self.network):
            parts = [Path(tmp) / f"{i}.npy" for i in range(len(keys))]
            maps = None
            for idx in data_mod.batches(n, _batch(batch_size)):
                outs = fn(*[data_mod.gather(x, idx) for x in xs])  # a file's rows read, not mapped
                outs = outs if isinstance(outs, list) else [outs]
                if maps is None:
                    maps = [np.lib.format.open_memmap(p, mode="w+", dtype=o.dtype,
                                                      shape=(n, *o.shape[1:]))
                            for p, o in zip(parts, outs)]
                for m, o in zip(maps, outs):
                    m[idx[0]:idx[0] + len(idx)] = o
            shapes = {k: tuple(m.shape) for k, m in zip(keys, maps)}
            for m in maps:
                m.flush()
            del maps

            def write(f):  # each member's data aligned, as netbuild.savez writes it
                with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
                    for key, part in zip(keys, parts):
                        with open(part, "rb") as src:
                            npz.add_member(archive, f"{key}.npy",
                                           lambda out, src=src: shutil.copyfileobj(src, out, npz.CHUNK))

            atomic_write_with(path, write)
        return shapes

    def predict_function(self) -> Callable:
        """The compiled ``f(*batches) -> outputs`` that :meth:`predict` calls per batch
        (compiled once; see :func:`netbuild.compile.compile_predict`); it does not check its
        inputs as :meth:`predict` does."""
        if backend.current() not in self._predict:
            self._predict[backend.current()] = compile_predict(self.network)
        return self._predict[backend.current()]

    def evaluate(self, x, y, batch_size: int = BATCH_SIZE) -> dict[str, float]:
        """The loss and the spec's metrics on ``(x, y)`` (arrays, or mappings by input and
        output name): what ``netbuild eval`` reports."""
        xs = self.inputs(x)
        dataset = data_mod.Dataset(xs, self.targets(y, len(xs[0])), "arrays")
        return self.evaluate_dataset(dataset, batch_size)[0]

    def evaluate_dataset(self, dataset: data_mod.Dataset, batch_size: int = BATCH_SIZE,
                         heads: list | None = None) -> tuple[dict[str, float], data_mod.Results]:
        """``(loss and metrics, results)`` on a checked dataset: the losses and metrics of the
        spec's outputs, or of ``heads`` (another model's outputs, to compare with it; the same
        names)."""
        heads = self.network.signature.outputs if heads is None else heads
        key = (json.dumps([[h.name, h.loss, h.loss_weight] for h in heads], sort_keys=True),
               tuple((str(y.dtype), y.ndim) for y in dataset.ys), backend.current())
        if key not in self._evaluate:
            self._evaluate[key] = compile_eval(self.network, dataset.ys, heads)
        with ids_in_range(self.network):
            results = data_mod.run_batches(self._evaluate[key], dataset, _batch(batch_size))
        return scores(heads, results, dataset.ys), results

    def refit(self, dataset: data_mod.Dataset, heads: list, inputs: list[str]) -> tuple[data_mod.Dataset, list]:
        """Another model's checked dataset (``inputs``: the names of its arrays ``xs``; ``heads``:
        that model's outputs, in the order of ``ys``), checked again for this network, and those
        heads named as this network's outputs: one input and one output each pair up whatever
        their names, else they pair by name. :class:`DataError` when it does not fit."""
        import dataclasses

        report = data_mod.reporter(dataset.source)
        mine_in, mine_out = list(self.network.inputs), list(self.network.outputs)
        theirs_out = [h.name for h in heads]
        if len(mine_in) == len(inputs) == 1 and len(mine_out) == len(heads) == 1:
            order_in, order_out = [0], [0]
        else:
            for kind, mine, theirs in (("inputs", mine_in, inputs), ("outputs", mine_out, theirs_out)):
                if sorted(mine) != sorted(theirs):
                    raise DataError(f"the {kind} of the two models differ: {', '.join(theirs)} "
                                    f"against {', '.join(mine)}; expected the same names (or one "
                                    "input and one output each)")
            order_in = [inputs.index(n) for n in mine_in]
            order_out = [theirs_out.index(n) for n in mine_out]
        xs = [data_mod.prepare_x(np.asarray(dataset.xs[k]), self.network, report, None, name)
              for k, name in zip(order_in, mine_in)]
        named = [dataclasses.replace(heads[k], name=name) for k, name in zip(order_out, mine_out)]
        ys = [data_mod.prepare_y(np.asarray(dataset.ys[k]), len(xs[0]),
                                 self.network.nodes[self.network.outputs[h.name]].output_shape,
                                 losses.name_of(h.loss), report, None)
              for k, h in zip(order_out, named)]
        return data_mod.Dataset(xs, ys, dataset.source), named

    # -- export -----------------------------------------------------------------------------
    def export_onnx(self, path: str | os.PathLike, opset: int | None = None,
                    overwrite: bool = False) -> Exported:
        """Write the model as ONNX to ``path`` (atomically; an existing file only with
        ``overwrite``), after checking it with ``onnx.checker`` (``full_check``) and comparing
        onnxruntime's outputs with :meth:`predict` on a batch of random inputs."""
        from .export import onnx as export

        opset = export.DEFAULT_OPSET if opset is None else opset
        if not _whole(opset) or not export.MIN_OPSET <= opset <= export.MAX_OPSET:
            raise UsageError(f"opset {opset} is not one netbuild writes; expected "
                           f"{export.MIN_OPSET} to {export.MAX_OPSET}")
        path = Path(path)
        writable(path, overwrite)
        proto = export.to_onnx(self.spec, self.network, resolved_spec_data(self.spec), opset)
        data = proto.SerializeToString()
        n, worst = self._compare_with_onnxruntime(data)
        try:
            atomic_write(path, data)
        except OSError as exc:
            raise RunError(f"{path}: cannot write: {exc.strerror or exc}") from None
        return Exported(path, opset, len(proto.graph.node), len(data), n, worst)

    def _compare_with_onnxruntime(self, model: bytes, n: int = 7) -> tuple[int, float]:
        """Run the exported graph and :meth:`predict` on ``n`` seeded random inputs; a
        difference beyond float32 rounding is a bug in the exporter, and nothing is written."""
        try:
            import onnxruntime
        except ImportError:
            raise MissingExtra("onnx", "onnx and onnxruntime", "ONNX export") from None
        from .export.onnx import graph_names

        rng = np.random.default_rng(0)
        xs = []
        for name, shape in self.network.inputs.items():
            ids = self.network.integer_input(name)
            xs.append(rng.integers(0, ids, size=(n, *shape)) if ids else
                      rng.standard_normal((n, *shape)).astype(np.float32))
        in_names, out_names = graph_names(self.network)
        try:
            session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
            theirs = session.run(out_names, dict(zip(in_names, xs)))
            ours = self.predict_checked(self.inputs(xs if len(xs) > 1 else xs[0]))
            ours = list(ours.values()) if isinstance(ours, dict) else [ours]
        except NetbuildError as exc:
            raise RunError(f"{self.source}: the export could not be compared with netbuild on random "
                           f"inputs ({exc}); nothing was written") from None
        except Exception as exc:  # onnxruntime's own errors have no common base class
            raise RunError(f"{self.source}: onnxruntime could not run the exported graph on random "
                           f"inputs ({type(exc).__name__}: {str(exc).splitlines()[0][:300]}); "
                           "nothing was written") from None
        worst, scale = 0.0, 1.0
        for t, o in zip(theirs, ours):
            worst = max(worst, float(np.max(np.abs(t - o))) if t.shape == o.shape else float("inf"))
            scale = max(scale, float(np.max(np.abs(o))))
        if not worst <= 1e-4 * scale:
            raise RunError(f"{self.source}: the exported graph's outputs differ from netbuild's by "
                           f"{worst:g} on random inputs; nothing was written. This is a bug in "
                           "netbuild's ONNX export: please report it with the spec")
        return n, worst


def load_model(path: str | os.PathLike) -> Model:
    """The trained model of a run directory or a ``model.npz``."""
    return Model.load(path)


def _located(spec: Spec) -> Spec:
    """The spec stored in a model.npz carries no lines; when the run directory's spec.yaml holds
    the same spec, that file is the one errors point into."""
    text_file = spec.base_dir / SPEC_FILE
    try:
        located = load_spec(text_file)
    except (NetbuildError, OSError):
        return spec
    return located if resolved_spec_data(located) == resolved_spec_data(spec) else spec


def writable(path: Path, overwrite: bool) -> None:
    """Raise :class:`RunError` unless ``path`` can be written: a file (an existing one only with
    ``overwrite``) in a folder that exists and may be written."""
    try:
        st = path.stat()
    except FileNotFoundError:
        st = None
    except ValueError:  # a NUL byte
        raise RunError(f"{printable(str(path))}: cannot write: the name holds a NUL byte") from None
    except OSError as exc:  # a name too long, a loop of links
        raise RunError(f"{path}: cannot write: {exc.strerror or exc}") from None
    if path.is_dir():
        raise RunError(f"{path}: is a folder; expected a file name")
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise RunError(f"{path}: is not a regular file (a device, pipe or socket); expected a file "
                       "name")
    if path.exists() and not overwrite:
        raise RunError(f"{path}: already exists; pass --overwrite to replace it or choose "
                       "another --out")
    if not path.parent.is_dir():
        raise RunError(f"{path}: the folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise RunError(f"{path}: cannot write in {path.parent}")


def _by_name(value, names: list[str], label: str, kind: str) -> list[tuple[str, object]]:
    """``[(label, array)]`` in the order of ``names``: ``value`` itself for one name, else a
    mapping with exactly those names (a list of the arrays in order is taken too)."""
    if len(names) == 1 and not isinstance(value, Mapping):
        return [(label, value)]
    if isinstance(value, (list, tuple)) and len(names) > 1:
        if len(value) != len(names):
            raise DataError(f"{label}: is a list of {len(value)} arrays; expected {len(names)} "
                            f"({', '.join(names)}), or a mapping from each {kind}'s name to its array")
        return [(f"{label}[{i}] ({n})", v) for i, (n, v) in enumerate(zip(names, value))]
    if not isinstance(value, Mapping):
        raise DataError(f"{label}: is one array; expected a mapping from each {kind}'s name "
                        f"({', '.join(names)}) to its array")
    missing = [n for n in names if n not in value]
    extra = [str(k) for k in value if k not in names]
    if missing or extra:
        problem = (f"has no {kind} {', '.join(missing)}" if missing else "") + \
            ("; " if missing and extra else "") + (f"has unknown {kind}s {', '.join(extra)}" if extra else "")
        raise DataError(f"{label}: {problem}; expected the {kind}s {', '.join(names)}")
    return [(f"{label}['{n}']", value[n]) for n in names]


def _array(value, report) -> np.ndarray:
    try:
        return np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise report.error(f"is not an array ({exc}); expected a numpy array") from None


@contextlib.contextmanager
def ids_in_range(network: Network):
    """An embedding that reads another layer's output (floats truncated to ids) can meet an id
    outside its table only while computing: a :class:`DataError`, not the C op's IndexError
    (nor, on jax, the NaN rows its host callback notes in ``ops.embedding.jax_bad_ids``)."""
    from .ops import embedding as embedding_ops

    del embedding_ops.jax_bad_ids[:]
    try:
        yield
        bad_ids_met()
    except IndexError as exc:
        tables = ", ".join(f"'{n.name}' ({n.layer.config['input_dim']} ids)" for n in network.order
                           if getattr(n.layer, "integer_input", False))
        raise DataError(f"an embedding received an id outside its table ({str(exc).splitlines()[0]});"
                        f" expected ids 0..input_dim-1 for {tables}") from None


def bad_ids_met() -> None:
    """An IndexError for the first id out of range that a jax computation met since
    :func:`ids_in_range` began (None met: nothing)."""
    from .ops import embedding as embedding_ops

    if embedding_ops.jax_bad_ids:
        value, position, rows = embedding_ops.jax_bad_ids[0]
        del embedding_ops.jax_bad_ids[:]
        raise IndexError(f"id {value} at position {position} is outside [0, {rows})")


def _whole(value) -> bool:
    """An int (numpy's too), not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _batch(batch_size: int) -> int:
    if not _whole(batch_size) or batch_size < 1:
        raise UsageError(f"batch_size {batch_size!r}; expected a whole number of at least 1")
    return int(batch_size)
