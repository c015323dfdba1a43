"""From a validated spec to a Network: wiring, order, static shapes, named parameters.

Layers are wired by their ``inputs`` (default: the previous layer; the model's input is called
``input``), put in topological order, and given static output shapes without building any graph,
so every shape or wiring mistake is reported, located, before anything is compiled. Parameters are
PyTensor shared variables named ``<layer name>/<param>``: the same keys as in ``model.npz``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytensor
import pytensor.tensor as pt

from . import initializers
from .errors import Issue, SpecError, did_you_mean
from .layers import REGISTRY as LAYERS
from .layers import Context, Layer, LayerError, ParamSpec
from .spec import Spec

INPUT = "input"


@dataclass
class Node:
    """One layer in the graph with its wiring and static shapes."""

    layer: Layer
    index: int
    inputs: list[str]
    input_shapes: list[tuple] = field(default_factory=list)
    output_shape: tuple = ()
    param_specs: list[ParamSpec] = field(default_factory=list)
    #: Whether the output carries the mask of a padded sequence.
    masked: bool = False

    @property
    def name(self) -> str:
        return self.layer.name

    @property
    def path(self) -> tuple:
        return ("model", "layers", self.index)

    @property
    def n_params(self) -> int:
        return sum(math.prod(p.shape) for p in self.param_specs)


def _topological(nodes: dict[str, Node]) -> tuple[list[Node], list[Node]]:
    """Kahn's algorithm, ties broken by spec order. Returns (ordered, nodes left in cycles)."""
    indeg = {n: sum(1 for i in node.inputs if i != INPUT) for n, node in nodes.items()}
    users: dict[str, list[str]] = {n: [] for n in nodes}
    for n, node in nodes.items():
        for i in node.inputs:
            if i != INPUT:
                users[i].append(n)
    ready = sorted((n for n, d in indeg.items() if d == 0), key=lambda n: nodes[n].index)
    order: list[Node] = []
    while ready:
        n = ready.pop(0)
        order.append(nodes[n])
        for u in users[n]:
            indeg[u] -= 1
            if indeg[u] == 0:
                ready.append(u)
                ready.sort(key=lambda m: nodes[m].index)
    left = {n for n, d in indeg.items() if d > 0}
    # Nodes that only hang below a cycle are not part of it: peel off those that no other
    # remaining node reads, until only cycles remain.
    changed = True
    while changed:
        changed = False
        for n in list(left):
            if not any(n in nodes[m].inputs for m in left):
                left.discard(n)
                changed = True
    return order, sorted((nodes[n] for n in left), key=lambda node: node.index)


def _named_nodes(spec: Spec) -> tuple[dict[str, Node], list[str]]:
    """One node per layer, named (``name`` or ``<type>_<index>``) and reading its ``inputs``
    (default: the previous layer). Raises for reserved and duplicate names."""
    issues: list[Issue] = []
    nodes: dict[str, Node] = {}
    names: list[str] = []
    for i, cfg in enumerate(spec.data["model"]["layers"]):
        name = cfg.get("name") or f"{cfg['type']}_{i}"
        path = ("model", "layers", i)
        if name == INPUT:
            issues.append(spec.issue(path + ("name",), f"'{INPUT}' names the model's input; "
                                                      "expected another layer name"))
        elif name in nodes:
            first = nodes[name].index
            issues.append(spec.issue(path + ("name",) if "name" in cfg else path,
                                     f"duplicate layer name '{name}' (also layer {first}); "
                                     "expected unique names"))
        inputs = list(cfg["inputs"]) if "inputs" in cfg else [names[-1] if names else INPUT]
        nodes.setdefault(name, Node(LAYERS[cfg["type"]](name, cfg), i, inputs))
        names.append(name)
    if issues:
        raise SpecError(issues)
    return nodes, names


def _check_wiring(spec: Spec, nodes: dict[str, Node], names: list[str]) -> None:
    """Every input names a layer (or the model's input) other than the reader, and each layer
    has as many inputs as its type takes."""
    issues: list[Issue] = []
    known = set(nodes) | {INPUT}
    for node in nodes.values():
        cfg = spec.data["model"]["layers"][node.index]
        for j, ref in enumerate(node.inputs):
            if ref not in known:
                others = [n for n in names_in_order(nodes) if n != node.name]
                issues.append(spec.issue(node.path + ("inputs", j),
                                         f"unknown layer '{ref}'{did_you_mean(ref, others)}; "
                                         f"expected one of: {', '.join(others)}"))
            elif ref == node.name:
                issues.append(spec.issue(node.path + ("inputs", j),
                                         f"layer '{ref}' cannot read its own output"))
        lo, hi = type(node.layer).min_inputs, type(node.layer).max_inputs
        n = len(node.inputs)
        if n < lo or (hi is not None and n > hi):
            want = f"{lo}" if hi == lo else (f"at least {lo}" if hi is None else f"{lo} to {hi}")
            where = node.path + ("inputs",) if "inputs" in cfg else node.path
            issues.append(spec.issue(where, f"'{node.layer.type}' takes {want} "
                                            f"input{'s' if want != '1' else ''}; received {n}"))
    if issues:
        raise SpecError(issues)


