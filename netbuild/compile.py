"""Network + loss + optimizer -> compiled PyTensor functions (C backend, BLAS).

The only module that calls ``pytensor.function``. Each function is compiled once per process.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pytensor
import pytensor.tensor as pt

from . import backend, losses, optimizers
from .network import Network


@dataclass
class TrainFunctions:
    """``step(x, y) -> (mean loss, outputs)`` updates the parameters; ``optimizer`` owns state."""

    step: Callable
    optimizer: optimizers.Optimizer
    rng: Any
    seconds: float


def target_variable(y: np.ndarray):
    """A symbolic batch of targets with the dtype and rank of the data's ``y``."""
    return pt.tensor(name="y", dtype=str(y.dtype), shape=(None,) * y.ndim)


def _loss_graph(network: Network, loss_config: Any, target, training: bool, seed: int = 0):
    x = network.input_variable()
    out, ctx = network.forward(x, training=training, seed=seed)
    logits, activation = ctx.preactivations.get(network.output, (None, "linear"))
    per_example = losses.get(loss_config)(target, losses.Output(out, logits, activation))
    return x, out, per_example, ctx


def compile_train(network: Network, train_config: dict, y_like: np.ndarray, seed: int) -> TrainFunctions:
    """The training step: one optimizer update on a batch; returns its mean loss and outputs."""
    start = time.perf_counter()
    target = target_variable(y_like)
    x, out, per_example, ctx = _loss_graph(network, train_config["loss"], target, True, seed)
    loss = per_example.mean()
    params = network.trainable()
    grads = pytensor.grad(loss, params)
    optimizer = optimizers.get(train_config["optimizer"])
    updates = dict(ctx.updates)
    updates.update(optimizer.updates(params, grads))
    step = pytensor.function([x, target], [loss, out], updates=updates, mode=backend.MODE,
                             name="train_step")
    return TrainFunctions(step, optimizer, ctx.rng, time.perf_counter() - start)


def compile_eval(network: Network, loss_config: Any, y_like: np.ndarray) -> Callable:
    """``evaluate(x, y) -> (per-example loss, outputs)`` in inference mode."""
    target = target_variable(y_like)
    x, out, per_example, _ = _loss_graph(network, loss_config, target, False)
    return pytensor.function([x, target], [per_example, out], mode=backend.MODE, name="evaluate")


def compile_predict(network: Network) -> Callable:
    """``predict(x) -> outputs`` in inference mode."""
    x = network.input_variable()
    out, _ = network.forward(x, training=False)
    return pytensor.function([x], out, mode=backend.MODE, name="predict")
