"""The matrix products on netbuild's threads (netbuild/ops/dense.py): PyTensor's ``Dot22``,
``Dot22Scalar`` and ``Gemm`` replaced in netbuild's compile mode, against numpy, in float64 and
float32, on 1 and 2 threads; transposed and strided operands; in place on a shared variable;
the same bits on 1 and 2 threads at the shapes of the shipped and bench models; a shape error
names the op; the JAX form against the C."""

from __future__ import annotations

import numpy as np
import pytensor
import pytensor.tensor as pt
import pytest
from conftest import assert_same, jax_function, needs_jax
from pytensor.tensor import blas

from netbuild import backend, threads
from netbuild.ops.dense import MatrixProduct

# rows, inner, columns: empty, no inner dimension, one, remainders of the 16-wide parts, the
# bench MLP's first layer (cut into parts on 2 threads), a tall one and a wide one
SHAPES = [(0, 4, 7), (5, 0, 3), (1, 1, 1), (77, 33, 70), (128, 784, 512), (300, 5, 1),
          (513, 9, 65), (3, 40, 2000)]


def _ops(fn) -> list:
    return [node.op for node in fn.maker.fgraph.apply_nodes]


def _compiled(inputs, outputs, updates=None):
    """Compiled as netbuild compiles (its C mode); none of PyTensor's own products remain."""
    fn = pytensor.function(inputs, outputs, updates=updates, mode=backend.mode())
    ops = _ops(fn)
    assert not [op for op in ops if isinstance(op, (blas.Dot22, blas.Dot22Scalar, blas.Gemm))]
    assert [op for op in ops if isinstance(op, MatrixProduct)]
    return fn


def _products(dtype):
    A, B, G, C = (pt.matrix(n, dtype=dtype) for n in "ABGC")
    outs = [A @ B,                      # Dot22
            A.T @ G,                    # a transposed operand
            A[:, ::2] @ B[::2],         # strided operands: copied
            C * np.asarray(0.5, dtype) + (A @ B) * np.asarray(3, dtype)]  # Gemm, C kept
    return [A, B, G, C], outs


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_products_match_numpy(dtype, n_threads, restore_threads):
    threads.apply(n_threads)
    rng = np.random.default_rng(0)
    fn = _compiled(*_products(dtype))
    tol = {"float64": 1e-12, "float32": 2e-5}[dtype]
    for n, k, m in SHAPES:
        a, b, g, c = (rng.normal(size=s).astype(dtype) for s in [(n, k), (k, m), (n, m), (n, m)])
        c_before = c.copy()
        got = fn(a, b, g, c)
        want = [a @ b, a.T @ g, a[:, ::2] @ b[::2], 0.5 * c + 3 * (a @ b)]
        np.testing.assert_array_equal(c, c_before)  # an input is not overwritten
        for i, (x, y) in enumerate(zip(got, want)):
            assert x.dtype == np.dtype(dtype) and x.shape == y.shape
            np.testing.assert_allclose(x, y, rtol=tol, atol=tol * np.sqrt(max(k, 1)) * 4,
                                       err_msg=f"output {i} at {n, k, m}")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_momentum_accumulates_in_place(dtype, restore_threads):
    """``v <- 0.9 v + X^T G`` on a shared variable: PyTensor's in-place Gemm becomes an in-place
    MatrixProduct, which writes into the variable's own array."""
    threads.apply(2)
    rng = np.random.default_rng(1)
    x, g = pt.matrix("x", dtype=dtype), pt.matrix("g", dtype=dtype)
    v0 = rng.normal(size=(784, 512)).astype(dtype)
    v = pytensor.shared(v0.copy(), name="v")
    fn = _compiled([x, g], [], updates={v: np.asarray(0.9, dtype) * v + x.T @ g})
    assert [op for op in _ops(fn) if isinstance(op, MatrixProduct) and op.inplace]
    X, G = rng.normal(size=(128, 784)).astype(dtype), rng.normal(size=(128, 512)).astype(dtype)
    held = v.get_value(borrow=True)
    want = v0
    for _ in range(3):
        fn(X, G)
        want = 0.9 * want + X.T @ G
    assert v.get_value(borrow=True) is held  # the same array, updated in place
    tol = {"float64": 1e-12, "float32": 1e-5}[dtype]
    np.testing.assert_allclose(v.get_value(), want, rtol=tol, atol=tol * 100)


@pytest.mark.parametrize("accumulate", [False, True], ids=["dot", "gemm"])
def test_perform_matches_c(accumulate):
    """The op's Python ``perform`` (PyTensor's Python linker) against its C."""
    rng = np.random.default_rng(2)
    A, B, C = (pt.matrix(n, dtype="float64") for n in "ABC")
    alpha, beta = pt.scalar("alpha", dtype="float64"), pt.scalar("beta", dtype="float64")
    out = (MatrixProduct(accumulate=True)(C, alpha, A, B, beta) if accumulate
           else MatrixProduct()(A, B, alpha))
    values = [rng.normal(size=s) for s in [(9, 5), (5, 7), (9, 7)]] + [1.5, -0.25]
    py = pytensor.function([A, B, C, alpha, beta], out, mode="FAST_COMPILE",
                           on_unused_input="ignore")
    c = pytensor.function([A, B, C, alpha, beta], out, mode=backend.mode(),
                          on_unused_input="ignore")
    a, b, cc, al, be = values
    want = al * a @ b + (be * cc if accumulate else 0)
    np.testing.assert_allclose(py(*values), want, rtol=1e-12)
    np.testing.assert_allclose(c(*values), want, rtol=1e-12)


