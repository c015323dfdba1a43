"""The pooling ops (netbuild/ops/pool.py): their C code and their numpy ``perform`` against the
plain-loop reference of test_pool.py and against the same pooling from PyTensor's own ops
(``_graph_pool``); where max pooling's gradient goes (ties, NaNs, cropped edges); numerical
gradients of the C code; errors. Netbuild's ops run their C code inside test_conv_ops's
:func:`ops_in_c`, PyTensor's own in the tests' Python mode.
"""

from __future__ import annotations

import math

import numpy as np
import pytensor
import pytensor.tensor as pt
import pytest
from conftest import verify_grad
from pytensor.gradient import NullTypeGradError
from test_conv_ops import function, jax_and_c, needs_jax, ops_in_c, symbol
from test_pool import CASES, IDS, make, per_axis, ref_pool

from netbuild.layers.base import Context
from netbuild.layers.pool import _graph_pool
from netbuild.ops.pool import Pool, PoolGrad, pool

pytestmark = pytest.mark.usefixtures("float64")

# (mode, x shape, kernel, strides, pads): the layer cases of test_pool.py, and a few more
EXTRA = [
    ("max", (1, 2, 5, 7), (2, 2), (2, 2), ((0, 0), (0, 0))),     # 2x2 fast path, both cropped
    ("max", (2, 1, 4, 4), (3, 3), (1, 1), ((1, 1), (1, 1))),     # overlapping, padded all round
    ("avg", (2, 1, 4, 4), (3, 3), (1, 1), ((1, 1), (1, 1))),
    ("max", (1, 3, 9), (4,), (3,), ((2, 1),)),                   # 1-d, N=1
    ("avg", (2, 2, 6, 5), (1, 2), (1, 3), ((0, 0), (0, 1))),
]


def layer_geometry(case: int):
    cls, shape, cfg = CASES[case]
    win = make(cls, **cfg).geometry(shape)
    return cls.mode, (2,) + shape, win.kernel, win.strides, win.pads


GEOMETRIES = [layer_geometry(k) for k in range(len(CASES))] + EXTRA
GEOMETRY_IDS = IDS + [f"extra-{k}" for k in range(len(EXTRA))]


def distinct(shape, rng) -> np.ndarray:
    """Distinct values, spaced well beyond finite differences: no ties in any window."""
    return rng.permutation(np.arange(math.prod(shape))).reshape(shape) * 0.1 - 1.0


def forward_and_gradient(geometry, x: np.ndarray, dy: np.ndarray, how: str) -> list[np.ndarray]:
    """``y`` and the gradient of ``sum(y * dy)``: ``how`` is ``c``, ``py`` (numpy perform) or
    ``graph`` (``_graph_pool``, PyTensor's own ops)."""
    mode, xs, kernel, strides, pads = geometry
    xv, dyv = symbol(x), symbol(dy)
    if how == "graph":
        from netbuild.layers.conv import Window
        win = Window(xs[2:], kernel, strides, (1,) * len(kernel), pads, tuple(dy.shape[2:]))
        y = _graph_pool(xv, mode, win, xs[1])
    else:
        y = pool(xv, mode, kernel, strides, pads)
    return function([xv, dyv], [y, pytensor.grad(pt.sum(y * dyv), xv)], c=how == "c")(x, dy)


def geometry_values(rng) -> list[tuple]:
    """``(x, dy)`` for each of :data:`GEOMETRIES`: distinct inputs, and output gradients."""
    values = []
    for mode, xs, kernel, strides, pads in GEOMETRIES:
        out = Pool(mode, kernel, strides, pads).out_lengths(xs[2:])
        values.append((distinct(xs, rng), rng.normal(size=xs[:2] + tuple(out))))
    return values


