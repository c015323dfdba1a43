"""Data: .npz loading and validation against the network, splits and batches.

Files are always loaded with ``allow_pickle=False``. Every problem is a located spec error that
names the data file (and key): the position is the spec line that names the file.
"""

from __future__ import annotations

import errno
import functools
import math
import mmap
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import numpy as np

from . import backend, losses, npz, scans
from .errors import (DataError, Issue, Location, NetbuildError, SpecError, UsageError, did_you_mean,
                     format_path, printable)
from .network import Network
from .spec import Spec


@dataclass
class Dataset:
    """Inputs ``xs``, one array ``(n, *shape)`` per model input, and targets ``ys``, one per
    output (both in the spec's order); ``source`` names the file. ``x`` and ``y`` are the arrays
    of a model with one input and one output."""

    xs: list[np.ndarray]
    ys: list[np.ndarray]
    source: str

    @classmethod
    def of(cls, x: np.ndarray, y: np.ndarray, source: str) -> "Dataset":
        """The dataset of a model with one input and one output."""
        return cls([x], [y], source)

    @property
    def x(self) -> np.ndarray:
        (x,) = self.xs
        return x

    @property
    def y(self) -> np.ndarray:
        (y,) = self.ys
        return y

    def __len__(self) -> int:
        return len(self.xs[0])

    def take(self, index: np.ndarray, source: str | None = None) -> "Dataset":
        return Dataset([x[index] for x in self.xs], [y[index] for y in self.ys],
                       source or self.source)

    def batch(self, index: np.ndarray) -> list[np.ndarray]:
        """The inputs, then the targets, of the examples ``index``: a compiled function's
        arguments."""
        return [gather(a, index) for a in self.xs + self.ys]

    @property
    def mapped(self) -> bool:
        """Whether some of its arrays are read from files (memory-mapped, or several files)."""
        return any(from_files(a) for a in self.xs + self.ys)

    @property
    def unaligned_input_files(self) -> list[str]:
        """The files whose input rows a batch reads with ``pread`` because they lie unaligned
        there (``numpy.savez``), where aligned (:func:`netbuild.npz.savez`) a batch of one run
        of rows would be read in place (:meth:`FileReads.view`)."""
        return list(dict.fromkeys(f.file.name for x in self.xs if reads_files(x)
                                  for f in _sources(x) if not f.rows.flags.aligned))

    @property
    def inputs_read_from_files(self) -> bool:
        """Whether a batch's inputs are read from their files with ``pread``
        (:class:`FileReads`), not copied from memory."""
        return any(reads_files(x) for x in self.xs)


def real_path(path: str | os.PathLike) -> Path:
    """``path`` absolute, with ``..`` and symbolic links resolved as the file system does; never
    raises (a loop of links or a name too long is left as far as it resolves)."""
    try:
        return Path(os.path.realpath(path))
    except ValueError:  # a NUL byte
        return Path(os.path.abspath(path))


def resolve_path(spec: Spec, value: str) -> Path:
    """A data path from the spec: relative paths are relative to the spec's folder; ``..`` and
    symbolic links are resolved as the file system does (the same path the run records)."""
    path = Path(value).expanduser()
    return real_path(path if path.is_absolute() else spec.base_dir / path)


def display_path(path: Path) -> str:
    """``path`` resolved, relative to the working folder when it lies below it, else absolute."""
    real = real_path(path)
    try:
        return str(real.relative_to(Path.cwd()))
    except ValueError:
        return str(real)


class _Reporter:
    """Builds located issues for one data file."""

    def __init__(self, where: Location | None, path: tuple, file: str):
        self.where, self.path, self.file = where, path, file

    def error(self, message: str, key: str | None = None) -> NetbuildError:
        what = f"{self.file}: key '{key}': " if key else f"{self.file}: "
        if self.where is None:  # a file named on the command line, not in the spec
            return DataError(printable(what + message))
        return SpecError(Issue(self.where, self.path, what + message))


def reporter(name: str) -> _Reporter:
    """Errors about an array handed over directly (the Python API's ``x`` and ``y``): a
    :class:`DataError` whose message starts with ``name``."""
    return _Reporter(None, (), name)


_ZIP_MAGIC = b"PK\x03\x04"
_NPY_MAGIC = b"\x93NUMPY"


def not_npz(file: Path) -> str | None:
    """Why ``file`` (an existing regular file) is not an .npz archive, or None when it is one."""
    if zipfile.is_zipfile(file):
        return None
    with open(file, "rb") as f:
        head = f.read(8)
    if not head:
        return "is empty (0 bytes); expected an .npz archive"
    if head.startswith(_NPY_MAGIC):
        return ("is a .npy file (a single array), not an .npz archive; expected an .npz archive "
                "(numpy.savez), or the folder that holds it (a folder of .npy files, one per key)")
    if head.startswith(_ZIP_MAGIC):
        return ("is a truncated or damaged .npz archive (it begins like one, but its directory at "
                "the end is missing); expected a complete .npz archive")
    return "is not an .npz archive (neither a zip file nor a .npy array); expected an .npz archive"


def not_a_regular_file(file: Path, expected: str = "an .npz file") -> str | None:
    """Why ``file`` cannot be read as a data file (missing, a folder, a pipe...), or None;
    ``expected`` says what it should be."""
    try:
        os.stat(file)
    except FileNotFoundError:
        if os.path.islink(file):
            return f"file not found (the symbolic link {printable(str(file))} leads here)"
        return "file not found"
    except ValueError:
        return "file not found (the name holds a NUL byte)"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return f"is a loop of symbolic links; expected {expected}"
        return f"cannot read: {exc.strerror or exc}"
    if file.is_dir():
        return f"is a folder; expected {expected}"
    if not file.is_file():  # a pipe or a device would block or never end
        return f"is not a regular file (a device, pipe or socket); expected {expected}"
    return None


def open_npz(file: Path) -> np.lib.npyio.NpzFile:
    """An .npz archive opened without pickle; ValueError when the file is not one."""
    problem = not_a_regular_file(file) or not_npz(file)
    if problem:
        raise ValueError(problem)
    archive = np.load(file, allow_pickle=False)
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError("not an .npz archive")
    return archive


def _listed(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit]) or "(none)"
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _closest(key: str, keys: list[str]) -> str:
    """`` (did you mean 'X'?)`` for a key that differs only in case, or is a close spelling."""
    same = [k for k in keys if k.lower() == key.lower()]
    return f" (did you mean '{same[0]}'?)" if same else did_you_mean(key, keys)


def _read_array(file: Path, archive: np.lib.npyio.NpzFile, key: str, report: _Reporter,
                cache: scans.FileCache, reader: npz.Reader) -> np.ndarray:
    """One member of an open archive as an array, in bounded memory (:mod:`netbuild.npz`:
    memory-mapped when stored, decompressed in chunks when it fits); pickled, oversized or
    damaged members are refused. A stored member's CRC-32 is checked unless the cache says it
    was, on the file as it is."""
    try:
        m = npz.member(file, archive.zip, key)
        found = npz.read(file, archive.zip, m, verified=not m.compressed and cache.verified(key),
                         what=f"{display_path(file)} '{key}'", reader=reader)
        if not m.compressed:  # a compressed one's CRC-32 is checked as it is decompressed
            cache.mark_verified(key)
        return found
    except npz.MemberError as exc:
        raise report.error(str(exc), key) from None
    except MemoryError:
        raise report.error("is larger than this machine's memory; expected an array that fits",
                           key) from None
    except Exception as exc:  # a damaged member fails anywhere in zipfile's or numpy's parsing
        raise report.error(f"cannot be read, the archive is damaged ({type(exc).__name__}: "
                           f"{exc}); expected a complete .npz archive", key) from None


