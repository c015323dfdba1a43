"""ONNX export: a Network with its parameters -> an ONNX model computing what ``netbuild predict``
writes.

The graph is built from the Network, layer by layer, not from the PyTensor graph: each layer type
has one exporter in :data:`EXPORTERS` (keyed by its YAML ``type``, as the layer registry is) that
turns the built layer into ONNX nodes, and each activation one in :data:`ACTIVATIONS`. What ONNX
cannot express is a located error naming the layer and its spec line; nothing is written then.

The model has one input ``x`` of shape ``(batch, *model.input_shape)`` (float32, or int64 ids when
the input feeds an ``embedding``), the batch axis dynamic, and one output ``y`` of shape
``(batch, *output shape)``, float32: the network in inference mode (dropout the identity, batch
norm with its running statistics). A model with ``model.inputs`` has one graph input per input,
named as the input; with ``model.outputs``, one graph output per output, named as the output. Initializers carry the parameters' names,
``<layer name>/<param>``; a recurrent layer's weights, laid out as ONNX's RNN, LSTM and GRU
operators take them (gates in ONNX's order, both directions stacked), are ``<layer name>/W``,
``/R`` and ``/B``. The metadata holds the netbuild version and the resolved spec.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import numpy as np

from .. import __version__, activations
from ..errors import MissingExtra, SpecError
from ..layers import LayerError
from ..layers.attention import sinusoids
from ..network import Network, Node
from ..registry import lookup
from ..spec import Spec
from . import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET  # noqa: F401  (part of this module's API)

#: A graph larger than this cannot be one protobuf file (its limit is 2 GiB).
MAX_BYTES = 2**31 - 2**20


def require_onnx():
    """The ``onnx`` module, or :class:`MissingExtra` saying how to install it."""
    try:
        import onnx
    except ImportError:
        raise MissingExtra("onnx", "onnx and onnxruntime", "ONNX export") from None
    return onnx


class Unsupported(LayerError):
    """A layer (``key``: the spec key at fault) that ONNX cannot express as netbuild computes it."""


class Graph:
    """The nodes and initializers of the graph being built, every tensor name unique."""

    def __init__(self, onnx, reserved: list[str], integer_inputs: list[str], opset: int = DEFAULT_OPSET):
        self.onnx = onnx
        self.opset = opset
        self.nodes: list = []
        self.initializers: list = []
        self._names: set[str] = set(reserved)  # the graph's inputs and outputs
        #: Tensors holding integer ids (the inputs that feed an embedding).
        self._integer: set[str] = set(integer_inputs)
        self._scalars: dict[tuple, str] = {}

    def is_integer(self, name: str) -> bool:
        return name in self._integer

    def name(self, hint: str) -> str:
        """``hint``, or ``hint_2``, ``hint_3``... when it is taken."""
        name, k = hint, 1
        while name in self._names:
            k += 1
            name = f"{hint}_{k}"
        self._names.add(name)
        return name

    def tensor(self, hint: str, value: np.ndarray, doc: str = "") -> str:
        """An initializer holding ``value`` (float arrays as float32)."""
        value = np.asarray(value)
        if value.dtype.kind == "f":
            value = value.astype(np.float32)
        proto = self.onnx.numpy_helper.from_array(np.ascontiguousarray(value), self.name(hint))
        if doc:
            proto.doc_string = doc
        self.initializers.append(proto)
        return proto.name

    def param(self, node: Node, name: str) -> str:
        """The layer's parameter ``name`` as the initializer ``<layer name>/<name>``."""
        return self.tensor(f"{node.name}/{name}", value(node, name))

    def ints(self, hint: str, values) -> str:
        return self.tensor(hint, np.asarray(values, dtype=np.int64))

    def scalar(self, hint: str, value: float) -> str:
        """A float32 scalar initializer, one per value however many nodes read it."""
        key = (hint, float(value))
        if key not in self._scalars:
            self._scalars[key] = self.tensor(hint, np.float32(value))
        return self._scalars[key]

    def op(self, op_type: str, inputs: list[str], hint: str, n_outputs: int = 1,
           output: str | None = None, **attrs) -> Any:
        """Add one node; returns its output name (a list of names when ``n_outputs`` > 1);
        ``output`` names the single output exactly (the graph's ``y``)."""
        outputs = [output] if output else \
            [self.name(hint if n_outputs == 1 else f"{hint}/{i}") for i in range(n_outputs)]
        attrs = {k: v for k, v in attrs.items() if v is not None}
        self.nodes.append(self.onnx.helper.make_node(op_type, inputs, outputs,
                                                     name=self.name(f"{hint}/{op_type}"), **attrs))
        return outputs[0] if n_outputs == 1 else outputs


