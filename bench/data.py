"""``make bench-data``: training on data larger than the in-memory path could hold comfortably,
against that path, in one run -> bench/RESULTS-data.md.

Generates (and removes afterwards) 8 GiB of float32 rows, 1024 features each, in 8 files of
1 GiB stored uncompressed (``numpy.savez``: netbuild memory-maps them), and 1 GiB of the same
rows (the first file's) in one compressed file (``numpy.savez_compressed``: decompressed into
memory, the in-memory path). `netbuild train` trains a small MLP (1024-32-10, Adam, batch 1024,
no validation) for one epoch on each, in a process of its own: its samples/s (from
metrics.jsonl, the epoch's batch loop) and its peak resident memory (the kernel's, for the
process). The processes are started from this script once it holds no data (a child forked from
a process holding gigabytes counts them in its peak until it execs).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
WIDTH = 1024
SHARD_ROWS = 2**18  # 1 GiB of float32 rows of 1024

SPEC = """
name: {name}
seed: 0
data: {{train: {train}}}
model:
  input_shape: [{width}]
  layers: [{{type: dense, units: 32, activation: relu}}, {{type: dense, units: 10, activation: softmax}}]
train: {{loss: categorical_crossentropy, optimizer: {{type: adam, learning_rate: 0.001}},
        batch_size: 1024, epochs: 1, metrics: [accuracy]{block}}}
"""


def rows(k: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(k)
    return rng.random((SHARD_ROWS, WIDTH), dtype=np.float32), rng.integers(0, 10, SHARD_ROWS)


def generate(folder: Path, shards: int) -> None:
    for k in range(shards):
        x, y = rows(k)
        np.savez(folder / f"train-{k:02d}.npz", x=x, y=y)
        if k == 0:
            np.savez_compressed(folder / "memory.npz", x=x, y=y)
        del x, y
        gc.collect()


def train(folder: Path, name: str, train: str, block: int) -> dict:
    spec = folder / f"{name}.yaml"
    spec.write_text(SPEC.format(name=name, train=train, width=WIDTH,
                                block=f", shuffle_block: {block}" if block > 1 else ""))
    netbuild = Path(sys.executable).with_name("netbuild")
    start = time.perf_counter()
    proc = subprocess.Popen([str(netbuild), "train", str(spec), "--quiet", "--run-dir",
                             str(folder / f"run-{name}")])
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"netbuild train {name} failed")
    record = json.loads((folder / f"run-{name}" / "metrics.jsonl").read_text().splitlines()[-1])
    return {"samples_per_second": record["samples_per_second"], "epoch_seconds": record["seconds"],
            "max_rss_bytes": usage.ru_maxrss * 1024, "process_seconds": time.perf_counter() - start}


#: The epoch orders measured: single rows (train.shuffle_block 1, the default), and blocks of
#: 1024 consecutive rows (a batch's rows contiguous in its file).
BLOCKS = (1, 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=str(HERE / "RESULTS-data.md"))
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="netbuild-bench-data-"))
    try:
        start = time.perf_counter()
        generate(folder, args.shards)
        os.sync()  # the files on disk before any timing: writing them back competes with reading
        made = time.perf_counter() - start
        size = sum(f.stat().st_size for f in folder.glob("train-*.npz"))
        results = {(name, block): [] for block in BLOCKS for name in ("sharded", "memory")}
        for _ in range(args.rounds):  # alternating: the machine's speed drifts
            for block in BLOCKS:
                results["memory", block].append(train(folder, "memory", str(folder / "memory.npz"), block))
                results["sharded", block].append(train(folder, "sharded", str(folder / "train-*.npz"), block))
                for run in folder.glob("run-*"):
                    shutil.rmtree(run)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    write(Path(args.out), results, size, args.shards, made)


def write(out: Path, results: dict, size: int, shards: int, made: float) -> None:
    gib = 2**30
    rounds = len(next(iter(results.values())))
    lines = [
        "# Data larger than memory: netbuild on memory-mapped shards against its in-memory path",
        "",
        f"Written by `make bench-data` ({time.strftime('%Y-%m-%d %H:%M')}). {shards} files of "
        f"{SHARD_ROWS:,} rows x {WIDTH} float32 ({size / gib:.2f} GiB in all, stored uncompressed, "
        f"memory-mapped; generated in {made:.0f} s and removed after) against 1 GiB of the same "
        "rows (the first file's) in one compressed file, decompressed into memory. `netbuild train`, "
        "MLP 1024-32-10, Adam, batch 1024, one epoch, no validation, each in a process of its own, "
        f"the runs alternating for {rounds} round(s); samples/s of the epoch's batch loop "
        "(metrics.jsonl), peak resident memory of the process (the kernel's max RSS), with the "
        "epoch order of single rows (`train.shuffle_block: 1`, the default) and of blocks of 1024 "
        "consecutive rows (`train.shuffle_block: 1024`).",
        "",
        "| epoch order | data | rows | samples/s (each round) | peak resident memory (each round) | process s |",
        "|---|---|---|---|---|---|",
    ]
    for block in BLOCKS:
        order = "single rows" if block == 1 else f"blocks of {block} rows"
        for name, label, n in (("sharded", f"{shards} memory-mapped files, {size / gib:.1f} GiB",
                                shards * SHARD_ROWS),
                               ("memory", "1 compressed file in memory, 1.0 GiB", SHARD_ROWS)):
            runs = results[name, block]
            lines.append(f"| {order} | {label} | {n:,} | "
                         + ", ".join(f"{r['samples_per_second']:,.0f}" for r in runs) + " | "
                         + ", ".join(f"{r['max_rss_bytes'] / gib:.2f} GiB" for r in runs) + " | "
                         + ", ".join(f"{r['process_seconds']:.0f}" for r in runs) + " |")
    lines.append("")
    for block in BLOCKS:
        best = {k: max(results[k, block], key=lambda r: r["samples_per_second"])
                for k in ("sharded", "memory")}
        ratio = best["sharded"]["samples_per_second"] / best["memory"]["samples_per_second"]
        order = "single rows" if block == 1 else f"blocks of {block} rows"
        lines.append(f"- {order}: sharded / in-memory samples/s (best rounds) {ratio:.2f}x (target "
                     f"0.9x); peak memory of the sharded run {best['sharded']['max_rss_bytes'] / gib:.2f} "
                     "GiB (target under 1.5 GiB).")
    lines.append("")
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
