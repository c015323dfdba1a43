"""What a check learns from scanning an array's values, in bounded chunks, and a cache of it so
that a second ``check`` or ``train`` of unchanged files does not scan them again.

One pass over an array gives its :class:`Stats`: how many NaN and infinite values it holds and
the first example with one, the smallest and largest finite value, the first example holding a
float that is not a whole number (class ids stored as floats), and the first example holding a
value beyond float32's range. The data checks (:mod:`netbuild.data`) read their answers from
these, whatever the spec asks of the array (ids below an embedding's size, classes below an
output's units, targets in [0, 1]), so one scan serves every spec that reads the file.

The scan goes :data:`netbuild.data.CHECK_CHUNK` values at a time and releases a memory-mapped
array's pages as it goes. An array of more than :data:`PROGRESS_BYTES` reports its progress to
the hook set by :func:`reporting` (the CLI's progress line on a terminal).

The cache keeps, per .npz file, the Stats of each member scanned and whether its CRC-32 was
checked, under ``$NETBUILD_CACHE_DIR`` (default ``$XDG_CACHE_HOME/netbuild``, else
``~/.cache/netbuild``; ``NETBUILD_CACHE_DIR=off`` turns it off). An entry holds only while the
file's size, modification time and header checksum (a SHA-256 of the archive's directory: each
member's name, sizes, compression and CRC-32, itself a checksum of the member's bytes) are
those it was made from; anything else and the file is scanned again. A cache that cannot be read
or written is no error: the scan is simply made.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

#: Arrays larger than this report their scan's progress (to the hook of :func:`reporting`).
PROGRESS_BYTES = 256 * 2**20
#: The float32 range: a float64 value beyond it becomes infinite in a float32 network.
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_VERSION = 1

_progress: Callable[[str, int, int], None] | None = None


@dataclass(frozen=True)
class Stats:
    """What one pass over an array's values found (examples along the first axis)."""

    n_nan: int = 0
    n_inf: int = 0
    #: The first example holding a NaN or infinite value.
    first_nonfinite: int | None = None
    #: The smallest and largest finite values (None for an array with none).
    lo: float | None = None
    hi: float | None = None
    #: The first example holding a finite float that is not a whole number, and that value.
    first_fractional: int | None = None
    fractional: float | None = None
    #: The first example holding a finite value beyond float32's range, and its largest magnitude.
    first_beyond_float32: int | None = None
    beyond_float32: float | None = None


@contextlib.contextmanager
def reporting(hook: Callable[[str, int, int], None]) -> Iterator[None]:
    """While inside, scans of large arrays call ``hook(what, done, total)`` (bytes) as they go,
    and once more with ``done == total`` at the end."""
    global _progress
    previous, _progress = _progress, hook
    try:
        yield
    finally:
        _progress = previous


def progress(what: str, done: int, total: int) -> None:
    """Report a long pass (a scan, a CRC check) to the hook of :func:`reporting`, if any."""
    if _progress is not None and total > PROGRESS_BYTES:
        _progress(what, done, total)