def value(node: Node, name: str) -> np.ndarray:
    """The current value of a layer's parameter."""
    return np.asarray(node.layer.params[name].get_value(), dtype=np.float32)


# -- activations --------------------------------------------------------------------------------
def _unary(op_type: str, **fixed) -> Callable:
    def export(g: Graph, x: str, hint: str, **_) -> str:
        return g.op(op_type, [x], hint, **fixed)
    return export


def _leaky_relu(g, x, hint, alpha: float = 0.2, **_):
    return g.op("LeakyRelu", [x], hint, alpha=float(alpha))


def _elu(g, x, hint, alpha: float = 1.0, **_):
    return g.op("Elu", [x], hint, alpha=float(alpha))


def _gelu(g, x, hint, **_):
    """The exact GELU, ``0.5 * x * (1 + erf(x / sqrt(2)))``, as netbuild writes it (ONNX's own
    Gelu needs opset 20)."""
    erf = g.op("Erf", [g.op("Div", [x, g.scalar("sqrt2", np.sqrt(2.0))], f"{hint}/scaled")], f"{hint}/erf")
    half_x = g.op("Mul", [g.scalar("half", 0.5), x], f"{hint}/half")
    return g.op("Mul", [half_x, g.op("Add", [g.scalar("one", 1.0), erf], f"{hint}/1+erf")], hint)


def _swish(g, x, hint, **_):
    return g.op("Mul", [x, g.op("Sigmoid", [x], f"{hint}/sigmoid")], hint)


def _linear(g, x, hint, **_):
    return x


#: One exporter per activation name: ``(graph, x, hint, **options) -> output``.
ACTIVATIONS: dict[str, Callable] = {
    "linear": _linear,
    "sigmoid": _unary("Sigmoid"),
    "hard_sigmoid": _unary("HardSigmoid", alpha=1.0 / 6.0, beta=0.5),
    "tanh": _unary("Tanh"),
    "relu": _unary("Relu"),
    "leaky_relu": _leaky_relu,
    "elu": _elu,
    "selu": _unary("Selu", alpha=activations.SELU_ALPHA, gamma=activations.SELU_SCALE),
    "gelu": _gelu,
    "softplus": _unary("Softplus"),
    "softsign": _unary("Softsign"),
    "swish": _swish,
    "softmax": _unary("Softmax", axis=-1),
    "log_softmax": _unary("LogSoftmax", axis=-1),
}


def activate(g: Graph, config: Any, x: str, hint: str) -> str:
    fn, options = lookup(ACTIVATIONS, config, "activation")
    return fn(g, x, hint, **options)


def _activated(g: Graph, node: Node, z: str) -> str:
    return activate(g, node.layer.activation, z, node.name)


# -- layers ---------------------------------------------------------------------------------------
def dense(g: Graph, node: Node, xs: list[str]) -> str:
    """``x @ W + b`` on the last axis of any rank (MatMul broadcasts the leading axes)."""
    z = g.op("MatMul", [xs[0], g.param(node, "W")], f"{node.name}/matmul")
    if "b" in node.layer.params:
        z = g.op("Add", [z, g.param(node, "b")], f"{node.name}/linear")
    return _activated(g, node, z)


def _pads(win) -> list[int]:
    """ONNX's ``pads``: every axis's zeros before, then every axis's zeros after."""
    return [b for b, _ in win.pads] + [a for _, a in win.pads]


