"""How many threads netbuild computes with, and telling OpenMP and OpenBLAS.

By default every core this process may run on: its CPU affinity (``os.sched_getaffinity``, as
``taskset`` or a container's cpuset leaves it) and its cgroup's CPU quota (``cpu.max`` in cgroup
v2, ``cpu.cfs_quota_us`` in v1, as ``docker --cpus`` sets it), whichever is smaller.
``NETBUILD_THREADS`` overrides that, and ``--threads N`` on a command overrides both.

The same count goes to netbuild's own C ops (OpenMP: convolution and pooling over the images of
a batch, the recurrent layers and their input projections over the rows of the batch, the dense
layers' matrix products over the rows or columns of their result and attention's batched ones
over the batch, Adam's and SGD-momentum's updates over the elements) and to OpenBLAS (what
PyTensor still gives it: matrix-vector and outer products). The two take turns and never run at
once: inside one of netbuild's parallel loops every BLAS call runs on its caller's thread (the
ops set OpenBLAS to one thread for the loop: ``netbuild_serial_blas`` in
``netbuild/ops/blas.c``), so threads never outnumber the cores.
"""

from __future__ import annotations

import ctypes
import math
import os
from pathlib import Path

from .errors import NetbuildError

#: The environment variable that sets the default thread count.
ENV = "NETBUILD_THREADS"

_gomp = None
_openblas = None
_current: int | None = None


class ThreadsError(NetbuildError):
    """``NETBUILD_THREADS`` is not a positive whole number: a usage error (exit 2)."""

    exit_code = 2


def _quota(folder: Path) -> int | None:
    """The cores one cgroup's CPU quota allows (rounded up): ``cpu.max`` (v2) or
    ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (v1); None without a quota."""
    try:
        fields = (folder / "cpu.max").read_text().split()  # "max 100000" or "150000 100000"
        return max(1, math.ceil(int(fields[0]) / int(fields[1]))) if fields[0] != "max" else None
    except (OSError, ValueError, IndexError, ZeroDivisionError):
        pass
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
        return max(1, math.ceil(quota / period)) if quota > 0 and period > 0 else None
    except (OSError, ValueError, ZeroDivisionError):
        return None


def _cgroup_folders(root: Path, membership: Path) -> list[Path]:
    """The folders of this process's CPU cgroups (v2, v1 and the hybrid layout's ``unified``),
    from ``/proc/self/cgroup``; the mount points themselves when it cannot be read."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return [root, root / "cpu"]
    folders = []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        rel = path.strip().lstrip("/")
        if controllers == "":
            folders += [root / rel, root / "unified" / rel]
        elif "cpu" in controllers.split(","):
            folders += [root / controllers / rel, root / "cpu" / rel]
    return folders


def _cgroup_limit(root: Path = Path("/sys/fs/cgroup"),
                  membership: Path = Path("/proc/self/cgroup")) -> int | None:
    """Cores allowed by the tightest CPU quota of this process's cgroups and their ancestors
    (as ``docker --cpus`` or a systemd slice sets it), or None without one."""
    limits = []
    for folder in _cgroup_folders(root, membership):
        for level in (folder, *folder.parents):
            if root not in (level, *level.parents):
                break
            quota = _quota(level)
            if quota:
                limits.append(quota)
    return min(limits) if limits else None


def available_cores(cgroup_root: Path = Path("/sys/fs/cgroup"),
                    membership: Path = Path("/proc/self/cgroup")) -> int:
    """The cores this process may use: its affinity, capped by its cgroups' CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    limit = _cgroup_limit(cgroup_root, membership)
    return max(1, min(cores, limit) if limit else cores)


def default_threads() -> int:
    """``NETBUILD_THREADS`` if set (at most the available cores), else the available cores."""
    cores = available_cores()
    value = os.environ.get(ENV, "").strip()
    if not value:
        return cores
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise ThreadsError(f"{ENV}={value!r}: expected a whole number of threads, at least 1")
    return min(n, cores)


def resolve(requested: int | None = None) -> int:
    """The thread count to use: ``requested`` (``--threads``), else :func:`default_threads`;
    never more than the available cores."""
    if requested is None:
        return default_threads()
    return max(1, min(int(requested), available_cores()))


