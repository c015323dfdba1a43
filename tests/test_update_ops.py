"""The fused optimizer steps in C: Adam against a numpy reference of PyTorch's Adam/AdamW
equations, SGD-momentum's ``p -= lr * v`` against numpy."""

from __future__ import annotations

import numpy as np
import pytensor
import pytensor.tensor as pt
import pytest

from conftest import assert_same, jax_function, needs_jax
from netbuild import backend
from netbuild.ops.update import AdamStep, DescentStep, adam_step


def reference(p, m, v, g, lr, t, b1, b2, eps, wd):
    """torch.optim.AdamW's step (weight_decay 0: Adam), in float64."""
    p = p * (1 - lr * wd)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    denom = np.sqrt(v) / np.sqrt(1 - b2 ** t) + eps
    return p - lr / (1 - b1 ** t) * m / denom, m, v


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("wd", [0.0, 0.05])
@pytest.mark.parametrize("transposed", [False, True])
def test_compiled_steps_match_reference(dtype, wd, transposed):
    with pytensor.config.change_flags(floatX=dtype):  # the graph's constants in this precision
        _check_steps(dtype, wd, transposed)


def _check_steps(dtype, wd, transposed):
    rng = np.random.default_rng(1)
    shape = (37, 23)
    p0 = rng.standard_normal(shape)
    P = pytensor.shared(p0.astype(dtype), name="p")
    M = pytensor.shared(np.zeros(shape, dtype), name="m")
    V = pytensor.shared(np.zeros(shape, dtype), name="v")
    t = pytensor.shared(np.asarray(0, dtype="int64"), name="t")
    g_in = pt.matrix("g", dtype=dtype)
    g = g_in.T if transposed else g_in  # a non-contiguous gradient is read correctly
    lr, b1, b2, eps = 0.01, 0.9, 0.999, 1e-7
    step = (t + 1).astype(dtype)
    p2, m2, v2 = adam_step(P, M, V, g, lr / (1 - b1 ** step), 1 / pt.sqrt(1 - b2 ** step), lr * wd,
                           b1, b2, eps)
    fn = pytensor.function([g_in], [], updates={P: p2, M: m2, V: v2, t: t + 1}, mode=backend.mode())
    ops = [n.op for n in fn.maker.fgraph.toposort() if isinstance(n.op, AdamStep)]
    assert len(ops) == 1 and ops[0].inplace  # the shared variables are updated in place
    assert all(hasattr(th, "cthunk") for th, n in zip(fn.vm.thunks, fn.maker.fgraph.toposort())
               if isinstance(n.op, AdamStep))
    p, m, v = p0, np.zeros(shape), np.zeros(shape)
    for k in range(1, 4):
        grad = rng.standard_normal(shape)
        fn((grad.T if transposed else grad).astype(dtype))
        p, m, v = reference(p, m, v, grad, lr, k, b1, b2, eps, wd)
    tol = 1e-5 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(P.get_value(), p, rtol=tol, atol=tol)
    np.testing.assert_allclose(M.get_value(), m, rtol=tol, atol=tol)
    np.testing.assert_allclose(V.get_value(), v, rtol=tol, atol=tol)


def test_not_in_place_when_the_input_is_read_afterwards():
    """A parameter still needed after the step is copied, not overwritten."""
    P = pytensor.shared(np.ones(5, "float32"), name="p")
    zeros = np.zeros(5, "float32")
    g = pt.vector("g")
    p2, _, _ = AdamStep(0.9, 0.999, 1e-7)(P, zeros, zeros, g, 0.1, 1.0, 0.0)
    for keep in (False, True):  # with keep_outputs, the second call reuses the node's output
        fn = pytensor.function([g], [p2, P * 2], mode=backend.mode(keep_outputs=keep))
        for _ in range(2):
            new, doubled = fn(np.ones(5, "float32"))
            np.testing.assert_allclose(doubled, 2.0)
            np.testing.assert_allclose(new, 1 - 0.1 * 0.1 / (np.sqrt(0.001) + 1e-7), rtol=1e-5)
            np.testing.assert_allclose(P.get_value(), 1.0)


@pytest.mark.parametrize("linker", ["c", "py"])
@pytest.mark.parametrize("shape", [(4,), (3, 2)], ids=["size", "layout"])
def test_shapes_must_agree(linker, shape):
    """A gradient of another shape is refused, also one of the same size ((3, 2) for (2, 3)),
    by the C and by ``perform`` alike."""
    P = pytensor.shared(np.ones((2, 3) if len(shape) == 2 else 5, "float32"))
    g = pt.tensor("g", dtype="float32", shape=(None,) * len(shape))
    mode = backend.mode() if linker == "c" else "FAST_COMPILE"
    fn = pytensor.function([g], AdamStep(0.9, 0.999, 1e-7)(P, P * 0, P * 0, g, 0.1, 1.0, 0.0)[0],
                           mode=mode)
    with pytest.raises(ValueError, match="the parameter and its gradient differ in shape"):
        fn(np.ones(shape, "float32"))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_descent_step_in_place_matches_numpy(dtype):
    """SGD-momentum as netbuild compiles it: the velocity a Gemm in place, then ``p -= lr * v``
    in place on the parameter's own buffer."""
    with pytensor.config.change_flags(floatX=dtype):  # the momentum constant in this precision
        _check_descent(dtype)


