"""``make bench-threads``: what the second core gives netbuild, in one process, written to
bench/RESULTS-threads.md.

For each model of :mod:`models` and optimizer of :data:`models.OPTIMIZERS`: one Trainer (the loop
of ``netbuild train``), then rounds of two epochs, one on 1 thread and one on every core
(``netbuild.threads.apply`` between them), for ``--rounds`` rounds after a warm-up epoch at each
count. The gain is the median of each round's paired ratio: the two epochs of a round are
seconds apart, where ``make bench`` compares separate processes run minutes apart on a machine
whose speed drifts. netbuild alone, no PyTorch.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import netbuild  # noqa: E402,F401  first, as `netbuild train` does (netbuild.threads)

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

from bench import netbuild_trainer  # noqa: E402
from models import MODELS, OPTIMIZERS  # noqa: E402

from netbuild import backend, threads  # noqa: E402
from netbuild.training import frozen_garbage  # noqa: E402


def gain(name: str, optimizer: str, rounds: int, workdir: Path) -> dict:
    cores = threads.available_cores()
    workdir.mkdir(parents=True, exist_ok=True)
    trainer = netbuild_trainer(MODELS[name], workdir, optimizer)
    one, many = [], []
    try:
        with frozen_garbage():
            for n in (1, cores):  # warm-up at each count
                threads.apply(n)
                trainer.run_epoch(1)
            for r in range(rounds):
                for n, out in ((1, one), (cores, many))[::1 if r % 2 == 0 else -1]:
                    threads.apply(n)
                    out.append(trainer.run_epoch(r + 2)["samples_per_second"])
    finally:
        trainer.run_dir.unlock()
        threads.apply(cores)
    return {"model": name, "optimizer": optimizer, "cores": cores, "one": one, "many": many,
            "gain": statistics.median(m / o for o, m in zip(one, many))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--out", default=str(HERE / "RESULTS-threads.md"))
    parser.add_argument("--json", help="also write the rows (every epoch, the gain) to this file "
                                       "(make bench reads it)")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            for optimizer in args.optimizers.split(","):
                row = gain(name, optimizer, args.rounds, Path(tmp) / f"{name}-{optimizer}")
                print(f"{name}, {optimizer}: 1 thread {statistics.median(row['one']):,.0f}/s, "
                      f"{row['cores']} threads {statistics.median(row['many']):,.0f}/s, gain "
                      f"{row['gain']:.2f}x", flush=True)
                rows.append(row)
    cores = rows[0]["cores"] if rows else threads.available_cores()
    lines = ["# What more cores give netbuild", "",
             f"Written by `make bench-threads` ({time.strftime('%Y-%m-%d %H:%M')}). One process per "
             f"model and optimizer; {args.rounds} rounds of one epoch on 1 thread and one on "
             f"{cores} (each first in every other round) after a warm-up epoch at each; the gain "
             "is the median of the rounds' paired ratios. OpenBLAS kernels: "
             f"{backend.blas_core()}.", "",
             f"| model | optimizer | 1 thread samples/s | {cores} threads samples/s | gain |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {MODELS[r['model']].title} | {r['optimizer']} | "
                     f"{statistics.median(r['one']):,.0f} | {statistics.median(r['many']):,.0f} | "
                     f"{r['gain']:.2f}x |")
    lines += ["", "Every epoch (samples/s, 1 thread; all cores):", ""]
    for r in rows:
        lines.append(f"- {r['model']}, {r['optimizer']}: {', '.join(f'{v:,.0f}' for v in r['one'])}; "
                     f"{', '.join(f'{v:,.0f}' for v in r['many'])}")
    Path(args.out).write_text("\n".join(lines) + "\n")
    if args.json:
        import json

        Path(args.json).write_text(json.dumps(rows))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
