"""The convolution ops (netbuild/ops/conv.py): their C code and their numpy ``perform`` against the
plain-loop reference of test_conv.py and against the same convolution from PyTensor's own ops
(``_graph_conv``); numerical gradients of the C code, second derivatives, errors; and the compiled
training step of a small CNN: C only, without the graph im2col.

Graphs run in the tests' Python mode except netbuild's conv and pool ops, which run their C code
inside :func:`ops_in_c`: g++ compiles only their modules, once per op and float type (the geometry
is a run-time parameter of the C code, and 1-d and 2-d share the code).
"""

from __future__ import annotations

import contextlib
import importlib.util

import numpy as np
import pytensor
import pytensor.tensor as pt
import pytest
from conftest import TEST_MODE, verify_grad
from pytensor.gradient import NullTypeGradError
from test_compile import python_nodes
from test_conv import CASES, IDS, make, ref_conv, with_params

from netbuild import activations
from netbuild.compile import compile_train
from netbuild.layers.base import Context
from netbuild.layers.conv import Window, _graph_conv
from netbuild.network import Network
from netbuild.ops import NetbuildCOp
from netbuild.ops.conv import Conv, ConvGradInput, ConvGradWeights, conv, conv_transpose
from netbuild.ops.pool import Pool, PoolGrad
from netbuild.spec import load_text, validate

pytestmark = pytest.mark.usefixtures("float64")


@contextlib.contextmanager
def ops_in_c():
    """Functions compiled meanwhile run netbuild's own ops in C (PyTensor's own ops stay in the
    tests' Python mode)."""
    with pytest.MonkeyPatch.context() as patch:
        def c_thunk(self, node, storage_map, compute_map, no_recycling, impl=None,
                    _make=NetbuildCOp.make_thunk):
            return _make(self, node, storage_map, compute_map, no_recycling, impl="c")
        patch.setattr(NetbuildCOp, "make_thunk", c_thunk)
        yield


def function(inputs, outputs, c: bool):
    """``pytensor.function`` in the tests' Python mode; with ``c``, netbuild's ops run (and are
    checked to run) their C code."""
    if not c:
        return pytensor.function(inputs, outputs, mode=TEST_MODE, on_unused_input="ignore")
    with ops_in_c():
        fn = pytensor.function(inputs, outputs, mode=TEST_MODE, on_unused_input="ignore")
    ours = [t for n, t in zip(fn.vm.nodes, fn.vm.thunks) if isinstance(n.op, NetbuildCOp)]
    assert ours and all(getattr(t, "cthunk", None) is not None for t in ours)
    return fn


def symbol(value: np.ndarray):
    return pt.tensor(dtype=value.dtype, shape=(None,) * value.ndim)


# -- geometries: the layer cases of test_conv.py, and a few the layers rarely make -------------
# (x shape, W shape, strides, dilation, pads, bias)
EXTRA = [
    ((1, 1, 5, 5), (1, 1, 5, 5), (1, 1), (1, 1), ((0, 0), (0, 0)), True),    # one output, N=1
    ((2, 3, 5, 6), (2, 3, 1, 1), (2, 2), (1, 1), ((0, 0), (0, 0)), True),    # 1x1, strided
    ((2, 2, 3, 4), (3, 2, 2, 2), (1, 2), (1, 1), ((3, 3), (0, 4)), True),    # windows all padding
    ((1, 2, 9), (3, 2, 3), (2,), (3,), ((4, 1),), False),                    # 1-d, N=1
    ((2, 1, 7, 7), (1, 1, 3, 2), (3, 2), (2, 3), ((1, 2), (2, 1)), True),   # C = F = 1
]


def layer_geometry(case: int):
    """``(x shape, W shape, strides, dilation, pads, bias)`` of test_conv.py's layer case."""
    cls, shape, cfg = CASES[case]
    layer = make(cls, **cfg)
    win = layer.geometry(shape)
    w = layer.param_specs([shape])[0].shape
    return (2,) + shape, w, win.strides, win.dilation, win.pads, cfg.get("use_bias", True)


