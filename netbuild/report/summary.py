"""The summary of a sweep or a search: its points (a search's trials) sorted by the monitored
metric, as CSV, Markdown, a printed table and pictures. Returns strings and PNG bytes only."""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from typing import Any

#: Statuses whose runs trained all their epochs (or stopped early by their own rule).
COMPLETE = ("done", "skipped")


@dataclass
class SummaryOf:
    """What a summary is of: the command (``sweep``, ``tune``) and what it calls a point
    (``point``, ``trial``), the spec's name and file, the monitored metric and its direction
    (``min``, ``max``), and the varied paths with their short names. ``values``: a sweep's values
    of each path, in grid order (the pictures' positions); None for a search's ranges."""

    command: str
    unit: str
    name: str
    spec_file: str
    monitor: str
    mode: str
    paths: list[str]
    names: dict[str, str]
    values: dict[str, list] | None = None


def value_text(value: Any) -> str:
    """A value as a person writes it: ``0.001``, ``true``, ``adam``, ``[3, 3]``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        return f"{value:g}" if math.isfinite(value) else str(value)
    if isinstance(value, (int, str)):
        return str(value)
    return json.dumps(value, sort_keys=True, separators=(", ", ": "), default=str)


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def rows(of: SummaryOf, records: list[dict]) -> list[dict]:
    """The records sorted for the summary: complete points by their best monitored value (by
    the monitor's direction, then the last value, then id), then pruned ones the same way, those
    without a value after them, then failed, cancelled and pending points by id."""
    sign = -1.0 if of.mode == "max" else 1.0

    def key(r: dict):
        group = 0 if r["status"] in COMPLETE else 2 if r["status"] == "pruned" else 4
        if group < 4 and r["best"] is None:
            group += 1
        if group % 2 or group == 4:
            return (group, 0.0, 0.0, r["id"])
        return (group, sign * r["best"], sign * (r["final"] if r["final"] is not None else 0.0), r["id"])

    return [dict(r, rank=i) for i, r in enumerate(sorted(records, key=key), start=1)]


def _number(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def headers(of: SummaryOf) -> list[str]:
    m = of.monitor
    return (["rank", of.unit] + of.paths
            + ["status", "epochs", f"final_{m}", f"best_{m}", "best_epoch", "train_seconds", "wall_seconds",
               "message"])


def _param(row: dict, path: str) -> str:
    return value_text(row["overrides"][path]) if path in row["overrides"] else ""


def _cells(of: SummaryOf, row: dict) -> list[str]:
    return ([str(row["rank"]), row["id"]] + [_param(row, p) for p in of.paths]
            + [row["status"], str(row["epochs"]), _number(row["final"]), _number(row["best"]),
               _number(row["best_epoch"]), _number(row["seconds"]), _number(row.get("wall_seconds")),
               row["message"]])


def summary_csv(of: SummaryOf, rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(headers(of))
    writer.writerows(_cells(of, r) for r in rows)
    return buf.getvalue()


def summary_md(of: SummaryOf, rows: list[dict]) -> str:
    better = "higher" if of.mode == "max" else "lower"
    head = headers(of)
    title = "Sweep" if of.command == "sweep" else "Search"
    pruned = ", then pruned ones" if of.command == "tune" else ""
    lines = [f"# {title} of {of.name}", "",
             (f"{len(rows)} {of.unit}s of `{of.spec_file}`, sorted by the best `{of.monitor}` "
              f"({better} is better){pruned}; failed {of.unit}s last. Each {of.unit}'s run is in "
              f"`<{of.unit}>/`."), "",
             "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for row in rows:
        cells = [c.replace("|", "\\|") for c in _cells(of, row)]
        cells[1] = f"[{cells[1]}]({row['id']}/)"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def table(of: SummaryOf, rows: list[dict]) -> tuple[list[str], list[list[str]], str]:
    """Headers, cells and alignment of the printed table (short path names; messages apart)."""
    m = of.monitor
    fixed = ["status", "epochs", m, f"best {m}", "train s", "wall s"]
    names = {k: (k if v in fixed else v) for k, v in of.names.items()}
    head = ["#", of.unit] + [names[p] for p in of.paths] + fixed
    body = [[str(r["rank"]), r["id"]] + [_param(r, p) for p in of.paths]
            + [r["status"], str(r["epochs"]), _four(r["final"]), _four(r["best"]), f"{r['seconds']:.2f}",
               f"{r['wall_seconds']:.1f}" if r.get("wall_seconds") is not None else ""]
            for r in rows]
    return head, body, "rl" + "l" * len(of.paths) + "lrrrrr"


def _four(value) -> str:
    if value is None:
        return ""
    return f"{value:.4f}" if abs(value) < 1e5 else f"{value:.4g}"


def _figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def _png(fig) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def params_png(of: SummaryOf, rows: list[dict]) -> bytes:
    """The best monitored value of every point that has one against each varied value (pruned
    points apart, in grey); a line joins the best point at each value of a sweep (headless)."""
    shown = [r for r in rows if r["status"] in COMPLETE + ("pruned",) and r["best"] is not None]
    fig = _figure(4.5 * len(of.paths), 3.4)
    pick = max if of.mode == "max" else min
    for i, path in enumerate(of.paths, start=1):
        ax = fig.add_subplot(1, len(of.paths), i)
        values = (of.values or {}).get(path) or _seen(shown, path)
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        xs = list(values) if numeric else list(range(len(values)))
        position = {canonical(v): x for v, x in zip(values, xs)}
        for group, color, label in ((COMPLETE, "C0", f"complete {of.unit}s"), (("pruned",), "0.6", "pruned")):
            points = [r for r in shown if r["status"] in group and path in r["overrides"]]
            if points:
                ax.scatter([position[canonical(r["overrides"][path])] for r in points],
                           [r["best"] for r in points], alpha=0.7, color=color, label=label)
        done = [r for r in shown if r["status"] in COMPLETE and path in r["overrides"]]
        px = [position[canonical(r["overrides"][path])] for r in done]
        if of.values is not None:
            best = sorted((x, pick(r["best"] for r, p in zip(done, px) if p == x)) for x in set(px))
            if best:
                ax.plot([b[0] for b in best], [b[1] for b in best], color="C1", label="best at each value")
        if numeric and xs and min(xs) > 0 and max(xs) / min(xs) >= 10:
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(xs, [value_text(v)[:16] for v in values], rotation=30, ha="right")
        if not shown:
            ax.text(0.5, 0.5, f"no complete {of.unit}s", transform=ax.transAxes, ha="center")
        ax.set_title(f"best {of.monitor} by {of.names[path]}")
        ax.set_xlabel(path)
        ax.set_ylabel(of.monitor)
        ax.grid(alpha=0.3)
        if shown:
            ax.legend()
    return _png(fig)


def _seen(rows: list[dict], path: str) -> list:
    """The distinct values of ``path`` among ``rows``, sorted when they are numbers."""
    out = {canonical(r["overrides"][path]): r["overrides"][path] for r in rows if path in r["overrides"]}
    values = list(out.values())
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return sorted(values)
    return sorted(values, key=canonical)


def history_png(of: SummaryOf, records: list[dict], order: list[str]) -> bytes:
    """A search's history: each trial's best monitored value by trial number (``order``: the
    trials' ids in the order they started), pruned trials in grey, and the best so far."""
    fig = _figure(6.5, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    by_id = {r["id"]: r for r in records}
    pick = max if of.mode == "max" else min
    xs, best, so_far = [], [], None
    for n, trial in enumerate(order):
        r = by_id.get(trial)
        if r is None or r["best"] is None or r["status"] not in COMPLETE + ("pruned",):
            continue
        color = "0.6" if r["status"] == "pruned" else "C0"
        ax.scatter([n], [r["best"]], color=color, alpha=0.8, s=18)
        if r["status"] in COMPLETE:
            so_far = r["best"] if so_far is None else pick(so_far, r["best"])
        if so_far is not None:
            xs.append(n)
            best.append(so_far)
    if xs:
        ax.step(xs, best, where="post", color="C1", label="best complete so far")
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no complete trials", transform=ax.transAxes, ha="center")
    ax.set_title(f"{of.name}: best {of.monitor} of each trial (grey: pruned)")
    ax.set_xlabel("trial")
    ax.set_ylabel(of.monitor)
    ax.grid(alpha=0.3)
    return _png(fig)
