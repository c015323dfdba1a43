"""Training that can be trusted: exact resume after SIGKILL, early stopping, divergence, quality
gates, locks, checkpoints and curves, through the real CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import CONFIGS, ROOT, SPECS

from netbuild.runs import RunDir

MLP = CONFIGS / "digits-mlp.yaml"
TEST_NPZ = CONFIGS / "data" / "digits-test.npz"


def params(path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files if not k.startswith("__")}


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), key


def netbuild(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "netbuild", *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# Small batches make epochs long enough (hundreds of steps) to be killed in the middle of one.
SLOW = ["--set", "train.batch_size=4", "--set", "train.optimizer.type=sgd",
        "--set", "train.optimizer.learning_rate=0.01", "--set", "train.optimizer.momentum=0.9"]


@pytest.mark.parametrize("config", [MLP, CONFIGS / "digits-multi.yaml", "shards", "jax"],
                         ids=["mlp", "two-outputs", "shards", "jax"])
def test_sigkill_mid_epoch_then_resume_is_bitwise_identical(config, tmp_path, run_cli, monkeypatch):
    # Epochs of digits-mlp in batches of 4 take a fraction of a second: enough of them that the
    # kill lands well before the end, whatever the machine's speed. digits-multi: two inputs,
    # two outputs and their losses; shards: digits-mlp on its training rows in three files,
    # memory-mapped (read by the background reader when it is killed); jax: digits-mlp on the
    # jax backend, every run of it (the reference, the killed one, the resume).
    epochs = "12"
    extra = list(SLOW)
    if config == "jax":
        pytest.importorskip("jax")
        monkeypatch.setenv("NETBUILD_BACKEND", "jax")
        config = MLP
    if config == "shards":
        from test_shards import shards

        monkeypatch.setenv("NETBUILD_IN_MEMORY_MAX", "0")

        config = MLP
        extra += ["--set", "data.train=[" + ", ".join(shards(tmp_path / "shards")) + "]"]
    reference = tmp_path / "reference"
    result = run_cli("train", config, "--run-dir", reference, "--epochs", epochs, "--quiet", *extra)
    assert result.exit_code == 0, result.stderr

    killed = tmp_path / "killed"
    proc = netbuild("train", config, "--run-dir", killed, "--epochs", epochs, "--quiet", *extra)
    metrics = killed / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.01)
    time.sleep(0.05)  # into the third epoch
    assert proc.poll() is None, "training ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # The checkpoint says where training resumes: a kill between an epoch's metrics.jsonl line and
    # its checkpoint.npz leaves one more line than checkpoints (the resume drops it).
    with np.load(killed / "checkpoint.npz", allow_pickle=False) as f:
        done = json.loads(str(f["__state__"]))["epoch"]
    assert 2 <= done < int(epochs)

    result = run_cli("train", "--resume", killed, "--epochs", epochs)
    assert result.exit_code == 0, result.stderr
    assert f"resumed after epoch {done} of {epochs}" in result.output
    assert_bitwise_equal(params(killed / "model.npz"), params(reference / "model.npz"))
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    expected = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(1, int(epochs) + 1))
    assert records[0].keys() == expected[0].keys()
    for key in records[0]:
        if key not in ("seconds", "samples_per_second"):
            assert [r[key] for r in records] == [r[key] for r in expected], key


def test_resume_refuses_a_changed_spec_unless_forced(tmp_path, run_cli):
    run = tmp_path / "run"
    assert run_cli("train", MLP, "--run-dir", run, "--epochs", "1", "--quiet").exit_code == 0
    result = run_cli("train", MLP, "--resume", run, "--epochs", "2",
                     "--set", "train.optimizer.learning_rate=0.5", "--set", "model.layers[0].units=64")
    assert result.exit_code == 1
    assert "differs from the run's in model.layers[0].units, train.optimizer.learning_rate" in result.stderr
    assert "--force" in result.stderr
    result = run_cli("train", MLP, "--resume", run, "--epochs", "2", "--quiet",
                     "--set", "train.optimizer.learning_rate=0.005", "--force")
    assert result.exit_code == 0, result.stderr
    # the same spec with more epochs is a plain continuation
    result = run_cli("train", MLP, "--resume", run, "--epochs", "3", "--quiet",
                     "--set", "train.optimizer.learning_rate=0.005")
    assert result.exit_code == 0, result.stderr
    assert "learning_rate: 0.005" in (run / "spec.yaml").read_text()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3


def test_early_stopping_restores_the_best_epoch(tmp_path, run_cli):
    run = tmp_path / "run"
    result = run_cli("train", SPECS / "valid" / "early-stopping.yaml", "--run-dir", run)
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) < 60 and "early stopping after epoch" in result.output
    losses = [r["val_loss"] for r in records]
    best = int(np.argmin(losses))
    assert len(records) - 1 - best == 3  # patience 2: stopped on the third epoch without a gain
    evaluated = json.loads(run_cli("eval", run, "--data", TEST_NPZ, "--format", "json").output)
    assert evaluated["metrics"]["loss"] == pytest.approx(losses[best], rel=1e-5)


def test_divergence_stops_at_the_batch_and_keeps_the_last_good_epoch(tmp_path, run_cli):
    spec = SPECS / "valid" / "regression-sgd.yaml"
    run = tmp_path / "run"
    assert run_cli("train", spec, "--run-dir", run, "--epochs", "1", "--quiet").exit_code == 0
    good = params(run / "model.npz")
    result = run_cli("train", spec, "--resume", run, "--epochs", "3", "--force",
                     "--set", "train.optimizer.learning_rate=1000", "--set", "train.loss=mse")
    assert result.exit_code == 1
    line = result.stderr.strip()
    assert "loss became" in line and "at epoch 2, batch" in line and "Traceback" not in line
    assert "the last good epoch (1) is kept" in line
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    assert_bitwise_equal(params(run / "model.npz"), good)


def test_quality_gates_exit_3(tmp_path, run_cli):
    run = tmp_path / "run"
    assert run_cli("train", MLP, "--run-dir", run, "--epochs", "2", "--quiet").exit_code == 0
    ok = run_cli("eval", run, "--fail-under", "accuracy=0.5", "--fail-over", "loss=5")
    assert ok.exit_code == 0, ok.stderr
    bad = run_cli("eval", run, "--fail-under", "accuracy=0.999", "--fail-over", "loss=0.0001")
    assert bad.exit_code == 3
    assert "accuracy" in bad.stderr and "is under the threshold 0.999" in bad.stderr
    assert "is over the threshold 0.0001" in bad.stderr
    assert run_cli("eval", run, "--fail-under", "f1=0.5").exit_code == 2  # not a metric of it
    assert run_cli("eval", run, "--fail-under", "accuracy").exit_code == 2


def test_confusion_matrix_counts_every_example(tmp_path, run_cli):
    run = tmp_path / "run"
    assert run_cli("train", MLP, "--run-dir", run, "--epochs", "2", "--quiet").exit_code == 0
    result = run_cli("eval", run, "--confusion", "--format", "json")
    matrix = np.array(json.loads(result.output)["confusion_matrix"])
    assert matrix.shape == (10, 10) and matrix.sum() == 360
    assert np.trace(matrix) / 360 == pytest.approx(json.loads(result.output)["metrics"]["accuracy"])
    assert "true \\ pred" in run_cli("eval", run, "--confusion").output


def test_run_directory_holds_checkpoint_and_curves(tmp_path, run_cli):
    run = tmp_path / "run"
    assert run_cli("train", MLP, "--run-dir", run, "--epochs", "2", "--quiet").exit_code == 0
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with np.load(run / "checkpoint.npz", allow_pickle=False) as f:
        state = json.loads(str(f["__state__"]))
        assert state["epoch"] == 2 and len(state["history"]) == 2
        assert "optimizer/dense_0/W/m" in f.files and "params/out/b" in f.files


@pytest.mark.parametrize("every_s", [10.0, 0.0])
def test_curves_are_drawn_at_the_end_and_every_few_seconds(every_s, tmp_path, run_cli, monkeypatch):
    """Drawing curves.png takes longer than an epoch of a small network: it is drawn after the
    last epoch, and before that only once CURVES_EVERY_S have passed since the last drawing."""
    from netbuild import runs, training

    drawn = []
    save = runs.RunDir.save_curves
    monkeypatch.setattr(training, "CURVES_EVERY_S", every_s)
    monkeypatch.setattr(runs.RunDir, "save_curves",
                        lambda self, records: drawn.append(len(records)) or save(self, records))
    run = tmp_path / "run"
    assert run_cli("train", MLP, "--run-dir", run, "--epochs", "3", "--quiet").exit_code == 0
    assert drawn == ([3] if every_s else [1, 2, 3])
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_locked_run_directory_is_refused(tmp_path, run_cli):
    run = tmp_path / "run"
    holder = RunDir(run)
    holder.create()
    try:
        result = run_cli("train", MLP, "--run-dir", run, "--overwrite")
        assert result.exit_code == 1
        assert f"pid {os.getpid()}" in result.stderr and "is writing to this run directory" in result.stderr
    finally:
        holder.unlock()


def test_resume_without_a_checkpoint_starts_over(tmp_path, run_cli):
    run = tmp_path / "run"
    assert run_cli("train", MLP, "--run-dir", run, "--epochs", "1", "--quiet").exit_code == 0
    (run / "checkpoint.npz").unlink()
    result = run_cli("train", "--resume", run, "--epochs", "1", "--quiet")
    assert result.exit_code == 0, result.stderr
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1


@pytest.mark.parametrize("args", [["train"], ["train", "--resume", "x", "--overwrite"]])
def test_train_usage(run_cli, args):
    assert run_cli(*args).exit_code == 2


def test_resume_of_a_finished_or_stopped_run_says_so(tmp_path, run_cli):
    run = tmp_path / "run"
    assert run_cli("train", MLP, "--run-dir", run, "--epochs", "2", "--quiet").exit_code == 0
    result = run_cli("train", "--resume", run)  # --epochs 2 was recorded in the run's spec
    assert result.exit_code == 1 and "already trained all its epochs (2 epochs)" in result.stderr
    stopped = tmp_path / "stopped"
    assert run_cli("train", SPECS / "valid" / "early-stopping.yaml", "--run-dir", stopped, "--quiet").exit_code == 0
    result = run_cli("train", "--resume", stopped, "--epochs", "100")
    assert result.exit_code == 1 and "already stopped early" in result.stderr


def test_validation_targets_may_be_one_hot_while_training_ids_are_not(tmp_path, run_cli):
    with np.load(TEST_NPZ) as f:
        np.savez(tmp_path / "val.npz", x=f["x"], y=np.eye(10, dtype=np.float32)[f["y"]])
    result = run_cli("train", MLP, "--run-dir", tmp_path / "run", "--epochs", "1", "--quiet",
                     "--set", "data.validation_split=0", "--set", f"data.validation={tmp_path / 'val.npz'}")
    assert result.exit_code == 1  # validation and validation_split exclude each other
    spec = tmp_path / "spec.yaml"
    text = (SPECS / "valid" / "early-stopping.yaml").read_text().replace(
        "../../../configs/data/digits-test.npz", str(tmp_path / "val.npz")).replace(
        "../../../configs/data/digits-train.npz", str(CONFIGS / "data" / "digits-train.npz"))
    spec.write_text(text)
    result = run_cli("train", spec, "--run-dir", tmp_path / "run2", "--epochs", "2", "--quiet")
    assert result.exit_code == 0, result.stderr


def test_output_files_get_the_usual_permissions(tmp_path, run_cli):
    run = tmp_path / "run"
    old = os.umask(0o022)
    try:
        assert run_cli("train", MLP, "--run-dir", run, "--epochs", "1", "--quiet").exit_code == 0
    finally:
        os.umask(old)
    assert (run / "model.npz").stat().st_mode & 0o777 == 0o644


def _files_load(run) -> None:
    """Every file a killed run left behind is complete and readable."""
    for name in ("model.npz", "checkpoint.npz"):
        if (run / name).exists():
            with np.load(run / name, allow_pickle=False) as f:
                for key in f.files:
                    f[key]
    if (run / "metrics.jsonl").exists():
        [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    if (run / "spec.yaml").exists():
        import yaml

        assert yaml.safe_load((run / "spec.yaml").read_text())["name"] == "digits-mlp"
    if (run / "curves.png").exists():
        data = (run / "curves.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and data.endswith(b"IEND\xaeB`\x82")


def _start_and_kill(args: list, log, delay: float, threads: int = 1) -> None:
    """Start ``netbuild ARGS`` on ``threads`` threads, wait until its training function is
    compiled, let it run for ``delay`` seconds (a new epoch's writes start about every 10 ms),
    then SIGKILL it."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", NETBUILD_THREADS=str(threads))
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "netbuild", *map(str, args)], cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        while "compiled in" not in log.read_text() and proc.poll() is None:
            assert time.monotonic() < deadline, "training did not start within 120 s"
            time.sleep(0.005)
        time.sleep(delay)
        assert proc.poll() is None, f"training ended before it was killed: {log.read_text()}"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    text = log.read_text()
    assert "Traceback" not in text and "Error" not in text, text  # it was training, not failing


