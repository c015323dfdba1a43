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
    folders(tmp_path / "several", cuts=(512, 1024))
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
     "key 'x': is not a NumPy array file (.npy), or its header is damaged; expected an array "
     "saved by numpy.save"),
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


def test_a_folder_unlike_the_first_is_one_line_naming_it_and_the_key(run_cli, tmp_path):
    names = folders(tmp_path, cuts=(500,), s1=lambda a: {**a, "x": a["x"].astype(np.float64)})
    result = _check(run_cli, tmp_path, "[" + ", ".join(names) + "]")
    (line,) = result.stderr.splitlines()
    assert ": data.train[1]: " in line and "train-01: key 'x': holds float64 examples" in line
    (tmp_path / "train-01" / "y.npy").write_text("hello")  # compared from the headers too
    result = _check(run_cli, tmp_path, str(tmp_path / "train-*"))
    (line,) = result.stderr.splitlines()
    assert "train-01: key 'y': is not a NumPy array file (.npy), or its header is damaged" in line


def test_entries_named_like_a_key_that_are_not_files_are_one_line(run_cli, tmp_path):
    """A folder, a pipe or a broken symbolic link named x.npy: one line naming x.npy and what it
    is (a pipe is never opened: it would wait for a writer)."""
    for name, make, message in (
            ("folder", lambda p: p.mkdir(), "key 'x': x.npy: is a folder; expected a .npy file"),
            ("pipe", os.mkfifo, "key 'x': x.npy: is not a regular file (a device, pipe or socket); "
                                "expected a .npy file"),
            ("link", lambda p: p.symlink_to(p.parent / "gone.npy"), "key 'x': x.npy: file not found "
                                                                     "(the symbolic link")):
        folder = tmp_path / name
        folder.mkdir()
        np.save(folder / "y.npy", np.arange(5))
        make(folder / "x.npy")
        result = _check(run_cli, tmp_path, str(folder))
        assert result.exit_code == 1 and "Traceback" not in result.output + result.stderr
        (line,) = result.stderr.splitlines()
        assert message in line, line


def _header(shape: str, descr: str = "<f4") -> bytes:
    """A .npy header (version 1.0) declaring ``shape`` (its text), padded to 64 bytes."""
    text = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}"
    text += " " * (-(10 + len(text) + 1) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text.encode()


def test_damaged_or_hostile_npy_files_give_one_line(tmp_path):
    """Cut and bit-flipped copies of a real .npy file, and headers declaring negative or
    unaddressable shapes: a located line each (or arrays, where the damage left a valid file),
    never a traceback, nothing allocated from a declared shape."""
    import random

    from netbuild import data
    from netbuild.errors import NetbuildError

    folder = tmp_path / "d"
    folder.mkdir()
    np.save(folder / "y.npy", np.arange(40))
    np.save(folder / "x.npy", np.arange(40 * 64, dtype=np.float32).reshape(40, 64))
    whole = (folder / "x.npy").read_bytes()
    rng = random.Random(0)
    copies = [whole[:cut] for cut in range(0, 200, 3)]
    for _ in range(300):
        copy = bytearray(whole)
        for _ in range(rng.randint(1, 3)):
            copy[rng.randrange(128)] = rng.randrange(256)  # in the header
        copies.append(bytes(copy))
    hostile = [_header(s) + bytes(40 * 64 * 4) for s in
               ("(-1, 64)", "(40, -64)", "(-40, -64)", f"({2**64}, 0)", f"(0, {2**64})", f"({2**40}, {2**30})")]
    report = data._Reporter(None, ("data",), "d")
    refused = 0
    for copy in copies + hostile:
        (folder / "x.npy").write_bytes(copy)
        try:
            data.read_arrays(folder, ["x", "y"], report)
        except NetbuildError as exc:
            refused += 1
            assert len(exc.lines()) == 1 and exc.lines()[0].startswith("d: key 'x': "), exc.lines()
    assert refused >= len(copies) // 2 + len(hostile)
    for shape, message in (("(-1, 64)", "declares shape (-1, 64); expected dimensions of at least 0"),
                           (f"({2**40}, {2**30})", "more than any machine can address")):
        (folder / "x.npy").write_bytes(_header(shape))
        with pytest.raises(NetbuildError, match=message.replace("(", r"\(").replace(")", r"\)")):
            data.read_arrays(folder, ["x"], report)


def test_a_file_cut_after_its_header_was_read_is_one_line(tmp_path):
    """The map is made from the file whose header was read (held open): a file cut shorter than
    its array in between is a MemberError, not numpy's ValueError."""
    from netbuild import npz

    path = tmp_path / "x.npy"
    np.save(path, np.arange(4096, dtype=np.float32))
    m, _, reader = npz.npy_open(path, "x", "x.npy")
    os.truncate(path, m.offset + 100)
    with pytest.raises(npz.MemberError, match="was cut short while it was being read"):
        npz.mapped(path, m.dtype, m.offset, m.shape, "C", reader)


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
    # the same bytes' size, edited in place with its modification time set back: its status
    # change time tells
    x = os.path.join(folder, "x.npy")
    times = os.stat(x)
    with open(x, "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(np.float32(99.5).tobytes())
    os.utime(x, ns=(times.st_atime_ns, times.st_mtime_ns))
    assert load() == ["x"]
