"""A search against the grid it replaces: `netbuild tune` (TPE, Hyperband pruning) against the
full `netbuild sweep` grid over the same four ranges of configs/digits-mlp.yaml.

    python bench/tune.py [--trials N] [--workers N] [--out FILE]     (or: make bench-tune)

Both run in one invocation of this script, the grid first, then the search, each on a local
cluster of ``--workers`` processes (modules the grid compiled may serve the search from
PyTensor's cache: its wall time is the less certain figure). Reported:
the best validation accuracy each reached (the best epoch of its best point), the epochs each
trained in all, the points and the wall time, and the bar of issue 19 (tune's best at least the
grid's, with at most half its epochs). Writes ``--out`` (default bench/RESULTS-tune.md).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "configs" / "digits-mlp.yaml"
MONITOR = "val_accuracy"

#: The four ranges, and the 48 grid values over them (4 x 3 x 2 x 2).
SPACE = {
    "train.optimizer.learning_rate": {"log_uniform": [3.0e-4, 1.0e-2]},
    "model.layers[0].units": {"log_int": [64, 256]},
    "model.layers[1].rate": {"uniform": [0.0, 0.5]},
    "train.optimizer.type": {"choice": ["adam", "sgd"]},
}
GRID = {
    "train.optimizer.learning_rate": [0.0003, 0.001, 0.003, 0.01],
    "model.layers[0].units": [64, 128, 256],
    "model.layers[1].rate": [0.0, 0.5],
    "train.optimizer.type": ["adam", "sgd"],
}


def write_spec(folder: Path) -> Path:
    spec = yaml.safe_load(SPEC.read_text())
    spec["data"]["train"] = str(SPEC.parent / spec["data"]["train"])
    spec["data"].pop("test", None)
    spec["sweep"] = {"grid": GRID, "monitor": MONITOR}
    spec["tune"] = {"space": SPACE, "monitor": MONITOR, "sampler": "tpe", "pruner": "hyperband"}
    path = folder / "digits-mlp-search.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def run(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "netbuild", *command, "--quiet"], cwd=ROOT, check=True)
    return time.perf_counter() - start


def outcome(folder: Path) -> dict:
    with open(folder / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    best = max(float(r[f"best_{MONITOR}"]) for r in rows if r[f"best_{MONITOR}"])
    # The validation accuracy of a small split ties at its ceiling: the lowest validation loss
    # of any epoch of any point tells the two searches apart more finely.
    unit = list(rows[0])[1]  # the folder column: "point" of a sweep, "trial" of a search
    losses = [json.loads(line)["val_loss"] for r in rows
              for line in (folder / r[unit] / "metrics.jsonl").read_text().splitlines()]
    return {"points": len(rows), "best": best, "epochs": sum(int(r["epochs"]) for r in rows),
            "pruned": sum(r["status"] == "pruned" for r in rows), "val_loss": min(losses),
            "best_point": next(r for r in rows if r["rank"] == "1")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "RESULTS-tune.md")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        spec = write_spec(Path(tmp))
        grid_wall = run(["sweep", str(spec), "--workers", str(args.workers), "--sweep-dir", f"{tmp}/grid"])
        grid = outcome(Path(tmp) / "grid")
        tune_wall = run(["tune", str(spec), "--trials", str(args.trials), "--workers", str(args.workers),
                         "--tune-dir", f"{tmp}/tune"])
        tune = outcome(Path(tmp) / "tune")
        epochs = yaml.safe_load(SPEC.read_text())["train"]["epochs"]
    met = tune["best"] >= grid["best"] and tune["epochs"] <= grid["epochs"] / 2
    names = [p.split(".")[-1] for p in GRID]
    lines = [
        "# `netbuild tune` against the grid it replaces",
        "",
        f"Written by `make bench-tune` ({datetime.now():%Y-%m-%d %H:%M}): `{SPEC.relative_to(ROOT)}` "
        f"({epochs} epochs, validation_split 0.1), the same four parameters searched two ways in one run, "
        f"each on a local cluster of {args.workers} workers: `netbuild sweep` over the full grid "
        f"({' x '.join(str(len(v)) for v in GRID.values())} = {grid['points']} points) and `netbuild tune "
        f"--trials {args.trials}` (TPE sampler, Hyperband pruning) over the ranges the grid spans. Monitored: "
        f"the best epoch's `{MONITOR}`.",
        "",
        f"Machine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, Python "
        f"{platform.python_version()}; load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after.",
        "",
        "| search | points | pruned | epochs trained | best " + MONITOR + " | lowest val_loss | wall seconds |",
        "|---|---|---|---|---|---|---|",
        f"| grid (`sweep`) | {grid['points']} | - | {grid['epochs']} | {grid['best']:.4f} | "
        f"{grid['val_loss']:.4f} | {grid_wall:.0f} |",
        f"| `tune`, TPE + Hyperband | {tune['points']} | {tune['pruned']} | {tune['epochs']} | "
        f"{tune['best']:.4f} | {tune['val_loss']:.4f} | {tune_wall:.0f} |",
        "",
        "Lowest val_loss: of any epoch of any point (not what either search optimizes; a finer view than "
        "an accuracy that can tie at its ceiling on a validation split of 144 examples). Wall "
        "seconds: each command from start to exit; with epochs of a few milliseconds they are mostly "
        "each trial's compile and the cluster's start, not training.",
        "",
        "Space: " + ", ".join(f"`{k}`: `{json.dumps(v)}`" for k, v in SPACE.items()) + ".",
        "",
        "Grid: " + ", ".join(f"`{k}`: {v}" for k, v in GRID.items()) + ".",
        "",
        "Best points: grid " + ", ".join(f"{n}={grid['best_point'][k]}" for n, k in zip(names, GRID))
        + "; tune " + ", ".join(f"{n}={tune['best_point'][k]}" for n, k in zip(names, GRID)) + ".",
        "",
        f"Bar (issue 19): tune's best at least the grid's ({tune['best']:.4f} vs {grid['best']:.4f}) with at "
        f"most half its epochs ({tune['epochs']} vs {grid['epochs']} / 2 = {grid['epochs'] / 2:.0f}): "
        f"{'met' if met else 'NOT met'} in this run.",
    ]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
