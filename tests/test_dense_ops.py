"""The matrix products on netbuild's threads (netbuild/ops/dense.py): PyTensor's ``Dot22``,
``Gemm`` and ``BatchedDot`` replaced in netbuild's compile mode (and only there), against numpy,
in float64 and float32, on 1 and 2 threads; transposed, strided and reversed operands; in place
on a shared variable and not in place; the same bits on any number of threads at the shapes of
the shipped and bench models and at random ones; a shape error names the op; the JAX forms
against the C."""

from __future__ import annotations

import numpy as np
import pytensor
import pytensor.tensor as pt
import pytest
from conftest import assert_same, jax_function, needs_jax
from pytensor.tensor import blas

from netbuild import backend, threads
from netbuild.ops.dense import BatchedMatrixProduct, MatrixProduct

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
    assert not [op for op in ops if isinstance(op, (blas.Dot22, blas.Dot22Scalar, blas.Gemm,
                                                     blas.BatchedDot))]
    assert [op for op in ops if isinstance(op, (MatrixProduct, BatchedMatrixProduct))]
    return fn


def _products(dtype):
    A, B, G = (pt.matrix(n, dtype=dtype) for n in "ABG")
    outs = [A @ B,                      # Dot22
            A.T @ G,                    # a transposed operand: BLAS reads it as it is
            A[:, ::2] @ B[::2]]         # strided: A[:, ::2] copied, B[::2] read with its stride
    return [A, B, G], outs


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_products_match_numpy(dtype, n_threads, restore_threads):
    threads.apply(n_threads)
    rng = np.random.default_rng(0)
    fn = _compiled(*_products(dtype))
    tol = {"float64": 1e-12, "float32": 2e-5}[dtype]
    for n, k, m in SHAPES:
        a, b, g = (rng.normal(size=s).astype(dtype) for s in [(n, k), (k, m), (n, m)])
        got = fn(a, b, g)
        want = [a @ b, a.T @ g, a[:, ::2] @ b[::2]]
        for i, (x, y) in enumerate(zip(got, want)):
            assert x.dtype == np.dtype(dtype) and x.shape == y.shape
            np.testing.assert_allclose(x, y, rtol=tol, atol=tol * np.sqrt(max(k, 1)) * 4,
                                       err_msg=f"output {i} at {n, k, m}")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_an_accumulating_product_keeps_its_input(dtype, n_threads, restore_threads):
    """``0.5 C + 3 A B`` with ``C`` a function input: a Gemm, not in place (C is the caller's),
    its output C copied into the node's own array; C row- and column-ordered, and no inner
    dimension (C scaled by beta alone)."""
    threads.apply(n_threads)
    rng = np.random.default_rng(9)
    A, B, C = (pt.matrix(n, dtype=dtype) for n in "ABC")
    fn = pytensor.function([A, B, C], C * np.asarray(0.5, dtype) + (A @ B) * np.asarray(3, dtype),
                           mode=backend.mode(keep_outputs=True))  # the node's output reused
    products = [op for op in _ops(fn) if isinstance(op, MatrixProduct)]
    assert products and all(op.accumulate and not op.inplace for op in products)
    tol = {"float64": 1e-12, "float32": 2e-5}[dtype]
    for n, k, m in SHAPES:
        a, b, c = (rng.normal(size=s).astype(dtype) for s in [(n, k), (k, m), (n, m)])
        for cc in (c, np.asfortranarray(c), c):
            before = cc.copy()
            got = fn(a, b, cc).copy()
            np.testing.assert_array_equal(cc, before)  # the caller's C is not overwritten
            np.testing.assert_allclose(got, 0.5 * c + 3 * (a @ b), rtol=tol,
                                       atol=tol * np.sqrt(max(k, 1)) * 4, err_msg=f"{n, k, m}")


