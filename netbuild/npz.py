"""Reading the arrays of an .npz archive in bounded memory: each member's header first, then its
values, memory-mapped or decompressed in chunks into exactly the space it declares; and writing
archives whose members' data lie aligned in the file (:func:`savez`), read in place.

NumPy's archive reader decompresses a member whole, growing as it reads: an 11 MB archive of
compressed zeros made ``netbuild check`` hold 14.7 GB before it answered. Here a member's ``.npy``
header (its shape and dtype) is read first, a few hundred bytes; then

- a member stored uncompressed (``numpy.savez``) is memory-mapped from the archive, once its
  bytes have been streamed through in chunks to check the archive's CRC-32 (a damaged byte is
  refused, as when reading it whole); the kernel may drop what was read;
- a compressed member (``numpy.savez_compressed``) is decompressed in chunks into one array of
  the size its header declares, if that fits the memory :func:`budget` allows; else it is refused
  from its header alone, without decompressing a byte of its data.

A member that holds Python objects (a pickled array) is refused; a header that declares more
data than the archive stores (uncompressed), or a stream that ends early, is a damaged archive.

A lone ``.npy`` file (a data folder's, one per key: :func:`npy_open`) is read the same way: its
header checked as a member's, its data memory-mapped.
"""

from __future__ import annotations

import math
import os
import stat
import struct
import zipfile
from dataclasses import dataclass

import numpy as np

#: Opens a file without waiting: a pipe put where a data file was looked at never blocks.
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
#: Bytes decompressed at a time.
CHUNK = 4 * 2**20
#: The share of the available memory a compressed member may take once decompressed.
MEMORY_SHARE = 0.5


class MemberError(ValueError):
    """A member that cannot be read; the message says why and what was expected."""


@dataclass(frozen=True)
class Member:
    """What a member's (or a ``.npy`` file's) header declares, and where its data lies."""

    key: str
    shape: tuple
    dtype: np.dtype
    fortran: bool
    compressed: bool
    #: Offset of the data in the archive (an uncompressed member's) or the .npy file, else None.
    offset: int | None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux's MemAvailable, else the machine's
    physical memory), or None when it cannot be told."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def budget() -> int | None:
    """The most a decompressed member may take: :data:`MEMORY_SHARE` of the available memory."""
    free = available_memory()
    return None if free is None else int(free * MEMORY_SHARE)