# (rows, inner, columns, transposed first operand): the bench MLP's products and their gradients'
# (X W, X^T dY, dY W^T), the digits MLP's and the bench CNN's first dense layer
BITWISE = [(128, 784, 512, False), (784, 128, 512, True), (128, 512, 256, False),
           (512, 128, 256, True), (128, 256, 512, False), (64, 784, 128, False),
           (64, 3136, 128, False), (3136, 64, 128, True)]


@pytest.mark.parametrize("n, k, m, transposed", BITWISE)
def test_the_same_bits_on_1_and_2_threads_at_the_models_shapes(n, k, m, transposed,
                                                               restore_threads):
    """Each thread calls BLAS on its own rows or columns of the result. OpenBLAS computes each
    value in the same order wherever its row or column lies at these shapes (not at all: see
    the README), so the shipped and bench models train the same bits on 1 and 2 threads."""
    rng = np.random.default_rng(n + k + m)
    A, B = pt.matrix("A", dtype="float32"), pt.matrix("B", dtype="float32")
    fn = _compiled([A, B], (A.T if transposed else A) @ B)
    a = rng.normal(size=(k, n) if transposed else (n, k)).astype("float32")
    b = rng.normal(size=(k, m)).astype("float32")
    threads.apply(1)
    one = fn(a, b).copy()
    threads.apply(2)
    np.testing.assert_array_equal(one, fn(a, b))


def test_float32_products_give_the_same_bits_on_any_number_of_threads(restore_threads):
    """The README's claim for float32, at 40 random shapes (sides 3 to 2500, all four
    transpositions) on 1 to 4 threads: a product small enough for OpenBLAS's small-matrix
    kernels is never cut, and its other kernels compute each value in the same order wherever
    it lies. (float64's kernels do not: see the README.)"""
    rng = np.random.default_rng(5)
    A, B = pt.matrix("A", dtype="float32"), pt.matrix("B", dtype="float32")
    fns = {(ta, tb): _compiled([A, B], (A.T if ta else A) @ (B.T if tb else B))
           for ta in (False, True) for tb in (False, True)}
    for i in range(40):
        n, k, m = (int(v) for v in np.exp(rng.uniform(np.log(3), np.log(2500), 3)))
        ta, tb = bool(i % 2), bool(i // 2 % 2)
        a = rng.normal(size=(k, n) if ta else (n, k)).astype("float32")
        b = rng.normal(size=(m, k) if tb else (k, m)).astype("float32")
        threads.apply(1)
        one = fns[ta, tb](a, b).copy()
        for count in (2, 3, 4):
            threads.apply(count)
            np.testing.assert_array_equal(one, fns[ta, tb](a, b), err_msg=f"{n, k, m, count}")


def test_a_shape_mismatch_names_the_op():
    A, B = pt.matrix("A", dtype="float64"), pt.matrix("B", dtype="float64")
    fn = pytensor.function([A, B], MatrixProduct()(A, B, 1.0), mode=backend.mode())
    with pytest.raises(ValueError, match=r"MatrixProduct: A has shape \(3, 4\) and B \(5, 2\)"):
        fn(np.zeros((3, 4)), np.zeros((5, 2)))


def test_inputs_must_be_float_matrices_of_one_type():
    with pytest.raises(TypeError, match="MatrixProduct: expected two float32 or float64"):
        MatrixProduct()(pt.tensor3("a"), pt.matrix("b"), 1.0)
    with pytest.raises(TypeError, match="MatrixProduct: expected two float32 or float64"):
        MatrixProduct()(pt.matrix("a", dtype="float32"), pt.matrix("b", dtype="float64"), 1.0)
    with pytest.raises(TypeError, match="MatrixProduct: C is"):
        MatrixProduct(accumulate=True)(pt.vector("c"), 1.0, pt.matrix("a"), pt.matrix("b"), 0.0)


def test_integer_products_stay_pytensors():
    """Only float matrices are replaced: an integer product keeps PyTensor's own op."""
    A, B = pt.matrix("A", dtype="int64"), pt.matrix("B", dtype="int64")
    fn = pytensor.function([A, B], A @ B, mode=backend.mode())
    assert not [op for op in _ops(fn) if isinstance(op, MatrixProduct)]
    a = np.arange(6).reshape(2, 3)
    np.testing.assert_array_equal(fn(a, a.T), a @ a.T)


@needs_jax
@pytest.mark.parametrize("accumulate", [False, True], ids=["dot", "gemm"])
def test_jax_matches_c(accumulate):
    rng = np.random.default_rng(3)
    A, B, C = (pt.matrix(n, dtype="float64") for n in "ABC")
    out = (MatrixProduct(accumulate=True)(C, 2.0, A, B, 0.5) if accumulate
           else MatrixProduct()(A, B, 2.0))
    values = [rng.normal(size=s) for s in [(6, 5), (5, 4), (6, 4)]]
    c = pytensor.function([A, B, C], out, mode=backend.mode(), on_unused_input="ignore")
    j = jax_function([A, B, C], [out])
    assert_same(j(*values), [c(*values)], 1e-12)
