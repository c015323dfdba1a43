"""``netbuild compare``: runs side by side.

For each run directory: the epochs trained, and for each recorded metric (``loss``, ``val_loss``,
each metric and its ``val_`` twin) its last value, its best (in the metric's direction) and the
epoch of the best. Across the runs: the spec keys whose values differ, as ``--set`` paths, with
each run's value. Rendered as text, a Markdown table for a pull-request comment, or JSON; and one
picture of every metric's curves, one line per run.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from . import metrics as metrics_mod
from .errors import RunError, printable
from .runs import METRICS_FILE, SPEC_FILE, changed_keys

#: Record keys that are not metrics.
NOT_METRICS = ("epoch", "seconds", "samples_per_second", "learning_rate")


@dataclass
class Run:
    """A run directory's resolved spec and its epochs' records."""

    path: str
    spec: dict
    records: list[dict]


def load_run(path: str | os.PathLike) -> Run:
    """The spec.yaml and metrics.jsonl of a run directory; :class:`RunError` when it is not one."""
    folder = Path(path)
    try:
        if not folder.is_dir():
            raise RunError(f"{path}: not a folder; expected a run directory written by `netbuild train`")
        spec_file, metrics_file = folder / SPEC_FILE, folder / METRICS_FILE
        if not spec_file.is_file() or not metrics_file.is_file():
            missing = SPEC_FILE if not spec_file.is_file() else METRICS_FILE
            raise RunError(f"{path}: not a run directory (no {missing}); expected a folder written by "
                           "`netbuild train`")
        spec = yaml.safe_load(spec_file.read_text(encoding="utf-8"))
        records = [json.loads(line) for line in metrics_file.read_text(encoding="utf-8").splitlines()
                   if line.strip()]
    except OSError as exc:
        raise RunError(printable(f"{path}: cannot read: {exc.strerror or exc}")) from None
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunError(printable(f"{path}: its {SPEC_FILE} or {METRICS_FILE} is not readable "
                                 f"({type(exc).__name__}); expected files written by `netbuild "
                                 "train`")) from None
    if not isinstance(spec, dict) or not all(isinstance(r, dict) and "epoch" in r for r in records):
        raise RunError(f"{path}: its {SPEC_FILE} or {METRICS_FILE} is not what `netbuild train` "
                       "writes")
    return Run(str(path), spec, records)


def metric_names(runs: list[Run]) -> list[str]:
    """Every recorded metric of any run, in the order the runs first record them."""
    names: dict[str, None] = {}
    for run in runs:
        for record in run.records:
            for key in record:
                if key not in NOT_METRICS:
                    names.setdefault(key)
    return list(names)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def summarize(run: Run, names: list[str]) -> dict:
    """``{metric: {last, best, best_epoch}}`` (None where the run never recorded it)."""
    out = {}
    for name in names:
        points = [(r["epoch"], r[name]) for r in run.records if _finite(r.get(name))]
        if not points:
            out[name] = {"last": None, "best": None, "best_epoch": None}
            continue
        pick = min if metrics_mod.mode_of(name) == "min" else max
        epoch, best = pick(points, key=lambda p: p[1])
        out[name] = {"last": points[-1][1], "best": best, "best_epoch": epoch}
    return out


def _value_at(data: Any, path: str) -> Any:
    """The value at a ``changed_keys`` path (``a.b[2].c``), or None where it does not exist."""
    node = data
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", path):
        try:
            node = node[int(part[1:-1])] if part.startswith("[") else node[part]
        except (KeyError, IndexError, TypeError):
            return None
    return node


def differing(runs: list[Run]) -> dict[str, list]:
    """Each spec key (a ``--set`` path) whose value differs between the runs, with each run's."""
    keys: dict[str, None] = {}
    first = runs[0].spec
    for run in runs[1:]:
        for key in changed_keys(first, run.spec):
            keys.setdefault(key)
    return {key: [_value_at(run.spec, key) for run in runs] for key in keys}


@dataclass
class Comparison:
    """Runs side by side: each run's summary (:func:`summarize`), the metrics, the differing
    spec keys with each run's value."""

    runs: list[Run]
    metrics: list[str]
    summaries: list[dict]
    differing: dict[str, list]

    def as_dict(self) -> dict:
        return {"runs": [{"run": run.path, "name": run.spec.get("name"), "epochs": len(run.records),
                          "metrics": summary} for run, summary in zip(self.runs, self.summaries)],
                "metrics": self.metrics, "differing": self.differing}


def compare(paths: list[str | os.PathLike]) -> Comparison:
    """The comparison of the run directories ``paths`` (see the module's docstring)."""
    runs = [load_run(p) for p in paths]
    names = metric_names(runs)
    return Comparison(runs, names, [summarize(run, names) for run in runs], differing(runs))


# -- rendering ------------------------------------------------------------------------------------
def _number(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e5 else f"{value:.4g}"
    return str(value)


def _spec_value(value) -> str:
    return "-" if value is None else json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def tables(result: Comparison) -> tuple[list[str], list[list[str]], list[str], list[list[str]]]:
    """``(headers, rows)`` of the metrics table and of the differing-keys table."""
    headers = ["run", "epochs"] + [f"{name}: last / best @epoch" for name in result.metrics]
    rows = []
    for run, summary in zip(result.runs, result.summaries):
        row = [run.path, str(len(run.records))]
        for name in result.metrics:
            m = summary[name]
            row.append("-" if m["best"] is None else
                       f"{_number(m['last'])} / {_number(m['best'])} @{m['best_epoch']}")
        rows.append(row)
    key_headers = ["spec key"] + [run.path for run in result.runs]
    key_rows = [[key] + [_spec_value(v) for v in values] for key, values in result.differing.items()]
    return headers, rows, key_headers, key_rows


def markdown(result: Comparison) -> str:
    """GitHub-flavoured Markdown, ready for a pull-request comment."""
    headers, rows, key_headers, key_rows = tables(result)

    def md(head: list[str], body: list[list[str]], align: str) -> list[str]:
        cell = lambda t: str(t).replace("|", "\\|")  # noqa: E731
        sep = ["---:" if a == "r" else "---" for a in align]
        return ["| " + " | ".join(cell(h) for h in head) + " |", "| " + " | ".join(sep) + " |"] + \
            ["| " + " | ".join(cell(c) for c in row) + " |" for row in body]

    lines = [f"**netbuild compare**: {len(rows)} runs", ""]
    lines += md(headers, rows, "l" + "r" * (len(headers) - 1))
    lines += [""]
    if key_rows:
        lines += ["Spec keys that differ:", ""] + md(key_headers, key_rows, "l" * len(key_headers))
    else:
        lines += ["The runs' specs are the same."]
    return "\n".join(lines)


def curves_png(result: Comparison) -> bytes:
    """:func:`curves_figure` as a PNG."""
    import io

    buf = io.BytesIO()
    curves_figure(result).savefig(buf, format="png")
    return buf.getvalue()


def curves_figure(result: Comparison):
    """Every metric in one matplotlib figure (a panel each), one line per run, headless."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    names = result.metrics or ["loss"]
    cols = min(len(names), 3)
    rows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(4.8 * cols, 3.4 * rows), dpi=100)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.1, top=0.92, wspace=0.3, hspace=0.45)
    for i, name in enumerate(names, start=1):
        ax = fig.add_subplot(rows, cols, i)
        for run in result.runs:
            points = [(r["epoch"], r[name]) for r in run.records if _finite(r.get(name))]
            if points:
                ax.plot(*zip(*points), marker=".", label=run.path)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return fig
