"""Data sets in several files (a list or a glob): one data set in the files' order, the same
training to the bit as one file of the same rows, headers compared before anything is read,
every mistake one located line naming the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import CONFIGS

import netbuild

MLP = CONFIGS / "digits-mlp.yaml"
TRAIN = CONFIGS / "data" / "digits-train.npz"


def shards(folder, cuts=(500, 1100), save=np.savez, **changes) -> list[str]:
    """digits-train's rows in files cut at ``cuts``, named so that sorting keeps their order;
    ``changes`` maps a shard's number to a function of its arrays."""
    folder.mkdir(exist_ok=True)
    with np.load(TRAIN) as d:
        x, y = d["x"], d["y"]
    bounds = [0, *cuts, len(x)]
    names = []
    for k, (a, b) in enumerate(zip(bounds, bounds[1:])):
        arrays = {"x": x[a:b], "y": y[a:b]}
        arrays = changes.get(f"s{k}", lambda v: v)(arrays)
        name = folder / f"train-{k:02d}.npz"
        save(name, **arrays)
        names.append(str(name))
    return names


def train(tmp_path, name, data, *extra):
    """Training on ``data`` without the config's validation split (a split copies the training
    set into memory: the files would not be read by the training)."""
    spec = netbuild.load_spec(MLP, overrides=[f"data.train={data}", "train.epochs=3",
                                              "data.validation_split=0", *extra])
    return netbuild.train(spec, tmp_path / name)


@pytest.mark.parametrize("save, in_memory", [(np.savez, "0"), (np.savez, None),
                                              (np.savez, "targets"), (np.savez_compressed, None),
                                              (netbuild.savez, "0")],
                         ids=["stored-mapped", "stored-in-memory", "stored-targets-in-memory",
                              "compressed", "aligned-mapped"])
def test_shards_train_to_the_bits_of_one_file(tmp_path, save, in_memory, monkeypatch):
    """One file, the same rows in three files (a list), and a glob of them: the same parameters
    and records (the epoch order is one permutation of all the rows, as for one file), whether
    the shards are memory-mapped, read into memory (a small data set, by default), or mapped
    with their targets alone in memory (what fits NETBUILD_IN_MEMORY_MAX)."""
    if in_memory == "targets":
        with np.load(TRAIN) as d:
            in_memory = str(d["y"].nbytes)
    if in_memory is not None:
        monkeypatch.setenv("NETBUILD_IN_MEMORY_MAX", in_memory)
    names = shards(tmp_path / "shards", save=save)
    one = train(tmp_path, "one", TRAIN)
    listed = train(tmp_path, "listed", "[" + ", ".join(names) + "]")
    globbed = train(tmp_path, "globbed", str(tmp_path / "shards" / "train-*.npz"))
    for run in (listed, globbed):
        a, b = one.model.network.param_values(), run.model.network.param_values()
        assert all(np.array_equal(a[k], b[k]) for k in a)
        for r, s in zip(one.history, run.history):
            assert {k: v for k, v in r.items() if k not in ("seconds", "samples_per_second")} == \
                {k: v for k, v in s.items() if k not in ("seconds", "samples_per_second")}


def check(run_cli, tmp_path, data: str) -> list[str]:
    text = MLP.read_text().replace("train: data/digits-train.npz", f"train: {data}")
    text = text.replace("data/digits-test.npz", str(CONFIGS / "data" / "digits-test.npz"))
    (tmp_path / "s.yaml").write_text(text)
    result = run_cli("check", tmp_path / "s.yaml")
    assert result.exit_code == 1 and "Traceback" not in result.output + result.stderr
    return result.stderr.splitlines()


@pytest.mark.parametrize("change, message", [
    (lambda a: {**a, "x": a["x"].astype(np.float64)},
     "key 'x': holds float64 examples of shape (64,); expected float32 examples of shape (64,), as in"),
    (lambda a: {**a, "x": a["x"][:, :63]},
     "key 'x': holds float32 examples of shape (63,); expected float32 examples of shape (64,)"),
    (lambda a: {"x": a["x"]}, "no array 'y' in the file; its keys are: x"),
    (lambda a: {**a, "y": a["y"] + 10}, "key 'y': holds class id 19, outside the output's range"),
])
def test_a_shard_unlike_the_first_is_one_located_line_naming_it(run_cli, tmp_path, change, message):
    names = shards(tmp_path / "shards", s1=change)
    lines = check(run_cli, tmp_path, "[" + ", ".join(names) + "]")
    assert len(lines) == 1, lines
    assert "s.yaml:6:" in lines[0] and ": data.train[1]: " in lines[0], lines
    assert "train-01.npz: " in lines[0] and message in lines[0], lines