def read_arrays(file: Path, wanted: list[str], report: _Reporter,
                errors: list | None = None) -> dict[str, np.ndarray]:
    """The arrays under the keys ``wanted`` of an .npz file (or a folder of ``.npy`` files),
    refusing pickled objects. A missing key is an error of its own: added to ``errors`` when
    given (the other arrays are still read), else raised (every missing key at once)."""
    arrays, cache = _open_arrays(file, wanted, report, errors)
    cache.save()
    return arrays


def _open_arrays(file: Path, wanted: list[str], report: _Reporter,
                 errors: list | None = None) -> tuple[dict[str, np.ndarray],
                                                      scans.FileCache | scans.FolderCache]:
    """:func:`read_arrays`, and the file's (or folder's) scan cache (saved by the caller)."""
    if is_folder(file):
        return _open_folder(file, wanted, report, errors)
    problem = not_a_regular_file(file)
    if problem:
        raise report.error(problem)
    expected = ", ".join(f"'{k}'" for k in wanted)
    try:
        problem = not_npz(file)
        if problem:
            raise report.error(problem)
        with open(file, "rb") as f, np.load(f, allow_pickle=False) as archive:
            keys = list(archive.files)
            missing = _missing(wanted, keys, report)
            if missing and errors is None:
                raise _joined(missing)
            (errors if errors is not None else []).extend(missing)
            cache = scans.FileCache(file, archive.zip, f.fileno())
            reader = npz.Reader(os.dup(f.fileno()), display_path(file))  # for gather
            arrays = {}
            try:
                for k in wanted:
                    if k in keys:
                        arrays[k] = _read_array(file, archive, k, report, cache, reader)
            except NetbuildError:
                cache.save()  # the members checked before the bad one
                raise
    except NetbuildError:
        raise
    except OSError as exc:
        if exc.strerror:  # the file system's answer (permission denied, an I/O error)
            raise report.error(f"cannot read: {exc.strerror}") from None
        raise report.error(f"is not a readable .npz archive ({exc}); expected an .npz archive "
                           f"with the keys {expected}") from None
    except Exception as exc:  # a damaged archive fails anywhere in zipfile's or numpy's parsing
        raise report.error(f"is not a readable .npz archive ({exc}); expected an .npz archive "
                           f"with the keys {expected}") from None
    return arrays, cache


def _missing(wanted: list[str], keys: list[str], report: _Reporter,
             holder: str = "the file") -> list[NetbuildError]:
    """An error for each key of ``wanted`` that is not among a file's (or folder's) ``keys``."""
    return [report.error(f"no array '{key}' in {holder}; its keys are: {_listed(keys)}"
                         f"{_closest(key, keys)}") for key in wanted if key not in keys]


def is_folder(path: Path) -> bool:
    """Whether ``path`` is a folder (of ``.npy`` files, as data); a name the system refuses (too
    long, a NUL byte) is not, and is reported as a file would be."""
    try:
        return path.is_dir()
    except (OSError, ValueError):
        return False


def npy_keys(folder: Path, report: _Reporter) -> list[str]:
    """The keys of a data folder: the names of its ``.npy`` files without ``.npy`` (listed only
    to name them in an error); a folder without any is an error."""
    try:
        with os.scandir(folder) as entries:
            keys = sorted(e.name[:-len(".npy")] for e in entries if e.name.endswith(".npy"))
    except OSError as exc:
        raise report.error(f"cannot read: {exc.strerror or exc}") from None
    if not keys:
        raise report.error("is a folder with no .npy file; expected an .npz file, or a folder of "
                           ".npy files, one per key (x.npy, y.npy), as numpy.save writes them")
    return keys


def _npy_members(folder: Path, wanted: list[str], report: _Reporter,
                 errors: list | None) -> dict[str, tuple[npz.Member, bytes, npz.Reader]]:
    """The ``<key>.npy`` files of a data folder for the keys ``wanted``, each opened once
    (:func:`netbuild.npz.npy_open`: its header, the header's bytes, the open file). A missing
    key is an error of its own (added to ``errors`` when given, as :func:`_open_arrays` does);
    any other problem of a file is raised, naming its key."""
    found, absent = {}, []
    for key in wanted:
        path = folder / f"{key}.npy"
        if os.sep in key or key in (".", "..") or not os.path.lexists(path):
            absent.append(key)
            continue
        problem = not_a_regular_file(path, "a .npy file")
        if problem:
            raise report.error(f"{printable(path.name)}: {problem}", key)
        try:
            found[key] = npz.npy_open(path, key, display_path(path))
        except npz.MemberError as exc:
            raise report.error(str(exc), key) from None
        except OSError as exc:
            raise report.error(f"cannot read {printable(path.name)}: {exc.strerror or exc}",
                               key) from None
    if absent:
        missing = _missing(absent, npy_keys(folder, report), report, "the folder")
        if errors is None:
            raise _joined(missing)
        errors.extend(missing)
    return found


def _open_folder(folder: Path, wanted: list[str], report: _Reporter,
                 errors: list | None) -> tuple[dict[str, np.ndarray], scans.FolderCache]:
    """:func:`_open_arrays` of a folder of ``.npy`` files (:func:`_npy_members`): each file's
    data memory-mapped (where it lies aligned, a batch of consecutive rows is read in place), its
    scans cached per file."""
    arrays, caches = {}, {}
    for key, (m, header, reader) in _npy_members(folder, wanted, report, errors).items():
        path = folder / f"{key}.npy"
        order = "F" if m.fortran else "C"
        caches[key] = scans.FileCache(path, header, reader.fd)
        try:
            arrays[key] = (npz.mapped(path, m.dtype, m.offset, m.shape, order, reader)
                           if m.nbytes else np.empty(m.shape, m.dtype, order=order))
        except npz.MemberError as exc:  # cut short since it was opened
            raise report.error(str(exc), key) from None
        except OSError as exc:
            raise report.error(f"cannot read {printable(path.name)}: {exc.strerror or exc}",
                               key) from None
    return arrays, scans.FolderCache(caches)


def _joined(errors: list[NetbuildError]) -> NetbuildError:
    """One error holding the issues of several (located errors), or the first."""
    if len(errors) == 1:
        return errors[0]
    if all(isinstance(e, SpecError) for e in errors):
        return SpecError([i for e in errors for i in e.issues])
    return DataError("\n".join(line for e in errors for line in e.lines()))


#: Values a check looks at at a time (its temporaries are of this many elements).
CHECK_CHUNK = 2**22


#: Bytes of a memory-mapped array read between two releases of its pages (:func:`row_chunks`,
#: :func:`prefetched`).
RELEASE_EVERY = 256 * 2**20
#: What a kernel may map around the rows a step reads from a view of a map (:meth:`FileReads.view`),
#: on each side: the rest of the large folio they lie in, up to a PMD's 2 MiB.
MAPPED_AROUND = 2 * 2**20


