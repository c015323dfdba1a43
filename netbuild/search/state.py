"""The folder of a sweep or a search on disk: held by one command at a time, every file in it
written atomically, its state file rewritten as points finish."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from .errors import SearchError

LOCK_FILE = ".lock"
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
            self._lock = open(self.path / LOCK_FILE, "a+")
        except OSError as exc:
            raise SearchError(f"{self.path}: cannot create the {self.command} directory: "
                              f"{exc.strerror or exc}") from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.seek(0)
            holder = self._lock.read().strip() or "another process"
            self._lock.close()
            raise SearchError(f"{self.path}: another `netbuild {self.command}` ({holder}) is running in "
                              f"this directory; expected one {self.command} per directory") from None
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(f"pid {os.getpid()}")
        self._lock.flush()
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
