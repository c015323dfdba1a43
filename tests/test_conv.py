"""conv1d / conv2d against a plain-loop cross-correlation, their shapes, errors and gradients."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytensor
import pytensor.tensor as pt
import pytest
from conftest import TEST_MODE, verify_grad

from netbuild.layers.base import Context, LayerError
from netbuild.layers.conv import Conv1D, Conv2D, conv_output_length, same_padding

DEFAULTS = {"strides": 1, "padding": "valid", "dilation_rate": 1, "activation": "linear",
            "use_bias": True, "kernel_initializer": "glorot_uniform", "bias_initializer": "zeros"}


pytestmark = pytest.mark.usefixtures("float64")


def make(cls, name: str = "c", **cfg):
    return cls(name, {"type": cls.type, **DEFAULTS, **cfg})


def with_params(layer, input_shape, rng) -> dict:
    """Random values for the layer's parameters, installed as shared variables; returns them."""
    values = {}
    for spec in layer.param_specs([input_shape]):
        values[spec.name] = rng.normal(size=spec.shape)
        layer.params[spec.name] = pytensor.shared(values[spec.name], name=f"{layer.name}/{spec.name}")
    return values


# -- the reference: the definition, with plain loops ------------------------------------------
def ref_pads(length, kernel, stride, padding, dilation):
    if padding == "valid":
        return 0, 0
    if padding == "same":  # TensorFlow: ceil(length / stride) outputs, the odd zero at the end
        out = math.ceil(length / stride)
        total = max((out - 1) * stride + dilation * (kernel - 1) + 1 - length, 0)
        return total // 2, total - total // 2
    return padding, padding


def ref_conv(x, W, b, strides, padding, dilation):
    """y[n, f, o] = b[f] + sum_{c, u} W[f, c, u] * x[n, c, o*s + u*d - pad_before] (zero outside)."""
    n, c, *spatial = x.shape
    f, _, *kernel = W.shape
    r = len(spatial)
    pads = [ref_pads(spatial[i], kernel[i], strides[i], padding[i], dilation[i]) for i in range(r)]
    out = [(spatial[i] + sum(pads[i]) - dilation[i] * (kernel[i] - 1) - 1) // strides[i] + 1
           for i in range(r)]
    y = np.zeros((n, f, *out))
    for i in range(n):
        for o in itertools.product(*(range(m) for m in out)):
            for fi in range(f):
                acc = 0.0 if b is None else b[fi]
                for ci in range(c):
                    for u in itertools.product(*(range(k) for k in kernel)):
                        pos = tuple(o[a] * strides[a] + u[a] * dilation[a] - pads[a][0] for a in range(r))
                        if all(0 <= pos[a] < spatial[a] for a in range(r)):
                            acc += W[(fi, ci) + u] * x[(i, ci) + pos]
                y[(i, fi) + o] = acc
    return y


def per_axis(value, r):
    return list(value) if isinstance(value, list) else [value] * r


# (layer class, input shape, config)
CASES = [
    (Conv2D, (3, 7, 6), dict(filters=4, kernel_size=3)),
    (Conv2D, (3, 7, 6), dict(filters=4, kernel_size=3, strides=2, padding="same")),
    (Conv2D, (2, 7, 6), dict(filters=3, kernel_size=[2, 3], strides=[2, 1], padding=[1, 2])),
    (Conv2D, (2, 9, 7), dict(filters=2, kernel_size=[3, 2], strides=2, dilation_rate=[2, 1],
                             activation="relu", use_bias=False)),
    (Conv2D, (2, 6, 7), dict(filters=2, kernel_size=2, padding="same")),
    (Conv2D, (2, 7, 5), dict(filters=3, kernel_size=2, strides=[1, 2], padding="same", dilation_rate=2)),
    (Conv2D, (3, 5, 4), dict(filters=2, kernel_size=1)),
    (Conv1D, (3, 9), dict(filters=4, kernel_size=3)),
    (Conv1D, (2, 9), dict(filters=3, kernel_size=4, strides=2, padding="same")),
    (Conv1D, (2, 11), dict(filters=3, kernel_size=3, strides=2, padding=2, dilation_rate=2)),
    (Conv1D, (2, 5), dict(filters=2, kernel_size=5, strides=3, padding="same", activation="tanh")),
]
IDS = [f"{cls.type}-{'-'.join(f'{k}={v}' for k, v in cfg.items())}" for cls, _, cfg in CASES]


