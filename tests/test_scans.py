"""Data checks from one chunked scan per array (netbuild.scans): its statistics against numpy's,
kept in a cache so that unchanged files are not scanned or CRC-checked again, and scanned again
whenever a file changes; large scans report their progress."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import sys

import numpy as np
import pytest
from conftest import CONFIGS

import netbuild
from netbuild import data, npz, scans

MLP = CONFIGS / "digits-mlp.yaml"
RNG = np.random.default_rng(7)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 10 values: every scan crosses many chunk boundaries."""
    monkeypatch.setattr(data, "CHECK_CHUNK", 10)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cache of the test's own that keeps entries of files just written (no racy window)."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("NETBUILD_CACHE_DIR", str(folder))
    monkeypatch.setattr(scans, "RACY_NS", 0)
    return folder


def _reference(a: np.ndarray) -> dict:
    """The statistics, from whole-array numpy."""
    rows = a.reshape(len(a), -1)
    out = {"n_nan": 0, "n_inf": 0, "first_nonfinite": None, "first_fractional": None}
    if a.dtype.kind == "f":
        out["n_nan"], out["n_inf"] = int(np.isnan(a).sum()), int(np.isinf(a).sum())
        bad = ~np.isfinite(rows)
        out["first_nonfinite"] = int(np.flatnonzero(bad.any(1))[0]) if bad.any() else None
        finite = rows[np.isfinite(rows)]
        frac = np.isfinite(rows) & (rows != np.round(rows))
        out["first_fractional"] = int(np.flatnonzero(frac.any(1))[0]) if frac.any() else None
    else:
        finite = rows.reshape(-1)
    out["lo"], out["hi"] = (finite.min().item(), finite.max().item()) if finite.size else (None, None)
    out["peak"] = float(np.abs(finite).max()) if finite.size else None
    return out


def _arrays():
    f = RNG.normal(size=(57, 3, 2))
    f[5, 1, 0], f[40, 0, 1], f[41, 2, 1] = np.nan, np.inf, -np.inf
    whole = np.round(RNG.normal(size=(33, 4)) * 5)
    whole[20, 3] = 2.5
    huge = RNG.normal(size=(25, 3))
    huge[17, 2] = 1e300
    ints = RNG.integers(-9, 9, size=(31, 5)).astype(np.int16)
    allbad = np.full((4, 3), np.nan, dtype=np.float32)
    return {"floats with nan and inf": f, "class ids as floats": whole, "beyond float32": huge,
            "ints": ints, "no finite value": allbad, "one row": np.array([[1.5, 2.0]]),
            "empty rows": np.zeros((6, 0))}


@pytest.mark.parametrize("name", list(_arrays()))
def test_scan_matches_numpy_across_chunks(name, small_chunks):
    a = _arrays()[name]
    st = scans.scan(a)
    want = _reference(a)
    assert {k: getattr(st, k) for k in want} == want
    if st.first_fractional is not None:
        row = a.reshape(len(a), -1)[st.first_fractional]
        assert st.fractional in row and st.fractional != round(st.fractional)


def test_scan_figures_are_python_numbers_even_for_longdouble(small_chunks):
    """numpy's longdouble.item() is a longdouble: the figures are kept (JSON) as Python numbers."""
    st = scans.scan(np.arange(30, dtype=np.longdouble).reshape(10, 3) / 2)
    assert type(st.lo) is float and type(st.hi) is float and st.first_fractional == 0
    assert type(scans.scan(np.arange(12, dtype=np.uint64).reshape(4, 3)).hi) is int
    json.dumps(dataclasses.asdict(st))


def test_values_beyond_the_networks_float_type_are_found_from_the_peak(small_chunks):
    """The scan keeps the largest magnitude; only when it exceeds the network's float type are the
    values cast (in chunks) to find the first example that overflows. A value just above
    float32's largest, which rounds to it, is accepted, as a cast keeps it finite."""
    from netbuild.network import Network

    net = Network.from_spec(netbuild.load_spec(MLP, overrides=["model.input_shape=[3]"]))
    x = RNG.normal(size=(40, 3))
    x[33, 1] = -1e300
    report = data.reporter("d.npz")
    with pytest.raises(netbuild.NetbuildError, match=r"holds 1e\+300 \(in example 33\), beyond the "
                       r"range of float32"):
        data.prepare_x(x, net, report, "x")
    x[33, 1] = float(np.finfo(np.float32).max) * (1 + 1e-9)
    assert np.isfinite(data.prepare_x(x, net, report, "x")).all()


def test_scan_of_a_memory_mapped_file_matches_the_array_in_memory(tmp_path, small_chunks):
    a = RNG.normal(size=(300, 7)).astype(np.float32)
    a[123, 4] = np.nan
    np.savez(tmp_path / "d.npz", x=a)
    mapped = data.read_arrays(tmp_path / "d.npz", ["x"], data.reporter("d.npz"))["x"]
    assert isinstance(mapped, np.memmap)
    assert scans.scan(mapped) == scans.scan(a)