def row_chunks(values: np.ndarray):
    """``(first row, rows)`` of ``values`` (examples along the first axis), about
    :data:`CHECK_CHUNK` values at a time: the scans of a memory-mapped array stay in bounded
    memory (its pages are released as the scan goes)."""
    per_row = max(1, values.size // max(len(values), 1))
    step = max(1, CHECK_CHUNK // per_row)
    scanned = 0
    for start in range(0, len(values), step):
        part = values[start:start + step]
        yield start, part
        scanned += part.nbytes
        if scanned >= RELEASE_EVERY:
            _release(_mappings(values))
            scanned = 0
    _release(_mappings(values))


def _check_finite(st: scans.Stats, report: _Reporter, key: str) -> None:
    """Refuse NaN and infinite values, naming the first example that holds one."""
    if st.first_nonfinite is not None:
        kinds = " and ".join(f"{n} {name}" for n, name in ((st.n_nan, "NaN"), (st.n_inf, "infinite"))
                             if n) + (" values" if st.n_nan + st.n_inf > 1 else " value")
        raise report.error(f"holds {kinds} (the first in example {st.first_nonfinite}); expected "
                           "finite numbers", key)


def _stats_of(values: np.ndarray, stats: Callable[[], scans.Stats] | None) -> Callable[[], scans.Stats]:
    """``stats`` (a file's cached scan), else a scan of ``values`` made once when first asked."""
    return stats if stats is not None else functools.cache(lambda: scans.scan(values))


def _fits_converted(values: np.ndarray, dtype, report: _Reporter, key: str | None) -> None:
    """Converting ``values`` to ``dtype`` makes a copy in memory (memory-mapped data included):
    refused, before it is made, when it would take more than :func:`netbuild.npz.budget`."""
    dtype = np.dtype(dtype)
    if values.dtype == dtype:
        return
    need, limit = values.size * dtype.itemsize, npz.budget()
    if limit is not None and need > limit:
        raise report.error(f"is stored as {values.dtype} (shape {tuple(values.shape)}); the network "
                           f"reads {dtype}, and converting it takes {npz.size_text(need)} of memory, "
                           f"more than the {npz.size_text(limit)} netbuild may take (half of what is "
                           f"available); expected it stored as {dtype} (then memory-mapped as it is)",
                           key)


def prepare_x(x: np.ndarray, network: Network, report: _Reporter, key: str | None,
              name: str | None = None, stats: Callable[[], scans.Stats] | None = None) -> np.ndarray:
    """Check and cast the inputs of the model input ``name`` (default: the only one): numeric,
    finite, shape ``(n, *shape)`` or ``(n, prod)``; integer ids in range when the input feeds an
    embedding. The values are judged by their :class:`netbuild.scans.Stats` (``stats``: the
    file's, cached; else scanned here).

    netbuild never rescales inputs: integers other than 0 and 1 (and -1) fed to a float input
    (uint8 pixels 0..255, say) are refused with the conversion to make, since training on
    unscaled values is a classic silent mistake."""
    name = network.only_input() if name is None else name
    input_shape = network.inputs[name]
    declared = "model.input_shape" if network.signature.shorthand_inputs else f"model.inputs.{name}.shape"

    if x.dtype.kind not in "biuf":
        raise report.error(f"has dtype {x.dtype}; expected numbers", key)
    if x.ndim == 0:
        raise report.error(f"is a single value (shape ()); expected examples of shape "
                           f"{tuple(input_shape)} along the first axis", key)
    if len(x) == 0:
        raise report.error(f"is empty (shape {x.shape}); expected at least one example", key)
    per_example = tuple(x.shape[1:])
    if per_example != tuple(input_shape):
        if math.prod(per_example) == math.prod(input_shape):
            x = x.reshape((len(x),) + tuple(input_shape))
        else:
            raise report.error(f"has examples of shape {per_example}; expected "
                               f"{tuple(input_shape)} to fit {declared} "
                               f"(or {math.prod(input_shape)} values per example)", key)
    stats = _stats_of(x, stats)
    ids = network.integer_input(name)
    if ids is not None:
        if x.dtype.kind not in "iub":
            raise report.error(f"has dtype {x.dtype}; expected integer ids for the embedding", key)
        st = stats()
        lo, hi = int(st.lo or 0), int(st.hi or 0)
        if lo < 0 or hi >= ids:
            raise report.error(f"holds id {lo if lo < 0 else hi}; expected ids 0..{ids - 1} "
                               f"(the embedding's input_dim is {ids})", key)
        _fits_converted(x, np.int64, report, key)
        return x.astype(np.int64, copy=False)
    if x.dtype.kind in "iu":
        st = stats()
        lo, hi = int(st.lo or 0), int(st.hi or 0)
        if lo < -1 or hi > 1:
            scale = "x.astype('float32') / 255" if lo >= 0 and hi <= 255 else \
                "x.astype('float32'), scaled as the network expects"
            raise report.error(f"is {x.dtype} with values {lo}..{hi}; netbuild does not convert or "
                               f"rescale integer inputs; expected floats (e.g. {scale})", key)
    if x.dtype.kind == "f":
        _check_finite(stats(), report, key)
    dtype = np.dtype(network.input_dtype(name))
    _beyond(x, dtype, stats, report, key)
    _fits_converted(x, dtype, report, key)
    return x.astype(dtype, copy=False)


def _beyond(values: np.ndarray, dtype: np.dtype, stats, report: _Reporter, key: str | None) -> None:
    """Refuse finite float values that become infinite in the network's (smaller) float type.
    The scan's largest magnitude tells whether any may; only then are the values cast, in
    chunks, to find the first example that does."""
    if values.dtype.kind != "f" or dtype.kind != "f" or dtype.itemsize >= values.dtype.itemsize:
        return
    st = stats()
    if st.peak is None or st.peak <= float(np.finfo(dtype).max):
        return
    for start, part in row_chunks(values):
        with np.errstate(over="ignore"):
            overflow = np.isinf(part.astype(dtype)) & np.isfinite(part)
        if overflow.any():
            at = scans.first_row(overflow)
            peak = float(np.abs(part[at][np.isfinite(part[at])]).max())
            raise report.error(f"holds {peak:g} (in example {start + at}), beyond the range of "
                               f"{dtype} (the network's float type); expected finite {dtype} "
                               "values", key)


def prepare_y(y: np.ndarray, n: int, output_shape: tuple, loss_name: str, report: _Reporter,
              key: str, stats: Callable[[], scans.Stats] | None = None) -> np.ndarray:
    """Check targets against the output layer and the loss; cast them. The values are judged by
    their :class:`netbuild.scans.Stats`, as :func:`prepare_x`'s.

    For categorical_crossentropy, targets are class ids (integers, or floats holding whole
    numbers) in ``0..units-1`` or one-hot (probability) rows with values in [0, 1]."""
    if y.dtype.kind not in "biuf":
        raise report.error(f"has dtype {y.dtype}; expected numbers", key)
    if y.ndim == 0 or len(y) != n:
        got = "a single value" if y.ndim == 0 else f"{len(y)} examples"
        raise report.error(f"holds {got}; expected {n}, as many as the inputs", key)
    if not n:
        raise report.error(f"is empty (shape {y.shape}); expected at least one example", key)
    stats = _stats_of(y, stats)
    st = stats()
    _check_finite(st, report, key)
    lo, hi = (st.lo, st.hi) if st.lo is not None else (0, 0)
    if loss_name == "binary_crossentropy" and (lo < 0 or hi > 1):
        bad = lo if lo < 0 else hi
        raise report.error(f"holds {bad:g}; expected targets between 0 and 1 for binary_crossentropy", key)
    if loss_name in losses.CLASS_ID_TARGETS:
        k = output_shape[-1]
        lead = tuple(output_shape[:-1])
        if y.shape[1:] == lead and y.dtype.kind == "f":  # class ids stored as floats
            if st.first_fractional is not None:
                value, at = st.fractional, st.first_fractional
                raise report.error(f"holds {value:g} (example {at}), not a class id; expected whole "
                                   f"class ids 0..{k - 1} or one-hot rows of shape "
                                   f"{(n,) + tuple(output_shape)}", key)
        if y.shape[1:] == lead and y.dtype.kind in "biuf":  # class ids
            lo, hi = int(lo), int(hi)
            if lo < 0 or hi >= k:
                bad = lo if lo < 0 else hi
                raise report.error(f"holds class id {bad}, outside the output's range; expected "
                                   f"ids 0..{k - 1} for an output of {k} units", key)
            _fits_converted(y, np.int64, report, key)
            return y.astype(np.int64, copy=False)
        if y.shape[1:] == tuple(output_shape):
            if lo < 0 or hi > 1:
                bad = lo if lo < 0 else hi
                raise report.error(f"holds {bad:g} in a one-hot row; expected values between 0 "
                                   "and 1 (one-hot or probability rows) for categorical_crossentropy",
                                   key)
            _fits_converted(y, backend.float_type(), report, key)
            return y.astype(backend.float_type(), copy=False)
        raise report.error(f"has shape {y.shape} and dtype {y.dtype}; expected integer class ids "
                           f"of shape {(n,) + lead} or one-hot rows of shape {(n,) + tuple(output_shape)}",
                           key)
    if y.shape[1:] != tuple(output_shape):
        if math.prod(y.shape[1:]) == math.prod(output_shape):
            y = y.reshape((n,) + tuple(output_shape))
        else:
            raise report.error(f"has targets of shape {y.shape[1:]}; expected {tuple(output_shape)} "
                               f"like the output layer", key)
    dtype = np.dtype(backend.float_type())
    _beyond(y, dtype, stats, report, key)
    _fits_converted(y, dtype, report, key)
    return y.astype(dtype, copy=False)


def load(spec: Spec, role: str, network: Network, file: str | Path | None = None) -> Dataset:
    """Load and check the ``role`` data (train, validation, test) of the spec, or ``file``: the
    array of every input and every output, each against the network, all of the same length.
    Several files (a list, a glob) are one data set, its rows in the order of the files
    (:func:`data_files`): their headers are compared first (the same keys, dtypes and example
    shapes as the first file's), then each file is checked as one file is.

    Raises :class:`SpecError` located at the spec line naming the file (or at the file itself
    when it was given on the command line), one issue per problem: every array present is
    checked, whatever is wrong with the others.
    """
    shards = data_files(spec, role) if file is None else \
        [(Path(file), _Reporter(None, ("data",), display_path(Path(file))))]
    if len(shards) == 1:
        target, report = shards[0]
        xs, ys = _checked(network, target, report, with_targets=True)
        return Dataset(xs, ys, display_path(target))
    _same_headers(network, shards)
    parts = [_checked(network, target, report, with_targets=True) for target, report in shards]
    sources = f"{display_path(shards[0][0])} and {len(shards) - 1} more"
    return Dataset([Rows([p[0][i] for p in parts]) for i in range(len(parts[0][0]))],
                   [Rows([p[1][i] for p in parts]) for i in range(len(parts[0][1]))], sources)


#: The environment variable that bounds the data sets read into memory, in bytes.
IN_MEMORY_ENV = "NETBUILD_IN_MEMORY_MAX"
#: The largest data set (all its arrays) read into memory when its files would be mapped.
IN_MEMORY_MAX = 256 * 2**20


def in_memory_max() -> int:
    """``NETBUILD_IN_MEMORY_MAX`` (bytes; 0: map every file) if set, else :data:`IN_MEMORY_MAX`."""
    value = os.environ.get(IN_MEMORY_ENV, "").strip()
    if not value:
        return IN_MEMORY_MAX
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0:
        raise UsageError(f"{IN_MEMORY_ENV}={value!r}: expected a whole number of bytes, at least "
                         "0 (0: memory-map every data file)")
    return n


def in_memory(dataset: Dataset) -> Dataset:
    """A training or validation set with its arrays read into memory where its files would be
    mapped (stored .npz members, or several files), as many as fit together in
    :func:`in_memory_max` bytes and the memory budget (:func:`netbuild.npz.budget`), the smallest
    first: a small data set whole, and of a large one its small arrays (class ids next to
    gigabytes of inputs); the others stay as they are. What is in memory is read once instead of
    on every batch: a copy from the process's memory is cheaper than a read from the kernel's
    cache (4 MiB: 0.19 ms against 0.27 ms here), and a batch of targets read from several files
    cost its planning and reads (about 50 us a batch) for a few kilobytes."""
    bound = in_memory_max()  # a bad NETBUILD_IN_MEMORY_MAX is an error whatever the files
    if not dataset.mapped:
        return dataset
    budget = npz.budget()
    arrays = dataset.xs + dataset.ys
    # the arrays already in memory (decompressed members) count against the bound too
    room = (bound if budget is None else min(bound, budget)) - sum(
        int(a.nbytes) for a in arrays if not from_files(a))
    chosen = set()
    for k in sorted((k for k, a in enumerate(arrays) if from_files(a)),
                    key=lambda k: int(arrays[k].nbytes)):
        if int(arrays[k].nbytes) > room:
            break
        room -= int(arrays[k].nbytes)
        chosen.add(k)
    if not chosen:
        return dataset
    copies = [np.array(a) if k in chosen else a for k, a in enumerate(arrays)]
    release(Dataset([a for k, a in enumerate(arrays) if k in chosen], [], dataset.source))
    n = len(dataset.xs)
    return Dataset(copies[:n], copies[n:], dataset.source)


def data_files(spec: Spec, role: str) -> list[tuple[Path, _Reporter]]:
    """The files of ``data.<role>`` and the reporter of each: one file, a glob (its files sorted
    by name) or a list of files and globs, in that order. A glob that matches no file, or a
    file named twice, is a located error."""
    import glob

    value = spec.data["data"][role]
    entries = [(value, ("data", role))] if isinstance(value, str) else \
        [(v, ("data", role, i)) for i, v in enumerate(value)]
    out, seen, issues = [], {}, []
    for entry, path in entries:
        where = spec.locate(path)
        if any(c in entry for c in "*?["):
            pattern = str(Path(entry).expanduser() if Path(entry).expanduser().is_absolute()
                          else spec.base_dir / Path(entry).expanduser())
            matched = sorted(glob.glob(pattern))
            if not matched:
                issues.append(Issue(where, path, f"{entry}: no file matches this pattern; expected "
                                                 "at least one .npz file (or folder of .npy files)"))
            files = [real_path(m) for m in matched]
        else:
            files = [resolve_path(spec, entry)]
        for target in files:
            if target in seen:
                issues.append(Issue(where, path, f"{display_path(target)}: is already "
                                                 f"{format_path(seen[target])}'s; expected each "
                                                 "file once"))
                continue
            seen[target] = path
            out.append((target, _Reporter(where, path, display_path(target))))
    if issues:
        raise SpecError(issues)
    return out


def _same_headers(network: Network, shards: list[tuple[Path, _Reporter]]) -> None:
    """The files of one data set hold the same keys, each with the dtype and example shape of
    the first file's: read from their headers alone (:mod:`netbuild.npz`), no data."""
    keys = list(dict.fromkeys([i.key for i in network.signature.inputs] +
                              [o.key for o in network.signature.outputs]))
    first: dict | None = None
    errors: list[NetbuildError] = []
    for target, report in shards:
        try:
            heads = _headers(target, keys, report)
        except NetbuildError as exc:
            errors.append(exc)
            continue
        if first is None:
            first, first_file = heads, display_path(target)
            continue
        for key in keys:
            (dtype, shape), (want_dtype, want_shape) = heads[key], first[key]
            if dtype != want_dtype or shape != want_shape:
                got = f"{dtype} examples of shape {shape}"
                errors.append(report.error(f"holds {got}; expected {want_dtype} examples of shape "
                                           f"{want_shape}, as in {first_file}, the data set's first "
                                           "file", key))
    if errors:
        raise _joined(errors)


def _headers(target: Path, keys: list[str], report: _Reporter) -> dict[str, tuple]:
    """``{key: (dtype, example shape)}`` of a file's members (or a folder's ``.npy`` files),
    from their headers."""
    if is_folder(target):
        return {key: (m.dtype, m.shape[1:])
                for key, (m, _, _) in _npy_members(target, keys, report, None).items()}
    problem = not_a_regular_file(target) or not_npz(target)
    if problem:
        raise report.error(problem)
    try:
        with np.load(target, allow_pickle=False) as archive:
            missing = _missing(keys, list(archive.files), report)
            if missing:
                raise _joined(missing)
            out = {}
            for key in keys:
                m = npz.member(target, archive.zip, key)
                out[key] = (m.dtype, m.shape[1:])
            return out
    except npz.MemberError as exc:
        raise report.error(str(exc)) from None
    except NetbuildError:
        raise
    except Exception as exc:
        raise report.error(f"is not a readable .npz archive ({exc}); expected an .npz archive "
                           f"with the keys {', '.join(repr(k) for k in keys)}") from None


class Rows:
    """The rows of several arrays (the files of one data set) as one array along the first axis,
    without copying them: indexing with integers, index arrays or slices gathers the rows asked
    for from each part (memory-mapped parts read only those)."""

    def __init__(self, parts: list[np.ndarray]):
        self.parts = parts
        self.starts = np.cumsum([0] + [len(p) for p in parts])
        self.dtype = parts[0].dtype
        self.shape = (int(self.starts[-1]), *parts[0].shape[1:])
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    @functools.cached_property
    def sources(self) -> list:
        """Each part's :class:`FileRows`, or None for a part in memory: found once, not on every
        batch."""
        return [_file_rows(p) for p in self.parts]

    def __array__(self, dtype=None, copy=None):
        whole = np.concatenate(self.parts)
        return whole if dtype is None else whole.astype(dtype)

    def __getitem__(self, index):
        if isinstance(index, slice):
            index = np.arange(*index.indices(len(self)))
        index = np.asarray(index)
        if index.ndim == 0:
            part = int(np.searchsorted(self.starts, index, side="right")) - 1
            return self.parts[part][int(index) - self.starts[part]]
        reads = file_reads(self, index)
        if reads is not None:
            return reads.read()
        index = np.where(index < 0, index + len(self), index)
        which = np.searchsorted(self.starts, index, side="right") - 1
        out = np.empty((len(index), *self.shape[1:]), self.dtype)
        for part in np.unique(which):
            rows = which == part
            out[rows] = gather(self.parts[part], index[rows] - self.starts[part])
        return out


class FileReads:
    """How to read ``array[index]`` (a batch) from the files an array's rows lie in: one
    ``pread`` per run of consecutive rows in one file (``train.shuffle_block``; single shuffled
    rows one each), in the files' order, into the batch. The files' pages are copied without
    being mapped into the process, so nothing stays resident. (Gathered from the map instead, the
    kernel maps the whole large folio around each row touched: one batch of 1024 shuffled rows
    of 4 KiB mapped 884 MiB of a 1 GiB file.) A batch that is one run of aligned rows is read in
    place instead (:meth:`view`). Made once per batch, for :meth:`announce` and then
    :meth:`view` or :meth:`read`."""

    #: Runs per row of a batch, at most, for :meth:`announce` to tell the kernel about them (one
    #: call per run): batches of single shuffled rows are not announced.
    MOST_RUNS_PER_ROW = 1 / 8

    def __init__(self, shape: tuple, dtype, files: list, runs: tuple):
        self.shape, self.dtype = shape, dtype
        self.files = files  # per file: FileRows
        self.fds = [f.file.fileno() for f in files]
        self.runs = runs  # per run: file number, position in it, bytes, position in the batch
        self.cached = False  # set by read(cached_first=True)

    @property
    def announced(self) -> bool:
        """Whether :meth:`announce` tells the kernel of these runs: not for single shuffled rows
        (a call per row), nor where there is no ``posix_fadvise``."""
        return hasattr(os, "posix_fadvise") and len(self.runs[0]) <= self.shape[0] * self.MOST_RUNS_PER_ROW

    def announce(self) -> None:
        """Tell the kernel that these rows will be read soon (``posix_fadvise(WILLNEED)``, one
        call per run): it starts reading them from the disk into its cache, without this process
        waiting, so that :meth:`read` copies them from memory (the bench MLP on 2 GiB of blocks
        of 1024 rows from a cold cache: 228-239K samples/s announced, 130-164K not)."""
        if not self.announced:
            return
        file, at, size, _ = self.runs
        for k, offset, n in zip(file, at, size):
            try:
                os.posix_fadvise(self.fds[k], offset, n, os.POSIX_FADV_WILLNEED)
            except OSError:
                return

    def read(self, cached_first: bool = False) -> np.ndarray:
        """The batch. With ``cached_first``, the runs are read from what the kernel has in its
        cache alone (``RWF_NOWAIT``) until one is not all there; that one's rest and the runs
        after it are read as usual. :attr:`cached` then says whether the cache held all of the
        batch (:class:`Announcing` decides from that whether to announce)."""
        out = np.empty(self.shape, self.dtype)
        view = memoryview(out.reshape(-1).view(np.uint8))
        nowait = _NOWAIT if cached_first else 0
        self.cached = bool(nowait)
        for k, offset, n, to in zip(*self.runs):
            done = 0
            while done < n:
                try:
                    got = os.preadv(self.fds[k], [view[to + done:to + n]], offset + done,
                                    *((nowait,) if nowait else ()))
                except BlockingIOError:  # RWF_NOWAIT: not in the cache
                    got = 0
                except OSError as exc:  # the disk, or a network file system, failed
                    if nowait and exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                        _no_nowait()  # this kernel or file system reads no other way
                        got = 0
                    else:
                        raise DataError(f"{self._row(k, offset + done)} ({exc.strerror or exc}); "
                                        "expected a readable data file") from None
                if nowait and got < n - done:  # the rest is not in the cache (or the file ends)
                    self.cached = nowait = False
                    done += max(got, 0)
                    continue
                if got <= 0:  # the file was cut short since it was checked
                    raise DataError(self._row(k, offset + done, "ends before row") +
                                    ", which it held when it was checked; expected the data files "
                                    "to stay as they are while netbuild reads them")
                done += got
        return out

    def view(self) -> np.ndarray | None:
        """The batch as a read-only view of its file's map, without a copy, when it is one run of
        rows of one file that lie aligned for their dtype (:func:`rows_view`: an archive written
        by :func:`netbuild.npz.savez`; ``numpy.savez`` puts a member's data where its name
        leaves it, mostly unaligned); else None. The step then reads the rows from the kernel's
        cache itself, and its pages stay mapped until :func:`release`.

        A file cut short since it was checked is a :class:`DataError` here, where touching the
        missing rows would end the process (``SIGBUS``). That is looked at when the view is made:
        a file cut short while a step reads it, or a disk that fails under the map, still ends
        the process (:meth:`read` would say so in a line)."""
        file, at, size, _ = self.runs
        if len(file) != 1:
            return None
        source = self.files[file[0]]
        first = (at[0] - source.start) // source.row_bytes
        view = rows_view(source.rows, first, size[0] // source.row_bytes)
        if view is None:
            return None
        held = os.fstat(self.fds[file[0]]).st_size
        if held < at[0] + size[0]:
            whole = max(held - source.start, 0) // source.row_bytes  # rows the file still holds
            missing = max(at[0], source.start + whole * source.row_bytes)  # the first one it does not
            raise DataError(self._row(file[0], missing, "ends before row") +
                            ", which it held when it was checked; expected the data files to stay "
                            "as they are while netbuild reads them")
        return view

    def in_cache(self) -> bool:
        """Whether the kernel's cache holds the batch's runs, as far as the first and last byte of
        each tell (one-byte ``RWF_NOWAIT`` reads): for :class:`Announcing`, where a :meth:`view`
        reads nothing itself. Announced runs are read in from the disk as a whole."""
        probe = bytearray(1)
        for k, offset, n, _ in zip(*self.runs):
            for at in (offset, offset + n - 1):
                try:
                    if os.preadv(self.fds[k], [probe], at, _NOWAIT) != 1:
                        return False
                except OSError as exc:  # BlockingIOError: not in the cache
                    if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                        _no_nowait()
                    return False
        return True

    def _row(self, k: int, at: int, what: str = "cannot read row") -> str:
        """``<file>: <what> <row>`` for the row of file ``k`` at byte ``at``."""
        f = self.files[k]
        return f"{f.file.name}: {what} {(at - f.start) // f.row_bytes}"


#: ``os.RWF_NOWAIT`` (Linux): a read that takes only what is in the kernel's cache; 0 where
#: there is none, or once a read with it has been refused.
_NOWAIT = getattr(os, "RWF_NOWAIT", 0)


def _no_nowait() -> None:
    global _NOWAIT
    _NOWAIT = 0


class Announcing:
    """Whether to announce a batch's runs to the kernel (:meth:`FileReads.announce`): while
    reads find rows missing from its cache. The announcement costs a walk of the kernel's cache
    (60 us per 4 MiB here, a fifth of the read itself) that finds nothing to do when the files
    are in it, as in every epoch after the first on a machine that holds them. So it stops
    after ``needed`` batches in a row were all in the cache, and starts again at the first read
    that was not, with ``needed`` doubled: on files that are not in the cache, the reads that
    find out (each a wait for the disk) become rarer each time."""

    #: Batches read from the cache in a row before announcing stops, at first.
    FIRST_NEEDED = 8
    MOST_NEEDED = 4096

    def __init__(self):
        self.on, self.hits, self.needed = True, 0, self.FIRST_NEEDED

    def saw(self, cached: bool) -> bool:
        """A batch was read; ``cached``: all of it from the kernel's cache. Whether announcing
        starts again with it (the batches planned but not announced are then announced at once:
        those would wait for the disk too)."""
        if cached:
            self.hits += 1
            if self.on and self.hits >= self.needed:
                self.on = False
            return False
        self.hits = 0
        if self.on:
            return False
        self.on, self.needed = True, min(2 * self.needed, self.MOST_NEEDED)
        return True


def reads_files(array) -> bool:
    """Whether :func:`file_reads` reads the rows of ``array`` from its files."""
    sources = _sources(array)
    return bool(sources) and None not in sources


def _sources(array) -> list:
    return array.sources if isinstance(array, Rows) else [_file_rows(array)]


def file_reads(array, index) -> FileReads | None:
    """The :class:`FileReads` of ``array[index]`` for an array whose rows lie in memory-mapped
    files (:func:`_file_rows`; or :class:`Rows` of such arrays) and a 1-D integer index in range
    (negative values counted from the end); None for anything else, which numpy indexes (its
    errors name what was asked for)."""
    sources = _sources(array)
    asked = np.asarray(index)
    if None in sources or asked.ndim != 1 or not len(asked) or asked.dtype.kind not in "iu":
        return None
    n = len(array)
    first = run_start(asked)
    if first is not None and first + len(asked) <= n:  # one run (a batch of one shuffle block)
        k = _part_of(array, first)
        start, stop = (int(array.starts[k]), int(array.starts[k + 1])) if isinstance(array, Rows) else (0, n)
        if first + len(asked) <= stop:  # in one file: its run planned without the general case's work
            f = sources[k]
            runs = ([k], [f.start + (first - start) * f.row_bytes], [len(asked) * f.row_bytes], [0])
            return FileReads((len(asked), *array.shape[1:]), array.dtype, sources, runs)
    low, high = int(asked.min()), int(asked.max())
    if low < -n or high >= n:
        return None
    index = (np.where(asked < 0, asked + n, asked) if low < 0 else asked).astype(np.int64, copy=False)
    row_bytes = sources[0].row_bytes
    # the runs of consecutive rows, from the breaks of the index alone (a batch of blocks is a
    # run or two: the work per batch is in the runs, not the rows)
    firsts = np.flatnonzero(np.diff(index) != 1) + 1
    firsts = np.concatenate(([0], firsts)).astype(np.int64)
    ends = np.append(firsts[1:], len(index))  # past each run's last position in the batch
    first_row = index[firsts]
    if len(sources) == 1:
        part = np.zeros(len(firsts), np.int64)
    else:  # a run that crosses from one file to the next is cut where it does
        starts = array.starts
        part = np.searchsorted(starts, first_row, side="right") - 1
        last = np.searchsorted(starts, first_row + (ends - firsts) - 1, side="right") - 1
        if np.any(last != part):
            crossings = [firsts[r] + starts[p] - first_row[r]
                         for r in np.flatnonzero(last != part) for p in range(part[r] + 1, last[r] + 1)]
            cut = np.unique(np.concatenate([firsts, np.array(crossings, np.int64)]))
            firsts, ends = cut, np.append(cut[1:], len(index))
            first_row = index[firsts]
            part = np.searchsorted(starts, first_row, side="right") - 1
        first_row = first_row - starts[part]
    file_start = np.array([f.start for f in sources], np.int64)
    at = file_start[part] + first_row * row_bytes
    size = (ends - firsts) * row_bytes
    order = np.lexsort((at, part)) if len(part) > 1 else slice(None)  # each file's runs in order
    runs = tuple(v[order].tolist() for v in (part, at, size, firsts * row_bytes))
    return FileReads((len(index), *array.shape[1:]), array.dtype, sources, runs)


def gather(array, index: np.ndarray) -> np.ndarray:
    """``array[index]`` for a batch's index array: read from the files (:class:`FileReads`)
    when the array's rows lie in memory-mapped files; a view (:func:`consecutive`) when they are
    consecutive rows in memory; else indexed as it is."""
    reads = file_reads(array, index)
    return _indexed(array, index) if reads is None else reads.read()


def _indexed(array, index) -> np.ndarray:
    """``array[index]`` of an array not read from files: a view (:func:`consecutive`) when the
    index is consecutive rows, else indexed as it is."""
    view = consecutive(array, index)
    return array[index] if view is None else view


def run_start(index: np.ndarray) -> int | None:
    """The first row of ``index`` (a 1-D integer array) when it is consecutive rows from there on
    (a batch within one block of ``train.shuffle_block``, or of an unshuffled pass), else None."""
    if index.ndim != 1 or not len(index) or index.dtype.kind not in "iu":
        return None
    first = int(index[0])
    if first < 0 or int(index[-1]) != first + len(index) - 1:
        return None
    if len(index) > 2 and not (np.diff(index) == 1).all():
        return None
    return first


def consecutive(array, index) -> np.ndarray | None:
    """``array[index]`` as a read-only view of ``array``, no copy, where ``index`` is consecutive
    rows (:func:`run_start`) in range of an array that can be viewed so (:func:`rows_view`);
    else None."""
    if not isinstance(array, np.ndarray) or array.ndim == 0:
        return None
    index = np.asarray(index)
    first = run_start(index)
    if first is None or first + len(index) > len(array):
        return None
    return rows_view(array, first, len(index))


def rows_view(array: np.ndarray, first: int, n: int) -> np.ndarray | None:
    """Rows ``first`` to ``first + n`` of ``array`` as a read-only ``numpy.ndarray`` view, where
    the array is C-contiguous and aligned, else None. Aligned: PyTensor's C code refuses an
    unaligned array. C-contiguous: a strided view (of a Fortran-ordered array, say) would take
    another path through BLAS than the copy it replaces, and give other bits."""
    if not (array.flags.c_contiguous and array.flags.aligned):
        return None
    view = array[first:first + n].view(np.ndarray)
    view.flags.writeable = False
    return view


def _part_of(array, row: int) -> int:
    """The part (file) of a :class:`Rows` that holds ``row``; 0 for an array of one part."""
    return int(np.searchsorted(array.starts, row, side="right")) - 1 if isinstance(array, Rows) else 0


class FileRows(NamedTuple):
    """Where the rows of an array lie in a file mapped by :func:`netbuild.npz.mapped`."""

    file: npz.Reader  # the file, open
    start: int  # the position of row 0 in it
    row_bytes: int
    rows: np.ndarray  # the array (C-contiguous): views of its rows read the map


def _file_rows(array) -> FileRows | None:
    """The :class:`FileRows` of a C-contiguous array whose rows lie in a file mapped by
    :func:`netbuild.npz.mapped`, else None."""
    if not isinstance(array, np.ndarray) or array.ndim == 0 or not array.flags.c_contiguous:
        return None
    mm = array
    while mm is not None and getattr(mm, "reader", None) is None:
        mm = mm.base if isinstance(mm, np.ndarray) else None
    if mm is None or not mm.flags.c_contiguous:
        return None
    start = mm.offset + (array.__array_interface__["data"][0] - mm.__array_interface__["data"][0])
    return FileRows(mm.reader, start, array.itemsize * math.prod(array.shape[1:]), array)


def load_inputs(file: str | Path, spec: Spec, network: Network) -> list[np.ndarray]:
    """Only the inputs of ``file`` (for ``predict``), each checked against its input, all of
    the same length."""
    target = Path(file)
    return _checked(network, target, _Reporter(None, ("data",), display_path(target)),
                    with_targets=False)[0]


def _checked(network: Network, target: Path, report: _Reporter,
             with_targets: bool) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The file's arrays of every input (and output), each checked; every problem reported."""
    inputs = network.signature.inputs
    outputs = network.signature.outputs if with_targets else []
    errors: list[NetbuildError] = []
    by_key, cache = _open_arrays(target, list(dict.fromkeys([i.key for i in inputs] +
                                                            [o.key for o in outputs])), report, errors)
    try:
        return _checked_arrays(network, report, by_key, errors, inputs, outputs, {
            k: functools.cache(lambda k=k: cache.stats(k, by_key[k], f"{display_path(target)} '{k}'"))
            for k in by_key})
    finally:
        cache.save()


def _checked_arrays(network: Network, report: _Reporter, by_key: dict, errors: list,
                    inputs: list, outputs: list, stats: dict):
    before = len(errors)
    xs = _each(errors, [lambda i=i: prepare_x(by_key[i.key], network, report, i.key, i.name,
                                              stats[i.key])
                        if i.key in by_key else None for i in inputs])
    present = [(x, i.key) for x, i in zip(xs, inputs) if x is not None]
    for x, key in present[1:]:
        if len(x) != len(present[0][0]):
            errors.append(report.error(f"holds {len(x)} examples; expected {len(present[0][0])}, "
                                       f"as many as '{present[0][1]}'", key))
    # the targets are checked against the inputs' length, once the inputs present are valid
    n = len(present[0][0]) if present and len(errors) == before else None
    ys = _each(errors, [lambda o=o: prepare_y(by_key[o.key], n,
                                              network.nodes[network.outputs[o.name]].output_shape,
                                              losses.name_of(o.loss), report, o.key, stats[o.key])
                        if o.key in by_key and n is not None else None for o in outputs])
    if errors:
        raise _joined(errors)
    return xs, ys


def _each(errors: list, checks: list) -> list:
    """Each check's result; a check's error is added to ``errors`` (its result is None)."""
    results = []
    for run in checks:
        try:
            results.append(run())
        except NetbuildError as exc:
            errors.append(exc)
            results.append(None)
    return results


@dataclass
class Datasets:
    """What training reads: the training data and the validation data (or None)."""

    train: Dataset
    validation: Dataset | None = None


def load_datasets(spec: Spec, network: Network, into_memory: bool = True) -> Datasets:
    """The training data and the validation data (a file, a split, or none); with
    ``into_memory`` (training: every epoch reads them again), each read into memory when it is
    small (:func:`in_memory`)."""
    cfg = spec.data["data"]
    keep = in_memory if into_memory else (lambda dataset: dataset)
    train = load(spec, "train", network)
    if cfg.get("validation"):
        return Datasets(keep(train), keep(load(spec, "validation", network)))
    fraction = float(cfg.get("validation_split", 0.0))
    try:  # a split copies into memory itself
        train, validation = split(train, fraction, int(spec.data.get("seed", 0)))
    except ValueError as exc:
        raise spec.error(("data", "validation_split"), str(exc)) from None
    return Datasets(keep(train), validation and keep(validation))


def split(data: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset | None]:
    """A seeded random ``fraction`` of ``data`` held out: ``(train, validation)``."""
    if not fraction:
        return data, None
    n = len(data)
    n_val = max(1, int(round(n * fraction)))
    if n_val >= n:
        raise ValueError(f"validation_split {fraction} leaves no training data from {n} examples")
    need, limit = sum(a.nbytes for a in data.xs + data.ys), npz.budget()
    if data.mapped and limit is not None and need > limit:
        raise ValueError(f"holding out a validation split copies the data set into memory "
                         f"({npz.size_text(need)}), more than the {npz.size_text(limit)} netbuild "
                         "may take (half of what is available); expected data.validation files "
                         "instead")
    order = np.random.default_rng(seed).permutation(n)
    return (data.take(np.sort(order[n_val:])),
            data.take(np.sort(order[:n_val]), f"{data.source} (validation split)"))


def _mappings(array) -> list:
    """The memory maps (``mmap.mmap``) an array's values lie in: its own, its parts' (Rows)."""
    if isinstance(array, Rows):
        return [m for part in array.parts for m in _mappings(part)]
    while array is not None and not isinstance(array, np.memmap):
        array = getattr(array, "base", None)
    found = getattr(array, "_mmap", None)
    return [found] if found is not None else []


def kept(array: np.ndarray) -> np.ndarray:
    """``array``, or a copy of it where its values lie in a file's map (a batch read in place,
    :meth:`FileReads.view`): for what outlives its step, such as the targets an epoch's metrics
    are computed from, which would end the process if their file were cut short since."""
    return array.copy() if _mappings(array) else array


def from_files(array) -> bool:
    """Whether ``array``'s rows lie in files: memory-mapped, or the parts of several files."""
    return isinstance(array, Rows) or bool(_mappings(array))


def release(dataset: "Dataset") -> None:
    """Drop the pages of the dataset's memory-mapped files from this process (the kernel keeps
    them cached): a pass over a file larger than memory stays in bounded resident memory."""
    _release([m for a in dataset.xs + dataset.ys for m in _mappings(a)])


def _release(maps: list) -> None:
    for m in {id(m): m for m in maps}.values():
        try:
            m.madvise(mmap.MADV_DONTNEED)
        except (AttributeError, OSError, ValueError):  # no madvise here, or a closed map
            pass


def prefetched(dataset: "Dataset", indices, ahead: int = 2) -> Iterator[tuple[np.ndarray, list]]:
    """``(index, batch arrays)`` for each index array of ``indices``, in order: the same arrays
    as ``dataset.batch(index)``. The rows of memory-mapped files are announced to the kernel
    ``ahead`` batches before they are read (:meth:`FileReads.announce`), so that a file not in its
    cache is read from the disk while the steps before compute, and then copied when asked for
    (:meth:`FileReads.read`), on the caller's thread, or given as a view of the map when the
    batch is one run of aligned rows (:meth:`FileReads.view`; its pages, mapped as the step reads
    them, are let go with the others every :data:`RELEASE_EVERY` bytes).

    Announcing stops while batches are found in the kernel's cache and starts again when one is
    not (:class:`Announcing`).

    Not on a thread of its own: the copy is short next to a step, and a reader thread takes a
    core from a step that computes on all of them (the bench's MLP on 1 GiB of memory-mapped
    blocks of 1024 rows, 2 threads: 412-439K samples/s with a thread gathering two batches
    ahead, 561-636K without; glibc's POSIX AIO threads, reading without the GIL, were no faster
    than this loop either)."""
    import collections

    if not dataset.mapped:
        for idx in indices:
            yield idx, dataset.batch(idx)
        return
    arrays = dataset.xs + dataset.ys
    through_map = [from_files(a) for a in arrays]
    announced: collections.deque = collections.deque()
    announcing = Announcing()
    gathered = 0

    def announce(reads):
        for r in reads:
            if r is not None:
                r.announce()

    def read(idx, reads):
        nonlocal gathered
        batch, cached = [], None
        for a, r, mapped in zip(arrays, reads, through_map):
            hit = None  # whether the kernel's cache held the rows, where that is asked
            if r is None:  # planned above: not read from files
                batch.append(_indexed(a, idx))
                if mapped:  # pages that indexing a map mapped: dropped every RELEASE_EVERY
                    gathered += batch[-1].nbytes
            elif (view := r.view()) is not None:
                batch.append(view)
                gathered += view.nbytes + 2 * MAPPED_AROUND  # mapped as the step reads them
                if r.announced and _NOWAIT:
                    hit = r.in_cache()
            elif r.announced and _NOWAIT:
                batch.append(r.read(cached_first=True))
                hit = r.cached
            else:
                batch.append(r.read())
            if hit is not None:
                cached = hit and cached is not False
        if cached is not None and announcing.saw(cached):
            for _, planned in announced:
                announce(planned)
        if gathered >= RELEASE_EVERY:
            release(dataset)
            gathered = 0
        return idx, batch

    try:
        for idx in indices:
            reads = [file_reads(a, idx) for a in arrays]
            if announcing.on:
                announce(reads)
            announced.append((idx, reads))
            if len(announced) > ahead:
                yield read(*announced.popleft())
        while announced:
            yield read(*announced.popleft())
    finally:
        release(dataset)


def batches(n: int, batch_size: int, order: np.ndarray | None = None) -> Iterator[np.ndarray]:
    """Index arrays of at most ``batch_size``, in ``order`` (default: as stored)."""
    idx = np.arange(n) if order is None else order
    for start in range(0, n, batch_size):
        yield idx[start:start + batch_size]


def run_batches(fn, dataset: Dataset, batch_size: int) -> "Results":
    """The mean losses, all outputs and masks of ``fn`` (a :class:`netbuild.compile.Compiled`)
    over a dataset."""
    parts = [fn(*arrays) for _, arrays in prefetched(dataset, batches(len(dataset), batch_size))]
    return Results.join(parts, len(dataset))


@dataclass
class Results:
    """What a compiled step or evaluation gives for a batch, or a dataset (:meth:`join`): the
    loss (the weighted total), each output's loss (long form only, by output name), each
    output's values and mask (a masked sequence output's, else None), by output name. Losses
    are sums over the examples until :meth:`join` divides them."""

    loss: float
    losses: dict[str, float]
    outputs: dict[str, np.ndarray]
    masks: dict[str, np.ndarray | None]

    @classmethod
    def join(cls, parts: list["Results"], n: int) -> "Results":
        first = parts[0]
        return cls(sum(p.loss for p in parts) / n,
                   {k: sum(p.losses[k] for p in parts) / n for k in first.losses},
                   {k: np.concatenate([p.outputs[k] for p in parts]) for k in first.outputs},
                   {k: None if first.masks[k] is None else np.concatenate([p.masks[k] for p in parts])
                    for k in first.masks})


def epoch_order(n: int, seed: int, epoch: int, block: int = 1) -> np.ndarray:
    """The shuffled order of epoch ``epoch``: a function of the seed, the epoch and ``block``
    alone, whatever files the rows are in. With ``block`` > 1, the whole blocks of ``block``
    consecutive rows are permuted, each keeping its rows in order, and the rows after the last
    whole block (fewer than ``block``) come last, in order: with a block of a multiple of the
    batch size every batch but the last is consecutive rows (read in place where they can be,
    :meth:`FileReads.view`), which a short block placed among the others would shift."""
    rng = np.random.default_rng([seed, epoch])
    if block <= 1:
        return rng.permutation(n)
    whole = n // block
    starts = rng.permutation(whole) * block
    return np.concatenate([(starts[:, None] + np.arange(block)).ravel(),
                           np.arange(whole * block, n)])
