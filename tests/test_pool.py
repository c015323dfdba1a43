"""Max, average and global pooling against plain-loop definitions; shapes, errors, gradients."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytensor
import pytensor.tensor as pt
import pytest
from conftest import TEST_MODE, verify_grad

from netbuild.layers.base import Context, LayerError
from netbuild.layers.pool import (
    AvgPool1D,
    AvgPool2D,
    GlobalAvgPool,
    GlobalMaxPool,
    MaxPool1D,
    MaxPool2D,
)

DEFAULTS = {"pool_size": 2, "padding": "valid"}


pytestmark = pytest.mark.usefixtures("float64")


def make(cls, name: str = "p", **cfg):
    return cls(name, {"type": cls.type, **({} if cls.type.startswith("global") else DEFAULTS), **cfg})


def per_axis(value, r):
    return list(value) if isinstance(value, list) else [value] * r


# -- the reference: the definition, with plain loops ------------------------------------------
def ref_pool(x, mode, pool, strides, padding):
    """Each output is the max / mean of the input elements (never the padding) in its window."""
    n, c, *spatial = x.shape
    r = len(spatial)
    before, out = [], []
    for i in range(r):
        if padding == "same":  # TensorFlow: ceil(length / stride) outputs, the odd pad at the end
            out.append(math.ceil(spatial[i] / strides[i]))
            before.append(max((out[i] - 1) * strides[i] + pool[i] - spatial[i], 0) // 2)
        else:
            out.append((spatial[i] - pool[i]) // strides[i] + 1)
            before.append(0)
    y = np.zeros((n, c, *out))
    for i, ci in itertools.product(range(n), range(c)):
        for o in itertools.product(*(range(m) for m in out)):
            values = []
            for u in itertools.product(*(range(p) for p in pool)):
                pos = tuple(o[a] * strides[a] + u[a] - before[a] for a in range(r))
                if all(0 <= pos[a] < spatial[a] for a in range(r)):
                    values.append(x[(i, ci) + pos])
            y[(i, ci) + o] = max(values) if mode == "max" else sum(values) / len(values)
    return y


# (layer class, input shape, config); strides == pool_size tile the input, the rest overlap or skip
POOL_CASES = [
    ((3, 7, 6), dict(pool_size=2)),                                      # tiles, cropped
    ((3, 7, 5), dict(pool_size=2, padding="same")),                      # tiles, padded at the end
    ((2, 7, 6), dict(pool_size=3, strides=1)),                           # overlapping
    ((2, 7, 6), dict(pool_size=[2, 3], strides=[1, 2], padding="same")),
    ((2, 8, 7), dict(pool_size=2, strides=3)),                           # gaps between windows
    ((2, 7, 7), dict(pool_size=3, strides=2, padding="same")),
]
POOL1D_CASES = [
    ((3, 9), dict(pool_size=2)),
    ((2, 9), dict(pool_size=3, strides=2, padding="same")),
    ((2, 9), dict(pool_size=4, padding="same")),
    ((2, 8), dict(pool_size=3, strides=1)),
]
CASES = ([(cls, s, c) for cls in (MaxPool2D, AvgPool2D) for s, c in POOL_CASES]
         + [(cls, s, c) for cls in (MaxPool1D, AvgPool1D) for s, c in POOL1D_CASES])
IDS = [f"{cls.type}-{'-'.join(f'{k}={v}' for k, v in cfg.items())}" for cls, _, cfg in CASES]

GLOBAL_CASES = [(cls, shape) for cls in (GlobalMaxPool, GlobalAvgPool)
                for shape in [(3, 5), (3, 4, 5), (2, 3, 4, 2)]]


@pytest.fixture(scope="module")
def computed():
    """Every case's input and output, from one compiled function."""
    rng = np.random.default_rng(0)
    with pytensor.config.change_flags(floatX="float64"):
        shapes, xs, inputs, outputs = [], [], [], []
        for k, (cls, shape, cfg) in enumerate(CASES + [(c, s, {}) for c, s in GLOBAL_CASES]):
            layer = make(cls, f"p{k}", **cfg)
            shapes.append(layer.output_shape([shape]))
            # one case with no static shape: the layer falls back on output_shape's input shape
            static = (None,) * len(shape) if k == 3 else shape
            x = pt.tensor(f"x{k}", dtype="float64", shape=(None,) + static)
            inputs.append(x)
            outputs.append(layer.forward([x], Context(training=False)))
            xs.append(rng.normal(size=(2,) + shape))
        f = pytensor.function(inputs, outputs, mode=TEST_MODE)
        return shapes, xs, f(*xs)


