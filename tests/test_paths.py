"""Paths that lead somewhere else: a spec's data path through `..` or a symbolic link is resolved
the way the file system resolves it and shown resolved; `train --run-dir` through a link or `..`
to another run is refused with the real path, and that run's files are left as they were."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import CONFIGS

from netbuild import data
from netbuild.spec import load_spec
from netbuild.runs import RunDir, resolved_spec_data

MLP = CONFIGS / "digits-mlp.yaml"
TRAIN_NPZ = CONFIGS / "data" / "digits-train.npz"

SPEC = """\
name: paths
data:
  train: {file}
model:
  input_shape: [64]
  layers:
    - {{type: dense, units: 10, activation: softmax}}
train:
  loss: categorical_crossentropy
  optimizer: {{type: adam}}
  epochs: 1
"""


def nan_file(path) -> None:
    with np.load(TRAIN_NPZ) as f:
        x, y = f["x"][:20].copy(), f["y"][:20]
    x[0, 0] = np.nan
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=x, y=y)


def good_file(path) -> None:
    with np.load(TRAIN_NPZ) as f:
        x, y = f["x"][:20], f["y"][:20]
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=x, y=y)


def spec_naming(folder, file: str):
    folder.mkdir(parents=True, exist_ok=True)
    spec = folder / "spec.yaml"
    spec.write_text(SPEC.format(file=file))
    return spec


def one_line(result) -> str:
    assert result.exit_code == 1, (result.output, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    return lines[0]


NAN_MESSAGE = "key 'x': holds 1 NaN value (the first in example 0); expected finite numbers"


def test_a_data_path_through_dotdot_is_shown_resolved(tmp_path, run_cli):
    nan_file(tmp_path / "shared" / "bad.npz")
    spec = spec_naming(tmp_path / "specs" / "a", "../../shared/bad.npz")
    line = one_line(run_cli("check", spec))
    assert line == f"{spec}:3:10: data.train: {tmp_path.resolve() / 'shared' / 'bad.npz'}: {NAN_MESSAGE}"


def test_a_data_path_through_a_symlink_is_shown_resolved(tmp_path, run_cli):
    real = tmp_path / "elsewhere" / "real.npz"
    nan_file(real)
    spec = spec_naming(tmp_path / "specs", "link.npz")
    (tmp_path / "specs" / "link.npz").symlink_to(real)
    line = one_line(run_cli("check", spec))
    assert line == f"{spec}:3:10: data.train: {real.resolve()}: {NAN_MESSAGE}"


def test_dotdot_after_a_symlinked_folder_goes_where_the_file_system_goes(tmp_path, run_cli):
    """`deep/../d.npz` where `deep` is a link: the file system (and the run's spec.yaml) reach the
    link target's parent, not the spec's folder; check reads that same file."""
    good_file(tmp_path / "target" / "d.npz")  # where the file system leads
    (tmp_path / "target" / "inner").mkdir()
    spec = spec_naming(tmp_path / "specs", "deep/../d.npz")
    nan_file(tmp_path / "specs" / "d.npz")  # where a textual `..` would lead
    (tmp_path / "specs" / "deep").symlink_to(tmp_path / "target" / "inner")
    result = run_cli("check", spec)
    assert result.exit_code == 0, result.stderr
    loaded = load_spec(str(spec))
    recorded = resolved_spec_data(loaded)["data"]["train"]
    assert recorded == str(data.resolve_path(loaded, "deep/../d.npz")) == str((tmp_path / "target" / "d.npz").resolve())


def test_a_dangling_symlink_on_the_command_line_says_where_it_points(tmp_path, run_cli):
    link = tmp_path / "data.npz"
    link.symlink_to(tmp_path / "gone.npz")
    spec = load_spec(str(MLP))
    from netbuild import runs
    from netbuild.network import Network

    runs.save_model(tmp_path / "model.npz", spec, Network.from_spec(spec).param_values())
    line = one_line(run_cli("eval", tmp_path / "model.npz", "--data", link))
    assert line == f"{tmp_path.resolve() / 'gone.npz'}: file not found (the symbolic link {link} leads here)"


@pytest.fixture(scope="module")
def other_run(tmp_path_factory):
    """A finished run of digits-mlp (one epoch) that other commands must leave alone."""
    from click.testing import CliRunner

    from netbuild.cli import cli

    run = tmp_path_factory.mktemp("other") / "run"
    result = CliRunner().invoke(cli, ["train", str(MLP), "--run-dir", str(run), "--epochs", "1", "--quiet"])
    assert result.exit_code == 0, result.stderr
    return run


def snapshot(run) -> dict:
    """Every file of a run: its bytes and its modification time."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(run.iterdir())}


@pytest.mark.parametrize("how", ["symlink", "dotdot"])
def test_train_into_another_run_through_a_link_or_dotdot_is_refused(how, other_run, tmp_path, run_cli):
    before = snapshot(other_run)
    if how == "symlink":
        target = tmp_path / "my-run"
        target.symlink_to(other_run)
    else:
        (tmp_path / "sub").mkdir()
        target = tmp_path / "sub" / ".." / os.path.relpath(other_run, tmp_path)
    line = one_line(run_cli("train", MLP, "--run-dir", target, "--epochs", "1", "--quiet"))
    assert line.startswith(f"{target} (resolves to {other_run.resolve()}): the run directory already holds a run")
    assert "--resume" in line and "--overwrite" in line
    assert snapshot(other_run) == before


def test_the_lock_holds_through_a_link(other_run, tmp_path, run_cli):
    """Two trainings that reach one folder by different paths are still refused by its lock."""
    link = tmp_path / "link"
    link.symlink_to(other_run)
    holder = RunDir(other_run)
    holder.lock()
    try:
        before = snapshot(other_run)
        line = one_line(run_cli("train", MLP, "--run-dir", link, "--overwrite", "--quiet"))
        assert line.startswith(f"{link} (resolves to {other_run.resolve()}): another `netbuild train` "
                               f"(pid {os.getpid()}) is writing to this run directory")
        assert snapshot(other_run) == before
    finally:
        holder.unlock()


def test_run_dir_mistakes_give_one_line(tmp_path, run_cli):
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    line = one_line(run_cli("train", MLP, "--run-dir", dangling, "--quiet"))
    assert "a symbolic link to" in line and "which does not exist" in line
    afile = tmp_path / "afile"
    afile.write_text("mine")
    result = run_cli("train", MLP, "--run-dir", afile, "--quiet")
    assert result.exit_code == 2 and "Traceback" not in result.stderr  # Click: 'is a file'
    assert afile.read_text() == "mine"
    assert one_line(run_cli("train", "--resume", tmp_path / "nothing")).endswith(
        "not a run directory (no spec.yaml); expected a folder written by `netbuild train`")
    assert one_line(run_cli("check", tmp_path)).endswith("is a folder; expected a YAML file")


def test_a_killed_runs_temporary_files_do_not_block_a_new_start(tmp_path, run_cli):
    """SIGKILL during the first write leaves only the lock and a temporary file: a plain
    `train` starts (the temporary is removed under the lock), no --overwrite needed."""
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text("pid 1")
    (run / ".spec.yaml.k2j3h4.tmp").write_text("half a spec")
    (run / "notes.txt").write_text("the user's")
    line = one_line(run_cli("train", MLP, "--run-dir", run, "--epochs", "1", "--quiet"))
    assert "already holds a run" in line  # a file of the user's is never removed
    (run / "notes.txt").unlink()
    (run / ".spec.yaml.k2j3h4.tmp").write_text("half a spec")
    result = run_cli("train", MLP, "--run-dir", run, "--epochs", "1", "--quiet")
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in run.iterdir()) == [".lock", "checkpoint.npz", "curves.png",
                                                     "metrics.jsonl", "model.npz", "spec.yaml"]
    assert yaml.safe_load((run / "spec.yaml").read_text())["name"] == "digits-mlp"


