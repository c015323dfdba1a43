"""The Python API: what the command line does, as plain functions (the CLI is built on them).

::

    import netbuild

    spec = netbuild.load_spec("configs/digits-mlp.yaml", overrides=["train.epochs=3"])
    summary = netbuild.check(spec)             # shapes, training section and data, or an error
    run = netbuild.train(spec, run_dir="runs/digits-mlp", overwrite=True)
    model = netbuild.load_model(run.path)      # or run.model
    probabilities = model.predict(x)           # numpy in, numpy out
    scores = model.evaluate(x, y)              # {"loss": ..., "accuracy": ...}
    model.export_onnx("digits.onnx")

Every mistake a user can make (in a spec, a data file or array, a run directory, an argument)
raises :class:`netbuild.NetbuildError` (its subclasses ``SpecError``, ``DataError``,
``RunError``, ``UsageError``, ``MissingExtra``), whose ``str()`` is the located line, or lines, that the CLI prints. Nothing here
prints or exits.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from . import checks, losses, threads
from .errors import UsageError
from .model import Model
from .model import load_model as _load_model
from .runs import RunDir
from .spec import Spec, load_spec, validate
from .training import Callbacks, prepare_resume
from .training import train as run_training

SpecLike = Spec | str | os.PathLike


@dataclass
class Summary:
    """What :func:`check` found: one row per layer (name, type, inputs, output shape,
    parameters, spec line), the totals, and one row per model input (name, shape, npz key,
    line) and output (name, layer, shape, npz key, loss, loss weight, metrics, line).
    ``output_shape`` is the only output's (None for several)."""

    name: str
    layers: list[dict]
    total_params: int
    output_shape: tuple | None
    inputs: list[dict] = field(default_factory=list)
    outputs: list[dict] = field(default_factory=list)
    #: Whether the spec writes its inputs or outputs out (model.inputs, model.outputs).
    long_form: bool = False


@dataclass
class Run:
    """A finished training run: its directory, the epochs' records and the trained model."""

    path: Path
    model: Model
    history: list[dict] = field(default_factory=list)
    stopped_early: bool = False
    best_epoch: int | None = None
    compile_seconds: float = 0.0
    #: What went wrong while logging the run to its tracker (the run itself went on).
    tracking_problems: list[str] = field(default_factory=list)


def _spec(spec: SpecLike) -> Spec:
    """A validated copy of ``spec`` (training writes into its spec: never into the caller's)."""
    if isinstance(spec, Spec):
        return validate(spec)
    return load_spec(spec)


def check(spec: SpecLike, *, data: bool = True) -> Summary:
    """Everything ``netbuild check`` checks: the spec (a :class:`Spec` or a file), its shapes,
    its training section and, with ``data``, its data files. Raises located errors."""
    spec = _spec(spec)
    network = checks.check(spec, with_data=data)
    _check_sections(spec)
    sig = network.signature
    shapes = network.output_shapes()
    inputs = [{"name": i.name, "shape": list(i.shape), "key": i.key,
               "line": spec.locate(i.path).line} for i in sig.inputs]
    outputs = [{"name": o.name, "layer": network.outputs[o.name], "shape": list(shapes[o.name]),
                "key": o.key, "loss": losses.name_of(o.loss), "loss_weight": o.loss_weight,
                "metrics": o.metric_names, "line": spec.locate(o.path or o.loss_path).line}
               for o in sig.outputs]
    return Summary(str(spec.data["name"]), network.summary(), network.n_params(),
                   tuple(shapes[sig.outputs[0].name]) if len(shapes) == 1 else None,
                   inputs, outputs, not (sig.shorthand_inputs and sig.shorthand_outputs))


def _check_sections(spec: Spec) -> None:
    """What ``sweep`` and ``tune`` would say of their sections before checking any point: paths,
    repeated values, ranges (the points themselves are checked by those commands)."""
    from .search import points, space

    if spec.data.get("sweep"):
        points.grid_from_spec(spec)
    if spec.data.get("tune"):
        space.parse(spec)


