"""A run directory that cannot be written (read-only, no permission, a full disk): one line naming
the file or folder and the reason, exit 1, and every file of the run as it was.

Where the machine allows, the conditions are real: a read-only bind mount and a small tmpfs in a
private mount namespace (`unshare -m`), and a process without root's capabilities
(`setpriv --bounding-set=-all`) for a folder without write permission. The same failures are
also simulated in-process, so that they are tested on every machine."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import CONFIGS, ROOT

from netbuild import runs

MLP = CONFIGS / "digits-mlp.yaml"
TEST_NPZ = CONFIGS / "data" / "digits-test.npz"

# Runs inside the mount namespace: each action in order, one JSON result per action on stdout.
DRIVER = r'''
import hashlib, json, os, subprocess, sys
root, actions = sys.argv[1], json.loads(sys.argv[2])
out = []
for kind, *args in actions:
    if kind == "sh":
        subprocess.run(args, check=True)
        out.append(None)
    elif kind == "netbuild":
        p = subprocess.run([sys.executable, "-m", "netbuild", *args], cwd=root, capture_output=True, text=True)
        out.append({"rc": p.returncode, "stdout": p.stdout, "stderr": p.stderr})
    elif kind == "fill":  # every free block, then give back ``args[1]`` bytes
        fd = os.open(args[0], os.O_WRONLY | os.O_CREAT, 0o644)
        for size in (1 << 20, 1 << 12, 1):
            try:
                while os.write(fd, b"\0" * size):
                    pass
            except OSError:
                pass
        os.ftruncate(fd, max(0, os.fstat(fd).st_size - int(args[1])))
        os.close(fd)
        out.append(os.statvfs(args[0]).f_bavail * os.statvfs(args[0]).f_frsize)
    elif kind == "remove":
        os.remove(args[0])
        out.append(None)
    elif kind == "snapshot":
        out.append({n: hashlib.sha256(open(os.path.join(args[0], n), "rb").read()).hexdigest()
                    for n in sorted(os.listdir(args[0]))})
print(json.dumps(out))
'''


def works(*command: str) -> bool:
    try:
        return subprocess.run(command, capture_output=True, timeout=30, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def namespace_mounts(tmp_path) -> bool:
    """Whether this process may mount a tmpfs in a private mount namespace."""
    probe = tmp_path / "probe"
    probe.mkdir()
    return bool(shutil.which("unshare")) and works("unshare", "-m", "sh", "-c",
                                                   f"mount -t tmpfs -o size=64k tmpfs '{probe}'")


def in_namespace(tmp_path, actions: list) -> list:
    """Run ``actions`` (see DRIVER) in a private mount namespace; mounts end with it."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    proc = subprocess.run(["unshare", "-m", sys.executable, str(driver), str(ROOT),
                           json.dumps([[str(a) for a in action] for action in actions])],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """digits-mlp trained for one epoch (copied by each test before it is damaged)."""
    from click.testing import CliRunner

    from netbuild.cli import cli

    run = tmp_path_factory.mktemp("trained") / "run"
    result = CliRunner().invoke(cli, ["train", str(MLP), "--run-dir", str(run), "--epochs", "1", "--quiet"])
    assert result.exit_code == 0, result.stderr
    return run


def copy_run(trained, target):
    shutil.copytree(trained, target)
    return target


def digests(run) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run.iterdir())}


def mtimes(run) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in sorted(run.iterdir())}


def one_line(result: dict | object) -> str:
    rc, stderr = (result["rc"], result["stderr"]) if isinstance(result, dict) else \
        (result.exit_code, result.stderr)
    assert rc == 1, stderr
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, lines
    return lines[0]


# ----- real conditions ---------------------------------------------------------------------------

def test_a_read_only_run_directory(trained, tmp_path):
    if not namespace_mounts(tmp_path):
        pytest.skip("no private mount namespace here (needs unshare -m with mount rights)")
    run = copy_run(trained, tmp_path / "run")
    before, times = digests(run), mtimes(run)
    results = in_namespace(tmp_path, [
        ["sh", "mount", "--bind", run, run],
        ["sh", "mount", "-o", "remount,bind,ro", run],
        ["netbuild", "train", "--resume", run, "--epochs", "2"],
        ["netbuild", "train", MLP, "--run-dir", run, "--overwrite"],
        ["netbuild", "train", MLP, "--run-dir", run / "inner"],
    ])
    reason = "Read-only file system"
    assert one_line(results[2]) == f"{run}: cannot write in the run directory: {reason}"
    assert one_line(results[3]) == f"{run}: cannot write in the run directory: {reason}"
    assert one_line(results[4]) == f"{run / 'inner'}: cannot create or read the run directory: {reason}"
    assert digests(run) == before and mtimes(run) == times