@pytest.fixture
def model(tmp_path):
    from netbuild import runs
    from netbuild.network import Network

    spec = load_spec(str(MLP))
    path = tmp_path / "model.npz"
    runs.save_model(path, spec, Network.from_spec(spec).param_values())
    return path


@pytest.mark.parametrize("odd", ["loop", "too-long", "fifo"])
def test_odd_paths_give_one_line_and_never_block(odd, model, tmp_path, run_cli):
    """A loop of symbolic links, a name longer than the file system allows, a named pipe: as a
    data file (in a spec and on the command line), a model, an output, a run directory."""
    if odd == "loop":
        path = tmp_path / "loop-a"
        path.symlink_to(tmp_path / "loop-b")
        (tmp_path / "loop-b").symlink_to(path)
    elif odd == "too-long":
        path = tmp_path / ("x" * 300)
    else:
        path = tmp_path / "pipe.npz"
        os.mkfifo(path)
    spec = spec_naming(tmp_path / "specs", str(path))
    commands = [
        ["check", spec],
        ["eval", model, "--data", path],
        ["predict", model, "--data", path, "--out", tmp_path / "p.npz"],
        ["eval", path],
        ["train", "--resume", path],
        ["train", MLP, "--run-dir", path, "--quiet"],
    ]
    if odd != "fifo":
        commands.append(["predict", model, "--data", TRAIN_NPZ, "--out", path])
    for args in commands:
        result = run_cli(*args)
        assert result.exit_code in (1, 2), (args, result.stderr)
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, (args, result.stderr)
        assert not (tmp_path / "p.npz").exists()


