"""Network + loss + optimizer -> compiled PyTensor functions (the C backend with BLAS, or JAX).

The only module that calls ``pytensor.function`` (:func:`function`). Each function is compiled
once per process (on the ``jax`` backend, once per shape of its inputs).
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pytensor
import pytensor.tensor as pt

from . import backend, losses, optimizers
from .data import Results
from .network import Network
from .signature import Output


@dataclass
class TrainFunctions:
    """``step`` (a :class:`Compiled`) updates the parameters on a batch; ``optimizer`` owns
    state; ``random_step`` is dropout's step counter (None without dropout)."""

    step: "Compiled"
    optimizer: optimizers.Optimizer
    random_step: Any
    seconds: float


class Compiled:
    """A compiled function of a batch (``*inputs, *targets``, the spec's order) and how its
    outputs read: the loss, each output's loss (long form only), each output's values, the mask
    of each masked sequence output. Calling it gives :class:`netbuild.data.Results` with the
    losses summed over the batch's examples; :attr:`fn` is the PyTensor function."""

    def __init__(self, fn, outputs: list[str], with_losses: bool, masked: list[bool], mean: bool):
        self.fn = fn
        self.outputs = outputs
        self.with_losses = with_losses
        self.masked = masked
        self.mean = mean  # the losses are the batch's means (training), else per example

    def __call__(self, *batch) -> Results:
        values = self.fn(*batch)
        n = len(batch[0])
        total = (lambda v: float(v) * n) if self.mean else (lambda v: float(np.sum(v)))
        k = len(self.outputs)
        losses = dict(zip(self.outputs, map(total, values[1:1 + k]))) if self.with_losses else {}
        rest = values[1 + k if self.with_losses else 1:]
        masks = iter(rest[k:])
        return Results(total(values[0]), losses, dict(zip(self.outputs, rest[:k])),
                       {o: next(masks) if m else None for o, m in zip(self.outputs, self.masked)})


def function(inputs: list, outputs, updates: dict | None = None, name: str = "", keep_outputs: bool = False):
    """``pytensor.function`` with the backend in use (:func:`netbuild.backend.mode`). On the
    ``jax`` backend, a :class:`PerShape` function."""
    if backend.current() == "jax":
        return PerShape(inputs, outputs, updates or {}, name)
    _numpy_values(list(outputs) if isinstance(outputs, (list, tuple)) else [outputs], updates or {})
    return pytensor.function(inputs, outputs, updates=updates, mode=backend.mode(keep_outputs=keep_outputs),
                             name=name)


def _numpy_values(outputs: list, updates: dict) -> None:
    """The shared variables a C function reads hold numpy arrays: after a jax function updated
    them in the same process, they hold JAX arrays, which the C code does not take."""
    from pytensor.compile.sharedvalue import SharedVariable
    from pytensor.graph.traversal import ancestors

    for v in ancestors(outputs + list(updates.values())):
        if isinstance(v, SharedVariable) and not isinstance(v.get_value(borrow=True), (np.ndarray, np.generic)):
            v.set_value(np.asarray(v.get_value(borrow=True)))