@pytest.mark.parametrize("kills, threads", [pytest.param(20, 1, id="20-kills"),
                                            pytest.param(50, 2, id="50-kills-2-threads",
                                                         marks=pytest.mark.slow)])
def test_killed_at_random_instants_then_resumed_is_bitwise_identical(kills, threads, tmp_path, run_cli):
    """SIGKILL training (then each resume, on ``threads`` threads) ``kills`` times, each at a
    random instant of its first 1.2 s of training (epochs, writes of every file, the rewrites at a
    resume); after each kill every file loads. Then the run is resumed (on one thread) to one epoch
    past where it stands and must equal, bit for bit, a run of as many epochs never interrupted."""
    run = tmp_path / "run"
    log = tmp_path / "log"
    rng = np.random.default_rng(kills)
    for _ in range(kills):
        if (run / "spec.yaml").exists():
            _start_and_kill(["train", "--resume", run], log, rng.uniform(0.0, 1.2), threads)
        else:  # killed before its first file: a fresh start (the folder holds only the lock)
            # An epoch of this MLP with its writes takes about 10 ms, so the kills' 0.6 s on
            # average add up to thousands of epochs: the run must never reach its last one.
            _start_and_kill(["train", MLP, "--run-dir", run, "--epochs", "1000000"], log,
                            rng.uniform(0.0, 1.2), threads)
        _files_load(run)
    checkpoint = run / "checkpoint.npz"
    done = 0
    if checkpoint.exists():
        with np.load(checkpoint, allow_pickle=False) as f:
            done = json.loads(str(f["__state__"]))["epoch"]
    target = str(done + 1)
    result = run_cli("train", "--resume", run, "--epochs", target, "--quiet")
    assert result.exit_code == 0, result.stderr
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]  # a kill's leftovers are gone

    reference = tmp_path / "reference"
    assert run_cli("train", MLP, "--run-dir", reference, "--epochs", target, "--quiet").exit_code == 0
    assert_bitwise_equal(params(run / "model.npz"), params(reference / "model.npz"))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in records] == [r["loss"] for r in expected]


