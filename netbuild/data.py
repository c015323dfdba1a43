"""Data: .npz loading and validation against the network, splits and batches.

Files are always loaded with ``allow_pickle=False``. Every problem is a located spec error that
names the data file (and key): the position is the spec line that names the file.
"""

from __future__ import annotations

import math
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from . import backend, losses
from .errors import DataError, Issue, Location, NetbuildError, SpecError
from .network import Network
from .spec import Spec


@dataclass
class Dataset:
    """Inputs ``x`` of shape ``(n, *input_shape)`` and targets ``y``; ``source`` names the file."""

    x: np.ndarray
    y: np.ndarray
    source: str

    def __len__(self) -> int:
        return len(self.x)

    def take(self, index: np.ndarray, source: str | None = None) -> "Dataset":
        return Dataset(self.x[index], self.y[index], source or self.source)


def resolve_path(spec: Spec, value: str) -> Path:
    """A data path from the spec: relative paths are relative to the spec's folder."""
    path = Path(value).expanduser()
    return Path(os.path.normpath(path if path.is_absolute() else spec.base_dir / path))


def display_path(path: Path) -> str:
    """``path`` relative to the working folder when it lies below it, else absolute."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(Path(path).resolve())


class _Reporter:
    """Builds located issues for one data file."""

    def __init__(self, where: Location | None, path: tuple, file: str):
        self.where, self.path, self.file = where, path, file

    def error(self, message: str, key: str | None = None) -> NetbuildError:
        what = f"{self.file}: key '{key}': " if key else f"{self.file}: "
        if self.where is None:  # a file named on the command line, not in the spec
            return DataError(what + message)
        return SpecError(Issue(self.where, self.path, what + message))


def open_npz(file: Path) -> np.lib.npyio.NpzFile:
    """An .npz archive opened without pickle; ValueError when the file is not one."""
    if not zipfile.is_zipfile(file):
        raise ValueError("not an .npz archive (a .npy array, text, or damaged)")
    archive = np.load(file, allow_pickle=False)
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError("not an .npz archive")
    return archive


def read_npz(file: Path, x_key: str, y_key: str | None, report: _Reporter) -> tuple[np.ndarray, np.ndarray | None]:
    """The arrays under ``x_key`` (and ``y_key``) of an .npz file, refusing pickled objects."""
    if not file.exists():
        raise report.error("file not found")
    if file.is_dir():
        raise report.error("is a folder; expected an .npz file")
    try:
        with open_npz(file) as archive:
            keys = list(archive.files)
            wanted = [x_key] + ([y_key] if y_key else [])
            for key in wanted:
                if key not in keys:
                    raise report.error(f"no array '{key}' in the file; its keys are: "
                                       f"{', '.join(keys) or '(none)'}")
            arrays = [archive[k] for k in wanted]
    except NetbuildError:
        raise
    except (zipfile.BadZipFile, EOFError) as exc:
        raise report.error(f"not a readable .npz archive ({exc})") from None
    except ValueError as exc:
        if "pickle" in str(exc):
            raise report.error("holds Python objects (pickled arrays), which netbuild never "
                               "loads; expected numeric arrays") from None
        raise report.error(f"{exc}; expected an .npz archive with the key '{x_key}'") from None
    except OSError as exc:
        raise report.error(f"cannot read: {exc.strerror or exc}") from None
    return arrays[0], (arrays[1] if y_key else None)


def prepare_x(x: np.ndarray, network: Network, report: _Reporter, key: str) -> np.ndarray:
    """Check and cast inputs: numeric, finite, shape ``(n, *input_shape)`` or ``(n, prod)``;
    integer ids in range when the network starts with an embedding."""
    input_shape = network.input_shape

    if x.dtype.kind not in "biuf":
        raise report.error(f"has dtype {x.dtype}; expected numbers", key)
    if x.ndim == 0 or len(x) == 0:
        raise report.error(f"is empty (shape {x.shape}); expected at least one example", key)
    per_example = tuple(x.shape[1:])
    if per_example != tuple(input_shape):
        if math.prod(per_example) == math.prod(input_shape):
            x = x.reshape((len(x),) + tuple(input_shape))
        else:
            raise report.error(f"has examples of shape {per_example}; expected "
                               f"{tuple(input_shape)} to fit model.input_shape "
                               f"(or {math.prod(input_shape)} values per example)", key)
    ids = network.integer_input
    if ids is not None:
        if x.dtype.kind not in "iub":
            raise report.error(f"has dtype {x.dtype}; expected integer ids for the embedding", key)
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi >= ids:
            raise report.error(f"holds id {lo if lo < 0 else hi}; expected ids 0..{ids - 1} "
                               f"(the embedding's input_dim is {ids})", key)
        return x.astype(np.int64, copy=False)
    x = x.astype(network.input_dtype, copy=False)
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        bad = int(np.argwhere(~np.isfinite(x.reshape(len(x), -1)).any(axis=1))[0, 0])
        raise report.error(f"holds NaN or infinite values (first in example {bad}); "
                           "expected finite numbers", key)
    return x


def prepare_y(y: np.ndarray, n: int, output_shape: tuple, loss_name: str, report: _Reporter,
              key: str) -> np.ndarray:
    """Check targets against the output layer and the loss; cast them."""
    if y.dtype.kind not in "biuf":
        raise report.error(f"has dtype {y.dtype}; expected numbers", key)
    if y.ndim == 0 or len(y) != n:
        got = "a scalar" if y.ndim == 0 else f"{len(y)} examples"
        raise report.error(f"holds {got}; expected {n}, as many as the inputs", key)
    if y.dtype.kind == "f" and not np.isfinite(y).all():
        raise report.error("holds NaN or infinite values; expected finite numbers", key)
    if loss_name == "binary_crossentropy" and (y.min() < 0 or y.max() > 1):
        bad = y.min() if y.min() < 0 else y.max()
        raise report.error(f"holds {bad:g}; expected targets between 0 and 1 for binary_crossentropy", key)
    if loss_name in losses.CLASS_ID_TARGETS:
        k = output_shape[-1]
        lead = tuple(output_shape[:-1])
        if y.shape[1:] == lead and y.dtype.kind in "biu":  # class ids
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi >= k:
                bad = lo if lo < 0 else hi
                raise report.error(f"holds class id {bad}, outside the output's range; expected "
                                   f"ids 0..{k - 1} for an output of {k} units", key)
            return y.astype(np.int64, copy=False)
        if y.shape[1:] == tuple(output_shape):
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
    return y.astype(backend.float_type(), copy=False)


def load(spec: Spec, role: str, network: Network, file: str | Path | None = None) -> Dataset:
    """Load and check the ``role`` file (train, validation, test) of the spec, or ``file``.

    Raises :class:`SpecError` located at the spec line naming the file (or at the file itself
    when it was given on the command line).
    """
    data = spec.data["data"]
    if file is None:
        path = ("data", role)
        target = resolve_path(spec, data[role])
        where = spec.locate(path)
    else:
        path = ()
        target = Path(file)
        where = None
    report = _Reporter(where, path if file is None else ("data",), display_path(target))
    x_key, y_key = data.get("x_key", "x"), data.get("y_key", "y")
    x, y = read_npz(target, x_key, y_key, report)
    x = prepare_x(x, network, report, x_key)
    y = prepare_y(y, len(x), network.output_shape, losses.name_of(spec.data["train"]["loss"]),
                  report, y_key)
    return Dataset(x, y, display_path(target))


def load_inputs(file: str | Path, spec: Spec, network: Network) -> np.ndarray:
    """Only the inputs of ``file`` (for ``predict``), checked against the input shape."""
    target = Path(file)
    report = _Reporter(None, ("data",), display_path(target))
    x_key = spec.data["data"].get("x_key", "x")
    x, _ = read_npz(target, x_key, None, report)
    return prepare_x(x, network, report, x_key)


def split(data: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset | None]:
    """A seeded random ``fraction`` of ``data`` held out: ``(train, validation)``."""
    if not fraction:
        return data, None
    n = len(data)
    n_val = max(1, int(round(n * fraction)))
    if n_val >= n:
        raise ValueError(f"validation_split {fraction} leaves no training data from {n} examples")
    order = np.random.default_rng(seed).permutation(n)
    return (data.take(np.sort(order[n_val:])),
            data.take(np.sort(order[:n_val]), f"{data.source} (validation split)"))


def batches(n: int, batch_size: int, order: np.ndarray | None = None) -> Iterator[np.ndarray]:
    """Index arrays of at most ``batch_size``, in ``order`` (default: as stored)."""
    idx = np.arange(n) if order is None else order
    for start in range(0, n, batch_size):
        yield idx[start:start + batch_size]


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled order of epoch ``epoch``: a function of the seed and epoch alone."""
    return np.random.default_rng([seed, epoch]).permutation(n)