@pytest.fixture(scope="module")
def computed():
    rng = np.random.default_rng(0)
    with pytensor.config.change_flags(floatX="float64"):
        values = geometry_values(rng)
        return values, {how: [forward_and_gradient(g, x, dy, how) for g, (x, dy) in
                              zip(GEOMETRIES, values)] for how in ("c", "py", "graph")}


@pytest.mark.parametrize("case", range(len(GEOMETRIES)), ids=GEOMETRY_IDS)
def test_c_numpy_and_graph_agree_with_the_reference(computed, case):
    values, results = computed
    mode, _, kernel, strides, pads = GEOMETRIES[case]
    x = values[case][0]
    # the reference knows valid and same padding; other pads by hand: -inf or excluded zeros
    if case < len(CASES):
        cls, _, cfg = CASES[case]
        pool_size = per_axis(cfg.get("pool_size", 2), cls.rank)
        expected = ref_pool(x, mode, pool_size, per_axis(cfg["strides"], cls.rank)
                            if "strides" in cfg else pool_size, cfg.get("padding", "valid"))
    else:
        expected = _ref_pool_pads(x, mode, kernel, strides, pads)
    np.testing.assert_allclose(results["c"][case][0], expected, rtol=1e-12, atol=1e-12)
    for how in ("py", "graph"):
        for got, want in zip(results["c"][case], results[how][case]):
            assert got.shape == want.shape
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12, err_msg=how)