@pytest.mark.parametrize("case", range(len(CASES)), ids=IDS)
def test_matches_reference(computed, case):
    cls, shape, cfg = CASES[case]
    out_shapes, xs, ys = computed
    r = cls.rank
    pool = per_axis(cfg.get("pool_size", 2), r)
    strides = per_axis(cfg["strides"], r) if "strides" in cfg else pool
    expected = ref_pool(xs[case], cls.mode, pool, strides, cfg.get("padding", "valid"))
    assert ys[case].shape[1:] == out_shapes[case]
    np.testing.assert_allclose(ys[case], expected, rtol=1e-5, atol=1e-5)
    if cfg.get("padding") == "same":
        assert out_shapes[case][1:] == tuple(math.ceil(n / s) for n, s in zip(shape[1:], strides))


@pytest.mark.parametrize("case", range(len(GLOBAL_CASES)),
                         ids=[f"{c.type}-{s}" for c, s in GLOBAL_CASES])
def test_global_matches_reference(computed, case):
    cls, shape = GLOBAL_CASES[case]
    out_shapes, xs, ys = computed
    x, y = xs[len(CASES) + case], ys[len(CASES) + case]
    expected = np.array([[(np.max if cls.mode == "max" else np.mean)(x[i, c]) for c in range(shape[0])]
                         for i in range(x.shape[0])])
    assert out_shapes[len(CASES) + case] == (shape[0],) == y.shape[1:]
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_no_params():
    assert make(MaxPool2D).param_specs([(3, 8, 8)]) == []
    assert make(GlobalAvgPool).param_specs([(3, 8, 8)]) == []


def test_default_strides_are_pool_size():
    assert make(MaxPool2D, pool_size=3).output_shape([(1, 9, 8)]) == (1, 3, 2)
    assert make(AvgPool1D, pool_size=3, strides=1).output_shape([(1, 9)]) == (1, 7)


@pytest.mark.parametrize("cls, shape, cfg, key, words", [
    (MaxPool2D, (1, 3, 8), dict(pool_size=4), "pool_size", ["pool_size 4", "height 3", "at most 3"]),
    (AvgPool1D, (1, 2), dict(pool_size=3, strides=1), "pool_size", ["pool_size 3", "length 2"]),
    (MaxPool2D, (1, 8), {}, "inputs", ["(1, 8)", "channels, height, width"]),
    (AvgPool1D, (1, 8, 8), {}, "inputs", ["(1, 8, 8)", "channels, length"]),
    (MaxPool2D, (1, 8, 8), dict(pool_size=[2, 2, 2]), "pool_size", ["[2, 2, 2]", "list of 2"]),
    (MaxPool1D, (1, 8), dict(padding=1), "padding", ["'valid' or 'same'"]),
    (GlobalMaxPool, (8,), {}, "inputs", ["(8,)"]),
])
def test_layer_errors(cls, shape, cfg, key, words):
    with pytest.raises(LayerError) as info:
        make(cls, **cfg).output_shape([shape])
    assert info.value.key == key
    for word in words:
        assert word in str(info.value)


def test_same_padding_fits_any_size():
    assert make(MaxPool2D, pool_size=4, padding="same").output_shape([(2, 3, 3)]) == (2, 1, 1)


