"""The fused Adam step in C against a numpy reference of PyTorch's Adam/AdamW equations."""

from __future__ import annotations

import numpy as np
import pytensor
import pytensor.tensor as pt
import pytest

from netbuild import backend
from netbuild.ops.update import AdamStep, adam_step


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


def test_sizes_must_agree():
    P = pytensor.shared(np.ones(5, "float32"))
    fn = pytensor.function([g := pt.vector("g")], AdamStep(0.9, 0.999, 1e-7)(
        P, P * 0, P * 0, g, 0.1, 1.0, 0.0)[0], mode=backend.mode())
    with pytest.raises(ValueError, match="differ in size"):
        fn(np.ones(4, "float32"))
