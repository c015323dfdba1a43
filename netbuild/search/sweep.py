"""A sweep: every point of a grid trained on Dask, its state on disk, its summary.

Each point trains through :func:`netbuild.training.train` into its own run directory,
``<sweep dir>/<point id>``, as one task on ``dask.distributed`` (:mod:`.cluster`). Running a sweep
again skips the points whose run is complete, resumes interrupted ones from their checkpoint and
trains failed ones again; a point directory that holds a run of a different spec is refused
(``overwrite`` trains every point from scratch).

The sweep directory holds ``sweep.json`` (the points, their overrides and status, rewritten as
points finish), ``summary.csv`` and ``summary.md`` (one row per point, sorted by the monitored
metric, failed points last) and ``summary.png`` (the metric against each swept value).

Library code: it reports progress through callbacks and returns values; it never prints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .. import __version__
from ..report import summary
from ..runs import RunState, inspect_run, read_history
from .cluster import Runner, client_for, default_workers, point_threads
from .errors import SearchError, SearchInterrupted
from .points import Plan
from .state import SWEEP_FILE, SearchDir, previous_tracking
from .task import CANCELLED, DONE, PENDING, SKIPPED, Task, different_message, point_record

SUMMARY_CSV = "summary.csv"
SUMMARY_MD = "summary.md"
SUMMARY_PNG = "summary.png"


@dataclass
class Result:
    """Every point's record (in grid or trial order), the summary's rows (sorted) and files."""

    records: list[dict]
    rows: list[dict]
    files: list[Path]
    interrupted: bool = False
    #: The ids of the points this command trained (or tried to).
    ran: set[str] = field(default_factory=set)

    def count(self, *statuses: str) -> int:
        return sum(1 for r in self.records if r["status"] in statuses)


@dataclass
class Callbacks:
    """What the caller hears: the start (points in all, already complete, where they run) and
    every finished point (its record, how many finished, how many run)."""

    start: Callable[[dict], None] = lambda info: None
    point: Callable[[dict, int, int], None] = lambda record, done, total: None


def where_text(scheduler: str | None, workers: int, per_worker: int) -> str:
    if scheduler:
        return f"the cluster at {scheduler}"
    return (f"a local cluster of {workers} worker{'s' * (workers != 1)} "
            f"({per_worker} thread{'s' * (per_worker != 1)} each)")


def run(plan: Plan, scheduler: str | None = None, workers: int | None = None, overwrite: bool = False,
        callbacks: Callbacks | None = None, per_point_threads: int | None = None,
        tracking: Any = None) -> Result:
    """Train every point of ``plan`` that is not complete yet, on a ``LocalCluster`` of
    ``workers`` processes (default: one per core, at most one per point), each with
    ``per_point_threads`` threads (default: the cores divided among them), or on the cluster of
    ``scheduler`` (whose workers compute with their own ``NETBUILD_THREADS``); write
    ``sweep.json`` and the summary. ``tracking``: a :class:`netbuild.tracking.Tracking` under
    whose parent run each point is logged. Raises :class:`SearchInterrupted` on Ctrl-C (after
    writing the summary of what completed)."""
    on = callbacks or Callbacks()
    folder = plan.sweep_dir.absolute()
    with SearchDir(folder, SWEEP_FILE, "sweep") as sweep_dir:
        records: dict[str, dict] = {}
        todo = []
        different = []
        for point in plan.points:
            run_dir = folder / point.id
            state = RunState("new") if overwrite else inspect_run(run_dir, plan.specs[point.id])
            if state.kind == "complete":
                records[point.id] = point_record(point.id, point.overrides, SKIPPED, state.history,
                                                 plan.monitor, plan.mode)
            elif state.kind == "different":
                different.append(different_message(run_dir, state.changed))
            else:
                todo.append(point)
        if different:
            raise SearchError(different)
        for point in todo:
            records[point.id] = point_record(point.id, point.overrides, PENDING, [], plan.monitor, plan.mode)
        tracked = tracking.state() if tracking is not None else previous_tracking(folder, SWEEP_FILE)

        def save() -> None:
            _write_state(sweep_dir, plan, records, tracked)

        save()
        n_workers = workers or plan.workers or default_workers(len(todo))
        per_worker = point_threads(n_workers, per_point_threads)
        on.start({"points": len(plan.points), "complete": len(plan.points) - len(todo), "to_run": len(todo),
                  "where": where_text(scheduler, n_workers, per_worker), "sweep_dir": plan.sweep_dir})
        interrupted = False
        if todo:
            tasks = [Task(p.id, p.overrides, plan.specs[p.id], str(folder / p.id), plan.monitor, plan.mode,
                          overwrite, tracking=tracking) for p in todo]
            interrupted = _train(tasks, records, save, plan, scheduler, n_workers, per_worker, on)
        ordered = [records[p.id] for p in plan.points]
        of = plan.summary_of()
        rows = summary.rows(of, ordered)
        save()
        files = write_files(sweep_dir, plan.sweep_dir, {
            SUMMARY_CSV: summary.summary_csv(of, rows).encode("utf-8"),
            SUMMARY_MD: summary.summary_md(of, rows).encode("utf-8"),
            SUMMARY_PNG: summary.params_png(of, rows)})
    result = Result(ordered, rows, files, interrupted, ran={p.id for p in todo})
    if interrupted:
        finished = result.count(DONE, SKIPPED)
        raise SearchInterrupted(f"interrupted: {finished} of {len(ordered)} points complete, "
                                f"{result.count(CANCELLED)} cancelled; the summary is in "
                                f"{plan.sweep_dir / SUMMARY_MD}; run the same command again to "
                                "continue (completed points are kept)")
    return result


def _train(tasks: list[Task], records: dict, save: Callable[[], None], plan: Plan, scheduler: str | None,
           workers: int, per_worker: int, on: Callbacks) -> bool:
    """Submit ``tasks`` and collect the records as points finish; True when interrupted."""
    finished = 0
    try:
        with client_for(workers, scheduler, per_worker) as client:
            runner = Runner(client)
            try:
                for task in tasks:
                    runner.submit(task)
                for task, record in runner.finished():
                    records[task.id] = record
                    finished += 1
                    save()
                    on.point(record, finished, len(tasks))
            except KeyboardInterrupt:
                for task, record in runner.cancel():
                    records[task.id] = record
                return True
    except KeyboardInterrupt:  # during the cluster's start or close
        for task in tasks:
            if records[task.id]["status"] == PENDING:
                records[task.id] = point_record(task.id, task.overrides, CANCELLED,
                                                read_history(task.run_dir), plan.monitor, plan.mode,
                                                "cancelled")
        return True
    return False


def _write_state(sweep_dir: SearchDir, plan: Plan, records: dict, tracking: dict | None) -> None:
    sweep_dir.write_state({
        "name": plan.name,
        "spec": str(Path(plan.spec_file).absolute()),
        "monitor": plan.monitor,
        "mode": plan.mode,
        "grid": {a.text: a.values for a in plan.axes},
        "random": plan.random,
        "seed": plan.seed,
        "tracking": tracking,
        "netbuild_version": __version__,
        "points": [records[p.id] for p in plan.points],
    })


def write_files(folder: SearchDir, shown: Path, files: dict[str, bytes]) -> list[Path]:
    """Each of ``files`` (name -> bytes) written atomically into ``folder``; their paths under
    ``shown`` (the folder as the user named it)."""
    for name, data in files.items():
        folder.write(name, data)
    return [shown / name for name in files]
