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
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from . import data as data_mod
from . import losses
from . import metrics as metrics_mod
from .compile import compile_eval, compile_predict
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
        self._predict: Callable | None = None
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
        """One example's shape (no batch axis)."""
        return tuple(self.network.input_shape)

    @property
    def output_shape(self) -> tuple:
        return tuple(self.network.output_shape)

    @property
    def metrics(self) -> list[str]:
        """What :meth:`evaluate` reports besides the loss."""
        return [metrics_mod.metric_name(m) for m in self.spec.data["train"].get("metrics", [])]

    def __repr__(self) -> str:
        return (f"<netbuild.Model {self.name!r}: {self.input_shape} -> {self.output_shape}, "
                f"{self.network.n_params():,} parameters>")

    # -- predict and evaluate ---------------------------------------------------------------
    def inputs(self, x, name: str = "x") -> np.ndarray:
        """``x`` checked and cast as the network reads it; :class:`DataError` naming ``name``."""
        report = data_mod.reporter(name)
        return data_mod.prepare_x(_array(x, report), self.network, report, None)

    def targets(self, y, n: int, name: str = "y") -> np.ndarray:
        report = data_mod.reporter(name)
        return data_mod.prepare_y(_array(y, report), n, self.network.output_shape,
                                  losses.name_of(self.spec.data["train"]["loss"]), report, None)

    def predict(self, x, batch_size: int = BATCH_SIZE) -> np.ndarray:
        """The network's outputs for the inputs ``x`` (``(n, *input_shape)``): what
        ``netbuild predict`` writes, class probabilities for a softmax output."""
        return self.predict_checked(self.inputs(x), batch_size)

    def predict_checked(self, x: np.ndarray, batch_size: int = BATCH_SIZE) -> np.ndarray:
        """:meth:`predict` for inputs already checked (by :meth:`inputs`, or as a data file's)."""
        fn = self.predict_function()
        with _ids_in_range(self.network):
            return np.concatenate([fn(x[idx]) for idx in data_mod.batches(len(x), _batch(batch_size))])

    def predict_function(self) -> Callable:
        """The compiled ``f(batch) -> outputs`` that :meth:`predict` calls per batch (compiled
        once); it does not check its input as :meth:`predict` does."""
        if self._predict is None:
            self._predict = compile_predict(self.network)
        return self._predict

    def evaluate(self, x, y, batch_size: int = BATCH_SIZE) -> dict[str, float]:
        """The loss and the spec's metrics on ``(x, y)``: what ``netbuild eval`` reports."""
        x = self.inputs(x)
        dataset = data_mod.Dataset(x, self.targets(y, len(x)), "arrays")
        return self.evaluate_dataset(dataset, batch_size)[0]

    def evaluate_dataset(self, dataset: data_mod.Dataset, batch_size: int = BATCH_SIZE,
                         loss=None, metrics=None) -> tuple[dict[str, float], np.ndarray, np.ndarray | None]:
        """``(loss and metrics, outputs, mask)`` on a checked dataset (the mask of a masked
        sequence output, else None): the spec's loss and metrics, or ``loss`` and ``metrics``
        (spec entries) given (another model's, to compare with it)."""
        loss = self.spec.data["train"]["loss"] if loss is None else loss
        metrics = self.spec.data["train"].get("metrics", []) if metrics is None else metrics
        key = (json.dumps(loss, sort_keys=True), str(dataset.y.dtype), dataset.y.ndim)
        if key not in self._evaluate:
            self._evaluate[key] = compile_eval(self.network, loss, dataset.y)
        with _ids_in_range(self.network):
            value, outputs, mask = data_mod.run_batches(self._evaluate[key], dataset, _batch(batch_size))
        result = {"loss": value}
        result.update(metrics_mod.compute(metrics, dataset.y, outputs, mask))
        return result, outputs, mask

    def refit(self, dataset: data_mod.Dataset, loss) -> data_mod.Dataset:
        """Another model's checked dataset, checked again for this network (its input shape and
        ids, its outputs against the targets for ``loss``): :class:`DataError` when it does not
        fit."""
        report = data_mod.reporter(dataset.source)
        x = data_mod.prepare_x(dataset.x, self.network, report, None)
        y = data_mod.prepare_y(dataset.y, len(x), self.network.output_shape, losses.name_of(loss),
                               report, None)
        return data_mod.Dataset(x, y, dataset.source)

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
        rng = np.random.default_rng(0)
        shape = (n, *self.input_shape)
        ids = self.network.integer_input
        x = rng.integers(0, ids, size=shape) if ids else rng.standard_normal(shape).astype(np.float32)
        try:
            session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
            theirs = session.run(["y"], {"x": x})[0]
            ours = self.predict(x)
        except NetbuildError as exc:
            raise RunError(f"{self.source}: the export could not be compared with netbuild on random "
                           f"inputs ({exc}); nothing was written") from None
        except Exception as exc:  # onnxruntime's own errors have no common base class
            raise RunError(f"{self.source}: onnxruntime could not run the exported graph on random "
                           f"inputs ({type(exc).__name__}: {str(exc).splitlines()[0][:300]}); "
                           "nothing was written") from None
        worst = float(np.max(np.abs(theirs - ours))) if theirs.shape == ours.shape else float("inf")
        if not worst <= 1e-4 * max(1.0, float(np.max(np.abs(ours)))):
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


def _array(value, report) -> np.ndarray:
    try:
        return np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise report.error(f"is not an array ({exc}); expected a numpy array") from None


@contextlib.contextmanager
def _ids_in_range(network: Network):
    """An embedding that reads another layer's output (floats truncated to ids) can meet an id
    outside its table only while computing: a :class:`DataError`, not PyTensor's IndexError."""
    try:
        yield
    except IndexError as exc:
        tables = ", ".join(f"'{n.name}' ({n.layer.config['input_dim']} ids)" for n in network.order
                           if getattr(n.layer, "integer_input", False))
        raise DataError(f"an embedding received an id outside its table ({str(exc).splitlines()[0]});"
                        f" expected ids 0..input_dim-1 for {tables}") from None


def _whole(value) -> bool:
    """An int (numpy's too), not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _batch(batch_size: int) -> int:
    if not _whole(batch_size) or batch_size < 1:
        raise UsageError(f"batch_size {batch_size!r}; expected a whole number of at least 1")
    return int(batch_size)