class PerShape:
    """The ``jax`` backend's function: one compiled function per shape of its inputs (``jax.jit``
    traces one per shape in any case), each built with those shapes static, so that every shape
    the graph computes (a batch reshaped for a matrix product, the splits of a concatenation's
    gradient) is a constant, as JAX needs it to be. Shared variables (parameters, optimizer
    state) are the same across them, and stay on JAX's device between calls."""

    trust_input = False  # as pytensor.function's: skip the per-call checks of the inputs
    #: Compiled shapes kept, at most; the least recently used goes first. A training run meets
    #: two (its batches and the last, shorter one), an evaluation as many again.
    MOST_SHAPES = 8

    def __init__(self, inputs: list, outputs, updates: dict, name: str):
        self.inputs, self.outputs, self.updates, self.name = list(inputs), outputs, dict(updates), name
        self.mode = backend.mode()  # jax's, whatever the backend when a new shape comes
        self._fns: collections.OrderedDict = collections.OrderedDict()

    def __call__(self, *args):
        key = tuple(np.shape(a) for a in args)
        fn = self._fns.get(key)
        if fn is not None:
            self._fns.move_to_end(key)
        else:
            from pytensor.graph.replace import clone_replace

            from pytensor.compile.sharedvalue import SharedVariable
            from pytensor.graph.traversal import ancestors

            static = [pt.tensor(name=v.name, dtype=v.dtype, shape=shape) for v, shape in zip(self.inputs, key)]
            single = not isinstance(self.outputs, (list, tuple))
            outs = [self.outputs] if single else list(self.outputs)
            replace = dict(zip(self.inputs, static))
            for v in ancestors(outs + list(self.updates.values())):  # parameters, optimizer state
                if isinstance(v, SharedVariable) and isinstance(v.type, pt.TensorType):
                    replace[v] = pt.specify_shape(v, np.shape(v.get_value(borrow=True)))
            values = clone_replace(outs + list(self.updates.values()), replace)
            # each update back to its variable's type, without the static shape it gained
            updates = [(var, value if var.type.in_same_class(value.type) else value.reshape(var.shape))
                       for var, value in zip(self.updates, values[len(outs):])]
            fn = pytensor.function(static, values[0] if single else values[:len(outs)], updates=updates,
                                   mode=self.mode, name=self.name)
            fn.trust_input = self.trust_input
            self._fns[key] = fn
            while len(self._fns) > self.MOST_SHAPES:
                self._fns.popitem(last=False)
        return fn(*args)


def target_variable(y: np.ndarray, name: str = "y"):
    """A symbolic batch of targets with the dtype and rank of the data's ``y``."""
    return pt.tensor(name=name, dtype=str(y.dtype), shape=(None,) * y.ndim)


def target_variables(network: Network, ys: list[np.ndarray]) -> list:
    """One per output, like the data's arrays (named ``y`` in the shorthand)."""
    if network.signature.shorthand_outputs:
        return [target_variable(ys[0])]
    return [target_variable(y, f"{o.name}_target") for y, o in zip(ys, network.signature.outputs)]


def _loss_graph(network: Network, heads: list[Output], targets: list, training: bool, seed: int = 0):
    """The inputs, the outputs (by output name), each output's per-example loss for ``heads``
    (the spec's outputs, or another model's to compare with), and the context."""
    xs = network.input_variables()
    outs, ctx = network.forward_all(xs, training=training, seed=seed)
    per_example = {}
    for head, target in zip(heads, targets):
        layer = network.outputs[head.name]
        logits, activation = ctx.preactivations.get(layer, (None, "linear"))
        loss = losses.get(head.loss, network.nodes[layer].output_shape[-1])
        out = outs[head.name]
        per_example[head.name] = loss(target, losses.Output(out, logits, activation, ctx.mask(out)))
    return xs, outs, per_example, ctx


def _weighted(heads: list[Output], values: dict):
    """``sum(weight * value)`` over the outputs; the shorthand's one output is its value."""
    total = None
    for head in heads:
        term = values[head.name] if head.loss_weight == 1.0 else head.loss_weight * values[head.name]
        total = term if total is None else total + term
    return total


def _results(network: Network, heads: list[Output], loss, per_output: dict, outs: dict, ctx):
    """A compiled function's outputs, in :class:`Compiled`'s order, and its layout."""
    with_losses = any(h.prefix for h in heads)  # each output's own loss: the long form's
    names = [h.name for h in heads]
    masks = [ctx.mask(outs[n]) for n in names]
    values = [loss] + ([per_output[n] for n in names] if with_losses else []) + \
        [outs[n] for n in names] + [m for m in masks if m is not None]
    return values, (names, with_losses, [m is not None for m in masks])


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


