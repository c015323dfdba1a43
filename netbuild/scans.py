"""What a check learns from scanning an array's values, in bounded chunks, and a cache of it so
that a second ``check`` or ``train`` of unchanged files does not scan them again.

One pass over an array gives its :class:`Stats`: how many NaN and infinite values it holds and
the first example with one, the smallest and largest finite value and the largest magnitude, and
the first example holding a float that is not a whole number (class ids stored as floats). The data checks (:mod:`netbuild.data`) read their answers from
these, whatever the spec asks of the array (ids below an embedding's size, classes below an
output's units, targets in [0, 1]), so one scan serves every spec that reads the file.

The scan goes :data:`netbuild.data.CHECK_CHUNK` values at a time and releases a memory-mapped
array's pages as it goes. An array of more than :data:`PROGRESS_BYTES` reports its progress to
the hook set by :func:`reporting` (the CLI's progress line on a terminal).

The cache keeps, per .npz file, the Stats of each member scanned and whether its CRC-32 was
checked (per ``.npy`` file of a data folder, its array's Stats: a ``.npy`` file has no checksum),
under ``$NETBUILD_CACHE_DIR`` (default ``$XDG_CACHE_HOME/netbuild``, else
``~/.cache/netbuild``; ``NETBUILD_CACHE_DIR=off`` turns it off). An entry holds only while the
file's device, inode, size, modification and status-change times and header checksum (a SHA-256
of the archive's directory: each member's name, sizes, compression and the CRC-32 its writer
recorded; of a ``.npy`` file, its header) are those it was made from; anything else and the
file is scanned again. The status
change time cannot be set back (``touch -r``, ``cp -p`` and ``rsync -t`` set only the
modification time), and as git does with racy timestamps, no entry is kept for a file changed
less than :data:`RACY_NS` before its scan: the file system's clock ticks coarsely, and a second
change within the same tick would leave its times as they were. What the cache cannot see is a
change of the bytes that leaves all of these alone (a disk's bit rot): ``NETBUILD_CACHE_DIR=off``
checks every byte every time. A cache that cannot be read or written is no error: the scan is
simply made.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

#: Arrays larger than this report their scan's progress (to the hook of :func:`reporting`).
PROGRESS_BYTES = 256 * 2**20
#: No cache entry is kept for a file changed less than this long (ns) before its scan.
RACY_NS = 2 * 10**9

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
    #: The largest magnitude of a finite value (None for an array with none).
    peak: float | None = None


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
    number = float if kind == "f" else int  # a Python number (longdouble's item() is not one)
    n_nan = n_inf = 0
    first_nonfinite = first_fractional = None
    fractional = peak = None
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
                    first_nonfinite = start + first_row(~finite)
            kept = part[finite] if not finite.all() else part.reshape(-1)
            if first_fractional is None and kept.size:
                whole = np.where(finite, part == np.round(part), True)
                if not whole.all():
                    row = first_row(~whole)
                    first_fractional = start + row
                    fractional = float(part[row][~whole[row]].flat[0])
        else:
            kept = part.reshape(-1)
        if kept.size:
            low, high = number(kept.min()), number(kept.max())
            lo = low if lo is None else min(lo, low)
            hi = high if hi is None else max(hi, high)
        done += part.nbytes
        progress(f"{what}: checking its values", done, values.nbytes)
    if lo is not None:
        peak = float(max(abs(lo), abs(hi)))
    return Stats(n_nan, n_inf, first_nonfinite, lo, hi, first_fractional, fractional, peak)


def first_row(mask: np.ndarray) -> int:
    """The first example (row) where ``mask`` holds anywhere."""
    return int(np.flatnonzero(mask.reshape(len(mask), -1).any(axis=1))[0])


# -- the cache -----------------------------------------------------------------------------------
def cache_dir() -> Path | None:
    """Where scans are kept, or None when the cache is off."""
    chosen = os.environ.get("NETBUILD_CACHE_DIR")
    if chosen is not None:
        return None if chosen.strip().lower() in ("", "off", "0", "none") else Path(chosen)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "netbuild"


#: Bumped with any change of what an entry holds; Stats' fields are part of it.
_VERSION = "2:" + ",".join(f.name for f in dataclasses.fields(Stats))


def identity(stat: os.stat_result, archive: zipfile.ZipFile | bytes) -> dict:
    """What an entry holds only for: the file's device, inode, size, modification and status
    change times, and a SHA-256 of the archive's directory (every member's name, sizes,
    compression and recorded CRC-32), or of a ``.npy`` file's header (its bytes, given)."""
    digest = hashlib.sha256()
    if isinstance(archive, bytes):
        digest.update(archive)
    else:
        for info in archive.infolist():
            digest.update(f"{info.filename}\0{info.file_size}\0{info.compress_size}\0"
                          f"{info.compress_type}\0{info.CRC}\0{info.header_offset}\n".encode())
    return {"device": stat.st_dev, "inode": stat.st_ino, "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns, "headers": digest.hexdigest()}


class FileCache:
    """The cache entry of one .npz file (or ``.npy`` file): each member's Stats and whether its
    CRC-32 was checked. Loaded when the file is opened; :meth:`save` writes it back (atomically)
    if it changed."""

    def __init__(self, file: Path, archive: zipfile.ZipFile | bytes, fd: int):
        """``fd``: the archive's open file (its times are the opened file's, not the path's);
        ``archive``: the open archive, or a ``.npy`` file's header bytes."""
        self.path = None
        self.members: dict[str, dict] = {}
        self._changed = False
        root = cache_dir()
        if root is None:
            return
        try:
            real = str(Path(file).resolve())
            stat = os.fstat(fd)
            self.identity = identity(stat, archive)
        except OSError:
            return
        self._racy = time.time_ns() - max(stat.st_mtime_ns, stat.st_ctime_ns) < RACY_NS
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
        if isinstance(kept, dict) and set(kept) == {f.name for f in dataclasses.fields(Stats)}:
            return Stats(**kept)
        found = scan(values, what)
        if self.path is not None:
            self.members.setdefault(key, {})["stats"] = dataclasses.asdict(found)
            self._changed = True
        return found

    def save(self) -> None:
        """Write the entry back, unless nothing changed or the file changed too recently to
        tell a later change by its times (:data:`RACY_NS`)."""
        if self.path is None or not self._changed or self._racy:
            return
        from .runs import atomic_write

        entry = {"version": _VERSION, "file": self.file, "identity": self.identity,
                 "members": self.members}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, json.dumps(entry).encode())
            self._changed = False
        except (OSError, TypeError, ValueError):  # a cache is never an error
            pass


class FolderCache:
    """The cache entries of a folder of ``.npy`` files, one :class:`FileCache` per file, by key;
    a ``.npy`` file has no checksum to check."""

    def __init__(self, caches: dict[str, FileCache]):
        self.caches = caches

    def stats(self, key: str, values: np.ndarray, what: str) -> Stats:
        return self.caches[key].stats(key, values, what)

    def save(self) -> None:
        for cache in self.caches.values():
            cache.save()