GEOMETRIES = [layer_geometry(k) for k in range(len(CASES))] + EXTRA
GEOMETRY_IDS = IDS + [f"extra-{k}" for k in range(len(EXTRA))]


def conv_values(geometry, rng, dtype="float64") -> list[np.ndarray]:
    """``x, W, dy`` and ``b`` (with a bias) for a geometry."""
    xs, ws, strides, dilation, pads, bias = geometry
    op = Conv(strides, dilation, pads)
    out = op.out_lengths(xs[2:], ws[2:])
    values = [rng.normal(size=xs), rng.normal(size=ws), rng.normal(size=(xs[0], ws[0], *out))]
    if bias:
        values.append(rng.normal(size=ws[0]))
    return [v.astype(dtype) for v in values]


def forward_and_gradients(geometry, values, how: str, activation: str = "linear") -> list:
    """``y`` and the gradients of ``sum(y * dy)`` for ``x, W (, b)``: ``how`` is ``c`` (the op's C
    code), ``py`` (its numpy perform) or ``graph`` (PyTensor's own ops: ``_graph_conv``, then
    ``maximum(z, 0)`` for a relu)."""
    xs, ws, strides, dilation, pads, bias = geometry
    x, w, dy, *b = ins = [symbol(v) for v in values]
    if how == "graph":
        win = Window(xs[2:], ws[2:], strides, dilation, pads, tuple(values[2].shape[2:]))
        y = activations.get(activation)(_graph_conv(x, w, b[0] if b else None, win, ws[1], ws[0]))
    else:
        y = conv(x, w, b[0] if b else None, strides, dilation, pads, activation)
    grads = pytensor.grad(pt.sum(y * dy), [x, w] + b)
    return function(ins, [y] + grads, c=how == "c")(*values)


RUNS = [(how, act) for act in ("linear", "relu") for how in ("c", "py", "graph")]


@pytest.fixture(scope="module")
def computed():
    """Every geometry's values, and its results in C, in numpy and from PyTensor's own ops,
    without and with a relu."""
    rng = np.random.default_rng(0)
    with pytensor.config.change_flags(floatX="float64"):
        values = [conv_values(g, rng) for g in GEOMETRIES]
        return values, {run: [forward_and_gradients(g, v, *run) for g, v in zip(GEOMETRIES, values)]
                        for run in RUNS}


@pytest.mark.parametrize("activation", ["linear", "relu"])
@pytest.mark.parametrize("case", range(len(GEOMETRIES)), ids=GEOMETRY_IDS)
def test_c_numpy_and_graph_agree_with_the_reference(computed, case, activation):
    values, results = computed
    _, _, strides, dilation, pads, bias = GEOMETRIES[case]
    x, w = values[case][:2]
    b = values[case][3] if bias else None
    xp = np.pad(x, [(0, 0), (0, 0)] + list(pads))  # the reference pads by hand, then "valid"
    expected = ref_conv(xp, w, b, list(strides), ["valid"] * len(strides), list(dilation))
    if activation == "relu":
        expected = np.maximum(expected, 0)
    c = results["c", activation][case]
    np.testing.assert_allclose(c[0], expected, rtol=1e-10, atol=1e-10)
    for how in ("py", "graph"):
        for got, want in zip(c, results[how, activation][case]):
            assert got.shape == want.shape and got.dtype == want.dtype
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10, err_msg=how)