@pytest.mark.parametrize("cfgs, shape", [
    # tiled (cropped) and overlapping windows, valid and same, max and average
    ([(MaxPool2D, dict(pool_size=3, strides=1)), (MaxPool2D, dict(pool_size=[2, 3], strides=[1, 2],
                                                                  padding="same")),
      (AvgPool2D, dict(pool_size=2, padding="same")), (AvgPool2D, {})], (2, 5, 5)),
    ([(MaxPool1D, dict(pool_size=3, strides=2, padding="same")), (AvgPool1D, dict(pool_size=2)),
      (GlobalMaxPool, {}), (GlobalAvgPool, {})], (2, 7)),
], ids=["2d", "1d-global"])
def test_gradient(cfgs, shape):
    layers = [make(cls, f"p{i}", **cfg) for i, (cls, cfg) in enumerate(cfgs)]
    for layer in layers:
        layer.output_shape([shape])

    def fun(x):
        ctx = Context(training=False)
        return pt.concatenate([layer.forward([x], ctx).flatten() for layer in layers])

    # distinct values spaced well beyond the finite-difference step: no ties in any window
    rng = np.random.default_rng(3)
    # (a batch of one keeps the finite differences, one evaluation per value, few)
    x = rng.permutation(np.arange(math.prod(shape))).reshape((1,) + shape) * 0.1
    verify_grad(fun, [x], n_tests=1, rng=rng, mode=TEST_MODE,
                                  no_debug_ref=False)  # the cost in TEST_MODE too, not Numba


@pytest.mark.slow
def test_c_backend_matches():
    """The C backend (what training compiles) gives the reference output and TEST_MODE's gradient."""
    rng = np.random.default_rng(4)
    shape = (2, 7, 6)
    x = pt.tensor("x", dtype="float64", shape=(None,) + shape)
    xv = rng.permutation(np.arange(2 * math.prod(shape))).reshape((2,) + shape) * 0.1
    for cls, cfg in [(MaxPool2D, {}), (MaxPool2D, dict(pool_size=3, strides=2, padding="same")),
                     (AvgPool2D, dict(pool_size=[2, 3], strides=[1, 2], padding="same"))]:
        layer = make(cls, **cfg)
        layer.output_shape([shape])
        y = layer.forward([x], Context(training=False))
        g = pytensor.grad(pt.sum(y * pt.sin(y)), x)
        c_out, c_grad = pytensor.function([x], [y, g], mode="CVM")(xv)
        py_grad = pytensor.function([x], g, mode=TEST_MODE)(xv)
        pool = per_axis(cfg.get("pool_size", 2), 2)
        strides = per_axis(cfg["strides"], 2) if "strides" in cfg else pool
        expected = ref_pool(xv, cls.mode, pool, strides, cfg.get("padding", "valid"))
        np.testing.assert_allclose(c_out, expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(c_grad, py_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("item, shape, axes", [
    ("{type: global_avg_pool, axis: 1}", (5, 3), (1,)),          # a (timesteps, units) sequence over time
    ("{type: global_max_pool, axis: -1}", (5, 3), (2,)),
    ("{type: global_avg_pool, axis: [1, 3]}", (2, 3, 4), (1, 3)),
    ("{type: global_max_pool}", (2, 3, 4), (2, 3)),
])
def test_global_pools_over_the_axes_named(item, shape, axes):
    import pytensor
    import pytensor.tensor as pt
    from conftest import TEST_MODE
    from test_shape import layer_from

    from netbuild.layers.base import Context

    layer = layer_from(item, shape)
    x = pt.tensor("x", dtype=pytensor.config.floatX, shape=(None, *shape))
    values = np.random.default_rng(0).normal(size=(2, *shape)).astype(x.dtype)
    got = pytensor.function([x], layer.forward([x], Context(training=False)), mode=TEST_MODE)(values)
    want = values.max(axis=axes) if "max" in item else values.mean(axis=axes)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got.shape[1:] == layer.output_shape([shape])


@pytest.mark.parametrize("item, shape, message", [
    ("{type: global_avg_pool, axis: 0}", (5, 3), "received axis 0 (the batch axis)"),
    ("{type: global_avg_pool, axis: 3}", (5, 3), "received axis 3 for inputs with 2 axes"),
    ("{type: global_avg_pool, axis: [1, 2]}", (5, 3), "pools every axis of the input"),
    ("{type: global_max_pool, axis: [1, -2]}", (5, 3), "names axis -2 twice"),
])
def test_a_global_pool_axis_that_cannot_be_is_located(item, shape, message):
    from test_shape import located_error

    line = located_error(item, shape)
    assert "model.layers[0].axis" in line and message in line, line