def test_pytensors_own_modes_keep_pytensors_products():
    """The rewrite belongs to netbuild's mode: a user's own C-backed FAST_RUN function in the
    same process still runs PyTensor's Dot22."""
    from pytensor.compile.mode import Mode

    A, B = pt.matrix("A", dtype="float64"), pt.matrix("B", dtype="float64")
    backend.mode()  # netbuild's mode made (its rewrite registered) first
    fn = pytensor.function([A, B], A @ B, mode=Mode(linker="cvm", optimizer="fast_run"))
    ops = _ops(fn)
    assert [op for op in ops if isinstance(op, blas.Dot22)]
    assert not [op for op in ops if isinstance(op, (MatrixProduct, BatchedMatrixProduct))]


# batch, rows, inner, columns: empty, no inner dimension, attention's (4 heads of 64 x 32 for
# 32 sequences), products big enough to split the batch into parts
BATCHED = [(0, 3, 4, 5), (3, 0, 4, 5), (2, 5, 0, 3), (1, 1, 1, 1), (128, 64, 32, 64),
           (7, 77, 33, 70), (3, 200, 150, 120)]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_batched_products_match_numpy(dtype, n_threads, restore_threads):
    """PyTensor's BatchedDot becomes a BatchedMatrixProduct; with contiguous, transposed
    (``swapaxes``), strided and reversed operands."""
    threads.apply(n_threads)
    rng = np.random.default_rng(4)
    A, B, Bt = (pt.tensor3(name, dtype=dtype) for name in ("A", "B", "Bt"))
    fn = _compiled([A, B, Bt], [A @ B, A @ Bt.swapaxes(1, 2), A[:, :, ::2] @ B[:, ::2],
                                A @ B[:, ::-1]])
    assert [op for op in _ops(fn) if isinstance(op, BatchedMatrixProduct)]
    tol = {"float64": 1e-12, "float32": 2e-5}[dtype]
    for s, n, k, m in BATCHED:
        a, b, bt = (rng.normal(size=(s, *shape)).astype(dtype)
                    for shape in [(n, k), (k, m), (m, k)])
        want = [a @ b, a @ bt.swapaxes(1, 2), a[:, :, ::2] @ b[:, ::2], a @ b[:, ::-1]]
        for i, (x, y) in enumerate(zip(fn(a, b, bt), want)):
            assert x.dtype == np.dtype(dtype) and x.shape == y.shape
            np.testing.assert_allclose(x, y, rtol=tol, atol=tol * np.sqrt(max(k, 1)) * 4,
                                       err_msg=f"output {i} at {s, n, k, m}")


def test_batched_products_give_the_same_bits_on_any_number_of_threads(restore_threads):
    """Each product of the batch is one BLAS call whatever the threads."""
    rng = np.random.default_rng(6)
    A, B = pt.tensor3("A", dtype="float64"), pt.tensor3("B", dtype="float64")
    fn = _compiled([A, B], A @ B)
    a, b = rng.normal(size=(128, 64, 32)), rng.normal(size=(128, 32, 64))
    threads.apply(1)
    one = fn(a, b).copy()
    for count in (2, 3):
        threads.apply(count)
        np.testing.assert_array_equal(one, fn(a, b))


def test_a_batched_shape_mismatch_names_the_op():
    A, B = pt.tensor3("A", dtype="float64"), pt.tensor3("B", dtype="float64")
    fn = pytensor.function([A, B], BatchedMatrixProduct()(A, B), mode=backend.mode())
    with pytest.raises(ValueError, match=r"BatchedMatrixProduct: A has shape \(2, 3, 4\) and B "
                                         r"\(3, 4, 5\)"):
        fn(np.zeros((2, 3, 4)), np.zeros((3, 4, 5)))
    with pytest.raises(TypeError, match="BatchedMatrixProduct: expected two float32 or float64"):
        BatchedMatrixProduct()(pt.matrix("a"), pt.tensor3("b"))


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
    """The op's Python ``perform`` (PyTensor's Python linker) against its C; with beta 0, C is
    not read (its NaN not carried), as BLAS does."""
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
    nan_c = np.full_like(cc, np.nan)
    for fn in (py, c):
        np.testing.assert_allclose(fn(a, b, nan_c, al, 0.0), al * a @ b, rtol=1e-12)