def test_a_glob_of_no_file_and_a_file_named_twice_are_located(run_cli, tmp_path):
    lines = check(run_cli, tmp_path, str(tmp_path / "none-*.npz"))
    assert len(lines) == 1 and "data.train: " in lines[0] and "no file matches this pattern" in lines[0]
    names = shards(tmp_path / "shards")
    lines = check(run_cli, tmp_path, "[" + ", ".join([names[0], names[1], names[0]]) + "]")
    assert len(lines) == 1 and "data.train[2]: " in lines[0] and "is already data.train[0]'s" in lines[0]


def test_block_shuffling_permutes_blocks_of_consecutive_rows(tmp_path):
    """train.shuffle_block: a permutation of all rows made of blocks in order, a function of the
    seed and epoch; on shards it trains to the bits of one file, as single rows do."""
    from netbuild.data import epoch_order

    for n, block in [(10, 4), (12, 4), (1437, 64), (5, 8)]:
        order = epoch_order(n, 3, 2, block)
        assert sorted(order) == list(range(n))
        # within a block each row follows the one before; a new block begins at a multiple
        assert all(b == a + 1 or b % block == 0 for a, b in zip(order, order[1:])), order
        assert np.array_equal(order, epoch_order(n, 3, 2, block))
    assert not np.array_equal(epoch_order(1437, 3, 2, 64), epoch_order(1437, 3, 3, 64))
    assert np.array_equal(epoch_order(50, 1, 1), epoch_order(50, 1, 1, 1))  # the default
    names = shards(tmp_path / "shards")
    one = train(tmp_path, "one", TRAIN, "train.shuffle_block=64")
    listed = train(tmp_path, "listed", "[" + ", ".join(names) + "]", "train.shuffle_block=64")
    rows = train(tmp_path, "rows", TRAIN)
    a, b, c = (r.model.network.param_values() for r in (one, listed, rows))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not all(np.array_equal(a[k], c[k]) for k in a)  # another order, other bits


def test_prefetched_batches_are_the_datasets_read_as_announced_and_errors_reach_the_caller(
        tmp_path, mapped_data, monkeypatch):
    """prefetched gives dataset.batch(idx) for each index array, in order, each run of rows of a
    mapped file announced to the kernel (posix_fadvise WILLNEED) two batches before it is read,
    single shuffled rows not at all; an error of the index arrays' source is raised in the
    caller; a caller may stop early."""
    import os

    from netbuild import data
    from netbuild.errors import DataError
    from netbuild.network import Network

    names = shards(tmp_path / "shards")
    spec = netbuild.load_spec(MLP, overrides=["data.train=[" + ", ".join(names) + "]"])
    dataset = data.load(spec, "train", Network.from_spec(spec, init=False))
    assert dataset.mapped
    events = []
    advise, preadv = os.posix_fadvise, os.preadv
    monkeypatch.setattr(os, "posix_fadvise", lambda *a: events.append(("advise", a[3])) or advise(*a))
    monkeypatch.setattr(os, "preadv", lambda *a: events.append(("read", a[2])) or preadv(*a))
    for block, announced in ((20, True), (1, False)):
        events.clear()
        order = data.epoch_order(len(dataset), 0, 1, block)
        got = list(data.prefetched(dataset, data.batches(len(dataset), 20, order)))
        want = list(data.batches(len(dataset), 20, order))
        assert len(got) == len(want)
        for (idx, arrays), expected in zip(got, want):
            assert np.array_equal(idx, expected)
            for a, b in zip(arrays, dataset.batch(expected)):
                assert np.array_equal(a, b)
        advised = [n for kind, n in events if kind == "advise"]
        reads = [kind for kind, _ in events if kind == "read"]
        assert reads and bool(advised) == announced, block
        if announced:  # x and y of batches 1-3 (a run or more each) announced before any read
            first_read = [kind for kind, _ in events].index("read")
            assert first_read >= 6 and set(kind for kind, _ in events[:first_read]) == {"advise"}

    def broken():
        yield np.arange(3)
        raise OSError("the disk went away")

    with pytest.raises(OSError, match="the disk went away"):
        list(data.prefetched(dataset, broken()))
    early = data.prefetched(dataset, data.batches(len(dataset), 10))
    next(early)
    early.close()  # a caller that stops early: nothing left behind
    failing = os.preadv

    def broken_disk(*args):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "preadv", broken_disk)
    with pytest.raises(DataError, match=r"train-\d+\.npz: cannot read row \d+ \(Input/output error\);"
                                        " expected a readable data file"):
        list(data.prefetched(dataset, data.batches(len(dataset), 10)))
    monkeypatch.setattr(os, "preadv", failing)
    unsigned = np.arange(5, 25, dtype=np.uint64)  # the API's index arrays may be unsigned
    for a, b in zip(dataset.batch(unsigned), dataset.batch(unsigned.astype(np.int64))):
        np.testing.assert_array_equal(a, b)


