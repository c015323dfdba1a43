"""``netbuild eval``, ``predict`` and ``export``: a saved model (a run directory or a model.npz)
on data files, through :class:`netbuild.model.Model`."""

from __future__ import annotations

import os
from pathlib import Path

from . import data as data_mod
from . import losses
from . import metrics as metrics_mod
from .errors import NetbuildError, RunError
from .model import Exported, Model, writable


def evaluate(model: str | os.PathLike, data_file: str | os.PathLike | None = None,
             confusion: bool = False, baseline: str | os.PathLike | None = None,
             max_drop: dict[str, float] | None = None) -> dict:
    """Loss and metrics of a saved model on ``data_file`` (default: the spec's test file), the
    confusion matrix of each classification output when asked, and with ``baseline`` another
    model's on the same data, compared metric by metric (:func:`compare`)."""
    loaded = Model.load(model)
    spec = loaded.spec
    heads = loaded.network.signature.outputs
    if data_file is None and not spec.data["data"].get("test"):
        raise RunError(f"{spec.source}: the spec has no data.test file; pass --data FILE.npz (or a folder of .npy files)")
    classifying = [h for h in heads if losses.is_classification(h.loss)]
    if confusion and not classifying:
        names = ", ".join(losses.name_of(h.loss) for h in heads)
        raise RunError(f"{spec.source}: a confusion matrix needs a classification loss; this "
                       f"model was trained with {names}")
    other = Model.load(baseline) if baseline is not None else None
    dataset = data_mod.load(spec, "test", loaded.network, file=data_file)
    metrics, results = loaded.evaluate_dataset(dataset)
    out = {"model": str(model), "data": dataset.source, "examples": len(dataset), "metrics": metrics}
    if confusion:
        matrices = {h.name: metrics_mod.confusion_matrix(*metrics_mod.real_steps(
                        y, results.outputs[h.name], results.masks[h.name])).tolist()
                    for h, y in zip(heads, dataset.ys) if h in classifying}
        if loaded.network.signature.shorthand_outputs:
            out["confusion_matrix"] = matrices[heads[0].name]
        else:
            out["confusion_matrices"] = matrices
    if other is not None:
        try:
            theirs, their_heads = other.refit(dataset, heads, list(loaded.network.inputs))
        except NetbuildError as exc:
            raise RunError(f"{baseline}: the baseline does not fit the data the model is evaluated "
                           f"on: {exc}") from None
        base, _ = other.evaluate_dataset(theirs, heads=their_heads)
        out["baseline"] = {"model": str(baseline), "metrics": base,
                           "comparison": compare(metrics, base, max_drop or {})}
    return out


def compare(metrics: dict[str, float], baseline: dict[str, float],
            max_drop: dict[str, float]) -> list[dict]:
    """Each metric against the baseline's: the change, and whether it is worse by more than its
    allowed ``max_drop`` (0 when not given) in the metric's direction (lower loss and error are
    better, higher accuracy is better)."""
    rows = []
    for name, value in metrics.items():
        base = baseline[name]
        direction = metrics_mod.mode_of(name)
        worse_by = (value - base) if direction == "min" else (base - value)
        allowed = float(max_drop.get(name, 0.0))
        rows.append({"metric": name, "value": value, "baseline": base, "change": value - base,
                     "better": "lower" if direction == "min" else "higher", "allowed": allowed,
                     "worse_by": max(worse_by, 0.0), "passed": bool(worse_by <= allowed)})
    return rows


def baseline_failures(rows: list[dict]) -> list[str]:
    """One line per metric worse than the baseline by more than it may be."""
    return [f"{r['metric']} {r['value']:.6g} is worse than the baseline's {r['baseline']:.6g} by "
            f"{r['worse_by']:.6g} ({r['better']} is better); expected at most {r['allowed']:g} "
            "(--max-drop)" for r in rows if not r["passed"]]


def failed_thresholds(metrics: dict, under, over) -> list[str]:
    """One line per threshold not met: ``--fail-under`` minimums, ``--fail-over`` maximums."""
    failures = [f"{name} {metrics[name]:.6g} is under the threshold {limit:g} (--fail-under)"
                for name, limit in under if metrics[name] < limit]
    failures += [f"{name} {metrics[name]:.6g} is over the threshold {limit:g} (--fail-over)"
                 for name, limit in over if metrics[name] > limit]
    return failures


def predict(model: str | os.PathLike, data_file: str | os.PathLike, out_file: str | os.PathLike,
            overwrite: bool = False) -> dict:
    """Write the network's outputs for the inputs of ``data_file`` to ``out_file``, each under
    its output's key (the shorthand's one output under ``y``, whatever ``data.y_key``); an
    existing ``out_file`` is replaced only with ``overwrite``."""
    out_file = Path(out_file)
    writable(out_file, overwrite)
    loaded = Model.load(model)
    xs = data_mod.load_inputs(data_file, loaded.spec, loaded.network)
    try:  # load_inputs checked the inputs already
        shapes = loaded.write_predictions(xs, out_file)
    except OSError as exc:
        raise RunError(f"{out_file}: cannot write: {exc.strerror or exc}") from None
    return {"model": str(model), "data": str(data_file), "out": str(out_file),
            "examples": len(xs[0]), "outputs": {k: list(v) for k, v in shapes.items()}}


def export(model: str | os.PathLike, out_file: str | os.PathLike, opset: int | None = None,
           overwrite: bool = False) -> Exported:
    """Write a saved model as ONNX to ``out_file`` (see :meth:`Model.export_onnx`)."""
    out_file = Path(out_file)
    writable(out_file, overwrite)  # before loading: a mistake costs nothing
    return Model.load(model).export_onnx(out_file, opset, overwrite)
