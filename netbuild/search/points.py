"""The points of a sweep: a grid of values for paths of the spec, expanded into points, each
point's spec validated before anything runs.

A sweep is a spec plus a grid: for each swept path (the ``--set`` syntax, e.g.
``train.optimizer.learning_rate`` or ``model.layers[0].units``) a list of values. Its points are
every combination of the values (the grid's cartesian product, first path slowest), or ``random``
of them drawn without replacement with a seed. Each point is the spec with its overrides; every
point is checked as ``netbuild check`` checks a spec (:func:`netbuild.checks.check_all`), and a
bad value is reported where it was given, with the point named.

Point ids are a readable slug of the overrides plus a hash of them (``learning_rate=0.01-3f9a61c2``),
so the same point finds the same directory again.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import math
import os
import random as random_mod
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import metrics as metrics_mod
from ..errors import Issue, Location, NetbuildError, SpecError, format_path, printable
from ..spec import Spec, load_file, validate
from ..checks import check_point
from ..report.summary import SummaryOf, canonical, value_text
from ..spec.load import apply_override, apply_overrides, parse_path
from .errors import ArgumentError, SearchError
from .state import SWEEP_FILE



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
    path, wrong = varied_path(raw_path.strip(), "swept")
    if wrong:
        raise ArgumentError("--grid", f"'{argument}': {wrong}")
    if not raw.strip():
        raise ArgumentError("--grid", f"'{argument}' gives no values; {_GRID_EXAMPLE}")
    from ..spec import load_text

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
        raise ArgumentError("--grid", f"'{argument}': the value {value_text(repeated)} is given twice; "
                                      "expected each value once")
    return Axis(path, values, [where] * len(values), "--grid")


#: What a swept or searched path looks like.
PATH_EXPECTED = "expected dotted keys and [index] parts, for example model.layers[0].units"


def varied_path(key: str, verb: str) -> tuple[tuple | None, str | None]:
    """``(path, None)`` for a key of a grid or a space, or ``(None, what is wrong)``: not a path,
    or inside a section that is not the run's (``sweep``, ``tune``, ``tracking``), which cannot
    be ``verb`` (swept, searched)."""
    from ..checks import NOT_THE_RUNS

    path = parse_path(key)
    if path is None:
        return None, f"'{key}' is not a path; {PATH_EXPECTED}"
    if path[0] in NOT_THE_RUNS:
        return None, f"the {path[0]} section cannot be {verb}"
    return path, None


def _repeated(values: list) -> Any:
    seen = set()
    for v in values:
        key = canonical(v)
        if key in seen:
            return v
        seen.add(key)
    return None


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
        path, wrong = varied_path(key, "swept")
        if wrong:
            issues.append(spec.issue(here, wrong, key=True))
            continue
        repeated = _repeated(values)
        if repeated is not None:
            issues.append(spec.issue(here, f"the value {value_text(repeated)} is given twice; "
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


def point_id(overrides: dict[str, Any], names: dict[str, str] | None = None) -> str:
    """``learning_rate=0.01_units=64-3f9a61c2``: the overrides, short and file-name safe, then a
    hash of all of them (path and exact value), so that distinct points never share an id and the
    same point always gets the same one."""
    names = names or {}
    parts = []
    for path, value in overrides.items():
        name = names.get(path, path).replace("[", "").replace("]", "")
        text = re.sub(r"[^A-Za-z0-9.+-]+", "_", value_text(value)).strip("_")[:24] or "_"
        parts.append(f"{name}={text}")
    slug = "_".join(parts)[:80].rstrip("_")
    digest = hashlib.sha256(canonical(sorted(overrides.items())).encode("utf-8")).hexdigest()[:8]
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

    folder = property(lambda self: self.sweep_dir)
    state_file = SWEEP_FILE

    def summary_of(self) -> SummaryOf:
        return SummaryOf("sweep", "point", self.name, self.spec_file, self.monitor, self.mode,
                         [a.text for a in self.axes], self.names, {a.text: a.values for a in self.axes})


def set_value(spec: Spec, path: tuple, value: Any, where: Location) -> None:
    """Set ``path`` to ``value`` in place, located at ``where`` (a line of the sweep's grid or the
    search's space, a ``--grid`` argument), so that a problem with the value is reported there."""
    try:
        apply_override(spec, f"{format_path(path)}=")  # makes the containers; the value is set below
    except SpecError as exc:
        raise SpecError([Issue(where, i.path, i.message) for i in exc.issues]) from None
    node: Any = spec.data
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = copy.deepcopy(value)
    spec.locations[path] = where
    spec.key_locations[path] = where


def plan(spec_file: str, grid: tuple | list = (), overrides: tuple | list = (), random: int | None = None,
         seed: int | None = None, monitor: str | None = None, sweep_dir: str | os.PathLike | None = None,
         workers: int | None = None) -> Plan:
    """Load ``spec_file``, apply ``overrides`` (``--set``) to it, expand its ``sweep`` section and
    the ``grid`` arguments (``--grid``) into points, and validate every point.

    Command-line values win over the spec's ``sweep`` section. Raises :class:`ArgumentError` for a
    malformed argument and located :class:`SpecError` / :class:`SearchError` for everything else;
    a problem found at several points is reported once, naming the first of them.
    """
    from ..checks import default_monitor, has_validation

    cli_axes = [parse_grid(g) for g in grid]
    base = load_base(spec_file, overrides, "sweep")
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
                set_value(spec, axis.path, axis.values[i], axis.where[i])
            specs[point.id] = check_point(spec, data_checked)
        except NetbuildError as exc:
            note_problem(problems, point.id, exc)
    if problems:
        raise SearchError(problem_lines(problems))

    first = specs[points[0].id]
    wanted = monitor or section.get("monitor") or default_monitor(has_validation(first))
    check_monitor(wanted, monitor, base, specs, "sweep")
    return Plan(name=str(base.data["name"]), spec_file=str(spec_file), axes=axes, points=points,
                specs=specs, monitor=wanted, mode=metrics_mod.mode_of(wanted),
                sweep_dir=Path(sweep_dir) if sweep_dir else Path("runs") / f"{base.data['name']}-sweep",
                random=random, seed=seed, workers=workers or section.get("workers"))


def load_base(spec_file: str, overrides, section: str) -> Spec:
    """``spec_file`` with ``overrides`` (``--set``), its ``section`` (``sweep``, ``tune``) valid as
    written: the rest of the spec may be valid only at the points. Raises located errors."""
    raw = load_file(spec_file)
    if not isinstance(raw.data, dict):
        validate(raw)  # raises the located "expected a mapping"
    base = apply_overrides(raw, overrides)
    try:
        validate(base)
    except SpecError as exc:
        own = [path_key_issue(base, i) for i in exc.issues if i.path[:1] == (section,)]
        if own:
            raise SpecError(own) from None
    return base


def path_key_issue(spec: Spec, issue: Issue) -> Issue:
    """The schema's "unknown key" for a key of ``sweep.grid`` or ``tune.space`` that is not a
    path, said as such."""
    path = issue.path
    if len(path) == 3 and path[:2] in (("sweep", "grid"), ("tune", "space")) \
            and issue.message.startswith("unknown key"):
        return spec.issue(path, f"'{path[2]}' is not a path; {PATH_EXPECTED}", key=True)
    return issue


def note_problem(problems: dict[str, list], point_id: str, exc: NetbuildError, anywhere: bool = False) -> None:
    """Add what ``exc`` says of one point to ``problems`` (one entry per distinct problem -> the
    points it was found at). ``anywhere``: a problem is the same one wherever it is located
    (a path that does not exist, found at both ends of a range)."""
    if isinstance(exc, SpecError):
        for issue in exc.issues:
            key = f"{format_path(issue.path)}: {issue.message}" if anywhere else str(issue)
            problems.setdefault(key, [issue, []])[1].append(point_id)
    else:
        for line in exc.lines():
            problems.setdefault(line, [line, []])[1].append(point_id)


def problem_lines(problems: dict[str, list], unit: str = "point") -> list[str]:
    """``FILE:LINE:COL: PATH: point ID (and N more): message``, sorted by position."""
    out = []
    for found, ids in sorted(problems.values(), key=lambda fi: fi[0].sort_key()
                             if isinstance(fi[0], Issue) else ("\uffff", 0, 0, fi[0])):
        more = f" (and {len(ids) - 1} more)" if len(ids) > 1 else ""
        if isinstance(found, Issue):
            where = f"{found.location}: " if found.location else ""
            out.append(printable(f"{where}{format_path(found.path)}: {unit} {ids[0]}{more}: {found.message}"))
        else:
            out.append(printable(f"{unit} {ids[0]}{more}: {found}"))
    return out


def check_monitor(name: str, given: str | None, base: Spec, specs: dict[str, Spec], section: str,
                  unit: str = "point") -> None:
    """``name`` must be recorded by the run of every spec of ``specs`` (id -> spec); else an
    :class:`ArgumentError` for ``--monitor`` (``given``), or a located error at the section's
    ``monitor``."""
    from ..checks import has_validation
    from ..signature import of

    for sid, spec in specs.items():
        available = of(spec).recorded(has_validation(spec))
        if name in available:
            continue
        message = f"'{name}' is not recorded by this run; expected one of: {', '.join(available)}"
        if given:
            raise ArgumentError("--monitor", message)
        raise SearchError(str(Issue(base.locate((section, "monitor")), (section, "monitor"),
                                    f"{unit} {sid}: {message}")))
