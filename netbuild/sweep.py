"""Sweeps: one spec trained at many values, each point a task on a Dask cluster.

A sweep is a spec plus a grid: for each swept path (the ``--set`` syntax, e.g.
``train.optimizer.learning_rate`` or ``model.layers[0].units``) a list of values. Its points are
every combination of the values (the grid's cartesian product, first path slowest), or ``random``
of them drawn without replacement with a seed. Each point is the spec with its overrides; every
point is validated (schema, shapes, training options, data) before anything runs, and a bad
value is reported where it was given, with the point named.

Each point trains through :func:`netbuild.training.train` into its own run directory,
``<sweep dir>/<point id>``, as one task on ``dask.distributed``: a ``LocalCluster`` of worker
processes that the command starts and stops, or the workers of a running scheduler. A task never
raises for a user's mistake or a diverging run: it returns a record with the status ``failed``
and the one-line message, and the other points go on.

Point ids are a readable slug of the overrides plus a hash of them (``learning_rate=0.01-3f9a61c2``),
so the same point finds the same directory again. Running a sweep again skips the points whose
run is complete, resumes interrupted ones from their checkpoint and trains failed ones again; a
point directory that holds a run of a different spec is refused (``overwrite`` trains every point
from scratch).

The sweep directory holds ``sweep.json`` (the points, their overrides and status, rewritten as
points finish), ``summary.csv`` and ``summary.md`` (one row per point, sorted by the monitored
metric, failed points last) and ``summary.png`` (the metric against each swept value).

Library code: it reports progress through callbacks and returns values; it never prints.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import fcntl
import hashlib
import io
import itertools
import json
import logging
import math
import os
import random as random_mod
import re
import signal
import threading
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from . import __version__
from . import metrics as metrics_mod
from . import threads
from .errors import Issue, Location, NetbuildError, RunError, SpecError, format_path, printable
from .spec import Spec, load_file, validate
from .spec.load import apply_override, apply_overrides, parse_path

SWEEP_FILE = "sweep.json"
SUMMARY_CSV = "summary.csv"
SUMMARY_MD = "summary.md"
SUMMARY_PNG = "summary.png"
LOCK_FILE = ".lock"

#: Point statuses. ``skipped``: complete from an earlier sweep, not trained again.
DONE, SKIPPED, FAILED, CANCELLED, PENDING = "done", "skipped", "failed", "cancelled", "pending"
COMPLETE = (DONE, SKIPPED)

#: Seconds the running points get to stop after Ctrl-C before the cluster is closed.
CANCEL_GRACE_SECONDS = 5.0
#: How often a training point asks the scheduler whether the sweep was cancelled.
CANCEL_CHECK_SECONDS = 0.5


class SweepError(NetbuildError):
    """A sweep that cannot start or finish: one or more lines, exit code 1."""

    def __init__(self, lines: str | list[str]):
        self._lines = [lines] if isinstance(lines, str) else list(lines)
        super().__init__("\n".join(self._lines))

    def lines(self) -> list[str]:
        return list(self._lines)


class SweepInterrupted(SweepError):
    """Ctrl-C: running points were cancelled, completed ones kept. Exit code 130."""

    exit_code = 130


class ArgumentError(ValueError):
    """A command-line mistake (``--grid`` syntax, ``--monitor``): the CLI makes it a usage error."""

    def __init__(self, option: str, message: str):
        self.option = option
        super().__init__(message)


# ----- the grid ---------------------------------------------------------------------------


@dataclass
class Axis:
    """One swept path and its values. ``where`` locates each value (a line of the spec's
    ``sweep.grid``, or the ``--grid`` argument); ``origin`` is ``"spec"`` or ``"--grid"``."""

    path: tuple
    values: list
    where: list[Location]
    origin: str = "--grid"
    key_where: Location | None = None

    @property
    def text(self) -> str:
        return format_path(self.path)


@dataclass
class Point:
    """One combination of values: ``overrides`` maps each swept path (text) to its value."""

    id: str
    overrides: dict[str, Any]
    index: tuple  # the value's index on each axis


_GRID_EXAMPLE = "for example train.optimizer.learning_rate=0.001,0.01"


def parse_grid(argument: str) -> Axis:
    """``PATH=V1,V2,...`` -> an :class:`Axis`. The values are read as one YAML flow list, so a
    value may itself be a list or a mapping: ``model.layers[0].kernel_size=[3,3],[5,5]``.
    Raises :class:`ArgumentError`."""
    raw_path, sep, raw = argument.partition("=")
    if not sep or not raw_path.strip():
        raise ArgumentError("--grid", f"'{argument}' is not PATH=V1,V2,...; {_GRID_EXAMPLE}")
    path = parse_path(raw_path.strip())
    if path is None:
        raise ArgumentError("--grid", f"'{raw_path}' is not a path; expected dotted keys and [index] "
                                      "parts, for example model.layers[0].units")
    if not raw.strip():
        raise ArgumentError("--grid", f"'{argument}' gives no values; {_GRID_EXAMPLE}")
    from .spec import load_text

    where = Location(f"--grid {argument}")
    try:
        values = load_text(f"[{raw}]", where.source).data
    except SpecError as exc:
        raise ArgumentError("--grid", f"'{argument}': cannot read the values '{raw}' as a YAML list "
                                      f"({exc.issues[0].message}); {_GRID_EXAMPLE}") from None
    if not isinstance(values, list) or not values:
        raise ArgumentError("--grid", f"'{argument}' gives no values; {_GRID_EXAMPLE}")
    repeated = _repeated(values)
    if repeated is not None:
        raise ArgumentError("--grid", f"'{argument}': the value {_value_text(repeated)} is given twice; "
                                      "expected each value once")
    if path[0] == "sweep":
        raise ArgumentError("--grid", f"'{argument}': the sweep section cannot be swept")
    return Axis(path, values, [where] * len(values), "--grid")


def _repeated(values: list) -> Any:
    seen = set()
    for v in values:
        key = _canonical(v)
        if key in seen:
            return v
        seen.add(key)
    return None


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def grid_from_spec(spec: Spec) -> list[Axis]:
    """The axes of the spec's ``sweep.grid`` (already checked by the schema). Raises located
    :class:`SpecError`."""
    section = spec.data.get("sweep") if isinstance(spec.data, dict) else None
    grid = (section or {}).get("grid")
    if grid is None:
        return []
    if not grid:
        raise spec.error(("sweep", "grid"), "received an empty mapping; expected at least one "
                                            "PATH: [values], e.g. train.optimizer.learning_rate: [0.001, 0.01]")
    axes, issues = [], []
    for key, values in grid.items():
        here = ("sweep", "grid", key)
        path = parse_path(key)
        if path is None:
            issues.append(spec.issue(here, f"'{key}' is not a path; expected dotted keys and [index] "
                                           "parts, for example model.layers[0].units", key=True))
            continue
        if path[0] == "sweep":
            issues.append(spec.issue(here, "the sweep section cannot be swept", key=True))
            continue
        repeated = _repeated(values)
        if repeated is not None:
            issues.append(spec.issue(here, f"the value {_value_text(repeated)} is given twice; "
                                           "expected each value once"))
            continue
        axes.append(Axis(path, list(values), [spec.locate(here + (i,)) for i in range(len(values))],
                         "spec", spec.locate(here, key=True)))
    if issues:
        raise SpecError(issues)
    return axes


def merge_axes(from_spec: list[Axis], from_cli: list[Axis]) -> list[Axis]:
    """The spec's axes, each replaced by a ``--grid`` of the same path, then the other ``--grid``
    axes. Two axes where one path lies inside the other are refused."""
    cli_paths = [a.path for a in from_cli]
    for i, path in enumerate(cli_paths):
        if path in cli_paths[:i]:
            raise ArgumentError("--grid", f"'{format_path(path)}' is given twice; expected one --grid "
                                          "per path, with all its values")
    axes = [a for a in from_spec if a.path not in cli_paths] + list(from_cli)
    for i, a in enumerate(axes):
        for b in axes[:i]:
            inner, outer = (a, b) if len(a.path) > len(b.path) else (b, a)
            if inner.path[: len(outer.path)] == outer.path:
                message = (f"'{inner.text}' lies inside the swept '{outer.text}'; expected paths that "
                           "do not overlap")
                if a.origin == "spec":
                    raise SpecError(Issue(a.key_where, ("sweep", "grid", a.text), message))
                raise ArgumentError("--grid", message)
    return axes


def expand(axes: list[Axis], random: int | None = None, seed: int = 0) -> list[Point]:
    """The points of the grid: every combination (first axis slowest), or ``random`` of them
    drawn without replacement with ``seed`` (all of them when ``random`` is at least their
    number), kept in grid order. The same axes, ``random`` and ``seed`` give the same points."""
    sizes = [len(a.values) for a in axes]
    total = math.prod(sizes)
    if random is not None and random < total:
        chosen = sorted(random_mod.Random(seed).sample(range(total), random))
        indices = [_unravel(i, sizes) for i in chosen]
    else:
        indices = list(itertools.product(*[range(n) for n in sizes]))
    names = short_names(axes)
    points = []
    for index in indices:
        overrides = {a.text: a.values[i] for a, i in zip(axes, index)}
        points.append(Point(point_id(overrides, names), overrides, tuple(index)))
    return points


def _unravel(flat: int, sizes: list[int]) -> tuple:
    """The grid index of the ``flat``-th combination (first axis slowest)."""
    out = []
    for size in reversed(sizes):
        flat, rest = divmod(flat, size)
        out.append(rest)
    return tuple(reversed(out))


def short_names(axes: list[Axis]) -> dict[str, str]:
    """For each axis path, its shortest tail that still tells the axes apart and holds a key:
    ``train.optimizer.learning_rate`` -> ``learning_rate``; ``model.layers[0].units`` and
    ``model.layers[2].units`` -> ``layers[0].units`` and ``layers[2].units``."""
    out = {}
    for a in axes:
        for n in range(1, len(a.path) + 1):
            tail = a.path[-n:]
            if not isinstance(tail[0], str):
                continue
            if n == len(a.path) or not any(b is not a and b.path[-n:] == tail for b in axes):
                out[a.text] = format_path(tail)
                break
    return out


def _value_text(value: Any) -> str:
    """A value as a person writes it: ``0.001``, ``true``, ``adam``, ``[3, 3]``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        return f"{value:g}" if math.isfinite(value) else str(value)
    if isinstance(value, (int, str)):
        return str(value)
    return json.dumps(value, sort_keys=True, separators=(", ", ": "), default=str)


