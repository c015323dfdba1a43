"""The errors of sweeps and searches."""

from __future__ import annotations

from ..errors import NetbuildError


class SearchError(NetbuildError):
    """A sweep or search that cannot start or finish: one or more lines, exit code 1."""

    def __init__(self, lines: str | list[str]):
        self._lines = [lines] if isinstance(lines, str) else list(lines)
        super().__init__("\n".join(self._lines))

    def lines(self) -> list[str]:
        return list(self._lines)


class SearchInterrupted(SearchError):
    """Ctrl-C: running points were cancelled, completed ones kept. Exit code 130."""

    exit_code = 130


class ArgumentError(ValueError):
    """A command-line mistake (``--grid`` syntax, ``--monitor``): the CLI makes it a usage error."""

    def __init__(self, option: str, message: str):
        self.option = option
        super().__init__(message)