# -- the cache --------------------------------------------------------------------------------
def _spec_with(tmp_path, train_file) -> str:
    text = MLP.read_text().replace("train: data/digits-train.npz", f"train: {train_file}")
    text = text.replace("data/digits-test.npz", str(CONFIGS / "data" / "digits-test.npz"))
    spec = tmp_path / "s.yaml"
    spec.write_text(text)
    return str(spec)


def _digits(tmp_path, name="train.npz", change=None):
    with np.load(CONFIGS / "data" / "digits-train.npz") as d:
        arrays = {"x": d["x"].copy(), "y": d["y"].copy()}
    if change:
        change(arrays)
    np.savez(tmp_path / name, **arrays)
    return tmp_path / name


class _Spy:
    """Counts scans and the CRC-checked reads of stored members."""

    def __init__(self, monkeypatch):
        self.scans, self.crc = [], []
        scan, read = scans.scan, npz.read

        def counted_scan(values, what=""):
            self.scans.append(what)
            return scan(values, what)

        def counted_read(path, archive, m, verified=False, what="", reader=None):
            if not m.compressed and not verified:
                self.crc.append(m.key)
            return read(path, archive, m, verified, what, reader)

        monkeypatch.setattr(scans, "scan", counted_scan)
        monkeypatch.setattr(npz, "read", counted_read)

    def reset(self):
        self.scans.clear()
        self.crc.clear()


def test_a_second_check_of_unchanged_files_neither_scans_nor_reads_them(tmp_path, cache, monkeypatch,
                                                                       run_cli):
    spec = _spec_with(tmp_path, _digits(tmp_path))
    spy = _Spy(monkeypatch)
    assert run_cli("check", spec).exit_code == 0
    # train and test, x and y; the shipped test set is compressed (its CRC-32 is checked as it is
    # decompressed, which it must be to be read): only the stored train file's are streamed
    assert len(spy.scans) == 4 and spy.crc == ["x", "y"]
    entries = list((cache / "scans").glob("*.json"))
    assert len(entries) == 2
    spy.reset()
    assert run_cli("check", spec).exit_code == 0
    assert spy.scans == [] and spy.crc == []
    spy.reset()  # training, evaluation and prediction read the same answers
    run = netbuild.train(netbuild.load_spec(spec, overrides=["train.epochs=1"]), tmp_path / "run")
    assert run.history and spy.scans == [] and spy.crc == []
    assert run_cli("eval", tmp_path / "run", "--data", tmp_path / "train.npz").exit_code == 0
    assert run_cli("predict", tmp_path / "run", "--data", tmp_path / "train.npz",
                   "--out", tmp_path / "p.npz").exit_code == 0
    assert spy.scans == [] and spy.crc == []