def test_in_memory_reads_the_arrays_that_fit_smallest_first(tmp_path, monkeypatch):
    """A data set larger than NETBUILD_IN_MEMORY_MAX: its arrays that fit, the smallest first
    (the class ids), are read into memory and their maps let go; the others stay read from the
    files. All of it fits: all of it in memory; nothing fits: as it was."""
    from netbuild import data
    from netbuild.network import Network

    names = shards(tmp_path / "shards")
    spec = netbuild.load_spec(MLP, overrides=["data.train=[" + ", ".join(names) + "]"])
    dataset = data.load(spec, "train", Network.from_spec(spec, init=False))
    x, y = np.asarray(dataset.x), np.asarray(dataset.y)
    for bound, x_kept, y_kept in ((y.nbytes, False, True), (y.nbytes - 1, False, False),
                                  (x.nbytes + y.nbytes, True, True)):
        monkeypatch.setenv("NETBUILD_IN_MEMORY_MAX", str(bound))
        kept = data.in_memory(data.load(spec, "train", Network.from_spec(spec, init=False)))
        assert data.reads_files(kept.x) != x_kept and data.reads_files(kept.y) != y_kept, bound
        assert kept.mapped == (not (x_kept and y_kept))
        np.testing.assert_array_equal(np.asarray(kept.x), x)
        np.testing.assert_array_equal(np.asarray(kept.y), y)


