"""Activation functions, keyed by their YAML names.

Each is written from elementwise ops and reductions that have C code in PyTensor, and acts on
the last axis where it normalizes; softmax is netbuild's own C op (PyTensor's has no C code in
3.0.x).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pytensor.tensor as pt

from .ops import softmax as ops_softmax
from .registry import lookup, name_of  # noqa: F401  (name_of is part of this API)


def linear(x, **_):
    return x


def sigmoid(x, **_):
    return pt.sigmoid(x)


def hard_sigmoid(x, **_):
    """``relu6(x + 3) / 6``, as in PyTorch and Keras 3."""
    return pt.clip(x / 6.0 + 0.5, 0.0, 1.0)


def tanh(x, **_):
    return pt.tanh(x)


def relu(x, **_):
    return pt.maximum(x, 0.0)


def leaky_relu(x, alpha: float = 0.2, **_):
    return pt.switch(x > 0, x, alpha * x)


def elu(x, alpha: float = 1.0, **_):
    return pt.switch(x > 0, x, alpha * pt.expm1(pt.minimum(x, 0.0)))


SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946


def selu(x, **_):
    return SELU_SCALE * elu(x, alpha=SELU_ALPHA)


def gelu(x, **_):
    """The exact GELU, ``x * Phi(x)``."""
    return 0.5 * x * (1.0 + pt.erf(x / np.sqrt(2.0)))


def softplus(x, **_):
    return pt.softplus(x)


def softsign(x, **_):
    return x / (1.0 + pt.abs(x))


def swish(x, **_):
    return x * pt.sigmoid(x)


def log_softmax(x, **_):
    """Numerically stable ``log(softmax(x))`` over the last axis."""
    shifted = x - pt.max(x, axis=-1, keepdims=True)
    return shifted - pt.log(pt.sum(pt.exp(shifted), axis=-1, keepdims=True))


def softmax(x, **_):
    """Over the last axis, in C (:class:`netbuild.ops.softmax.Softmax`): PyTensor's own softmax
    has no C code in 3.0.x, and written from its elementwise ops it took six C modules."""
    return ops_softmax.softmax(x)


REGISTRY: dict[str, Callable] = {
    "linear": linear,
    "sigmoid": sigmoid,
    "hard_sigmoid": hard_sigmoid,
    "tanh": tanh,
    "relu": relu,
    "leaky_relu": leaky_relu,
    "elu": elu,
    "selu": selu,
    "gelu": gelu,
    "softplus": softplus,
    "softsign": softsign,
    "swish": swish,
    "softmax": softmax,
    "log_softmax": log_softmax,
}


def get(config: Any) -> Callable:
    """The activation for a spec value: a name, or a mapping with ``type`` and options."""
    fn, options = lookup(REGISTRY, config, "activation")
    return (lambda x: fn(x, **options)) if options else fn
