"""Run directories and model files: atomic writes, never overwriting what a user made.

A run directory holds ``spec.yaml`` (the resolved spec), ``metrics.jsonl`` (one JSON object per
epoch) and ``model.npz`` (parameters under ``<layer name>/<param>`` plus the resolved spec under
``__spec__``, loadable with ``numpy.load(..., allow_pickle=False)``). Every file is written to a
temporary file in the same folder and renamed over the old one, so a run killed at any instant
leaves the previous complete file in place.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from . import __version__
from .data import open_npz, real_path
from .errors import RunError, printable
from .spec import Spec

SPEC_KEY = "__spec__"
VERSION_KEY = "__netbuild_version__"
STATE_KEY = "__state__"
MODEL_FILE = "model.npz"
CHECKPOINT_FILE = "checkpoint.npz"
SPEC_FILE = "spec.yaml"
METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
#: Where a tracked run is logged (:mod:`netbuild.tracking`), so that a resumed run logs to the same one.
TRACKING_FILE = "tracking.json"
LOCK_FILE = ".lock"


@dataclass
class Checkpoint:
    """Everything a run needs to continue: parameters, optimizer state, the best parameters
    so far (or None), and the loop's state (epoch, generator, schedule, monitors, history)."""

    params: dict[str, np.ndarray]
    optimizer: dict[str, np.ndarray]
    best: dict[str, np.ndarray] | None
    state: dict


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename, the file and then its
    folder fsynced (so that the rename itself survives a power cut)."""
    atomic_write_with(path, lambda f: f.write(data))


def atomic_write_with(path: Path, write) -> None:
    """:func:`atomic_write` of what ``write(f)`` writes into the open temporary file ``f``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual mode
        with os.fdopen(fd, "w+b") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # a folder we may write but not open: the file itself is safe already
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder
        pass
    finally:
        os.close(fd)


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An uncompressed .npz archive of ``arrays`` in memory."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def resolved_spec_data(spec: Spec) -> dict:
    """The spec's data with every data path made absolute, so the run can be used from anywhere."""
    data = json.loads(json.dumps(spec.data))

    def absolute(value: str) -> str:
        path = Path(value).expanduser()
        return str(path if path.is_absolute() else real_path(spec.base_dir / path))

    for role in ("train", "validation", "test"):
        value = data.get("data", {}).get(role)
        if isinstance(value, list):  # files and globs (a glob's folders resolve; its pattern stays)
            data["data"][role] = [absolute(v) for v in value]
        elif value:
            data["data"][role] = absolute(value)
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
    try:
        file = target / MODEL_FILE if target.is_dir() else target
        found = file.exists()
    except OSError as exc:  # a name too long, say
        raise RunError(printable(f"{target}: cannot read: {exc.strerror or exc}")) from None
    if not found:
        if target.is_dir():
            raise RunError(f"{target}: no {MODEL_FILE} in this folder; expected a run directory "
                           "written by `netbuild train` or a model.npz file")
        raise RunError(f"{target}: not found; expected a run directory or a model.npz file")
    try:
        with open_npz(file) as archive:
            if STATE_KEY in archive.files:
                raise RunError(f"{file}: a checkpoint, not a model; expected the run directory or "
                               "its model.npz")
            if SPEC_KEY not in archive.files:
                raise RunError(f"{file}: no '{SPEC_KEY}' entry; expected a model.npz written by "
                               "netbuild (its keys are: " + ", ".join(archive.files[:10]) + ")")
            spec_text = str(archive[SPEC_KEY])
            params = {k: archive[k] for k in archive.files if not k.startswith("__")}
    except RunError:
        raise
    except Exception as exc:  # a damaged archive fails anywhere in zipfile's or numpy's parsing
        raise RunError(printable(f"{file}: not a readable model file ({exc})")) from None
    try:
        data = json.loads(spec_text)
    except json.JSONDecodeError as exc:
        raise RunError(f"{file}: the stored spec is not valid JSON ({exc})") from None
    return Spec(data, str(file), file.resolve().parent), params


def _checkpoint_arrays(spec: Spec, ckpt: Checkpoint) -> dict[str, np.ndarray]:
    arrays = {f"params/{k}": v for k, v in ckpt.params.items()}
    arrays.update({k: v for k, v in ckpt.optimizer.items()})  # keys start with "optimizer/"
    if ckpt.best is not None:
        arrays.update({f"best/{k}": v for k, v in ckpt.best.items()})
    arrays[STATE_KEY] = np.array(json.dumps(ckpt.state))
    arrays[SPEC_KEY] = np.array(json.dumps(resolved_spec_data(spec)))
    arrays[VERSION_KEY] = np.array(__version__)
    return arrays


