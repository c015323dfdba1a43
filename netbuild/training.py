"""The training loop: epochs, schedules, validation, early stopping, checkpoints and exact resume.

Library code: it reports progress through callbacks and returns values; it never prints.

Exact resume: the data order of an epoch is a function of the seed and the epoch alone, and the
checkpoint written at the end of an epoch holds everything else the next epoch reads (parameters,
optimizer state, the dropout generator, schedule and early-stopping state, the history). A run
resumed from it therefore ends with the same parameters, bit for bit, as one never interrupted.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from . import data as data_mod
from . import metrics as metrics_mod
from . import schedules
from .compile import compile_eval, compile_train
from .errors import NetbuildError, RunError, SpecError
from .network import Network
from .runs import Checkpoint, RunDir
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
    stopped_early: bool = False
    best_epoch: int | None = None


@dataclass
class Callbacks:
    """What the caller hears: the compile time, each batch, each finished epoch."""

    compiled: Callable[[float], None] = lambda seconds: None
    batch: Callable[[int, int, int, float, float], None] = lambda epoch, i, n, loss, seconds: None
    epoch: Callable[[dict], None] = lambda record: None
    resumed: Callable[[int], None] = lambda epoch: None


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


class Monitor:
    """Tracks the best value of one metric: ``mode`` min or max, improvements beyond
    ``min_delta``, and epochs since the last improvement."""

    def __init__(self, name: str, mode: str = "auto", min_delta: float = 0.0):
        self.name = name
        self.mode = metrics_mod.mode_of(name) if mode in ("auto", None) else mode
        self.min_delta = float(min_delta)
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.wait = 0

    def update(self, epoch: int, record: dict) -> bool:
        """Whether ``record`` improves on the best so far (and remember it)."""
        if self.name not in record:
            raise KeyError(self.name)
        value = float(record[self.name])
        better = self.best is None or (
            value < self.best - self.min_delta if self.mode == "min" else value > self.best + self.min_delta)
        if better:
            self.best, self.best_epoch, self.wait = value, epoch, 0
        else:
            self.wait += 1
        return better

    def state(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "wait": self.wait}

    def load_state(self, state: dict) -> None:
        self.best, self.best_epoch, self.wait = state["best"], state["best_epoch"], state["wait"]


def default_monitor(has_validation: bool) -> str:
    return "val_loss" if has_validation else "loss"


def recorded(names: list[str], has_validation: bool) -> list[str]:
    """The keys an epoch's record holds that a monitor can watch."""
    return ["loss"] + names + (["val_loss"] + [f"val_{n}" for n in names] if has_validation else [])


def has_validation(spec: Spec) -> bool:
    data = spec.data["data"]
    return bool(data.get("validation") or data.get("validation_split"))


def check_training(spec: Spec, network: Network) -> None:
    """What the schema cannot say about ``train``: every ``monitor`` names a recorded key,
    metric names are unique, ``class_weights`` has one weight per class. Raises located errors
    (before anything is compiled)."""
    from . import losses

    entries = spec.data["train"].get("metrics", [])
    names = [metrics_mod.metric_name(m) for m in entries]
    issues = [spec.issue(("train", "metrics", i), f"'{n}' is listed twice; expected each metric once")
              for i, n in enumerate(names) if n in names[:i]]
    available = recorded(list(dict.fromkeys(names)), has_validation(spec))
    for section in ("early_stopping", "checkpoint", "schedule"):
        name = (spec.data["train"].get(section) or {}).get("monitor")
        if name is not None and name not in available:
            issues.append(spec.issue(("train", section, "monitor"),
                                     f"'{name}' is not recorded by this run; expected one of: "
                                     f"{', '.join(available)}"))
    loss = spec.data["train"]["loss"]
    if not losses.is_classification(loss):
        issues += [spec.issue(("train", "metrics", i), f"'{n}' scores classes; expected a regression "
                                                      f"metric (mse, mae, r2) for the loss {losses.name_of(loss)}")
                   for i, n in enumerate(names) if n in metrics_mod.CLASSIFICATION]
    weights = loss.get("class_weights") if isinstance(loss, dict) else None
    if weights is not None:
        k = losses.n_classes(network.output_shape)
        if not losses.is_classification(loss):
            issues.append(spec.issue(("train", "loss", "class_weights"),
                                     f"class weights need a classification loss; received {loss['type']}"))
        elif len(weights) != k:
            issues.append(spec.issue(("train", "loss", "class_weights"),
                                     f"received {len(weights)} weights; expected {k}, one per class "
                                     f"of the output layer"))
    issues += _memory_issues(spec, network)
    if issues:
        raise SpecError(issues)


def physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _memory_issues(spec: Spec, network: Network) -> list:
    """A spec whose training would not fit in this machine's memory, with the estimate."""
    limit = physical_memory()
    batch = int(spec.data["train"]["batch_size"])
    need = network.memory_estimate(batch)
    if limit is None or need["total"] <= limit:
        return []
    largest = max(network.order, key=lambda n: n.n_params * 5 * 4 + math.prod(n.output_shape) * batch * 8)
    gib = 2**30
    return [spec.issue(largest.path, f"training would need about {need['total'] / gib:,.1f} GiB "
                                     f"(parameters {need['parameters'] / gib:,.1f} GiB, activations "
                                     f"{need['activations'] / gib:,.1f} GiB at batch_size {batch}); "
                                     f"expected at most the {limit / gib:,.1f} GiB this machine has "
                                     f"(layer '{largest.name}' is the largest)")]


def _monitor(spec: Spec, section: str, has_validation: bool) -> Monitor | None:
    cfg = spec.data["train"].get(section)
    if cfg is None:
        return None
    name = cfg.get("monitor") or default_monitor(has_validation)
    return Monitor(name, cfg.get("mode", "auto"), cfg.get("min_delta", 0.0))


#: curves.png is drawn again when this many seconds have passed since it was last drawn (and
#: after the last epoch): drawing takes about 0.3 s, longer than an epoch of a small network.
CURVES_EVERY_S = 10.0


