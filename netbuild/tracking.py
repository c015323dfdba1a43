"""Experiment tracking: every run logged to MLflow, as a training callback.

With ``--track mlflow`` (or a ``tracking:`` section in the spec), a run logs the resolved spec,
flattened (``model.layers.0.units``), as its parameters; every epoch's record as metrics, with
the epoch as the step; and ``model.npz``, ``curves.png`` and ``model.onnx`` (when the run
directory has one) as artifacts when it ends. A sweep's points and a search's trials are child
runs of one parent run for the command; running the command again logs under the same parent,
and a resumed run goes on logging to its own MLflow run (``tracking.json`` in its directory).

The tracking URI is the spec's ``tracking.uri``, else ``MLFLOW_TRACKING_URI``, else a SQLite
store ``mlflow.db`` beside the run directory (artifacts in ``mlartifacts/`` there). Tracking
never costs a run: a server that cannot be reached at the start is one line and the run goes on
untracked; a failure while logging is one line and the run goes on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import MissingExtra, printable
from .spec import Spec

MLFLOW_DB = "mlflow.db"
ARTIFACTS = "mlartifacts"
BACKENDS = ("mlflow",)
#: MLflow's limit on a parameter's value (longer ones are cut, with "..." at the end).
PARAM_CHARS = 6000
#: Seconds to wait for a tracking server before saying it cannot be reached.
REACH_SECONDS = 5


def mlflow_client(uri: str | None = None):
    """MLflow's client of the store at ``uri`` (with None: only checks that MLflow is there), or
    a :class:`MissingExtra` that says how to install it."""
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise MissingExtra("mlflow", "mlflow", "tracking with MLflow (--track mlflow)") from None
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # its store's set-up lines are not the user's
    return MlflowClient(tracking_uri=uri) if uri is not None else None


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """``{"train": {"optimizer": {"type": "adam"}}}`` -> ``{"train.optimizer.type": "adam"}``;
    list items by their index (``model.layers.0.units``: MLflow's keys have no brackets)."""
    if isinstance(data, dict) and data:
        out = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(data, list) and data and all(isinstance(v, (dict, list)) for v in data):
        out = {}
        for i, value in enumerate(data):
            out.update(flatten(value, f"{prefix}.{i}" if prefix else str(i)))
        return out
    text = data if isinstance(data, str) else json.dumps(data, default=str)
    return {prefix: text if len(text) <= PARAM_CHARS else text[: PARAM_CHARS - 3] + "..."}


@contextlib.contextmanager
def _quick_failures() -> Iterator[None]:
    """MLflow's HTTP client without its retries (minutes against a server that is down)."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(REACH_SECONDS)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return printable(text if len(text) <= 200 else text[:197] + "...")


@dataclass(frozen=True)
class Tracking:
    """Where runs are logged: the tracking URI, the experiment, where a new experiment keeps its
    artifacts (None: the server's choice) and, for a sweep's or search's points, the parent run.
    Plain data: it travels to the Dask workers with each point."""

    uri: str
    experiment: str
    artifact_root: str | None = None
    parent: str | None = None

    @classmethod
    def resolve(cls, spec: Spec, option: str | None, beside: Path) -> "Tracking | None":
        """The tracking a command asks for: ``option`` (``--track mlflow`` or ``none``) wins over
        the spec's ``tracking`` section; None when neither asks. ``beside``: the folder that holds
        the run directory (or the sweep's), where the default store goes."""
        section = spec.data.get("tracking") or {}
        if option == "none" or (option is None and not section):
            return None
        mlflow_client()  # MissingExtra before anything else
        uri = section.get("uri") or os.environ.get("MLFLOW_TRACKING_URI") \
            or f"sqlite:///{Path(beside).absolute() / MLFLOW_DB}"
        root = None
        if uri.startswith("sqlite:///"):  # a local store keeps its artifacts beside it, not in the
            store = Path(uri[len("sqlite:///"):]).absolute()  # folder the command ran from
            root = (store.parent / ARTIFACTS).as_uri()
        return cls(uri, section.get("experiment") or str(spec.data["name"]), root)

    def client(self):
        return mlflow_client(self.uri)

    def experiment_id(self, client) -> str:
        found = client.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
        try:
            return client.create_experiment(self.experiment, artifact_location=self.artifact_root)
        except Exception:  # made by another process meanwhile
            found = client.get_experiment_by_name(self.experiment)
            if found is None:
                raise
            return found.experiment_id

    def reach(self) -> str | None:
        """None when the tracking store answers (its experiment is found or made); else the one
        line to say, for a run that then goes on untracked."""
        try:
            if self.uri.startswith("sqlite:///"):
                Path(self.uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
            with _quick_failures():
                self.experiment_id(self.client())
        except MissingExtra:
            raise
        except Exception as exc:
            return (f"tracking: cannot reach MLflow at {self.uri} ({_short(exc)}); this run goes on "
                    "untracked")
        return None

    # -- the parent run of a sweep or a search -------------------------------------------------
    def with_parent(self, state: dict | None, name: str = "", params: dict | None = None) -> "Tracking":
        """This tracking with a parent run: the one ``state`` names (a command run again), else
        a new one named ``name`` with ``params``."""
        client = self.client()
        if state and state.get("uri") == self.uri and state.get("parent"):
            with contextlib.suppress(Exception):
                client.update_run(state["parent"], status="RUNNING")
                return replace(self, parent=state["parent"])
        run = client.create_run(self.experiment_id(client), run_name=name or None,
                                tags={"netbuild.kind": "parent"})
        _log_params(client, run.info.run_id, params or {})
        return replace(self, parent=run.info.run_id)

    def state(self) -> dict:
        return {"uri": self.uri, "experiment": self.experiment, "parent": self.parent}

    def end_parent(self, status: str = "FINISHED") -> None:
        """Mark the parent run ended: ``FINISHED``, ``FAILED`` or ``KILLED`` (Ctrl-C)."""
        if self.parent:
            with contextlib.suppress(Exception):
                self.client().set_terminated(self.parent, status)

    # -- one run ---------------------------------------------------------------------------------
    def run(self, spec: Spec, run_dir: Path, name: str | None = None,
            problem: Callable[[str], None] | None = None) -> "TrackedRun":
        """A context in which the training of ``spec`` into ``run_dir`` is logged: its
        :attr:`TrackedRun.callbacks` go to :func:`netbuild.training.train`."""
        return TrackedRun(self, spec, Path(run_dir), name, problem)


def param_key(path: str) -> str:
    """A spec path as MLflow's keys allow it: ``model.layers[0].units`` -> ``model.layers.0.units``."""
    return re.sub(r"\[(-?\d+)\]", r".\1", path)


def _log_params(client, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(param_key(k), v) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow's most per batch
        client.log_batch(run_id, params=items[i:i + 100])


class TrackedRun:
    """One run's MLflow run, from ``__enter__`` (created, or found again for a resumed run) to
    ``__exit__`` (artifacts logged, status set: FINISHED, FAILED or KILLED). A failure to log is
    said once through ``problem`` (kept in :attr:`problems`), and training goes on."""

    def __init__(self, tracking: Tracking, spec: Spec, run_dir: Path, name: str | None,
                 problem: Callable[[str], None] | None):
        from .training import Callbacks

        self.tracking = tracking
        self.spec = spec
        self.run_dir = run_dir
        self.name = name or str(spec.data["name"])
        self.problem = problem or (lambda line: None)
        self.problems: list[str] = []
        self.client = None
        self.run_id: str | None = None
        self.callbacks = Callbacks(epoch=self._epoch)

    def _failed(self, doing: str, exc: BaseException) -> None:
        """Say once what failed, stop sending, and mark the MLflow run failed if it exists."""
        if self.problems:
            return
        line = (f"tracking: cannot {doing} at {self.tracking.uri} ({_short(exc)}); the run goes on "
                "untracked")
        client, self.client = self.client, None  # nothing more is sent
        self.problems.append(line)
        self.problem(line)
        if client is not None and self.run_id is not None:
            with contextlib.suppress(Exception), _quick_failures():
                client.set_terminated(self.run_id, "FAILED")

    def __enter__(self) -> "TrackedRun":
        from .runs import TRACKING_FILE, atomic_write, resolved_spec_data

        try:
            self.client = self.tracking.client()  # MLflow's client opens its store here
            with _quick_failures():
                self.run_id = self._resumed()
                if self.run_id is None:
                    tags = {"netbuild.run_dir": str(self.run_dir.absolute())}
                    if self.tracking.parent:
                        tags["mlflow.parentRunId"] = self.tracking.parent
                    run = self.client.create_run(self.tracking.experiment_id(self.client), run_name=self.name,
                                                 tags=tags)
                    self.run_id = run.info.run_id
                    _log_params(self.client, self.run_id, flatten(resolved_spec_data(self.spec)))
            state = {"uri": self.tracking.uri, "run_id": self.run_id}
            atomic_write(self.run_dir / TRACKING_FILE, (json.dumps(state) + "\n").encode("utf-8"))
        except Exception as exc:
            self._failed("start the run", exc)
        return self

    def _resumed(self) -> str | None:
        """The MLflow run of the run this directory holds, when it is resumed and was tracked
        in the same store."""
        from .runs import TRACKING_FILE

        try:
            state = json.loads((self.run_dir / TRACKING_FILE).read_text("utf-8"))
            if state.get("uri") != self.tracking.uri:
                return None
            self.client.update_run(state["run_id"], status="RUNNING")
            return str(state["run_id"])
        except Exception:
            return None

    def _epoch(self, record: dict) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        step = int(record.get("epoch", 0))
        metrics = [Metric(k, float(v), now, step) for k, v in record.items()
                   if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool)
                   and math.isfinite(v)]
        try:
            with _quick_failures():
                self.client.log_batch(self.run_id, metrics=metrics)
        except Exception as exc:
            self._failed(f"log epoch {step}", exc)

    def __exit__(self, kind, error, tb) -> bool:
        from .runs import CURVES_FILE, MODEL_FILE
        from .training import RunStopped

        if self.client is None:
            return False
        try:
            with _quick_failures():
                for name in (MODEL_FILE, CURVES_FILE, "model.onnx"):
                    if (self.run_dir / name).is_file():
                        self.client.log_artifact(self.run_id, str(self.run_dir / name))
                interrupted = kind is not None and issubclass(kind, (KeyboardInterrupt, RunStopped))
                status = "FINISHED" if kind is None else "KILLED" if interrupted else "FAILED"
                self.client.set_terminated(self.run_id, status)
        except Exception as exc:
            self._failed("log the run's files", exc)
        return False