def point_id(overrides: dict[str, Any], names: dict[str, str] | None = None) -> str:
    """``learning_rate=0.01_units=64-3f9a61c2``: the overrides, short and file-name safe, then a
    hash of all of them (path and exact value), so that distinct points never share an id and the
    same point always gets the same one."""
    names = names or {}
    parts = []
    for path, value in overrides.items():
        name = names.get(path, path).replace("[", "").replace("]", "")
        text = re.sub(r"[^A-Za-z0-9.+-]+", "_", _value_text(value)).strip("_")[:24] or "_"
        parts.append(f"{name}={text}")
    slug = "_".join(parts)[:80].rstrip("_")
    digest = hashlib.sha256(_canonical(sorted(overrides.items())).encode("utf-8")).hexdigest()[:8]
    return f"{slug}-{digest}" if slug else digest


# ----- the plan: points validated before anything runs ------------------------------------


@dataclass
class Plan:
    """A validated sweep: its points, each point's spec (validated, defaults filled, without the
    ``sweep`` section), the monitored metric and where the runs go."""

    name: str
    spec_file: str
    axes: list[Axis]
    points: list[Point]
    specs: dict[str, Spec]
    monitor: str
    mode: str
    sweep_dir: Path
    random: int | None = None
    seed: int = 0
    workers: int | None = None

    @property
    def names(self) -> dict[str, str]:
        return short_names(self.axes)