@pytest.fixture(scope="module")
def computed():
    """Every case's layer, parameters, input and compiled output, from one compiled function."""
    rng = np.random.default_rng(0)
    with pytensor.config.change_flags(floatX="float64"):
        layers, params, xs, inputs, outputs = [], [], [], [], []
        for k, (cls, shape, cfg) in enumerate(CASES):
            layer = make(cls, f"c{k}", **cfg)
            out_shape = layer.output_shape([shape])
            params.append(with_params(layer, shape, rng))
            # one case with no static shape: the layer falls back on output_shape's input shape
            static = (None,) * len(shape) if k == 8 else shape
            x = pt.tensor(f"x{k}", dtype="float64", shape=(None,) + static)
            inputs.append(x)
            outputs.append(layer.forward([x], Context(training=False)))
            xs.append(rng.normal(size=(2,) + shape))
            layers.append((layer, out_shape))
        f = pytensor.function(inputs, outputs, mode=TEST_MODE)
        return layers, params, xs, f(*xs)


@pytest.mark.parametrize("case", range(len(CASES)), ids=IDS)
def test_matches_reference(computed, case):
    cls, shape, cfg = CASES[case]
    layers, params, xs, ys = computed
    _, out_shape = layers[case]
    r = cls.rank
    expected = ref_conv(xs[case], params[case]["W"], params[case].get("b"),
                        per_axis(cfg.get("strides", 1), r), per_axis(cfg.get("padding", "valid"), r),
                        per_axis(cfg.get("dilation_rate", 1), r))
    act = cfg.get("activation", "linear")
    expected = {"linear": expected, "relu": np.maximum(expected, 0), "tanh": np.tanh(expected)}[act]
    assert ys[case].shape[1:] == out_shape
    np.testing.assert_allclose(ys[case], expected, rtol=1e-5, atol=1e-5)
    if cfg.get("padding") == "same":
        assert out_shape[1:] == tuple(math.ceil(n / s) for n, s in
                                      zip(shape[1:], per_axis(cfg.get("strides", 1), r)))


def test_param_shapes_and_fans():
    layer = make(Conv2D, filters=5, kernel_size=[3, 2])
    w, b = layer.param_specs([(4, 8, 8)])
    assert (w.name, w.shape, w.fan_in, w.fan_out, w.regularize) == ("W", (5, 4, 3, 2), 24, 30, True)
    assert (b.name, b.shape, b.regularize) == ("b", (5,), False)
    assert w.init == "glorot_uniform" and b.init == "zeros"
    (w,) = make(Conv1D, filters=6, kernel_size=3, use_bias=False).param_specs([(2, 10)])
    assert w.shape == (6, 2, 3) and (w.fan_in, w.fan_out) == (6, 18)


def test_preactivation_recorded():
    layer = make(Conv1D, filters=2, kernel_size=3, activation="relu")
    with_params(layer, (1, 5), np.random.default_rng(1))
    ctx = Context(training=False)
    layer.forward([pt.tensor("x", dtype="float64", shape=(None, 1, 5))], ctx)
    assert ctx.preactivations["c"][1] == "relu"


def test_shape_helpers():
    assert same_padding(7, 3, 2) == (1, 1)
    assert same_padding(6, 3, 2) == (0, 1)      # odd total: the extra zero at the end
    assert same_padding(6, 4, 1) == (1, 2)
    assert same_padding(7, 3, 1, dilation=2) == (2, 2)
    assert same_padding(5, 1, 3) == (0, 0)
    assert conv_output_length(7, 3, 2, "same") == 4
    assert conv_output_length(7, 3, 1, "valid", dilation=2) == 3
    assert conv_output_length(8, 3, 2, 1, dilation=2) == 3
    assert conv_output_length(28, 5) == 24
    assert conv_output_length(2, 3) < 1


