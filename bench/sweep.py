"""Wall time of an 8-point sweep of configs/digits-mlp.yaml on 1 and 2 local workers.

    python bench/sweep.py [--epochs N] [--repeat R]     (or: make bench-sweep)

Each measurement is one `netbuild sweep` command from start to exit: validating the points,
starting and stopping the LocalCluster, each worker importing netbuild and compiling its points'
functions, training, and writing every run and the summary. A first, unmeasured sweep fills
PyTensor's compile cache. The best of ``--repeat`` runs is reported, with the sum of the points'
training seconds (the epochs alone) for comparison. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "configs" / "digits-mlp.yaml"
GRID = ["--grid", "train.optimizer.learning_rate=0.0003,0.001,0.003,0.01",
        "--grid", "model.layers[0].units=64,128"]


def sweep(workers: int, epochs: int, folder: Path) -> tuple[float, float]:
    """Wall seconds of one sweep, and the sum of its points' training seconds."""
    command = [sys.executable, "-m", "netbuild", "sweep", str(SPEC), *GRID, "--set", f"train.epochs={epochs}",
               "--workers", str(workers), "--sweep-dir", str(folder), "--quiet"]
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True)
    wall = time.perf_counter() - start
    with open(folder / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and all(r["status"] == "done" for r in rows), rows
    return wall, sum(float(r["train_seconds"]) for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        sweep(2, 1, Path(tmp) / "warm-up")
        results = {}
        for workers in (1, 2):
            runs = [sweep(workers, args.epochs, Path(tmp) / f"w{workers}-{i}") for i in range(args.repeat)]
            results[workers] = min(runs)
    print(f"8 points of {SPEC.relative_to(ROOT)}, {args.epochs} epochs each; {os.cpu_count()} cores, "
          f"{platform.processor() or platform.machine()}, Python {platform.python_version()}; best of "
          f"{args.repeat}; load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after\n")
    print("| workers | wall seconds | training seconds (sum over points) | speed-up |")
    print("|---|---|---|---|")
    for workers, (wall, training) in results.items():
        print(f"| {workers} | {wall:.1f} | {training:.1f} | {results[1][0] / wall:.2f}x |")


if __name__ == "__main__":
    main()
