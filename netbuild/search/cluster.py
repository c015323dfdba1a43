"""Where sweeps and searches run: a ``LocalCluster`` of worker processes that the command starts
and stops, or the workers of a running Dask scheduler; threads per worker so that workers x
threads stays within the cores."""

from __future__ import annotations

import contextlib
import logging
import signal
import uuid
from typing import Any, Iterator

from .. import __version__, backend, threads
from ..errors import printable
from ..runs import read_history
from .errors import SearchError

#: Seconds the running points get to stop after Ctrl-C before the cluster is closed.
CANCEL_GRACE_SECONDS = 5.0


def point_threads(workers: int, requested: int | None = None, cores: int | None = None) -> int:
    """Threads per worker: ``requested`` (``--threads``), else netbuild's default
    (``NETBUILD_THREADS``, else every core), never more than the cores each worker has to
    itself."""
    share = max(1, (cores or threads.available_cores()) // max(1, workers))
    return max(1, min(requested or threads.default_threads(), share))


def default_workers(points: int, cores: int | None = None) -> int:
    """One worker per core, at most one per point to train."""
    return max(1, min(cores or threads.available_cores(), points))


def local_cluster(workers: int, per_worker: int):
    """A ``LocalCluster`` of ``workers`` processes, one thread each (one point at a time), each
    computing with ``per_worker`` threads (:func:`point_threads`), so that workers x threads
    stays within the cores."""
    import dask
    from distributed import LocalCluster

    n = str(per_worker)
    env = {threads.ENV: n, "OPENBLAS_NUM_THREADS": n, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n,
           backend.BACKEND_ENV: backend.current()}
    if backend.current() == "jax":  # JAX takes most of a GPU's memory up front: the workers share it
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    # Ctrl-C in a terminal reaches every process of the group. The workers inherit an ignored
    # SIGINT (a disposition survives exec), so that only this process hears it and stops them in
    # order; a Ctrl-C during these few seconds of start-up is ignored. Dask's statistical
    # profiler (a thread sampling the task's frames every 10 ms) is off: it costs CPU, and its
    # references to frames make PyTensor warn of a "reference count inconsistency".
    with _sigint_ignored(), dask.config.set({"distributed.worker.profile.enabled": False}):
        return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                            dashboard_address=":0", env=env)


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: nothing to change
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _connect(scheduler: str):
    """A client of the running scheduler at ``scheduler``, checked to have workers that run
    this netbuild."""
    import dask
    from distributed import Client

    try:  # Dask's connect timeout (distributed.comm.timeouts.connect, 30 s unless configured)
        client = Client(scheduler, timeout=dask.config.get("distributed.comm.timeouts.connect"))
    except (OSError, TimeoutError, ValueError, TypeError) as exc:
        raise SearchError(f"--scheduler {scheduler}: cannot connect ({exc}); expected the address of "
                         "a running `dask scheduler`, e.g. tcp://host:8786") from None
    try:
        try:
            client.wait_for_workers(1, timeout=30)
        except (TimeoutError, OSError):
            raise SearchError(f"--scheduler {scheduler}: the cluster has no workers; expected at least "
                             f"one `dask worker {scheduler}` on a machine with netbuild installed") from None

        def probe():  # defined here so that it reaches workers without netbuild by value
            import importlib.metadata

            try:
                return importlib.metadata.version("netbuild")
            except importlib.metadata.PackageNotFoundError:
                return None

        versions = client.run(probe)
        wrong = [f"{addr} has {'netbuild ' + v if v else 'no netbuild'}"
                 for addr, v in sorted(versions.items()) if v != __version__]
        if wrong:
            raise SearchError(f"--scheduler {scheduler}: {'; '.join(wrong)}; expected netbuild "
                             f"{__version__} installed on every worker")
    except BaseException:
        client.close()
        raise
    return client


@contextlib.contextmanager
def client_for(workers: int, scheduler: str | None, per_worker: int) -> Iterator[Any]:
    """A Dask client of the scheduler at ``scheduler``, or of a local cluster of ``workers``
    processes (:func:`local_cluster`) that is closed with it."""
    from distributed import Client

    if scheduler:
        client = _connect(scheduler)
        try:
            yield client
        finally:
            client.close()
        return
    cluster = local_cluster(workers, per_worker)
    try:
        client = Client(cluster)
        try:
            yield client
        finally:
            with _quiet_closing():
                client.close()
    finally:
        with _quiet_closing():
            cluster.close()


@contextlib.contextmanager
def _quiet_closing() -> Iterator[None]:
    """Closing the local cluster: a worker slow to exit (a loaded machine) is killed, which is
    harmless once its point has stopped (every file is written atomically); Dask's warning about
    it is not for the user."""
    logger = logging.getLogger("distributed")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class Runner:
    """Tasks (:class:`netbuild.search.task.Task`) trained on a Dask client, heard as they finish.
    More may be submitted while earlier ones run (a search asks for its next trial as one ends).
    Ctrl-C is the caller's to catch; :meth:`cancel` then stops what runs."""

    def __init__(self, client):
        from distributed import Event, as_completed

        self.client = client
        self.event = f"netbuild-cancel-{uuid.uuid4().hex}"
        self._cancel = Event(self.event, client=client)
        self._tasks: dict = {}  # future -> task
        self._done: set = set()
        self._completed = as_completed()

    def submit(self, task) -> None:
        from .task import run_point

        task.cancel_event = self.event
        future = self.client.submit(run_point, task, key=f"netbuild-{task.id}-{self.event[-8:]}", pure=False)
        self._tasks[future] = task
        self._completed.add(future)

    def running(self) -> int:
        return len(self._tasks) - len(self._done)

    def finished(self) -> Iterator[tuple[Any, dict]]:
        """``(task, record)`` for each task as it finishes, until none is left running."""
        for future in self._completed:
            self._done.add(future)
            task = self._tasks[future]
            yield task, record_of(future, task)

    def cancel(self) -> list[tuple[Any, dict]]:
        """Tell the running tasks to stop at their next batch, give them a few seconds; the
        records of every task not yet heard (finished in time, or cancelled)."""
        from distributed import wait

        from .task import CANCELLED, point_record

        with contextlib.suppress(Exception):
            self._cancel.set()
        left = [f for f in self._tasks if f not in self._done]
        with contextlib.suppress(Exception):
            wait(left, timeout=CANCEL_GRACE_SECONDS)
        out = []
        for future in left:
            task = self._tasks[future]
            if future.status == "finished":
                out.append((task, record_of(future, task)))
            else:
                out.append((task, point_record(task.id, task.overrides, CANCELLED, read_history(task.run_dir),
                                               task.monitor, task.mode, "cancelled")))
            self._done.add(future)
        with contextlib.suppress(Exception):
            self.client.cancel(left, force=True)
        return out


def record_of(future, task) -> dict:
    """The record a finished future holds; a worker that died is a failed point."""
    from .task import FAILED, point_record

    try:
        return future.result()
    except Exception as exc:  # the worker process died (killed, out of memory), or the cluster went away
        text = str(exc) or type(exc).__name__
        return point_record(task.id, task.overrides, FAILED, read_history(task.run_dir), task.monitor,
                            task.mode, printable(f"{type(exc).__name__}: {text}"))
