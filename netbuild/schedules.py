"""Learning-rate schedules, keyed by their YAML names: plain Python, one rate per epoch.

The training loop asks ``schedule.learning_rate(epoch)`` before each epoch (``epoch`` counts from
1) and tells ``schedule.observe(epoch, metrics)`` the epoch's record after it. ``state()`` and
``load_state()`` save and restore what a schedule has learned, so that a resumed run continues
with the same rates. Semantics follow PyTorch's epoch-based schedulers, with ``lr0`` the
optimizer's ``learning_rate`` and ``e`` the epoch after warm-up:

- ``constant``: ``lr = lr0``.
- ``step``: ``lr = lr0 * gamma ** floor((e - 1) / step_size)``.
- ``exponential``: ``lr = lr0 * gamma ** (e - 1)``.
- ``cosine``: ``lr = eta_min + (lr0 - eta_min) * (1 + cos(pi * min(e - 1, t_max) / t_max)) / 2``
  (then ``eta_min`` for good: no restart).
- ``reduce_on_plateau``: ``lr`` starts at ``lr0`` and becomes ``max(lr * factor, min_lr)`` once
  the monitored value has not improved for more than ``patience`` epochs in a row; improving
  means ``value < best - min_delta`` (mode ``min``) or ``value > best + min_delta`` (mode
  ``max``). After a reduction the count starts again (``torch.optim.lr_scheduler.
  ReduceLROnPlateau`` with ``threshold_mode="abs"``, ``cooldown=0``; a reduction smaller than
  1e-8 is skipped, as there).

Warm-up (``warmup_epochs = W``, every schedule, default 0): for epochs ``1..W`` the rate rises
linearly, ``lr = lr0 * epoch / (W + 1)``; from epoch ``W + 1`` on, the schedule runs on
``e = epoch - W``, so it starts at ``lr0``. ``reduce_on_plateau`` ignores the warm-up epochs'
values (it still checks that the monitored key is there).
"""

from __future__ import annotations

import math
from typing import Any

from . import metrics as metrics_mod
from .registry import lookup


class Schedule:
    """Base class: warm-up, then :meth:`rate` on the epoch counted from the end of warm-up."""

    type = ""

    def __init__(self, config: dict, base_lr: float):
        self.config = config
        self.base_lr = float(base_lr)
        self.warmup_epochs = int(config.get("warmup_epochs", 0))

    def learning_rate(self, epoch: int) -> float:
        """The rate for ``epoch`` (1-based), asked before the epoch runs."""
        if epoch <= self.warmup_epochs:
            return self.base_lr * epoch / (self.warmup_epochs + 1)
        return self.rate(epoch - self.warmup_epochs)

    def rate(self, epoch: int) -> float:
        """The rate on ``epoch`` counted from the end of warm-up (1-based)."""
        raise NotImplementedError

    def observe(self, epoch: int, metrics: dict[str, Any]) -> None:
        """The record of ``epoch`` after it ran; only stateful schedules use it."""

    def state(self) -> dict[str, Any]:
        """What to save for an exact resume (JSON-serializable)."""
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state` returned."""


class Constant(Schedule):
    """``lr = lr0``."""

    type = "constant"

    def rate(self, epoch):
        return self.base_lr


class Step(Schedule):
    """``lr = lr0 * gamma ** floor((e - 1) / step_size)``."""

    type = "step"

    def rate(self, epoch):
        gamma = float(self.config.get("gamma", 0.1))
        return self.base_lr * gamma ** ((epoch - 1) // int(self.config["step_size"]))


class Exponential(Schedule):
    """``lr = lr0 * gamma ** (e - 1)``."""

    type = "exponential"

    def rate(self, epoch):
        return self.base_lr * float(self.config["gamma"]) ** (epoch - 1)


class Cosine(Schedule):
    """``lr = eta_min + (lr0 - eta_min) * (1 + cos(pi * min(e - 1, t_max) / t_max)) / 2``."""

    type = "cosine"

    def rate(self, epoch):
        t_max = int(self.config["t_max"])
        eta_min = float(self.config.get("eta_min", 0.0))
        progress = min(epoch - 1, t_max) / t_max
        return eta_min + (self.base_lr - eta_min) * (1.0 + math.cos(math.pi * progress)) / 2.0


class ReduceOnPlateau(Schedule):
    """Multiply the rate by ``factor`` after more than ``patience`` epochs without improvement
    of ``monitor`` by more than ``min_delta``; never below ``min_lr``."""

    type = "reduce_on_plateau"

    #: Reductions smaller than this are skipped (PyTorch's ``eps``).
    EPS = 1e-8

    def __init__(self, config: dict, base_lr: float):
        super().__init__(config, base_lr)
        self.monitor = str(config.get("monitor", "val_loss"))
        self.mode = config.get("mode") or metrics_mod.mode_of(self.monitor)
        self.lr = self.base_lr
        self.best: float | None = None
        self.num_bad_epochs = 0

    def rate(self, epoch):
        return self.lr

    def improved(self, value: float) -> bool:
        """PyTorch's test, the first best being -inf (mode ``max``) or inf (``min``)."""
        min_delta = float(self.config.get("min_delta", 0.0))
        if self.mode == "max":
            return value > (-math.inf if self.best is None else self.best) + min_delta
        return value < (math.inf if self.best is None else self.best) - min_delta

    def observe(self, epoch, metrics):
        if self.monitor not in metrics:
            raise ValueError(f"reduce_on_plateau monitors '{self.monitor}', which the epoch's "
                             f"record lacks; it has: {', '.join(sorted(metrics))}")
        if epoch <= self.warmup_epochs:
            return
        value = float(metrics[self.monitor])
        if self.improved(value):
            self.best, self.num_bad_epochs = value, 0
        else:
            self.num_bad_epochs += 1
        if self.num_bad_epochs > int(self.config.get("patience", 10)):
            new_lr = max(self.lr * float(self.config.get("factor", 0.1)),
                         float(self.config.get("min_lr", 0.0)))
            if self.lr - new_lr > self.EPS:
                self.lr = new_lr
            self.num_bad_epochs = 0

    def state(self):
        return {"lr": self.lr, "best": self.best, "num_bad_epochs": self.num_bad_epochs}

    def load_state(self, state):
        self.lr = float(state["lr"])
        self.best = None if state["best"] is None else float(state["best"])
        self.num_bad_epochs = int(state["num_bad_epochs"])


REGISTRY: dict[str, type[Schedule]] = {
    cls.type: cls for cls in (Constant, Step, Exponential, Cosine, ReduceOnPlateau)
}


def get(config: dict, base_lr: float) -> Schedule:
    """A new schedule for a spec mapping ``{type: ..., ...}`` around the optimizer's rate."""
    cls, _ = lookup(REGISTRY, config, "schedule")
    return cls(config, base_lr)
