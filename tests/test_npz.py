"""Reading .npz members in bounded memory (netbuild/npz.py): memory-mapped when stored,
decompressed in chunks when compressed, refused from the header when a compressed member
declares more than memory allows (a zip bomb), the same values as numpy's own reader."""

from __future__ import annotations

import io
import os
import time
import zipfile

import numpy as np
import pytest
from conftest import CONFIGS

from netbuild import npz

ROWS = np.random.default_rng(0).normal(size=(300, 7)).astype(np.float32)


def bomb(path, shape=(2**31, 64), dtype="<f4", data=64 << 20) -> None:
    """A compressed member whose header declares ``shape`` (512 GiB of float32 by default) over
    ``data`` bytes of zeros: 65 KB on disk."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": dtype, "fortran_order": False,
                                                  "shape": shape})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        with z.open("x.npy", "w", force_zip64=True) as f:
            f.write(header.getvalue())
            f.write(b"\0" * data)
        with z.open("y.npy", "w") as f:
            np.lib.format.write_array(f, np.zeros(2, np.int64))


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed], ids=["stored", "compressed"])
def test_members_read_as_numpy_reads_them(save, tmp_path):
    """C and Fortran order, big-endian, empty and 0-d members: the same arrays as np.load; a
    stored member is memory-mapped."""
    arrays = {"c": ROWS, "f": np.asfortranarray(ROWS), "big": ROWS.astype(">f8"),
              "empty": np.zeros((0, 3), np.float32), "scalar": np.array(3.5), "ids": np.arange(9)}
    save(tmp_path / "a.npz", **arrays)
    with np.load(tmp_path / "a.npz", allow_pickle=False) as archive:
        for key, want in arrays.items():
            m = npz.member(tmp_path / "a.npz", archive.zip, key)
            got = npz.read(tmp_path / "a.npz", archive.zip, m)
            assert (m.shape, m.dtype, m.compressed) == (want.shape, want.dtype, save is np.savez_compressed)
            assert got.dtype == want.dtype and np.array_equal(got, want), key
            if save is np.savez and want.size:
                assert isinstance(got, np.memmap), key


def test_a_compressed_member_declaring_more_than_memory_is_refused_from_its_header(tmp_path):
    """512 GiB declared, 65 KB on disk: refused in well under a second, nothing decompressed."""
    bomb(tmp_path / "bomb.npz")
    with np.load(tmp_path / "bomb.npz", allow_pickle=False) as archive:
        start = time.perf_counter()
        m = npz.member(tmp_path / "bomb.npz", archive.zip, "x")
        with pytest.raises(npz.MemberError, match=r"is stored compressed and declares shape "
                                                  r"\(2147483648, 64\) of float32 \(512.0 GiB\), more "
                                                  r"than the .* of memory netbuild may take"):
            npz.read(tmp_path / "bomb.npz", archive.zip, m)
        assert time.perf_counter() - start < 1.0


def test_netbuild_check_refuses_a_zip_bomb_in_bounded_memory(tmp_path):
    bomb(tmp_path / "bomb.npz")
    spec = tmp_path / "s.yaml"
    spec.write_text("name: t\ndata: {train: bomb.npz}\nmodel:\n  input_shape: [64]\n  layers: "
                    "[{type: dense, units: 2}]\ntrain: {loss: mse, optimizer: {type: sgd}}\n")
    from conftest import check_in_a_process

    code, peak, lines = check_in_a_process(spec)
    assert code == 1 and len(lines) == 1, lines
    assert "s.yaml:2:15: data.train: " in lines[0] and "bomb.npz: key 'x': is stored compressed" in lines[0]
    assert peak < 400 * 2**20, peak  # the interpreter, numpy and pytensor take about 100 MiB


def test_a_stream_shorter_than_its_header_is_damaged(tmp_path):
    bomb(tmp_path / "short.npz", shape=(1000, 64), data=1000)
    with np.load(tmp_path / "short.npz", allow_pickle=False) as archive:
        m = npz.member(tmp_path / "short.npz", archive.zip, "x")
        with pytest.raises(npz.MemberError, match=r"ends after 1000 bytes of the 250.0 KiB its "
                                                  "header declares"):
            npz.read(tmp_path / "short.npz", archive.zip, m)


def test_a_stored_member_longer_than_the_archive_is_damaged(tmp_path):
    np.savez(tmp_path / "a.npz", x=ROWS)
    data = bytearray((tmp_path / "a.npz").read_bytes())
    at = data.index(b"(300, 7)")
    data[at:at + 8] = b"(900, 7)"
    (tmp_path / "a.npz").write_bytes(bytes(data))
    with np.load(tmp_path / "a.npz", allow_pickle=False) as archive:
        with pytest.raises(npz.MemberError, match=r"declares shape \(900, 7\) of float32 \(24.6 KiB\) "
                                                  r"but the archive stores 8.2 KiB of it"):
            npz.member(tmp_path / "a.npz", archive.zip, "x")


def test_training_on_a_memory_mapped_file_equals_training_on_a_compressed_one(tmp_path,
                                                                             monkeypatch):
    """digits-mlp on its data stored uncompressed and compressed: the same bits, whether the
    stored file is read into memory (a small data set, by default) or memory-mapped
    (``NETBUILD_IN_MEMORY_MAX=0``); the loaded training inputs are a map of the file, or an array
    of their own."""
    from conftest import CONFIGS

    import netbuild
    from netbuild import data
    from netbuild.network import Network

    with np.load(CONFIGS / "data" / "digits-train.npz") as d:
        np.savez(tmp_path / "stored.npz", x=d["x"], y=d["y"])
        np.savez_compressed(tmp_path / "packed.npz", x=d["x"], y=d["y"])
    runs = {}
    for name, bound in (("stored", "0"), ("stored", ""), ("packed", "")):
        monkeypatch.setenv("NETBUILD_IN_MEMORY_MAX", bound)
        spec = netbuild.load_spec(CONFIGS / "digits-mlp.yaml", overrides=[
            f"data.train={tmp_path / name}.npz", "train.epochs=2", "data.validation_split=0"])
        loaded = data.load_datasets(spec, Network.from_spec(spec, init=False)).train
        assert isinstance(loaded.x, np.memmap) == (bound == "0") == loaded.mapped
        runs[name, bound] = netbuild.train(spec, tmp_path / f"{name}{bound}").model.network \
            .param_values()
    for key, value in runs["packed", ""].items():
        assert np.array_equal(value, runs["stored", "0"][key]), key
        assert np.array_equal(value, runs["stored", ""][key]), key


@pytest.mark.parametrize("bound, read", [("1000000", True), ("100000", False)])
def test_a_data_set_within_the_bound_is_read_into_memory(tmp_path, monkeypatch, bound, read):
    """digits-train (1437 x 64 float32 and 1437 int64: 379,344 bytes) stored uncompressed in
    three files: read into memory for training under a bound above its size, memory-mapped below
    it; for `check` (into_memory=False), and as `data.load` gives it, memory-mapped."""
    from test_shards import shards

    import netbuild
    from netbuild import data
    from netbuild.network import Network

    monkeypatch.setenv("NETBUILD_IN_MEMORY_MAX", bound)
    names = shards(tmp_path / "shards")
    spec = netbuild.load_spec(CONFIGS / "digits-mlp.yaml", overrides=[
        "data.train=[" + ", ".join(names) + "]", "data.validation_split=0"])
    network = Network.from_spec(spec, init=False)
    loaded = data.load_datasets(spec, network).train
    assert loaded.mapped is not read
    assert all(type(a) is np.ndarray for a in loaded.xs + loaded.ys) is read
    assert data.load_datasets(spec, network, into_memory=False).train.mapped
    assert data.load(spec, "train", network).mapped


@pytest.mark.parametrize("value", ["-1", "lots", "1.5"])
def test_a_bad_in_memory_bound_is_one_line(run_cli, monkeypatch, tmp_path, value):
    monkeypatch.setenv("NETBUILD_IN_MEMORY_MAX", value)
    result = run_cli("train", CONFIGS / "digits-mlp.yaml", "--epochs", "1", "--run-dir",
                     tmp_path / "run")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"NETBUILD_IN_MEMORY_MAX={value!r}: expected a whole number of bytes, at least 0 "
        "(0: memory-map every data file)"]


def test_copies_into_memory_are_budgeted_before_they_are_made(tmp_path, monkeypatch):
    """With a budget of 100 KB: a memory-mapped float64 input (converted to float32 in memory)
    and a validation split of memory-mapped data (copied) are each one located line; float32
    data without a split loads, memory-mapped."""
    from conftest import CONFIGS

    import netbuild
    from netbuild import data
    from netbuild.errors import SpecError
    from netbuild.network import Network

    monkeypatch.setattr(npz, "budget", lambda: 100_000)
    with np.load(CONFIGS / "data" / "digits-train.npz") as d:
        np.savez(tmp_path / "f64.npz", x=d["x"].astype(np.float64), y=d["y"])
        np.savez(tmp_path / "f32.npz", x=d["x"], y=d["y"])

    def load(name, *overrides):
        spec = netbuild.load_spec(CONFIGS / "digits-mlp.yaml",
                                  overrides=[f"data.train={tmp_path / name}", *overrides])
        return data.load_datasets(spec, Network.from_spec(spec, init=False))

    with pytest.raises(SpecError, match=r"f64.npz: key 'x': is stored as float64 \(shape \(1437, 64\)\); "
                                        r"the network reads float32, and converting it takes 359.2 KiB "
                                        r"of memory, more than the 97.7 KiB netbuild may take"):
        load("f64.npz", "data.validation_split=0")
    with pytest.raises(SpecError, match=r"data.validation_split: holding out a validation split copies "
                                        r"the data set into memory \(370.5 KiB\)"):
        load("f32.npz")
    sets = load("f32.npz", "data.validation_split=0")
    assert isinstance(sets.train.x, np.memmap) and sets.validation is None
    # class ids stored as int32 are converted to int64 in memory: budgeted as the inputs are
    with np.load(CONFIGS / "data" / "digits-train.npz") as d:
        np.savez(tmp_path / "ids32.npz", x=d["x"], y=d["y"].astype(np.int32))
    monkeypatch.setattr(npz, "budget", lambda: 5_000)
    with pytest.raises(SpecError, match=r"ids32.npz: key 'y': is stored as int32 \(shape \(1437,\)\); "
                                        r"the network reads int64, and converting it takes 11.2 KiB"):
        load("ids32.npz", "data.validation_split=0")


def test_predict_writes_its_outputs_batch_by_batch(tmp_path, run_cli):
    """netbuild predict on memory-mapped inputs: the outputs of Model.predict, in an archive
    numpy reads, nothing left beside it; the two-output model writes both keys."""
    from conftest import CONFIGS

    import netbuild

    run = tmp_path / "run"
    assert run_cli("train", CONFIGS / "digits-mlp.yaml", "--run-dir", run, "--epochs", "1", "-q").exit_code == 0
    with np.load(CONFIGS / "data" / "digits-test.npz") as d:
        np.savez(tmp_path / "in.npz", x=np.concatenate([d["x"]] * 3))  # 1,080 rows, 5 batches
    out = tmp_path / "out" / "p.npz"
    out.parent.mkdir()
    result = run_cli("predict", run, "--data", tmp_path / "in.npz", "--out", out)
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in out.parent.iterdir()) == ["p.npz"]
    with np.load(out) as p, np.load(tmp_path / "in.npz") as d:
        assert p.files == ["y"]
        np.testing.assert_array_equal(p["y"], netbuild.load_model(run).predict(d["x"]))
    with zipfile.ZipFile(out) as archive:  # aligned, as netbuild.savez writes: read in place
        assert npz.member(out, archive, "y").offset % npz.ALIGN == 0


@pytest.mark.parametrize("keys", [["x", "y"], ["inputs", "é", "a_much_longer_name_of_an_array", "b"],
                                  [f"k{i}" for i in range(40)],
                                  ["seven77", "y"]])  # a pad of 1-3 bytes: a whole ALIGN more
def test_savez_writes_what_numpy_reads_with_each_arrays_data_aligned(tmp_path, keys):
    """netbuild.savez: an uncompressed archive numpy.load reads as numpy.savez's, each member's
    data at a multiple of ALIGN bytes of the file (numpy.savez's lie where their names leave
    them: x.npy at 183), the same bytes for the same arrays; any dtype, order and shape."""
    import netbuild

    rng = np.random.default_rng(1)
    kinds = [lambda: rng.random((33, 7), dtype=np.float32), lambda: rng.integers(0, 9, 101),
             lambda: np.asfortranarray(rng.random((5, 3))), lambda: np.array(3.5),
             lambda: np.zeros((0, 4), np.float16), lambda: rng.random(13) > 0.5,
             lambda: rng.random((4, 6))[:, ::2]]  # not contiguous
    arrays = {k: kinds[i % len(kinds)]() for i, k in enumerate(keys)}
    netbuild.savez(tmp_path / "a.npz", **arrays)
    with np.load(tmp_path / "a.npz") as back:
        assert back.files == keys
        for k in keys:
            np.testing.assert_array_equal(back[k], arrays[k])
            assert back[k].dtype == arrays[k].dtype and back[k].shape == arrays[k].shape
    with zipfile.ZipFile(tmp_path / "a.npz") as archive:
        assert all(i.compress_type == zipfile.ZIP_STORED for i in archive.infolist())
        if keys[0] == "seven77":  # 30 + 11 + 20 bytes of header: padded by 3 + 64
            assert len(archive.getinfo("seven77.npy").extra) >= npz.ALIGN
        assert archive.testzip() is None  # every CRC-32 right
        for k in keys:
            assert npz.member(tmp_path / "a.npz", archive, k).offset % npz.ALIGN == 0, k
    netbuild.savez(tmp_path / "b.npz", **arrays)
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    np.savez(tmp_path / "n.npz", x=arrays[keys[0]])
    with zipfile.ZipFile(tmp_path / "n.npz") as archive:
        assert npz.member(tmp_path / "n.npz", archive, "x").offset == 183  # what numpy does


def test_savez_mistakes_are_one_line_and_leave_the_old_file(tmp_path):
    """No arrays, an array of Python objects, names zip cannot hold, a folder that is not there,
    a folder or a pipe at the path, a path that is no path: one line each (a NetbuildError), and
    what is at the path is left as it was (a pipe stays a pipe)."""
    import netbuild

    path = tmp_path / "d.npz"
    netbuild.savez(path, x=np.arange(4))
    before = path.read_bytes()
    for arrays, message in (({}, "savez: no arrays given; expected arrays by keyword"),
                            ({"x": np.array([object()])},
                             "savez: x: holds Python objects; expected a numeric array"),
                            ({"\udc80": np.arange(2)}, "the name is not valid Unicode"),
                            ({"k" * 65532: np.arange(2)}, "the name is longer than 65,531 bytes")):
        with pytest.raises(netbuild.NetbuildError, match=message):
            netbuild.savez(path, **arrays)
    with pytest.raises(netbuild.NetbuildError, match=r"the folder .*nowhere does not exist"):
        netbuild.savez(tmp_path / "nowhere" / "d.npz", x=np.arange(4))
    os.mkfifo(tmp_path / "pipe")
    for target, message in ((tmp_path, "is a folder; expected a file name"),
                            (tmp_path / "pipe", "is not a regular file"),
                            (3, "savez: the path is int; expected a str or a path-like object")):
        with pytest.raises(netbuild.NetbuildError, match=message):
            netbuild.savez(target, x=np.arange(4))
    assert (tmp_path / "pipe").is_fifo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.npz", "pipe"]