def load_checkpoint(run_dir: str | os.PathLike) -> tuple[dict, Checkpoint] | None:
    """The resolved spec data and the checkpoint of a run directory; None when it has none."""
    file = Path(run_dir) / CHECKPOINT_FILE
    if not file.exists():
        return None
    try:
        with open_npz(file) as archive:
            groups: dict[str, dict] = {"params": {}, "optimizer": {}, "best": {}}
            for key in archive.files:
                head, _, rest = key.partition("/")
                if head in ("params", "best"):
                    groups[head][rest] = archive[key]
                elif head == "optimizer":
                    groups["optimizer"][key] = archive[key]
            state = json.loads(str(archive[STATE_KEY]))
            spec_data = json.loads(str(archive[SPEC_KEY]))
    except Exception as exc:  # a damaged archive fails anywhere in zipfile's or numpy's parsing
        raise RunError(printable(f"{file}: not a readable checkpoint ({exc})")) from None
    return spec_data, Checkpoint(groups["params"], groups["optimizer"], groups["best"] or None, state)


def changed_keys(old, new, path: str = "") -> list[str]:
    """Dotted paths where two resolved specs differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            sub = f"{path}.{key}" if path else str(key)
            if key not in old or key not in new:
                out.append(sub)
            else:
                out += changed_keys(old[key], new[key], sub)
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [k for i, (a, b) in enumerate(zip(old, new)) for k in changed_keys(a, b, f"{path}[{i}]")]
    return [] if old == new else [path or "$"]


def spec_changes(stored: dict, spec: Spec) -> list[str]:
    """Where ``spec`` differs from the resolved spec data a run stored (its checkpoint's or its
    spec.yaml's), as dotted paths. ``train.epochs`` is left out (a longer run continues the same
    one), and so are the sections that are not the run's (``sweep``, ``tune``, ``tracking``)."""
    from .checks import NOT_THE_RUNS

    return [k for k in changed_keys(stored, resolved_spec_data(spec))
            if k != "train.epochs" and k.split(".")[0] not in NOT_THE_RUNS]


def changes_text(changed: list[str]) -> str:
    """``a, b and 3 more``: the first eight changed keys."""
    return ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")


@dataclass
class RunState:
    """What a run directory holds for a spec: ``new`` (nothing worth keeping), ``complete``,
    ``partial`` (a checkpoint to resume from) or ``different`` (a run of another spec, which
    differs in ``changed``). ``history``: its epochs' records."""

    kind: str
    history: list[dict] = field(default_factory=list)
    checkpoint: Checkpoint | None = None
    changed: list[str] = field(default_factory=list)
    #: A complete run that its caller stopped (a search's pruned trial).
    halted: bool = False


def inspect_run(run_dir: str | os.PathLike, spec: Spec) -> RunState:
    """Whether ``run_dir`` holds a complete run of ``spec``, one to resume, or another spec's run
    (``train.epochs`` may differ: a run trained for fewer epochs resumes to more; one trained for
    more is a different run). An unreadable checkpoint is ``new``: trained again from scratch."""
    run_dir = Path(run_dir)
    if not (run_dir / CHECKPOINT_FILE).is_file():
        return RunState("new")
    try:
        found = load_checkpoint(run_dir)
    except RunError:
        return RunState("new")
    stored, ckpt = found
    epochs = int(spec.data["train"]["epochs"])
    changed = spec_changes(stored, spec)
    state = ckpt.state if isinstance(ckpt.state, dict) else {}
    trained = int(state.get("epoch", 0) or 0)
    if not changed and trained > epochs:
        changed = ["train.epochs"]
    if changed:
        return RunState("different", changed=changed)
    history = [dict(r) for r in state.get("history", []) if isinstance(r, dict)]
    if state.get("stopped") or trained >= epochs:
        if (run_dir / MODEL_FILE).is_file() and (run_dir / METRICS_FILE).is_file():
            return RunState("complete", history, halted=bool(state.get("halted")))
        return RunState("new")
    return RunState("partial", history, ckpt)


def read_history(run_dir: str | os.PathLike) -> list[dict]:
    """The epochs recorded in a run directory's metrics.jsonl (empty when there are none)."""
    try:
        lines = (Path(run_dir) / METRICS_FILE).read_text("utf-8").splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


#: The files a run writes, in the order a new run replaces them.
RUN_FILES = (METRICS_FILE, CHECKPOINT_FILE, CURVES_FILE, MODEL_FILE, SPEC_FILE, TRACKING_FILE)


def is_stale_temporary(name: str) -> bool:
    """Whether ``name`` is a temporary file :func:`atomic_write` left behind when killed."""
    return name.endswith(".tmp") and any(name.startswith(f".{f}.") for f in RUN_FILES)


class LockHeld(Exception):
    """Another process holds the lock; ``holder`` says who (``pid 123``)."""

    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


def hold_lock(path: Path):
    """Open ``path`` and hold its lock (``flock``) for this process, which writes its pid there
    for another's message: the open file (closing it lets go). Raises :class:`LockHeld`, or
    ``OSError`` when the file cannot be opened."""
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = printable(f.read(100).strip()) or "another process"
        f.close()
        raise LockHeld(holder) from None
    try:  # who holds the lock, for the message above; the lock itself is the flock
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
    except OSError:
        pass  # a full disk: the next write reports it
    return f