def _ordered(spec: Spec, nodes: dict[str, Node]) -> list[Node]:
    """The nodes in topological order; raises naming every layer of a cycle."""
    order, cyclic = _topological(nodes)
    if cyclic:
        ring = " -> ".join([n.name for n in cyclic] + [cyclic[0].name])
        raise SpecError([spec.issue(n.path + ("inputs",), f"layers form a cycle ({ring}); "
                                                          "expected each layer to read only "
                                                          "earlier results")
                         for n in cyclic])
    return order


def _infer_shapes(spec: Spec, order: list[Node], input_shape: tuple) -> None:
    """Each node's input and output shapes and parameter specs, from the layers' pure shape
    maths; a layer reading a broken one is skipped, so each mistake is reported once."""
    issues: list[Issue] = []
    shapes = {INPUT: input_shape}
    broken: set[str] = set()
    for node in order:
        if any(i in broken for i in node.inputs):
            broken.add(node.name)
            continue
        node.input_shapes = [shapes[i] for i in node.inputs]
        try:
            node.output_shape = tuple(int(d) for d in node.layer.output_shape(node.input_shapes))
            if any(d < 1 for d in node.output_shape):
                raise LayerError(f"the output shape would be {node.output_shape}, which has an "
                                 f"empty axis; the input shape is {_fmt_inputs(node.input_shapes)}")
            node.param_specs = node.layer.param_specs(node.input_shapes)
        except LayerError as exc:
            cfg = spec.data["model"]["layers"][node.index]
            where = node.path + (exc.key,) if exc.key and exc.key in cfg else node.path
            issues.append(spec.issue(where, f"layer '{node.name}': {exc}"))
            broken.add(node.name)
            continue
        shapes[node.name] = node.output_shape
    if issues:
        raise SpecError(issues)


def _infer_masks(spec: Spec, order: list[Node]) -> None:
    """Which outputs carry a padded sequence's mask (a masked output: the loss and metrics leave
    its padded steps out); a mask reaching a layer that cannot take it is a located error."""
    issues: list[Issue] = []
    masked = {INPUT: False}
    for node in order:
        try:
            node.masked = node.layer.passes_mask([masked[i] for i in node.inputs], node.input_shapes)
        except LayerError as exc:
            cfg = spec.data["model"]["layers"][node.index]
            where = node.path + (exc.key,) if exc.key and exc.key in cfg else node.path
            issues.append(spec.issue(where, f"layer '{node.name}': {exc}"))
            node.masked = False
        masked[node.name] = node.masked
    if issues:
        raise SpecError(issues)


