"""Optimizers, keyed by their YAML names: ``(params, grads) -> updates`` for ``pytensor.function``.

Each optimizer owns its state as shared variables named ``optimizer/<param name>/<slot>`` (and
``optimizer/learning_rate``, ``optimizer/step``), so a checkpoint can save and restore it. The
learning rate is a shared variable so that schedules can change it between epochs. Equations
follow PyTorch's documentation; names and defaults follow Keras (``beta_1``, ``rho``,
``epsilon``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytensor
import pytensor.tensor as pt

from .ops.update import adam_step, descent_step
from .registry import lookup


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
        v_new = mu * v + grad  # PyTensor makes it a Gemm in place where grad is a product
        if self.config.get("nesterov", False):
            return {v: v_new, param: param - lr * (grad + mu * v_new)}
        # p -= lr * v on netbuild's threads (netbuild.ops.update.DescentStep)
        return {v: v_new, param: descent_step(param, v_new, lr)}


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
        lr = self.learning_rate
        # One fused C loop (netbuild.ops.update.AdamStep), as PyTorch computes it:
        # p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps).
        p_new, m_new, v_new = adam_step(param, m, v, grad, lr / (1.0 - b1 ** t),
                                        1.0 / pt.sqrt(1.0 - b2 ** t), lr * self.weight_decay(),
                                        b1, b2, eps)
        return {m: m_new, v: v_new, param: p_new}

    def weight_decay(self) -> float:
        """Decoupled weight decay (AdamW); plain Adam has none."""
        return 0.0


class AdamW(Adam):
    """Adam with decoupled weight decay: ``p -= lr * weight_decay * p`` before the Adam step."""

    type = "adamw"

    def weight_decay(self) -> float:
        return float(self.config.get("weight_decay", 0.01))


class RMSprop(Optimizer):
    """``v = rho v + (1 - rho) g^2``; ``p -= lr * g / (sqrt(v) + eps)``; with ``momentum``,
    ``buf = momentum * buf + g / (sqrt(v) + eps)`` and ``p -= lr * buf``."""

    type = "rmsprop"

    def update(self, param, grad):
        rho = float(self.config.get("rho", 0.9))
        eps = float(self.config.get("epsilon", 1e-7))
        mu = float(self.config.get("momentum", 0.0))
        v = self.slot(param, "v")
        v_new = rho * v + (1.0 - rho) * pt.sqr(grad)
        step = grad / (pt.sqrt(v_new) + eps)
        out = {v: v_new}
        if mu:
            buf = self.slot(param, "momentum")
            step = mu * buf + step
            out[buf] = step
        out[param] = param - self.learning_rate * step
        return out


class Adagrad(Optimizer):
    """``s += g^2``; ``p -= lr * g / (sqrt(s) + eps)``, ``s`` starting at
    ``initial_accumulator_value``."""

    type = "adagrad"

    def update(self, param, grad):
        eps = float(self.config.get("epsilon", 1e-7))
        s = self.slot(param, "sum")
        s.set_value(np.full_like(s.get_value(), self.config.get("initial_accumulator_value", 0.1)))
        s_new = s + pt.sqr(grad)
        return {s: s_new, param: param - self.learning_rate * grad / (pt.sqrt(s_new) + eps)}


class Adadelta(Optimizer):
    """``v = rho v + (1 - rho) g^2``; ``d = sqrt(u + eps) / sqrt(v + eps) * g``;
    ``u = rho u + (1 - rho) d^2``; ``p -= lr * d``."""

    type = "adadelta"

    def update(self, param, grad):
        rho = float(self.config.get("rho", 0.95))
        eps = float(self.config.get("epsilon", 1e-7))
        v, u = self.slot(param, "v"), self.slot(param, "u")
        v_new = rho * v + (1.0 - rho) * pt.sqr(grad)
        delta = pt.sqrt(u + eps) / pt.sqrt(v_new + eps) * grad
        return {v: v_new, u: rho * u + (1.0 - rho) * pt.sqr(delta),
                param: param - self.learning_rate * delta}


class Adamax(Optimizer):
    """``m = b1 m + (1 - b1) g``; ``u = max(b2 u, |g| + eps)``;
    ``p -= lr / (1 - b1^t) * m / u``."""

    type = "adamax"

    def update(self, param, grad):
        b1 = float(self.config.get("beta_1", 0.9))
        b2 = float(self.config.get("beta_2", 0.999))
        eps = float(self.config.get("epsilon", 1e-7))
        m, u = self.slot(param, "m"), self.slot(param, "u")
        t = (self.step + 1).astype(param.dtype)
        m_new = b1 * m + (1.0 - b1) * grad
        u_new = pt.maximum(b2 * u, pt.abs(grad) + eps)
        return {m: m_new, u: u_new,
                param: param - self.learning_rate / (1.0 - b1 ** t) * m_new / u_new}


class Nadam(Optimizer):
    """Adam with Nesterov momentum (PyTorch's NAdam, ``momentum_decay`` psi):
    ``mu_t = b1 (1 - 0.5 * 0.96^(t psi))``; ``m``, ``v`` as Adam;
    ``m_hat = mu_{t+1} m / (1 - prod mu_{1..t+1}) + (1 - mu_t) g / (1 - prod mu_{1..t})``;
    ``p -= lr * m_hat / (sqrt(v / (1 - b2^t)) + eps)``."""

    type = "nadam"

    def __init__(self, config: dict):
        super().__init__(config)
        self.mu_product = pytensor.shared(np.asarray(1.0, dtype=pytensor.config.floatX),
                                          name="optimizer/mu_product")
        self.state[self.mu_product.name] = self.mu_product

    def updates(self, params, grads):
        b1 = float(self.config.get("beta_1", 0.9))
        psi = float(self.config.get("momentum_decay", 0.004))
        t = (self.step + 1).astype(pytensor.config.floatX)
        self._mu = b1 * (1.0 - 0.5 * 0.96 ** (t * psi))
        self._mu_next = b1 * (1.0 - 0.5 * 0.96 ** ((t + 1.0) * psi))
        self._product = self.mu_product * self._mu
        out = super().updates(params, grads)
        out[self.mu_product] = self._product
        return out

    def update(self, param, grad):
        b2 = float(self.config.get("beta_2", 0.999))
        eps = float(self.config.get("epsilon", 1e-7))
        b1 = float(self.config.get("beta_1", 0.9))
        m, v = self.slot(param, "m"), self.slot(param, "v")
        t = (self.step + 1).astype(param.dtype)
        m_new = b1 * m + (1.0 - b1) * grad
        v_new = b2 * v + (1.0 - b2) * pt.sqr(grad)
        m_hat = (self._mu_next * m_new / (1.0 - self._product * self._mu_next)
                 + (1.0 - self._mu) * grad / (1.0 - self._product))
        v_hat = v_new / (1.0 - b2 ** t)
        return {m: m_new, v: v_new,
                param: param - self.learning_rate * m_hat / (pt.sqrt(v_hat) + eps)}


REGISTRY: dict[str, type[Optimizer]] = {
    cls.type: cls for cls in (SGD, Adam, AdamW, RMSprop, Adagrad, Adadelta, Adamax, Nadam)
}


def get(config: dict) -> Optimizer:
    """A new optimizer for a spec mapping ``{type: ..., learning_rate: ..., ...}``."""
    cls, _ = lookup(REGISTRY, config, "optimizer")
    return cls(config)