def _set_value(spec: Spec, axis: Axis, value: Any, where: Location) -> None:
    """Set ``axis.path`` to ``value`` in place, located at ``where`` (not at a ``--set``)."""
    try:
        apply_override(spec, f"{axis.text}=")  # makes the containers; the value is set below
    except SpecError as exc:
        raise SpecError([Issue(where, i.path, i.message) for i in exc.issues]) from None
    node: Any = spec.data
    for part in axis.path[:-1]:
        node = node[part]
    node[axis.path[-1]] = copy.deepcopy(value)
    spec.locations[axis.path] = where
    spec.key_locations[axis.path] = where


def _check_point(spec: Spec, data_checked: set) -> Spec:
    """Everything ``netbuild check`` checks, for one point's spec; returns the validated spec
    (defaults filled). Raises located errors."""
    from .checks import check, check_data

    resolved = validate(spec)
    network = check(resolved, with_data=False)
    # The data checks depend on the data files, the model and the loss alone: once per kind.
    key = _canonical([{k: v for k, v in resolved.data.items() if k != "train"},
                      resolved.data["train"].get("loss"), str(resolved.base_dir)])
    if key not in data_checked:
        check_data(resolved, network)
        data_checked.add(key)
    return resolved


def plan(spec_file: str, grid: tuple | list = (), overrides: tuple | list = (), random: int | None = None,
         seed: int | None = None, monitor: str | None = None, sweep_dir: str | os.PathLike | None = None,
         workers: int | None = None) -> Plan:
    """Load ``spec_file``, apply ``overrides`` (``--set``) to it, expand its ``sweep`` section and
    the ``grid`` arguments (``--grid``) into points, and validate every point.

    Command-line values win over the spec's ``sweep`` section. Raises :class:`ArgumentError` for a
    malformed argument and located :class:`SpecError` / :class:`SweepError` for everything else;
    a problem found at several points is reported once, naming the first of them.
    """
    from .checks import default_monitor, has_validation

    raw = load_file(spec_file)
    if not isinstance(raw.data, dict):
        validate(raw)  # raises the located "expected a mapping"
    cli_axes = [parse_grid(g) for g in grid]
    base = apply_overrides(raw, overrides)
    try:
        validate(base)
    except SpecError as exc:  # the sweep section must be valid as written; the rest may need a point
        own = [_grid_key_issue(base, i) for i in exc.issues if i.path[:1] == ("sweep",)]
        if own:
            raise SpecError(own) from None
    section = base.data.get("sweep") or {}
    axes = merge_axes(grid_from_spec(base), cli_axes)
    if not axes:
        validate(base)  # a mistake elsewhere in the spec comes first
        raise ArgumentError("--grid", "nothing to sweep; expected --grid PATH=V1,V2,... or a "
                                      "sweep.grid section in the spec")
    random = random if random is not None else section.get("random")
    seed = int(seed if seed is not None else section.get("seed", 0))
    points = expand(axes, random, seed)
    base.data.pop("sweep", None)

    specs: dict[str, Spec] = {}
    problems: dict[str, list] = {}  # one line per distinct problem -> the points it was found at
    data_checked: set = set()
    for point in points:
        spec = base.copy()
        try:
            for axis, i in zip(axes, point.index):
                _set_value(spec, axis, axis.values[i], axis.where[i])
            specs[point.id] = _check_point(spec, data_checked)
        except SpecError as exc:
            for issue in exc.issues:
                problems.setdefault(str(issue), [issue, []])[1].append(point.id)
        except NetbuildError as exc:
            for line in exc.lines():
                problems.setdefault(line, [line, []])[1].append(point.id)
    if problems:
        raise SweepError(_problem_lines(problems))

    first = specs[points[0].id]
    wanted = monitor or section.get("monitor") or default_monitor(has_validation(first))
    _check_monitor(wanted, monitor, base, points, specs)
    return Plan(name=str(base.data["name"]), spec_file=str(spec_file), axes=axes, points=points,
                specs=specs, monitor=wanted, mode=metrics_mod.mode_of(wanted),
                sweep_dir=Path(sweep_dir) if sweep_dir else Path("runs") / f"{base.data['name']}-sweep",
                random=random, seed=seed, workers=workers or section.get("workers"))