class RunDir:
    """A run directory being written by ``netbuild train``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.records: list[dict[str, Any]] = []

    @property
    def shown(self) -> str:
        """The path as given, and where it really is when a symbolic link or ``..`` leads
        elsewhere."""
        real = real_path(self.path)
        return printable(str(self.path) if real == self.path.absolute() else
                         f"{self.path} (resolves to {real})")

    def create(self, overwrite: bool = False) -> None:
        """Make and lock the folder; refuse one that already holds a run unless ``overwrite``."""
        try:
            if self.path.is_symlink() and not self.path.exists():
                raise RunError(f"{self.shown}: a symbolic link to {os.readlink(self.path)}, which "
                               "does not exist; expected a folder for the run")
            if self.path.exists() and not self.path.is_dir():
                raise RunError(f"{self.shown}: exists and is not a folder; expected a run directory")
            self.path.mkdir(parents=True, exist_ok=True)
            self._refuse_a_run(overwrite)  # before the lock, which would write into the folder
        except OSError as exc:
            raise RunError(f"{self.shown}: cannot create or read the run directory: {exc.strerror}") from None
        self.lock()
        try:
            self.remove_stale_temporaries()
            self._refuse_a_run(overwrite)
            for name in RUN_FILES:
                stale = self.path / name
                if stale.exists():
                    stale.unlink()
        except OSError as exc:
            self.unlock()
            raise RunError(f"{self.shown}: cannot replace the run's files: "
                           f"{exc.strerror or exc}") from None
        except RunError:
            self.unlock()
            raise

    def _refuse_a_run(self, overwrite: bool) -> None:
        """Refuse a folder that holds files other than the lock and a killed run's temporaries."""
        existing = [p for p in self.path.iterdir()
                    if p.name != LOCK_FILE and not is_stale_temporary(p.name)]
        if existing and not overwrite:
            raise RunError(f"{self.shown}: the run directory already holds a run; pass "
                           f"--resume {self.path} to continue it, --overwrite to replace it, "
                           "or --run-dir to choose another")

    def open_existing(self) -> None:
        """Lock an existing run directory to continue it."""
        try:
            found = (self.path / SPEC_FILE).is_file()
        except OSError as exc:  # a name too long, say
            raise RunError(printable(f"{self.path}: cannot read: {exc.strerror or exc}")) from None
        if not found:
            raise RunError(f"{self.shown}: not a run directory (no {SPEC_FILE}); expected a folder "
                           "written by `netbuild train`")
        self.lock()
        self.records = []
        try:
            self.remove_stale_temporaries()
        except OSError:
            pass  # a read-only run still resumes far enough to say why it cannot write

    def remove_stale_temporaries(self) -> None:
        """Delete the temporary files of a killed run (only while holding the lock)."""
        for p in self.path.iterdir():
            if is_stale_temporary(p.name) and p.is_file():
                p.unlink()

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, *exc) -> None:
        self.unlock()

    def unlock(self) -> None:
        if getattr(self, "_lock_file", None) is not None:
            self._lock_file.close()
            self._lock_file = None

    def lock(self) -> None:
        """Hold the run directory for this process; refuse when another training holds it."""
        try:
            self._lock_file = hold_lock(self.path / LOCK_FILE)
        except LockHeld as held:
            raise RunError(f"{self.shown}: another `netbuild train` ({held.holder}) is writing to this "
                           "run directory; expected one training per directory") from None
        except OSError as exc:
            raise RunError(f"{self.shown}: cannot write in the run directory: "
                           f"{exc.strerror or exc}") from None

    def rewrite_metrics(self, records: list[dict]) -> None:
        """Replace metrics.jsonl with ``records`` (a resumed run's history)."""
        self.records = list(records)
        text = "".join(json.dumps(r) + "\n" for r in self.records)
        self._write(METRICS_FILE, text.encode("utf-8"))

    def save_checkpoint(self, spec: Spec, ckpt: Checkpoint) -> None:
        self._write(CHECKPOINT_FILE, npz_bytes(_checkpoint_arrays(spec, ckpt)))

    def save_curves(self, records: list[dict]) -> None:
        from .report import curves_png

        self._write(CURVES_FILE, curves_png(records))

    def _write(self, name: str, data: bytes) -> None:
        """Atomically write one file of the run; a failing disk is a located run error."""
        try:
            atomic_write(self.path / name, data)
        except OSError as exc:
            raise RunError(f"{self.path / name}: cannot write: {exc.strerror or exc}; the previous "
                           "file is unchanged") from None

    def write_spec(self, spec: Spec) -> None:
        text = yaml.safe_dump(resolved_spec_data(spec), sort_keys=False, allow_unicode=True)
        self._write(SPEC_FILE, text.encode("utf-8"))

    def append_metrics(self, record: dict[str, Any]) -> None:
        """Add one epoch's record; the whole file is rewritten atomically."""
        self.records.append(record)
        text = "".join(json.dumps(r) + "\n" for r in self.records)
        self._write(METRICS_FILE, text.encode("utf-8"))

    def save_model(self, spec: Spec, params: dict[str, np.ndarray]) -> None:
        self._write(MODEL_FILE, npz_bytes(model_arrays(spec, params)))