@pytest.mark.parametrize("c", [True, False], ids=["c", "numpy"])
def test_relu_in_the_op_has_derivative_one_at_zero(c):
    """As PyTensor's maximum(z, 0): relu's derivative is 1 where z = 0 exactly (a window of
    zeros, no bias) and 0 below; the op writes relu(z < 0) as -0.0 to tell them apart."""
    x = np.zeros((1, 1, 4, 4))
    x[0, 0, :, 2:] = 1.0
    w = np.full((2, 1, 1, 2), 0.5)
    w[1] *= -1                            # filter 1: z = -0.5 or -1 where the input is not zero
    dy = np.ones((1, 2, 4, 3))
    xv, wv, dyv = symbol(x), symbol(w), symbol(dy)
    y = conv(xv, wv, activation="relu")
    graph = pt.maximum(conv(xv, wv), 0.0)
    outs = [y] + pytensor.grad(pt.sum(y * dyv), [xv, wv])
    outs += [graph] + pytensor.grad(pt.sum(graph * dyv), [xv, wv])
    got = function([xv, wv, dyv], outs, c)(x, w, dy)
    for fused, unfused in zip(got[:3], got[3:]):
        np.testing.assert_array_equal(fused, unfused)
    assert np.all(got[0][0, 1] == 0)
    np.testing.assert_array_equal(np.signbit(got[0][0, 1]), [[False, True, True]] * 4)


def test_float32_matches_float64():
    rng = np.random.default_rng(1)
    geometry = layer_geometry(1)
    values = conv_values(geometry, rng)
    want = forward_and_gradients(geometry, values, "c")
    got = forward_and_gradients(geometry, [v.astype("float32") for v in values], "c")
    for g, w in zip(got, want):
        assert g.dtype == np.float32
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("activation", ["linear", "relu"])
@pytest.mark.parametrize("geometry", [
    ((1, 2, 5, 4), (2, 2, 3, 2), (2, 1), (1, 2), ((1, 1), (0, 1)), True),
    ((1, 2, 7), (2, 2, 3), (2,), (2,), ((1, 2),), False),
], ids=["conv2d", "conv1d"])
def test_gradients_numerically(geometry, activation):
    """verify_grad (finite differences) of the C code, every input at once."""
    rng = np.random.default_rng(2)
    _, _, strides, dilation, pads, bias = geometry
    values = conv_values(geometry, rng)
    del values[2]  # no cotangent: verify_grad projects the output itself

    def fun(x, w, *b):
        return conv(x, w, b[0] if b else None, strides, dilation, pads, activation)

    with ops_in_c():
        verify_grad(fun, values, n_tests=1, rng=rng)


def test_second_derivatives_numerically():
    """The gradient ops have gradients of their own (a forward convolution and the other
    gradient op): verify_grad through ConvGradInput and ConvGradWeights in C."""
    rng = np.random.default_rng(3)
    geometry = ((1, 2, 5, 4), (2, 2, 3, 2), (2, 1), (1, 1), ((1, 1), (1, 0)), True)
    x, w, dy, _ = conv_values(geometry, rng)
    g = geometry[2:5]

    def grad_input(w_, dy_):
        return ConvGradInput(*g)(pt.as_tensor(x), w_, dy_)

    def grad_weights(x_, dy_):  # dW and db, as one vector
        dw, db = ConvGradWeights(*g, bias=True)(x_, pt.as_tensor(w), dy_)
        return pt.concatenate([dw.flatten(), db])

    with ops_in_c():
        verify_grad(grad_input, [w, dy], n_tests=1, rng=rng)
        verify_grad(grad_weights, [x, dy], n_tests=1, rng=rng)
    # with the activation in the op: a clear error, not a wrong number
    xv, wv = pt.tensor4(), pt.tensor4()
    y = conv(xv, wv, strides=(1, 1), activation="relu")
    dx = pytensor.grad(pt.sum(y * y), xv)
    with pytest.raises(NullTypeGradError, match="activation in the op"):
        pytensor.grad(pt.sum(dx), wv)


