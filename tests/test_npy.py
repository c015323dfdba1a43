"""Data in a folder of .npy files, one per key (x.npy, y.npy, as numpy.save writes them): read as
an .npz archive's members are, memory-mapped (aligned: batches of consecutive rows read in
place), sharded by globs of folders, every mistake one located line."""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import CONFIGS

import netbuild
from netbuild import scans

MLP = CONFIGS / "digits-mlp.yaml"
TRAIN = CONFIGS / "data" / "digits-train.npz"


def folders(root, cuts=(), **changes) -> list[str]:
    """digits-train's rows in folders of .npy files cut at ``cuts``; ``changes`` maps a folder's
    number to a function of its arrays."""
    with np.load(TRAIN) as d:
        x, y = d["x"], d["y"]
    bounds = [0, *cuts, len(x)]
    names = []
    for k, (a, b) in enumerate(zip(bounds, bounds[1:])):
        folder = root / f"train-{k:02d}"
        folder.mkdir(parents=True)
        for key, value in changes.get(f"s{k}", lambda v: v)({"x": x[a:b], "y": y[a:b]}).items():
            np.save(folder / f"{key}.npy", value)
        names.append(str(folder))
    return names


def train(tmp_path, name, data, *extra):
    spec = netbuild.load_spec(MLP, overrides=[f"data.train={data}", "train.epochs=2",
                                              "data.validation_split=0", *extra])
    return netbuild.train(spec, tmp_path / name)


@pytest.mark.parametrize("bound", [None, "0"], ids=["in-memory", "mapped"])
def test_folders_of_npy_files_train_to_the_bits_of_the_npz(tmp_path, monkeypatch, bound):
    """One folder, and the same rows in three folders (a glob), train to the bits of the .npz
    file, read into memory (small, by default) or memory-mapped; mapped, with blocks of a batch,
    every batch of one file's rows is a view of its map (numpy.save's data lies aligned)."""
    from netbuild import data

    if bound is not None:
        monkeypatch.setenv("NETBUILD_IN_MEMORY_MAX", bound)
    views = []
    view = data.FileReads.view
    monkeypatch.setattr(data.FileReads, "view", lambda self: views.append(v := view(self)) or v)
    (one,) = folders(tmp_path / "one")
    several = folders(tmp_path / "several", cuts=(512, 1024))
    runs = {name: train(tmp_path, name, source, "train.shuffle_block=32")
            for name, source in (("npz", TRAIN), ("folder", one),
                                 ("glob", tmp_path / "several" / "train-*"))}
    if bound is not None:
        assert views and all(v is not None for v in views)  # cuts at whole blocks: one run each
    else:
        assert not views
    a = runs["npz"].model.network.param_values()
    for name in ("folder", "glob"):
        b = runs[name].model.network.param_values()
        assert all(np.array_equal(a[k], b[k]) for k in a), name
        assert [r["loss"] for r in runs[name].history] == [r["loss"] for r in runs["npz"].history]
    assert len(several) == 3


def _check(run_cli, tmp_path, data: str):
    text = MLP.read_text().replace("train: data/digits-train.npz", f"train: {data}")
    text = text.replace("data/digits-test.npz", str(CONFIGS / "data" / "digits-test.npz"))
    (tmp_path / "s.yaml").write_text(text)
    return run_cli("check", tmp_path / "s.yaml")


