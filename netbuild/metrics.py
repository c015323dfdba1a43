"""Metrics, keyed by their YAML names: plain numpy over a whole epoch's outputs.

Each takes the targets as given in the data (class ids, one-hot rows or values) and the
network's outputs, and returns one float.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .errors import expected_one_of


def class_ids(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Predicted and true classes: argmax of several outputs, or a 0.5 threshold of one."""
    if y_pred.shape[-1] == 1:
        pred = (y_pred[..., 0] > 0.5).astype(np.int64)
        true = np.asarray(y_true).reshape(pred.shape).round().astype(np.int64)
        return true, pred
    pred = np.argmax(y_pred, axis=-1)
    true = np.argmax(y_true, axis=-1) if y_true.ndim == y_pred.ndim else y_true
    return np.asarray(true).astype(np.int64), pred


def accuracy(y_true, y_pred) -> float:
    true, pred = class_ids(y_true, y_pred)
    return float(np.mean(true == pred))


def mse(y_true, y_pred) -> float:
    return float(np.mean((y_pred - np.asarray(y_true).reshape(y_pred.shape)) ** 2))


def mae(y_true, y_pred) -> float:
    return float(np.mean(np.abs(y_pred - np.asarray(y_true).reshape(y_pred.shape))))


REGISTRY: dict[str, Callable] = {
    "accuracy": accuracy,
    "mse": mse,
    "mae": mae,
}

#: Metrics where a larger value is better (used to infer min/max modes).
HIGHER_IS_BETTER = {"accuracy"}


def get(name: str) -> Callable:
    if name not in REGISTRY:
        raise KeyError(f"unknown metric '{name}'; {expected_one_of(name, REGISTRY)}")
    return REGISTRY[name]


def compute(names, y_true, y_pred) -> dict[str, float]:
    """``{name: value}`` for each metric name."""
    return {name: get(name)(y_true, y_pred) for name in names}
