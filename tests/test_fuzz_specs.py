"""Mutated specs never crash `netbuild check`: every case exits 0 or 1, never with a traceback,
and every exit 1 names the file (or --set argument) and a line."""

from __future__ import annotations

import os

import yaml
from click.testing import CliRunner
from conftest import CONFIGS, SPECS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netbuild.cli import cli

BASES = [yaml.safe_load(p.read_text()) for p in sorted(CONFIGS.glob("*.yaml")) + sorted((SPECS / "valid").glob("*.yaml"))]
CASES = int(os.environ.get("NETBUILD_FUZZ_CASES", "500"))

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["dense", "relu", "softmax", "conv2d", "lstm", "adam", "x", "",
                                           "input", "val_loss", "..", "/", "\u00e9\u4e2d"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=12)


def paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from paths(v, prefix + (i,))


@st.composite
def mutated(draw):
    spec = yaml.safe_load(yaml.safe_dump(draw(st.sampled_from(BASES))))
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(list(paths(spec))))
        if not where:
            spec = draw(values)
            continue
        parent = spec
        for part in where[:-1]:
            parent = parent[part]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        try:
            if action == "replace":
                parent[where[-1]] = draw(values)
            elif action == "delete":
                del parent[where[-1]]
            elif isinstance(parent, dict):
                parent[draw(st.text(max_size=10))] = draw(values)
            else:
                parent.append(draw(values))
        except (TypeError, KeyError, IndexError):
            pass
    return spec


def run_check(text: str, path) -> None:
    path.write_text(text, encoding="utf-8")
    result = CliRunner().invoke(cli, ["check", str(path), "--no-data"])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exc_info
    assert result.exit_code in (0, 1), (result.exit_code, result.output, result.stderr)
    assert "Traceback" not in result.output + result.stderr
    if result.exit_code == 1:
        for line in result.stderr.strip().splitlines():
            assert line.startswith(str(path)), line
        assert any(line.startswith(f"{path}:") and line[len(str(path)) + 1].isdigit()
                   for line in result.stderr.splitlines()) or "not UTF-8" in result.stderr, result.stderr


@settings(max_examples=CASES, deadline=None, suppress_health_check=list(HealthCheck))
@given(spec=mutated())
def test_mutated_specs_never_crash(spec, tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "spec.yaml"
    run_check(yaml.safe_dump(spec, allow_unicode=True), path)


@settings(max_examples=max(CASES // 3, 20), deadline=None, suppress_health_check=list(HealthCheck))
@given(text=st.one_of(st.text(max_size=200), st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
                      st.sampled_from(["", "---\n", "a: &x [*x]\n", "!!python/object:os.system {}\n",
                                       "a: 1\na: 2\n", "- 1\n- 2\n", "name: [\n", "\t"])))
def test_garbage_text_never_crashes(text, tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "spec.yaml"
    run_check(text, path)