def conv(g: Graph, node: Node, xs: list[str]) -> str:
    """Conv, with netbuild's (PyTorch's) kernel layout ``(filters, channels, *kernel)``."""
    win = node.layer.geometry(node.input_shapes[0])
    inputs = [xs[0], g.param(node, "W")] + ([g.param(node, "b")] if "b" in node.layer.params else [])
    z = g.op("Conv", inputs, f"{node.name}/conv", kernel_shape=list(win.kernel),
             strides=list(win.strides), dilations=list(win.dilation), pads=_pads(win))
    return _activated(g, node, z)


def conv_transpose(g: Graph, node: Node, xs: list[str]) -> str:
    """ConvTranspose with the layout netbuild's (torch's) ``W (channels, filters, *kernel)``;
    ``output_padding`` makes up whatever the pads leave short of netbuild's output length."""
    layer = node.layer
    geo = layer.geometry(node.input_shapes[0])
    extra = [out - (s * (n - 1) + d * (k - 1) + 1 - b - a)
             for out, n, k, s, d, (b, a) in zip(geo.out, node.input_shapes[0][1:], geo.kernel,
                                                geo.strides, geo.dilation, geo.pads)]
    inputs = [xs[0], g.param(node, "W")] + ([g.param(node, "b")] if "b" in layer.params else [])
    z = g.op("ConvTranspose", inputs, f"{node.name}/conv_transpose", kernel_shape=list(geo.kernel),
             strides=list(geo.strides), dilations=list(geo.dilation),
             pads=[b for b, _ in geo.pads] + [a for _, a in geo.pads], output_padding=extra)
    return _activated(g, node, z)


def _grouped(g: Graph, node: Node, x: str, weight: str, bias: str | None, hint: str) -> str:
    """A convolution with one group per input channel (depthwise), as netbuild slides it."""
    win = node.layer.geometry(node.input_shapes[0])
    inputs = [x, g.param(node, weight)] + ([g.param(node, bias)] if bias else [])
    return g.op("Conv", inputs, hint, group=int(node.input_shapes[0][0]), kernel_shape=list(win.kernel),
                strides=list(win.strides), dilations=list(win.dilation), pads=_pads(win))


def depthwise_conv(g: Graph, node: Node, xs: list[str]) -> str:
    bias = "b" if "b" in node.layer.params else None
    return _activated(g, node, _grouped(g, node, xs[0], "W", bias, f"{node.name}/depthwise"))


def separable_conv(g: Graph, node: Node, xs: list[str]) -> str:
    mid = _grouped(g, node, xs[0], "W_depthwise", None, f"{node.name}/depthwise")
    inputs = [mid, g.param(node, "W_pointwise")] + ([g.param(node, "b")] if "b" in node.layer.params else [])
    z = g.op("Conv", inputs, f"{node.name}/pointwise", kernel_shape=[1, 1])
    return _activated(g, node, z)


def pool(g: Graph, node: Node, xs: list[str]) -> str:
    """MaxPool or AveragePool with explicit pads; padding never takes part (``count_include_pad``
    0: an average divides by the input elements of its window)."""
    win = node.layer.geometry(node.input_shapes[0])
    attrs = dict(kernel_shape=list(win.kernel), strides=list(win.strides), pads=_pads(win))
    if node.layer.mode == "max":
        return g.op("MaxPool", xs, node.name, **attrs)
    return g.op("AveragePool", xs, node.name, count_include_pad=0, **attrs)


def global_pool(g: Graph, node: Node, xs: list[str]) -> str:
    """Over every axis after the channels: ``(N, C, ...)`` -> ``(N, C, 1, ...)`` -> ``(N, C)``;
    with ``axis``, a ReduceMax or ReduceMean over those axes."""
    layer = node.layer
    if layer.axis is None:
        op_type = "GlobalMaxPool" if layer.mode == "max" else "GlobalAveragePool"
        return g.op("Flatten", [g.op(op_type, xs, f"{node.name}/pool")], node.name, axis=1)
    axes = [1 + i for i in layer.pooled(node.input_shapes[0])]
    op_type = "ReduceMax" if layer.mode == "max" else "ReduceMean"
    # the axes are an input from opset 18 on (ReduceMax: 18, ReduceMean: 18), an attribute before
    if g.opset >= 18:
        return g.op(op_type, [xs[0], g.ints(f"{node.name}/axes", axes)], node.name, keepdims=0)
    return g.op(op_type, xs, node.name, axes=axes, keepdims=0)