def scan(values: np.ndarray, what: str = "") -> Stats:
    """The :class:`Stats` of ``values``, in one pass of bounded chunks."""
    from .data import row_chunks  # the chunking (and page release) every check shares

    kind = values.dtype.kind
    n_nan = n_inf = 0
    first_nonfinite = first_fractional = first_beyond = None
    fractional = beyond = None
    lo = hi = None
    done = 0
    for start, part in row_chunks(values):
        part = np.asarray(part)
        if kind == "f":
            finite = np.isfinite(part)
            if not finite.all():
                nan = np.isnan(part)
                n_nan += int(nan.sum())
                n_inf += int((~finite & ~nan).sum())
                if first_nonfinite is None:
                    first_nonfinite = start + _first_row(~finite)
            kept = part[finite] if not finite.all() else part.reshape(-1)
            if first_fractional is None and kept.size:
                whole = np.where(finite, part == np.round(part), True)
                if not whole.all():
                    row = _first_row(~whole)
                    first_fractional = start + row
                    fractional = float(part[row][~whole[row]].flat[0])
            if first_beyond is None and kept.size and part.dtype.itemsize > 4:
                big = finite & (np.abs(part) > _FLOAT32_MAX)
                if big.any():
                    row = _first_row(big)
                    first_beyond = start + row
                    beyond = float(np.abs(part[row][finite[row]]).max())
        else:
            kept = part.reshape(-1)
        if kept.size:
            low, high = kept.min(), kept.max()
            lo = low.item() if lo is None else min(lo, low.item())
            hi = high.item() if hi is None else max(hi, high.item())
        done += part.nbytes
        progress(f"{what}: checking its values", done, values.nbytes)
    return Stats(n_nan, n_inf, first_nonfinite, lo, hi, first_fractional, fractional,
                 first_beyond, beyond)


def _first_row(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask.reshape(len(mask), -1).any(axis=1))[0])


# -- the cache -----------------------------------------------------------------------------------
def cache_dir() -> Path | None:
    """Where scans are kept, or None when the cache is off."""
    chosen = os.environ.get("NETBUILD_CACHE_DIR")
    if chosen is not None:
        return None if chosen.strip().lower() in ("", "off", "0", "none") else Path(chosen)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "netbuild"


def identity(file: Path, archive: zipfile.ZipFile) -> dict:
    """What an entry holds only for: the file's size, modification time and a SHA-256 of the
    archive's directory (every member's name, sizes, compression and CRC-32)."""
    stat = os.stat(file)
    digest = hashlib.sha256()
    for info in archive.infolist():
        digest.update(f"{info.filename}\0{info.file_size}\0{info.compress_size}\0"
                      f"{info.compress_type}\0{info.CRC}\0{info.header_offset}\n".encode())
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "headers": digest.hexdigest()}


class FileCache:
    """The cache entry of one .npz file: each member's Stats and whether its CRC-32 was checked.
    Loaded when the file is opened; :meth:`save` writes it back (atomically) if it changed."""

    def __init__(self, file: Path, archive: zipfile.ZipFile):
        self.path = None
        self.members: dict[str, dict] = {}
        self._changed = False
        root = cache_dir()
        if root is None:
            return
        try:
            real = str(Path(file).resolve())
            self.identity = identity(file, archive)
        except OSError:
            return
        self.path = root / "scans" / (hashlib.sha256(real.encode()).hexdigest()[:32] + ".json")
        self.file = real
        try:
            entry = json.loads(self.path.read_text())
            if entry.get("version") == _VERSION and entry.get("file") == real \
                    and entry.get("identity") == self.identity:
                self.members = dict(entry.get("members", {}))
        except (OSError, ValueError, AttributeError):
            pass

    def verified(self, key: str) -> bool:
        """Whether the member's CRC-32 was checked against its bytes, unchanged since."""
        return bool(self.members.get(key, {}).get("crc"))

    def mark_verified(self, key: str) -> None:
        if self.path is not None and not self.verified(key):
            self.members.setdefault(key, {})["crc"] = True
            self._changed = True

    def stats(self, key: str, values: np.ndarray, what: str) -> Stats:
        """The member's Stats: from the cache, else scanned (and kept)."""
        kept = self.members.get(key, {}).get("stats")
        if kept is not None:
            try:
                return Stats(**kept)
            except TypeError:
                pass
        found = scan(values, what)
        if self.path is not None:
            self.members.setdefault(key, {})["stats"] = dataclasses.asdict(found)
            self._changed = True
        return found

    def save(self) -> None:
        if self.path is None or not self._changed:
            return
        from .runs import atomic_write

        entry = {"version": _VERSION, "file": self.file, "identity": self.identity,
                 "members": self.members}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, json.dumps(entry).encode())
            self._changed = False
        except OSError:
            pass
