"""`--track mlflow`: runs read back with MlflowClient hold the spec's parameters, one metric value
per epoch and the run's files; sweeps and searches log child runs of one parent; a tracking
server that cannot be reached costs nothing but one line."""

from __future__ import annotations

import json
import sys

import pytest
import yaml
from conftest import CONFIGS

from netbuild.tracking import flatten, param_key

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

MLP = CONFIGS / "digits-mlp.yaml"


def client_of(folder) -> MlflowClient:
    return MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")


def runs_of(client: MlflowClient, experiment: str) -> list:
    found = client.get_experiment_by_name(experiment)
    assert found is not None, [e.name for e in client.search_experiments()]
    return client.search_runs([found.experiment_id], order_by=["attributes.start_time ASC"])


def history(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_tracked_run_holds_its_spec_metrics_and_files(tmp_path, run_cli, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "runs" / "mlp"
    result = run_cli("train", MLP, "--set", "train.epochs=3", "--run-dir", run_dir, "--track", "mlflow", "-q")
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    client = client_of(tmp_path / "runs")  # the default store: beside the run directory
    run, = runs_of(client, "digits-mlp")
    assert run.info.status == "FINISHED" and run.info.run_name == "digits-mlp"
    params = run.data.params
    assert params["train.optimizer.learning_rate"] == "0.001" and params["model.layers.0.units"] == "128"
    assert params["model.layers.1.rate"] == "0.2" and params["train.metrics"] == '["accuracy"]'
    assert params["data.train"] == str(CONFIGS / "data" / "digits-train.npz")  # resolved, absolute
    records = history(run_dir)
    for key in ("loss", "val_loss", "val_accuracy", "learning_rate"):
        logged = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in logged] == [1, 2, 3]
        assert [m.value for m in logged] == pytest.approx([r[key] for r in records])
    names = sorted(a.path for a in client.list_artifacts(run.info.run_id))
    assert names == ["curves.png", "model.npz"]
    local = client.download_artifacts(run.info.run_id, "model.npz", str(tmp_path))
    assert open(local, "rb").read() == (run_dir / "model.npz").read_bytes()
    assert (tmp_path / "runs" / "mlartifacts").is_dir()
    assert json.loads((run_dir / "tracking.json").read_text())["run_id"] == run.info.run_id

    # resumed, it goes on logging to the same run; overwritten, it is a new one
    more = run_cli("train", "--resume", run_dir, "--epochs", "5", "-q", "--track", "mlflow")
    assert more.exit_code == 0, more.stderr
    run, = runs_of(client, "digits-mlp")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4, 5]
    assert run.info.status == "FINISHED"
    again = run_cli("train", MLP, "--set", "train.epochs=1", "--run-dir", run_dir, "--overwrite", "-q",
                    "--track", "mlflow")
    assert again.exit_code == 0, again.stderr
    assert len(runs_of(client, "digits-mlp")) == 2


