"""Shared fixtures: the repository root, the real CLI through Click's runner, float64 graphs."""

from __future__ import annotations

from pathlib import Path

import os

# pytest-xdist runs one test process per core: each computes on one thread unless a test asks for
# more (tests/test_threads.py), so that the processes do not oversubscribe the cores.
os.environ.setdefault("NETBUILD_THREADS", "1")

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


def verify_grad(fun, values, **kwargs):
    """``pytensor.gradient.verify_grad`` in :data:`TEST_MODE` throughout (by default it compiles
    the cost of a FAST_COMPILE check in FAST_RUN, which is Numba: a minute per new graph)."""
    kwargs.setdefault("mode", TEST_MODE)
    kwargs.setdefault("no_debug_ref", False)
    kwargs.setdefault("rng", np.random.default_rng(0))
    return pytensor.gradient.verify_grad(fun, values, **kwargs)


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
