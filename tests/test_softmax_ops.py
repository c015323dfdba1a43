"""The softmax ops (netbuild/ops/softmax.py): their C code and numpy ``perform`` against
independent numpy formulas (class ids and target rows, label smoothing, ranks 1-3, strided inputs,
extreme logits), numerical gradients and second derivatives, errors, and the compiled training
step of a classifier: one softmax, shared by the output and the loss's gradient.

Graphs run in the tests' Python mode except netbuild's ops, which run their C code inside
test_conv_ops's :func:`ops_in_c`.
"""

from __future__ import annotations


import numpy as np
import pytensor
import pytensor.tensor as pt
import pytest
from conftest import assert_same, jax_function, needs_jax, verify_grad
from pytensor.gradient import DisconnectedInputError
from test_conv_ops import function, symbol

from netbuild import backend, losses
from netbuild.ops.softmax import (
    Softmax,
    SoftmaxCrossEntropy,
    SoftmaxCrossEntropyGrad,
    SoftmaxGrad,
    softmax,
    softmax_cross_entropy,
)

pytestmark = pytest.mark.usefixtures("float64")
HOW = pytest.mark.parametrize("c", [True, False], ids=["c", "numpy"])
RNG = np.random.default_rng(3)


# -- references, in float64 -----------------------------------------------------------------------
def ref_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def ref_targets(t, k, smoothing):
    rows = np.eye(k)[t] if t.dtype.kind in "iu" else np.asarray(t, dtype=np.float64)
    return rows * (1 - smoothing) + smoothing / k


def ref_xent(x, t, smoothing=0.0):
    """``-sum(t' log softmax(x))``, by the log of the softmax (no logsumexp shortcut)."""
    rows = ref_targets(t, x.shape[-1], smoothing)
    return -(rows * np.log(ref_softmax(x))).sum(-1)


SHAPES = [(5,), (4, 7), (2, 3, 6), (3, 1)]


@HOW
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_softmax_matches_numpy(c, shape):
    x = RNG.normal(size=shape) * 3
    xv = symbol(x)
    (p,) = function([xv], [softmax(xv)], c)(x)
    np.testing.assert_allclose(p, ref_softmax(x), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-12)


@HOW
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("targets", ["ids", "rows"])
def test_cross_entropy_matches_numpy(c, smoothing, shape, targets):
    x = RNG.normal(size=shape) * 3
    if targets == "ids":
        t = RNG.integers(0, shape[-1], shape[:-1])
    else:
        t = RNG.dirichlet(np.ones(shape[-1]), shape[:-1])
    xv, tv = symbol(x), symbol(t)
    (loss,) = function([xv, tv], [softmax_cross_entropy(xv, tv, smoothing)], c)(x, t)
    assert loss.shape == shape[:-1]
    np.testing.assert_allclose(loss, ref_xent(x, t, smoothing), rtol=1e-10, atol=1e-12)


@HOW
def test_rows_that_do_not_sum_to_one(c):
    """Target rows are used as given: ``sum(t) logsumexp(x) - sum(t x)``."""
    x, t = RNG.normal(size=(3, 4)), np.array([[0.0, 0, 0, 0], [2, 0, 1, 0], [0.5, 0, 0, 0]])
    xv, tv = symbol(x), symbol(t)
    loss, dx = function([xv, tv], [softmax_cross_entropy(xv, tv),
                                   pytensor.grad(softmax_cross_entropy(xv, tv).sum(), xv)], c)(x, t)
    np.testing.assert_allclose(loss, ref_xent(x, t), rtol=1e-12)
    np.testing.assert_allclose(dx, ref_softmax(x) * t.sum(-1, keepdims=True) - t, rtol=1e-12)


