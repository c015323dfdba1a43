"""Sweeps on a real Dask LocalCluster through the CLI: the runs, the summary and its order, a
failing point, Ctrl-C and resuming, the spec's `sweep` section, and every mistake reported before
anything runs; plus the grid's expansion, random draws and point ids without a cluster."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time

import dask
import numpy as np
import pytest
import yaml
from conftest import CONFIGS, ROOT, SPECS

from netbuild import search, threads
from netbuild.search import cluster
from netbuild.errors import SpecError

MLP = CONFIGS / "digits-mlp.yaml"
REGRESSION = SPECS / "valid" / "regression-sgd.yaml"


@pytest.fixture(scope="module")
def scheduler():
    """A LocalCluster of 2 workers shared by the tests of this module (``--scheduler``), made as
    `netbuild sweep` makes its own."""
    cluster = search.local_cluster(2, 1)
    yield cluster.scheduler_address
    cluster.close()


def summary(folder) -> list[dict]:
    with open(folder / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def params(path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files if not k.startswith("__")}


def epochs_of(run_dir) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# -- on a cluster ---------------------------------------------------------------------------


def test_a_grid_of_four_points_on_a_local_cluster_of_two_workers(tmp_path, run_cli):
    out = tmp_path / "sweep"
    result = run_cli("sweep", MLP, "--grid", "train.optimizer.learning_rate=0.001,0.01",
                     "--grid", "model.layers[0].units=16,64", "--set", "train.epochs=2",
                     "--monitor", "val_accuracy", "--workers", "2", "--sweep-dir", out)
    assert result.exit_code == 0, result.stderr
    assert "4 points" in result.output and "local cluster of 2 workers" in result.output

    rows = summary(out)
    assert len(rows) == 4
    best = [float(r["best_val_accuracy"]) for r in rows]
    assert best == sorted(best, reverse=True)  # accuracy: higher first
    assert [r["rank"] for r in rows] == ["1", "2", "3", "4"]
    grid = {(r["train.optimizer.learning_rate"], r["model.layers[0].units"]) for r in rows}
    assert grid == {("0.001", "16"), ("0.001", "64"), ("0.01", "16"), ("0.01", "64")}
    for row in rows:
        assert row["status"] == "done" and row["epochs"] == "2" and row["message"] == ""
        run = out / row["point"]
        for name in ("spec.yaml", "metrics.jsonl", "model.npz", "checkpoint.npz", "curves.png"):
            assert (run / name).is_file(), (run, name)
        assert epochs_of(run) == [1, 2]
        spec = yaml.safe_load((run / "spec.yaml").read_text())
        assert str(spec["train"]["optimizer"]["learning_rate"]) == row["train.optimizer.learning_rate"]
        assert str(spec["model"]["layers"][0]["units"]) == row["model.layers[0].units"]
        assert "sweep" not in spec
    # the printed table is the summary's order
    printed = [line.split()[1] for line in result.output.splitlines() if line[:1].isdigit()]
    assert printed == [r["point"] for r in rows]
    md = (out / "summary.md").read_text()
    assert md.index(rows[0]["point"]) < md.index(rows[3]["point"]) and "higher is better" in md
    assert (out / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    state = json.loads((out / "sweep.json").read_text())
    assert {p["id"] for p in state["points"]} == {r["point"] for r in rows}
    assert state["monitor"] == "val_accuracy" and state["mode"] == "max"

    # the same code path as `netbuild train`: a point's model equals the plain training's, bit for bit
    point = next(r for r in rows if r["train.optimizer.learning_rate"] == "0.01"
                 and r["model.layers[0].units"] == "16")
    alone = tmp_path / "alone"
    trained = run_cli("train", MLP, "--run-dir", alone, "--quiet", "--set", "train.epochs=2",
                      "--set", "train.optimizer.learning_rate=0.01", "--set", "model.layers[0].units=16")
    assert trained.exit_code == 0, trained.stderr
    a, b = params(alone / "model.npz"), params(out / point["point"] / "model.npz")
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_a_failing_point_is_recorded_and_the_others_go_on(tmp_path, run_cli, scheduler):
    out = tmp_path / "sweep"
    args = ["sweep", REGRESSION, "--grid", "train.optimizer.learning_rate=0.01,0.05,1000",
            "--set", "train.loss=mse", "--scheduler", scheduler, "--sweep-dir", out]
    result = run_cli(*args)
    assert result.exit_code == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("learning_rate=1000-") and "failed: training stopped: the loss became" in lines[0]
    assert lines[-1].startswith("1 of 3 points failed")

    rows = summary(out)
    assert [r["status"] for r in rows] == ["done", "done", "failed"]
    assert [r["train.optimizer.learning_rate"] for r in rows] == ["0.05", "0.01", "1000"]  # val_loss: lower first
    assert float(rows[0]["best_val_loss"]) < float(rows[1]["best_val_loss"])
    assert "loss became" in rows[2]["message"] and rows[2]["best_val_loss"] == ""
    assert not (out / rows[2]["point"] / "model.npz").exists()
    assert "| failed |" in (out / "summary.md").read_text()

    # again: the complete points are skipped (their files untouched), the failed one is retried
    done = [out / r["point"] / "model.npz" for r in rows[:2]]
    stamps = [p.stat().st_mtime_ns for p in done]
    again = run_cli(*args)
    assert again.exit_code == 1
    assert "3 points into" in again.output and "(2 complete already)" in again.output
    assert "training 1 point on" in again.output
    assert [r["status"] for r in summary(out)] == ["skipped", "skipped", "failed"]
    assert [p.stat().st_mtime_ns for p in done] == stamps

    # a changed spec meets runs of another spec: refused before anything runs
    changed = run_cli(*args[:-4], "--set", "train.epochs=1", "--scheduler", scheduler, "--sweep-dir", out)
    assert changed.exit_code == 1
    assert "holds a run of a different spec" in changed.stderr and "--overwrite" in changed.stderr
    assert [p.stat().st_mtime_ns for p in done] == stamps


def _default_sigint() -> None:
    """In the child, Ctrl-C as a terminal gives it: a test process may run with SIGINT ignored
    (after an in-process cluster of an earlier test), and a child inherits that disposition."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_cancels_running_points_and_the_same_command_resumes(tmp_path, run_cli, scheduler):
    out = tmp_path / "sweep"
    # A fast point (1 epoch) and a slow one (16 epochs of a wide layer, a checkpoint every 2) on
    # two workers; Ctrl-C once the fast one is done and the slow one has a checkpoint. Batches of 4
    # keep the slow point running for seconds after its first checkpoint, when Ctrl-C comes.
    grid = ["--grid", "train.epochs=1,16", "--set", "model.layers[0].units=4096", "--set", "train.batch_size=4",
            "--set", "train.checkpoint.every=2", "--sweep-dir", out]
    proc = subprocess.Popen([sys.executable, "-m", "netbuild", "sweep", MLP, *map(str, grid), "--workers", "2"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=_default_sigint)
    deadline = time.monotonic() + 180
    fast = slow = None
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            points = json.loads((out / "sweep.json").read_text())["points"]
        except (OSError, ValueError):
            points = []
        fast = next((p for p in points if p["overrides"]["train.epochs"] == 1), None)
        slow = next((p for p in points if p["overrides"]["train.epochs"] == 16), None)
        if fast and fast["status"] == "done" and slow and (out / slow["id"] / "checkpoint.npz").exists():
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the sweep ended before it could be interrupted"
    os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C in a terminal: every process of the group
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert stderr.strip().startswith("interrupted: 1 of 2 points complete, 1 cancelled")
    assert "Traceback" not in stderr
    rows = {r["train.epochs"]: r for r in summary(out)}
    assert rows["1"]["status"] == "done" and rows["16"]["status"] == "cancelled"
    kept = out / fast["id"] / "model.npz"
    stamp = kept.stat().st_mtime_ns
    trained = epochs_of(out / slow["id"])
    assert 2 <= len(trained) < 16

    result = run_cli("sweep", MLP, *grid, "--scheduler", scheduler)
    assert result.exit_code == 0, result.stderr
    assert "(1 complete already)" in result.output
    resumed = int(re.search(r"resumed after epoch (\d+)", result.output).group(1))
    assert resumed % 2 == 0 and 2 <= resumed <= len(trained)  # the last checkpoint
    rows = {r["train.epochs"]: r for r in summary(out)}
    assert rows["1"]["status"] == "skipped" and rows["16"]["status"] == "done"
    assert kept.stat().st_mtime_ns == stamp
    assert epochs_of(out / slow["id"]) == list(range(1, 17))


def test_the_spec_sweep_section(tmp_path, run_cli, scheduler):
    spec = yaml.safe_load(MLP.read_text())
    spec["data"] = {k: str(CONFIGS / v) if k in ("train", "test") else v for k, v in spec["data"].items()}
    spec["train"]["epochs"] = 1
    spec["sweep"] = {"grid": {"train.optimizer.learning_rate": [0.001, 0.003, 0.01],
                              "model.layers[0].units": [16, 32]},
                     "random": 3, "seed": 7, "monitor": "val_accuracy"}
    path = tmp_path / "net.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    out = tmp_path / "sweep"

    # --grid replaces the spec's axis of the same path; random and seed come from the spec
    result = run_cli("sweep", path, "--grid", "model.layers[0].units=8,16", "--scheduler", scheduler,
                     "--sweep-dir", out)
    assert result.exit_code == 0, result.stderr
    rows = summary(out)
    assert len(rows) == 3
    assert {r["model.layers[0].units"] for r in rows} <= {"8", "16"}
    assert [float(r["best_val_accuracy"]) for r in rows] == sorted(
        (float(r["best_val_accuracy"]) for r in rows), reverse=True)
    plan = search.plan(str(path), ["model.layers[0].units=8,16"])
    assert sorted(p.id for p in plan.points) == sorted(r["point"] for r in rows)

    # `netbuild train` ignores the section, and resuming is not refused when only it changed
    run = tmp_path / "run"
    assert run_cli("train", path, "--run-dir", run, "--quiet").exit_code == 0
    spec["sweep"]["grid"] = {"seed": [1, 2]}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    resumed = run_cli("train", path, "--resume", run, "--epochs", "2", "--quiet")
    assert resumed.exit_code == 0, resumed.stderr
    assert epochs_of(run) == [1, 2]


# -- mistakes, before anything runs ----------------------------------------------------------


def test_a_bad_value_at_one_point_stops_the_sweep_before_it_starts(tmp_path, run_cli):
    out = tmp_path / "sweep"
    result = run_cli("sweep", MLP, "--grid", "model.layers[0].units=64,-5",
                     "--grid", "train.optimizer.learning_rate=0.01,0.1", "--sweep-dir", out)
    assert result.exit_code == 1
    line, = result.stderr.strip().splitlines()
    assert line.startswith("--grid model.layers[0].units=64,-5: model.layers[0].units: point units=-5_")
    assert line.endswith("(and 1 more): -5 is less than the minimum of 1")
    assert not out.exists()

    spec = MLP.read_text() + ("sweep:\n  grid:\n    train.optimizer.learning_rate: [0.01, -1]\n"
                              "    model.layers[0].activation: [relu, relux]\n")
    path = tmp_path / "net.yaml"
    path.write_text(spec.replace("data/digits", str(CONFIGS / "data" / "digits")))
    result = run_cli("sweep", path, "--sweep-dir", out)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    n = len(MLP.read_text().splitlines())
    assert lines[0].startswith(f"{path}:{n + 3}:43: train.optimizer.learning_rate: point learning_rate=-1_")
    assert lines[0].endswith("(and 1 more): -1 is less than or equal to the minimum of 0")
    assert lines[1].startswith(f"{path}:{n + 4}:40: model.layers[0].activation: point ")
    assert "unknown value 'relux'" in lines[1] and "(did you mean 'relu'?)" in lines[1]
    assert not out.exists()

    # the section itself is checked by the schema, located
    path.write_text(MLP.read_text().replace("data/digits", str(CONFIGS / "data" / "digits"))
                    + "sweep:\n  grid: {lr: 0.1, a b: [1]}\n  workerz: 2\n")
    result = run_cli("sweep", path)
    assert result.exit_code == 1
    assert f"{path}:{n + 2}:14: sweep.grid.lr: received 0.1 (a number); expected an array" in result.stderr
    assert f"{path}:{n + 2}:19: sweep.grid.a b: 'a b' is not a path; expected dotted keys" in result.stderr
    assert f"{path}:{n + 3}:3: sweep.workerz: unknown key 'workerz' (did you mean 'workers'?)" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--grid", "train.optimizer.learning_rate"], "is not PATH=V1,V2,..."),
    (["--grid", "train..lr=1,2"], "is not a path"),
    (["--grid", "train.epochs="], "gives no values"),
    (["--grid", "train.epochs=[1,2"], "cannot read the values"),
    (["--grid", "train.epochs=1,1"], "the value 1 is given twice"),
    (["--grid", "train.epochs=1,2", "--grid", "train.epochs=3"], "is given twice"),
    (["--grid", "train.optimizer=adam,sgd", "--grid", "train.optimizer.learning_rate=0.1"],
     "lies inside the swept 'train.optimizer'"),
    ([], "nothing to sweep"),
    (["--grid", "train.epochs=1,2", "--monitor", "val_acc"], "'val_acc' is not recorded"),
    (["--grid", "train.epochs=1,2", "--workers", "2", "--scheduler", "tcp://127.0.0.1:1"],
     "--workers, --threads and --backend set up the local cluster"),
    (["--grid", "train.epochs=1,2", "--threads", "2", "--scheduler", "tcp://127.0.0.1:1"],
     "--workers, --threads and --backend set up the local cluster"),
    (["--grid", "train.epochs=1,2", "--seed", "3"], "--seed picks the points of --random"),
])
def test_command_line_mistakes_are_usage_errors(run_cli, args, message):
    result = run_cli("sweep", MLP, *args)
    assert result.exit_code == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_an_unreachable_scheduler_is_one_line(tmp_path, run_cli):
    import distributed  # noqa: F401  (loads its config first: leaving `set` would remove it all)

    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        result = run_cli("sweep", MLP, "--grid", "train.epochs=1", "--scheduler", "tcp://127.0.0.1:9",
                         "--sweep-dir", tmp_path / "sweep")
    assert result.exit_code == 1
    line, = result.stderr.strip().splitlines()
    assert line.startswith("--scheduler tcp://127.0.0.1:9: cannot connect")


