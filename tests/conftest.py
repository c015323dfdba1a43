"""Shared fixtures: the repository root, the real CLI through Click's runner, float64 graphs."""

from __future__ import annotations

from pathlib import Path

import os

# pytest-xdist runs one test process per core: each computes on one thread unless a test asks for
# more (tests/test_threads.py), so that the processes do not oversubscribe the cores.
os.environ.setdefault("NETBUILD_THREADS", "1")
# Data scans are cached in a folder of the test process's own (inherited by the CLI's
# subprocesses), never in the user's ~/.cache.
if "NETBUILD_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["NETBUILD_CACHE_DIR"] = tempfile.mkdtemp(prefix="netbuild-test-cache-")
    atexit.register(shutil.rmtree, os.environ["NETBUILD_CACHE_DIR"], ignore_errors=True)

import importlib.util

import numpy as np
import pytensor
import pytensor.gradient
import pytest
from click.testing import CliRunner

import netbuild  # noqa: F401  (configures PyTensor before any test builds a graph)
from netbuild.cli import cli

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "tests" / "specs"
CONFIGS = ROOT / "configs"

#: Unit tests of graph maths (numpy references, numerical gradients) run PyTensor's Python
#: implementations of the same ops: they compile in a fraction of a second, where the C backend
#: spends seconds per new op on g++. The C backend is exercised by the end-to-end tests that train
#: through the CLI.
TEST_MODE = "FAST_COMPILE"


#: Runs `netbuild check FILE` and prints its exit code and peak resident bytes, then its stderr.
#: A process of its own: a child forked from a pytest worker that has grown large counts the
#: worker's pages in its peak until it execs.
_MEASURE = """
import os, subprocess, sys
proc = subprocess.Popen([sys.executable, "-m", "netbuild", "check", sys.argv[1]],
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
err = proc.stderr.read()
_, status, usage = os.wait4(proc.pid, 0)
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss * 1024)
print(err, end="")
"""


def check_in_a_process(spec) -> tuple[int, int, list[str]]:
    """``(exit code, peak resident bytes, stderr lines)`` of `netbuild check SPEC`, measured by
    the kernel for that process alone."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _MEASURE, str(spec)], capture_output=True,
                         text=True, timeout=120, check=True).stdout.splitlines()
    code, peak = (int(v) for v in out[0].split())
    return code, peak, out[1:]


def verify_grad(fun, values, **kwargs):
    """``pytensor.gradient.verify_grad`` in :data:`TEST_MODE` throughout (by default it compiles
    the cost of a FAST_COMPILE check in FAST_RUN, which is Numba: a minute per new graph)."""
    kwargs.setdefault("mode", TEST_MODE)
    kwargs.setdefault("no_debug_ref", False)
    kwargs.setdefault("rng", np.random.default_rng(0))
    return pytensor.gradient.verify_grad(fun, values, **kwargs)


# -- the ops' JAX forms (their ``jax`` methods) against their C code --------------------------------
needs_jax = pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax not installed")


def jax_function(inputs, outputs):
    """``pytensor.function`` in PyTensor's JAX mode, netbuild's ops by their ``jax`` methods
    (each op of ``outputs``' graph still in the compiled one)."""
    from pytensor.graph.traversal import apply_ancestors

    from netbuild.backend import jax_modules
    from netbuild.ops import NetbuildCOp

    jax_modules()

    def ours(nodes):
        return {type(n.op) for n in nodes if isinstance(n.op, NetbuildCOp)}

    fn = pytensor.function(inputs, outputs, mode="JAX", on_unused_input="ignore")
    assert ours(apply_ancestors(outputs)) <= ours(fn.maker.fgraph.apply_nodes)
    return fn


def assert_same(got, want, tol):
    for i, (g, w) in enumerate(zip(got, want)):
        g = np.asarray(g)
        assert g.shape == w.shape and g.dtype == w.dtype, f"output {i}"
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol, err_msg=f"output {i}")



@pytest.fixture(autouse=True)
def c_backend_afterwards():
    """Every test leaves the process on the c backend (a CLI command or a test may switch it)."""
    yield
    from netbuild import backend

    backend.use("c")


@pytest.fixture
def run_cli(monkeypatch):
    """Run ``netbuild ARGS...`` from the repository root; returns Click's result."""
    monkeypatch.chdir(ROOT)

    def run(*args: str):
        return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)

    return run


@pytest.fixture
def float64():
    """Build graphs in float64 (numeric comparisons to 1e-5 and gradient checks)."""
    with pytensor.config.change_flags(floatX="float64"):
        yield


@pytest.fixture
def mapped_data(monkeypatch):
    """Data files stay memory-mapped however small (``NETBUILD_IN_MEMORY_MAX=0``; by default a
    small data set is read into memory), here and in the netbuild processes a test starts."""
    monkeypatch.setenv("NETBUILD_IN_MEMORY_MAX", "0")


@pytest.fixture
def restore_threads():
    """The thread count a test changes (``threads.apply``) put back afterwards."""
    from netbuild import threads

    before = threads.current()
    yield
    threads.apply(before)
