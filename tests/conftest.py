"""Shared fixtures: the repository root, the real CLI through Click's runner, float64 graphs."""

from __future__ import annotations

from pathlib import Path

import pytensor
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