def batch_norm(g: Graph, node: Node, xs: list[str]) -> str:
    """BatchNormalization with the running statistics (inference mode)."""
    channels = node.input_shapes[0][0]
    params = node.layer.params
    scale = g.param(node, "gamma") if "gamma" in params else g.tensor(f"{node.name}/ones", np.ones(channels))
    bias = g.param(node, "beta") if "beta" in params else g.tensor(f"{node.name}/zeros", np.zeros(channels))
    return g.op("BatchNormalization", [xs[0], scale, bias, g.param(node, "mean"), g.param(node, "var")],
                node.name, epsilon=float(node.layer.epsilon))


def layer_norm(g: Graph, node: Node, xs: list[str]) -> str:
    features = node.input_shapes[0][-1]
    params = node.layer.params
    scale = g.param(node, "gamma") if "gamma" in params else g.tensor(f"{node.name}/ones", np.ones(features))
    inputs = [xs[0], scale] + ([g.param(node, "beta")] if "beta" in params else [])
    return g.op("LayerNormalization", inputs, node.name, axis=-1,
                epsilon=float(node.layer.epsilon))


def masking(g: Graph, node: Node, xs: list[str]) -> str:
    raise Unsupported("the masks of padded sequences are not exported to ONNX yet; expected a "
                      "network without masking layers (or embeddings with mask_zero)")


def embedding(g: Graph, node: Node, xs: list[str]) -> str:
    """Gather rows of ``W``; float ids are truncated to integers first, as netbuild does."""
    if node.layer.mask_zero:
        raise Unsupported("the masks of padded sequences are not exported to ONNX yet; expected "
                          "mask_zero: false", key="mask_zero")
    ids = xs[0] if g.is_integer(xs[0]) else g.op("Cast", xs, f"{node.name}/ids",
                                                  to=g.onnx.TensorProto.INT64)
    return g.op("Gather", [g.param(node, "W"), ids], node.name, axis=0)


def dropout(g: Graph, node: Node, xs: list[str]) -> str:
    return xs[0]  # the identity outside training


def flatten(g: Graph, node: Node, xs: list[str]) -> str:
    return g.op("Flatten", xs, node.name, axis=1)


def reshape(g: Graph, node: Node, xs: list[str]) -> str:
    shape = g.ints(f"{node.name}/shape", [0] + list(node.layer.shape))  # 0: the batch
    return g.op("Reshape", [xs[0], shape], node.name)


def permute(g: Graph, node: Node, xs: list[str]) -> str:
    return g.op("Transpose", xs, node.name, perm=[0] + list(node.layer.dims))


def sides(g: Graph, node: Node, xs: list[str]) -> str:
    """Pad with zeros, or Slice the sides off."""
    amounts = node.layer.sides()
    if node.layer.sign > 0:
        pads = [0, 0] + [b for b, _ in amounts] + [0, 0] + [a for _, a in amounts]
        return g.op("Pad", [xs[0], g.ints(f"{node.name}/pads", pads)], node.name, mode="constant")
    lengths = node.input_shapes[0][1:]
    starts = [b for b, _ in amounts]
    ends = [n - a for n, (_, a) in zip(lengths, amounts)]
    axes = list(range(2, 2 + len(amounts)))
    return g.op("Slice", [xs[0], g.ints(f"{node.name}/starts", starts), g.ints(f"{node.name}/ends", ends),
                          g.ints(f"{node.name}/axes", axes)], node.name)


