"""`netbuild tune`: Optuna's study on Dask, pruning, a study continued after SIGKILL, the search
space checked and located before anything trains."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from conftest import CONFIGS, ROOT

from netbuild.search import cluster, space
from netbuild.spec import load_text

optuna = pytest.importorskip("optuna")

SPACE = {
    "train.optimizer.learning_rate": {"log_uniform": [1.0e-4, 1.0e-1]},
    "model.layers[0].units": {"int": [16, 128], "step": 16},
    "model.layers[1].rate": {"uniform": [0.0, 0.5]},
    "train.optimizer.type": {"choice": ["adam", "sgd"]},
}


def write_spec(tmp_path, tune: dict | None = None, epochs: int = 6, **train) -> str:
    """digits-mlp with absolute data paths, a validation split, and ``tune``."""
    spec = yaml.safe_load((CONFIGS / "digits-mlp.yaml").read_text())
    spec["data"] = {"train": str(CONFIGS / spec["data"]["train"]), "validation_split": 0.1}
    spec["train"].update(epochs=epochs, **train)
    spec["tune"] = {"space": SPACE, "monitor": "val_accuracy"} if tune is None else tune
    path = tmp_path / "net.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return str(path)


@pytest.fixture(scope="module")
def scheduler():
    local = cluster.local_cluster(2, 1)
    yield local.scheduler_address
    local.close()


def state(folder) -> dict:
    return json.loads((folder / "tune.json").read_text())


def study(folder):
    return optuna.load_study(study_name="digits-mlp", storage=f"sqlite:///{folder / 'study.db'}")


def epochs_of(run_dir) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_trials_are_pruned_and_keep_their_files(tmp_path, run_cli):
    spec = write_spec(tmp_path, epochs=9)
    out = tmp_path / "tune"
    result = run_cli("tune", spec, "--trials", "10", "--workers", "1", "--tune-dir", out)
    assert result.exit_code == 0, result.stderr
    trials = state(out)["trials"]
    assert len(trials) == 10 and len({t["id"] for t in trials}) == 10
    pruned = [t for t in trials if t["status"] == "pruned"]
    done = [t for t in trials if t["status"] == "done"]
    assert pruned and done and len(pruned) + len(done) == 10
    for t in pruned:  # stopped early, files kept, and the study says so
        assert t["epochs"] < 9 and t["message"] == f"pruned after epoch {t['epochs']}"
        assert epochs_of(out / t["id"]) == list(range(1, t["epochs"] + 1))
        assert (out / t["id"] / "model.npz").is_file() and (out / t["id"] / "checkpoint.npz").is_file()
    assert all(t["epochs"] == 9 for t in done)
    frozen = {f"trial-{t.number:04d}": t for t in study(out).trials}
    assert {tid for tid, t in frozen.items() if t.state.name == "PRUNED"} == {t["id"] for t in pruned}
    for t in done:  # the study holds each trial's best monitored value, and its point
        assert frozen[t["id"]].value == pytest.approx(t["best"])
        assert frozen[t["id"]].params["model.layers[0].units"] == t["overrides"]["model.layers[0].units"]
        stored = yaml.safe_load((out / t["id"] / "spec.yaml").read_text())
        assert stored["model"]["layers"][0]["units"] == t["overrides"]["model.layers[0].units"]
        assert stored["train"]["optimizer"]["type"] == t["overrides"]["train.optimizer.type"]
    rows = (out / "summary.csv").read_text().splitlines()
    assert rows[0].startswith("rank,trial,train.optimizer.learning_rate,model.layers[0].units")
    statuses = [r.split(",")[6] for r in rows[1:]]
    assert statuses == ["done"] * len(done) + ["pruned"] * len(pruned)  # complete ones first
    for name in ("summary.md", "history.png", "params.png"):
        assert (out / name).stat().st_size > 0
    assert f"10 trials, {len(pruned)} pruned; {sum(t['epochs'] for t in trials)} epochs trained" in result.output


def _default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_a_study_killed_with_sigkill_continues_without_repeating_trials(tmp_path, run_cli):
    spec = write_spec(tmp_path, epochs=12, batch_size=8)
    out = tmp_path / "tune"
    args = ["tune", spec, "--trials", "6", "--pruner", "none", "--tune-dir", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "netbuild", *args, "--workers", "2"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)
    deadline = time.monotonic() + 240
    finished, running = [], []
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            trials = state(out)["trials"]
        except (OSError, ValueError, KeyError):
            trials = []
        finished = [t for t in trials if t["status"] == "done"]
        running = [t for t in trials if t["status"] == "pending" and (out / t["id"] / "checkpoint.npz").exists()]
        if len(finished) >= 2 and running:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the search ended before it was killed"
    proc.send_signal(signal.SIGKILL)  # the command only: its local cluster goes down with it
    proc.communicate(timeout=60)
    stamps = {t["id"]: (out / t["id"] / "model.npz").stat().st_mtime_ns for t in finished}
    before = {t.number: t.params for t in study(out).trials}
    interrupted = [f"trial-{t.number:04d}" for t in study(out).trials if t.state.name == "RUNNING"]
    checkpointed = [tid for tid in interrupted if (out / tid / "checkpoint.npz").exists()]
    assert checkpointed

    result = run_cli(*args, "--workers", "2")
    assert result.exit_code == 0, result.stderr
    assert f"({len(stamps)} finished already)" in result.output
    frozen = study(out).trials
    assert [t.state.name for t in frozen] == ["COMPLETE"] * 6  # the total, and nothing left running
    assert all(frozen[n].params == params for n, params in before.items())  # the same points
    trials = state(out)["trials"]
    assert sorted(t["id"] for t in trials) == [f"trial-{n:04d}" for n in range(6)]
    for tid, stamp in stamps.items():  # finished trials were not trained again
        assert (out / tid / "model.npz").stat().st_mtime_ns == stamp
    for t in trials:
        assert t["status"] == "done" and epochs_of(out / t["id"]) == list(range(1, 13))
    for t in trials:  # those running at the kill went on from their last checkpoint (or had just ended)
        if t["id"] in checkpointed:
            assert t["message"].startswith("resumed after epoch") or t["message"] == (
                "complete in its folder; recorded now"), t

    more = run_cli(*args[:3], "7", *args[4:], "--workers", "1")  # --trials is the total
    assert more.exit_code == 0, more.stderr
    assert "7 trials into" in more.output and "(6 finished already)" in more.output
    assert len(study(out).trials) == 7


@pytest.mark.parametrize("entry, column, message", [
    ("model.layers[0].unitz: {int: [8, 16]}", 35, "model.layers[0].unitz: value 8 (and 1 more): "
                                                       "unknown key 'unitz' (did you mean 'units'?)"),
    ("train.optimizer.learning_rate: {log_uniform: [0, 0.1]}", 51,
     "tune.space.train.optimizer.learning_rate.log_uniform[0]: received 0; expected a number above 0"),
    ("train.optimizer.type: {choice: [adam, adamw_typo]}", 43,
     "train.optimizer.type: value adamw_typo: unknown value 'adamw_typo'"),
    ("model.layers[1].rate: {uniform: [0.0, 1.5]}", 43, "model.layers[1].rate: value 1.5: 1.5 is "
                                                             "greater than or equal to the maximum of 1"),
    ("train.optimizer.learning_rate: {uniform: [0.1, 0.01]}", 46, "received [0.1, 0.01]; expected "
                                                                      "[low, high] with low at most high"),
    ("foo bar: {int: [1, 2]}", 5, "tune.space.foo bar: 'foo bar' is not a path"),
    ("train.epochs: {int: [1, 2], uniform: [1, 2]}", 19, "received uniform, int; expected exactly one"),
    ("model.layers[0].units: {log_int: [8, 64], step: 8}", 53, "a step needs uniform or int"),
    ("model.layers[0].units: {int: [8, 60], step: 8}", 49, "received 8; expected a step that divides the "
                                                          "range [8, 60]"),
    ("tune.trials: {int: [1, 2]}", 5, "the tune section cannot be searched"),
])
def test_a_bad_space_is_one_located_line_before_anything_trains(tmp_path, run_cli, entry, column, message):
    text = (CONFIGS / "digits-mlp.yaml").read_text().replace("data/", str(CONFIGS / "data") + "/")
    lines = text.splitlines() + ["tune:", "  space:", f"    {entry}"]
    spec = tmp_path / "bad.yaml"
    spec.write_text("\n".join(lines) + "\n")
    result = run_cli("tune", spec, "--tune-dir", tmp_path / "tune")
    assert result.exit_code == 1
    line, = result.stderr.strip().splitlines()
    assert line.startswith(f"{spec}:{len(lines)}:{column}: ") and message in line, line
    assert not (tmp_path / "tune").exists()


def test_the_grid_sampler_tries_every_point_once(tmp_path, run_cli, scheduler):
    grid = {"model.layers[0].units": {"int": [16, 32], "step": 16}, "train.optimizer.type": {"choice": ["adam", "sgd"]}}
    spec = write_spec(tmp_path, {"space": grid, "sampler": "grid", "pruner": "none"}, epochs=1)
    out = tmp_path / "tune"
    result = run_cli("tune", spec, "--trials", "9", "--scheduler", scheduler, "--tune-dir", out)
    assert result.exit_code == 0, result.stderr
    assert "note: the grid has 4 points: 4 trials, not 9" in result.output
    points = sorted((t["overrides"]["model.layers[0].units"], t["overrides"]["train.optimizer.type"])
                    for t in state(out)["trials"])
    assert points == [(16, "adam"), (16, "sgd"), (32, "adam"), (32, "sgd")]
    bad = write_spec(tmp_path, {"space": SPACE, "sampler": "grid"})
    result = run_cli("tune", bad, "--tune-dir", tmp_path / "other")
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and all("the grid sampler needs values to list" in line for line in lines)


def test_the_same_directory_refuses_another_search(tmp_path, run_cli, scheduler):
    spec = write_spec(tmp_path, {"space": {"model.layers[0].units": {"int": [16, 32]}}, "pruner": "none"}, epochs=1)
    out = tmp_path / "tune"
    assert run_cli("tune", spec, "--trials", "2", "--scheduler", scheduler, "--tune-dir", out).exit_code == 0
    other = run_cli("tune", spec, "--trials", "2", "--set", "train.batch_size=64", "--scheduler", scheduler,
                    "--tune-dir", out)
    assert other.exit_code == 1
    assert "holds a search of a different spec, space or options (it differs in spec.train.batch_size)" in other.stderr
    again = run_cli("tune", spec, "--trials", "2", "--set", "train.batch_size=64", "--scheduler", scheduler,
                    "--tune-dir", out, "--overwrite")
    assert again.exit_code == 0, again.stderr
    assert [t.number for t in study(out).trials] == [0, 1]
    assert all(yaml.safe_load((out / f"trial-000{n}" / "spec.yaml").read_text())["train"]["batch_size"] == 64
               for n in (0, 1))


def test_no_tune_section_and_a_bad_monitor(tmp_path, run_cli):
    spec = write_spec(tmp_path, {"space": SPACE})
    result = run_cli("tune", spec, "--monitor", "val_f1", "--tune-dir", tmp_path / "tune")
    assert result.exit_code == 2 and "'val_f1' is not recorded by this run" in result.stderr
    plain = tmp_path / "plain.yaml"
    plain.write_text((CONFIGS / "digits-mlp.yaml").read_text())
    result = run_cli("tune", plain)
    assert result.exit_code == 1
    assert result.stderr.strip() == (f"{plain}: no tune section; expected one with the space to search, "
                                     "e.g. tune: {space: {train.optimizer.learning_rate: {log_uniform: "
                                     "[1.0e-4, 1.0e-1]}}}")


def test_without_optuna_the_command_says_what_to_install(run_cli, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "optuna", None)
    result = run_cli("tune", write_spec(tmp_path))
    assert result.exit_code == 1
    assert result.stderr.strip() == ("netbuild tune needs optuna and optuna-integration, which are not "
                                     "installed; install them with: pip install 'netbuild[tune]'")


def test_a_space_parses_to_the_values_optuna_suggests():
    spec = load_text(yaml.safe_dump({"tune": {"space": {
        "a": {"int": [3, 11], "step": 4}, "b": {"uniform": [0.0, 1.0], "step": 0.25},
        "c": {"choice": [[3, 3], {"k": 1}]}, "d": {"log_uniform": [1.0e-3, 1.0]}}}}), "s.yaml")
    a, b, c, d = space.parse(spec)
    assert a.grid_values() == [3, 7, 11] and a.ends() == [3, 11]
    assert b.grid_values() == [0.0, 0.25, 0.5, 0.75, 1.0] and d.grid_values() is None and d.ends() == [1.0e-3, 1.0]
    trial = optuna.trial.FixedTrial({"a": 7, "b": 0.5, "c": 1, "d": 0.01})
    assert [p.suggest(trial) for p in (a, b, c, d)] == [7, 0.5, {"k": 1}, 0.01]
    assert c.value_of(0) == [3, 3]  # a choice of lists is stored by its index
    assert [w.source for w in c.end_where] == ["s.yaml", "s.yaml"]
    assert c.end_where[0].line < c.end_where[1].line  # each choice where it is written


def test_probes_set_one_end_at_a_time():
    spec = load_text(yaml.safe_dump({"tune": {"space": {"a": {"int": [1, 2]}, "b": {"choice": ["x", "y", "z"]}}}}),
                     "s.yaml")
    probes = [values for _, _, _, values in space.probe_points(space.parse(spec))]
    assert probes == [{"a": 1, "b": "x"}, {"a": 2, "b": "x"}, {"a": 1, "b": "x"}, {"a": 1, "b": "y"},
                      {"a": 1, "b": "z"}]


def test_check_reports_what_tune_would_of_its_section(tmp_path, run_cli):
    spec = write_spec(tmp_path, {"space": {"train.optimizer.learning_rate": {"uniform": [0.1, 0.01]}}})
    result = run_cli("check", spec, "--no-data")
    assert result.exit_code == 1
    assert "tune.space.train.optimizer.learning_rate.uniform: received [0.1, 0.01]" in result.stderr
    assert run_cli("check", write_spec(tmp_path), "--no-data").exit_code == 0


def test_ctrl_c_stops_the_search_and_keeps_what_finished(tmp_path):
    spec = write_spec(tmp_path, epochs=12, batch_size=8)
    out = tmp_path / "tune"
    proc = subprocess.Popen([sys.executable, "-m", "netbuild", "tune", spec, "--trials", "6", "--pruner", "none",
                             "--workers", "2", "--tune-dir", str(out)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=_default_sigint)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            trials = state(out)["trials"]
        except (OSError, ValueError, KeyError):
            trials = []
        if any(t["status"] == "done" for t in trials) and any(
                t["status"] == "pending" and (out / t["id"] / "checkpoint.npz").exists() for t in trials):
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the search ended before it could be interrupted"
    os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C in a terminal: every process of the group
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    line, = [line for line in stderr.splitlines() if line.startswith("interrupted: ")]
    assert "cancelled; the summary is in" in line
    assert line.endswith("run the same command again to continue (finished trials are kept, interrupted "
                         "ones resume)")
    trials = state(out)["trials"]
    assert {"done", "cancelled"} <= {t["status"] for t in trials}
    cancelled = {t["id"] for t in trials if t["status"] == "cancelled"}
    assert {f"trial-{t.number:04d}" for t in study(out).trials if t.state.name == "RUNNING"} == cancelled
    assert "cancelled" in (out / "summary.csv").read_text()


def test_the_options_schema_and_code_name_the_same_samplers_pruners_and_trackers():
    from netbuild.cli import cli
    from netbuild.spec import schema
    from netbuild.tracking import BACKENDS

    defs = schema()["$defs"]
    options = {p.name: p.type.choices for p in cli.commands["tune"].params if hasattr(p.type, "choices")}
    assert tuple(options["sampler"]) == space.SAMPLERS == tuple(defs["tune"]["properties"]["sampler"]["enum"])
    assert tuple(options["pruner"]) == space.PRUNERS == tuple(defs["tune"]["properties"]["pruner"]["enum"])
    assert tuple(options["track"]) == (*BACKENDS, "none") and tuple(defs["tracking"]["properties"]["backend"]["enum"]) == BACKENDS
    assert set(defs["tune_range"]["properties"]) == {*space.KINDS, "step"}


def test_a_pruned_run_stays_pruned_when_found_again(tmp_path, run_cli):
    """A trial pruned by a command killed before it told the study: its folder says so
    (``halted`` in the checkpoint), and the next command records it pruned, not complete."""
    from netbuild.runs import inspect_run
    from netbuild.search.task import PRUNED, Task, run_point
    from netbuild.spec import load_spec
    from netbuild.training import Callbacks

    spec = load_spec(write_spec(tmp_path, epochs=5))

    class Prune:  # what a Reporter gives a trial whose pruner says stop after epoch 2
        def callbacks(self):
            return Callbacks(stop=lambda record: record["epoch"] == 2)

    folder = tmp_path / "trial-0000"
    record = run_point(Task("trial-0000", {}, spec, str(folder), "val_accuracy", "max", report=Prune()))
    assert record["status"] == PRUNED and record["epochs"] == 2
    state = inspect_run(folder, spec)
    assert state.kind == "complete" and state.halted
    again = run_point(Task("trial-0000", {}, spec, str(folder), "val_accuracy", "max"))
    assert again["status"] == PRUNED and again["message"] == "pruned after epoch 2"
    result = run_cli("train", "--resume", folder, "--epochs", "6")
    assert result.exit_code == 1 and "this run already stopped early (after epoch 2)" in result.stderr
