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


def numpy_adamw(cfg, steps):
    p, m, v = P0.copy(), np.zeros(2), np.zeros(2)
    lr, b1, b2, eps, wd = cfg["learning_rate"], cfg["beta_1"], cfg["beta_2"], cfg["epsilon"], cfg["weight_decay"]
    for t in range(1, steps + 1):
        g = grad(p)
        p = p * (1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    return p


def numpy_rmsprop(cfg, steps):
    p, v, buf = P0.copy(), np.zeros(2), np.zeros(2)
    for _ in range(steps):
        g = grad(p)
        v = cfg["rho"] * v + (1 - cfg["rho"]) * g * g
        step = g / (np.sqrt(v) + cfg["epsilon"])
        if cfg["momentum"]:
            buf = cfg["momentum"] * buf + step
            step = buf
        p = p - cfg["learning_rate"] * step
    return p


def numpy_adagrad(cfg, steps):
    p, acc = P0.copy(), np.full(2, cfg["initial_accumulator_value"])
    for _ in range(steps):
        g = grad(p)
        acc = acc + g * g
        p = p - cfg["learning_rate"] * g / (np.sqrt(acc) + cfg["epsilon"])
    return p


def numpy_adadelta(cfg, steps):
    p, v, u = P0.copy(), np.zeros(2), np.zeros(2)
    rho, eps = cfg["rho"], cfg["epsilon"]
    for _ in range(steps):
        g = grad(p)
        v = rho * v + (1 - rho) * g * g
        d = np.sqrt(u + eps) / np.sqrt(v + eps) * g
        u = rho * u + (1 - rho) * d * d
        p = p - cfg["learning_rate"] * d
    return p


def numpy_adamax(cfg, steps):
    p, m, u = P0.copy(), np.zeros(2), np.zeros(2)
    b1, b2 = cfg["beta_1"], cfg["beta_2"]
    for t in range(1, steps + 1):
        g = grad(p)
        m = b1 * m + (1 - b1) * g
        u = np.maximum(b2 * u, np.abs(g) + cfg["epsilon"])
        p = p - cfg["learning_rate"] / (1 - b1**t) * m / u
    return p


def numpy_nadam(cfg, steps):
    """torch.optim.NAdam's documented algorithm."""
    p, m, v = P0.copy(), np.zeros(2), np.zeros(2)
    b1, b2, psi = cfg["beta_1"], cfg["beta_2"], cfg["momentum_decay"]
    product = 1.0
    for t in range(1, steps + 1):
        g = grad(p)
        mu = b1 * (1 - 0.5 * 0.96 ** (t * psi))
        mu_next = b1 * (1 - 0.5 * 0.96 ** ((t + 1) * psi))
        product *= mu
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat = mu_next * m / (1 - product * mu_next) + (1 - mu) * g / (1 - product)
        p = p - cfg["learning_rate"] * m_hat / (np.sqrt(v / (1 - b2**t)) + cfg["epsilon"])
    return p


ADAM = {"beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-7}
CASES = [
    ({"type": "sgd", "learning_rate": 0.1}, numpy_sgd),
    ({"type": "sgd", "learning_rate": 0.1, "momentum": 0.9}, numpy_sgd),
    ({"type": "sgd", "learning_rate": 0.1, "momentum": 0.9, "nesterov": True}, numpy_sgd),
    ({"type": "adam", "learning_rate": 0.1, "beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-7}, numpy_adam),
    ({"type": "adam", "learning_rate": 0.05, "beta_1": 0.5, "beta_2": 0.9, "epsilon": 1e-3}, numpy_adam),
    ({"type": "adamw", "learning_rate": 0.1, "weight_decay": 0.1, **ADAM}, numpy_adamw),
    ({"type": "rmsprop", "learning_rate": 0.01, "rho": 0.9, "momentum": 0.0, "epsilon": 1e-7}, numpy_rmsprop),
    ({"type": "rmsprop", "learning_rate": 0.01, "rho": 0.8, "momentum": 0.5, "epsilon": 1e-7}, numpy_rmsprop),
    ({"type": "adagrad", "learning_rate": 0.1, "initial_accumulator_value": 0.1, "epsilon": 1e-7}, numpy_adagrad),
    ({"type": "adadelta", "learning_rate": 1.0, "rho": 0.95, "epsilon": 1e-7}, numpy_adadelta),
    ({"type": "adamax", "learning_rate": 0.002, **ADAM}, numpy_adamax),
    ({"type": "nadam", "learning_rate": 0.002, "momentum_decay": 0.004, **ADAM}, numpy_nadam),
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