def _check_descent(dtype):
    rng = np.random.default_rng(2)
    p0 = rng.standard_normal((37, 23)).astype(dtype)
    P = pytensor.shared(p0.copy(), name="p")
    V = pytensor.shared(np.zeros((37, 23), dtype), name="v")
    x, delta = pt.matrix("x", dtype=dtype), pt.matrix("delta", dtype=dtype)
    lr = pytensor.shared(np.asarray(0.05, dtype), name="lr")
    v_new = 0.9 * V + pt.dot(x.T, delta)
    fn = pytensor.function([x, delta], [], updates={V: v_new, P: DescentStep()(P, v_new, lr)},
                           mode=backend.mode())
    ops = [n.op for n in fn.maker.fgraph.toposort() if isinstance(n.op, DescentStep)]
    assert len(ops) == 1 and ops[0].inplace
    held = P.get_value(borrow=True)
    p, v = p0.astype("float64"), np.zeros((37, 23))
    for _ in range(3):
        xs, ds = rng.standard_normal((8, 37)), rng.standard_normal((8, 23))
        fn(xs.astype(dtype), ds.astype(dtype))
        v = 0.9 * v + xs.T @ ds
        p = p - 0.05 * v
    tol = 1e-5 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(V.get_value(), v, rtol=tol, atol=tol)
    np.testing.assert_allclose(P.get_value(), p, rtol=tol, atol=tol)
    assert P.get_value(borrow=True) is held  # updated in its own buffer


def test_descent_step_in_place_reads_a_step_of_any_layout():
    """In place, a column-ordered step, and a row-ordered one seen transposed, are read in the
    parameter's order."""
    P = pytensor.shared(np.arange(6, dtype="float32").reshape(2, 3), name="p")
    held = P.get_value(borrow=True)
    d = pt.matrix("d", dtype="float32")
    base = np.arange(6, dtype="float32").reshape(2, 3) * 0.25 + 1
    for step_of, given in ((lambda d: d, np.asfortranarray(base)),
                           (lambda d: d.T, np.ascontiguousarray(base.T))):
        fn = pytensor.function([d], [], updates={P: DescentStep()(P, step_of(d), np.float32(0.5))},
                               mode=backend.mode())
        ops = [n.op for n in fn.maker.fgraph.toposort() if isinstance(n.op, DescentStep)]
        assert len(ops) == 1 and ops[0].inplace
        before = P.get_value().copy()
        fn(given)
        np.testing.assert_array_equal(P.get_value(borrow=True), before - 0.5 * base)
        assert P.get_value(borrow=True) is held


def test_descent_step_perform_matches_c():
    """The op's Python ``perform`` (PyTensor's Python linker) against its C."""
    rng = np.random.default_rng(6)
    p, d = pt.matrix("p", dtype="float64"), pt.matrix("d", dtype="float64")
    lr = pt.scalar("lr", dtype="float64")
    out = DescentStep()(p, d, lr)
    values = [rng.normal(size=(7, 4)), rng.normal(size=(7, 4)), 0.3]
    py = pytensor.function([p, d, lr], out, mode="FAST_COMPILE")
    c = pytensor.function([p, d, lr], out, mode=backend.mode())
    want = values[0] - 0.3 * values[1]
    np.testing.assert_allclose(py(*values), want, rtol=1e-15)
    np.testing.assert_allclose(c(*values), want, rtol=1e-12, atol=1e-15)  # g++ may fuse: FMA


def test_descent_step_reads_any_layout_and_keeps_an_input_read_afterwards():
    """A transposed step is read in the parameter's order; a parameter read after the step is
    copied, not overwritten (with and without kept outputs)."""
    P = pytensor.shared(np.arange(6, dtype="float32").reshape(2, 3), name="p")
    d = pt.matrix("d", dtype="float32")
    new = DescentStep()(P, d.T, np.float32(0.5))
    for keep in (False, True):
        fn = pytensor.function([d], [new, P * 2], mode=backend.mode(keep_outputs=keep))
        step = np.arange(6, dtype="float32").reshape(3, 2)
        for _ in range(2):
            out, doubled = fn(step)
            np.testing.assert_array_equal(out, P.get_value() - 0.5 * step.T)
            np.testing.assert_array_equal(doubled, 2 * np.arange(6).reshape(2, 3))


@pytest.mark.parametrize("linker", ["c", "py"])
def test_descent_step_shapes_must_agree(linker):
    """A step of the parameter's size in another shape is refused, by the C and ``perform``."""
    P = pytensor.shared(np.ones((2, 3), "float32"))
    mode = backend.mode() if linker == "c" else "FAST_COMPILE"
    fn = pytensor.function([d := pt.matrix("d")], DescentStep()(P, d, 0.1), mode=mode)
    with pytest.raises(ValueError, match="the parameter and its step differ in shape"):
        fn(np.ones((3, 2), "float32"))


@needs_jax
def test_jax_steps_match_c():
    """Each step's ``jax`` form (``--backend jax``) against its C code."""
    rng = np.random.default_rng(5)
    p, m, d = (pt.matrix(k, dtype="float64") for k in "pmd")
    v = pt.matrix("v", dtype="float64")
    outs = list(AdamStep(0.9, 0.999, 1e-7)(p, m, v, d, 0.01, 1.3, 0.001)) + [DescentStep()(p, d, 0.05)]
    values = [rng.normal(size=(6, 5)) for _ in range(4)]
    values[2] = np.abs(values[2])  # v, a second moment
    c = pytensor.function([p, m, v, d], outs, mode=backend.mode())
    assert_same(jax_function([p, m, v, d], outs)(*values), c(*values), 1e-12)