def _grid_key_issue(spec: Spec, issue: Issue) -> Issue:
    """The schema's "unknown key" for a ``sweep.grid`` key that is not a path, said as such."""
    path = issue.path
    if len(path) == 3 and path[:2] == ("sweep", "grid") and issue.message.startswith("unknown key"):
        return spec.issue(path, f"'{path[2]}' is not a path; expected dotted keys and [index] parts, "
                                "for example model.layers[0].units", key=True)
    return issue


def _problem_lines(problems: dict[str, list]) -> list[str]:
    """``FILE:LINE:COL: PATH: point ID (and N more): message``, sorted by position."""
    out = []
    for found, ids in sorted(problems.values(), key=lambda fi: fi[0].sort_key()
                             if isinstance(fi[0], Issue) else ("\uffff", 0, 0, fi[0])):
        more = f" (and {len(ids) - 1} more)" if len(ids) > 1 else ""
        if isinstance(found, Issue):
            where = f"{found.location}: " if found.location else ""
            out.append(printable(f"{where}{format_path(found.path)}: point {ids[0]}{more}: {found.message}"))
        else:
            out.append(printable(f"point {ids[0]}{more}: {found}"))
    return out


def _check_monitor(name: str, given: str | None, base: Spec, points: list[Point], specs: dict) -> None:
    from .checks import has_validation
    from .signature import of

    for point in points:
        spec = specs[point.id]
        available = of(spec).recorded(has_validation(spec))
        if name in available:
            continue
        message = f"'{name}' is not recorded by this run; expected one of: {', '.join(available)}"
        if given:
            raise ArgumentError("--monitor", message)
        raise SweepError(str(Issue(base.locate(("sweep", "monitor")), ("sweep", "monitor"),
                                   f"point {point.id}: {message}")))


# ----- one point: the task a worker runs ---------------------------------------------------


@dataclass
class Task:
    """What a worker needs to train one point."""

    id: str
    overrides: dict[str, Any]
    spec: Spec
    run_dir: str  # absolute: the same path on every machine of the cluster
    monitor: str
    mode: str
    overwrite: bool = False
    cancel_event: str | None = None  # a distributed.Event set when the sweep is cancelled


@dataclass
class PointState:
    """What a point's run directory holds: ``new`` (nothing worth keeping), ``complete``,
    ``partial`` (a checkpoint to resume from) or ``different`` (a run of another spec)."""

    kind: str
    history: list[dict] = field(default_factory=list)
    checkpoint: Any = None
    changed: list[str] = field(default_factory=list)


def inspect_point(run_dir: str | os.PathLike, spec: Spec) -> PointState:
    """Whether the point's run directory holds a complete run of ``spec``, one to resume, or
    another spec's run (``train.epochs`` may differ: a longer run resumes)."""
    from .runs import CHECKPOINT_FILE, METRICS_FILE, MODEL_FILE, changed_keys, load_checkpoint, resolved_spec_data

    run_dir = Path(run_dir)
    if not (run_dir / CHECKPOINT_FILE).is_file():
        return PointState("new")
    try:
        found = load_checkpoint(run_dir)
    except RunError:
        return PointState("new")  # unreadable: the point is trained again from scratch
    stored, ckpt = found
    epochs = int(spec.data["train"]["epochs"])
    changed = [k for k in changed_keys(stored, resolved_spec_data(spec)) if k != "train.epochs"]
    state = ckpt.state if isinstance(ckpt.state, dict) else {}
    trained = int(state.get("epoch", 0) or 0)
    if not changed and trained > epochs:
        changed = ["train.epochs"]
    if changed:
        return PointState("different", changed=changed)
    history = [dict(r) for r in state.get("history", []) if isinstance(r, dict)]
    if state.get("stopped") or trained >= epochs:
        if (run_dir / MODEL_FILE).is_file() and (run_dir / METRICS_FILE).is_file():
            return PointState("complete", history)
        return PointState("new")
    return PointState("partial", history, ckpt)


def read_history(run_dir: str | os.PathLike) -> list[dict]:
    """The epochs recorded in a run directory's metrics.jsonl (empty when there are none)."""
    from .runs import METRICS_FILE

    try:
        lines = (Path(run_dir) / METRICS_FILE).read_text("utf-8").splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def point_record(point_id: str, overrides: dict, status: str, history: list[dict], monitor: str,
                 mode: str, message: str = "", wall: float | None = None) -> dict:
    """The summary of one point: status, epochs, the last and the best value of ``monitor``
    (by ``mode``), its epoch, the training seconds (the epochs' sum: no compiling, no writing)
    and ``wall``, the seconds its task took in this sweep (None when it did not run)."""
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


class _Cancelled(Exception):
    """The sweep was cancelled while this point trained."""