# (rows, inner, columns, transposed first operand): the bench MLP's products and their gradients'
# (X W, X^T dY, dY W^T), the digits MLP's and the bench CNN's first dense layer; and shapes whose
# last part of 16-row panels would be small enough for OpenBLAS's small-matrix kernels (1 or 4
# rows of a long inner dimension: such a part is never made)
BITWISE = [(128, 784, 512, False), (784, 128, 512, True), (128, 512, 256, False),
           (512, 128, 256, True), (128, 256, 512, False), (64, 784, 128, False),
           (64, 3136, 128, False), (3136, 64, 128, True), (17, 14600, 17, False),
           (20, 10600, 20, False), (17, 150000, 3, False)]


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


@pytest.mark.skipif(backend.blas_core() != "SkylakeX",
                    reason="a property of OpenBLAS's SkylakeX kernels (this machine's), which the "
                           "README claims for them alone")
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


def test_views_of_every_layout_reach_the_c_as_they_are():
    """Arrays handed to the ops themselves: row-major, column-major (a transpose: BLAS reads it
    as it is), strided and reversed views and single rows or columns (copied first where BLAS
    cannot read them as they are)."""
    rng = np.random.default_rng(8)
    A, B = pt.matrix("A", dtype="float64"), pt.matrix("B", dtype="float64")
    dot = pytensor.function([A, B], MatrixProduct()(A, B, 2.0), mode=backend.mode())
    A3, B3 = pt.tensor3("A3", dtype="float64"), pt.tensor3("B3", dtype="float64")
    batched = pytensor.function([A3, B3], BatchedMatrixProduct()(A3, B3), mode=backend.mode())
    a, b = rng.normal(size=(40, 60)), rng.normal(size=(60, 50))
    at, bt = np.asfortranarray(a), np.asfortranarray(b)
    wide_a, wide_b = rng.normal(size=(40, 120)), rng.normal(size=(120, 50))
    for x, y in [(a, b), (at, b), (a, bt), (at, bt), (wide_a[:, ::2], b), (a, wide_b[::2]),
                 (a[::-1], b[:, ::-1]), (a[:1], b), (a[:, :1], b[:1])]:
        np.testing.assert_allclose(dot(x, y), 2 * x @ y, rtol=1e-12, atol=1e-12)
    s = rng.normal(size=(6, 40, 60))
    t = rng.normal(size=(6, 60, 50))
    for x, y in [(s, t), (s.swapaxes(1, 2).copy().swapaxes(1, 2), t), (s[::2], t[::2]),
                 (s[:, ::-1], t[:, :, ::2]), (s[:, :, :1], t[:, :1])]:
        np.testing.assert_allclose(batched(x, y), x @ y, rtol=1e-12, atol=1e-12)


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


def test_complex_products_stay_pytensors():
    """Only float32 and float64 are replaced: a complex product keeps PyTensor's own Dot22."""
    A, B = pt.matrix("A", dtype="complex128"), pt.matrix("B", dtype="complex128")
    fn = pytensor.function([A, B], A @ B, mode=backend.mode())
    assert [op for op in _ops(fn) if isinstance(op, blas.Dot22)]
    assert not [op for op in _ops(fn) if isinstance(op, MatrixProduct)]
    a = np.arange(6).reshape(2, 3) * (1 + 2j)
    np.testing.assert_allclose(fn(a, a.T), a @ a.T)


@needs_jax
def test_jax_batched_matches_c():
    rng = np.random.default_rng(7)
    A, B = pt.tensor3("A", dtype="float64"), pt.tensor3("B", dtype="float64")
    out = BatchedMatrixProduct()(A, B)
    values = [rng.normal(size=s) for s in [(3, 6, 5), (3, 5, 4)]]
    c = pytensor.function([A, B], out, mode=backend.mode())
    assert_same(jax_function([A, B], [out])(*values), [c(*values)], 1e-12)


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
