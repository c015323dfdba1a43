"""Loss functions, keyed by their YAML names.

Each returns the loss of every example (a vector over the batch). Cross-entropies work from the
output layer's pre-activation when it has one (softmax -> logsumexp of the logits, sigmoid ->
softplus form), never as the log of a probability.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pytensor.tensor as pt

from .ops.softmax import softmax_cross_entropy
from .registry import lookup, name_of

_EPS = 1e-7


@dataclass
class Output:
    """The network's output, its pre-activation (or None), the activation's name, and the mask
    ``(batch, timesteps)`` of a masked sequence output (or None)."""

    value: Any
    logits: Any = None
    activation: str = "linear"
    mask: Any = None


def _per_example(values, mask=None):
    """Mean over every axis but the batch axis; with a ``mask`` (batch, timesteps), over the real
    steps only (a padded step counts for nothing; an example without one for 0)."""
    if values.ndim <= 1:
        return values
    axes = tuple(range(1, values.ndim))
    if mask is None:
        return values.mean(axis=axes)
    m = mask.dimshuffle(0, 1, *(["x"] * (values.ndim - 2))) * pt.ones_like(values)
    return (values * m).sum(axis=axes) / pt.maximum(m.sum(axis=axes), 1.0)


def one_hot(ids, n_classes: int, dtype: str):
    """Integer ids ``(batch, ...)`` -> one-hot rows ``(batch, ..., n_classes)``, as a mask."""
    return pt.eq(ids[..., None], pt.arange(n_classes)).astype(dtype)


def categorical_crossentropy(target, out: Output, label_smoothing: float = 0.0, **_):
    """``-sum(t log p)`` over the last axis; ``target`` is class ids or one-hot rows. After a
    softmax, one C op computes it from the logits (:mod:`netbuild.ops.softmax`)."""
    value = out.value
    ids = target.ndim == value.ndim - 1
    if out.activation == "softmax":
        if ids and not target.dtype.startswith(("int", "uint")):
            target = pt.cast(target, "int64")
        return _per_example(softmax_cross_entropy(out.logits, target, label_smoothing), out.mask)
    k = value.shape[-1]
    t = one_hot(target, k, value.dtype) if ids else target
    if label_smoothing:
        t = t * (1.0 - label_smoothing) + label_smoothing / k.astype(value.dtype)
    if out.activation == "log_softmax":
        log_p = value
    else:
        log_p = pt.log(pt.clip(value, _EPS, 1.0))
    return _per_example(-(t * log_p).sum(axis=-1), out.mask)


def binary_crossentropy(target, out: Output, label_smoothing: float = 0.0, **_):
    """``-(t log p + (1 - t) log(1 - p))``, averaged over the output's units."""
    t = target
    if label_smoothing:
        t = t * (1.0 - label_smoothing) + 0.5 * label_smoothing
    if out.activation == "sigmoid":
        z = out.logits
        values = pt.softplus(z) - t * z
    else:
        p = pt.clip(out.value, _EPS, 1.0 - _EPS)
        values = -(t * pt.log(p) + (1.0 - t) * pt.log1p(-p))
    return _per_example(values, out.mask)


def mse(target, out: Output, **_):
    return _per_example(pt.sqr(out.value - target), out.mask)


def mae(target, out: Output, **_):
    return _per_example(pt.abs(out.value - target), out.mask)


def huber(target, out: Output, delta: float = 1.0, **_):
    err = pt.abs(out.value - target)
    quad = pt.minimum(err, delta)
    return _per_example(0.5 * pt.sqr(quad) + delta * (err - quad), out.mask)


REGISTRY: dict[str, Callable] = {
    "categorical_crossentropy": categorical_crossentropy,
    "binary_crossentropy": binary_crossentropy,
    "mse": mse,
    "mae": mae,
    "huber": huber,
}

#: Losses whose targets are class ids (or one-hot rows) rather than values like the output.
CLASS_ID_TARGETS = {"categorical_crossentropy"}


def is_classification(config: Any) -> bool:
    return name_of(config) in ("categorical_crossentropy", "binary_crossentropy")


def class_weight_of(target, out: Output, weights: list[float], units: int):
    """Each example's weight from its class: ``weights[id]`` for class ids, ``rows @ weights``
    for one-hot rows, ``w0 (1 - t) + w1 t`` for the 0/1 target of a single sigmoid unit."""
    w = pt.constant(np.asarray(weights, dtype=out.value.dtype))
    if target.ndim == out.value.ndim - 1:  # class ids
        per = one_hot(target, len(weights), out.value.dtype) @ w
    elif units == 1:
        per = (w[0] * (1.0 - target) + w[1] * target).sum(axis=-1)
    else:
        per = (target * w).sum(axis=-1)
    return _per_example(per, out.mask)


def n_classes(output_shape: tuple) -> int:
    """Classes an output of this shape scores: its units, or 2 for a single sigmoid unit."""
    return 2 if output_shape[-1] == 1 else output_shape[-1]


def get(config: Any, units: int = 0) -> Callable:
    """``fn(target, output) -> per-example loss`` for a spec value (a name or a mapping);
    ``units`` is the output layer's last axis (needed with ``class_weights``).

    With ``class_weights``, each example's loss is multiplied by its class's weight (Keras's
    semantics: the batch loss is the mean of the weighted losses).
    """
    fn, options = lookup(REGISTRY, config, "loss")
    weights = options.pop("class_weights", None)
    if weights is None:
        return lambda target, out: fn(target, out, **options)
    return lambda target, out: fn(target, out, **options) * class_weight_of(target, out, weights, units)
