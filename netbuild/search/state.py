"""The folder of a sweep or a search on disk: held by one command at a time, every file in it
written atomically, its state file rewritten as points finish."""

from __future__ import annotations

import json
from pathlib import Path

from ..runs import LOCK_FILE, LockHeld, hold_lock
from .errors import SearchError

#: The state file of each command's folder: its points or trials, rewritten as they finish.
SWEEP_FILE = "sweep.json"
TUNE_FILE = "tune.json"


class SearchDir:
    """A sweep's or search's folder, held by one command at a time. ``state_file`` names the
    file that marks it as one (``sweep.json``, ``tune.json``); a folder that holds other files
    but not that one is refused, as is a folder another command holds."""

    def __init__(self, path: Path, state_file: str, command: str):
        self.path = path
        self.state_file = state_file
        self.command = command
        self._lock = None

    def __enter__(self) -> SearchDir:
        if self.path.exists() and not self.path.is_dir():
            raise SearchError(f"{self.path}: exists and is not a folder; expected a {self.command} "
                              "directory")
        if self.path.is_dir() and not (self.path / self.state_file).exists() and any(
                p.name != LOCK_FILE for p in self.path.iterdir()):
            raise SearchError(f"{self.path}: holds files but no {self.state_file}; expected a directory "
                              f"written by `netbuild {self.command}` (choose another with "
                              f"--{self.command}-dir)")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock = hold_lock(self.path / LOCK_FILE)
        except LockHeld as held:
            raise SearchError(f"{self.path}: another `netbuild {self.command}` ({held.holder}) is running "
                              f"in this directory; expected one {self.command} per directory") from None
        except OSError as exc:
            raise SearchError(f"{self.path}: cannot create the {self.command} directory: "
                              f"{exc.strerror or exc}") from None
        return self

    def __exit__(self, *exc) -> None:
        if self._lock is not None:
            self._lock.close()

    def write(self, name: str, data: bytes) -> None:
        from ..runs import atomic_write

        try:
            atomic_write(self.path / name, data)
        except OSError as exc:
            raise SearchError(f"{self.path / name}: cannot write: {exc.strerror or exc}") from None

    def write_state(self, state: dict) -> None:
        self.write(self.state_file, (json.dumps(state, indent=2, default=str) + "\n").encode("utf-8"))


def previous_tracking(folder: Path, state_file: str) -> dict | None:
    """Where an earlier command in ``folder`` logged its points (its state file's ``tracking``:
    the store and the parent run), or None."""
    try:
        found = json.loads((folder / state_file).read_text("utf-8")).get("tracking")
    except (OSError, ValueError, AttributeError):
        return None
    return found if isinstance(found, dict) else None
