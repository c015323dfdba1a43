"""Every activation against an independent numpy formula, and its gradient numerically."""

from __future__ import annotations

import math

import numpy as np
import pytensor
import pytensor.tensor as pt
import pytest
from conftest import TEST_MODE, verify_grad

from netbuild import activations

_erf = np.vectorize(math.erf)


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


REFERENCE = {
    "linear": lambda x: x,
    "sigmoid": lambda x: 1 / (1 + np.exp(-x)),
    "hard_sigmoid": lambda x: np.clip(x + 3, 0, 6) / 6,
    "tanh": np.tanh,
    "relu": lambda x: np.maximum(x, 0),
    "leaky_relu": lambda x: np.where(x > 0, x, 0.2 * x),
    "elu": lambda x: np.where(x > 0, x, np.exp(x) - 1),
    "selu": lambda x: 1.0507009873554805 * np.where(x > 0, x, 1.6732632423543772 * (np.exp(x) - 1)),
    "gelu": lambda x: 0.5 * x * (1 + _erf(x / np.sqrt(2))),
    "softplus": lambda x: np.log1p(np.exp(x)),
    "softsign": lambda x: x / (1 + np.abs(x)),
    "swish": lambda x: x / (1 + np.exp(-x)),
    "softmax": _softmax,
    "log_softmax": lambda x: np.log(_softmax(x)),
}


def test_every_activation_has_a_reference():
    assert sorted(REFERENCE) == sorted(activations.REGISTRY)


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_activation_matches_numpy_and_its_gradient(name, float64):
    rng = np.random.default_rng(0)
    # keep away from the kinks of relu-like functions for the numerical gradient
    x = rng.uniform(-4, 4, size=(5, 7))
    x[np.abs(x) < 0.05] += 0.2
    x[np.abs(np.abs(x) - 3) < 0.05] += 0.2
    v = pt.matrix()
    f = pytensor.function([v], activations.get(name)(v), mode=TEST_MODE)
    np.testing.assert_allclose(f(x), REFERENCE[name](x), rtol=1e-6, atol=1e-7)
    verify_grad(lambda t: activations.get(name)(t), [x], rng=rng, mode=TEST_MODE)


def test_options_reach_the_function(float64):
    v = pt.vector()
    f = pytensor.function([v], activations.get({"type": "leaky_relu", "alpha": 0.5})(v), mode=TEST_MODE)
    np.testing.assert_allclose(f(np.array([-2.0, 3.0])), [-1.0, 3.0])


def test_softmax_is_stable_for_large_logits(float64):
    v = pt.matrix()
    f = pytensor.function([v], [activations.softmax(v), activations.log_softmax(v)], mode=TEST_MODE)
    x = np.array([[1000.0, 0.0, -1000.0]])
    p, logp = f(x)
    np.testing.assert_allclose(p, [[1.0, np.exp(-1000.0), 0.0]], rtol=1e-12, atol=0)
    np.testing.assert_allclose(logp, [[0.0, -1000.0, -2000.0]], rtol=1e-12, atol=1e-12)
    # d/dx sum_j w_j log p_j = w - p sum(w), saturated or not
    w = np.array([[0.5, -2.0, 3.0]])
    grad = pytensor.function([v], pytensor.grad((activations.log_softmax(v) * w).sum(), v),
                             mode=TEST_MODE)(x)
    np.testing.assert_allclose(grad, w - p * w.sum(), rtol=1e-12, atol=1e-12)
