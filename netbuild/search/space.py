"""A search's space: for each path of the spec, a range or a list of choices.

``tune.space`` maps a path (the ``--set`` syntax) to one of::

    train.optimizer.learning_rate: {log_uniform: [1.0e-4, 1.0e-1]}
    model.layers[0].units: {int: [32, 256], step: 32}     # or log_int: [32, 256]
    model.layers[1].rate: {uniform: [0.0, 0.5]}
    train.optimizer.type: {choice: [adam, sgd]}

The schema checks the forms; :func:`parse` checks the rest (one kind per path, ordered bounds,
positive log bounds, distinct choices, paths that do not overlap), and :func:`probe_points`
gives the values a search must be able to train at: every choice and both ends of every range,
each checked as ``netbuild check`` checks a spec before anything trains, with a problem reported
at the space's line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import Issue, Location, SpecError, format_path
from ..report.summary import canonical, value_text
from ..spec import Spec
from .points import varied_path

KINDS = ("uniform", "log_uniform", "int", "log_int", "choice")
#: How a search proposes its next point, and how it stops hopeless ones (``tune.sampler``,
#: ``tune.pruner``, the schema's enums).
SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("hyperband", "median", "none")


@dataclass
class Param:
    """One searched path: its kind, its bounds (``low``, ``high``, ``step``) or its choices, and
    where the space gives it."""

    path: tuple
    kind: str
    where: Location
    key_where: Location
    #: Where each of :meth:`ends` is written (a choice's own line, a range's bound).
    end_where: list[Location] = field(default_factory=list)
    low: float | int | None = None
    high: float | int | None = None
    step: float | int | None = None
    choices: list | None = None

    @property
    def text(self) -> str:
        return format_path(self.path)

    @property
    def is_int(self) -> bool:
        return self.kind in ("int", "log_int")

    @property
    def log(self) -> bool:
        return self.kind in ("log_uniform", "log_int")

    def describe(self) -> dict:
        """The range as the spec writes it (for tune.json and the summary)."""
        if self.kind == "choice":
            return {"choice": self.choices}
        out: dict = {self.kind: [self.low, self.high]}
        if self.step is not None:
            out["step"] = self.step
        return out

    def grid_values(self) -> list | None:
        """Every value, for the grid sampler: the choices, or an int range's whole numbers (by its
        step); None for a continuous range."""
        if self.kind == "choice":
            return list(self.choices)
        if self.kind == "int":
            step = int(self.step or 1)
            return list(range(int(self.low), int(self.high) + 1, step))
        if self.kind == "uniform" and self.step is not None:
            n = round((self.high - self.low) / self.step)
            return [self.low + k * self.step for k in range(n + 1)]
        return None

    def ends(self) -> list:
        """The values a search must be able to train at: every choice, or both ends."""
        if self.kind == "choice":
            return list(self.choices)
        return [self.low, self.high] if self.high != self.low else [self.low]

    def suggest(self, trial) -> Any:
        """This path's value for an Optuna trial (``trial.suggest_*``, named by the path)."""
        name = self.text
        if self.kind == "choice":
            index = trial.suggest_categorical(name, list(range(len(self.choices)))) \
                if not _plain(self.choices) else None
            return self.choices[index] if index is not None else trial.suggest_categorical(name, self.choices)
        if self.is_int:
            return trial.suggest_int(name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(name, float(self.low), float(self.high), step=self.step, log=self.log)

    def value_of(self, stored: Any) -> Any:
        """A value as Optuna stored it (a choice of lists or mappings is stored as its index)."""
        if self.kind == "choice" and not _plain(self.choices):
            return self.choices[int(stored)]
        return stored


def _plain(values: list) -> bool:
    """Whether Optuna can store the choices themselves (None, bools, numbers, strings)."""
    return all(v is None or isinstance(v, (bool, int, float, str)) for v in values)


def parse(spec: Spec) -> list[Param]:
    """The params of the spec's ``tune.space`` (its forms already checked by the schema). Raises
    located :class:`SpecError`, every problem at once."""
    space = ((spec.data.get("tune") or {}).get("space")) or {}
    if not space:
        raise spec.error(("tune", "space"), "received an empty mapping; expected at least one "
                                            "PATH: {range}, e.g. train.optimizer.learning_rate: "
                                            "{log_uniform: [1.0e-4, 1.0e-1]}")
    params, issues = [], []
    for key, entry in space.items():
        here = ("tune", "space", key)
        path, wrong = varied_path(key, "searched")
        if wrong:
            issues.append(spec.issue(here, wrong, key=True))
            continue
        kinds = [k for k in KINDS if k in entry]
        if len(kinds) != 1:
            issues.append(spec.issue(here, f"received {', '.join(kinds) or 'no range'}; expected exactly "
                                           f"one of {', '.join(KINDS)}"))
            continue
        kind = kinds[0]
        param = Param(path, kind, spec.locate(here + (kind,)), spec.locate(here, key=True))
        if kind == "choice":
            param.choices = list(entry["choice"])
            param.end_where = [spec.locate(here + ("choice", i)) for i in range(len(param.choices))]
            seen = set()
            for i, v in enumerate(param.choices):
                if canonical(v) in seen:
                    issues.append(spec.issue(here + ("choice", i), f"the value {value_text(v)} is given "
                                                                   "twice; expected each choice once"))
                seen.add(canonical(v))
            if "step" in entry:
                issues.append(spec.issue(here + ("step",), "a step needs uniform or int; received choice"))
        else:
            param.low, param.high = entry[kind]
            param.step = entry.get("step")
            param.end_where = [spec.locate(here + (kind, 0)), spec.locate(here + (kind, 1))]
            issues += _range_issues(spec, here, param)
        params.append(param)
    for i, a in enumerate(params):
        for b in params[:i]:
            inner, outer = (a, b) if len(a.path) > len(b.path) else (b, a)
            if inner.path[: len(outer.path)] == outer.path:
                issues.append(Issue(inner.key_where, ("tune", "space", inner.text),
                                    f"'{inner.text}' lies inside the searched '{outer.text}'; expected "
                                    "paths that do not overlap"))
    if issues:
        raise SpecError(issues)
    return params


def _range_issues(spec: Spec, here: tuple, p: Param) -> list[Issue]:
    where = here + (p.kind,)
    if p.low > p.high:
        return [spec.issue(where, f"received [{value_text(p.low)}, {value_text(p.high)}]; expected "
                                  "[low, high] with low at most high")]
    if p.log and p.low <= 0:
        least = "1" if p.is_int else "a number above 0"
        return [spec.issue(where + (0,), f"received {value_text(p.low)}; expected {least}: a log "
                                         "scale has no zero or negative values")]
    if p.step is not None:
        if p.log:
            return [spec.issue(here + ("step",), f"a step needs uniform or int; received {p.kind}")]
        if p.is_int and p.step != int(p.step):
            return [spec.issue(here + ("step",), f"received {value_text(p.step)}; expected a whole "
                                                 "number for an int range")]
        steps = (p.high - p.low) / p.step
        if abs(steps - round(steps)) > 1e-9 * max(1.0, abs(steps)):
            return [spec.issue(here + ("step",), f"received {value_text(p.step)}; expected a step that "
                                                 f"divides the range [{value_text(p.low)}, "
                                                 f"{value_text(p.high)}] (its high end is never drawn "
                                                 "otherwise)")]
    return []


def probe_points(params: list[Param]) -> list[tuple[Param, Any, Location, dict]]:
    """For each param and each of its :meth:`Param.ends`, a point that sets it to that value and
    every other param to its first end: ``(param, value, where the value is written, {path text:
    value})``."""
    first = {p.text: p.ends()[0] for p in params}
    out = []
    for p in params:
        for value, where in zip(p.ends(), p.end_where):
            out.append((p, value, where, dict(first, **{p.text: value})))
    return out
