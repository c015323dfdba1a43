"""Every shipped config trains through the real CLI to the test accuracy the README states."""

from __future__ import annotations

import json

import pytest

from conftest import CONFIGS

#: The test-split accuracy each shipped config must reach (README, "Shipped configs").
REQUIRED = {
    "digits-mlp.yaml": 0.96,
    "digits-cnn.yaml": 0.97,
    "digits-lstm.yaml": 0.95,
    "digits-resnet.yaml": 0.97,
}


def test_every_shipped_config_has_a_bar():
    assert sorted(REQUIRED) == sorted(p.name for p in CONFIGS.glob("*.yaml"))


#: Configs that take minutes to compile and train on 2 cores run in `make test-slow`.
SLOW = {"digits-cnn.yaml", "digits-lstm.yaml", "digits-resnet.yaml"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n
                                  for n in sorted(REQUIRED)])
def test_config_reaches_its_accuracy(name, run_cli, tmp_path):
    result = run_cli("train", CONFIGS / name, "--run-dir", tmp_path / "run", "--quiet")
    assert result.exit_code == 0, result.stderr
    result = run_cli("eval", tmp_path / "run", "--format", "json")
    assert result.exit_code == 0, result.stderr
    accuracy = json.loads(result.output)["metrics"]["accuracy"]
    assert accuracy >= REQUIRED[name], f"{name}: test accuracy {accuracy:.4f}"