@contextlib.contextmanager
def frozen_garbage():
    """While the block runs, Python's cyclic garbage collector leaves alone the objects that exist
    when it starts: the compiled graphs, hundreds of thousands of objects that it walked again and
    again during training (7% of the samples in a profile of the bench LSTM). They are collected
    again afterwards (a process may train many times: a sweep's worker)."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class Trainer:
    """One training run of a validated spec into a run directory."""

    def __init__(self, spec: Spec, run_dir: RunDir, epochs: int | None = None,
                 callbacks: Callbacks | None = None):
        self.spec = spec
        self.run_dir = run_dir
        self.cfg = spec.data["train"]
        self.seed = int(spec.data.get("seed", 0))
        self.epochs = int(epochs or self.cfg["epochs"])
        self.on = callbacks or Callbacks()
        self.network = Network.from_spec(spec)
        self.sets = load_datasets(spec, self.network)
        self.metric_entries = list(self.cfg.get("metrics", []))
        has_val = self.sets.validation is not None
        check_training(spec, self.network)
        self.stopper = _monitor(spec, "early_stopping", has_val)
        self.keeper = _monitor(spec, "checkpoint", has_val) \
            if self.cfg.get("checkpoint", {}).get("save_best") else None
        schedule_cfg = self.cfg.get("schedule", {"type": "constant"})
        base_lr = float(self.cfg["optimizer"]["learning_rate"])
        self.schedule = schedules.get(schedule_cfg, base_lr)
        self.fns = compile_train(self.network, self.cfg, self.sets.train.y, self.seed)
        self.evaluate = compile_eval(self.network, self.cfg["loss"], self.sets.validation.y) if has_val else None
        self.history: list[dict] = []
        self.best_params: dict[str, np.ndarray] | None = None
        self.epoch = 0
        self.stopped = False
        # The resolved spec records the epochs this run trains for (--epochs included), so that
        # a plain --resume continues to the same end.
        spec.data["train"]["epochs"] = self.epochs

    # -- state ------------------------------------------------------------------------------
    def checkpoint(self) -> Checkpoint:
        state = {
            "epoch": self.epoch,
            "epochs": self.epochs,
            "stopped": self.stopped,
            "random_step": None if self.fns.random_step is None else int(self.fns.random_step.get_value()),
            "schedule": self.schedule.state(),
            "early_stopping": self.stopper.state() if self.stopper else None,
            "checkpoint": self.keeper.state() if self.keeper else None,
            "history": self.history,
        }
        optimizer = {name: var.get_value() for name, var in self.fns.optimizer.state.items()}
        return Checkpoint(self.network.param_values(), optimizer, self.best_params, state)

    def restore(self, ckpt: Checkpoint) -> None:
        """Continue from a checkpoint written by :meth:`checkpoint`."""
        try:
            self.network.set_param_values(ckpt.params)
        except (KeyError, ValueError) as exc:
            raise RunError(f"{self.run_dir.path}: cannot resume: the checkpoint's parameters do not "
                           f"fit this network ({exc})") from None
        for name, var in self.fns.optimizer.state.items():
            if name in ckpt.optimizer and np.shape(ckpt.optimizer[name]) == var.get_value(borrow=True).shape:
                var.set_value(np.asarray(ckpt.optimizer[name]).astype(var.dtype))  # else: fresh state
        s = ckpt.state
        try:
            if self.fns.random_step is not None and s.get("random_step") is not None:
                self.fns.random_step.set_value(np.asarray(int(s["random_step"]), dtype="int64"))
            self.schedule.load_state(s["schedule"])
            if self.stopper and s.get("early_stopping"):
                self.stopper.load_state(s["early_stopping"])
            if self.keeper and s.get("checkpoint"):
                self.keeper.load_state(s["checkpoint"])
            self.history = [dict(r) for r in s["history"]]
            self.epoch = int(s["epoch"])
            self.stopped = bool(s.get("stopped", False))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise RunError(f"{self.run_dir.path / 'checkpoint.npz'}: cannot resume: the checkpoint's "
                           f"state is not readable ({exc!r}); expected a checkpoint written by "
                           "`netbuild train`") from None
        self.best_params = ckpt.best

    # -- the loop ---------------------------------------------------------------------------
    def run_epoch(self, epoch: int) -> dict:
        lr = float(self.schedule.learning_rate(epoch))
        self.fns.optimizer.learning_rate.set_value(np.asarray(lr, dtype=self.fns.optimizer.learning_rate.dtype))
        train = self.sets.train
        n = len(train)
        batch_size = int(self.cfg["batch_size"])
        order = data_mod.epoch_order(n, self.seed, epoch) if self.cfg.get("shuffle", True) else None
        n_batches = math.ceil(n / batch_size)
        start = time.perf_counter()
        total, outputs, targets = 0.0, [], []
        for b, idx in enumerate(data_mod.batches(n, batch_size, order), start=1):
            loss, out = self.fns.step(train.x[idx], train.y[idx])
            loss = float(loss)
            if not math.isfinite(loss):
                kept = f"; the last good epoch ({epoch - 1}) is kept in {self.run_dir.path}" if epoch > 1 else ""
                raise TrainingDiverged(
                    f"training stopped: the loss became {loss} at epoch {epoch}, batch {b} of "
                    f"{n_batches}{kept}; expected a finite loss (try a smaller "
                    "train.optimizer.learning_rate, or train.clip_norm)")
            total += loss * len(idx)
            outputs.append(out)
            targets.append(train.y[idx])
            done = b * batch_size if b < n_batches else n
            self.on.batch(epoch, b, n_batches, total / done, time.perf_counter() - start)
        seconds = time.perf_counter() - start
        record: dict = {"epoch": epoch, "loss": total / n}
        record.update(metrics_mod.compute(self.metric_entries, np.concatenate(targets), np.concatenate(outputs)))
        if self.evaluate is not None:
            val_loss, val_out = run_batches(self.evaluate, self.sets.validation, batch_size)
            record["val_loss"] = val_loss
            for k, v in metrics_mod.compute(self.metric_entries, self.sets.validation.y, val_out).items():
                record[f"val_{k}"] = v
        record["learning_rate"] = lr
        record["seconds"] = round(seconds, 4)
        record["samples_per_second"] = round(n / seconds, 1) if seconds > 0 else None
        return record

    def run(self, resume_from: Checkpoint | None = None) -> TrainResult:
        with frozen_garbage():
            return self._run(resume_from)

    def _run(self, resume_from: Checkpoint | None) -> TrainResult:
        self.on.compiled(self.fns.seconds)
        self.run_dir.write_spec(self.spec)
        if resume_from is not None:
            self.restore(resume_from)
            if self.stopped:
                raise RunError(f"{self.run_dir.path}: this run already stopped early (after epoch "
                               f"{self.epoch}); expected a new run (--overwrite) to train it again")
            if self.epoch >= self.epochs:
                raise RunError(f"{self.run_dir.path}: this run already trained all its epochs "
                               f"({self.epoch} epochs); expected --epochs N above {self.epoch} to "
                               "train longer")
            self.run_dir.rewrite_metrics(self.history)
            self.on.resumed(self.epoch)
        every = int(self.cfg.get("checkpoint", {}).get("every", 1))
        stopped = self.stopped = False
        curves_drawn = time.monotonic()
        for epoch in range(self.epoch + 1, self.epochs + 1):
            record = self.run_epoch(epoch)
            self.epoch = epoch
            self.schedule.observe(epoch, record)
            self.history.append(record)
            if self.keeper and self.keeper.update(epoch, record):
                self.best_params = self.network.param_values()
            if self.stopper:
                if self.stopper.update(epoch, record) and not self.keeper:
                    self.best_params = self.network.param_values()
                stopped = self.stopped = self.stopper.wait > int(self.cfg["early_stopping"].get("patience", 5))
            self.run_dir.append_metrics(record)
            self.on.epoch(record)
            last = stopped or epoch == self.epochs
            self.run_dir.save_model(self.spec, self.final_params() if last else self.model_params())
            if last or epoch % every == 0:
                self.run_dir.save_checkpoint(self.spec, self.checkpoint())
            if last or time.monotonic() - curves_drawn >= CURVES_EVERY_S:
                self.run_dir.save_curves(self.history)
                curves_drawn = time.monotonic()
            if stopped:
                break
        if stopped or self.restores_best():
            self.network.set_param_values(self.final_params())
        watcher = self.keeper or self.stopper  # model.npz follows the checkpoint's monitor first
        best = watcher.best_epoch if watcher else None
        return TrainResult(self.network, self.history, self.fns.seconds, stopped, best)

    def restores_best(self) -> bool:
        es = self.cfg.get("early_stopping")
        return bool((es and es.get("restore_best", True)) or self.keeper)

    def model_params(self) -> dict[str, np.ndarray]:
        """What model.npz holds during training: the best so far when keeping the best."""
        if self.keeper and self.best_params is not None:
            return self.best_params
        return self.network.param_values()

    def final_params(self) -> dict[str, np.ndarray]:
        """What model.npz holds at the end: the best epoch's parameters when early stopping
        restores them or the checkpoint keeps the best, else the last epoch's."""
        if self.restores_best() and self.best_params is not None:
            return self.best_params
        return self.network.param_values()