@pytest.mark.parametrize("odd", ["fifo", "device", "newline", "loop"])
def test_an_odd_spec_file_gives_one_line_and_never_blocks(odd, tmp_path, run_cli):
    """A named pipe or a device given as the spec is refused before it is read (reading would
    block, or never end); a control character in its name stays escaped on one line."""
    if odd == "fifo":
        path = tmp_path / "net.yaml"
        os.mkfifo(path)
    elif odd == "device":
        path = "/dev/zero"
    elif odd == "newline":
        path = tmp_path / "a\nb.yaml"
    else:
        path = tmp_path / "loop.yaml"
        path.symlink_to(path)
    for args in (["check", path], ["train", path, "--quiet", "--run-dir", tmp_path / "run"]):
        line = one_line(run_cli(*args))
        expected = {"fifo": "is not a regular file (a device, pipe or socket); expected a YAML file",
                    "device": "is not a regular file (a device, pipe or socket); expected a YAML file",
                    "newline": "file not found", "loop": "cannot read: "}[odd]
        assert expected in line, (args, line)
    if odd == "newline":
        assert "a\\nb.yaml" in line
    assert not (tmp_path / "run").exists()


def test_a_spec_piped_through_standard_input():
    """`... | netbuild check /dev/stdin` reads the pipe (relative data paths from the current
    folder); a named pipe that is not standard input is still refused, as above."""
    netbuild = Path(sys.executable).with_name("netbuild")
    done = subprocess.run([str(netbuild), "check", "/dev/stdin", "--format", "json"],
                          input=MLP.read_bytes(), cwd=CONFIGS, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["ok"] is True
    done = subprocess.run([str(netbuild), "check", "/dev/stdin"], input=b"model: [",
                          capture_output=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.decode().startswith("/dev/stdin:1:"), done.stderr


def test_a_nul_byte_in_a_data_path(tmp_path, run_cli):
    spec = spec_naming(tmp_path, '"a\\0b.npz"')
    line = one_line(run_cli("check", spec))
    assert line.endswith("a\\x00b.npz: file not found (the name holds a NUL byte)")