@pytest.mark.parametrize("cls, shape, cfg, key, words", [
    (Conv2D, (1, 3, 8), dict(kernel_size=5), "kernel_size", ["5", "height 3", "at most 3"]),
    (Conv1D, (1, 6), dict(kernel_size=3, dilation_rate=3), "kernel_size", ["spanning 7", "at most 6"]),
    (Conv2D, (1, 8, 2), dict(kernel_size=[2, 5], padding=[0, 1]), "kernel_size",
     ["padded width 4", "at most 4"]),
    (Conv2D, (1, 8), dict(kernel_size=3), "inputs", ["(1, 8)", "channels, height, width"]),
    (Conv1D, (1, 8, 8), dict(kernel_size=3), "inputs", ["(1, 8, 8)", "channels, length"]),
    (Conv2D, (1, 8, 8), dict(kernel_size=[3, 3, 3]), "kernel_size", ["[3, 3, 3]", "list of 2"]),
    (Conv2D, (1, 8, 8), dict(kernel_size=3, strides=[1]), "strides", ["[1]", "list of 2"]),
])
def test_layer_errors(cls, shape, cfg, key, words):
    layer = make(cls, filters=2, **cfg)
    with pytest.raises(LayerError) as info:
        layer.output_shape([shape])
    assert info.value.key == key
    for word in words:
        assert word in str(info.value)


def test_padding_makes_room():
    assert make(Conv2D, filters=2, kernel_size=5, padding=1).output_shape([(1, 3, 3)]) == (2, 1, 1)
    assert make(Conv2D, filters=2, kernel_size=5, padding="same").output_shape([(1, 3, 3)]) == (2, 3, 3)


@pytest.mark.parametrize("cls, shape, cfg", [
    (Conv2D, (2, 5, 4), dict(filters=2, kernel_size=[3, 2], strides=[2, 1], padding="same",
                             dilation_rate=[1, 2])),
    (Conv1D, (2, 7), dict(filters=2, kernel_size=3, strides=2, padding=1, dilation_rate=2)),
], ids=["conv2d", "conv1d"])
def test_gradient(cls, shape, cfg):
    layer = make(cls, **cfg)
    specs = layer.param_specs([shape])
    rng = np.random.default_rng(2)

    def fun(x, W, b):
        layer.params = {"W": W, "b": b}
        return layer.forward([x], Context(training=False))

    # a batch of one keeps the finite differences (one evaluation per value) few
    values = [rng.normal(size=(1,) + shape)] + [rng.normal(size=s.shape) for s in specs]
    verify_grad(fun, values, n_tests=1, rng=rng, mode=TEST_MODE,
                                  no_debug_ref=False)  # the cost in TEST_MODE too, not Numba


@pytest.mark.slow
@pytest.mark.parametrize("case", [1, 3, 9], ids=[IDS[1], IDS[3], IDS[9]])
def test_c_backend_matches(case):
    """The C backend (what training compiles) gives the reference output and TEST_MODE's gradients."""
    cls, shape, cfg = CASES[case]
    rng = np.random.default_rng(4)
    layer = make(cls, **cfg)
    layer.output_shape([shape])
    values = with_params(layer, shape, rng)
    x = pt.tensor("x", dtype="float64", shape=(None,) + shape)
    x_value = rng.normal(size=(2,) + shape)
    y = layer.forward([x], Context(training=False))
    grads = pytensor.grad(pt.sum(y * pt.sin(y)), [x] + list(layer.params.values()))
    c_out, *c_grads = pytensor.function([x], [y] + grads, mode="CVM")(x_value)
    py_grads = pytensor.function([x], grads, mode=TEST_MODE)(x_value)
    r = cls.rank
    expected = ref_conv(x_value, values["W"], values.get("b"), per_axis(cfg.get("strides", 1), r),
                        per_axis(cfg.get("padding", "valid"), r), per_axis(cfg.get("dilation_rate", 1), r))
    if cfg.get("activation") == "relu":
        expected = np.maximum(expected, 0)
    np.testing.assert_allclose(c_out, expected, rtol=1e-5, atol=1e-5)
    for c, p in zip(c_grads, py_grads):
        np.testing.assert_allclose(c, p, rtol=1e-5, atol=1e-5)
