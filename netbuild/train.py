"""The training loop: batches, epochs, validation, metrics, outputs in the run directory.

Library code: it reports progress through callbacks and returns values; it never prints.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from . import data as data_mod
from . import metrics as metrics_mod
from .compile import compile_eval, compile_train
from .errors import NetbuildError
from .network import Network
from .runs import RunDir
from .spec import Spec


class TrainingDiverged(NetbuildError):
    """The loss became NaN or infinite; training stopped at that batch."""


@dataclass
class Datasets:
    train: data_mod.Dataset
    validation: data_mod.Dataset | None = None


@dataclass
class TrainResult:
    network: Network
    history: list[dict] = field(default_factory=list)
    compile_seconds: float = 0.0


def load_datasets(spec: Spec, network: Network) -> Datasets:
    """The training data and the validation data (a file, a split, or none)."""
    cfg = spec.data["data"]
    train = data_mod.load(spec, "train", network)
    if cfg.get("validation"):
        return Datasets(train, data_mod.load(spec, "validation", network))
    fraction = float(cfg.get("validation_split", 0.0))
    try:
        train, validation = data_mod.split(train, fraction, int(spec.data.get("seed", 0)))
    except ValueError as exc:
        raise spec.error(("data", "validation_split"), str(exc)) from None
    return Datasets(train, validation)


def run_batches(fn: Callable, dataset: data_mod.Dataset, batch_size: int) -> tuple[float, np.ndarray]:
    """Mean loss and all outputs of ``fn(x, y) -> (per-example loss, outputs)`` over a dataset."""
    total, outputs = 0.0, []
    for idx in data_mod.batches(len(dataset), batch_size):
        per_example, out = fn(dataset.x[idx], dataset.y[idx])
        total += float(np.sum(per_example))
        outputs.append(out)
    return total / len(dataset), np.concatenate(outputs)


def train(spec: Spec, run_dir: RunDir, epochs: int | None = None,
          on_compiled: Callable[[float], None] | None = None,
          on_epoch: Callable[[dict], None] | None = None) -> TrainResult:
    """Train the validated ``spec`` into ``run_dir`` (already created)."""
    seed = int(spec.data.get("seed", 0))
    cfg = spec.data["train"]
    network = Network.from_spec(spec)
    sets = load_datasets(spec, network)
    fns = compile_train(network, cfg, sets.train.y, seed)
    evaluate = compile_eval(network, cfg["loss"], sets.train.y) if sets.validation else None
    if on_compiled:
        on_compiled(fns.seconds)
    run_dir.write_spec(spec)

    batch_size = int(cfg["batch_size"])
    names = list(cfg.get("metrics", []))
    n = len(sets.train)
    result = TrainResult(network, compile_seconds=fns.seconds)
    for epoch in range(1, (epochs or int(cfg["epochs"])) + 1):
        start = time.perf_counter()
        order = data_mod.epoch_order(n, seed, epoch) if cfg.get("shuffle", True) else None
        total, outputs, targets = 0.0, [], []
        for b, idx in enumerate(data_mod.batches(n, batch_size, order), start=1):
            loss, out = fns.step(sets.train.x[idx], sets.train.y[idx])
            loss = float(loss)
            if not math.isfinite(loss):
                raise TrainingDiverged(f"training stopped: the loss became {loss} at epoch {epoch}, "
                                       f"batch {b}; try a smaller train.optimizer.learning_rate "
                                       f"(the last complete epoch's model is in {run_dir.path})")
            total += loss * len(idx)
            outputs.append(out)
            targets.append(sets.train.y[idx])
        seconds = time.perf_counter() - start
        record: dict = {"epoch": epoch, "loss": total / n}
        record.update(metrics_mod.compute(names, np.concatenate(targets), np.concatenate(outputs)))
        if evaluate is not None:
            val_loss, val_out = run_batches(evaluate, sets.validation, batch_size)
            record["val_loss"] = val_loss
            for k, v in metrics_mod.compute(names, sets.validation.y, val_out).items():
                record[f"val_{k}"] = v
        record["seconds"] = round(seconds, 4)
        record["samples_per_second"] = round(n / seconds, 1) if seconds > 0 else None
        run_dir.append_metrics(record)
        run_dir.save_model(spec, network.param_values())
        result.history.append(record)
        if on_epoch:
            on_epoch(record)
    return result