# One point at a time per process: PyTensor's compiler is not made for threads, and a worker
# started with several threads (`dask worker --nthreads 4`) would otherwise train several at once.
_ONE_POINT_AT_A_TIME = threading.Lock()


def _cancel_check(event_name: str | None) -> Callable[..., None]:
    """A batch callback that raises :class:`_Cancelled` once the sweep's event is set (asked at
    most every :data:`CANCEL_CHECK_SECONDS`)."""
    if not event_name:
        return lambda *_: None
    from distributed import Event

    event = Event(event_name)
    if event.is_set():
        raise _Cancelled()
    last = [time.monotonic()]

    def check(*_) -> None:
        now = time.monotonic()
        if now - last[0] >= CANCEL_CHECK_SECONDS:
            last[0] = now
            if event.is_set():
                raise _Cancelled()

    return check


def run_point(task: Task) -> dict:
    """Train one point into its run directory (a Dask task). Returns its record; a user's mistake,
    a diverging run, a cancelled sweep or a bug is a record with its status and message, never an
    exception, so that the other points go on."""
    from .runs import RunDir
    from .training import Callbacks as TrainCallbacks
    from .training import train

    status, message = DONE, ""
    with _ONE_POINT_AT_A_TIME, warnings.catch_warnings():
        start = time.perf_counter()
        # Dask's profiler thread holds frames (and their locals) of this one: PyTensor's check of
        # reference counts while building a function then warns of a harmless inconsistency.
        warnings.filterwarnings("ignore", message="Detected reference count inconsistency")
        try:
            threads.apply(threads.resolve())  # OpenMP's count is per thread: this worker thread's
            check = _cancel_check(task.cancel_event)
            state = PointState("new") if task.overwrite else inspect_point(task.run_dir, task.spec)
            if state.kind == "complete":
                return point_record(task.id, task.overrides, SKIPPED, state.history, task.monitor, task.mode)
            if state.kind == "different":
                return point_record(task.id, task.overrides, FAILED, [], task.monitor, task.mode,
                                    _different_message(task.run_dir, state.changed))
            run_dir = RunDir(task.run_dir)
            with run_dir:
                if state.kind == "partial":
                    run_dir.open_existing()
                    message = f"resumed after epoch {len(state.history)}"
                else:
                    run_dir.create(overwrite=True)  # the sweep's own directory for this point
                train(task.spec.copy(), run_dir, callbacks=TrainCallbacks(batch=check),
                      resume_from=state.checkpoint)
        except _Cancelled:
            status, message = CANCELLED, "cancelled"
        except NetbuildError as exc:
            status, message = FAILED, "; ".join(exc.lines())
        except Exception as exc:  # a bug in netbuild: recorded, and the other points go on
            status, message = FAILED, f"{type(exc).__name__}: {exc}"
        wall = time.perf_counter() - start
    return point_record(task.id, task.overrides, status, read_history(task.run_dir), task.monitor,
                        task.mode, printable(message), wall)


def _different_message(run_dir, changed: list[str]) -> str:
    shown = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
    return (f"{run_dir}: holds a run of a different spec (it differs in {shown}); expected the same "
            "spec to continue the sweep (pass --overwrite to train every point again, or "
            "--sweep-dir to start another sweep)")


# ----- the cluster -------------------------------------------------------------------------


def point_threads(workers: int, requested: int | None = None, cores: int | None = None) -> int:
    """Threads per worker: ``requested`` (``--threads``), else netbuild's default
    (``NETBUILD_THREADS``, else every core), never more than the cores each worker has to
    itself."""
    share = max(1, (cores or threads.available_cores()) // max(1, workers))
    return max(1, min(requested or threads.default_threads(), share))


def default_workers(points: int, cores: int | None = None) -> int:
    """One worker per core, at most one per point to train."""
    return max(1, min(cores or threads.available_cores(), points))


def local_cluster(workers: int, per_worker: int):
    """A ``LocalCluster`` of ``workers`` processes, one thread each (one point at a time), each
    computing with ``per_worker`` threads (:func:`point_threads`), so that workers x threads
    stays within the cores."""
    import dask
    from distributed import LocalCluster

    n = str(per_worker)
    env = {threads.ENV: n, "OPENBLAS_NUM_THREADS": n, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n}
    # Ctrl-C in a terminal reaches every process of the group. The workers inherit an ignored
    # SIGINT (a disposition survives exec), so that only this process hears it and stops them in
    # order; a Ctrl-C during these few seconds of start-up is ignored. Dask's statistical
    # profiler (a thread sampling the task's frames every 10 ms) is off: it costs CPU, and its
    # references to frames make PyTensor warn of a "reference count inconsistency".
    with _sigint_ignored(), dask.config.set({"distributed.worker.profile.enabled": False}):
        return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                            dashboard_address=":0", env=env)


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: nothing to change
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _connect(scheduler: str):
    """A client of the running scheduler at ``scheduler``, checked to have workers that run
    this netbuild."""
    import dask
    from distributed import Client

    try:  # Dask's connect timeout (distributed.comm.timeouts.connect, 30 s unless configured)
        client = Client(scheduler, timeout=dask.config.get("distributed.comm.timeouts.connect"))
    except (OSError, TimeoutError, ValueError, TypeError) as exc:
        raise SweepError(f"--scheduler {scheduler}: cannot connect ({exc}); expected the address of "
                         "a running `dask scheduler`, e.g. tcp://host:8786") from None
    try:
        try:
            client.wait_for_workers(1, timeout=30)
        except (TimeoutError, OSError):
            raise SweepError(f"--scheduler {scheduler}: the cluster has no workers; expected at least "
                             f"one `dask worker {scheduler}` on a machine with netbuild installed") from None

        def probe():  # defined here so that it reaches workers without netbuild by value
            import importlib.metadata

            try:
                return importlib.metadata.version("netbuild")
            except importlib.metadata.PackageNotFoundError:
                return None

        versions = client.run(probe)
        wrong = [f"{addr} has {'netbuild ' + v if v else 'no netbuild'}"
                 for addr, v in sorted(versions.items()) if v != __version__]
        if wrong:
            raise SweepError(f"--scheduler {scheduler}: {'; '.join(wrong)}; expected netbuild "
                             f"{__version__} installed on every worker")
    except BaseException:
        client.close()
        raise
    return client


