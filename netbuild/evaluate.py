"""``netbuild eval``, ``predict`` and ``export``: a saved model (a run directory or a model.npz)
on data files, through :class:`netbuild.model.Model`."""

from __future__ import annotations

import os
from pathlib import Path

from . import data as data_mod
from . import losses
from . import metrics as metrics_mod
from .errors import RunError
from .model import Exported, Model, writable
from .runs import atomic_write, npz_bytes


def evaluate(model: str | os.PathLike, data_file: str | os.PathLike | None = None,
             confusion: bool = False) -> dict:
    """Loss and metrics of a saved model on ``data_file`` (default: the spec's test file), and
    the confusion matrix when asked."""
    loaded = Model.load(model)
    spec = loaded.spec
    if data_file is None and not spec.data["data"].get("test"):
        raise RunError(f"{spec.source}: the spec has no data.test file; pass --data FILE.npz")
    if confusion and not losses.is_classification(spec.data["train"]["loss"]):
        raise RunError(f"{spec.source}: a confusion matrix needs a classification loss; this "
                       f"model was trained with {losses.name_of(spec.data['train']['loss'])}")
    dataset = data_mod.load(spec, "test", loaded.network, file=data_file)
    metrics, outputs = loaded.evaluate_dataset(dataset)
    out = {"model": str(model), "data": dataset.source, "examples": len(dataset), "metrics": metrics}
    if confusion:
        out["confusion_matrix"] = metrics_mod.confusion_matrix(dataset.y, outputs).tolist()
    return out


def failed_thresholds(metrics: dict, under, over) -> list[str]:
    """One line per threshold not met: ``--fail-under`` minimums, ``--fail-over`` maximums."""
    failures = [f"{name} {metrics[name]:.6g} is under the threshold {limit:g} (--fail-under)"
                for name, limit in under if metrics[name] < limit]
    failures += [f"{name} {metrics[name]:.6g} is over the threshold {limit:g} (--fail-over)"
                 for name, limit in over if metrics[name] > limit]
    return failures


def predict(model: str | os.PathLike, data_file: str | os.PathLike, out_file: str | os.PathLike,
            overwrite: bool = False) -> dict:
    """Write the network's outputs for the inputs of ``data_file`` to ``out_file`` under ``y``;
    an existing ``out_file`` is replaced only with ``overwrite``."""
    out_file = Path(out_file)
    writable(out_file, overwrite)
    loaded = Model.load(model)
    x = data_mod.load_inputs(data_file, loaded.spec, loaded.network)
    outputs = loaded.predict(x)
    try:
        atomic_write(out_file, npz_bytes({"y": outputs}))
    except OSError as exc:
        raise RunError(f"{out_file}: cannot write: {exc.strerror or exc}") from None
    return {"model": str(model), "data": str(data_file), "out": str(out_file),
            "examples": len(x), "output_shape": list(outputs.shape)}


def export(model: str | os.PathLike, out_file: str | os.PathLike, opset: int | None = None,
           overwrite: bool = False) -> Exported:
    """Write a saved model as ONNX to ``out_file`` (see :meth:`Model.export_onnx`)."""
    out_file = Path(out_file)
    writable(out_file, overwrite)  # before loading: a mistake costs nothing
    return Model.load(model).export_onnx(out_file, opset, overwrite)