def test_op_rejects_bad_arguments():
    x4, x3 = pt.tensor4(), pt.tensor3()
    with pytest.raises(TypeError, match="need 4 axes"):
        Conv((1, 1), (1, 1), ((0, 0), (0, 0)))(x3, pt.tensor4())
    with pytest.raises(ValueError, match="one entry per spatial axis"):
        Conv((1, 1), (1,), ((0, 0), (0, 0)))
    with pytest.raises(ValueError, match="must be positive"):
        Conv((0, 1), (1, 1), ((0, 0), (0, 0)))
    with pytest.raises(TypeError, match="b needs 1 axis"):
        Conv((1, 1), (1, 1), ((0, 0), (0, 0)))(x4, pt.tensor4(), pt.matrix())
    with pytest.raises(ValueError, match="no activation 'tanh' in the op"):
        Conv((1, 1), (1, 1), ((0, 0), (0, 0)), "tanh")
    with pytest.raises(TypeError, match="the forward output y is an input exactly when"):
        ConvGradInput((1, 1), (1, 1), ((0, 0), (0, 0)), "relu")(x4, pt.tensor4(), pt.tensor4())
    with pytest.raises(TypeError, match="the forward output y is an input exactly when"):
        ConvGradWeights((1, 1), (1, 1), ((0, 0), (0, 0)))(x4, x4, x4, x4)


@pytest.mark.parametrize("c", [True, False], ids=["c", "numpy"])
def test_shape_mismatches_are_errors(c):
    x, w = pt.tensor4(), pt.tensor4()
    fn = function([x, w], conv(x, w, strides=(1, 1)), c)
    with pytest.raises(ValueError, match="W has 1 input channels, the input 2"):
        fn(np.zeros((1, 2, 4, 4)), np.zeros((3, 1, 2, 2)))
    with pytest.raises(ValueError, match="spans more than the padded input"):
        fn(np.zeros((1, 2, 4, 4)), np.zeros((3, 2, 5, 2)))
    dx = function([x, w, y := pt.tensor4()], ConvGradInput((1, 1), (1, 1), ((0, 0), (0, 0)))(x, w, y), c)
    with pytest.raises(ValueError, match="ConvGradInput: dy has the wrong shape"):
        dx(np.zeros((1, 2, 4, 4)), np.zeros((3, 2, 2, 2)), np.zeros((1, 3, 3, 2)))


def test_static_and_inferred_shapes():
    x = pt.tensor(dtype="float64", shape=(None, 3, 9, 8))
    w = pt.tensor(dtype="float64", shape=(4, 3, 3, 2))
    y = conv(x, w, strides=(2, 1), dilation=(1, 3), pads=((1, 0), (2, 2)))
    assert y.type.shape == (None, 4, 4, 9)
    fn = pytensor.function([x, w], y.shape, mode=TEST_MODE)
    assert not [n for n in fn.maker.fgraph.apply_nodes if isinstance(n.op, Conv)]
    assert tuple(fn(np.zeros((5, 3, 9, 8)), np.zeros((4, 3, 3, 2)))) == (5, 4, 4, 9)


# -- the compiled training step ---------------------------------------------------------------
CNN = """\
name: t
data: {train: none.npz}
model:
  input_shape: [1, 12, 12]
  layers:
    - {type: conv2d, filters: 4, kernel_size: 3, padding: same, activation: relu}
    - {type: max_pool2d, pool_size: 2}
    - {type: conv2d, filters: 4, kernel_size: 3, strides: 2, padding: 1}
    - {type: avg_pool2d, pool_size: 2, padding: same}
    - {type: reshape, shape: [4, -1]}
    - {type: conv1d, filters: 3, kernel_size: 2, padding: same, use_bias: false}
    - {type: max_pool1d, pool_size: 3, strides: 1, padding: same}
    - {type: avg_pool1d, pool_size: 2, strides: 1}
    - {type: flatten}
    - {type: dense, units: 3, activation: softmax}
train: {loss: categorical_crossentropy, optimizer: {type: adam}}
"""


