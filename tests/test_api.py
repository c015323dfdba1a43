"""The Python API: the README's example runs as written, the API and the CLI give the same
results (the CLI calls the API), and a user's mistake is one exception type whose text is the
line the CLI prints."""

from __future__ import annotations

import contextlib
import io
import json
import re

import numpy as np
import pytest
from conftest import CONFIGS, ROOT, SPECS

import netbuild
from netbuild import api

MLP = CONFIGS / "digits-mlp.yaml"
TEST_NPZ = CONFIGS / "data" / "digits-test.npz"


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python API"):text.index("## ONNX export")]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    return code


def test_the_readme_example_runs_as_written(tmp_path, monkeypatch):
    (tmp_path / "configs").symlink_to(CONFIGS)
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(readme_example(), "README.md", "exec"), {})
    lines = out.getvalue().splitlines()
    assert lines[0] == "9610 parameters"
    assert 0.5 < float(lines[1]) <= 1.0
    assert lines[2].startswith("{'loss': ") and "'accuracy': " in lines[2]
    assert lines[3] == ("--set model.layers[0].units=-5: model.layers[0].units: -5 is less than the "
                        "minimum of 1")
    assert (tmp_path / "digits-mlp.onnx").stat().st_size > 0
    assert (tmp_path / "runs" / "digits-mlp-api" / "model.npz").exists()


def test_api_and_cli_give_the_same_model_predictions_and_metrics(tmp_path, run_cli):
    spec = netbuild.load_spec(MLP, overrides=["train.epochs=2"])
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        run = netbuild.train(spec, run_dir=tmp_path / "api")
    assert quiet.getvalue() == ""  # the API never prints
    assert [r["epoch"] for r in run.history] == [1, 2] and run.path == tmp_path / "api"
    assert run_cli("train", MLP, "--set", "train.epochs=2", "--run-dir", tmp_path / "cli", "-q").exit_code == 0
    ours, theirs = np.load(tmp_path / "api" / "model.npz"), np.load(tmp_path / "cli" / "model.npz")
    for key in ours.files:
        if key != "__spec__":  # the same but for the folder the run was written from
            assert np.array_equal(ours[key], theirs[key]), key

    model = netbuild.load_model(tmp_path / "api")
    test = np.load(TEST_NPZ)
    assert run_cli("predict", tmp_path / "cli", "--data", TEST_NPZ, "--out", tmp_path / "p.npz").exit_code == 0
    assert np.array_equal(model.predict(test["x"]), np.load(tmp_path / "p.npz")["y"])
    assert np.array_equal(run.model.predict(test["x"]), model.predict(test["x"]))
    # another batch size changes the matrix products' blocking: equal to float32 rounding
    np.testing.assert_allclose(model.predict(test["x"], batch_size=7), model.predict(test["x"]), atol=1e-6)
    result = run_cli("eval", tmp_path / "cli", "--format", "json")
    assert model.evaluate(test["x"], test["y"]) == json.loads(result.output)["metrics"]
    assert model.input_shape == (64,) and model.output_shape == (10,) and model.metrics == ["accuracy"]


def test_resume_through_the_api(tmp_path):
    spec = netbuild.load_spec(MLP, overrides=["train.epochs=1"])
    netbuild.train(spec, run_dir=tmp_path / "run")
    run = netbuild.train(run_dir=tmp_path / "run", resume=True, epochs=2)
    assert [r["epoch"] for r in run.history] == [1, 2]


def test_check_returns_the_summary_and_accepts_a_path():
    summary = netbuild.check(MLP)
    assert summary.name == "digits-mlp" and summary.total_params == 64 * 128 + 128 + 128 * 10 + 10
    assert [row["name"] for row in summary.layers] == ["dense_0", "dropout_1", "out"]
    assert summary.output_shape == (10,)
    assert netbuild.check(netbuild.load_spec(MLP), data=False) == summary


def test_the_cli_is_built_on_the_api(tmp_path, run_cli, monkeypatch):
    called = []
    for name in ("check", "train", "load_spec"):
        real = getattr(api, name)
        monkeypatch.setattr(api, name, lambda *a, _real=real, _name=name, **k: called.append(_name)
                            or _real(*a, **k))
    assert run_cli("check", MLP).exit_code == 0
    assert run_cli("train", MLP, "--epochs", "1", "--run-dir", tmp_path / "run", "-q").exit_code == 0
    assert called == ["load_spec", "check", "load_spec", "train"]


