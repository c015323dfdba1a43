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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from . import backend
from . import data as data_mod
from . import metrics as metrics_mod
from . import schedules
from .checks import check, default_monitor
from .compile import TrainFunctions, compile_eval, compile_train
from .errors import NetbuildError, RunError
from .model import bad_ids_met, ids_in_range
from .network import Network
from .runs import Checkpoint, RunDir
from .spec import Spec, load_spec


class RunStopped(Exception):
    """A run stopped from outside at a batch (a cancelled sweep or search): not a failure of the
    run, and not the user's mistake."""


class TrainingDiverged(NetbuildError):
    """The loss became NaN or infinite; training stopped at that batch."""


@dataclass
class TrainResult:
    network: Network
    history: list[dict] = field(default_factory=list)
    compile_seconds: float = 0.0
    stopped_early: bool = False
    best_epoch: int | None = None
    #: Stopped by its caller (:attr:`Callbacks.stop`), not by early stopping.
    halted: bool = False


@dataclass
class Callbacks:
    """What the caller hears: the start (the spec and the run directory, before anything
    compiles), a note about the run, the compile time, each batch, each finished epoch, a
    resume."""

    started: Callable[[Spec, Path], None] = lambda spec, path: None
    compiled: Callable[[float], None] = lambda seconds: None
    batch: Callable[[int, int, int, float, float], None] = lambda epoch, i, n, loss, seconds: None
    epoch: Callable[[dict], None] = lambda record: None
    resumed: Callable[[int], None] = lambda epoch: None
    #: Something worth knowing about the run before it trains, in one line.
    note: Callable[[str], None] = lambda text: None
    #: Asked after each epoch's record is heard: True stops the run there, as early stopping
    #: does (its files written, the run complete). A search prunes its trials with it.
    stop: Callable[[dict], bool] = lambda record: False

    @classmethod
    def join(cls, *many: "Callbacks | None") -> "Callbacks":
        """One set of callbacks that calls each of ``many`` in turn (None: left out); the run
        stops when any of them says so."""
        many = [c for c in many if c is not None]

        def each(name):
            return lambda *args: [getattr(c, name)(*args) for c in many]

        return cls(started=each("started"), compiled=each("compiled"), batch=each("batch"),
                   epoch=each("epoch"), resumed=each("resumed"), note=each("note"),
                   stop=lambda record: any([c.stop(record) for c in many]))


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
    """One training run of a validated spec into a run directory: the loop and its state.

    :meth:`prepare` builds one from a spec, a stage at a time; the constructor only takes the
    built parts.
    """

    def __init__(self, spec: Spec, run_dir: RunDir, network: Network, sets: data_mod.Datasets,
                 fns: TrainFunctions, evaluate: Callable | None, epochs: int | None = None,
                 callbacks: Callbacks | None = None):
        self.spec = spec
        self.run_dir = run_dir
        self.network = network
        self.sets = sets
        self.fns = fns
        self.evaluate = evaluate
        self.cfg = spec.data["train"]
        self.seed = int(spec.data.get("seed", 0))
        self.epochs = int(epochs or self.cfg["epochs"])
        self.on = callbacks or Callbacks()
        self.heads = network.signature.outputs
        has_val = sets.validation is not None
        self.stopper = _monitor(spec, "early_stopping", has_val)
        self.keeper = _monitor(spec, "checkpoint", has_val) \
            if self.cfg.get("checkpoint", {}).get("save_best") else None
        schedule_cfg = self.cfg.get("schedule", {"type": "constant"})
        self.schedule = schedules.get(schedule_cfg, float(self.cfg["optimizer"]["learning_rate"]))
        self.history: list[dict] = []
        self.best_params: dict[str, np.ndarray] | None = None
        self.epoch = 0
        self.stopped = False
        self.halted = False  # stopped by its caller (Callbacks.stop): a search pruned it
        # The resolved spec records the epochs this run trains for (--epochs included), so that
        # a plain --resume continues to the same end.
        spec.data["train"]["epochs"] = self.epochs

    @classmethod
    def prepare(cls, spec: Spec, run_dir: RunDir, epochs: int | None = None,
                callbacks: Callbacks | None = None) -> "Trainer":
        """Check the spec (shapes and training, before any parameter exists), build the network,
        load the data, compile the training and validation functions."""
        network = check(spec, with_data=False)
        network.init_params(int(spec.data.get("seed", 0)))
        sets = data_mod.load_datasets(spec, network)
        cfg = spec.data["train"]
        note = (callbacks or Callbacks()).note
        block = int(cfg.get("shuffle_block", 1)) if cfg.get("shuffle", True) else 0  # 0: in order
        if sets.train.inputs_read_from_files and block == 1:
            note(f"{sets.train.source}: the training set is read from its files, one system call "
                 "per shuffled row; train.shuffle_block: 1024 reads runs of 1024 rows (README: "
                 "data larger than memory)")
        elif block % int(cfg["batch_size"]) == 0 and (unaligned := sets.train.unaligned_input_files):
            # batches of consecutive rows (epoch_order), which aligned files would give in place
            more = f" and {len(unaligned) - 1} more" if len(unaligned) > 1 else ""
            note(f"{unaligned[0]}{more}: the inputs lie unaligned in the file (numpy.savez puts an "
                 "array where its name leaves it), so each batch is copied out of it; written by "
                 "netbuild.savez (or numpy.save, in a folder of .npy files), a batch of consecutive "
                 "rows is read in place (README: data larger than memory)")
        fns = compile_train(network, cfg, sets.train.ys, int(spec.data.get("seed", 0)))
        evaluate = compile_eval(network, sets.validation.ys) if sets.validation else None
        return cls(spec, run_dir, network, sets, fns, evaluate, epochs, callbacks)

    # -- state ------------------------------------------------------------------------------
    def checkpoint(self) -> Checkpoint:
        state = {
            "epoch": self.epoch,
            "epochs": self.epochs,
            "stopped": self.stopped,
            "halted": self.halted,
            "random_step": None if self.fns.random_step is None else int(self.fns.random_step.get_value()),
            "schedule": self.schedule.state(),
            "early_stopping": self.stopper.state() if self.stopper else None,
            "checkpoint": self.keeper.state() if self.keeper else None,
            "history": self.history,
        }
        optimizer = {name: np.asarray(var.get_value()) for name, var in self.fns.optimizer.state.items()}
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
            self.halted = bool(s.get("halted", False))
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
        order = data_mod.epoch_order(n, self.seed, epoch, int(self.cfg.get("shuffle_block", 1))) \
            if self.cfg.get("shuffle", True) else None
        start = time.perf_counter()
        batches = data_mod.prefetched(train, data_mod.batches(n, batch_size, order))
        if backend.current() == "jax":
            batches = backend.ahead_on_device(batches)
        with ids_in_range(self.network):
            parts, targets = self._steps(epoch, batches, n, batch_size, start)
        seconds = time.perf_counter() - start
        results = data_mod.Results.join(parts, n)
        ys = [np.concatenate([np.asarray(t[k]) for t in targets]) for k in range(len(train.ys))]
        record: dict = {"epoch": epoch}
        record.update(metrics_mod.scores(self.heads, results, ys))
        if self.evaluate is not None:
            with ids_in_range(self.network):
                val = data_mod.run_batches(self.evaluate, self.sets.validation, batch_size)
            record.update({f"val_{k}": v for k, v in metrics_mod.scores(self.heads, val,
                                                            self.sets.validation.ys).items()})
        record["learning_rate"] = lr
        record["seconds"] = round(seconds, 4)
        record["samples_per_second"] = round(n / seconds, 1) if seconds > 0 else None
        return record

    def _steps(self, epoch: int, batches, n: int, batch_size: int, start: float) -> tuple[list, list]:
        """One epoch's training steps over ``batches``: each batch's results, and its targets
        (the epoch's, in its order)."""
        n_batches = math.ceil(n / batch_size)
        parts, targets, total = [], [], 0.0
        for b, (idx, arrays) in enumerate(batches, start=1):
            part = self.fns.step(*arrays)
            loss = part.loss / len(idx)
            if not math.isfinite(loss):
                bad_ids_met()  # on jax, an id out of range made the loss NaN
                kept = f"; the last good epoch ({epoch - 1}) is kept in {self.run_dir.path}" if epoch > 1 else ""
                raise TrainingDiverged(
                    f"training stopped: the loss became {loss} at epoch {epoch}, batch {b} of "
                    f"{n_batches}{kept}; expected a finite loss (try a smaller "
                    "train.optimizer.learning_rate, or train.clip_norm)")
            total += part.loss
            parts.append(part)
            targets.append([data_mod.kept(t) for t in arrays[len(self.sets.train.xs):]])
            done = b * batch_size if b < n_batches else n
            self.on.batch(epoch, b, n_batches, total / done, time.perf_counter() - start)
        return parts, targets

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
        stopped = self.stopped = self.halted = False
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
            if not stopped and self.on.stop(record):
                stopped = self.stopped = self.halted = True
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
        return TrainResult(self.network, self.history, self.fns.seconds, stopped and not self.halted, best,
                           self.halted)

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
    callbacks = callbacks or Callbacks()
    callbacks.started(spec, run_dir.path)
    return Trainer.prepare(spec, run_dir, epochs, callbacks).run(resume_from)


def prepare_resume(run_dir: RunDir, spec: Spec | None, force: bool = False) -> tuple[Spec, Checkpoint | None]:
    """The spec and checkpoint to continue ``run_dir`` with (it must be open and locked).

    Without ``spec``, the run's own resolved spec.yaml is used. With one, it must equal the
    run's (``train.epochs`` may differ, to train longer) unless ``force``.
    """
    from .runs import SPEC_FILE, changes_text, load_checkpoint, resolved_spec_data, spec_changes

    stored = load_spec(str(run_dir.path / SPEC_FILE))
    found = load_checkpoint(run_dir.path)
    if spec is None:
        spec = stored
    else:
        keys = spec_changes(found[0] if found else resolved_spec_data(stored), spec)
        if keys and not force:
            raise RunError(f"{run_dir.path}: the spec differs from the run's in {changes_text(keys)}; "
                           "expected the same spec to resume (pass --force to resume anyway)")
    return spec, (found[1] if found else None)