class Network:
    """Layers in topological order with static shapes and their parameters.

    Build with :meth:`from_spec`; :meth:`forward` makes the symbolic graph for a batch.
    """

    def __init__(self, spec: Spec, input_shape: tuple, order: list[Node], output: str):
        self.spec = spec
        self.input_shape = input_shape
        self.order = order
        self.nodes = {node.name: node for node in order}
        self.output = output
        self.params: dict[str, Any] = {}

    # -- building ---------------------------------------------------------------------------
    @classmethod
    def from_spec(cls, spec: Spec, init: bool = True) -> "Network":
        """Name and wire the layers of a validated spec, order them, infer their shapes; create
        the parameters (with ``init=False`` they are not: ``netbuild check`` needs only the shapes).

        Raises :class:`SpecError` naming every layer at fault, a stage at a time.
        """
        nodes, names = _named_nodes(spec)
        _check_wiring(spec, nodes, names)
        order = _ordered(spec, nodes)
        input_shape = tuple(spec.data["model"]["input_shape"])
        _infer_shapes(spec, order, input_shape)
        _infer_masks(spec, order)
        net = cls(spec, input_shape, order, output=names[-1])
        if init:
            net.init_params(int(spec.data.get("seed", 0)))
        return net

    def init_params(self, seed: int) -> None:
        """Create every parameter from its initializer with one generator seeded by ``seed``."""
        rng = np.random.default_rng(seed)
        float_type = pytensor.config.floatX
        nodes = sorted(self.order, key=lambda n: n.index)
        for node in nodes:
            for p in node.param_specs:
                try:
                    values = initializers.initialize(p.init, rng, p.shape, p.fan_in, p.fan_out)
                except MemoryError:
                    raise self.spec.error(node.path, f"layer '{node.name}': its parameter {p.name} of "
                                                     f"shape {p.shape} does not fit in memory; "
                                                     "expected a smaller layer") from None
                var = pytensor.shared(values.astype(float_type), name=f"{node.name}/{p.name}")
                node.layer.params[p.name] = var
                self.params[var.name] = var

    # -- graph ------------------------------------------------------------------------------
    @property
    def integer_input(self) -> int | None:
        """When the input feeds an embedding: the number of valid ids (the smallest table)."""
        sizes = [node.layer.input_dim for node in self.order
                 if INPUT in node.inputs and getattr(node.layer, "integer_input", False)]
        return min(sizes) if sizes else None

    @property
    def input_dtype(self) -> str:
        return "int64" if self.integer_input else pytensor.config.floatX

    def input_variable(self, name: str = "x"):
        """A symbolic batch of inputs: shape ``(batch, *input_shape)``."""
        return pt.tensor(name=name, dtype=self.input_dtype, shape=(None,) + self.input_shape)

    def forward(self, x, training: bool, seed: int = 0) -> tuple[Any, Context]:
        """The symbolic output for the batch ``x`` and the context (updates, pre-activations).

        In training mode dropout draws from ``seed`` and a shared step counter, ``random/step``,
        whose update (one per batch) is in ``context.updates``.
        """
        step = pytensor.shared(np.asarray(0, dtype="int64"), name="random/step") if training else None
        ctx = Context(training=training, seed=seed, step=step)
        values = {INPUT: x}
        # layers other than an embedding read integer ids as numbers of the float type (PyTensor
        # would otherwise compute them in float64)
        as_float = pt.cast(x, pytensor.config.floatX) if x.dtype.startswith("int") else x
        for node in self.order:
            reads_ids = getattr(node.layer, "integer_input", False)
            inputs = [as_float if i == INPUT and not reads_ids else values[i] for i in node.inputs]
            values[node.name] = node.layer.forward(inputs, ctx)
            if node.masked:
                ctx.masks[values[node.name]] = node.layer.output_mask(inputs, ctx)
        return values[self.output], ctx

    # -- parameters -------------------------------------------------------------------------
    @property
    def output_shape(self) -> tuple:
        return self.nodes[self.output].output_shape

    @property
    def output_activation(self) -> str:
        return getattr(self.nodes[self.output].layer, "activation_name", "linear")

    def trainable(self) -> list:
        return [node.layer.params[p.name] for node in self.order for p in node.param_specs
                if p.trainable and p.name in node.layer.params]

    def n_params(self) -> int:
        return sum(node.n_params for node in self.order)

    def memory_estimate(self, batch_size: int, itemsize: int = 4) -> dict[str, int]:
        """Bytes training is expected to hold: parameters with their gradients and up to three
        optimizer slots, and every layer's output for a batch, kept for the backward pass and
        matched by its gradient."""
        params = self.n_params() * itemsize * 5
        activations = sum(math.prod(node.output_shape) for node in self.order) * batch_size * itemsize * 2
        return {"parameters": params, "activations": activations, "total": params + activations}

    def param_values(self) -> dict[str, np.ndarray]:
        """Every parameter's current value, keyed ``<layer name>/<param>``."""
        return {name: var.get_value() for name, var in self.params.items()}

    def set_param_values(self, values: dict[str, np.ndarray]) -> None:
        """Load values saved by :meth:`param_values`: the same names (KeyError for a missing one,
        ValueError for one this network does not have, as after renaming a layer) and shapes."""
        extra = sorted(set(values) - set(self.params))
        if extra:
            listed = ", ".join(f"'{k}'" for k in extra[:5]) + (" ..." if len(extra) > 5 else "")
            raise ValueError(f"holds parameters this network does not have: {listed}; expected "
                             f"the network's {len(self.params)} parameters (was a layer renamed?)")
        for name, var in self.params.items():
            if name not in values:
                raise KeyError(name)
            value = np.asarray(values[name])
            if value.shape != var.get_value(borrow=True).shape:
                raise ValueError(f"'{name}' has shape {value.shape}; expected "
                                 f"{var.get_value(borrow=True).shape}")
            var.set_value(value.astype(var.dtype))

    def summary(self) -> list[dict]:
        """One row per layer in spec order: name, type, output shape, parameters, YAML line."""
        rows = []
        for node in sorted(self.order, key=lambda n: n.index):
            loc = self.spec.locate(node.path)
            rows.append({"name": node.name, "type": node.layer.type, "inputs": node.inputs,
                         "output_shape": list(node.output_shape), "params": node.n_params,
                         "line": loc.line})
        return rows


def names_in_order(nodes: dict[str, Node]) -> list[str]:
    return [INPUT] + [n.name for n in sorted(nodes.values(), key=lambda n: n.index)]


def _fmt_inputs(shapes: list[tuple]) -> str:
    return ", ".join(str(tuple(s)) for s in shapes)