def _ref_pool_pads(x, mode, kernel, strides, pads):
    """Each window's max or mean over the input elements it covers, with plain loops."""
    import itertools
    n, c, *spatial = x.shape
    out = [(s + b + a - k) // st + 1 for s, k, st, (b, a) in zip(spatial, kernel, strides, pads)]
    y = np.zeros((n, c, *out))
    for i, ci in itertools.product(range(n), range(c)):
        for o in itertools.product(*(range(m) for m in out)):
            vals = []
            for u in itertools.product(*(range(k) for k in kernel)):
                pos = tuple(o[a] * strides[a] + u[a] - pads[a][0] for a in range(len(kernel)))
                if all(0 <= pos[a] < spatial[a] for a in range(len(kernel))):
                    vals.append(x[(i, ci) + pos])
            y[(i, ci) + o] = max(vals) if mode == "max" else sum(vals) / len(vals)
    return y


# -- where max pooling's gradient goes ----------------------------------------------------------
@pytest.mark.parametrize("c", [True, False], ids=["c", "numpy"])
@pytest.mark.parametrize("geometry", [((2, 2), (2, 2), ((0, 0), (0, 0))),
                                      ((2, 2), (2, 1), ((0, 0), (0, 1)))],
                         ids=["2x2-fast-path", "overlapping"])
def test_ties_go_to_the_first_maximum(c, geometry):
    """As PyTorch's CPU max pooling: among equal maxima, the first in row-major order."""
    kernel, strides, pads = geometry
    x = np.array([[[[1.0, 1.0, 0.0, 2.0],
                    [1.0, 1.0, 2.0, 2.0],
                    [0.0, 3.0, 5.0, 4.0],
                    [3.0, 3.0, 5.0, 5.0]]]])
    xv = symbol(x)
    y = pool(xv, "max", kernel, strides, pads)
    dy = np.ones(Pool("max", kernel, strides, pads).out_lengths(x.shape[2:]))[None, None]
    fn = function([xv], [y, pytensor.grad(pt.sum(y * dy), xv)], c)
    got_y, got_dx = fn(x)
    # the first maximum of each window, by hand
    expected = np.zeros_like(x)
    for i in range(dy.shape[2]):
        for j in range(dy.shape[3]):
            h0, w0 = i * strides[0] - pads[0][0], j * strides[1] - pads[1][0]
            window = [(h, w) for h in range(max(h0, 0), min(h0 + kernel[0], 4))
                      for w in range(max(w0, 0), min(w0 + kernel[1], 4))]
            h, w = max(window, key=lambda p: (x[0, 0, p[0], p[1]], -window.index(p)))
            assert got_y[0, 0, i, j] == x[0, 0, h, w]
            expected[0, 0, h, w] += 1
    np.testing.assert_array_equal(got_dx, expected)


@pytest.mark.parametrize("c", [True, False], ids=["c", "numpy"])
def test_nan_is_the_maximum(c):
    """A window with a NaN gives NaN, and its gradient goes to the first NaN; the 2x2 fast path
    hands rows with a NaN (or with both infinities) to the exact code."""
    nan, inf = np.nan, np.inf
    x = np.array([[[[1.0, nan, 2.0, 0.0, 7.0, 1.0],
                    [nan, 3.0, 1.0, 9.0, 1.0, 1.0],
                    [inf, -inf, 0.0, 1.0, -inf, -inf],
                    [1.0, 2.0, 0.0, 1.0, -inf, -inf]]]])
    for kernel, strides in [((2, 2), (2, 2)), ((2, 3), (2, 3))]:
        xv = symbol(x)
        y = pool(xv, "max", kernel, strides)
        fn = function([xv], [y, pytensor.grad(pt.sum(y), xv)], c)
        got_y, got_dx = fn(x)
        if kernel == (2, 2):
            np.testing.assert_array_equal(got_y[0, 0], [[nan, 9.0, 7.0], [inf, 1.0, -inf]])
            expected = np.zeros((4, 6))
            expected[0, 1] = expected[1, 3] = expected[0, 4] = 1      # first NaN, 9, 7
            expected[2, 0] = expected[2, 3] = expected[2, 4] = 1      # inf, first 1, first -inf
        else:
            np.testing.assert_array_equal(got_y[0, 0], [[nan, 9.0], [inf, 1.0]])
            expected = np.zeros((4, 6))
            expected[0, 1] = expected[1, 3] = expected[2, 0] = expected[2, 3] = 1
        np.testing.assert_array_equal(got_dx[0, 0], expected)


@pytest.mark.parametrize("c", [True, False], ids=["c", "numpy"])
def test_cropped_edges_get_no_gradient(c):
    x = distinct((2, 3, 5, 7), np.random.default_rng(1))
    xv = symbol(x)
    y = pool(xv, "max", (2, 2))
    dx = function([xv], pytensor.grad(pt.sum(y * 3.0), xv), c)(x)
    assert np.all(dx[:, :, 4, :] == 0) and np.all(dx[:, :, :, 6] == 0)
    assert np.all(dx[:, :, :4, :6].reshape(2, 3, 2, 2, 3, 2).sum(axis=(3, 5)) == 3.0)


# -- gradients ----------------------------------------------------------------------------------
@pytest.mark.parametrize("geometry", [
    ("max", (1, 2, 5, 5), (3, 2), (2, 1), ((1, 1), (0, 1))),
    ("avg", (1, 2, 5, 5), (3, 2), (2, 1), ((1, 1), (0, 1))),
    ("max", (1, 2, 6, 4), (2, 2), (2, 2), ((0, 0), (0, 0))),
    ("max", (1, 2, 7), (3,), (2,), ((1, 1),)),
    ("avg", (1, 2, 7), (2,), (1,), ((0, 1),)),
], ids=["max2d", "avg2d", "max2x2", "max1d", "avg1d"])
def test_gradients_numerically(geometry):
    mode, xs, kernel, strides, pads = geometry
    rng = np.random.default_rng(2)
    with ops_in_c():
        verify_grad(lambda x: pool(x, mode, kernel, strides, pads), [distinct(xs, rng)],
                    n_tests=1, rng=rng)


def test_second_derivatives():
    """Average pooling's gradient is linear in dy, its gradient the pooling itself; max
    pooling's has none (a clear error, not a crash)."""
    rng = np.random.default_rng(3)
    x = distinct((1, 2, 5, 5), rng)
    geometry = ((3, 2), (2, 1), ((1, 1), (0, 1)))
    dy = rng.normal(size=(1, 2) + tuple(Pool("avg", *geometry).out_lengths((5, 5))))
    with ops_in_c():
        verify_grad(lambda d: PoolGrad("avg", *geometry)(pt.as_tensor(x), d), [dy], n_tests=1,
                    rng=rng)
    xv, dyv = pt.tensor4(), pt.tensor4()
    dx = PoolGrad("max", *geometry)(xv, dyv)
    with pytest.raises(NullTypeGradError, match="second derivative of max pooling"):
        pytensor.grad(pt.sum(dx * dx), dyv)


# -- the op's contract ----------------------------------------------------------------------------
def test_op_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown pooling mode 'min'"):
        Pool("min", (2, 2), (2, 2), ((0, 0), (0, 0)))
    with pytest.raises(ValueError, match="less than the kernel"):
        Pool("max", (2, 2), (2, 2), ((2, 0), (0, 0)))
    with pytest.raises(ValueError, match="one entry per spatial axis"):
        Pool("max", (2, 2), (2,), ((0, 0), (0, 0)))
    with pytest.raises(TypeError, match="needs 4 axes"):
        Pool("max", (2, 2), (2, 2), ((0, 0), (0, 0)))(pt.tensor3())


@pytest.mark.parametrize("c", [True, False], ids=["c", "numpy"])
def test_shape_mismatches_are_errors(c):
    x, dy = pt.tensor4(), pt.tensor4()
    fn = function([x], pool(x, "max", (3, 3)), c)
    with pytest.raises(ValueError, match="window \\(3, 3\\) is larger than the padded input"):
        fn(np.zeros((1, 1, 2, 5)))
    grad = function([x, dy], PoolGrad("avg", (2, 2), (2, 2), ((0, 0), (0, 0)))(x, dy), c)
    with pytest.raises(ValueError, match="PoolGrad: dy has the wrong shape"):
        grad(np.zeros((1, 2, 4, 4)), np.zeros((1, 2, 3, 2)))


def test_static_and_inferred_shapes():
    x = pt.tensor(dtype="float64", shape=(None, 3, 9, 8))
    y = pool(x, "avg", (3, 2), (2, 3), ((1, 1), (0, 1)))
    assert y.type.shape == (None, 3, 5, 3)
    fn = pytensor.function([x], y.shape, mode="FAST_COMPILE")
    assert not [n for n in fn.maker.fgraph.apply_nodes if isinstance(n.op, Pool)]
    assert tuple(fn(np.zeros((4, 3, 9, 8)))) == (4, 3, 5, 3)


@pytest.mark.parametrize("case", range(len(CASES)), ids=IDS)
def test_layer_matches_its_graph_version(case):
    cls, shape, cfg = CASES[case]
    layer = make(cls, **cfg)
    layer.output_shape([shape])
    x = pt.tensor(dtype="float64", shape=(None,) + shape)
    y = layer.forward([x], Context(training=False))
    graph = _graph_pool(x, cls.mode, layer.geometry(shape), shape[0])
    xv = distinct((3,) + shape, np.random.default_rng(4))
    got, want = function([x], [y, graph], c=True)(xv)
    assert got.shape[1:] == layer.output_shape([shape])
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


# -- the jax backend: each op's jax method against its C code -----------------------------------
def pool_graph(geometry, x: np.ndarray, dy: np.ndarray):
    """Symbolic ``x, dy``, and ``y`` and the gradient of ``sum(y * dy)`` through the op (Pool,
    PoolGrad)."""
    mode, _, kernel, strides, pads = geometry
    xv, dyv = symbol(x), symbol(dy)
    y = pool(xv, mode, kernel, strides, pads)
    return [xv, dyv], [y, pytensor.grad(pt.sum(y * dyv), xv)]


@pytest.fixture(scope="module")
def jax_computed():
    """Every geometry's ``y`` and ``dx`` in JAX and in C, compiled as one function each."""
    rng = np.random.default_rng(10)
    with pytensor.config.change_flags(floatX="float64"):
        values = geometry_values(rng)
        graphs = [pool_graph(g, *v) for g, v in zip(GEOMETRIES, values)]
        return jax_and_c(graphs, [a for v in values for a in v])


@needs_jax
@pytest.mark.parametrize("case", range(len(GEOMETRIES)), ids=GEOMETRY_IDS)
def test_jax_matches_c(jax_computed, case):
    """Max and average pooling and their gradient in JAX (kernels, strides, padding, 1-d and
    2-d) are the C code's, float64."""
    for got, want in zip(*jax_computed[case]):
        assert got.shape == want.shape and got.dtype == want.dtype == np.float64
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


@needs_jax
def test_jax_float32_matches_c():
    rng = np.random.default_rng(11)
    graphs, values = [], []
    for mode in ("max", "avg"):
        geometry = (mode, (2, 3, 6, 7), (3, 2), (2, 1), ((1, 1), (0, 1)))
        x = distinct(geometry[1], rng).astype("float32")
        dy = rng.normal(size=(2, 3, 3, 7)).astype("float32")
        graphs.append(pool_graph(geometry, x, dy))
        values += [x, dy]
    with pytensor.config.change_flags(floatX="float32"):
        results = jax_and_c(graphs, values)
    for got, want in results:
        for g, w in zip(got, want):
            assert g.dtype == w.dtype == np.float32
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


@needs_jax
def test_jax_ties_nans_and_infinities_as_in_c():
    """Max pooling's gradient in JAX goes where the C code sends it: the first maximum in
    row-major order among ties, the first NaN, an input (not padding) in a window of -inf."""
    nan, inf = np.nan, np.inf
    ties = np.array([[[[1.0, 1.0, 0.0, 2.0],
                       [1.0, 1.0, 2.0, 2.0],
                       [0.0, 3.0, 5.0, 4.0],
                       [3.0, 3.0, 5.0, 5.0]]]])
    special = np.array([[[[1.0, nan, 2.0, 0.0, 7.0, 1.0],
                          [nan, 3.0, 1.0, 9.0, 1.0, 1.0],
                          [inf, -inf, 0.0, 1.0, -inf, -inf],
                          [1.0, 2.0, 0.0, 1.0, -inf, -inf]]]])
    geometries = [((2, 2), (2, 2), ((0, 0), (0, 0))), ((2, 2), (2, 1), ((0, 0), (0, 1))),
                  ((3, 3), (1, 1), ((1, 1), (2, 2))), ((2, 3), (2, 3), ((0, 0), (0, 0)))]
    graphs, values = [], []
    for x in (ties, special):
        for kernel, strides, pads in geometries:
            out = Pool("max", kernel, strides, pads).out_lengths(x.shape[2:])
            graphs.append(pool_graph(("max", x.shape, kernel, strides, pads), x,
                                     np.ones((1, 1, *out))))
            values += [x, np.ones((1, 1, *out))]
    for got, want in jax_and_c(graphs, values):
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)


@needs_jax
def test_jax_average_pooling_second_derivative():
    """PoolGrad's own gradient (average pooling of the cotangent) in JAX as in C."""
    rng = np.random.default_rng(12)
    geometry = ((3, 2), (2, 1), ((1, 1), (0, 1)))
    x, dy = pt.tensor4(), pt.tensor4()
    dx = PoolGrad("avg", *geometry)(x, dy)
    xv = distinct((1, 2, 5, 5), rng)
    dyv = rng.normal(size=(1, 2) + tuple(Pool("avg", *geometry).out_lengths((5, 5))))
    ((got, want),) = jax_and_c([([x, dy], [dx, pytensor.grad(pt.sum(dx ** 2), dy)])], [xv, dyv])
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-10)