@pytest.mark.parametrize("make, message", [
    (lambda f: None, "is a folder with no .npy file; expected an .npz file, or a folder of .npy "
                     "files, one per key (x.npy, y.npy), as numpy.save writes them"),
    (lambda f: np.save(f / "y.npy", np.arange(5)), "no array 'x' in the folder; its keys are: y"),
    (lambda f: ((f / "x.npy").write_text("hello"), np.save(f / "y.npy", np.arange(5))),
     "key 'x': is not a NumPy array file (.npy); expected an array saved by numpy.save"),
    (lambda f: (np.save(f / "x.npy", np.array([{}], dtype=object), allow_pickle=True),
                np.save(f / "y.npy", np.arange(1))),
     "key 'x': holds Python objects (a pickled array), which netbuild never loads"),
    (lambda f: (np.save(f / "x.npy", np.ones((100, 64), np.float32)), np.save(f / "y.npy", np.arange(100)),
                os.truncate(f / "x.npy", 2000)),
     "key 'x': declares shape (100, 64) of float32 (25.0 KiB) but the file stores 1.8 KiB of it; "
     "expected a complete .npy file"),
    (lambda f: (np.save(f / "x.npy", np.zeros((0, 64), np.float32)), np.save(f / "y.npy", np.arange(0))),
     "key 'x': is empty (shape (0, 64)); expected at least one example"),
    (lambda f: (np.save(f / "x.npy", np.ones((10, 63), np.float32)), np.save(f / "y.npy", np.arange(10))),
     "key 'x': has examples of shape (63,); expected (64,) to fit model.input_shape"),
])
def test_a_folders_mistake_is_one_located_line(run_cli, tmp_path, make, message):
    folder = tmp_path / "data"
    folder.mkdir()
    make(folder)
    result = _check(run_cli, tmp_path, str(folder))
    assert result.exit_code == 1 and "Traceback" not in result.output + result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "s.yaml:6:" in lines[0] and ": data.train: " in lines[0], lines
    assert f"{folder.resolve()}: " in lines[0] and message in lines[0], lines


def test_a_folder_unlike_the_first_is_one_line_naming_it(run_cli, tmp_path):
    names = folders(tmp_path, cuts=(500,), s1=lambda a: {**a, "x": a["x"].astype(np.float64)})
    result = _check(run_cli, tmp_path, "[" + ", ".join(names) + "]")
    (line,) = result.stderr.splitlines()
    assert ": data.train[1]: " in line and "train-01: key 'x': holds float64 examples" in line


def test_eval_and_predict_read_a_folder_as_the_npz(tmp_path, run_cli):
    (folder,) = folders(tmp_path)
    run = tmp_path / "run"
    assert run_cli("train", MLP, "--run-dir", run, "--epochs", "1", "-q").exit_code == 0
    evals = [run_cli("eval", run, "--data", source).output.split("\n", 1) for source in (TRAIN, folder)]
    assert evals[1][0].endswith("train-00: 1437 examples")  # the folder named
    assert evals[0][1] == evals[1][1] and "accuracy" in evals[0][1]
    for source, out in ((TRAIN, "a.npz"), (folder, "b.npz")):
        assert run_cli("predict", run, "--data", source, "--out", tmp_path / out).exit_code == 0
    with np.load(tmp_path / "a.npz") as a, np.load(tmp_path / "b.npz") as b:
        np.testing.assert_array_equal(a["y"], b["y"])


def test_a_folders_scans_are_cached_per_file(tmp_path, monkeypatch):
    """A second load of unchanged .npy files does not scan them again; a file written anew is
    scanned again, the other not."""
    from netbuild import data
    from netbuild.network import Network

    monkeypatch.setenv("NETBUILD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(scans, "RACY_NS", 0)
    scanned = []
    scan = scans.scan
    monkeypatch.setattr(scans, "scan", lambda values, what="": scanned.append(what) or scan(values, what))
    (folder,) = folders(tmp_path / "d")
    spec = netbuild.load_spec(MLP, overrides=[f"data.train={folder}", "data.validation_split=0"])

    def load():
        scanned.clear()
        data.load(spec, "train", Network.from_spec(spec, init=False))
        return sorted(w.rsplit("'", 2)[1] for w in scanned)

    assert load() == ["x", "y"]
    assert load() == []
    with np.load(TRAIN) as d:
        np.save(os.path.join(folder, "x.npy"), d["x"][::-1].copy())
    assert load() == ["x"]
