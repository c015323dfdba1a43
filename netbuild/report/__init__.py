"""Text for people: the layer table, per-epoch lines, metric tables. Returns strings only.

The CI formats sit beside: :mod:`.github` (workflow annotations), :mod:`.junit` (JUnit XML).
"""

from __future__ import annotations

from typing import Iterable, Sequence


def table(headers: Sequence[str], rows: Iterable[Sequence], align: str | None = None) -> str:
    """A plain text table; ``align`` holds ``l`` or ``r`` per column (default: all left)."""
    rows = [[str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    align = align or "l" * len(headers)

    def line(cells):
        return "  ".join(c.rjust(w) if a == "r" else c.ljust(w)
                         for c, w, a in zip(cells, widths, align)).rstrip()

    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    return "\n".join(out)


def shape(dims) -> str:
    return str(tuple(dims))


def layer_table(rows: list[dict], total: int) -> str:
    """One row per layer: name, type, inputs, output shape, parameters, YAML line."""
    body = [[r["name"], r["type"], ", ".join(r["inputs"]), shape(r["output_shape"]),
             f"{r['params']:,}", r["line"] or ""] for r in rows]
    text = table(["layer", "type", "inputs", "output shape", "params", "line"], body, "lllrrr")
    return f"{text}\ntotal parameters: {total:,}"


def io_table(inputs: list[dict], outputs: list[dict]) -> str:
    """The model's inputs (shape, npz key) and outputs (layer, shape, npz key, loss and its
    weight, metrics), one row each."""
    body = [["input", i["name"], "", shape(i["shape"]), i["key"], "", i["line"] or ""] for i in inputs]
    body += [["output", o["name"], o["layer"], shape(o["shape"]), o["key"],
              f"{o['loss']} x {o['loss_weight']:g}" + (f"; {', '.join(o['metrics'])}" if o["metrics"] else ""),
              o["line"] or ""] for o in outputs]
    return table(["", "name", "layer", "shape", "key", "loss; metrics", "line"], body, "llllllr")


def number(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e5 else f"{value:.4g}"
    return str(value)


def epoch_line(record: dict, epochs: int) -> str:
    """``epoch 3/30  loss 0.1234  accuracy 0.9712  val_loss ...  1.2 s  12,345 samples/s``."""
    width = len(str(epochs))
    parts = [f"epoch {record['epoch']:>{width}}/{epochs}"]
    for k, v in record.items():
        if k in ("epoch", "seconds", "samples_per_second"):
            continue
        parts.append(f"{k} {number(v)}")
    parts.append(f"{record['seconds']:.2f} s")
    if record.get("samples_per_second"):
        parts.append(f"{record['samples_per_second']:,.0f} samples/s")
    return "  ".join(parts)


def metrics_table(metrics: dict) -> str:
    return table(["metric", "value"], [[k, number(v)] for k, v in metrics.items()], "lr")


def baseline_table(rows: list[dict]) -> str:
    """Each metric beside the baseline's: the change, what is allowed, and whether it passed."""
    body = [[r["metric"], number(r["value"]), number(r["baseline"]), f"{r['change']:+.4f}",
             r["better"], f"{r['allowed']:g}", "ok" if r["passed"] else "FAILED"] for r in rows]
    return table(["metric", "model", "baseline", "change", "better", "max drop", "gate"], body,
                 "lrrrlrl")


def confusion_table(matrix: list[list[int]]) -> str:
    """Rows: true class; columns: predicted class."""
    n = len(matrix)
    headers = ["true \\ pred"] + [str(j) for j in range(n)]
    return table(headers, [[str(i)] + [str(v) for v in row] for i, row in enumerate(matrix)], "l" + "r" * n)


def curves_png(records: list[dict]) -> bytes:
    """A PNG of the loss and every metric per epoch, training and validation (headless)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    skip = {"epoch", "seconds", "samples_per_second", "learning_rate"}
    names = [k for k in records[0] if k not in skip and not k.startswith("val_")] if records else ["loss"]
    # Fixed margins: tight_layout measured every label first, the slowest part of the drawing.
    fig = Figure(figsize=(4.5 * len(names), 3.4), dpi=100)
    fig.subplots_adjust(left=0.6 / (4.5 * len(names)), right=1 - 0.15 / (4.5 * len(names)),
                        bottom=0.15, top=0.9, wspace=0.3)
    epochs = [r["epoch"] for r in records]
    for i, name in enumerate(names, start=1):
        ax = fig.add_subplot(1, len(names), i)
        ax.plot(epochs, [r.get(name) for r in records], marker=".", label="training")
        if any(f"val_{name}" in r for r in records):
            ax.plot(epochs, [r.get(f"val_{name}") for r in records], marker=".", label="validation")
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def progress_line(epoch: int, epochs: int, batch: int, batches: int, loss: float,
                  samples_per_second: float, width: int = 30) -> str:
    """``epoch 3/30 [=========>          ] 12/45  loss 0.1234  5,120 samples/s`` for a terminal."""
    done = int(width * batch / batches)
    bar = "=" * max(done - 1, 0) + (">" if done < width else "=") + " " * (width - done)
    w = len(str(epochs))
    return (f"epoch {epoch:>{w}}/{epochs} [{bar}] {batch}/{batches}  loss {loss:.4f}  "
            f"{samples_per_second:,.0f} samples/s")
