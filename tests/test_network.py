"""Wiring by ``inputs:``: a branching network's output equals a numpy composition of its layers.

Shapes, parameter counts and gradients (tests/test_layer_table.py) would not notice a layer that
read the previous layer instead of the one it names wherever the shapes agree; these networks
compare values, with every parameter (biases and running statistics too) set away from its
initial value, in PyTensor's Python mode and through the compiled C predict function."""

from __future__ import annotations

import numpy as np
import pytensor
import pytest
from conftest import TEST_MODE

from netbuild.compile import compile_predict
from netbuild.network import Network
from netbuild.spec import load_text, validate

HEADER = "name: t\ndata: {train: none.npz}\nmodel:\n  input_shape: %s\n  layers:\n"
FOOTER = "train: {loss: categorical_crossentropy, optimizer: {type: sgd}}\n"

# Every layer but the first reads something other than the layer before it; d reads a where m
# (the layer before it) has the same shape, so only its value can tell.
BRANCHING = [
    "{type: dense, units: 4, activation: tanh, name: a}",
    "{type: dense, units: 4, activation: relu, name: b, inputs: [input]}",
    "{type: add, name: s, inputs: [a, b]}",
    "{type: multiply, name: m, inputs: [a, s]}",
    "{type: dense, units: 4, activation: sigmoid, name: d, inputs: [a]}",
    "{type: concatenate, name: k, inputs: [d, input, m]}",
    "{type: dense, units: 3, activation: softmax, name: out}",
]

# A residual block: the stem skips over batch norm, relu and a second convolution.
RESIDUAL = [
    "{type: conv2d, filters: 2, kernel_size: 3, padding: same, name: stem}",
    "{type: batch_norm, name: bn}",
    "{type: activation, activation: relu, name: r}",
    "{type: conv2d, filters: 2, kernel_size: 3, padding: same, name: c2}",
    "{type: add, name: sum, inputs: [stem, c2]}",
    "{type: global_avg_pool, name: gap}",
    "{type: dense, units: 3, activation: softmax, name: out}",
]


def build(input_shape, items) -> tuple[Network, dict]:
    """The network with every parameter drawn anew (variances positive); returns the values."""
    text = HEADER % (input_shape,) + "".join(f"    - {item}\n" for item in items) + FOOTER
    net = Network.from_spec(validate(load_text(text, "net.yaml")))
    rng = np.random.default_rng(3)
    values = {}
    for name, var in net.params.items():
        shape = var.get_value().shape
        values[name] = rng.uniform(0.5, 2.0, shape) if name.endswith("/var") else rng.normal(size=shape)
        var.set_value(values[name])
    return net, values


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def sigmoid(z):
    return 1 / (1 + np.exp(-z))


def np_branching(x, p):
    dense = lambda v, layer: v @ p[f"{layer}/W"] + p[f"{layer}/b"]  # noqa: E731
    a = np.tanh(dense(x, "a"))
    b = np.maximum(dense(x, "b"), 0)
    s = a + b
    m = a * s
    d = sigmoid(dense(a, "d"))
    k = np.concatenate([d, x, m], axis=-1)
    return softmax(dense(k, "out"))


def np_conv_same3(x, W, b):
    """3x3 cross-correlation with one zero on every side: y[n, f] = b[f] + sum W[f, c, u, v] x[n, c, i+u-1, j+v-1]."""
    n, _, h, w = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    y = np.broadcast_to(b[None, :, None, None], (n, W.shape[0], h, w)).copy()
    for u in range(3):
        for v in range(3):
            y += np.einsum("fc,nchw->nfhw", W[:, :, u, v], xp[:, :, u:u + h, v:v + w])
    return y


def np_residual(x, p, epsilon):
    stem = np_conv_same3(x, p["stem/W"], p["stem/b"])
    lay = (1, -1, 1, 1)
    bn = ((stem - p["bn/mean"].reshape(lay)) / np.sqrt(p["bn/var"].reshape(lay) + epsilon)
          * p["bn/gamma"].reshape(lay) + p["bn/beta"].reshape(lay))
    c2 = np_conv_same3(np.maximum(bn, 0), p["c2/W"], p["c2/b"])
    gap = (stem + c2).mean(axis=(2, 3))
    return softmax(gap @ p["out/W"] + p["out/b"])


@pytest.mark.parametrize("case", ["branching", "residual"])
def test_network_output_is_the_composition_of_its_layers(case, float64):
    if case == "branching":
        net, p = build([5], BRANCHING)
        x = np.random.default_rng(0).normal(size=(6, 5))
        want = np_branching(x, p)
    else:
        net, p = build([1, 6, 6], RESIDUAL)
        x = np.random.default_rng(0).normal(size=(6, 1, 6, 6))
        want = np_residual(x, p, net.nodes["bn"].layer.config["epsilon"])
    xv = net.input_variable()
    graph = pytensor.function([xv], net.forward(xv, training=False)[0], mode=TEST_MODE)
    np.testing.assert_allclose(graph(x), want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(compile_predict(net)(x), want, rtol=1e-10, atol=1e-12)

