"""Every loss against an independent numpy formula, its gradient numerically, and the logits path
of softmax/sigmoid outputs."""

from __future__ import annotations

import numpy as np
import pytensor
import pytensor.tensor as pt
import pytest
from conftest import TEST_MODE, verify_grad
from pytensor.graph.replace import clone_replace

from netbuild import activations, losses

RNG = np.random.default_rng(1)


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


def np_loss(name, t, z, activation, **opt):
    """The per-example loss in numpy, from logits ``z`` through ``activation``."""
    if name == "categorical_crossentropy":
        k = z.shape[-1]
        onehot = np.eye(k)[t] if t.ndim == z.ndim - 1 else t
        ls = opt.get("label_smoothing", 0.0)
        onehot = onehot * (1 - ls) + ls / k
        return -(onehot * _log_softmax(z)).sum(-1)
    p = _sigmoid(z) if activation == "sigmoid" else z
    if name == "binary_crossentropy":
        return -(t * np.log(p) + (1 - t) * np.log(1 - p)).mean(-1)
    if name == "mse":
        return ((p - t) ** 2).mean(-1)
    if name == "mae":
        return np.abs(p - t).mean(-1)
    if name == "huber":
        d = opt.get("delta", 1.0)
        e = np.abs(p - t)
        return np.where(e <= d, 0.5 * e**2, d * (e - 0.5 * d)).mean(-1)
    raise KeyError(name)


CASES = [
    ("categorical_crossentropy", "softmax", "ids", {}),
    ("categorical_crossentropy", "softmax", "onehot", {"label_smoothing": 0.1}),
    ("categorical_crossentropy", "log_softmax", "ids", {}),
    ("binary_crossentropy", "sigmoid", "values01", {}),
    ("mse", "linear", "values", {}),
    ("mae", "linear", "values", {}),
    ("huber", "linear", "values", {"delta": 0.5}),
]


def test_every_loss_is_covered():
    assert {c[0] for c in CASES} == set(losses.REGISTRY)


def _targets(kind, n, k):
    if kind == "ids":
        return RNG.integers(0, k, size=n)
    if kind == "onehot":
        return np.eye(k)[RNG.integers(0, k, size=n)]
    if kind == "values01":
        return RNG.integers(0, 2, size=(n, k)).astype(float)
    return RNG.normal(size=(n, k))


@pytest.mark.parametrize("name,activation,kind,opt", CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_loss_matches_numpy_and_its_gradient(name, activation, kind, opt, float64):
    n, k = 6, 4
    z = RNG.normal(size=(n, k)) * 2
    t = _targets(kind, n, k)
    tv = pt.lvector() if kind == "ids" else pt.matrix()
    config = {"type": name, **opt}

    def graph(logits):
        out = activations.get(activation)(logits)
        return losses.get(config)(tv, losses.Output(out, logits, activation))

    zv = pt.matrix()
    f = pytensor.function([zv, tv], graph(zv), mode=TEST_MODE)
    np.testing.assert_allclose(f(z, t), np_loss(name, t, z, activation, **opt), rtol=1e-7, atol=1e-9)
    verify_grad(lambda logits: clone_replace(graph(logits).mean(), {tv: pt.constant(t)}),
                [z], rng=RNG, mode=TEST_MODE)


def test_crossentropy_from_logits_survives_saturated_softmax(float64):
    zv, tv = pt.matrix(), pt.lvector()
    out = activations.softmax(zv)
    loss = losses.get("categorical_crossentropy")(tv, losses.Output(out, zv, "softmax"))
    f = pytensor.function([zv, tv], [loss, pytensor.grad(loss.sum(), zv)], mode=TEST_MODE)
    value, grad = f(np.array([[200.0, -200.0]]), np.array([1]))
    np.testing.assert_allclose(value, [400.0], rtol=1e-12)
    np.testing.assert_allclose(grad, [[1.0, -1.0]], rtol=1e-12)  # softmax(z) - onehot(t)


def test_class_weights_scale_each_example_by_its_class(float64):
    z = RNG.normal(size=(5, 3))
    ids = np.array([0, 1, 2, 1, 0])
    weights = [1.0, 2.0, 0.5]
    zv, tv = pt.matrix(), pt.lvector()
    out = losses.Output(activations.softmax(zv), zv, "softmax")
    plain = losses.get("categorical_crossentropy", 3)(tv, out)
    weighted = losses.get({"type": "categorical_crossentropy", "class_weights": weights}, 3)(tv, out)
    a, b = pytensor.function([zv, tv], [plain, weighted], mode=TEST_MODE)(z, ids)
    np.testing.assert_allclose(b, a * np.array(weights)[ids])


def test_class_weights_of_a_single_sigmoid_unit(float64):
    z = RNG.normal(size=(4, 1))
    t = np.array([[0.0], [1.0], [1.0], [0.0]])
    zv, tv = pt.matrix(), pt.matrix()
    out = losses.Output(activations.sigmoid(zv), zv, "sigmoid")
    plain = losses.get("binary_crossentropy", 1)(tv, out)
    weighted = losses.get({"type": "binary_crossentropy", "class_weights": [0.25, 4.0]}, 1)(tv, out)
    a, b = pytensor.function([zv, tv], [plain, weighted], mode=TEST_MODE)(z, t)
    np.testing.assert_allclose(b, a * np.where(t[:, 0] == 1, 4.0, 0.25))
