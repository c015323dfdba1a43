"""One point of a sweep or one trial of a search: the task a Dask worker runs.

A task trains its spec through :func:`netbuild.training.train` into its own run directory. It
never raises for a user's mistake, a diverging run or a cancelled command: it returns a record
with its status and the one-line message, and the other points go on. A run directory that
holds a complete run of the same spec is kept (``skipped``), a partial one resumes from its
checkpoint, one of another spec is refused.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable

from .. import backend, threads
from ..errors import NetbuildError, printable
from ..report import summary
from ..runs import RunState, changes_text, inspect_run, read_history
from ..spec import Spec
from ..training import RunStopped

#: Statuses. ``skipped``: complete from an earlier command, not trained again; ``pruned``: a
#: search stopped it after a few epochs (its files are kept).
DONE, SKIPPED, PRUNED, FAILED, CANCELLED, PENDING = "done", "skipped", "pruned", "failed", "cancelled", "pending"
COMPLETE = summary.COMPLETE  # (done, skipped): the summary sorts them first

#: How often a training point asks the scheduler whether the command was cancelled.
CANCEL_CHECK_SECONDS = 0.5


@dataclass
class Task:
    """What a worker needs to train one point. ``report``: a search's trial, which reports its
    monitored value after every epoch and may be pruned (:class:`netbuild.search.tune.Reporter`);
    ``tracking``: where to log the run (:class:`netbuild.tracking.Tracking`, with the
    command's parent run)."""

    id: str
    overrides: dict[str, Any]
    spec: Spec
    run_dir: str  # absolute: the same path on every machine of the cluster
    monitor: str
    mode: str
    overwrite: bool = False
    cancel_event: str | None = None  # a distributed.Event set when the command is cancelled
    report: Any = None
    tracking: Any = None


def point_record(point_id: str, overrides: dict, status: str, history: list[dict], monitor: str,
                 mode: str, message: str = "", wall: float | None = None) -> dict:
    """The summary of one point: status, epochs, the last and the best value of ``monitor``
    (by ``mode``), its epoch, the training seconds (the epochs' sum: no compiling, no writing)
    and ``wall``, the seconds its task took in this command (None when it did not run)."""
    values = [(r["epoch"], float(r[monitor])) for r in history
              if isinstance(r.get(monitor), (int, float)) and math.isfinite(r[monitor])]
    best = (max if mode == "max" else min)(values, key=lambda ev: ev[1]) if values else None
    final = history[-1].get(monitor) if history else None
    return {
        "id": point_id,
        "overrides": dict(overrides),
        "status": status,
        "epochs": int(history[-1].get("epoch", len(history))) if history else 0,
        "final": float(final) if isinstance(final, (int, float)) else None,
        "best": best[1] if best else None,
        "best_epoch": best[0] if best else None,
        "seconds": round(sum(float(r.get("seconds") or 0.0) for r in history), 3),
        "wall_seconds": round(wall, 2) if wall is not None else None,
        "message": message,
    }


class Cancelled(RunStopped):
    """The command was cancelled while this point trained."""


# One point at a time per process: PyTensor's compiler is not made for threads, and a worker
# started with several threads (`dask worker --nthreads 4`) would otherwise train several at once.
_ONE_POINT_AT_A_TIME = threading.Lock()


def _cancel_check(event_name: str | None) -> Callable[..., None]:
    """A batch callback that raises :class:`Cancelled` once the command's event is set (asked at
    most every :data:`CANCEL_CHECK_SECONDS`)."""
    if not event_name:
        return lambda *_: None
    from distributed import Event

    event = Event(event_name)
    if event.is_set():
        raise Cancelled()
    last = time.monotonic()

    def check(*_) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= CANCEL_CHECK_SECONDS:
            last = now
            if event.is_set():
                raise Cancelled()

    return check


def different_message(run_dir, changed: list[str]) -> str:
    return (f"{run_dir}: holds a run of a different spec (it differs in {changes_text(changed)}); "
            "expected the same spec to continue (pass --overwrite to train every point again, or "
            "another directory to start afresh)")


def run_point(task: Task) -> dict:
    """Train one point into its run directory (a Dask task). Returns its record; a user's mistake,
    a diverging run, a cancelled command or a bug is a record with its status and message, never
    an exception, so that the other points go on."""
    from ..runs import RunDir
    from ..training import Callbacks, train

    status, message = DONE, ""
    with _ONE_POINT_AT_A_TIME, warnings.catch_warnings():
        start = time.perf_counter()
        # Dask's profiler thread holds frames (and their locals) of this one: PyTensor's check of
        # reference counts while building a function then warns of a harmless inconsistency.
        warnings.filterwarnings("ignore", message="Detected reference count inconsistency")
        try:
            threads.apply(threads.resolve())  # OpenMP's count is per thread: this worker thread's
            backend.use(backend.resolve())  # the worker's NETBUILD_BACKEND
            check = _cancel_check(task.cancel_event)
            state = RunState("new") if task.overwrite else inspect_run(task.run_dir, task.spec)
            if state.kind == "complete":  # a pruned trial stays pruned
                return point_record(task.id, task.overrides, PRUNED if state.halted else SKIPPED,
                                    state.history, task.monitor, task.mode,
                                    f"pruned after epoch {len(state.history)}" if state.halted else "")
            if state.kind == "different":
                return point_record(task.id, task.overrides, FAILED, [], task.monitor, task.mode,
                                    different_message(task.run_dir, state.changed))
            run_dir = RunDir(task.run_dir)
            with run_dir:
                if state.kind == "partial":
                    run_dir.open_existing()
                    message = f"resumed after epoch {len(state.history)}"
                else:
                    run_dir.create(overwrite=True)  # the command's own directory for this point
                own = Callbacks(batch=check)
                if task.report is not None:
                    own = Callbacks.join(own, task.report.callbacks())
                tracking = task.tracking.run(task.spec, run_dir.path, name=task.id) \
                    if task.tracking is not None else contextlib.nullcontext()
                with tracking as tracked:
                    result = train(task.spec.copy(), run_dir,
                                   callbacks=Callbacks.join(own, tracked and tracked.callbacks),
                                   resume_from=state.checkpoint)
                if result.halted:
                    status = PRUNED
                    message = f"pruned after epoch {result.history[-1]['epoch']}"
                if tracked is not None and tracked.problems:
                    message = "; ".join(([message] if message else []) + tracked.problems)
        except Cancelled:
            status, message = CANCELLED, "cancelled"
        except NetbuildError as exc:
            status, message = FAILED, "; ".join(exc.lines())
        except Exception as exc:  # a bug in netbuild: recorded, and the other points go on
            status, message = FAILED, f"{type(exc).__name__}: {exc}"
        wall = time.perf_counter() - start
    return point_record(task.id, task.overrides, status, read_history(task.run_dir), task.monitor,
                        task.mode, printable(message), wall)