def test_a_changed_file_is_scanned_again_and_its_mistake_found(tmp_path, cache, monkeypatch, run_cli):
    train = _digits(tmp_path)
    spec = _spec_with(tmp_path, train)
    assert run_cli("check", spec).exit_code == 0

    def nan(arrays):
        arrays["x"][7, 3] = np.nan

    before = os.stat(train)
    _digits(tmp_path, change=nan)  # the same size; its modification time put back
    os.utime(train, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(train).st_size == before.st_size
    spy = _Spy(monkeypatch)
    result = run_cli("check", spec)
    assert result.exit_code == 1
    assert "holds 1 NaN value (the first in example 7)" in result.stderr
    assert any("train.npz 'x'" in w for w in spy.scans) and "x" in spy.crc  # the CRC-32 told


def test_no_entry_is_kept_for_a_file_changed_just_before_its_scan(tmp_path, monkeypatch, run_cli):
    """A second change within the file system's clock tick would leave the file's times as
    they were: a file changed less than RACY_NS before its scan is scanned every time."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("NETBUILD_CACHE_DIR", str(folder))
    monkeypatch.setattr(scans, "RACY_NS", 60 * 10**9)
    spec = _spec_with(tmp_path, _digits(tmp_path))
    spy = _Spy(monkeypatch)
    assert run_cli("check", spec).exit_code == 0
    spy.reset()
    assert run_cli("check", spec).exit_code == 0
    assert any("train.npz 'x'" in w for w in spy.scans) and spy.crc == ["x", "y"]
    entries = [json.loads(e.read_text())["file"] for e in (folder / "scans").glob("*.json")]
    assert all(not f.endswith("train.npz") for f in entries)  # the shipped test file is old


def test_a_file_edited_in_place_with_its_times_put_back_is_scanned_again(tmp_path, cache,
                                                                         monkeypatch, run_cli):
    """Bytes changed behind the zip directory's back (its CRC-32s unchanged) with the
    modification time restored: the status-change time differs, so the entry does not hold
    and the CRC-32 check finds the change."""
    import time

    train = _digits(tmp_path)
    spec = _spec_with(tmp_path, train)
    assert run_cli("check", spec).exit_code == 0
    before = os.stat(train)
    time.sleep(0.01)  # the next status change at a later tick
    with open(train, "r+b") as f:
        f.seek(before.st_size // 2)
        byte = f.read(1)
        f.seek(before.st_size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(train, ns=(before.st_atime_ns, before.st_mtime_ns))
    result = run_cli("check", spec)
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    assert "train.npz" in result.stderr


def test_the_cache_can_be_off_or_unwritable(tmp_path, monkeypatch, run_cli):
    spec = _spec_with(tmp_path, _digits(tmp_path))
    monkeypatch.setenv("NETBUILD_CACHE_DIR", "off")
    assert run_cli("check", spec).exit_code == 0
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache folder would be")
    monkeypatch.setenv("NETBUILD_CACHE_DIR", str(blocked))
    result = run_cli("check", spec)
    assert result.exit_code == 0, result.stderr
    spy = _Spy(monkeypatch)
    assert run_cli("check", spec).exit_code == 0
    assert len(spy.scans) == 4  # nothing was kept: scanned again, no error


def test_a_damaged_cache_entry_is_scanned_again(tmp_path, cache, monkeypatch, run_cli):
    spec = _spec_with(tmp_path, _digits(tmp_path))
    assert run_cli("check", spec).exit_code == 0
    for entry in (cache / "scans").glob("*.json"):
        entry.write_text("{not json")
    spy = _Spy(monkeypatch)
    assert run_cli("check", spec).exit_code == 0
    assert len(spy.scans) == 4
    for entry in (cache / "scans").glob("*.json"):
        assert json.loads(entry.read_text())["version"] == scans._VERSION  # written anew


def test_an_entry_missing_a_figure_is_not_trusted(tmp_path, cache, monkeypatch, run_cli):
    """An entry whose Stats lack a field (an older netbuild's, an edited one) is scanned again:
    a missing field must not read as its default (no NaN, say)."""
    spec = _spec_with(tmp_path, _digits(tmp_path))
    assert run_cli("check", spec).exit_code == 0
    for entry in (cache / "scans").glob("*.json"):
        kept = json.loads(entry.read_text())
        for member in kept["members"].values():
            member["stats"].pop("n_nan")
        entry.write_text(json.dumps(kept))
    spy = _Spy(monkeypatch)
    assert run_cli("check", spec).exit_code == 0
    assert len(spy.scans) == 4


def test_the_cache_answers_every_spec_that_reads_the_file(tmp_path, cache, run_cli):
    """The statistics, not a verdict, are kept: a spec whose output has fewer classes than the
    file's ids is refused from the cached scan."""
    spec = _spec_with(tmp_path, _digits(tmp_path))
    assert run_cli("check", spec).exit_code == 0
    result = run_cli("check", spec, "--set", "model.layers[2].units=5")
    assert result.exit_code == 1
    assert "holds class id 9, outside the output's range; expected ids 0..4" in result.stderr


# -- progress ---------------------------------------------------------------------------------
def test_large_scans_report_their_progress(monkeypatch, small_chunks):
    monkeypatch.setattr(scans, "PROGRESS_BYTES", 0)
    seen = []
    a = RNG.normal(size=(50, 4))
    with scans.reporting(lambda what, done, total: seen.append((what, done, total))):
        scans.scan(a, "f.npz 'x'")
    assert seen and all(w == "f.npz 'x': checking its values" and t == a.nbytes for w, _, t in seen)
    assert [d for _, d, _ in seen] == sorted(d for _, d, _ in seen) and seen[-1][1] == a.nbytes
    seen.clear()
    scans.scan(a)  # outside: nobody to tell
    assert seen == []


def test_the_cli_draws_a_progress_line_on_a_terminal_only(monkeypatch):
    from netbuild import cli

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(scans, "PROGRESS_BYTES", 0)
    stream = Terminal()  # a pass cut short: its line is cleared on the way out
    monkeypatch.setattr(sys, "stderr", stream)
    with pytest.raises(KeyboardInterrupt), cli._scan_progress():
        scans.progress("d.npz 'x': checking its CRC-32", 2**20, 2**21)
        raise KeyboardInterrupt
    assert stream.getvalue().endswith("of 2.0 MiB\r\033[K")
    for stream, drawn in ((Terminal(), True), (io.StringIO(), False)):
        monkeypatch.setattr(sys, "stderr", stream)
        with cli._scan_progress():
            scans.progress("d.npz 'x': checking its values", 2**20, 2**21)
            scans.progress("d.npz 'x': checking its values", 2**21, 2**21)
        text = stream.getvalue()
        assert ("\rd.npz 'x': checking its values: 50% of 2.0 MiB" in text) == drawn
        assert text.endswith("\r\033[K") == drawn