def test_workers_of_another_netbuild_version_are_named(tmp_path, run_cli, scheduler, monkeypatch):
    monkeypatch.setattr(cluster, "__version__", "0.0.0-other")
    result = run_cli("sweep", MLP, "--grid", "train.epochs=1", "--scheduler", scheduler,
                     "--sweep-dir", tmp_path / "sweep")
    assert result.exit_code == 1
    line, = result.stderr.strip().splitlines()
    assert line.startswith(f"--scheduler {scheduler}: tcp://") and "has netbuild 0.1.0" in line
    assert line.endswith("expected netbuild 0.0.0-other installed on every worker")


# -- the grid, without a cluster -------------------------------------------------------------


def test_grid_values_are_one_yaml_list():
    axis = search.parse_grid("model.layers[0].kernel_size=[3, 3],[5,5]")
    assert axis.path == ("model", "layers", 0, "kernel_size") and axis.values == [[3, 3], [5, 5]]
    assert search.parse_grid("train.optimizer={type: sgd, momentum: 0.9},adam").values == [
        {"type": "sgd", "momentum": 0.9}, "adam"]
    assert search.parse_grid("train.optimizer.learning_rate=1e-3,0.01,true").values == [0.001, 0.01, True]
    with pytest.raises(search.ArgumentError):
        search.parse_grid("sweep.random=1,2")


