"""Metrics, keyed by their YAML names: plain numpy over a whole epoch's outputs.

Each takes the targets as given in the data (class ids, one-hot rows or values) and the
network's outputs, and returns one float. A spec names a metric, or gives a mapping with its
options (``{type: top_k_accuracy, k: 3}``); the result is keyed by the name either way.

Classes are the argmax of several outputs, or a 0.5 threshold of a single (sigmoid) unit, which
has the two classes {0, 1}. With ``tp``, ``fp``, ``fn`` counted per class from the confusion
matrix, ``precision = tp / (tp + fp)``, ``recall = tp / (tp + fn)``, ``f1 = 2 tp / (2 tp + fp +
fn)``, each 0 where its denominator is, and macro-averaged: the plain mean over the classes that
occur in the targets or the predictions (always both classes of a single unit); scikit-learn's
``average="macro"`` with ``zero_division=0``.

``top_k_accuracy``: the fraction of examples whose true class has fewer than ``k`` classes
scored strictly higher (ties at the boundary count as hits, as Keras's ``in_top_k``); for a
single unit it is ``accuracy`` when ``k == 1``, else 1.

``r2 = 1 - sum (y - p)^2 / sum (y - mean y)^2`` per output column, averaged uniformly over the
columns; a constant column scores 1 when predicted exactly, else 0 (scikit-learn's ``r2_score``).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from .registry import lookup, name_of


def class_ids(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Predicted and true classes: argmax of several outputs, or a 0.5 threshold of one."""
    if y_pred.shape[-1] == 1:
        pred = (y_pred[..., 0] > 0.5).astype(np.int64)
        true = np.asarray(y_true).reshape(pred.shape).round().astype(np.int64)
        return true, pred
    pred = np.argmax(y_pred, axis=-1)
    true = np.argmax(y_true, axis=-1) if y_true.ndim == y_pred.ndim else y_true
    return np.asarray(true).astype(np.int64), pred


def n_classes(y_pred: np.ndarray) -> int:
    """The classes an output scores: its units, or 2 for a single unit."""
    units = int(y_pred.shape[-1])
    return 2 if units == 1 else units


def _targets(y_true, y_pred: np.ndarray) -> np.ndarray:
    """Value targets shaped like the outputs."""
    return np.asarray(y_true).reshape(y_pred.shape)