def train(spec: Spec, run_dir: RunDir, epochs: int | None = None, callbacks: Callbacks | None = None,
          resume_from: Checkpoint | None = None) -> TrainResult:
    """Train the validated ``spec`` into ``run_dir`` (already created and locked)."""
    return Trainer(spec, run_dir, epochs, callbacks).run(resume_from)


def prepare_resume(run_dir: RunDir, spec: Spec | None, force: bool = False) -> tuple[Spec, Checkpoint | None]:
    """The spec and checkpoint to continue ``run_dir`` with (it must be open and locked).

    Without ``spec``, the run's own resolved spec.yaml is used. With one, it must equal the
    run's (``train.epochs`` may differ, to train longer) unless ``force``.
    """
    from .check import load_spec
    from .runs import SPEC_FILE, changed_keys, load_checkpoint, resolved_spec_data

    stored = load_spec(str(run_dir.path / SPEC_FILE))
    found = load_checkpoint(run_dir.path)
    if spec is None:
        spec = stored
    else:
        old = found[0] if found else resolved_spec_data(stored)
        keys = [k for k in changed_keys(old, resolved_spec_data(spec))
                if k != "train.epochs" and k.split(".")[0] != "sweep"]  # `sweep` is not the run's
        if keys and not force:
            shown = ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
            raise RunError(f"{run_dir.path}: the spec differs from the run's in {shown}; "
                           "expected the same spec to resume (pass --force to resume anyway)")
    return spec, (found[1] if found else None)
