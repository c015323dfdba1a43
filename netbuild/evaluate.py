"""Evaluation and prediction from a saved model (a run directory or a model.npz)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from . import data as data_mod
from . import losses
from . import metrics as metrics_mod
from .compile import compile_eval, compile_predict
from .errors import RunError, SpecError, format_path
from .network import Network
from .runs import atomic_write, load_model, npz_bytes
from .spec import Spec, validate
from .train import run_batches

BATCH_SIZE = 256


def load_network(model: str | Path) -> tuple[Spec, Network]:
    """The validated spec and the network with its saved parameters."""
    raw_spec, params = load_model(model)
    try:
        spec = validate(raw_spec)
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
    return spec, network


def evaluate(model: str | Path, data_file: str | Path | None = None, confusion: bool = False) -> dict:
    """Loss and metrics of a saved model on ``data_file`` (default: the spec's test file), and
    the confusion matrix when asked."""
    spec, network = load_network(model)
    if data_file is None and not spec.data["data"].get("test"):
        raise RunError(f"{spec.source}: the spec has no data.test file; pass --data FILE.npz")
    dataset = data_mod.load(spec, "test", network, file=data_file)
    fn = compile_eval(network, spec.data["train"]["loss"], dataset.y)
    loss, outputs = run_batches(fn, dataset, BATCH_SIZE)
    result = {"loss": loss}
    result.update(metrics_mod.compute(spec.data["train"].get("metrics", []), dataset.y, outputs))
    out = {"model": str(model), "data": dataset.source, "examples": len(dataset), "metrics": result}
    if confusion:
        if not losses.is_classification(spec.data["train"]["loss"]):
            raise RunError(f"{spec.source}: a confusion matrix needs a classification loss; this "
                           f"model was trained with {losses.name_of(spec.data['train']['loss'])}")
        out["confusion_matrix"] = metrics_mod.confusion_matrix(dataset.y, outputs).tolist()
    return out


def failed_thresholds(metrics: dict, under, over) -> list[str]:
    """One line per threshold not met: ``--fail-under`` minimums, ``--fail-over`` maximums."""
    failures = [f"{name} {metrics[name]:.6g} is under the threshold {limit:g} (--fail-under)"
                for name, limit in under if metrics[name] < limit]
    failures += [f"{name} {metrics[name]:.6g} is over the threshold {limit:g} (--fail-over)"
                 for name, limit in over if metrics[name] > limit]
    return failures


def predict(model: str | Path, data_file: str | Path, out_file: str | Path, overwrite: bool = False) -> dict:
    """Write the network's outputs for the inputs of ``data_file`` to ``out_file`` under ``y``;
    an existing ``out_file`` is replaced only with ``overwrite``."""
    out_file = Path(out_file)
    try:
        out_file.stat()
    except FileNotFoundError:
        pass
    except OSError as exc:  # a name too long, a loop of links
        raise RunError(f"{out_file}: cannot write: {exc.strerror or exc}") from None
    if out_file.exists() and not overwrite:
        raise RunError(f"{out_file}: already exists; pass --overwrite to replace it or choose "
                       "another --out")
    if not out_file.parent.is_dir():
        raise RunError(f"{out_file}: the folder {out_file.parent} does not exist")
    if not os.access(out_file.parent, os.W_OK):
        raise RunError(f"{out_file}: cannot write in {out_file.parent}")
    spec, network = load_network(model)
    x = data_mod.load_inputs(data_file, spec, network)
    fn = compile_predict(network)
    outputs = np.concatenate([fn(x[idx]) for idx in data_mod.batches(len(x), BATCH_SIZE)])
    try:
        atomic_write(out_file, npz_bytes({"y": outputs}))
    except OSError as exc:
        raise RunError(f"{out_file}: cannot write: {exc.strerror or exc}") from None
    return {"model": str(model), "data": str(data_file), "out": str(out_file),
            "examples": len(x), "output_shape": list(outputs.shape)}