def _divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den``, 0 where ``den`` is 0."""
    return np.where(den > 0, num / np.where(den > 0, den, 1), 0.0)


def confusion_matrix(y_true, y_pred) -> np.ndarray:
    """Counts ``(n_classes, n_classes)``: row = true class, column = predicted class."""
    true, pred = (a.ravel() for a in class_ids(y_true, y_pred))
    n = n_classes(y_pred)
    if true.size and (true.min() < 0 or true.max() >= n):
        raise ValueError(f"class ids must be in 0..{n - 1} for an output of {y_pred.shape[-1]} "
                         f"unit(s); received {true.min()}..{true.max()}")
    return np.bincount(true * n + pred, minlength=n * n).reshape(n, n)


def _macro(y_true, y_pred, score: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]) -> float:
    """``score(tp, fp, fn)`` per class, averaged over the classes that occur."""
    cm = confusion_matrix(y_true, y_pred)
    tp = np.diag(cm)
    fp, fn = cm.sum(axis=0) - tp, cm.sum(axis=1) - tp
    present = np.ones(len(cm), bool) if y_pred.shape[-1] == 1 else (cm.sum(axis=0) + cm.sum(axis=1)) > 0
    return float(np.mean(score(tp, fp, fn)[present]))


def accuracy(y_true, y_pred) -> float:
    true, pred = class_ids(y_true, y_pred)
    return float(np.mean(true == pred))


def top_k_accuracy(y_true, y_pred, k: int = 5) -> float:
    """Whether the true class is among the ``k`` highest scores, averaged over the examples."""
    units = y_pred.shape[-1]
    if units == 1:
        return accuracy(y_true, y_pred) if k < 2 else 1.0
    true, _ = class_ids(y_true, y_pred)
    scores, true = y_pred.reshape(-1, units), true.ravel()
    true_scores = scores[np.arange(len(true)), true]
    higher = np.sum(scores > true_scores[:, None], axis=1)
    return float(np.mean(higher < k))


def precision(y_true, y_pred) -> float:
    return _macro(y_true, y_pred, lambda tp, fp, fn: _divide(tp, tp + fp))


def recall(y_true, y_pred) -> float:
    return _macro(y_true, y_pred, lambda tp, fp, fn: _divide(tp, tp + fn))


def f1(y_true, y_pred) -> float:
    return _macro(y_true, y_pred, lambda tp, fp, fn: _divide(2 * tp, 2 * tp + fp + fn))


def mse(y_true, y_pred) -> float:
    return float(np.mean((y_pred - _targets(y_true, y_pred)) ** 2))


def mae(y_true, y_pred) -> float:
    return float(np.mean(np.abs(y_pred - _targets(y_true, y_pred))))


def r2(y_true, y_pred) -> float:
    pred = np.asarray(y_pred, dtype=np.float64).reshape(len(y_pred), -1)
    true = _targets(y_true, y_pred).astype(np.float64).reshape(pred.shape)
    residual = np.sum((true - pred) ** 2, axis=0)
    total = np.sum((true - true.mean(axis=0)) ** 2, axis=0)
    scores = np.where(total > 0, 1.0 - _divide(residual, total), np.where(residual > 0, 0.0, 1.0))
    return float(np.mean(scores))


REGISTRY: dict[str, Callable] = {
    "accuracy": accuracy,
    "top_k_accuracy": top_k_accuracy,
    "precision": precision,
    "recall": recall,
    "f1": f1,
    "mse": mse,
    "mae": mae,
    "r2": r2,
}

#: Metrics that score class predictions (they need a classification loss).
CLASSIFICATION = {"accuracy", "top_k_accuracy", "precision", "recall", "f1"}

#: Metrics where a larger value is better (used to infer min/max modes).
HIGHER_IS_BETTER = {"accuracy", "top_k_accuracy", "precision", "recall", "f1", "r2"}


def mode_of(key: str) -> str:
    """``max`` for a record key where higher is better, else ``min``: the key's metric is its
    longest ending that names one (``val_`` and an output's ``<name>_`` prefix aside)."""
    name = key[len("val_"):] if key.startswith("val_") else key
    base = max((m for m in [*REGISTRY, "loss"] if name == m or name.endswith("_" + m)), key=len,
               default=name)
    return "max" if base in HIGHER_IS_BETTER else "min"


metric_name = name_of


def get(entry: Any) -> Callable:
    """``fn(y_true, y_pred) -> float`` for a spec entry (a name or a mapping with options)."""
    fn, options = lookup(REGISTRY, entry, "metric")
    return (lambda y_true, y_pred: fn(y_true, y_pred, **options)) if options else fn


def real_steps(y_true, y_pred, mask):
    """Targets and outputs of the real steps of a masked sequence output (``mask`` (batch,
    timesteps), 1 for a real step), each step one row; unchanged without a mask."""
    if mask is None:
        return y_true, y_pred
    real = np.asarray(mask) > 0.5
    return np.asarray(y_true)[real], np.asarray(y_pred)[real]


def compute(entries, y_true, y_pred, mask=None) -> dict[str, float]:
    """``{name: value}`` for each metric entry (a name or a mapping with options); with a
    ``mask``, over the real steps of a sequence output only."""
    y_true, y_pred = real_steps(y_true, y_pred, mask)
    out: dict[str, float] = {}
    for entry in entries:
        name = metric_name(entry)
        if name in out:
            raise ValueError(f"metric '{name}' is listed twice; results are keyed by name")
        out[name] = get(entry)(y_true, y_pred)
    return out


def scores(heads: list, results, ys: list) -> dict[str, float]:
    """The record of a pass over data (``results``, a :class:`netbuild.data.Results`; ``ys``
    the targets, one array per output): ``loss`` (the weighted total), then for each output its
    loss (long form only) and its metrics, keyed as :class:`netbuild.signature.Output` names
    them (``<output>_<metric>``; the shorthand's without a prefix)."""
    out = {"loss": results.loss}
    for head, y in zip(heads, ys):
        if head.prefix:
            out[f"{head.prefix}loss"] = results.losses[head.name]
        for k, v in compute(head.metrics, y, results.outputs[head.name],
                            results.masks[head.name]).items():
            out[head.prefix + k] = v
    return out