#: Read by OpenMP and OpenBLAS when they load (a user's own values win). A netbuild graph's
#: matrix-matrix products, batched ones included, run on OpenMP's threads
#: (:mod:`netbuild.ops.dense`), as its other ops do, so OpenMP's pool computes the step. Between
#: two loops OpenMP's idle threads spin GOMP_SPINCOUNT rounds (30,000: about 0.3 ms on the bench
#: machine) before they sleep, so that the next loop, microseconds later, finds them awake: the
#: bench MLP (SGD-momentum, 2 threads) trained at 35-44K samples/s with threads that slept at
#: once (``OMP_WAIT_POLICY=passive``), 51-59K with 30,000 rounds. OpenBLAS's threads, for what
#: PyTensor still gives it (matrix-vector and outer products), wait 2^17 cycles (about 50 us)
#: before they sleep. Two pools spinning at once take turns on the cores: OpenMP spinning without
#: end beside OpenBLAS's default wait of 2^28 cycles made the bench CNN slower on 2 threads than
#: on 1 (0.39x).
WAIT_POLICY = {"GOMP_SPINCOUNT": "30000", "OPENBLAS_THREAD_TIMEOUT": "17"}


def _load_gomp():
    global _gomp
    if _gomp is None:
        try:  # RTLD_GLOBAL before OpenBLAS loads: its weak omp_in_parallel then resolves
            _gomp = ctypes.CDLL("libgomp.so.1", mode=ctypes.RTLD_GLOBAL)
        except OSError:
            _gomp = False
    return _gomp or None


def openblas():
    """The bundled scipy-openblas32 library, loaded once (globally), or None without it."""
    return _load_openblas()


def _load_openblas():
    global _openblas
    if _openblas is None:
        try:
            import scipy_openblas32

            lib = Path(scipy_openblas32.get_lib_dir()) / f"lib{scipy_openblas32.get_library()}.so"
            _openblas = ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
        except (ImportError, OSError, AttributeError):
            _openblas = False
    return _openblas or None


def wait_policy() -> None:
    """:data:`WAIT_POLICY`, unless the environment sets it. Libraries read it when they load:
    ``import netbuild`` sets it first, so that numpy's own OpenBLAS (loaded later) also lets its
    threads sleep."""
    for name, value in WAIT_POLICY.items():
        if name == "GOMP_SPINCOUNT" and "OMP_WAIT_POLICY" in os.environ:
            continue  # the user's own policy: libgomp's spin count follows it
        os.environ.setdefault(name, value)


def preload() -> None:
    """Load libgomp (globally) and then OpenBLAS, before any compiled op links them, with
    :data:`WAIT_POLICY`."""
    wait_policy()
    _load_gomp()
    _load_openblas()


def apply(n: int) -> int:
    """Compute with ``n`` threads from now on, in this thread (OpenMP's count is per thread) and
    in child processes (the environment). Returns ``n``."""
    global _current
    n = max(1, int(n))
    os.environ["OMP_NUM_THREADS"] = str(n)
    os.environ["OPENBLAS_NUM_THREADS"] = str(n)
    preload()
    gomp, blas = _load_gomp(), _load_openblas()
    if gomp is not None:
        gomp.omp_set_num_threads(ctypes.c_int(n))
    if blas is not None and hasattr(blas, "scipy_openblas_set_num_threads"):
        blas.scipy_openblas_set_num_threads(ctypes.c_int(n))
    _current = n
    return n


def ensure() -> int:
    """The default thread count (``NETBUILD_THREADS``, else every core this process may use)
    applied, unless a count was applied already (``--threads``, or a caller's :func:`apply`):
    the Python API computes as the CLI does."""
    return _current if _current is not None else apply(resolve(None))


def current() -> int:
    """The thread count last applied (the default before any)."""
    return _current if _current is not None else default_threads()


def describe() -> dict:
    """Threads and where the count came from, for ``netbuild doctor``."""
    cores = available_cores()
    blas = _load_openblas()
    blas_threads = (int(blas.scipy_openblas_get_num_threads())
                    if blas is not None and hasattr(blas, "scipy_openblas_get_num_threads") else None)
    return {"threads": current(), "available_cores": cores, "cpus": os.cpu_count(),
            "env": os.environ.get(ENV) or None, "blas_threads": blas_threads,
            "openmp": _load_gomp() is not None}