@contextlib.contextmanager
def _client(workers: int, scheduler: str | None, per_worker: int) -> Iterator[Any]:
    from distributed import Client

    if scheduler:
        client = _connect(scheduler)
        try:
            yield client
        finally:
            client.close()
        return
    cluster = local_cluster(workers, per_worker)
    try:
        client = Client(cluster)
        try:
            yield client
        finally:
            with _quiet_closing():
                client.close()
    finally:
        with _quiet_closing():
            cluster.close()


@contextlib.contextmanager
def _quiet_closing() -> Iterator[None]:
    """Closing the local cluster: a worker slow to exit (a loaded machine) is killed, which is
    harmless once its point has stopped (every file is written atomically); Dask's warning about
    it is not for the user."""
    logger = logging.getLogger("distributed")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


# ----- the sweep ---------------------------------------------------------------------------


@dataclass
class SweepResult:
    """Every point's record (in grid order), the summary's rows (sorted) and files."""

    records: list[dict]
    rows: list[dict]
    files: list[Path]
    interrupted: bool = False

    def count(self, *statuses: str) -> int:
        return sum(1 for r in self.records if r["status"] in statuses)


@dataclass
class Callbacks:
    """What the caller hears: the start (points in all, already complete, where they run) and
    every finished point (its record, how many finished, how many run)."""

    start: Callable[[dict], None] = lambda info: None
    point: Callable[[dict, int, int], None] = lambda record, done, total: None