def test_the_spec_tracking_section_and_track_none(tmp_path, run_cli, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    spec = yaml.safe_load(MLP.read_text())
    spec["data"] = {"train": str(CONFIGS / spec["data"]["train"]), "validation_split": 0.1}
    spec["train"]["epochs"] = 1
    store = tmp_path / "elsewhere" / "store.db"
    spec["tracking"] = {"backend": "mlflow", "uri": f"sqlite:///{store}", "experiment": "digits-trials"}
    path = tmp_path / "net.yaml"
    path.write_text(yaml.safe_dump(spec))
    result = run_cli("train", path, "--run-dir", tmp_path / "a", "-q")
    assert result.exit_code == 0, result.stderr
    run, = runs_of(MlflowClient(f"sqlite:///{store}"), "digits-trials")
    assert run.data.params["tracking.experiment"] == "digits-trials"
    assert (store.parent / "mlartifacts").is_dir()  # beside the store, not where the command ran
    untracked = run_cli("train", path, "--run-dir", tmp_path / "b", "-q", "--track", "none")
    assert untracked.exit_code == 0
    assert len(runs_of(MlflowClient(f"sqlite:///{store}"), "digits-trials")) == 1
    assert not (tmp_path / "b" / "tracking.json").exists()
    bad = run_cli("train", path, "--run-dir", tmp_path / "c", "--set", "tracking.backend=wandb")
    assert bad.exit_code == 1
    assert "tracking.backend: unknown value 'wandb'" in bad.stderr and "expected one of: mlflow" in bad.stderr


def test_an_unreachable_server_is_one_line_and_the_run_goes_on(tmp_path, run_cli, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens there
    run_dir = tmp_path / "run"
    result = run_cli("train", MLP, "--set", "train.epochs=1", "--run-dir", run_dir, "--track", "mlflow", "-q")
    assert result.exit_code == 0
    line, = result.stderr.strip().splitlines()
    assert line.startswith("tracking: cannot reach MLflow at http://127.0.0.1:9 (")
    assert line.endswith("); this run goes on untracked")
    assert (run_dir / "model.npz").is_file() and not (run_dir / "tracking.json").exists()


def test_sweep_points_are_child_runs_of_one_parent(tmp_path, run_cli, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "runs" / "sweep"
    args = ["sweep", MLP, "--grid", "model.layers[0].units=8,16", "--set", "train.epochs=2",
            "--sweep-dir", out, "--workers", "2", "--track", "mlflow", "-q"]
    result = run_cli(*args)
    assert result.exit_code == 0, result.stderr
    client = client_of(tmp_path / "runs")
    runs = runs_of(client, "digits-mlp")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    parent, = parents
    assert parent.info.run_name == "digits-mlp-sweep" and parent.info.status == "FINISHED"
    assert parent.data.params["grid.model.layers.0.units"] == "[8, 16]"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    points = json.loads((out / "sweep.json").read_text())["points"]
    assert sorted(r.info.run_name for r in children) == sorted(p["id"] for p in points)
    for child in children:
        units = int(child.data.params["model.layers.0.units"])
        assert units in (8, 16) and child.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(child.info.run_id, "val_loss")] == [1, 2]
    # run again: the points are complete, and the parent is the same
    assert run_cli(*args).exit_code == 0
    assert len(runs_of(client, "digits-mlp")) == 3


def test_tune_trials_are_tracked_pruned_or_not(tmp_path, run_cli, monkeypatch):
    pytest.importorskip("optuna")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    spec = yaml.safe_load(MLP.read_text())
    spec["data"] = {"train": str(CONFIGS / spec["data"]["train"]), "validation_split": 0.1}
    spec["train"]["epochs"] = 4
    spec["tune"] = {"space": {"train.optimizer.learning_rate": {"log_uniform": [1.0e-4, 1.0e-1]}},
                    "monitor": "val_accuracy", "pruner": "median"}
    path = tmp_path / "net.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "runs" / "tune"
    result = run_cli("tune", path, "--trials", "3", "--tune-dir", out, "--workers", "1", "--track", "mlflow", "-q")
    assert result.exit_code == 0, result.stderr
    client = client_of(tmp_path / "runs")
    runs = runs_of(client, "digits-mlp")
    parent, = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.run_name == "digits-mlp-tune"
    assert json.loads(parent.data.params["space.train.optimizer.learning_rate"]) == {"log_uniform": [1.0e-4, 0.1]}
    trials = {t["id"]: t for t in json.loads((out / "tune.json").read_text())["trials"]}
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == sorted(trials)
    for child in children:
        t = trials[child.info.run_name]
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_accuracy")]
        assert steps == list(range(1, t["epochs"] + 1))
        assert float(child.data.params["train.optimizer.learning_rate"]) == pytest.approx(
            t["overrides"]["train.optimizer.learning_rate"])


def test_without_mlflow_tracking_says_what_to_install(tmp_path, run_cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    result = run_cli("train", MLP, "--run-dir", tmp_path / "run", "--track", "mlflow")
    assert result.exit_code == 1
    assert result.stderr.strip() == ("tracking with MLflow (--track mlflow) needs mlflow, which is not "
                                     "installed; install it with: pip install 'netbuild[mlflow]'")
    assert not (tmp_path / "run").exists()


def test_parameters_are_flattened_as_mlflow_keys_allow():
    assert flatten({"model": {"layers": [{"units": 8}, {"rate": 0.5}]}, "train": {"metrics": ["accuracy"]},
                    "seed": 1}) == {"model.layers.0.units": "8", "model.layers.1.rate": "0.5",
                                    "train.metrics": '["accuracy"]', "seed": "1"}
    assert param_key("model.layers[12].units") == "model.layers.12.units"
    assert flatten({"name": "x" * 7000})["name"].endswith("...")