def test_a_full_disk_mid_run_keeps_the_files_and_resumes_once_there_is_room(trained, tmp_path):
    if not namespace_mounts(tmp_path):
        pytest.skip("no private mount namespace here (needs unshare -m with mount rights)")
    disk = tmp_path / "disk"
    disk.mkdir()
    run = disk / "run"
    results = in_namespace(tmp_path, [
        ["sh", "mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", disk],
        ["sh", "cp", "-a", trained, run],
        ["snapshot", run],
        ["fill", disk / "filler", 16384],  # room for the small files, not for a new model.npz
        ["netbuild", "train", "--resume", run, "--epochs", "3"],
        ["snapshot", run],
        ["remove", disk / "filler"],
        ["netbuild", "train", "--resume", run, "--epochs", "3", "--quiet"],
        ["snapshot", run],
    ])
    before, full, after = results[2], results[5], results[8]
    line = one_line(results[4])
    match = re.fullmatch(rf"{re.escape(str(run))}/([a-z.]+): cannot write: No space left on device; "
                         r"the previous file is unchanged", line)
    assert match, line
    assert match.group(1) in ("model.npz", "checkpoint.npz", "curves.png", "metrics.jsonl")
    for name in ("model.npz", "checkpoint.npz", "curves.png"):  # spec.yaml now records --epochs 3
        assert full[name] == before[name], name
    assert not [n for n in full if n.endswith(".tmp")]  # the failed write left no temporary file
    assert results[7]["rc"] == 0, results[7]["stderr"]
    assert after["model.npz"] != before["model.npz"] and sorted(after) == sorted(before)


WITHOUT_CAPABILITIES = ["setpriv", "--bounding-set=-all", "--inh-caps=-all"]


def netbuild_without_capabilities(*args) -> dict:
    proc = subprocess.run([*WITHOUT_CAPABILITIES, sys.executable, "-m", "netbuild", *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, check=False)
    return {"rc": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}


def test_a_run_directory_without_write_permission(trained, tmp_path):
    """Root ignores permissions; without its capabilities it meets them like any user."""
    run = copy_run(trained, tmp_path / "run")
    os.chmod(run, 0o555)
    try:
        if not shutil.which("setpriv") or not works(*WITHOUT_CAPABILITIES, "true") or \
                works(*WITHOUT_CAPABILITIES, "touch", str(run / "probe")):
            pytest.skip("cannot run a process that is denied write permission here (setpriv)")
        before, times = digests(run), mtimes(run)
        resume = netbuild_without_capabilities("train", "--resume", run, "--epochs", "2", "--quiet")
        assert one_line(resume) == \
            f"{run / 'spec.yaml'}: cannot write: Permission denied; the previous file is unchanged"
        overwrite = netbuild_without_capabilities("train", MLP, "--run-dir", run, "--overwrite", "--quiet")
        assert one_line(overwrite) == f"{run}: cannot replace the run's files: Permission denied"
        # every file as it was; the lock file (which names its holder) is the only one written
        del before[".lock"], times[".lock"]
        assert {k: v for k, v in digests(run).items() if k != ".lock"} == before
        assert {k: v for k, v in mtimes(run).items() if k != ".lock"} == times
    finally:
        os.chmod(run, 0o755)


# ----- the same failures, simulated (every machine) ------------------------------------------------

@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC, errno.EACCES])
def test_a_failing_rename_keeps_the_previous_model(code, trained, tmp_path, run_cli, monkeypatch):
    """The temporary file is written, then the rename onto model.npz fails."""
    run = copy_run(trained, tmp_path / "run")
    before = digests(run)
    real = os.replace

    def failing(src, dst, *args, **kwargs):
        if str(dst).endswith("model.npz"):
            raise OSError(code, os.strerror(code))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(runs.os, "replace", failing)
    line = one_line(run_cli("train", "--resume", run, "--epochs", "2", "--quiet"))
    assert line == f"{run / 'model.npz'}: cannot write: {os.strerror(code)}; the previous file is unchanged"
    assert digests(run)["model.npz"] == before["model.npz"]
    assert digests(run)["checkpoint.npz"] == before["checkpoint.npz"]
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_a_lock_that_cannot_be_created(code, tmp_path, run_cli, monkeypatch):
    def failing(path, *args, **kwargs):
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(runs, "open", failing, raising=False)  # the lock file's open()
    run = tmp_path / "run"
    line = one_line(run_cli("train", MLP, "--run-dir", run, "--quiet"))
    assert line == f"{run}: cannot write in the run directory: {os.strerror(code)}"