class _SweepDir:
    """The sweep's folder, held by one ``netbuild sweep`` at a time."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = None

    def __enter__(self) -> _SweepDir:
        if self.path.exists() and not self.path.is_dir():
            raise SweepError(f"{self.path}: exists and is not a folder; expected a sweep directory")
        if self.path.is_dir() and not (self.path / SWEEP_FILE).exists() and any(
                p.name != LOCK_FILE for p in self.path.iterdir()):
            raise SweepError(f"{self.path}: holds files but no {SWEEP_FILE}; expected a sweep directory "
                             "written by `netbuild sweep` (pass --sweep-dir to choose another)")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock = open(self.path / LOCK_FILE, "a+")
        except OSError as exc:
            raise SweepError(f"{self.path}: cannot create the sweep directory: {exc.strerror or exc}") from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.seek(0)
            holder = self._lock.read().strip() or "another process"
            self._lock.close()
            raise SweepError(f"{self.path}: another `netbuild sweep` ({holder}) is running in this "
                             "sweep directory; expected one sweep per directory") from None
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(f"pid {os.getpid()}")
        self._lock.flush()
        return self

    def __exit__(self, *exc) -> None:
        if self._lock is not None:
            self._lock.close()

    def write(self, name: str, data: bytes) -> None:
        from .runs import atomic_write

        try:
            atomic_write(self.path / name, data)
        except OSError as exc:
            raise SweepError(f"{self.path / name}: cannot write: {exc.strerror or exc}") from None


def run(plan: Plan, scheduler: str | None = None, workers: int | None = None, overwrite: bool = False,
        callbacks: Callbacks | None = None, per_point_threads: int | None = None) -> SweepResult:
    """Train every point of ``plan`` that is not complete yet, on a ``LocalCluster`` of
    ``workers`` processes (default: one per core, at most one per point), each with
    ``per_point_threads`` threads (default: the cores divided among them), or on the cluster of
    ``scheduler`` (whose workers compute with their own ``NETBUILD_THREADS``); write
    ``sweep.json`` and the summary. Raises :class:`SweepInterrupted` on
    Ctrl-C (after writing the summary of what completed)."""
    on = callbacks or Callbacks()
    folder = plan.sweep_dir.absolute()
    with _SweepDir(folder) as sweep_dir:
        records: dict[str, dict] = {}
        todo: list[Point] = []
        different = []
        for point in plan.points:
            run_dir = folder / point.id
            state = PointState("new") if overwrite else inspect_point(run_dir, plan.specs[point.id])
            if state.kind == "complete":
                records[point.id] = point_record(point.id, point.overrides, SKIPPED, state.history,
                                                 plan.monitor, plan.mode)
            elif state.kind == "different":
                different.append(_different_message(run_dir, state.changed))
            else:
                todo.append(point)
        if different:
            raise SweepError(different)
        for point in todo:
            records[point.id] = point_record(point.id, point.overrides, PENDING, [], plan.monitor, plan.mode)
        _write_state(sweep_dir, plan, records)

        n_workers = workers or plan.workers or default_workers(len(todo))
        per_worker = point_threads(n_workers, per_point_threads)
        on.start({"points": len(plan.points), "complete": len(plan.points) - len(todo), "to_run": len(todo),
                  "where": f"the cluster at {scheduler}" if scheduler
                  else (f"a local cluster of {n_workers} worker{'s' * (n_workers != 1)} "
                        f"({per_worker} thread{'s' * (per_worker != 1)} each)"),
                  "sweep_dir": plan.sweep_dir})
        interrupted = False
        if todo:
            interrupted = _train(plan, todo, records, sweep_dir, scheduler, n_workers, per_worker,
                                 overwrite, on)
        ordered = [records[p.id] for p in plan.points]
        rows = summary_rows(plan, ordered)
        files = write_summary(sweep_dir, plan, rows)
        _write_state(sweep_dir, plan, records)
    result = SweepResult(ordered, rows, files, interrupted)
    if interrupted:
        finished = result.count(DONE, SKIPPED)
        raise SweepInterrupted(f"interrupted: {finished} of {len(ordered)} points complete, "
                               f"{result.count(CANCELLED)} cancelled; the summary is in "
                               f"{plan.sweep_dir / SUMMARY_MD}; run the same command again to "
                               "continue (completed points are kept)")
    return result


def _train(plan: Plan, todo: list[Point], records: dict, sweep_dir: _SweepDir, scheduler: str | None,
           workers: int, per_worker: int, overwrite: bool, on: Callbacks) -> bool:
    """Submit ``todo`` and collect the records as points finish; True when interrupted."""
    from distributed import Event, as_completed

    futures: dict = {}
    finished = 0
    try:
        with _client(workers, scheduler, per_worker) as client:
            event = f"netbuild-sweep-cancel-{uuid.uuid4().hex}"
            cancel = Event(event, client=client)
            try:
                for point in todo:
                    task = Task(point.id, point.overrides, plan.specs[point.id],
                                str(sweep_dir.path / point.id), plan.monitor, plan.mode, overwrite, event)
                    futures[client.submit(run_point, task, key=f"netbuild-{point.id}-{event[-8:]}",
                                          pure=False)] = point
                for future in as_completed(list(futures)):
                    point = futures[future]
                    records[point.id] = _result(future, point, plan)
                    finished += 1
                    _write_state(sweep_dir, plan, records)
                    on.point(records[point.id], finished, len(todo))
            except KeyboardInterrupt:
                _cancel(client, cancel, futures, records, plan, sweep_dir)
                return True
    except KeyboardInterrupt:  # during the cluster's start or close
        for point in todo:
            if records[point.id]["status"] == PENDING:
                records[point.id] = _cancelled(point, plan, sweep_dir)
        return True
    return False


def _result(future, point: Point, plan: Plan) -> dict:
    """The record a finished future holds; a worker that died is a failed point."""
    try:
        return future.result()
    except Exception as exc:  # the worker process died (killed, out of memory), or the cluster went away
        text = str(exc) or type(exc).__name__
        return point_record(point.id, point.overrides, FAILED, read_history(plan.sweep_dir / point.id),
                            plan.monitor, plan.mode, printable(f"{type(exc).__name__}: {text}"))


def _cancelled(point: Point, plan: Plan, sweep_dir: _SweepDir) -> dict:
    return point_record(point.id, point.overrides, CANCELLED, read_history(sweep_dir.path / point.id),
                        plan.monitor, plan.mode, "cancelled")


def _cancel(client, cancel, futures: dict, records: dict, plan: Plan, sweep_dir: _SweepDir) -> None:
    """Ctrl-C: tell the running points to stop at their next batch, give them a few seconds,
    record what finished, cancel the rest."""
    from distributed import wait

    with contextlib.suppress(Exception):
        cancel.set()
    with contextlib.suppress(Exception):
        wait(list(futures), timeout=CANCEL_GRACE_SECONDS)
    for future, point in futures.items():
        if records[point.id]["status"] != PENDING:
            continue
        if future.status == "finished":
            records[point.id] = _result(future, point, plan)
        else:
            records[point.id] = _cancelled(point, plan, sweep_dir)
    with contextlib.suppress(Exception):
        client.cancel(list(futures), force=True)


def _write_state(sweep_dir: _SweepDir, plan: Plan, records: dict) -> None:
    state = {
        "name": plan.name,
        "spec": str(Path(plan.spec_file).absolute()),
        "monitor": plan.monitor,
        "mode": plan.mode,
        "grid": {a.text: a.values for a in plan.axes},
        "random": plan.random,
        "seed": plan.seed,
        "netbuild_version": __version__,
        "points": [records[p.id] for p in plan.points],
    }
    sweep_dir.write(SWEEP_FILE, (json.dumps(state, indent=2, default=str) + "\n").encode("utf-8"))


# ----- the summary -------------------------------------------------------------------------


def summary_rows(plan: Plan, records: list[dict]) -> list[dict]:
    """The records sorted for the summary: complete points by their best monitored value (by
    the monitor's direction, then the last value, then id), those without a value after them,
    then failed, cancelled and pending points by id."""
    sign = -1.0 if plan.mode == "max" else 1.0

    def key(r: dict):
        if r["status"] not in COMPLETE:
            return (2, 0.0, 0.0, r["id"])
        if r["best"] is None:
            return (1, 0.0, 0.0, r["id"])
        return (0, sign * r["best"], sign * (r["final"] if r["final"] is not None else 0.0), r["id"])

    return [dict(r, rank=i) for i, r in enumerate(sorted(records, key=key), start=1)]


def _number(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def summary_headers(plan: Plan) -> list[str]:
    m = plan.monitor
    return (["rank", "point"] + [a.text for a in plan.axes]
            + ["status", "epochs", f"final_{m}", f"best_{m}", "best_epoch", "train_seconds", "wall_seconds",
               "message"])


def _cells(plan: Plan, row: dict) -> list[str]:
    return ([str(row["rank"]), row["id"]] + [_value_text(row["overrides"][a.text]) for a in plan.axes]
            + [row["status"], str(row["epochs"]), _number(row["final"]), _number(row["best"]),
               _number(row["best_epoch"]), _number(row["seconds"]), _number(row.get("wall_seconds")),
               row["message"]])


def summary_csv(plan: Plan, rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(summary_headers(plan))
    writer.writerows(_cells(plan, r) for r in rows)
    return buf.getvalue()


def summary_md(plan: Plan, rows: list[dict]) -> str:
    better = "higher" if plan.mode == "max" else "lower"
    head = summary_headers(plan)
    lines = [f"# Sweep of {plan.name}", "",
             (f"{len(rows)} points of `{plan.spec_file}`, sorted by the best `{plan.monitor}` "
              f"({better} is better); failed points last. Each point's run is in `<point>/`."), "",
             "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for row in rows:
        cells = [c.replace("|", "\\|") for c in _cells(plan, row)]
        cells[1] = f"[{cells[1]}]({row['id']}/)"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summary_table(plan: Plan, rows: list[dict]) -> tuple[list[str], list[list[str]], str]:
    """Headers, cells and alignment of the printed table (short axis names; messages apart)."""
    m = plan.monitor
    fixed = ["status", "epochs", m, f"best {m}", "train s", "wall s"]
    names = {k: (k if v in fixed else v) for k, v in plan.names.items()}
    headers = ["#", "point"] + [names[a.text] for a in plan.axes] + fixed
    body = [[str(r["rank"]), r["id"]] + [_value_text(r["overrides"][a.text]) for a in plan.axes]
            + [r["status"], str(r["epochs"]), _four(r["final"]), _four(r["best"]), f"{r['seconds']:.2f}",
               f"{r['wall_seconds']:.1f}" if r.get("wall_seconds") is not None else ""]
            for r in rows]
    return headers, body, "rl" + "l" * len(plan.axes) + "lrrrrr"


def _four(value) -> str:
    if value is None:
        return ""
    return f"{value:.4f}" if abs(value) < 1e5 else f"{value:.4g}"


def summary_png(plan: Plan, rows: list[dict]) -> bytes:
    """The best monitored value of every complete point against each swept value; a line joins
    the best point at each value (headless)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    done = [r for r in rows if r["status"] in COMPLETE and r["best"] is not None]
    names = plan.names
    fig = Figure(figsize=(4.5 * len(plan.axes), 3.4), dpi=100)
    pick = max if plan.mode == "max" else min
    for i, axis in enumerate(plan.axes, start=1):
        ax = fig.add_subplot(1, len(plan.axes), i)
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in axis.values)
        xs = list(axis.values) if numeric else list(range(len(axis.values)))
        position = {_canonical(v): x for v, x in zip(axis.values, xs)}
        px = [position[_canonical(r["overrides"][axis.text])] for r in done]
        ax.scatter(px, [r["best"] for r in done], alpha=0.7, label="points")
        best = [(x, pick(r["best"] for r, p in zip(done, px) if p == x)) for x in xs if x in px]
        if best:
            best.sort()
            ax.plot([b[0] for b in best], [b[1] for b in best], color="C1", label="best at each value")
        if numeric and min(xs) > 0 and max(xs) / min(xs) >= 10:
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(xs, [_value_text(v)[:16] for v in axis.values], rotation=30, ha="right")
        if not done:
            ax.text(0.5, 0.5, "no complete points", transform=ax.transAxes, ha="center")
        ax.set_title(f"best {plan.monitor} by {names[axis.text]}")
        ax.set_xlabel(axis.text)
        ax.set_ylabel(plan.monitor)
        ax.grid(alpha=0.3)
        if done:
            ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_summary(sweep_dir: _SweepDir, plan: Plan, rows: list[dict]) -> list[Path]:
    """summary.csv, summary.md and summary.png, each written atomically."""
    sweep_dir.write(SUMMARY_CSV, summary_csv(plan, rows).encode("utf-8"))
    sweep_dir.write(SUMMARY_MD, summary_md(plan, rows).encode("utf-8"))
    sweep_dir.write(SUMMARY_PNG, summary_png(plan, rows))
    return [plan.sweep_dir / n for n in (SUMMARY_CSV, SUMMARY_MD, SUMMARY_PNG)]