def upsampling(g: Graph, node: Node, xs: list[str]) -> str:
    """nearest: each value broadcast over a new axis of ``size`` after its own, then the pairs
    merged; linear and bilinear: one MatMul per axis by the same interpolation matrices netbuild
    multiplies by."""
    layer = node.layer
    shape = node.input_shapes[0]
    factors = layer.factors()
    if layer.interpolation == "nearest":
        split = [0, 0] + [d for n in shape[1:] for d in (n, 1)]
        grown = [1, 1] + [d for f in factors for d in (1, f)]
        x = g.op("Reshape", [xs[0], g.ints(f"{node.name}/split", split)], f"{node.name}/split")
        x = g.op("Expand", [x, g.ints(f"{node.name}/grown", grown)], f"{node.name}/repeated")
        out = [0, 0] + [n * f for n, f in zip(shape[1:], factors)]
        return g.op("Reshape", [x, g.ints(f"{node.name}/shape", out)], node.name)
    y = xs[0]
    matrices = layer.matrices()
    for i, A in enumerate(matrices):  # (N, C, H, W): MatMul(y, A_w^T) on the last axis, A_h @ y before it
        axis = 2 + i
        last = axis == 1 + len(matrices)
        hint = node.name if i == len(matrices) - 1 else f"{node.name}/axis{axis}"
        if last:
            y = g.op("MatMul", [y, g.tensor(f"{node.name}/interpolation{axis}", A.T)], hint)
        else:
            y = g.op("MatMul", [g.tensor(f"{node.name}/interpolation{axis}", A), y], hint)
    return y


def attention(g: Graph, node: Node, xs: list[str]) -> str:
    """Multi-head attention from MatMul, Softmax and reshapes, in netbuild's order of operations."""
    layer = node.layer
    tq, _, tk, _, dk, dv = layer.dims(node.input_shapes)
    h = int(layer.num_heads)

    def project(x: str, which: str, dim: int) -> str:  # (N, T, E) -> (N, h, T, dim)
        w = value(node, f"W_{which}")
        y = g.op("MatMul", [x, g.tensor(f"{node.name}/W_{which}", w.T, f"W_{which} transposed")],
                 f"{node.name}/{which}")
        if f"b_{which}" in layer.params:
            y = g.op("Add", [y, g.param(node, f"b_{which}")], f"{node.name}/{which}_biased")
        y = g.op("Reshape", [y, g.ints(f"{node.name}/{which}_heads", [0, 0, h, dim])], f"{node.name}/{which}_split")
        return g.op("Transpose", [y], f"{node.name}/{which}_by_head", perm=[0, 2, 1, 3])

    q, k, v = project(xs[0], "q", dk), project(xs[-1], "k", dk), project(xs[-1], "v", dv)
    kt = g.op("Transpose", [k], f"{node.name}/k_t", perm=[0, 1, 3, 2])
    scores = g.op("Mul", [g.op("MatMul", [q, kt], f"{node.name}/qk"),
                          g.scalar(f"{node.name}/scale", 1.0 / np.sqrt(dk))], f"{node.name}/scores")
    if layer.causal:
        allowed = g.tensor(f"{node.name}/causal", np.tril(np.ones((1, 1, tq, tk), dtype=bool)))
        scores = g.op("Where", [allowed, scores, g.scalar("minus_infinity", -np.inf)],
                      f"{node.name}/masked")
    weights = g.op("Softmax", [scores], f"{node.name}/weights", axis=-1)
    out = g.op("Transpose", [g.op("MatMul", [weights, v], f"{node.name}/av")], f"{node.name}/by_step",
               perm=[0, 2, 1, 3])
    out = g.op("Reshape", [out, g.ints(f"{node.name}/merged", [0, 0, h * dv])], f"{node.name}/merged")
    y = g.op("MatMul", [out, g.tensor(f"{node.name}/W_o", value(node, "W_o").T, "W_o transposed")],
             node.name if "b_o" not in layer.params else f"{node.name}/out")
    return g.op("Add", [y, g.param(node, "b_o")], node.name) if "b_o" in layer.params else y