def test_a_failing_write_is_reported_and_keeps_the_previous_file(tmp_path, run_cli, monkeypatch):
    """A full disk, simulated: writes fail from the second epoch's model.npz on."""
    import errno

    import netbuild.runs as runs

    run = tmp_path / "run"
    assert run_cli("train", MLP, "--run-dir", run, "--epochs", "1", "--quiet").exit_code == 0
    before = (run / "model.npz").read_bytes()
    real = runs.atomic_write

    def full_disk(path, data):
        if path.name == "model.npz":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(path, data)

    monkeypatch.setattr(runs, "atomic_write", full_disk)
    result = run_cli("train", "--resume", run, "--epochs", "2")
    assert result.exit_code == 1
    assert f"{run / 'model.npz'}: cannot write: No space left on device" in result.stderr
    assert "Traceback" not in result.stderr
    assert (run / "model.npz").read_bytes() == before


def test_progress_on_a_terminal(tmp_path):
    """On a terminal, a progress line per batch (with loss and throughput), then the epoch line."""
    import pty

    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "netbuild", "train", str(MLP), "--run-dir",
                             str(tmp_path / "run"), "--epochs", "2"], cwd=ROOT, stdout=follower,
                            stderr=subprocess.PIPE, text=True)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 4096)
        except OSError:  # the terminal closes when the process ends
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=120) == 0, proc.stderr.read()
    os.close(leader)
    screen = b"".join(chunks).decode()
    assert "samples/s" in screen and "[" in screen and "/41  loss" in screen
    assert "epoch 2/2  loss" in screen and "Traceback" not in screen


def test_training_freezes_garbage_only_while_it_trains(tmp_path, run_cli, monkeypatch):
    """`netbuild train` keeps the compiled graphs out of the cyclic collector while it trains, and
    lets it have them again afterwards: a process that trains many times (a sweep's worker) frees
    each training's cycles."""
    import gc

    from netbuild import training as train_mod

    counts = []
    real_run_epoch = train_mod.Trainer.run_epoch

    def run_epoch(self, epoch):
        counts.append(gc.get_freeze_count())
        return real_run_epoch(self, epoch)

    monkeypatch.setattr(train_mod.Trainer, "run_epoch", run_epoch)
    assert gc.get_freeze_count() == 0
    result = run_cli("train", MLP, "--run-dir", tmp_path / "run", "--epochs", "2", "--quiet")
    assert result.exit_code == 0, result.output
    assert len(counts) == 2 and min(counts) > 10_000  # the graphs were frozen while training
    assert gc.get_freeze_count() == 0