def test_training_step_is_c_only_without_graph_im2col():
    """A CNN's compiled training step (netbuild's own compile mode, float32): every conv and
    pool is one of netbuild's ops, nothing is left of the graph im2col (joins of slices, padded
    copies, increments of subtensors), every node has C code, and a step runs."""
    from pytensor.tensor.basic import Join
    from pytensor.tensor.subtensor import IncSubtensor

    with pytensor.config.change_flags(floatX="float32"):
        spec = validate(load_text(CNN, "t.yaml"))
        net = Network.from_spec(spec)
        y = np.eye(3, dtype="float32")[[0, 1, 2, 1]]
        step = compile_train(net, spec.data["train"], [y], 0).step
        ops = [n.op for n in step.fn.maker.fgraph.apply_nodes]
        assert {type(op) for op in ops} >= {Conv, ConvGradInput, ConvGradWeights, Pool, PoolGrad}
        # the relu runs in the first conv's ops; its pre-activation left the graph
        assert sorted(op.activation for op in ops if type(op) is Conv) == ["linear", "linear", "relu"]
        assert [op.activation for op in ops if type(op) is ConvGradWeights].count("relu") == 1
        assert not [op for op in ops if isinstance(op, (Join, IncSubtensor))]
        assert python_nodes(step, "train") == []
        x = np.random.default_rng(0).normal(size=(4, 1, 12, 12)).astype("float32")
        losses = [step(x, y).loss / len(x) for _ in range(3)]
        assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]


@pytest.mark.parametrize("case", range(len(CASES)), ids=IDS)
def test_layer_matches_its_graph_version(case):
    """A layer (through the op, in C) gives what it gave when built from PyTensor's own ops,
    activation included."""
    cls, shape, cfg = CASES[case]
    rng = np.random.default_rng(5)
    layer = make(cls, **cfg)
    layer.output_shape([shape])
    values = with_params(layer, shape, rng)
    x = pt.tensor(dtype="float64", shape=(None,) + shape)
    y = layer.forward([x], Context(training=False))
    z = _graph_conv(x, layer.params["W"], layer.params.get("b"), layer.geometry(shape), shape[0],
                    int(cfg["filters"]))
    graph = activations.get(cfg.get("activation", "linear"))(z)
    got, want = function([x], [y, graph], c=True)(rng.normal(size=(3,) + shape))
    assert got.shape[1:] == layer.output_shape([shape]) and set(values) <= {"W", "b"}
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


# -- the jax backend: each op's jax method against its C code -----------------------------------
needs_jax = pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax not installed")


@contextlib.contextmanager
def jax_x64():
    """netbuild's ops registered with PyTensor's JAX dispatch, and JAX in float64 meanwhile
    (PyTensor enables it only where floatX was float64 when its dispatch was first imported)."""
    from netbuild.backend import jax_modules

    with jax_modules().enable_x64(True):
        yield


def jax_function(inputs, outputs):
    """``pytensor.function`` in PyTensor's JAX mode, netbuild's ops (checked to be in the graph)
    by their ``jax`` methods."""
    fn = pytensor.function(inputs, outputs, mode="JAX", on_unused_input="ignore")
    assert [n for n in fn.maker.fgraph.apply_nodes if isinstance(n.op, NetbuildCOp)]
    return fn


def conv_graph(geometry, values, activation: str = "linear"):
    """Symbolic inputs ``x, W, dy (, b)``, and ``y`` and the gradients of ``sum(y * dy)`` for
    ``x, W (, b)`` through the op (Conv, ConvGradInput, ConvGradWeights)."""
    _, _, strides, dilation, pads, _ = geometry
    x, w, dy, *b = ins = [symbol(v) for v in values]
    y = conv(x, w, b[0] if b else None, strides, dilation, pads, activation)
    return ins, [y] + pytensor.grad(pt.sum(y * dy), [x, w] + b)


def jax_and_c(graphs, values) -> tuple[list, list]:
    """The outputs of several ``(inputs, outputs)`` graphs, all compiled as one function in JAX
    and one in C (one jit compilation), each graph's own list."""
    ins = [i for g in graphs for i in g[0]]
    outs = [o for g in graphs for o in g[1]]
    with jax_x64():
        got = [np.asarray(v) for v in jax_function(ins, outs)(*values)]
    want = function(ins, outs, c=True)(*values)
    results = []
    for _, o in graphs:
        results.append((got[:len(o)], want[:len(o)]))
        got, want = got[len(o):], want[len(o):]
    return results