def positional(g: Graph, node: Node, xs: list[str]) -> str:
    layer = node.layer
    t, e = node.input_shapes[0]
    if layer.encoding == "learned":
        table = value(node, "W")[:t]
    else:
        table = sinusoids(t, e)
    return g.op("Add", [xs[0], g.tensor(f"{node.name}/W", table[None], "the positions' vectors")], node.name)


def activation(g: Graph, node: Node, xs: list[str]) -> str:
    return _activated(g, node, xs[0])


def _chain(op_type: str) -> Callable:
    def export(g: Graph, node: Node, xs: list[str]) -> str:
        out = xs[0]
        for i, x in enumerate(xs[1:], start=2):  # left to right, as netbuild sums
            out = g.op(op_type, [out, x], node.name if i == len(xs) else f"{node.name}/{i}")
        return out
    return export


def concatenate(g: Graph, node: Node, xs: list[str]) -> str:
    axis = 1 + node.layer.example_axis(len(node.input_shapes[0]))
    return g.op("Concat", xs, node.name, axis=axis)


#: netbuild's gate blocks in the order of ONNX's operator: LSTM i, f, g, o -> i, o, f, c;
#: GRU r, z, n -> z, r, h.
GATE_ORDER = {"simple_rnn": [0], "lstm": [0, 3, 1, 2], "gru": [1, 0, 2]}
RECURRENT_OPS = {"simple_rnn": "RNN", "lstm": "LSTM", "gru": "GRU"}

#: netbuild activations as ONNX's recurrent operators name them: ``options -> (name, alpha, beta)``
#: (alpha and beta given only where the function takes them).
RECURRENT_ACTIVATIONS: dict[str, Callable[..., tuple]] = {
    "linear": lambda **_: ("Affine", 1.0, 0.0),
    "sigmoid": lambda **_: ("Sigmoid", None, None),
    "hard_sigmoid": lambda **_: ("HardSigmoid", 1.0 / 6.0, 0.5),
    "tanh": lambda **_: ("Tanh", None, None),
    "relu": lambda **_: ("Relu", None, None),
    "leaky_relu": lambda alpha=0.2, **_: ("LeakyRelu", float(alpha), None),
    "elu": lambda alpha=1.0, **_: ("Elu", float(alpha), None),
    "softsign": lambda **_: ("Softsign", None, None),
    "softplus": lambda **_: ("Softplus", None, None),
}


def _recurrent_activation(layer, key: str, default: str) -> tuple:
    config = getattr(layer, key, None) or default
    try:
        fn, options = lookup(RECURRENT_ACTIVATIONS, config, "activation")
    except KeyError:
        name = config["type"] if isinstance(config, dict) else config
        raise Unsupported(f"its {key} '{name}' has no form in ONNX's {RECURRENT_OPS[layer.type]} "
                          f"operator; expected one of: {', '.join(RECURRENT_ACTIVATIONS)}",
                          key=key) from None
    return fn(**options)