@HOW
def test_strided_and_transposed_inputs(c):
    """Inputs that are not C-contiguous (a transposed view, a strided slice) read correctly."""
    base = RNG.normal(size=(6, 8))
    bv = symbol(base)
    ids = np.array([0, 5, 2, 1, 3, 4, 0, 2])
    iv = symbol(ids)
    p, loss = function([bv, iv], [softmax(bv.T), softmax_cross_entropy(bv.T[:, ::2], iv % 3)], c)(base, ids)
    np.testing.assert_allclose(p, ref_softmax(base.T), rtol=1e-12)
    np.testing.assert_allclose(loss, ref_xent(base.T[:, ::2], ids % 3), rtol=1e-12)


@HOW
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_extreme_logits_stay_finite(c, dtype):
    """Logits of +-1e4: no overflow; the loss of a confidently wrong class is its margin."""
    x = np.array([[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4]], dtype=dtype)
    t = np.array([1, 2])
    xv, tv = symbol(x), symbol(t)
    loss = softmax_cross_entropy(xv, tv)
    p, value, dx = function([xv, tv], [softmax(xv), loss, pytensor.grad(loss.sum(), xv)], c)(x, t)
    assert np.isfinite(p).all() and np.isfinite(value).all() and np.isfinite(dx).all()
    np.testing.assert_allclose(value, [2e4, np.log(3)], rtol=1e-6)
    np.testing.assert_allclose(dx, [[1.0, -1.0, 0.0], [1 / 3, 1 / 3, -2 / 3]], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(p[1], 1 / 3, rtol=1e-6)
    assert value.dtype == dtype


@HOW
def test_float32_agrees_with_float64(c):
    x = RNG.normal(size=(16, 10)) * 4
    t = RNG.integers(0, 10, 16)
    x32 = x.astype("float32")
    xv, tv = symbol(x32), symbol(t)
    loss = softmax_cross_entropy(xv, tv, 0.05)
    p, value, dx = function([xv, tv], [softmax(xv), loss, pytensor.grad(loss.sum(), xv)], c)(x32, t)
    assert p.dtype == value.dtype == dx.dtype == np.float32
    np.testing.assert_allclose(value, ref_xent(x, t, 0.05), rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(dx, ref_softmax(x) - ref_targets(t, 10, 0.05), atol=2e-7)


# -- gradients --------------------------------------------------------------------------------------
@HOW
@pytest.mark.parametrize("targets", ["ids", "rows"])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_gradient_of_the_logits_is_softmax_minus_targets(c, targets, smoothing):
    """``d loss / d x = dl (p sum(t') - t')``, here with per-row weights ``dl``."""
    x = RNG.normal(size=(5, 4))
    t = RNG.integers(0, 4, 5) if targets == "ids" else RNG.dirichlet(np.ones(4), 5)
    w = RNG.normal(size=5)
    xv, tv = symbol(x), symbol(t)
    (dx,) = function([xv, tv], [pytensor.grad((softmax_cross_entropy(xv, tv, smoothing) * w).sum(),
                                              xv)], c)(x, t)
    rows = ref_targets(t, 4, smoothing)
    expected = w[:, None] * (ref_softmax(x) * rows.sum(-1, keepdims=True) - rows)
    np.testing.assert_allclose(dx, expected, rtol=1e-12, atol=1e-14)


@HOW
def test_one_gradient_value_for_every_row(c):
    """The gradient op accepts one ``dl`` for all rows (a broadcast mean's gradient)."""
    p = ref_softmax(RNG.normal(size=(3, 4)))
    t = np.array([0, 3, 1])
    dlv, pv, tv = pt.dvector("dl"), symbol(p), symbol(t)
    (dx,) = function([dlv, pv, tv], [SoftmaxCrossEntropyGrad(0.0)(dlv, pv, tv)], c)(
        np.array([0.5]), p, t)
    np.testing.assert_allclose(dx, 0.5 * (p - np.eye(4)[t]), rtol=1e-12)


def test_gradients_numerically():
    """Every op's gradient against finite differences (the numpy ``perform``s; the C code gives
    the same values, as the tests above show)."""
    x = RNG.normal(size=(3, 5))
    ids = RNG.integers(0, 5, 3)
    rows = RNG.dirichlet(np.ones(5), 3)
    w = RNG.normal(size=(3, 5))
    verify_grad(lambda x: softmax(x) * w, [x])
    verify_grad(lambda x: SoftmaxCrossEntropy(0.1)(x, pt.constant(ids)), [x])
    verify_grad(lambda x, t: SoftmaxCrossEntropy(0.1)(x, t), [x, rows])
    verify_grad(lambda x: SoftmaxCrossEntropy(0.0)(x[None], pt.constant(ids[:1])), [x[0]])
    p = ref_softmax(x)
    verify_grad(lambda dp, p: SoftmaxGrad()(dp, p), [w, p])
    verify_grad(lambda dl, p: SoftmaxCrossEntropyGrad(0.1)(dl, p, pt.constant(ids)), [w[:, 0], p])
    verify_grad(lambda dl, p, t: SoftmaxCrossEntropyGrad(0.1)(dl, p, t), [w[:, 0], p, rows])


@HOW
def test_second_derivatives(c):
    """The Hessian-vector product of the loss through both gradient ops, against a numpy
    finite difference of the analytic gradient."""
    x = RNG.normal(size=(2, 4))
    t = np.array([1, 3])
    v = RNG.normal(size=(2, 4))
    xv, tv = symbol(x), symbol(t)
    loss = (softmax_cross_entropy(xv, tv) + (softmax(xv) ** 2).sum(-1)).sum()
    grad = pytensor.grad(loss, xv)
    (hv,) = function([xv, tv], [pytensor.grad((grad * v).sum(), xv)], c)(x, t)

    def analytic_grad(x):
        p = ref_softmax(x)
        dp = 2 * p
        return p - np.eye(4)[t] + p * (dp - (dp * p).sum(-1, keepdims=True))

    h = 1e-6
    expected = (analytic_grad(x + h * v) - analytic_grad(x - h * v)) / (2 * h)
    np.testing.assert_allclose(hv, expected, rtol=1e-6, atol=1e-8)


def test_the_targets_of_class_ids_have_no_gradient():
    """Class ids are disconnected from the loss (as integer indices), not a zero gradient."""
    x, t = pt.dmatrix("x"), pt.lvector("t")
    loss = softmax_cross_entropy(x, t).sum()
    with pytest.raises(DisconnectedInputError):
        pytensor.grad(loss, t)
    assert pytensor.grad(loss, [x, t], disconnected_inputs="ignore",
                         return_disconnected="none")[1] is None


# -- errors -----------------------------------------------------------------------------------------
@HOW
@pytest.mark.parametrize("bad", [-1, 4])
def test_class_id_out_of_range_raises(c, bad):
    x = RNG.normal(size=(3, 4))
    t = np.array([0, bad, 1])
    xv, tv = symbol(x), symbol(t)
    fn = function([xv, tv], [softmax_cross_entropy(xv, tv)], c)
    with pytest.raises(ValueError, match="outside the output's range; expected ids 0..3"):
        fn(x, t)


@HOW
def test_targets_of_the_wrong_shape_raise(c):
    xv, tv = pt.dmatrix("x"), pt.dmatrix("t")
    fn = function([xv, tv], [softmax_cross_entropy(xv, tv)], c)
    with pytest.raises(ValueError, match="shape"):
        fn(np.zeros((3, 4)), np.zeros((3, 5)))


@HOW
def test_logits_without_classes_raise(c):
    """An empty last axis has no softmax: every op says so (C and numpy alike)."""
    x = np.zeros((3, 0))
    xv = symbol(x)
    ids, rows = np.zeros(3, dtype=np.int64), np.zeros((3, 0))
    iv, rv = symbol(ids), symbol(rows)
    cases = [([xv], softmax(xv), [x]),
             ([xv, iv], softmax_cross_entropy(xv, iv), [x, ids]),
             ([xv, rv], softmax_cross_entropy(xv, rv), [x, rows])]
    for variables, output, values in cases:
        fn = function(variables, [output], c)
        with pytest.raises(ValueError, match="no classes"):
            fn(*values)


def test_make_node_refuses_wrong_types():
    with pytest.raises(TypeError, match="float tensor"):
        Softmax()(pt.lmatrix())
    with pytest.raises(TypeError, match="class ids"):
        SoftmaxCrossEntropy()(pt.dmatrix(), pt.ltensor3())
    with pytest.raises(ValueError, match="label smoothing"):
        SoftmaxCrossEntropy(1.5)


# -- in a compiled classifier -----------------------------------------------------------------------
def test_classifier_step_has_one_softmax_and_no_elementwise_softmax():
    """The training step of a softmax classifier: the output's softmax is the node the loss's
    gradient reads (merged into one), no max/exp/log of the logits is left in the graph, and the
    step computes the loss and SGD update of numpy's formulas."""
    x, y = pt.dmatrix("x"), pt.lvector("y")
    w0 = RNG.normal(size=(6, 3))
    w = pytensor.shared(w0.copy())
    logits = x @ w
    out = losses.Output(softmax(logits), logits, "softmax")
    loss = losses.get("categorical_crossentropy")(y, out).mean()
    fn = pytensor.function([x, y], [loss, out.value], updates={w: w - 0.1 * pytensor.grad(loss, w)},
                           mode=backend.mode())
    nodes = fn.maker.fgraph.toposort()
    ops = [type(n.op).__name__ for n in nodes]
    assert ops.count("Softmax") == 1
    assert "SoftmaxCrossEntropy" in ops and "SoftmaxCrossEntropyGrad" in ops
    described = " ".join(str(n.op) for n in nodes)
    for name in ("Max", "exp", "log"):
        assert name not in described
    xs, ys = RNG.normal(size=(4, 6)), np.array([0, 2, 1, 2])
    value, probs = fn(xs, ys)
    p = ref_softmax(xs @ w0)
    np.testing.assert_allclose(value, ref_xent(xs @ w0, ys).mean(), rtol=1e-12)
    np.testing.assert_allclose(probs, p, rtol=1e-12)
    np.testing.assert_allclose(w.get_value(), w0 - 0.1 * xs.T @ (p - np.eye(3)[ys]) / 4, rtol=1e-12)


# -- the jax backend (each op's ``jax``) against its C code ----------------------------------------
def all_four(x, t, smoothing):
    """Inputs and outputs of the four ops for logits like ``x`` and targets like ``t``."""
    xv, tv, dpv, dlv = symbol(x), symbol(t), symbol(x), pt.tensor(dtype=x.dtype,
                                                                   shape=(None,) * (x.ndim - 1))
    p = softmax(xv)
    outs = [p, SoftmaxGrad()(dpv, p), SoftmaxCrossEntropy(smoothing)(xv, tv),
            SoftmaxCrossEntropyGrad(smoothing)(dlv, p, tv)]
    return [xv, tv, dpv, dlv], outs


def targets_like(x, kind):
    k = x.shape[-1]
    if kind == "ids":
        return RNG.integers(0, k, x.shape[:-1])
    return RNG.dirichlet(np.ones(k), x.shape[:-1]).astype(x.dtype)


@needs_jax
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("targets", ["ids", "rows"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_jax_ops_match_c(shape, targets, smoothing):
    x = RNG.normal(size=shape) * 3
    t = targets_like(x, targets)
    dp, dl = RNG.normal(size=shape), RNG.normal(size=shape[:-1])
    inputs, outs = all_four(x, t, smoothing)
    want = function(inputs, outs, True)(x, t, dp, dl)
    assert_same(jax_function(inputs, outs)(x, t, dp, dl), want, 1e-10)


@needs_jax
@pytest.mark.parametrize("targets", ["ids", "rows"])
def test_jax_ops_in_float32(targets):
    x = (RNG.normal(size=(6, 9)) * 3).astype("float32")
    t = targets_like(x, targets)
    dp, dl = RNG.normal(size=x.shape).astype("float32"), RNG.normal(size=6).astype("float32")
    inputs, outs = all_four(x, t, 0.05)
    want = function(inputs, outs, True)(x, t, dp, dl)
    assert_same(jax_function(inputs, outs)(x, t, dp, dl), want, 1e-5)


@needs_jax
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_jax_extreme_logits_stay_finite(dtype):
    x = np.array([[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4]], dtype=dtype)
    t = np.array([1, 2])
    xv, tv = symbol(x), symbol(t)
    loss = softmax_cross_entropy(xv, tv)
    outs = [softmax(xv), loss, pytensor.grad(loss.sum(), xv)]
    got = jax_function([xv, tv], outs)(x, t)
    assert all(np.isfinite(np.asarray(v)).all() for v in got)
    assert_same(got, function([xv, tv], outs, True)(x, t), 1e-6)


@needs_jax
def test_jax_one_gradient_value_for_every_row():
    p = ref_softmax(RNG.normal(size=(3, 4)))
    dlv, pv, tv = pt.dvector("dl"), symbol(p), pt.lvector("t")
    t = np.array([0, 3, 1])
    out = [SoftmaxCrossEntropyGrad(0.2)(dlv, pv, tv)]
    dl = np.array([0.5])
    assert_same(jax_function([dlv, pv, tv], out)(dl, p, t),
                function([dlv, pv, tv], out, True)(dl, p, t), 1e-10)


@needs_jax
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("targets", ["ids", "rows"])
def test_jax_gradient_end_to_end(targets, smoothing):
    """``pytensor.grad`` through the forward ops (building the gradient ops), in JAX and in C."""
    x = RNG.normal(size=(2, 3, 5))
    t = targets_like(x, targets)
    w, v = RNG.normal(size=(2, 3)), RNG.normal(size=x.shape)
    xv, tv = symbol(x), symbol(t)
    cost = (softmax_cross_entropy(xv, tv, smoothing) * w).sum() + (softmax(xv) * v).sum()
    wrt = [xv] if targets == "ids" else [xv, tv]
    outs = [cost, *pytensor.grad(cost, wrt)]
    assert_same(jax_function([xv, tv], outs)(x, t), function([xv, tv], outs, True)(x, t), 1e-10)


@needs_jax
@pytest.mark.parametrize("bad", [-1, 4])
def test_jax_class_id_out_of_range_is_nan(bad):
    """JAX cannot raise inside a compiled function: the row of a bad id is NaN, not a wrapped
    or clipped id's value; the other rows are right."""
    x = RNG.normal(size=(3, 4))
    t = np.array([0, bad, 1])
    xv, tv = symbol(x), symbol(t)
    loss = softmax_cross_entropy(xv, tv)
    value, dx = (np.asarray(v) for v in
                 jax_function([xv, tv], [loss, pytensor.grad(loss.sum(), xv)])(x, t))
    assert np.isnan(value[1]) and np.isnan(dx[1]).all()
    ok = [0, 2]
    np.testing.assert_allclose(value[ok], ref_xent(x[ok], t[ok]), rtol=1e-10)
    np.testing.assert_allclose(dx[ok], ref_softmax(x[ok]) - np.eye(4)[t[ok]], rtol=1e-10,
                               atol=1e-12)


@needs_jax
def test_jax_a_minus_inf_logit_of_another_class():
    """A logit of ``-inf`` (a masked class) that is not the target: a finite loss and gradient,
    as in C."""
    x = np.array([[0.0, -np.inf, 1.0], [2.0, 0.0, -np.inf]])
    t = np.array([0, 1])
    xv, tv = symbol(x), symbol(t)
    loss = softmax_cross_entropy(xv, tv)
    outs = [loss, pytensor.grad(loss.sum(), xv)]
    got = jax_function([xv, tv], outs)(x, t)
    assert all(np.isfinite(np.asarray(v)).all() for v in got)
    assert_same(got, function([xv, tv], outs, True)(x, t), 1e-10)