def train(spec: SpecLike | None = None, run_dir: str | os.PathLike | None = None, *,
          epochs: int | None = None, overwrite: bool = False, resume: bool = False,
          force: bool = False, callbacks: Callbacks | None = None, tracking=None) -> Run:
    """Train ``spec`` into ``run_dir`` (default ``runs/<name>``), as ``netbuild train`` does.

    ``overwrite`` replaces the files of an existing run; ``resume`` continues the run in
    ``run_dir`` from its last checkpoint (with its own spec when ``spec`` is None; with another
    one only if ``force``); ``epochs`` overrides ``train.epochs`` (with ``resume``: train up to
    that many). ``callbacks`` hears the run's progress. ``tracking``: a
    :class:`netbuild.tracking.Tracking` to log the run to (MLflow).
    """
    if resume and (run_dir is None or overwrite):
        raise UsageError("resume=True continues the run in run_dir: give run_dir, and no "
                         "overwrite")
    if spec is None and not resume:
        raise UsageError("give a spec, or resume=True with the run_dir to continue")
    if epochs is not None and (not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1):
        raise UsageError(f"epochs {epochs!r}; expected a whole number of at least 1")
    threads.ensure()
    resolved = _spec(spec) if spec is not None else None
    target = RunDir(run_dir if run_dir is not None else Path("runs") / resolved.data["name"])
    with target:
        if resume:
            target.open_existing()
            resolved, checkpoint = prepare_resume(target, resolved, force)
        else:
            target.create(overwrite=overwrite)
            checkpoint = None
        logged = tracking.run(resolved, target.path) if tracking is not None else contextlib.nullcontext()
        with logged as tracked:
            result = run_training(resolved, target, epochs=epochs,
                                  callbacks=Callbacks.join(callbacks, tracked and tracked.callbacks),
                                  resume_from=checkpoint)
    return Run(target.path, Model(resolved, result.network, str(target.path)), result.history,
               result.stopped_early, result.best_epoch, result.compile_seconds,
               list(tracked.problems) if tracked is not None else [])


def savez(path: str | os.PathLike, /, **arrays) -> None:
    """Write a data file as ``numpy.savez`` does (uncompressed, each array under its keyword;
    ``numpy.load`` reads it; no ``.npz`` is added to ``path``), with each array's data aligned in
    the file, so that training reads a batch of consecutive rows (``train.shuffle_block``) in
    place, without copying it (README: data larger than memory). Written atomically: ``path`` is
    the old file or the new one, never half of one."""
    import numpy as np

    from . import npz
    from .errors import DataError, RunError, printable
    from .model import writable

    try:
        target = Path(path)
    except TypeError:
        raise UsageError(f"savez: the path is {type(path).__name__}; expected a str or a "
                         "path-like object") from None
    writable(target, overwrite=True)  # a folder, a device, a missing folder: one line each
    if not arrays:
        raise UsageError("savez: no arrays given; expected arrays by keyword, such as x=..., y=...")
    values = {}
    for key, value in arrays.items():
        if "\0" in key:
            raise UsageError(f"savez: {printable(repr(key))}: the name holds a NUL character; "
                             "expected a name without one")
        try:  # the archive's member name: KEY.npy in UTF-8, at most 65,535 bytes
            too_long = len(f"{key}.npy".encode("utf-8")) > 0xFFFF
        except UnicodeEncodeError:
            raise UsageError(f"savez: {printable(repr(key))}: the name is not valid Unicode; "
                             "expected a name UTF-8 can encode") from None
        if too_long:
            raise UsageError(f"savez: {printable(key[:40])}...: the name is longer than 65,531 "
                             "bytes in UTF-8; expected a shorter one")
        try:
            values[key] = np.asanyarray(value)
        except ValueError:  # a ragged list
            raise DataError(f"savez: {key}: is a sequence of unequal lengths, not an array; "
                            "expected a numeric array") from None
        if values[key].dtype.hasobject:
            raise DataError(f"savez: {key}: holds Python objects; expected a numeric array")
    try:
        npz.savez(target, **values)
    except OSError as exc:
        raise RunError(f"{printable(str(target))}: cannot write: {exc.strerror or exc}") from None


def load_model(path: str | os.PathLike) -> Model:
    """The trained model of a run directory or a ``model.npz`` (:class:`netbuild.model.Model`)."""
    threads.ensure()
    return _load_model(path)


__all__ = ["Callbacks", "Model", "Run", "Summary", "check", "load_model", "load_spec", "train"]
