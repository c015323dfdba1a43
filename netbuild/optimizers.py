"""Optimizers, keyed by their YAML names: ``(params, grads) -> updates`` for ``pytensor.function``.

Each optimizer owns its state as shared variables named ``optimizer/<param name>/<slot>`` (and
``optimizer/learning_rate``, ``optimizer/step``), so a checkpoint can save and restore it. The
learning rate is a shared variable so that schedules can change it between epochs. Equations
follow PyTorch's documentation.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytensor
import pytensor.tensor as pt

from .errors import expected_one_of


class Optimizer:
    """Base class: hyperparameters from the spec, state created in :meth:`updates`."""

    type = ""

    def __init__(self, config: dict):
        self.config = config
        float_type = pytensor.config.floatX
        self.learning_rate = pytensor.shared(np.asarray(config["learning_rate"], dtype=float_type),
                                             name="optimizer/learning_rate")
        self.step = pytensor.shared(np.asarray(0, dtype="int64"), name="optimizer/step")
        self.state: dict[str, Any] = {self.learning_rate.name: self.learning_rate,
                                      self.step.name: self.step}

    def slot(self, param, slot: str):
        """A zero-initialized state variable shaped like ``param``."""
        value = np.zeros_like(param.get_value(borrow=True))
        var = pytensor.shared(value, name=f"optimizer/{param.name}/{slot}")
        self.state[var.name] = var
        return var

    def updates(self, params: list, grads: list) -> dict:
        """The update of every parameter and state variable for one step."""
        out = {self.step: self.step + 1}
        for p, g in zip(params, grads):
            out.update(self.update(p, g))
        return out

    def update(self, param, grad) -> dict:
        raise NotImplementedError


class SGD(Optimizer):
    """``v = momentum * v + g``; ``p -= lr * v`` (Nesterov: ``p -= lr * (g + momentum * v)``)."""

    type = "sgd"

    def update(self, param, grad):
        lr = self.learning_rate
        mu = float(self.config.get("momentum", 0.0))
        if mu == 0.0:
            return {param: param - lr * grad}
        v = self.slot(param, "velocity")
        v_new = mu * v + grad
        step = grad + mu * v_new if self.config.get("nesterov", False) else v_new
        return {v: v_new, param: param - lr * step}


class Adam(Optimizer):
    """``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g^2``;
    ``p -= lr * m_hat / (sqrt(v_hat) + eps)`` with bias-corrected ``m_hat``, ``v_hat``."""

    type = "adam"

    def update(self, param, grad):
        b1 = float(self.config.get("beta_1", 0.9))
        b2 = float(self.config.get("beta_2", 0.999))
        eps = float(self.config.get("epsilon", 1e-7))
        m, v = self.slot(param, "m"), self.slot(param, "v")
        t = (self.step + 1).astype(param.dtype)
        m_new = b1 * m + (1.0 - b1) * grad
        v_new = b2 * v + (1.0 - b2) * pt.sqr(grad)
        m_hat = m_new / (1.0 - b1 ** t)
        v_hat = v_new / (1.0 - b2 ** t)
        return {m: m_new, v: v_new, param: param - self.learning_rate * m_hat / (pt.sqrt(v_hat) + eps)}


REGISTRY: dict[str, type[Optimizer]] = {cls.type: cls for cls in (SGD, Adam)}


def get(config: dict) -> Optimizer:
    """A new optimizer for a spec mapping ``{type: ..., learning_rate: ..., ...}``."""
    name = config["type"]
    if name not in REGISTRY:
        raise KeyError(f"unknown optimizer '{name}'; {expected_one_of(name, REGISTRY)}")
    return REGISTRY[name](config)
