"""Run directories and model files: atomic writes, never overwriting what a user made.

A run directory holds ``spec.yaml`` (the resolved spec), ``metrics.jsonl`` (one JSON object per
epoch) and ``model.npz`` (parameters under ``<layer name>/<param>`` plus the resolved spec under
``__spec__``, loadable with ``numpy.load(..., allow_pickle=False)``). Every file is written to a
temporary file in the same folder and renamed over the old one, so a run killed at any instant
leaves the previous complete file in place.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from . import __version__
from .errors import RunError
from .spec import Spec

SPEC_KEY = "__spec__"
VERSION_KEY = "__netbuild_version__"
MODEL_FILE = "model.npz"
SPEC_FILE = "spec.yaml"
METRICS_FILE = "metrics.jsonl"


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename (fsynced)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An uncompressed .npz archive of ``arrays`` in memory."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def resolved_spec_data(spec: Spec) -> dict:
    """The spec's data with every data path made absolute, so the run can be used from anywhere."""
    data = json.loads(json.dumps(spec.data))
    for role in ("train", "validation", "test"):
        value = data.get("data", {}).get(role)
        if value:
            path = Path(value).expanduser()
            data["data"][role] = str(path if path.is_absolute() else (spec.base_dir / path).resolve())
    return data


def model_arrays(spec: Spec, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    arrays = dict(params)
    arrays[SPEC_KEY] = np.array(json.dumps(resolved_spec_data(spec)))
    arrays[VERSION_KEY] = np.array(__version__)
    return arrays


def save_model(path: Path, spec: Spec, params: dict[str, np.ndarray]) -> None:
    """Write a self-contained ``model.npz``: parameters plus the resolved spec."""
    atomic_write(Path(path), npz_bytes(model_arrays(spec, params)))


def load_model(target: str | os.PathLike) -> tuple[Spec, dict[str, np.ndarray]]:
    """The spec and parameters of a run directory or a ``model.npz``. Raises :class:`RunError`."""
    target = Path(target)
    file = target / MODEL_FILE if target.is_dir() else target
    if not file.exists():
        if target.is_dir():
            raise RunError(f"{target}: no {MODEL_FILE} in this folder; expected a run directory "
                           "written by `netbuild train` or a model.npz file")
        raise RunError(f"{target}: not found; expected a run directory or a model.npz file")
    try:
        with np.load(file, allow_pickle=False) as archive:
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise RunError(f"{file}: a single .npy array; expected a model.npz written by netbuild")
            if SPEC_KEY not in archive.files:
                raise RunError(f"{file}: no '{SPEC_KEY}' entry; expected a model.npz written by "
                               "netbuild (its keys are: " + ", ".join(archive.files[:10]) + ")")
            spec_text = str(archive[SPEC_KEY])
            params = {k: archive[k] for k in archive.files if not k.startswith("__")}
    except RunError:
        raise
    except (zipfile.BadZipFile, EOFError, ValueError, OSError) as exc:
        raise RunError(f"{file}: not a readable model file ({exc})") from None
    try:
        data = json.loads(spec_text)
    except json.JSONDecodeError as exc:
        raise RunError(f"{file}: the stored spec is not valid JSON ({exc})") from None
    return Spec(data, str(file), file.resolve().parent), params


class RunDir:
    """A run directory being written by ``netbuild train``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.records: list[dict[str, Any]] = []

    def create(self, overwrite: bool = False) -> None:
        """Make the folder; refuse one that already holds files unless ``overwrite``."""
        if self.path.exists() and not self.path.is_dir():
            raise RunError(f"{self.path}: exists and is not a folder; expected a run directory")
        if self.path.is_dir() and any(self.path.iterdir()) and not overwrite:
            raise RunError(f"{self.path}: the run directory already exists; pass --overwrite to "
                           "replace its files or --run-dir to choose another")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunError(f"{self.path}: cannot create the run directory: {exc.strerror}") from None
        for name in (METRICS_FILE,):
            stale = self.path / name
            if stale.exists():
                stale.unlink()

    def write_spec(self, spec: Spec) -> None:
        text = yaml.safe_dump(resolved_spec_data(spec), sort_keys=False, allow_unicode=True)
        atomic_write(self.path / SPEC_FILE, text.encode("utf-8"))

    def append_metrics(self, record: dict[str, Any]) -> None:
        """Add one epoch's record; the whole file is rewritten atomically."""
        self.records.append(record)
        text = "".join(json.dumps(r) + "\n" for r in self.records)
        atomic_write(self.path / METRICS_FILE, text.encode("utf-8"))

    def save_model(self, spec: Spec, params: dict[str, np.ndarray]) -> None:
        save_model(self.path / MODEL_FILE, spec, params)
