"""Weight initializers, keyed by their YAML names.

Each takes a seeded ``numpy.random.Generator``, the shape, and the fans the layer computed
(``fan_in``: inputs feeding one unit, ``fan_out``: units one input feeds), and returns float64
values; the network casts them to the float type in use.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from .registry import lookup


def zeros(rng, shape, fan_in, fan_out, **_):
    return np.zeros(shape)


def ones(rng, shape, fan_in, fan_out, **_):
    return np.ones(shape)


def normal(rng, shape, fan_in, fan_out, stddev: float = 0.05, **_):
    return rng.normal(0.0, stddev, size=shape)


def uniform(rng, shape, fan_in, fan_out, limit: float = 0.05, **_):
    return rng.uniform(-limit, limit, size=shape)


def glorot_uniform(rng, shape, fan_in, fan_out, **_):
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, size=shape)


def glorot_normal(rng, shape, fan_in, fan_out, **_):
    return _truncated_normal(rng, shape, np.sqrt(2.0 / (fan_in + fan_out)))


def he_uniform(rng, shape, fan_in, fan_out, **_):
    limit = np.sqrt(6.0 / fan_in)
    return rng.uniform(-limit, limit, size=shape)


def he_normal(rng, shape, fan_in, fan_out, **_):
    return _truncated_normal(rng, shape, np.sqrt(2.0 / fan_in))


def lecun_normal(rng, shape, fan_in, fan_out, **_):
    return _truncated_normal(rng, shape, np.sqrt(1.0 / fan_in))


def orthogonal(rng, shape, fan_in, fan_out, gain: float = 1.0, **_):
    """Rows (or columns) orthonormal over the shape flattened to ``(shape[0], rest)``."""
    rows = shape[0]
    cols = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    a = rng.normal(0.0, 1.0, size=(max(rows, cols), min(rows, cols)))
    q, r = np.linalg.qr(a)
    q *= np.sign(np.diag(r))
    if rows < cols:
        q = q.T
    return gain * q.reshape(shape)


def _truncated_normal(rng, shape, stddev):
    """Normal values redrawn beyond two standard deviations, rescaled to keep ``stddev``."""
    scale = stddev / 0.87962566103423978  # stddev of a unit normal truncated to [-2, 2]
    out = rng.normal(0.0, 1.0, size=shape)
    bad = np.abs(out) > 2
    while bad.any():
        out[bad] = rng.normal(0.0, 1.0, size=int(bad.sum()))
        bad = np.abs(out) > 2
    return out * scale


REGISTRY: dict[str, Callable] = {
    "glorot_uniform": glorot_uniform,
    "glorot_normal": glorot_normal,
    "he_uniform": he_uniform,
    "he_normal": he_normal,
    "lecun_normal": lecun_normal,
    "orthogonal": orthogonal,
    "zeros": zeros,
    "ones": ones,
    "normal": normal,
    "uniform": uniform,
}


def initialize(config: Any, rng: np.random.Generator, shape, fan_in: int, fan_out: int) -> np.ndarray:
    """Values for a parameter from a spec value (a name or ``{type: name, ...options}``)."""
    if callable(config):  # a layer's own initializer (the LSTM's forget-gate bias)
        return np.asarray(config(rng, tuple(shape), max(fan_in, 1), max(fan_out, 1)), dtype=np.float64)
    fn, options = lookup(REGISTRY, config, "initializer")
    return np.asarray(fn(rng, tuple(shape), max(fan_in, 1), max(fan_out, 1), **options),
                      dtype=np.float64)