def test_announcing_stops_while_the_files_are_cached_and_starts_again_when_not(tmp_path,
                                                                              mapped_data,
                                                                              monkeypatch):
    """Runs are announced (posix_fadvise) until FIRST_NEEDED batches in a row were read from
    the kernel's cache alone (RWF_NOWAIT), then not; a read that finds rows missing (the files
    dropped from the cache) starts announcing again, with twice as many batches needed to
    stop. The batches are the same throughout, a read of part of the rows from the cache
    included; a kernel that refuses RWF_NOWAIT is read as before, always announced."""
    import os

    from netbuild import data
    from netbuild.network import Network

    monkeypatch.setattr(data, "_NOWAIT", data._NOWAIT)  # as it was, after the test
    probe = tmp_path / "probe"
    probe.write_bytes(b"x" * 4096)
    fd = os.open(probe, os.O_RDONLY)
    try:
        if not data._NOWAIT:
            raise OSError
        os.preadv(fd, [bytearray(16)], 0, data._NOWAIT)
    except BlockingIOError:
        pass
    except OSError:
        pytest.skip("no RWF_NOWAIT reads here")
    finally:
        os.close(fd)
    a = data.Announcing()
    assert a.on and a.needed == a.FIRST_NEEDED
    for _ in range(a.FIRST_NEEDED):
        assert not a.saw(True)
    assert not a.on
    assert a.saw(False)  # starts again
    assert a.on and a.needed == 2 * a.FIRST_NEEDED and a.hits == 0
    assert not a.saw(True) and not a.saw(False)  # a miss while announcing: no doubling
    assert a.on and a.needed == 2 * a.FIRST_NEEDED

    names = shards(tmp_path / "shards")
    spec = netbuild.load_spec(MLP, overrides=["data.train=[" + ", ".join(names) + "]"])
    dataset = data.load(spec, "train", Network.from_spec(spec, init=False))
    events = []
    advise, preadv = os.posix_fadvise, os.preadv
    monkeypatch.setattr(os, "posix_fadvise", lambda *a: events.append(len(events)) or advise(*a))
    monkeypatch.setattr(data.FileReads, "MOST_RUNS_PER_ROW", 1)  # batches across blocks too
    order = data.epoch_order(len(dataset), 0, 1, 10)
    want = list(data.batches(len(dataset), 10, order))
    batches = data.prefetched(dataset, iter(want))
    try:
        got = [next(batches) for _ in range(30)]  # the files were just written: in the cache
        # x and y, a run or two each, until FIRST_NEEDED batches were read, two ahead
        assert 2 * data.Announcing.FIRST_NEEDED < len(events) <= 4 * (data.Announcing.FIRST_NEEDED + 2)
        quiet = len(events)
        got += [next(batches) for _ in range(10)]
        assert len(events) == quiet  # nothing announced

        def half_cached(fd, buffers, offset, *flags):
            """The kernel's cache holds the first half of what is asked for (a short read)."""
            if flags and flags[0]:
                (view,) = buffers
                return preadv(fd, [view[:len(view) // 2]], offset, *flags) if len(view) > 1 else 0
            return preadv(fd, buffers, offset, *flags)

        monkeypatch.setattr(os, "preadv", half_cached)
        got.append(next(batches))
        # a read found rows missing: the two batches planned since are announced at once
        assert len(events) >= quiet + 2 * 2
        got += [next(batches) for _ in range(9)]
        monkeypatch.setattr(os, "preadv", preadv)
        got += list(batches)
    finally:
        batches.close()
    assert len(got) == len(want)
    for (idx, arrays), expected in zip(got, want):
        assert np.array_equal(idx, expected)
        for g, w in zip(arrays, dataset.batch(expected)):
            assert np.array_equal(g, w)

    def refused(*args):
        if len(args) > 3 and args[3]:
            raise OSError(95, "Operation not supported")
        return preadv(*args)

    monkeypatch.setattr(os, "preadv", refused)
    events.clear()
    refused_got = list(data.prefetched(dataset, iter(want)))
    assert data._NOWAIT == 0 and len(events) >= 2 * len(want) - 2
    for (_, arrays), expected in zip(refused_got, want):
        for g, w in zip(arrays, dataset.batch(expected)):
            assert np.array_equal(g, w)


# -- reading batches from the files -----------------------------------------------------------
def _mapped(tmp_path, name, x):
    from netbuild import data

    np.savez(tmp_path / name, x=x)
    found = data.read_arrays(tmp_path / name, ["x"], data.reporter(name))["x"]
    assert isinstance(found, np.memmap)
    return found


def test_gather_reads_runs_of_rows_from_the_file_and_equals_indexing(tmp_path, monkeypatch):
    """Rows are read from the file with one pread per run of consecutive rows (shuffle_block),
    single shuffled rows one each. Both give exactly ``array[index]``, for the
    array, a reshaped view of it (what prepare_x makes) and rows across files (Rows)."""
    import os

    from netbuild import data

    rng = np.random.default_rng(4)
    a = rng.normal(size=(700, 12)).astype(np.float32)
    mapped = _mapped(tmp_path, "a.npz", a)
    calls = []
    preadv = os.preadv
    monkeypatch.setattr(os, "preadv", lambda *args: calls.append(1) or preadv(*args))
    order = data.epoch_order(700, 0, 1, 64)
    cases = {"a run": np.arange(100, 164), "two runs": order[:128], "a run with an end": np.arange(650, 700),
             "negative": np.arange(-64, 0), "shuffled rows": rng.permutation(700)[:128]}
    for name, index in cases.items():
        calls.clear()
        got = data.gather(mapped, index)
        np.testing.assert_array_equal(got, a[index], err_msg=name)
        runs = 1 + int(np.sum(np.diff(index % 700) != 1))
        assert len(calls) == runs, name
    mask = np.zeros(700, bool)  # not an index array of rows: indexed as numpy does
    mask[[3, 4, 5]] = True
    np.testing.assert_array_equal(data.gather(mapped, mask), a[mask])
    with pytest.raises(IndexError, match="-701"):
        data.gather(mapped, np.arange(-701, -701 + 64))
    view = mapped.reshape(700, 3, 4)
    np.testing.assert_array_equal(data.gather(view, order[:128]), a.reshape(700, 3, 4)[order[:128]])
    b = rng.normal(size=(300, 12)).astype(np.float32)
    rows = data.Rows([mapped, _mapped(tmp_path, "b.npz", b)])
    both = np.concatenate([a, b])
    index = data.epoch_order(1000, 0, 2, 100)[:256]
    np.testing.assert_array_equal(rows[index], both[index])
    calls.clear()  # a run across the two files: one read in each
    np.testing.assert_array_equal(rows[np.arange(650, 750)], both[650:750])
    assert len(calls) == 2
    c = rng.normal(size=(40, 12)).astype(np.float32)
    three = data.Rows([mapped, _mapped(tmp_path, "b.npz", b)[:30], _mapped(tmp_path, "c.npz", c)])
    every = np.concatenate([a, b[:30], c])
    calls.clear()  # a run across three files, and one inside the last: four reads
    index = np.concatenate([np.arange(690, 740), np.arange(755, 765)])
    np.testing.assert_array_equal(three[index], every[index])
    assert len(calls) == 4
    np.testing.assert_array_equal(rows[np.arange(-360, -340)], both[-360:-340])


def test_a_file_cut_short_after_its_check_is_one_line_not_a_traceback(tmp_path):
    """Rows read with pread past the end of a file truncated since it was checked: a DataError
    naming the file and the row (the map itself is never touched, so no SIGBUS)."""
    import os

    from netbuild import data
    from netbuild.errors import DataError

    a = np.arange(700 * 12, dtype=np.float32).reshape(700, 12)
    mapped = _mapped(tmp_path, "a.npz", a)
    os.truncate(tmp_path / "a.npz", os.path.getsize(tmp_path / "a.npz") // 2)
    with pytest.raises(DataError, match=r"a.npz: ends before row \d+, which it held when it was "
                                        r"checked; expected the data files to stay as they are"):
        data.gather(mapped, np.arange(600, 664))


def _file_resident_bytes() -> int:
    """The process's resident pages of mapped files (RssFile of /proc/self/status)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024
    pytest.skip("no RssFile in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux's /proc")
def test_an_epoch_of_shuffled_rows_of_a_mapped_file_leaves_none_of_it_resident(tmp_path):
    """A whole epoch of single shuffled rows read from a 64 MiB memory-mapped file: its pages
    are copied with pread, never mapped into the process (gathered from the map, the kernel
    mapped the large folio around each row: nearly all of the file after one batch)."""
    from netbuild import data

    a = np.random.default_rng(0).random((16384, 1024), dtype=np.float32)
    mapped = _mapped(tmp_path, "big.npz", a)
    dataset = data.Dataset([mapped], [np.zeros(len(a), np.int64)], "big.npz")
    before, most = _file_resident_bytes(), 0
    order = data.epoch_order(len(a), 0, 1)
    for idx, (x, _) in data.prefetched(dataset, data.batches(len(a), 1024, order)):
        np.testing.assert_array_equal(x[:3], a[idx[:3]])
        most = max(most, _file_resident_bytes() - before)
    assert most < 8 * 2**20, f"{most / 2**20:.0f} MiB of the file resident"


def test_block_shuffled_training_on_mapped_shards_reads_them_with_pread(tmp_path, monkeypatch,
                                                                      mapped_data):
    """The same bits as the rows in one file in memory, read with pread (no page of the files
    mapped by a batch)."""
    import os

    names = shards(tmp_path / "shards")
    calls = []
    preadv = os.preadv
    monkeypatch.setattr(os, "preadv", lambda *args: calls.append(1) or preadv(*args))
    sharded = train(tmp_path, "sharded", "[" + ", ".join(names) + "]", "train.shuffle_block=16")
    assert calls
    one = train(tmp_path, "one", TRAIN, "train.shuffle_block=16")
    a, b = one.model.network.param_values(), sharded.model.network.param_values()
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_training_on_single_shuffled_rows_of_files_says_how_to_read_runs(tmp_path, mapped_data,
                                                                         run_cli):
    """A training set read from its files in single shuffled rows (one read each): `netbuild
    train` says so in one note, and how to read runs instead; not with train.shuffle_block, nor
    for compressed files (decompressed into memory, several files as one set). With blocks of
    whole batches, files whose inputs lie unaligned (numpy.savez) are named in a note saying
    that netbuild.savez writes them to be read in place; not those it wrote."""
    stored = "[" + ", ".join(shards(tmp_path / "shards")) + "]"
    compressed = "[" + ", ".join(shards(tmp_path / "packed", save=np.savez_compressed)) + "]"
    aligned = "[" + ", ".join(shards(tmp_path / "aligned", save=netbuild.savez)) + "]"
    unaligned = ("train-00.npz and 2 more: the inputs lie unaligned in the file (numpy.savez puts "
                 "an array where its name leaves it), so each batch is copied out of it; written "
                 "by netbuild.savez")
    for case, (data, block, noted) in enumerate((
            (stored, 1, "one system call per shuffled row; train.shuffle_block: 1024"),
            (stored, 16, None), (stored, 48, None),  # blocks that are not whole batches
            (compressed, 1, None), (stored, 32, unaligned), (stored, 64, unaligned),
            (aligned, 32, None), (aligned, 1, "one system call per shuffled row"))):
        result = run_cli("train", MLP, "--run-dir", tmp_path / f"run-{case}", "--set",
                         f"data.train={data}", "--set", f"train.shuffle_block={block}", "--set",
                         "train.epochs=1", "--set", "data.validation_split=0")
        out = result.output
        assert result.exit_code == 0, out
        notes = [line for line in out.splitlines() if line.startswith("note:")]
        assert len(notes) == int(noted is not None), out
        if noted:
            assert noted in notes[0], notes


# -- batches read in place: files written by netbuild.savez -----------------------------------
def test_batches_of_one_run_of_aligned_files_are_views_of_their_maps(tmp_path, monkeypatch,
                                                                   mapped_data):
    """Files written by netbuild.savez (each array's data aligned): a batch of consecutive rows
    of one file is a read-only view of the file's map, no row read with pread; a batch across
    two files, or of several runs, is read as before; from numpy.savez's files (unaligned) every
    batch is read. Each equals indexing the rows in memory."""
    import os

    from netbuild import data

    rng = np.random.default_rng(2)
    a, b = (rng.normal(size=(n, 12)).astype(np.float32) for n in (700, 300))
    netbuild.savez(tmp_path / "a.npz", x=a)
    netbuild.savez(tmp_path / "b.npz", x=b)
    np.savez(tmp_path / "c.npz", x=a)
    parts = [data.read_arrays(tmp_path / f"{k}.npz", ["x"], data.reporter(k))["x"] for k in "abc"]
    assert parts[0].flags.aligned and not parts[2].flags.aligned
    rows, both = data.Rows(parts[:2]), np.concatenate([a, b])
    reads = []
    preadv = os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, bufs, *rest: reads.append(len(bufs[0])) or preadv(fd, bufs, *rest))
    cases = [(rows, both, np.arange(100, 164), True),  # in the first file
             (rows, both, np.arange(720, 784), True),  # in the second
             (rows, both, np.arange(650, 750), False),  # across the two
             (rows, both, np.concatenate([np.arange(0, 32), np.arange(64, 96)]), False),
             (rows, both, np.array([5, 7, 6, 8]), False),  # rows 5 to 8, not in order
             (parts[0], a, np.arange(100, 164), True),
             (parts[2], a, np.arange(100, 164), False)]  # numpy.savez's: unaligned
    for array, values, index, viewed in cases:
        reads.clear()
        r = data.file_reads(array, index)
        view = r.view()
        assert (view is not None) == viewed, index
        got = view if viewed else r.read()
        np.testing.assert_array_equal(got, values[index])
        if viewed:
            assert not reads and not got.flags.writeable and got.flags.aligned
            assert np.shares_memory(got, parts[0] if index[0] < 700 else parts[1])
            assert type(got) is np.ndarray
        else:
            assert sum(reads) == len(index) * 12 * 4
    # a file cut short since it was checked: one line, not a SIGBUS at the step
    os.truncate(tmp_path / "b.npz", os.path.getsize(tmp_path / "b.npz") // 2)
    from netbuild.errors import DataError
    with pytest.raises(DataError, match=r"b.npz: ends before row \d+, which it held when it was checked"):
        data.file_reads(rows, np.arange(900, 964)).view()


def test_in_memory_batches_of_consecutive_rows_are_read_only_views(tmp_path):
    """A batch of consecutive rows of an array in memory is a read-only view of it (a step does
    not copy its rows); rows out of order, with gaps, negative or past the end are gathered."""
    from netbuild import data

    a = np.arange(50 * 3, dtype=np.float32).reshape(50, 3)
    for index, viewed in ((np.arange(10, 20), True), (np.arange(0, 50), True), (np.array([4]), True),
                          (np.arange(10, 20, dtype=np.uint32), True), (np.array([1, 3, 2, 4]), False),
                          (np.array([1, 2, 4]), False), (np.arange(-5, 0), False),
                          (np.arange(45, 55) % 50, False), (np.array([], np.int64), False)):
        got = data.gather(a, index)
        np.testing.assert_array_equal(got, a[index])
        assert np.shares_memory(got, a) == viewed, index
        if viewed:
            assert not got.flags.writeable and a.flags.writeable
    with pytest.raises(IndexError):
        data.gather(a, np.arange(45, 55))


def test_training_on_aligned_shards_reads_its_batches_in_place_to_the_same_bits(tmp_path,
                                                                                monkeypatch,
                                                                                mapped_data):
    """Shards written by netbuild.savez, blocks of a batch (32 rows): every batch is a view of a
    file's map but the two whose block crosses from one file to the next, and the model and its
    records are bitwise those trained on numpy.savez's shards (read with pread) and on the rows
    in one file in memory (whose batches are views of the array)."""
    from netbuild import data

    views = []
    view = data.FileReads.view
    monkeypatch.setattr(data.FileReads, "view",
                        lambda self: views.append((len(self.runs[0]), v := view(self))) or v)
    aligned = shards(tmp_path / "aligned", save=netbuild.savez)
    stored = shards(tmp_path / "stored")
    runs = {}
    for name, files in (("aligned", aligned), ("stored", stored)):
        views.clear()
        runs[name] = train(tmp_path, f"run-{name}", "[" + ", ".join(files) + "]", "train.shuffle_block=32")
        one_run = [runs_ == 1 for runs_, _ in views]
        assert [v is not None for _, v in views] == (one_run if name == "aligned" else [False] * len(views))
        # x and y of the blocks at rows 480 and 1088 (across two files), in 3 epochs
        assert len(one_run) - sum(one_run) == 2 * 2 * 3
    monkeypatch.delenv("NETBUILD_IN_MEMORY_MAX")
    runs["memory"] = train(tmp_path, "memory", TRAIN, "train.shuffle_block=32")
    a = runs["memory"].model.network.param_values()
    timing = ("seconds", "samples_per_second")
    for name, run in runs.items():
        b = run.model.network.param_values()
        assert all(np.array_equal(a[k], b[k]) for k in a), name
        assert [{k: v for k, v in r.items() if k not in timing} for r in run.history] == \
            [{k: v for k, v in r.items() if k not in timing} for r in runs["memory"].history], name


def test_kept_targets_do_not_touch_a_file_cut_short_after_their_batch(tmp_path):
    """The targets an epoch keeps for its metrics are copied when their batch was read in place:
    a file cut short after its last batch was read, the epoch ends and the next one says so in a
    line, where the kept views would have ended the process (SIGBUS) at the epoch's metrics."""
    import subprocess
    import sys

    names = shards(tmp_path / "shards", save=netbuild.savez)
    script = f"""
import os, sys, netbuild
spec = netbuild.load_spec({str(MLP)!r}, overrides=["data.train=[{', '.join(names)}]", "train.epochs=2",
                          "data.validation_split=0", "train.shuffle_block=32"])
def batch(epoch, i, n, loss, seconds):
    if epoch == 1 and i == n:
        os.truncate({names[0]!r}, 4096)
try:
    netbuild.train(spec, {str(tmp_path / "run")!r}, callbacks=netbuild.Callbacks(batch=batch))
except netbuild.NetbuildError as error:
    print(error)
    sys.exit(1)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "NETBUILD_IN_MEMORY_MAX": "0"})
    assert done.returncode == 1, (done.returncode, done.stderr[-2000:])
    assert "train-00.npz: ends before row" in done.stdout and "Traceback" not in done.stderr


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux's /proc")
def test_an_epoch_of_views_of_a_mapped_file_keeps_resident_only_what_was_read_since_a_release(
        tmp_path, monkeypatch):
    """Batches read in place (views of the map of a file netbuild.savez wrote) map the pages a
    step reads, and the kernel the rest of their large folios; they are let go every
    RELEASE_EVERY bytes, counting MAPPED_AROUND on each side of a batch, so an epoch over a file
    holds about that much of it, not the file."""
    from netbuild import data

    monkeypatch.setattr(data, "RELEASE_EVERY", 8 * 2**20)
    a = np.random.default_rng(0).random((16384, 1024), dtype=np.float32)  # 64 MiB
    netbuild.savez(tmp_path / "big.npz", x=a)
    mapped = data.read_arrays(tmp_path / "big.npz", ["x"], data.reporter("big.npz"))["x"]
    dataset = data.Dataset([mapped], [np.zeros(len(a), np.int64)], "big.npz")
    before, most, views = _file_resident_bytes(), 0, 0
    order = data.epoch_order(len(a), 0, 1, 256)
    for idx, (x, _) in data.prefetched(dataset, data.batches(len(a), 256, order)):
        views += np.shares_memory(x, mapped)
        assert float(x.sum()) == float(a[idx].sum())  # every page of the batch read
        most = max(most, _file_resident_bytes() - before)
    assert views == len(a) // 256
    assert most < 2 * data.RELEASE_EVERY, f"{most / 2**20:.0f} MiB of the file resident"
    assert _file_resident_bytes() - before < 4 * 2**20  # released at the end


def test_announcing_asks_the_cache_of_batches_read_in_place(tmp_path, mapped_data, monkeypatch):
    """Batches that are views read nothing, so the kernel's cache is asked with one-byte
    RWF_NOWAIT reads of each run's ends: while it holds them, announcing stops; when it does
    not, announcing starts again."""
    import os

    from netbuild import data
    from netbuild.network import Network

    if not data._NOWAIT:
        pytest.skip("no RWF_NOWAIT reads here")
    rng = np.random.default_rng(0)
    names = []
    for k in range(3):  # 320 rows each: every batch of a block of 32 rows is one run of a file
        names.append(str(tmp_path / f"train-{k}.npz"))
        netbuild.savez(names[-1], x=rng.random((320, 64), dtype=np.float32),
                       y=rng.integers(0, 10, 320))
    spec = netbuild.load_spec(MLP, overrides=["data.train=[" + ", ".join(names) + "]"])
    dataset = data.load(spec, "train", Network.from_spec(spec, init=False))
    advised = []
    advise = os.posix_fadvise
    monkeypatch.setattr(os, "posix_fadvise", lambda *a: advised.append(1) or advise(*a))
    want = list(data.batches(len(dataset), 32, data.epoch_order(len(dataset), 0, 1, 32)))
    batches = data.prefetched(dataset, iter(want))
    got = [next(batches) for _ in range(data.Announcing.FIRST_NEEDED + 4)]
    assert all(any(np.shares_memory(arrays[0], part) for part in dataset.x.parts) for _, arrays in got)
    quiet = len(advised)
    got += [next(batches) for _ in range(5)]
    assert len(advised) == quiet  # the files were just written: in the cache, nothing announced
    monkeypatch.setattr(data.FileReads, "in_cache", lambda self: False)
    got += [next(batches) for _ in range(3)]
    assert len(advised) > quiet  # announcing again
    got += list(batches)
    for (idx, arrays), expected in zip(got, want):
        assert np.array_equal(idx, expected)
        for g, w in zip(arrays, dataset.batch(expected)):
            assert np.array_equal(g, w)


def test_fortran_ordered_rows_train_to_the_bits_of_c_ordered_ones(tmp_path, monkeypatch):
    """Rows stored in Fortran order (as DataFrame.to_numpy gives), in memory and mapped, train
    to the bits of the same rows in C order with blocks of a batch: a batch of them is copied
    into C order, where a strided view would take another path through BLAS (61 features: it
    did, by 1e-7)."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(997, 61)).astype(np.float32), rng.integers(0, 10, 997)
    params = {}
    for order, save, bound in (("C", np.savez, None), ("F", np.savez, None), ("F", netbuild.savez, "0")):
        name = f"{order}-{save.__module__}"
        save(tmp_path / f"{name}.npz", x=np.asfortranarray(x) if order == "F" else x, y=y)
        (tmp_path / "s.yaml").write_text(f"""
name: f
seed: 3
data: {{train: {name}.npz, validation_split: 0}}
model:
  input_shape: [61]
  layers: [{{type: dense, units: 37, activation: relu}}, {{type: dense, units: 10, activation: softmax}}]
train: {{loss: categorical_crossentropy, optimizer: {{type: adam, learning_rate: 0.01}}, batch_size: 32,
        epochs: 2, shuffle_block: 32}}
""")
        if bound is None:
            monkeypatch.delenv("NETBUILD_IN_MEMORY_MAX", raising=False)
        else:
            monkeypatch.setenv("NETBUILD_IN_MEMORY_MAX", bound)
        run = netbuild.train(netbuild.load_spec(tmp_path / "s.yaml"), tmp_path / f"run-{name}")
        params[name] = run.model.network.param_values()
    a = params["C-numpy"]
    for name, b in params.items():
        assert all(np.array_equal(a[k], b[k]) for k in a), name


def test_in_cache_tells_whether_the_kernel_holds_a_batchs_rows(tmp_path):
    """FileReads.in_cache (one-byte RWF_NOWAIT reads): true for rows the kernel holds, false once
    they were dropped from its cache (the file synced, then POSIX_FADV_DONTNEED), true again
    after they were read."""
    import os

    from netbuild import data

    if not data._NOWAIT or not hasattr(os, "posix_fadvise"):
        pytest.skip("no RWF_NOWAIT reads or posix_fadvise here")
    path = tmp_path / "a.npz"
    netbuild.savez(path, x=np.random.default_rng(0).random((4096, 256), dtype=np.float32))
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
    mapped = data.read_arrays(path, ["x"], data.reporter("a.npz"))["x"]
    reads = data.file_reads(mapped, np.arange(1024, 2048))
    fd = os.open(path, os.O_RDONLY)
    try:
        reads.read()
        assert reads.in_cache()
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if not reads.in_cache():  # a file system that drops its clean pages when told
            reads.read()
            assert reads.in_cache()
        else:
            pytest.skip("this file system keeps its pages in the cache when told to drop them")
    finally:
        os.close(fd)