#: (geometry, activation): every geometry, and a relu on a few (XLA compiles a second or so each)
JAX_RUNS = ([(case, "linear") for case in range(len(GEOMETRIES))]
            + [(case, "relu") for case in (2, 3, 9, len(CASES) + 2)])


@pytest.fixture(scope="module")
def jax_computed():
    """Forward and gradients of :data:`JAX_RUNS` in JAX and in C."""
    rng = np.random.default_rng(7)
    with pytensor.config.change_flags(floatX="float64"):
        values = [conv_values(GEOMETRIES[case], rng) for case, _ in JAX_RUNS]
        graphs = [conv_graph(GEOMETRIES[case], v, act) for (case, act), v in zip(JAX_RUNS, values)]
        return jax_and_c(graphs, [v for vs in values for v in vs])


@needs_jax
@pytest.mark.parametrize("run", range(len(JAX_RUNS)),
                         ids=[f"{GEOMETRY_IDS[c]}-{a}" for c, a in JAX_RUNS])
def test_jax_matches_c(jax_computed, run):
    """y, dx, dW (and db) of Conv and its gradient ops in JAX (strides, dilation, padding, 1-d
    and 2-d, bias, relu) are the C code's, float64."""
    got, want = jax_computed[run]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype == np.float64
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-10)


@needs_jax
def test_jax_float32_matches_c():
    rng = np.random.default_rng(8)
    geometry = ((2, 3, 7, 6), (4, 3, 3, 2), (2, 1), (1, 2), ((1, 2), (0, 1)), True)
    values = conv_values(geometry, rng, "float32")
    with pytensor.config.change_flags(floatX="float32"):
        ((got, want),) = jax_and_c([conv_graph(geometry, values, "relu")], values)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype == np.float32
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


@needs_jax
def test_jax_relu_in_the_op_has_derivative_one_at_zero():
    """As in C, the JAX relu writes a negative as -0.0 and its derivative is 1 at z = 0."""
    x = np.zeros((1, 1, 4, 4))
    x[0, 0, :, 2:] = 1.0
    w = np.full((2, 1, 1, 2), 0.5)
    w[1] *= -1
    dy = np.ones((1, 2, 4, 3))
    ((got, want),) = jax_and_c([conv_graph((x.shape, w.shape, (1, 1), (1, 1),
                                            ((0, 0), (0, 0)), False), [x, w, dy], "relu")],
                               [x, w, dy])
    for g, c in zip(got, want):
        np.testing.assert_array_equal(g, c)
        np.testing.assert_array_equal(np.signbit(g), np.signbit(c))


@needs_jax
def test_jax_gradient_ops_on_their_own():
    """ConvGradInput with a symbolic shape input (conv_transpose: zeros of the batch's size),
    ConvGradWeights with a bias, and their second derivatives, in JAX as in C."""
    rng = np.random.default_rng(9)
    geometry = ((2, 2), (1, 2), ((1, 0), (2, 1)))
    x = pt.tensor3()
    wt = pt.tensor3()
    xv, wtv = rng.normal(size=(2, 3, 6)), rng.normal(size=(3, 2, 3))
    up = conv_transpose(x, wt, (11,), (2,), (1,), ((1, 1),))
    x4, w4, dy4 = pt.tensor4(), pt.tensor4(), pt.tensor4()
    dw, db = ConvGradWeights(*geometry, bias=True)(x4, w4, dy4)
    dx = ConvGradInput(*geometry)(x4, w4, dy4)
    second = pytensor.grad(pt.sum(dx ** 2) + pt.sum(dw ** 2), [w4, dy4])
    values = [xv, wtv, rng.normal(size=(2, 3, 6, 5)), rng.normal(size=(4, 3, 2, 2)),
              rng.normal(size=(2, 4, 3, 3))]
    ((got, want),) = jax_and_c([([x, wt, x4, w4, dy4], [up, dw, db, dx, *second])], values)
    assert got[0].shape == (2, 2, 11)
    for g, c in zip(got, want):
        assert g.shape == c.shape
        np.testing.assert_allclose(g, c, rtol=1e-10, atol=1e-10)
