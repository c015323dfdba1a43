"""The input projection ops (netbuild/ops/projection.py): ``X W``, ``dY W^T`` and ``X^T dY`` in C
against numpy, in float64 and float32, at shapes that fill no whole tile, panel or block of the
packed products and at the bench LSTM's; numerical gradients of the C code, first and second;
and a shape error in C names the op."""

from __future__ import annotations


import numpy as np
import pytensor
import pytensor.tensor as pt
import pytest
from conftest import assert_same, jax_function, needs_jax, verify_grad
from test_conv_ops import function, ops_in_c

from netbuild.ops.projection import Projection, ProjectionWeightGrad, project

# rows, inner, columns: none, one, a remainder of every tile, panel and block (256 rows of the
# weight gradient), the bench LSTM's (50 steps x 64 rows, 32 features, 4 x 128 gate columns)
SHAPES = [(0, 4, 7), (5, 0, 3), (1, 1, 1), (77, 33, 70), (300, 5, 1), (513, 9, 65), (3200, 32, 512)]


def _function(dtype: str, c: bool):
    X, W, G = (pt.matrix(n, dtype=dtype) for n in "XWG")
    Y = project(X, W)
    dX, dW = pytensor.grad((Y * G).sum(), [X, W])
    return function([X, W, G], [Y, dX, dW], c=c)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("c", [True, False], ids=["c", "perform"])
def test_products_match_numpy(dtype, c):
    rng = np.random.default_rng(0)
    fn = _function(dtype, c)
    tol = {"float64": 1e-12, "float32": 2e-5}[dtype]
    for n, k, m in SHAPES:
        x, w, g = (rng.normal(size=s).astype(dtype) for s in [(n, k), (k, m), (n, m)])
        y, dx, dw = fn(x, w, g)
        assert y.dtype == dx.dtype == dw.dtype == np.dtype(dtype)
        scale = np.sqrt(max(k, 1)), np.sqrt(max(m, 1)), np.sqrt(max(n, 1))
        np.testing.assert_allclose(y, x @ w, rtol=tol, atol=tol * scale[0], err_msg=f"Y {n, k, m}")
        np.testing.assert_allclose(dx, g @ w.T, rtol=tol, atol=tol * scale[1],
                                   err_msg=f"dX {n, k, m}")
        np.testing.assert_allclose(dw, x.T @ g, rtol=tol, atol=tol * scale[2],
                                   err_msg=f"dW {n, k, m}")


def test_gradients_numerically():
    """verify_grad (finite differences) of the C code: the projection, and the weight gradient
    itself (second derivatives)."""
    rng = np.random.default_rng(1)
    x, w, dy = rng.normal(size=(19, 6)), rng.normal(size=(6, 11)), rng.normal(size=(19, 11))
    with ops_in_c():
        verify_grad(lambda a, b: Projection()(a, b), [x, w], n_tests=1, rng=rng)
        verify_grad(lambda a, b: ProjectionWeightGrad()(a, b), [x, dy], n_tests=1, rng=rng)


def test_a_shape_mismatch_in_c_names_the_op():
    fn = _function("float64", c=True)
    with pytest.raises(ValueError, match="Projection: W"):
        fn(np.zeros((3, 4)), np.zeros((5, 2)), np.zeros((3, 2)))


def test_inputs_must_be_matrices():
    with pytest.raises(TypeError, match="Projection: inputs must be matrices"):
        project(pt.tensor3("x"), pt.matrix("w"))


# -- the jax backend (the ops' ``jax``) against their C code ---------------------------------------
def projection_graph(dtype):
    """``X, W, dY`` and ``Y = X W``, ``X^T dY``, and ``pytensor.grad`` of ``sum(Y G)`` through the
    projection (``dY W^T`` and ``X^T G``)."""
    X, W, G = (pt.matrix(n, dtype=dtype) for n in "XWG")
    Y = project(X, W)
    return [X, W, G], [Y, ProjectionWeightGrad()(X, G @ W.T), *pytensor.grad((Y * G).sum(), [X, W])]


@needs_jax
@pytest.mark.parametrize("dtype, tol", [("float64", 1e-10), ("float32", 1e-5)])
def test_jax_projection_ops_match_c(dtype, tol):
    """Both ops directly and through ``pytensor.grad``, at the small shapes of SHAPES."""
    rng = np.random.default_rng(2)
    inputs, outs = projection_graph(dtype)
    c_fn, jax_fn = function(inputs, outs, c=True), jax_function(inputs, outs)
    for n, k, m in SHAPES[:5] if dtype == "float64" else [(7, 5, 6)]:
        values = [rng.normal(size=s).astype(dtype) for s in [(n, k), (k, m), (n, m)]]
        assert_same(jax_fn(*values), c_fn(*values), tol)