@pytest.mark.parametrize("name", ["unknown-layer-type.yaml", "input-shape-mismatch.yaml"])
def test_a_spec_error_reads_as_the_cli_prints_it(name, run_cli):
    path = SPECS / "invalid" / name
    with pytest.raises(netbuild.NetbuildError) as caught:
        netbuild.check(netbuild.load_spec(path))
    result = run_cli("check", path)
    assert result.exit_code == caught.value.exit_code == 1
    assert str(caught.value) == result.output.strip()


def test_arrays_are_checked_as_data_files_are(tmp_path):
    model = netbuild.load_model(_tiny_run(tmp_path))
    test = np.load(TEST_NPZ)
    cases = [
        (lambda: model.predict(test["x"][:, :63]), "x: has examples of shape (63,); expected (64,) to fit "
                                                   "model.input_shape (or 64 values per example)"),
        (lambda: model.predict((test["x"] * 16).astype(np.uint8)), "x: is uint8 with values 0..16; netbuild "
                                                                    "does not convert or rescale integer inputs"),
        (lambda: model.predict(np.full((2, 64), np.nan)), "x: holds 128 NaN values (the first in example 0)"),
        (lambda: model.evaluate(test["x"], test["y"][:5]), "y: holds 5 examples; expected 360, as many as "
                                                           "the inputs"),
        (lambda: model.evaluate(test["x"], test["y"] + 10), "y: holds class id 19, outside the output's range"),
        (lambda: model.predict([[1, 2], [3]]), "x: is not an array"),
        (lambda: model.predict(test["x"], batch_size=0), "batch_size 0; expected a whole number of at least 1"),
    ]
    for call, message in cases:
        with pytest.raises(netbuild.NetbuildError) as caught:
            call()
        assert str(caught.value).startswith(message), str(caught.value)


def test_wrong_calls_are_usage_errors(tmp_path):
    with pytest.raises(netbuild.UsageError, match="resume=True continues the run in run_dir"):
        netbuild.train(netbuild.load_spec(MLP), resume=True)
    with pytest.raises(netbuild.UsageError, match="give a spec"):
        netbuild.train()
    with pytest.raises(netbuild.RunError, match="not found; expected a run directory or a model.npz"):
        netbuild.load_model(tmp_path / "nothing")
    with pytest.raises(netbuild.UsageError, match="epochs 0; expected a whole number of at least 1"):
        netbuild.train(MLP, run_dir=tmp_path / "zero", epochs=0)
    model = netbuild.load_model(_tiny_run(tmp_path))
    for opset in (9, "17", 17.5, True):
        with pytest.raises(netbuild.UsageError, match="is not one netbuild writes; expected 17 to 28"):
            model.export_onnx(tmp_path / "m.onnx", opset=opset)
    with pytest.raises(netbuild.UsageError, match="batch_size True; expected a whole number"):
        model.predict(np.zeros((1, 64), np.float32), batch_size=True)
    assert not (tmp_path / "m.onnx").exists()


def test_the_callers_spec_is_left_as_it_was(tmp_path):
    spec = netbuild.load_spec(MLP, overrides="train.epochs=1")  # one override as a string
    before = json.dumps(spec.data, sort_keys=True)
    run = netbuild.train(spec, run_dir=tmp_path / "run", epochs=2)
    assert len(run.history) == 2 and json.dumps(spec.data, sort_keys=True) == before
    assert spec.data["train"]["epochs"] == 1


def test_an_unvalidated_spec_is_validated(tmp_path):
    from netbuild.spec import load_text

    raw = load_text((MLP.read_text()).replace("units: 128", "units: -3"), str(MLP), MLP.parent)
    with pytest.raises(netbuild.SpecError, match=r"model.layers\[0\].units: -3 is less than the minimum"):
        netbuild.check(raw)


def _tiny_run(tmp_path):
    run = tmp_path / "tiny"
    netbuild.train(netbuild.load_spec(MLP, overrides=["train.epochs=1"]), run_dir=run)
    return run


def test_the_api_computes_on_the_threads_the_cli_would(tmp_path, monkeypatch):
    """NETBUILD_THREADS (else every core) applies to the API as to the CLI, unless a count was
    applied already."""
    from netbuild import threads

    before = threads.current()
    run = _tiny_run(tmp_path)
    try:
        monkeypatch.setattr(threads, "_current", None)
        monkeypatch.setenv("NETBUILD_THREADS", "1")
        netbuild.load_model(run)
        assert threads._current == 1
        threads.apply(2)
        netbuild.load_model(run)
        assert threads._current == 2  # an applied count wins
        monkeypatch.setattr(threads, "_current", None)
        monkeypatch.setenv("NETBUILD_THREADS", "zero")
        with pytest.raises(netbuild.NetbuildError, match="NETBUILD_THREADS=.zero."):
            netbuild.load_model(run)
    finally:
        threads.apply(before)