def recurrent(g: Graph, node: Node, xs: list[str]) -> str:
    """ONNX's RNN, LSTM or GRU operator on the time-major sequence (torch-style GRU:
    ``linear_before_reset``); ``go_backwards`` reverses the sequence first. The outputs are laid
    out as netbuild's: the sequence ``(N, T, directions * units)`` or the final states
    ``(N, directions * units)``, directions side by side on the feature axis."""
    layer = node.layer
    units, order = layer.units, GATE_ORDER[layer.type]

    def gates(a: np.ndarray) -> np.ndarray:
        return np.concatenate([a[..., k * units:(k + 1) * units] for k in order], axis=-1)

    W = np.stack([gates(value(node, "W_ih" + s)).T for s in layer.directions])
    R = np.stack([gates(value(node, "W_hh" + s)).T for s in layer.directions])
    B = np.stack([np.concatenate([gates(value(node, "b_ih" + s)), gates(value(node, "b_hh" + s))])
                  for s in layer.directions])
    act = _recurrent_activation(layer, "activation", "tanh")
    funcs = {"simple_rnn": [act],
             "lstm": [_recurrent_activation(layer, "recurrent_activation", "sigmoid"), act, act],
             "gru": [_recurrent_activation(layer, "recurrent_activation", "sigmoid"), act]}[layer.type]
    funcs = funcs * len(layer.directions)
    names = [f[0] for f in funcs]
    alphas = [f[1] for f in funcs if f[1] is not None]
    betas = [f[2] for f in funcs if f[2] is not None]

    x = g.op("Transpose", xs, f"{node.name}/time_major", perm=[1, 0, 2])
    if layer.go_backwards:
        x = g.op("Slice", [x, g.ints(f"{node.name}/last", [-1]), g.ints(f"{node.name}/before_first",
                                                                        [np.iinfo(np.int64).min]),
                           g.ints(f"{node.name}/time_axis", [0]), g.ints(f"{node.name}/back", [-1])],
                 f"{node.name}/reversed")
    sequences = layer.return_sequences
    doc = "netbuild's {} transposed, gate blocks in ONNX's order ({}), directions stacked"
    gate_names = {"simple_rnn": "one gate", "lstm": "i, o, f, c", "gru": "z, r, h"}[layer.type]
    inputs = [x, g.tensor(f"{node.name}/W", W, doc.format("W_ih", gate_names)),
              g.tensor(f"{node.name}/R", R, doc.format("W_hh", gate_names)),
              g.tensor(f"{node.name}/B", B, f"netbuild's b_ih then b_hh, gate blocks in ONNX's "
                                            f"order ({gate_names}), directions stacked")]
    outputs = g.op(RECURRENT_OPS[layer.type], inputs, f"{node.name}/{RECURRENT_OPS[layer.type]}",
                   n_outputs=2, hidden_size=units,
                   direction="bidirectional" if len(layer.directions) == 2 else "forward",
                   activations=names, activation_alpha=alphas or None, activation_beta=betas or None,
                   linear_before_reset=1 if layer.type == "gru" else None)
    if sequences:  # Y (T, D, N, U) -> (N, T, D, U) -> (N, T, D*U)
        y = g.op("Transpose", [outputs[0]], f"{node.name}/batch_major", perm=[2, 0, 1, 3])
        return g.op("Reshape", [y, g.ints(f"{node.name}/shape", [0, 0, -1])], node.name)
    # Y_h (D, N, U) -> (N, D, U) -> (N, D*U)
    y = g.op("Transpose", [outputs[1]], f"{node.name}/batch_major", perm=[1, 0, 2])
    return g.op("Reshape", [y, g.ints(f"{node.name}/shape", [0, -1])], node.name)


#: One exporter per layer type: ``(graph, node, input names) -> output name``.
EXPORTERS: dict[str, Callable[[Graph, Node, list[str]], str]] = {
    "dense": dense,
    "activation": activation,
    "dropout": dropout,
    "flatten": flatten,
    "reshape": reshape,
    "permute": permute,
    "zero_padding1d": sides,
    "zero_padding2d": sides,
    "cropping1d": sides,
    "cropping2d": sides,
    "upsampling1d": upsampling,
    "upsampling2d": upsampling,
    "batch_norm": batch_norm,
    "layer_norm": layer_norm,
    "embedding": embedding,
    "masking": masking,
    "conv1d": conv,
    "conv2d": conv,
    "conv1d_transpose": conv_transpose,
    "conv2d_transpose": conv_transpose,
    "depthwise_conv2d": depthwise_conv,
    "separable_conv2d": separable_conv,
    "max_pool1d": pool,
    "max_pool2d": pool,
    "avg_pool1d": pool,
    "avg_pool2d": pool,
    "global_max_pool": global_pool,
    "global_avg_pool": global_pool,
    "simple_rnn": recurrent,
    "lstm": recurrent,
    "gru": recurrent,
    "add": _chain("Add"),
    "multiply": _chain("Mul"),
    "concatenate": concatenate,
    "multi_head_attention": attention,
    "positional_embedding": positional,
}


