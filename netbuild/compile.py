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
    """``step(x, y) -> (mean loss, outputs[, mask])`` updates the parameters (the mask when the
    output is a masked sequence); ``optimizer`` owns state; ``random_step`` is dropout's step
    counter (None without dropout)."""

    step: Callable
    optimizer: optimizers.Optimizer
    random_step: Any
    seconds: float


def target_variable(y: np.ndarray):
    """A symbolic batch of targets with the dtype and rank of the data's ``y``."""
    return pt.tensor(name="y", dtype=str(y.dtype), shape=(None,) * y.ndim)


def _loss_graph(network: Network, loss_config: Any, target, training: bool, seed: int = 0):
    x = network.input_variable()
    out, ctx = network.forward(x, training=training, seed=seed)
    logits, activation = ctx.preactivations.get(network.output, (None, "linear"))
    loss = losses.get(loss_config, network.output_shape[-1])
    per_example = loss(target, losses.Output(out, logits, activation, ctx.mask(out)))
    return x, out, per_example, ctx


def _with_mask(outputs: list, out, ctx) -> list:
    """A masked sequence output's mask as one more output (for the metrics)."""
    mask = ctx.mask(out)
    return outputs if mask is None else outputs + [mask]


def penalty(network: Network):
    """The l1/l2 penalties of every layer that sets them, on its weights (never its biases)."""
    total = 0.0
    for node in network.order:
        l1, l2 = getattr(node.layer, "l1", None) or 0.0, getattr(node.layer, "l2", None) or 0.0
        if not (l1 or l2):
            continue
        for p in node.param_specs:
            if p.regularize and p.trainable:
                w = node.layer.params[p.name]
                total = total + (l1 * pt.abs(w).sum() if l1 else 0.0) + (l2 * pt.sqr(w).sum() if l2 else 0.0)
    return total


def clip(grads: list, clip_norm: float | None, clip_value: float | None) -> list:
    """Gradients clipped elementwise to ``[-clip_value, clip_value]``, then rescaled so that
    their global norm is at most ``clip_norm``."""
    if clip_value:
        grads = [pt.clip(g, -clip_value, clip_value) for g in grads]
    if clip_norm:
        norm = pt.sqrt(sum(pt.sqr(g).sum() for g in grads))
        scale = pt.minimum(1.0, clip_norm / pt.maximum(norm, 1e-12))
        grads = [g * scale for g in grads]
    return grads


def compile_train(network: Network, train_config: dict, y_like: np.ndarray, seed: int) -> TrainFunctions:
    """The training step: one optimizer update on a batch; returns its mean loss (penalties
    excluded) and outputs."""
    start = time.perf_counter()
    target = target_variable(y_like)
    x, out, per_example, ctx = _loss_graph(network, train_config["loss"], target, True, seed)
    loss = per_example.mean()
    params = network.trainable()
    grads = pytensor.grad(loss + penalty(network), params)
    grads = clip(grads, train_config.get("clip_norm"), train_config.get("clip_value"))
    optimizer = optimizers.get(train_config["optimizer"])
    updates = dict(ctx.updates)
    updates.update(optimizer.updates(params, grads))
    step = pytensor.function([x, target], _with_mask([loss, out], out, ctx), updates=updates,
                             mode=backend.mode(keep_outputs=True),
                             name="train_step")
    # Batches come from netbuild.data, already of the inputs' dtypes and ranks: skip PyTensor's
    # per-call input checks (a tenth of an MLP step). The C code still checks each input's type.
    step.trust_input = True
    random_step = ctx.step if ctx.step in updates else None
    return TrainFunctions(step, optimizer, random_step, time.perf_counter() - start)


def compile_eval(network: Network, loss_config: Any, y_like: np.ndarray) -> Callable:
    """``evaluate(x, y) -> (per-example loss, outputs[, mask])`` in inference mode."""
    target = target_variable(y_like)
    x, out, per_example, ctx = _loss_graph(network, loss_config, target, False)
    return pytensor.function([x, target], _with_mask([per_example, out], out, ctx),
                             mode=backend.mode(), name="evaluate")


def compile_predict(network: Network) -> Callable:
    """``predict(x) -> outputs`` in inference mode."""
    x = network.input_variable()
    out, _ = network.forward(x, training=False)
    return pytensor.function([x], out, mode=backend.mode(), name="predict")


def measure_gemm(n: int = 1024, repeats: int = 5) -> float:
    """GFLOP/s of a compiled ``n x n`` matrix product in the float type in use (best of
    ``repeats``), as `netbuild doctor` reports for the BLAS in use."""
    a = pt.matrix("a")
    fn = pytensor.function([a], pt.dot(a, a), mode=backend.mode(), name="gemm")
    x = np.random.default_rng(0).random((n, n)).astype(pytensor.config.floatX)
    fn(x)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9