def test_points_are_every_combination_with_stable_ids():
    axes = [search.parse_grid("train.optimizer.learning_rate=0.001,0.01,0.1"),
            search.parse_grid("model.layers[0].units=16,32")]
    points = search.expand(axes)
    assert [tuple(p.overrides.values()) for p in points] == [
        (0.001, 16), (0.001, 32), (0.01, 16), (0.01, 32), (0.1, 16), (0.1, 32)]
    assert points[0].id.startswith("learning_rate=0.001_units=16-")
    assert len({p.id for p in points}) == 6
    assert [p.id for p in search.expand(axes)] == [p.id for p in points]
    # the hash covers exact values: 1 and 1.0 are different points
    assert search.point_id({"a": 1}) != search.point_id({"a": 1.0})
    assert search.point_id({"a": 1, "b": 2}).split("-")[-1] == search.point_id({"b": 2, "a": 1}).split("-")[-1]


def test_short_names_tell_the_axes_apart():
    axes = [search.parse_grid("model.layers[0].units=1"), search.parse_grid("model.layers[2].units=1"),
            search.parse_grid("model.input_shape[0]=64"), search.parse_grid("seed=1")]
    assert list(search.short_names(axes).values()) == [
        "layers[0].units", "layers[2].units", "input_shape[0]", "seed"]