# -- the model ------------------------------------------------------------------------------------
def graph_names(network: Network) -> tuple[list[str], list[str]]:
    """The ONNX graph's input and output names: ``x`` and ``y`` for the shorthand's one input
    and one output, else the inputs' and outputs' names."""
    sig = network.signature
    ins = ["x"] if sig.shorthand_inputs else list(network.inputs)
    outs = ["y"] if sig.shorthand_outputs else list(network.outputs)
    return ins, outs


def to_onnx(spec: Spec, network: Network, spec_data: dict, opset: int = DEFAULT_OPSET):
    """The ONNX model of ``network`` (with its parameters set), checked by ``onnx.checker`` with
    ``full_check``. ``spec_data`` is the resolved spec stored in the metadata. Raises a located
    :class:`SpecError` for every layer ONNX cannot express."""
    onnx = require_onnx()
    size = network.n_params() * 4
    if size > MAX_BYTES:  # before a copy of every parameter is made
        raise SpecError(spec.issue(("model",), f"the parameters take {size / 2**30:.1f} GiB as "
                                               "float32; an ONNX file holds at most 2 GiB"))
    in_names, out_names = graph_names(network)
    clash = sorted(set(in_names) & set(out_names))
    if clash:  # the shorthand's graph names x and y beside the long form's names
        sig = network.signature
        named = next((o for o in sig.outputs if o.name in clash), None) or \
            next(i for i in sig.inputs if i.name in clash)
        raise SpecError(spec.issue(named.path, f"'{named.name}' would name both an input and an "
                                               "output of the ONNX graph (the one input is x, the "
                                               "one output y); expected another name"))
    graph_input = dict(zip(network.inputs, in_names))
    integer = [graph_input[n] for n in network.inputs if network.integer_input(n) is not None]
    g = Graph(onnx, in_names + out_names, integer, int(opset))
    floats = onnx.TensorProto.FLOAT
    float_x: dict[str, str] = {}

    def read(name: str, node: Node) -> str:
        if name in graph_input:
            x = graph_input[name]
            if g.is_integer(x) and not getattr(node.layer, "integer_input", False):
                if x not in float_x:  # other layers read the ids as numbers, as netbuild does
                    float_x[x] = g.op("Cast", [x], f"{x}_float", to=floats)
                return float_x[x]
            return x
        return outputs[name]

    outputs: dict[str, str] = {}
    issues = []
    broken: set[str] = set()
    for node in network.order:
        if any(i in broken for i in node.inputs):
            broken.add(node.name)
            continue
        try:
            outputs[node.name] = EXPORTERS[node.layer.type](g, node, [read(i, node) for i in node.inputs])
        except Unsupported as exc:
            cfg = spec.data["model"]["layers"][node.index]
            where = node.path + (exc.key,) if exc.key in cfg else node.path
            issues.append(spec.issue(where, f"layer '{node.name}' cannot be exported to ONNX: {exc}"))
            broken.add(node.name)
    if issues:
        raise SpecError(issues)
    for name, graph_name in zip(network.outputs, out_names):
        g.op("Identity", [outputs[network.outputs[name]]], graph_name, output=graph_name)
    helper = onnx.helper
    shapes = network.output_shapes()
    graph = helper.make_graph(
        g.nodes, str(spec.data.get("name", "netbuild")),
        [helper.make_tensor_value_info(x, onnx.TensorProto.INT64 if g.is_integer(x) else floats,
                                       ["batch", *network.inputs[name]])
         for name, x in graph_input.items()],
        [helper.make_tensor_value_info(y, floats, ["batch", *shapes[name]])
         for name, y in zip(network.outputs, out_names)],
        initializer=g.initializers)
    opsets = [helper.make_opsetid("", int(opset))]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="netbuild",
                              producer_version=__version__,
                              doc_string=f"{spec.data.get('name')}: exported by netbuild {__version__}")
    model.ir_version = helper.find_min_ir_version_for(opsets)
    helper.set_model_props(model, {"netbuild_version": __version__,
                                   "netbuild_spec": json.dumps(spec_data)})
    onnx.checker.check_model(model, full_check=True)
    return model
