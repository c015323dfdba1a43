"""``make bench-data-paired``: the ways netbuild reads a training set, measured in one process,
epochs alternating -> bench/RESULTS-data-paired.md.

``make bench-data`` runs each side in a process of its own, minutes apart, and this machine's
speed swings by up to 2x between runs minutes apart: its rounds' pairs spread over 0.76x-1.08x,
wider than the difference between two ways of reading. Here one process holds three Trainers on
the same rows (a file of 1 GiB of float32 rows, 1024 features, blocks of 1024 rows, the bench
MLP of ``bench/data.py``): the files written by ``netbuild.savez`` (batches read in place, views
of the files' maps), the same files written by ``numpy.savez`` (batches copied out with
``pread``), and the same rows read into memory (batches views of the arrays). Each round
trains one epoch of each, in turn (the order reversed every other round), seconds apart; the
ratios are taken per round, against that round's in-memory epoch.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from data import SHARD_ROWS, SPEC, WIDTH  # noqa: E402

#: (name, files, NETBUILD_IN_MEMORY_MAX when the Trainer is prepared: None for the default,
#: which leaves 1 GiB arrays in their files)
WAYS = (("memory", "train-00.npz", str(4 << 30)),
        ("netbuild.savez", "train-*.npz", None),
        ("numpy.savez", "numpy-*.npz", None))
SHARDS = 1  # the in-memory side reads the same rows (an epoch of each is the same length)


def trainer(folder: Path, name: str, files: str, bound: str | None):
    from netbuild.runs import RunDir
    from netbuild.spec import load_spec
    from netbuild.training import Trainer

    os.environ.pop("NETBUILD_IN_MEMORY_MAX", None)
    if bound is not None:
        os.environ["NETBUILD_IN_MEMORY_MAX"] = bound
    safe = name.replace(".", "-")
    spec = folder / f"{safe}.yaml"
    spec.write_text(SPEC.format(name=safe, train=str(folder / files), width=WIDTH, epochs=1,
                                block=", shuffle_block: 1024"))
    run = RunDir(folder / f"run-{safe}")
    run.create()
    try:
        return Trainer.prepare(load_spec(spec), run)
    finally:
        os.environ.pop("NETBUILD_IN_MEMORY_MAX", None)


def measure(folder: Path, rounds: int) -> dict[str, list[float]]:
    from netbuild import threads
    from netbuild.training import frozen_garbage

    threads.apply(threads.default_threads())  # as `netbuild train` does
    trainers = {name: trainer(folder, name, files, bound) for name, files, bound in WAYS}
    assert trainers["netbuild.savez"].sets.train.mapped and not trainers["memory"].sets.train.mapped
    assert len({len(t.sets.train) for t in trainers.values()}) == 1  # epochs of the same rows
    speeds = {name: [] for name in trainers}
    try:
        with frozen_garbage():
            for t in trainers.values():  # the first epoch of each: compiled code and caches warm
                t.run_epoch(1)
            for r in range(rounds):
                names = list(trainers) if r % 2 == 0 else list(trainers)[::-1]
                for name in names:
                    speeds[name].append(trainers[name].run_epoch(r + 2)["samples_per_second"])
    finally:
        for t in trainers.values():
            t.run_dir.unlock()
    return speeds


def write(out: Path, speeds: dict[str, list[float]], rounds: int) -> None:
    from netbuild.threads import default_threads

    memory = speeds["memory"]
    lines = [
        "# The ways netbuild reads a training set, in one process",
        "",
        f"Written by `make bench-data-paired` ({time.strftime('%Y-%m-%d %H:%M')}). One process, "
        f"{default_threads()} threads (netbuild's default here), three Trainers on the same rows: "
        f"{SHARDS} file(s) of {SHARD_ROWS:,} rows x {WIDTH} float32 "
        f"({SHARD_ROWS * WIDTH * 4 / 2**30:.0f} GiB each) written by `netbuild.savez` (read "
        "in place) and by `numpy.savez` (copied out with `pread`), and the same rows in "
        "memory. MLP 1024-32-10, Adam, batch 1024, `train.shuffle_block: 1024`; one epoch of each "
        f"per round, in turn, the order reversed every other round, {rounds} rounds after one "
        "epoch each to warm up. The files were written just before, and an epoch of each reads "
        "them every round (the kernel's cache holds them unless it reclaims memory).",
        "",
        "| data | samples/s (median) | against the in-memory epoch of the same round (median) | each round |",
        "|---|---|---|---|",
    ]
    for name, _, _ in WAYS:
        ratios = [s / m for s, m in zip(speeds[name], memory)]
        lines.append(f"| {name if name != 'memory' else 'in memory'} | "
                     f"{statistics.median(speeds[name]):,.0f} | {statistics.median(ratios):.2f}x | "
                     + ", ".join(f"{r:.2f}x" for r in ratios) + " |")
    lines.append("")
    out.write_text("\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--out", default=str(HERE / "RESULTS-data-paired.md"))
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="netbuild-bench-data-paired-"))
    try:
        # bench/data.py's rows, in a process of its own, so that this one never holds them
        subprocess.run([sys.executable, str(HERE / "data.py"), "--generate", str(folder), "--shards",
                        str(SHARDS), "--uncompressed-only"], check=True)
        os.sync()
        speeds = measure(folder, args.rounds)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    write(Path(args.out), speeds, args.rounds)


if __name__ == "__main__":
    main()