def _every_param_reaches(network: Network, loss, params: list) -> None:
    """A located :class:`SpecError` for each layer whose trainable parameters the loss does not
    depend on differentiably (their layer reaches the outputs only through an embedding's ids,
    floats truncated to integers), where PyTensor's gradient raised a traceback. Asked only
    once that gradient has failed: it takes a second gradient (12-95 ms of a warm
    compile_train in the shipped configs)."""
    from pytensor.gradient import DisconnectedType

    from .errors import Issue, SpecError

    grads = pytensor.grad(loss, params, disconnected_inputs="ignore", return_disconnected="disconnected")
    cut = {p.name for p, g in zip(params, grads) if isinstance(g.type, DisconnectedType)}
    issues = []
    for node in network.order:
        names = [node.layer.params[s.name].name for s in node.param_specs if s.name in node.layer.params]
        if any(n in cut for n in names):
            issues.append(Issue(network.spec.locate(node.path), node.path,
                                f"layer '{node.name}' ({node.layer.type}) is not trained by the loss: "
                                "its output reaches the outputs only through an embedding's ids "
                                "(floats truncated to integers), which have no gradient; expected "
                                "each layer with parameters to reach a loss differentiably (feed "
                                "the embedding a network input of integer ids)"))
    if issues:
        raise SpecError(issues)


def compile_train(network: Network, train_config: dict, ys_like: list[np.ndarray], seed: int) -> TrainFunctions:
    """The training step: one optimizer update on a batch; its loss is the weighted total of the
    outputs' mean losses (penalties excluded)."""
    start = time.perf_counter()
    heads = network.signature.outputs
    targets = target_variables(network, ys_like)
    xs, outs, per_example, ctx = _loss_graph(network, heads, targets, True, seed)
    means = {name: value.mean() for name, value in per_example.items()}
    loss = _weighted(heads, means)
    params = network.trainable()
    try:
        grads = pytensor.grad(loss + penalty(network), params)
    except pytensor.gradient.DisconnectedInputError:
        _every_param_reaches(network, loss, params)  # says which layers, located
        raise
    grads = clip(grads, train_config.get("clip_norm"), train_config.get("clip_value"))
    optimizer = optimizers.get(train_config["optimizer"])
    updates = dict(ctx.updates)
    updates.update(optimizer.updates(params, grads))
    values, layout = _results(network, heads, loss, means, outs, ctx)
    step = function(xs + targets, values, updates, "train_step", keep_outputs=True)
    # Batches come from netbuild.data, already of the inputs' dtypes and ranks: skip PyTensor's
    # per-call input checks (a tenth of an MLP step). The C code still checks each input's type.
    step.trust_input = True
    random_step = ctx.step if ctx.step in updates else None
    return TrainFunctions(Compiled(step, *layout, mean=True), optimizer, random_step,
                          time.perf_counter() - start)


def compile_eval(network: Network, ys_like: list[np.ndarray], heads: list[Output] | None = None) -> Compiled:
    """``evaluate(*inputs, *targets)`` in inference mode (:class:`Compiled`), with the losses of
    ``heads`` (default: the spec's outputs)."""
    heads = network.signature.outputs if heads is None else heads
    targets = target_variables(network, ys_like)
    xs, outs, per_example, ctx = _loss_graph(network, heads, targets, False)
    values, layout = _results(network, heads, _weighted(heads, per_example), per_example, outs, ctx)
    fn = function(xs + targets, values, name="evaluate")
    return Compiled(fn, *layout, mean=False)


def compile_predict(network: Network) -> Callable:
    """``predict(*inputs) -> outputs`` in inference mode: the one output's array, or a list of
    one array per output (the spec's order)."""
    xs = network.input_variables()
    outs, _ = network.forward_all(xs, training=False)
    values = list(outs.values())
    return function(xs, values[0] if len(values) == 1 else values, name="predict")


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