def test_random_draws_are_seeded_distinct_and_in_grid_order():
    axes = [search.parse_grid("a=1,2,3,4,5"), search.parse_grid("b=1,2,3,4"), search.parse_grid("c=x,y")]
    everything = [p.id for p in search.expand(axes)]
    drawn = [p.id for p in search.expand(axes, random=7, seed=3)]
    assert len(set(drawn)) == 7 and set(drawn) <= set(everything)
    assert drawn == sorted(drawn, key=everything.index)
    assert drawn == [p.id for p in search.expand(axes, random=7, seed=3)]
    assert drawn != [p.id for p in search.expand(axes, random=7, seed=4)]
    assert [p.id for p in search.expand(axes, random=100, seed=3)] == everything


def test_a_plan_validates_every_point_and_drops_the_sweep_section(tmp_path):
    plan = search.plan(str(MLP), ["train.optimizer.learning_rate=0.01,0.1"], ["train.epochs=1"],
                      sweep_dir=tmp_path)
    assert plan.monitor == "val_loss" and plan.mode == "min" and len(plan.specs) == 2
    for point in plan.points:
        spec = plan.specs[point.id]
        assert spec.data["train"]["optimizer"]["learning_rate"] == point.overrides["train.optimizer.learning_rate"]
        assert spec.data["train"]["epochs"] == 1 and "sweep" not in spec.data
    with pytest.raises(SpecError):
        search.plan(str(tmp_path / "missing.yaml"), ["train.epochs=1"])


def test_threads_per_point_never_oversubscribe(monkeypatch):
    monkeypatch.delenv("NETBUILD_THREADS", raising=False)
    monkeypatch.setattr(threads, "available_cores", lambda: 8)
    assert search.point_threads(2, cores=8) == 4  # the cores divided among the workers
    assert search.point_threads(2, requested=2, cores=8) == 2
    assert search.point_threads(2, requested=6, cores=8) == 4 and search.point_threads(16, cores=8) == 1
    monkeypatch.setenv("NETBUILD_THREADS", "1")
    assert search.point_threads(2, cores=8) == 1
    assert search.default_workers(3, cores=8) == 3 and search.default_workers(30, cores=8) == 8
