"""Located errors: every mistake a user can make names its file, line, column and path.

This module imports nothing of netbuild. The CLI turns these errors into one line each and an
exit code; library code only raises them.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Iterable, Sequence

#: A path into the spec: ("model", "layers", 2, "units") is ``model.layers[2].units``.
Path = tuple


@dataclass(frozen=True, order=True)
class Location:
    """Where something came from: a file (or a ``--set`` argument) and, when known, a position.

    ``line`` and ``column`` are 1-based, as editors show them.
    """

    source: str
    line: int | None = None
    column: int | None = None

    def __str__(self) -> str:
        if self.line is None:
            return self.source
        return f"{self.source}:{self.line}:{self.column or 1}"


def format_path(path: Sequence) -> str:
    """``("model", "layers", 2, "units")`` -> ``model.layers[2].units``; ``()`` -> ``$``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "$"


def printable(text: str) -> str:
    """``text`` with control characters escaped (``\\r``), so that one message stays one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def did_you_mean(word: object, choices: Iterable[str]) -> str:
    """A `` (did you mean 'x'?)`` suffix when a close choice exists, else ``''``."""
    if not isinstance(word, str):
        return ""
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def expected_one_of(word: object, choices: Iterable[str]) -> str:
    """``expected one of: a, b, c (did you mean 'b'?)`` for an unknown name."""
    choices = sorted(choices)
    return f"expected one of: {', '.join(choices)}{did_you_mean(word, choices)}"


class NetbuildError(Exception):
    """Base of every error caused by the user (spec, data, command line): exit code 1."""

    exit_code = 1

    def lines(self) -> list[str]:
        return [str(self)]


@dataclass
class Issue:
    """One located problem, as printed: ``FILE:LINE:COL: PATH: message``."""

    location: Location | None
    path: Path
    message: str

    def __str__(self) -> str:
        where = f"{self.location}: " if self.location else ""
        if not self.path and self.location and self.location.line is None:
            return printable(f"{where}{self.message}")  # about a whole file: no position, no path
        return printable(f"{where}{format_path(self.path)}: {self.message}")

    def sort_key(self):
        loc = self.location
        if loc is None:
            return ("\uffff", 0, 0, str(self.path))
        return (loc.source, loc.line or 0, loc.column or 0, format_path(self.path))


class SpecError(NetbuildError):
    """One or more located problems in a spec; all of them are reported at once."""

    def __init__(self, issues: Issue | Sequence[Issue]):
        if isinstance(issues, Issue):
            issues = [issues]
        self.issues = sorted(issues, key=Issue.sort_key)
        super().__init__("\n".join(str(i) for i in self.issues))

    def lines(self) -> list[str]:
        return [str(i) for i in self.issues]


class DataError(NetbuildError):
    """A problem with a data file: names the file and, when it applies, the key; one line per
    problem."""

    def lines(self) -> list[str]:
        return str(self).splitlines()


class RunError(NetbuildError):
    """A problem with a run directory or a model file."""


class UsageError(NetbuildError):
    """A call that cannot be taken as given (arguments that contradict each other, a value out
    of range): exit code 2, as a command-line usage error."""

    exit_code = 2


class MissingExtra(NetbuildError):
    """A command needs an optional dependency that is not installed: says what to install."""

    def __init__(self, extra: str, modules: str, needed_by: str):
        several = " and " in modules
        super().__init__(f"{needed_by} needs {modules}, which {'are' if several else 'is'} not installed; "
                         f"install {'them' if several else 'it'} with: pip install 'netbuild[{extra}]'")


class ThresholdError(NetbuildError):
    """A quality gate (``eval --fail-under``) was not met: exit code 3."""

    exit_code = 3

    def lines(self) -> list[str]:
        return str(self).splitlines()