def size_text(n: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{int(n)} bytes"


def _member_name(archive: zipfile.ZipFile, key: str) -> str:
    names = set(archive.namelist())
    return key if key in names else key + ".npy"


def _read_header(f) -> tuple[tuple, bool, np.dtype, int]:
    """``(shape, fortran, dtype, header bytes)`` of the ``.npy`` stream ``f``."""
    fmt = np.lib.format
    start = f.tell()
    major, minor = fmt.read_magic(f)
    if (major, minor) == (1, 0):
        shape, fortran, dtype = fmt.read_array_header_1_0(f)
    elif (major, minor) == (2, 0):
        shape, fortran, dtype = fmt.read_array_header_2_0(f)
    else:  # 3.0: the 2.0 layout with a UTF-8 header
        from numpy.lib import _format_impl

        shape, fortran, dtype = _format_impl._read_array_header(f, (major, minor))
    return tuple(int(d) for d in shape), bool(fortran), np.dtype(dtype), f.tell() - start


def _data_offset(path, info: zipfile.ZipInfo) -> int:
    """Where a member's bytes begin in the archive: after its local file header."""
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(_LOCAL_HEADER)
    if len(local) != _LOCAL_HEADER or local[:4] != b"PK\x03\x04":
        raise MemberError("its local header is damaged; expected a complete .npz archive")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return info.header_offset + _LOCAL_HEADER + name_len + extra_len


def member(path, archive: zipfile.ZipFile, key: str) -> Member:
    """The header of the member ``key``, read without its data."""
    info = archive.getinfo(_member_name(archive, key))
    try:
        with archive.open(info) as f:
            shape, fortran, dtype, header = _read_header(f)
    except (ValueError, EOFError, OSError, zipfile.BadZipFile, struct.error):
        raise MemberError("is not a NumPy array (a raw file inside the archive); expected an array "
                          "saved by numpy.savez") from None
    compressed = info.compress_type != zipfile.ZIP_STORED
    offset = None if compressed else _data_offset(path, info) + header
    return _declared(key, shape=shape, fortran=fortran, dtype=dtype, offset=offset,
                     compressed=compressed, stored=info.file_size - header, what=".npz archive",
                     noun="archive")


class Reader:
    """A data file's descriptor, kept open for :class:`netbuild.data.FileReads` to read rows from
    with ``pread`` (which ignores the file position, so one descriptor serves every member and
    thread); closed when the last array holding it is gone."""

    def __init__(self, fd: int, name: str):
        self.fd, self.name = fd, name

    def fileno(self) -> int:
        return self.fd

    def __del__(self):
        try:
            os.close(self.fd)
        except OSError:
            pass


def mapped(path, dtype: np.dtype, offset: int, shape: tuple, order: str = "C",
           reader: Reader | None = None) -> np.memmap:
    """The array stored at ``offset`` of ``path``, memory-mapped: from ``reader`` (the file
    already open, whose header was read: :class:`Reader`), held as the array's ``reader``, else
    from ``path`` opened now. A file cut shorter than the array since its header was read is a
    :class:`MemberError`."""
    # never blocks on a pipe swapped in since the file was looked at (O_NONBLOCK)
    fd = os.dup(reader.fd) if reader is not None else os.open(path, os.O_RDONLY | _NONBLOCK)
    with open(fd, "rb") as f:
        try:
            array = np.memmap(f, dtype=dtype, mode="r", offset=offset, shape=shape, order=order)
        except ValueError:  # mmap: the file is now shorter than offset + the array's bytes
            raise MemberError("was cut short while it was being read; expected the file to stay "
                              "as it is while netbuild reads it") from None
    array.reader = reader
    return array


def _declared(key: str, *, shape: tuple, fortran: bool, dtype: np.dtype, offset: int | None,
              compressed: bool, stored: int, what: str, noun: str) -> Member:
    """The :class:`Member` a header declares, once it declares an array that can be: numeric,
    of dimensions at least 0, addressable, and no larger than the ``stored`` bytes after the
    header (for data stored as is; ``what`` names the kind of file, ".npz archive" or ".npy
    file", and ``noun`` what stores the data, "archive" or "file")."""
    if dtype.hasobject:
        raise MemberError("holds Python objects (a pickled array), which netbuild never loads; "
                          "expected a numeric array")
    if any(d < 0 for d in shape):
        raise MemberError(f"declares shape {shape}; expected dimensions of at least 0 (a damaged "
                          f"{what})")
    found = Member(key, shape, dtype, fortran, compressed, offset)
    if found.nbytes >= 2**62 or any(d >= 2**62 for d in shape):
        raise MemberError(f"declares shape {shape} of {dtype}, more than any machine can address; "
                          f"expected a complete {what}")
    if not compressed and stored < found.nbytes:
        raise MemberError(f"declares shape {shape} of {dtype} ({size_text(found.nbytes)}) but the "
                          f"{noun} stores "
                          f"{size_text(max(stored, 0))} of it; expected a complete {what}")
    return found


def npy_open(path, key: str, name: str) -> tuple[Member, bytes, Reader]:
    """The ``.npy`` file ``path`` (the array ``key`` of a folder of them), opened once: the array
    its header declares (:class:`Member`, its data at ``offset``), the header's bytes (for the scan
    cache) and the open file (:class:`Reader`), so that the header, the cache's times and the map
    (:func:`mapped` from this open file) are of one file. ``numpy.save`` pads its header to a
    multiple of 64 bytes (``numpy.lib.format.ARRAY_ALIGN``), so the data lies aligned (a file
    whose data does not is read with ``pread``: :meth:`netbuild.data.FileReads.read`). ``name``:
    the file as messages name it."""
    reader = Reader(os.open(path, os.O_RDONLY | _NONBLOCK), name)
    held = os.fstat(reader.fd)
    if not stat.S_ISREG(held.st_mode):  # swapped for a pipe since it was looked at
        raise MemberError("is not a regular file (a device, pipe or socket); expected a .npy file")
    try:
        with open(os.dup(reader.fd), "rb") as f:
            shape, fortran, dtype, header = _read_header(f)
            f.seek(0)
            head = f.read(header)
    except Exception:  # a damaged header fails anywhere in numpy's parsing
        raise MemberError("is not a NumPy array file (.npy), or its header is damaged; expected "
                          "an array saved by numpy.save") from None
    found = _declared(key, shape=shape, fortran=fortran, dtype=dtype, offset=header,
                      compressed=False, stored=held.st_size - header, what=".npy file",
                      noun="file")
    return found, head, reader


def read(path, archive: zipfile.ZipFile, m: Member, verified: bool = False,
         what: str = "", reader: Reader | None = None) -> np.ndarray:
    """The member's values: memory-mapped (uncompressed, holding ``reader``: :func:`mapped`), or
    decompressed in chunks into one array (compressed) when it fits :func:`budget`;
    :class:`MemberError` otherwise. A stored member's CRC-32 is checked first (its bytes
    streamed through, progress reported as ``what``), unless ``verified`` (the scan cache's word
    that it was, on this very file)."""
    from .scans import progress

    order = "F" if m.fortran else "C"
    info = archive.getinfo(_member_name(archive, m.key))
    if not m.compressed:
        if not verified:
            with archive.open(info) as f:  # the CRC-32 is checked at the end of the stream
                done = 0
                while chunk := f.read(CHUNK):
                    done += len(chunk)
                    progress(f"{what}: checking its CRC-32", done, info.file_size)
        if m.nbytes == 0:
            return np.empty(m.shape, m.dtype, order=order)
        return mapped(path, m.dtype, m.offset, m.shape, order, reader)
    limit = budget()
    if limit is not None and m.nbytes > limit:
        raise MemberError(f"is stored compressed and declares shape {m.shape} of {m.dtype} "
                          f"({size_text(m.nbytes)}), more than the {size_text(limit)} of memory "
                          "netbuild may take for it (half of what is available); expected it stored "
                          "uncompressed (numpy.savez, which netbuild memory-maps), or smaller")
    out = np.empty(m.shape, m.dtype, order=order)
    view = memoryview(out.reshape(-1, order="A")).cast("B") if out.size else memoryview(b"")
    with archive.open(info) as f:
        _read_header(f)
        done = 0
        while done < len(view):
            got = f.readinto(view[done:done + CHUNK])
            if not got:
                raise MemberError(f"ends after {size_text(done)} of the {size_text(m.nbytes)} its "
                                  "header declares; expected a complete .npz archive")
            done += got
            progress(f"{what}: decompressing", done, m.nbytes)
        if f.read(1):  # the end of the stream checks its CRC-32
            raise MemberError(f"holds more than the {size_text(m.nbytes)} its header declares; "
                              "expected a complete .npz archive")
    return out


#: Where the archives netbuild writes (:func:`savez`) put each member's data: at a multiple of
#: this many bytes of the file, as a ``.npy`` file has it (numpy pads its header to 64 bytes).
ALIGN = 64
#: The id of the extra field that pads a member's local header (Android's zipalign uses it).
_PADDING_ID = 0xD935
_LOCAL_HEADER = 30  # bytes of a zip local file header before its name
_ZIP64_EXTRA = 20  # the extra field zipfile adds to a member opened with force_zip64


def add_member(archive: zipfile.ZipFile, name: str, write) -> None:
    """Add the member ``name`` to ``archive`` (open for writing, on a seekable file), stored
    uncompressed, its bytes from ``write(f)``: a ``.npy`` stream, whose data (after a header of a
    multiple of 64 bytes) then lies at a multiple of :data:`ALIGN` bytes of the file.

    ``numpy.savez`` puts a member's data where the member's name leaves it (``x.npy``: at 183
    bytes, past a 128-byte header), so a float32 array there lies unaligned, which PyTensor's C
    code refuses: a batch of its rows must be copied out of the file. Aligned, a batch that is one
    run of rows is a view of the file's map (:meth:`netbuild.data.FileReads.view`)."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))  # the same bytes every time
    info.compress_type = zipfile.ZIP_STORED
    encoded = len(info.filename.encode("utf-8"))  # as zipfile writes it (cut at a NUL)
    # the local header goes where the archive's directory would begin (zipfile seeks there)
    pad = -(archive.start_dir + _LOCAL_HEADER + encoded + _ZIP64_EXTRA) % ALIGN
    if 0 < pad < 4:  # an extra field is at least its 4-byte id and size
        pad += ALIGN
    if pad:
        info.extra = struct.pack("<HH", _PADDING_ID, pad - 4) + bytes(pad - 4)
    with archive.open(info, "w", force_zip64=True) as f:
        write(f)


def savez(path, /, **arrays) -> None:
    """Write ``arrays`` (numpy arrays, as :func:`netbuild.api.savez` checks them) to ``path`` as
    ``numpy.savez`` does (an uncompressed ``.npz`` archive, each array under its keyword;
    ``numpy.load`` reads it), with each member's data aligned
    (:func:`add_member`) so that netbuild reads batches of its rows without copying them, and
    atomically (a temporary file beside ``path``, renamed)."""
    from .runs import atomic_write_with

    def write(f):
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            for key, value in arrays.items():
                add_member(archive, f"{key}.npy", lambda out, value=value:
                           np.lib.format.write_array(out, value, allow_pickle=False))

    atomic_write_with(path, write)
