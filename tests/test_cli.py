"""The real CLI end to end on the shipped digits data: train, eval, predict, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import CONFIGS, ROOT, SPECS

MLP = CONFIGS / "digits-mlp.yaml"
TEST_NPZ = CONFIGS / "data" / "digits-test.npz"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """digits-mlp trained for 3 epochs once for this module."""
    from click.testing import CliRunner

    from netbuild.cli import cli

    run_dir = tmp_path_factory.mktemp("runs") / "mlp"
    result = CliRunner().invoke(cli, ["train", str(MLP), "--run-dir", str(run_dir), "--epochs", "3"])
    assert result.exit_code == 0, result.output + result.stderr
    return run_dir, result.output


def test_train_writes_the_run_directory(trained):
    run_dir, output = trained
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", "checkpoint.npz", "curves.png", "metrics.jsonl",
                                                         "model.npz", "spec.yaml"]
    assert "compiled in" in output and "epoch 3/3" in output
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    for r in records:
        assert {"epoch", "loss", "val_loss", "accuracy", "val_accuracy", "seconds",
                "samples_per_second"} <= set(r)
    assert records[-1]["loss"] < records[0]["loss"]


def test_model_file_is_self_contained(trained):
    run_dir, _ = trained
    with np.load(run_dir / "model.npz", allow_pickle=False) as f:
        assert f["dense_0/W"].shape == (64, 128) and f["dense_0/b"].shape == (128,)
        assert f["out/W"].shape == (128, 10) and f["out/b"].shape == (10,)
        spec = json.loads(str(f["__spec__"]))
    assert spec["name"] == "digits-mlp"
    assert spec["model"]["layers"][0]["activation"] == "relu"
    assert spec["data"]["train"].startswith("/")  # absolute: usable from anywhere


@pytest.mark.parametrize("change", ["extra", "missing", "shape"])
def test_a_model_whose_parameters_do_not_fit_its_spec(change, trained, run_cli, tmp_path):
    """A model.npz whose arrays are not exactly its spec's parameters (a layer renamed, one
    dropped, one reshaped) is refused in one line by eval and predict, not loaded in part."""
    run_dir, _ = trained
    with np.load(run_dir / "model.npz", allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    if change == "extra":
        arrays["hidden/W"] = arrays["dense_0/W"]
        expected = "holds parameters this network does not have: 'hidden/W'"
    elif change == "missing":
        del arrays["out/b"]
        expected = "parameter 'out/b' is missing"
    else:
        arrays["out/b"] = np.zeros(11, dtype=np.float32)
        expected = "'out/b' has shape (11,); expected (10,)"
    model = tmp_path / "model.npz"
    np.savez(model, **arrays)
    for args in (["eval", model], ["predict", model, "--data", TEST_NPZ, "--out", tmp_path / "p.npz"]):
        result = run_cli(*args)
        assert result.exit_code == 1, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and str(model) in lines[0] and expected in lines[0], lines
    assert not (tmp_path / "p.npz").exists()


def test_eval_accuracy_equals_numpy_on_predict_output(trained, run_cli, tmp_path):
    run_dir, _ = trained
    result = run_cli("eval", run_dir, "--format", "json")
    assert result.exit_code == 0, result.stderr
    metrics = json.loads(result.output)["metrics"]
    out = tmp_path / "pred.npz"
    result = run_cli("predict", run_dir / "model.npz", "--data", TEST_NPZ, "--out", out)
    assert result.exit_code == 0, result.stderr
    with np.load(out, allow_pickle=False) as f:
        probs = f["y"]
    with np.load(TEST_NPZ) as f:
        y = f["y"]
    assert probs.shape == (len(y), 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    assert metrics["accuracy"] == pytest.approx(np.mean(probs.argmax(axis=1) == y), abs=1e-12)
    nll = -np.mean(np.log(probs[np.arange(len(y)), y]))
    assert metrics["loss"] == pytest.approx(nll, rel=1e-4)


def test_eval_text_prints_a_table(trained, run_cli):
    run_dir, _ = trained
    result = run_cli("eval", run_dir, "--data", CONFIGS / "data" / "digits-train.npz")
    assert result.exit_code == 0
    assert "accuracy" in result.output and "1437 examples" in result.output


def test_training_is_reproducible(tmp_path, run_cli):
    for name in ("a", "b"):
        result = run_cli("train", MLP, "--run-dir", tmp_path / name, "--epochs", "2", "--quiet")
        assert result.exit_code == 0, result.stderr
        assert result.output == ""
    with np.load(tmp_path / "a" / "model.npz") as a, np.load(tmp_path / "b" / "model.npz") as b:
        for key in a.files:
            assert np.array_equal(a[key], b[key]), key


def test_existing_run_directory_is_never_overwritten(trained, run_cli):
    run_dir, _ = trained
    before = (run_dir / "model.npz").read_bytes()
    result = run_cli("train", MLP, "--run-dir", run_dir, "--epochs", "1")
    assert result.exit_code == 1
    assert "already holds a run" in result.stderr and "--overwrite" in result.stderr
    assert f"--resume {run_dir}" in result.stderr
    assert (run_dir / "model.npz").read_bytes() == before


@pytest.mark.parametrize("spec", ["binary-keys.yaml", "regression-sgd.yaml"])
def test_other_losses_train_end_to_end(spec, run_cli, tmp_path):
    result = run_cli("train", SPECS / "valid" / spec, "--run-dir", tmp_path / "run", "--epochs", "2")
    assert result.exit_code == 0, result.stderr
    result = run_cli("eval", tmp_path / "run", "--data",
                     SPECS / "data" / ("binary.npz" if spec.startswith("binary") else "regression.npz"),
                     "--format", "json")
    assert result.exit_code == 0, result.stderr
    assert np.isfinite(json.loads(result.output)["metrics"]["loss"])


def test_set_overrides_reach_training(run_cli, tmp_path):
    result = run_cli("train", MLP, "--run-dir", tmp_path / "r", "--epochs", "1", "--quiet",
                     "--set", "model.layers[0].units=16", "--set", "train.batch_size=64")
    assert result.exit_code == 0, result.stderr
    with np.load(tmp_path / "r" / "model.npz") as f:
        assert f["dense_0/W"].shape == (64, 16)
        assert json.loads(str(f["__spec__"]))["train"]["batch_size"] == 64


@pytest.mark.parametrize("args,message", [
    (["eval", "no/such/run"], "no/such/run: not found"),
    (["eval", str(SPECS)], "no model.npz in this folder"),
    (["eval", str(TEST_NPZ)], "no '__spec__' entry"),
    (["check", "no-such.yaml"], "no-such.yaml: file not found"),
    (["check", str(CONFIGS / "data" / "digits-test.npz")], "not UTF-8 text"),
    (["train", str(MLP), "--set", "model.layers[0].units=0"], "--set model.layers[0].units=0: "
                                                                "model.layers[0].units: 0 is less"),
])
def test_user_mistakes_exit_1_with_one_line(run_cli, args, message):
    result = run_cli(*args)
    assert result.exit_code == 1
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_predict_refuses_bad_inputs(trained, run_cli, tmp_path):
    run_dir, _ = trained
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((3, 7), dtype=np.float32))
    result = run_cli("predict", run_dir, "--data", bad, "--out", tmp_path / "p.npz")
    assert result.exit_code == 1
    assert "bad.npz: key 'x': has examples of shape (7,); expected (64,)" in result.stderr
    assert not (tmp_path / "p.npz").exists()


@pytest.mark.parametrize("args", [["train"], ["predict", "runs/x"], ["eval", "x", "--format", "xml"],
                                  ["bogus"], ["train", "x.yaml", "--epochs", "0"]])
def test_usage_errors_exit_2(run_cli, args):
    assert run_cli(*args).exit_code == 2


def test_schema_command_prints_the_schema(run_cli):
    result = run_cli("schema")
    assert json.loads(result.output) == json.loads((ROOT / "schemas" / "netbuild.schema.json").read_text())


def test_module_entry_point_has_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "netbuild", "check", "tests/specs/invalid/wrong-type.yaml"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.startswith("tests/specs/invalid/wrong-type.yaml:7:28: model.layers[0].units:")
    assert "Traceback" not in proc.stderr


def test_files_that_are_not_npz_archives_get_one_line(trained, run_cli, tmp_path):
    run_dir, _ = trained
    np.save(tmp_path / "single.npy", np.zeros((3, 64), dtype=np.float32))
    (tmp_path / "text.npz").write_text("not an archive")
    for bad in (tmp_path / "single.npy", tmp_path / "text.npz"):
        result = run_cli("eval", run_dir, "--data", bad)
        assert result.exit_code == 1 and "not an .npz archive" in result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
        result = run_cli("eval", bad)
        assert result.exit_code == 1 and "not a readable model file" in result.stderr
    result = run_cli("eval", run_dir / "checkpoint.npz")
    assert result.exit_code == 1 and "a checkpoint, not a model" in result.stderr


def test_predict_never_replaces_a_file_unasked(trained, run_cli, tmp_path):
    run_dir, _ = trained
    out = tmp_path / "mine.npz"
    out.write_bytes(b"a file of the user's")
    result = run_cli("predict", run_dir, "--data", TEST_NPZ, "--out", out)
    assert result.exit_code == 1 and "already exists; pass --overwrite" in result.stderr
    assert out.read_bytes() == b"a file of the user's"
    assert run_cli("predict", run_dir, "--data", TEST_NPZ, "--out", out, "--overwrite").exit_code == 0
    with np.load(out, allow_pickle=False) as f:
        assert f["y"].shape == (360, 10)


def test_predict_to_a_missing_folder_fails_before_running(trained, run_cli, tmp_path):
    run_dir, _ = trained
    result = run_cli("predict", run_dir, "--data", TEST_NPZ, "--out", tmp_path / "no" / "p.npz")
    assert result.exit_code == 1 and "does not exist" in result.stderr


def test_yaml_1_2_floats(run_cli):
    result = run_cli("check", MLP, "--no-data", "--set", "train.optimizer.learning_rate=1e-3")
    assert result.exit_code == 0, result.stderr


def test_doctor_reports_the_backend(run_cli):
    result = run_cli("doctor", "--format", "json")
    assert result.exit_code == 0, result.stderr
    info = json.loads(result.output)
    assert info["blas"] == "scipy-openblas32" and info["mode"].startswith("CVM")
    assert info["gemm_gflops"] > 0 and info["compiled_modules"] > 0


def test_doctor_names_openblas_kernels_and_a_forced_coretype(monkeypatch):
    """The kernels OpenBLAS runs, as it reports them, and the variable when it forces them: a
    forced older core halves netbuild's matrix products (README, Speed)."""
    import ctypes
    from pathlib import Path

    import scipy_openblas32

    from netbuild import backend

    lib = ctypes.CDLL(str(Path(scipy_openblas32.get_lib_dir())
                          / f"lib{scipy_openblas32.get_library()}.so"))
    lib.scipy_openblas_get_corename.restype = ctypes.c_char_p
    core = lib.scipy_openblas_get_corename().decode()
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    assert backend.blas_core() == f"{core} (OPENBLAS_CORETYPE=Haswell)"
    monkeypatch.delenv("OPENBLAS_CORETYPE")
    assert backend.blas_core() == core
    monkeypatch.setattr(backend, "_blas_source", "user (PYTENSOR_FLAGS or .pytensorrc)")
    assert backend.blas_core() == "-"


@pytest.mark.parametrize("args", [["eval", "runs/x", "--fail-under", "a\nb"],
                                  ["sweep", str(MLP), "--grid", "x\ny"],
                                  ["train", str(MLP), "--epochs", "1\n2"]],
                         ids=["fail-under", "grid", "epochs"])
def test_a_control_character_in_an_option_stays_on_the_error_line(args, run_cli):
    """Click's usage errors quote the value; a newline in it is escaped, not printed."""
    result = run_cli(*args)
    assert result.exit_code == 2
    error = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and "\\n" in error[0], result.stderr
    assert "Traceback" not in result.stderr
