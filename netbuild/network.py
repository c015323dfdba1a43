"""From a validated spec to a Network: wiring, order, static shapes, named parameters.

Layers are wired by their ``inputs`` (default: the previous layer; the first layer's default is
the model's input when it has one, called ``input`` in the shorthand, else each input by its name
in ``model.inputs``: see :mod:`netbuild.signature`), put in topological order, and given static
output shapes without building any graph, so every shape or wiring mistake is reported, located,
before anything is compiled. The outputs are the layers ``model.outputs`` names (default: the
last layer). Parameters are PyTensor shared variables named ``<layer name>/<param>``: the same
keys as in ``model.npz``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytensor
import pytensor.tensor as pt

from . import initializers
from . import signature as signature_mod
from .errors import Issue, SpecError, did_you_mean
from .layers import REGISTRY as LAYERS
from .layers import Context, Layer, LayerError, ParamSpec
from .signature import INPUT, Signature
from .spec import Spec


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
    """Kahn's algorithm, ties broken by spec order. Returns (ordered, nodes left in cycles).
    Whatever is not a node (the model's inputs) is a source."""
    indeg = {n: sum(1 for i in node.inputs if i in nodes) for n, node in nodes.items()}
    users: dict[str, list[str]] = {n: [] for n in nodes}
    for n, node in nodes.items():
        for i in node.inputs:
            if i in nodes:
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


def _named_nodes(spec: Spec, signature: Signature) -> tuple[dict[str, Node], list[str]]:
    """One node per layer, named (``name`` or ``<type>_<index>``) and reading its ``inputs``
    (default: the previous layer; for the first, the model's only input). Raises for names of
    the model's inputs, duplicate names, and a first layer that does not say which of several
    inputs it reads."""
    issues: list[Issue] = []
    nodes: dict[str, Node] = {}
    names: list[str] = []
    inputs = [i.name for i in signature.inputs]
    for i, cfg in enumerate(spec.data["model"]["layers"]):
        name = cfg.get("name") or f"{cfg['type']}_{i}"
        path = ("model", "layers", i)
        if not names and "inputs" not in cfg and len(inputs) > 1:
            issues.append(spec.issue(path, f"layer '{name}' is the first layer and names no inputs; "
                                           f"the model has {len(inputs)} inputs, expected inputs: "
                                           f"naming one or more of {', '.join(inputs)}"))
        if name in inputs:
            what = "the model's input" if signature.shorthand_inputs else "one of the model's inputs"
            issues.append(spec.issue(path + ("name",), f"'{name}' names {what}; "
                                                      "expected another layer name"))
        elif name in nodes:
            first = nodes[name].index
            issues.append(spec.issue(path + ("name",) if "name" in cfg else path,
                                     f"duplicate layer name '{name}' (also layer {first}); "
                                     "expected unique names"))
        reads = list(cfg["inputs"]) if "inputs" in cfg else [names[-1] if names else inputs[0]]
        nodes.setdefault(name, Node(LAYERS[cfg["type"]](name, cfg), i, reads))
        names.append(name)
    if issues:
        raise SpecError(issues)
    return nodes, names


def _check_wiring(spec: Spec, signature: Signature, nodes: dict[str, Node]) -> None:
    """Every input names a layer (or one of the model's inputs) other than the reader, and each
    layer has as many inputs as its type takes."""
    issues: list[Issue] = []
    sources = [i.name for i in signature.inputs]
    known = set(nodes) | set(sources)
    for node in nodes.values():
        cfg = spec.data["model"]["layers"][node.index]
        for j, ref in enumerate(node.inputs):
            if ref not in known:
                others = [n for n in names_in_order(nodes, sources) if n != node.name]
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


def _check_outputs(spec: Spec, signature: Signature, nodes: dict[str, Node],
                   names: list[str]) -> dict[str, str]:
    """``{output name: layer}`` (the shorthand's output is the last layer's); each output names
    a layer, a layer no other output names, and each of the model's inputs is read."""
    issues: list[Issue] = []
    layers: dict[str, str] = {}
    inputs = [i.name for i in signature.inputs]
    for out in signature.outputs:
        layer = names[-1] if out.layer is None else out.layer
        where = out.path + ("layer",)
        if layer in inputs:
            issues.append(spec.issue(where, f"'{layer}' is one of the model's inputs; expected a "
                                            f"layer: {', '.join(names)}"))
        elif layer not in nodes:
            issues.append(spec.issue(where, f"unknown layer '{layer}'{did_you_mean(layer, names)}; "
                                            f"expected one of: {', '.join(names)}"))
        elif layer in layers.values():
            first = next(o for o, lay in layers.items() if lay == layer)
            issues.append(spec.issue(where, f"layer '{layer}' is already the output '{first}'; "
                                            "expected each output to name a layer of its own"))
        layers[out.name] = layer
    for inp in signature.inputs:
        if not any(inp.name in node.inputs for node in nodes.values()):
            issues.append(spec.issue(inp.path, f"input '{inp.name}' is read by no layer; expected "
                                               "a layer to name it in its inputs (or no such input)"))
    issues += _name_issues(spec, signature)
    if issues:
        raise SpecError(issues)
    return layers


def _name_issues(spec: Spec, signature: Signature) -> list[Issue]:
    """Outputs whose names or keys would collide: with an input's name, with the validation
    records (``val``, ``val_...``), with another output's predictions (one npz key) or records
    (``a`` + ``top_k_accuracy`` and ``a_top_k`` + ``accuracy``)."""
    issues: list[Issue] = []
    if signature.shorthand_outputs:
        return issues
    inputs = {i.name for i in signature.inputs}
    keys: dict[str, str] = {}
    records: dict[str, str] = {}
    for out in signature.outputs:
        if out.name in inputs:
            issues.append(spec.issue(out.path, f"output '{out.name}' has the name of an input; "
                                               "expected output names apart from the inputs'"))
        elif out.name == "val" or out.name.startswith("val_"):
            issues.append(spec.issue(out.path, f"output '{out.name}': its records would read as "
                                               "validation records (val_...); expected a name that "
                                               "is not val and does not start with val_"))
        elif out.key in keys:
            issues.append(spec.issue(out.path, f"output '{out.name}' writes its predictions under "
                                               f"the key '{out.key}', as output '{keys[out.key]}' "
                                               "does; expected a key of its own"))
        else:
            for record in out.keys():
                if record in records:
                    issues.append(spec.issue(out.path, f"output '{out.name}' records "
                                                       f"'{record}', as output '{records[record]}' "
                                                       "does; expected outputs whose records differ"))
                    break
                records[record] = out.name
        keys.setdefault(out.key, out.name)
    return issues


def _infer_shapes(spec: Spec, order: list[Node], input_shapes: dict[str, tuple]) -> None:
    """Each node's input and output shapes and parameter specs, from the layers' pure shape
    maths; a layer reading a broken one is skipped, so each mistake is reported once."""
    issues: list[Issue] = []
    shapes = dict(input_shapes)
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


def _infer_masks(spec: Spec, order: list[Node], sources: list[str]) -> None:
    """Which outputs carry a padded sequence's mask (a masked output: the loss and metrics leave
    its padded steps out); a mask reaching a layer that cannot take it is a located error."""
    issues: list[Issue] = []
    masked = dict.fromkeys(sources, False)
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
    """Layers in topological order with static shapes and their parameters, and the model's
    inputs and outputs (:attr:`signature`).

    Build with :meth:`from_spec`; :meth:`forward_all` makes the symbolic graph of every output
    for a batch of every input (:meth:`forward`: of the one output, from the one input).
    """

    def __init__(self, spec: Spec, signature: Signature, order: list[Node], outputs: dict[str, str]):
        self.spec = spec
        self.signature = signature
        self.inputs = {i.name: i.shape for i in signature.inputs}
        self.order = order
        self.nodes = {node.name: node for node in order}
        #: ``{output name: the layer that produces it}``, in the spec's order.
        self.outputs = outputs
        self.params: dict[str, Any] = {}

    # -- building ---------------------------------------------------------------------------
    @classmethod
    def from_spec(cls, spec: Spec, init: bool = True) -> "Network":
        """Name and wire the layers of a validated spec, order them, check its outputs, infer
        their shapes; create the parameters (with ``init=False`` they are not: ``netbuild check``
        needs only the shapes).

        Raises :class:`SpecError` naming every layer at fault, a stage at a time.
        """
        signature = signature_mod.of(spec)
        nodes, names = _named_nodes(spec, signature)
        _check_wiring(spec, signature, nodes)
        order = _ordered(spec, nodes)
        outputs = _check_outputs(spec, signature, nodes, names)
        _infer_shapes(spec, order, {i.name: i.shape for i in signature.inputs})
        _infer_masks(spec, order, [i.name for i in signature.inputs])
        net = cls(spec, signature, order, outputs)
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

    # -- inputs and outputs -----------------------------------------------------------------
    @staticmethod
    def _only(what: dict, kind: str) -> str:
        if len(what) != 1:
            raise ValueError(f"this network has {len(what)} {kind}s ({', '.join(what)}); name one")
        return next(iter(what))

    def only_input(self) -> str:
        """The name of the only input (ValueError when there are several)."""
        return self._only(self.inputs, "input")

    def only_output(self) -> str:
        """The name of the only output (ValueError when there are several)."""
        return self._only(self.outputs, "output")

    @property
    def input_shape(self) -> tuple:
        """One example's shape of the only input."""
        return self.inputs[self.only_input()]

    def integer_input(self, name: str | None = None) -> int | None:
        """When the input ``name`` (default: the only one) feeds an embedding: the number of
        valid ids (the smallest table)."""
        name = self.only_input() if name is None else name
        sizes = [node.layer.input_dim for node in self.order
                 if name in node.inputs and getattr(node.layer, "integer_input", False)]
        return min(sizes) if sizes else None

    def input_dtype(self, name: str | None = None) -> str:
        return "int64" if self.integer_input(name) else pytensor.config.floatX

    def input_variable(self, name: str | None = None, label: str = "x"):
        """A symbolic batch of the input ``name`` (default: the only one), ``(batch, *shape)``,
        named ``label``."""
        name = self.only_input() if name is None else name
        return pt.tensor(name=label, dtype=self.input_dtype(name), shape=(None,) + self.inputs[name])

    def input_variables(self) -> list:
        """One symbolic batch per input, in the spec's order (named ``x`` in the shorthand, else
        by the inputs' names)."""
        if self.signature.shorthand_inputs:
            return [self.input_variable()]
        return [self.input_variable(name, name) for name in self.inputs]

    def forward(self, x, training: bool, seed: int = 0) -> tuple[Any, Context]:
        """The symbolic output of the one output for the batch ``x`` of the one input, and the
        context; see :meth:`forward_all`."""
        self.only_output()
        outs, ctx = self.forward_all([x], training, seed)
        return next(iter(outs.values())), ctx

    def forward_all(self, xs: list, training: bool, seed: int = 0) -> tuple[dict[str, Any], Context]:
        """``({output name: symbolic output}, context)`` for the batches ``xs`` (one per input,
        in the spec's order); the context holds the updates, pre-activations and masks.

        In training mode dropout draws from ``seed`` and a shared step counter, ``random/step``,
        whose update (one per batch) is in ``context.updates``.
        """
        if len(xs) != len(self.inputs):
            raise ValueError(f"this network has {len(self.inputs)} inputs; received {len(xs)}")
        step = pytensor.shared(np.asarray(0, dtype="int64"), name="random/step") if training else None
        ctx = Context(training=training, seed=seed, step=step)
        values = dict(zip(self.inputs, xs))
        # layers other than an embedding read integer ids as numbers of the float type (PyTensor
        # would otherwise compute them in float64)
        as_float = {name: pt.cast(x, pytensor.config.floatX) if x.dtype.startswith("int") else x
                    for name, x in values.items()}
        for node in self.order:
            reads_ids = getattr(node.layer, "integer_input", False)
            inputs = [as_float[i] if i in as_float and not reads_ids else values[i]
                      for i in node.inputs]
            values[node.name] = node.layer.forward(inputs, ctx)
            if node.masked:
                ctx.masks[values[node.name]] = node.layer.output_mask(inputs, ctx)
        return {name: values[layer] for name, layer in self.outputs.items()}, ctx

    @property
    def output(self) -> str:
        """The layer of the only output."""
        return self.outputs[self.only_output()]

    @property
    def output_shape(self) -> tuple:
        return self.nodes[self.output].output_shape

    @property
    def output_activation(self) -> str:
        return self.activation_of(self.output)

    def activation_of(self, layer: str) -> str:
        return getattr(self.nodes[layer].layer, "activation_name", "linear")

    def output_shapes(self) -> dict[str, tuple]:
        return {name: self.nodes[layer].output_shape for name, layer in self.outputs.items()}

    # -- parameters -------------------------------------------------------------------------

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
        return {name: np.asarray(var.get_value()) for name, var in self.params.items()}  # JAX's too

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


def names_in_order(nodes: dict[str, Node], sources: list[str] = (INPUT,)) -> list[str]:
    """The model's inputs, then the layers in spec order."""
    return list(sources) + [n.name for n in sorted(nodes.values(), key=lambda n: n.index)]


def _fmt_inputs(shapes: list[tuple]) -> str:
    return ", ".join(str(tuple(s)) for s in shapes)
