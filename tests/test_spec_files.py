"""Every spec in tests/specs/valid checks clean and every spec in tests/specs/invalid fails with
the messages its ``# expect:`` lines give, through the real CLI."""

from __future__ import annotations

import json

import pytest
from conftest import CONFIGS, SPECS

VALID = sorted((SPECS / "valid").glob("*.yaml")) + sorted(CONFIGS.glob("*.yaml"))
INVALID = sorted((SPECS / "invalid").glob("*.yaml"))


def expectations(path) -> list[str]:
    return [line[len("# expect: "):].rstrip("\n") for line in path.read_text().splitlines()
            if line.startswith("# expect: ")]


def matches(line: str, expected: str) -> bool:
    """``...`` in an expectation stands for any text."""
    pos = 0
    for part in expected.split(" ... "):
        found = line.find(part, pos)
        if found < 0:
            return False
        pos = found + len(part)
    return True


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.name)
def test_valid_spec_checks_clean(run_cli, path):
    result = run_cli("check", path)
    assert result.exit_code == 0, result.output + result.stderr
    assert "total parameters:" in result.output


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.name)
def test_invalid_spec_fails_with_located_messages(run_cli, path):
    expected = expectations(path)
    assert expected, f"{path} has no '# expect:' lines"
    result = run_cli("check", path.relative_to(SPECS.parent.parent))
    assert result.exit_code == 1
    assert "Traceback" not in result.output + result.stderr
    lines = result.stderr.splitlines()
    prefix = f"{path.relative_to(SPECS.parent.parent)}:"
    assert all(line.startswith(prefix) for line in lines), lines
    for want in expected:
        assert any(matches(line[len(prefix):], want) for line in lines), (want, lines)
    assert len(lines) == len(expected), lines


def test_errors_as_json(run_cli):
    result = run_cli("check", SPECS / "invalid" / "many-errors.yaml", "--format", "json")
    assert result.exit_code == 1
    report = json.loads(result.output)
    assert report["ok"] is False
    first = report["errors"][0]
    assert (first["line"], first["column"], first["path"]) == (5, 17, "model.input_shape[0]")
    assert [e["line"] for e in report["errors"]] == sorted(e["line"] for e in report["errors"])


def test_check_json_lists_layers(run_cli):
    result = run_cli("check", CONFIGS / "digits-mlp.yaml", "--format", "json")
    assert result.exit_code == 0
    report = json.loads(result.output)
    assert [layer["output_shape"] for layer in report["layers"]] == [[128], [128], [10]]
    assert report["total_params"] == 64 * 128 + 128 + 128 * 10 + 10
    assert [layer["line"] for layer in report["layers"]] == [14, 15, 16]


def test_check_table_names_lines_and_counts(run_cli):
    result = run_cli("check", CONFIGS / "digits-mlp.yaml")
    assert result.exit_code == 0
    out = result.output
    assert "dense_0" in out and "dropout_1" in out and "out" in out
    assert "(128,)" in out and "8,320" in out and "total parameters: 9,610" in out


def test_no_data_skips_data_files(run_cli):
    result = run_cli("check", SPECS / "invalid" / "missing-data-file.yaml", "--no-data")
    assert result.exit_code == 0, result.stderr


@pytest.mark.parametrize("config,shapes,total", [
    ("digits-cnn.yaml", [[32, 8, 8], [32, 8, 8], [32, 4, 4], [64, 4, 4], [64], [64], [10]],
     (32 * 9 + 32) + (32 * 32 * 9 + 32) + (64 * 32 * 9 + 64) + (64 * 10 + 10)),
    ("digits-lstm.yaml", [[128], [10]], 2 * (4 * 64 * (8 + 64) + 2 * 4 * 64) + 128 * 10 + 10),
])
def test_check_reports_shapes_and_counts_of_shipped_configs(run_cli, config, shapes, total):
    report = json.loads(run_cli("check", CONFIGS / config, "--format", "json", "--no-data").output)
    assert [layer["output_shape"] for layer in report["layers"]] == shapes
    assert report["total_params"] == total
