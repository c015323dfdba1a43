"""Each optimizer's parameters after three steps on a fixed quadratic equal an independent numpy
implementation of its published update rule."""

from __future__ import annotations

import numpy as np
import pytensor
import pytensor.tensor as pt
import pytest

from conftest import TEST_MODE
from netbuild import optimizers

A = np.array([[3.0, 0.5], [0.5, 1.0]])
B = np.array([1.0, -2.0])
P0 = np.array([0.7, -0.3])


def grad(p):
    """Gradient of 0.5 p'Ap - b'p."""
    return A @ p - B


def numpy_sgd(cfg, steps):
    p, v = P0.copy(), np.zeros(2)
    lr, mu = cfg["learning_rate"], cfg.get("momentum", 0.0)
    for _ in range(steps):
        g = grad(p)
        if mu:
            v = mu * v + g
            p = p - lr * (g + mu * v if cfg.get("nesterov") else v)
        else:
            p = p - lr * g
    return p


def numpy_adam(cfg, steps):
    p, m, v = P0.copy(), np.zeros(2), np.zeros(2)
    lr, b1, b2, eps = cfg["learning_rate"], cfg["beta_1"], cfg["beta_2"], cfg["epsilon"]
    for t in range(1, steps + 1):
        g = grad(p)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    return p


CASES = [
    ({"type": "sgd", "learning_rate": 0.1}, numpy_sgd),
    ({"type": "sgd", "learning_rate": 0.1, "momentum": 0.9}, numpy_sgd),
    ({"type": "sgd", "learning_rate": 0.1, "momentum": 0.9, "nesterov": True}, numpy_sgd),
    ({"type": "adam", "learning_rate": 0.1, "beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-7}, numpy_adam),
    ({"type": "adam", "learning_rate": 0.05, "beta_1": 0.5, "beta_2": 0.9, "epsilon": 1e-3}, numpy_adam),
]


def test_every_optimizer_is_covered():
    assert {c[0]["type"] for c in CASES} == set(optimizers.REGISTRY)


@pytest.mark.parametrize("cfg,reference", CASES, ids=lambda c: str(c) if isinstance(c, dict) else "")
def test_three_steps_match_numpy(cfg, reference, float64):
    p = pytensor.shared(P0.copy(), name="w")
    loss = 0.5 * pt.dot(p, pt.dot(A, p)) - pt.dot(B, p)
    opt = optimizers.get(cfg)
    step = pytensor.function([], loss, updates=opt.updates([p], pytensor.grad(loss, [p])), mode=TEST_MODE)
    for _ in range(3):
        step()
    np.testing.assert_allclose(p.get_value(), reference(cfg, 3), rtol=1e-12, atol=1e-12)
    assert int(opt.step.get_value()) == 3
    assert all(name.startswith("optimizer/") for name in opt.state)
