"""Matrix products on netbuild's threads: PyTensor's ``Dot22``, ``Gemm`` and ``BatchedDot``
replaced.

PyTensor's products call OpenBLAS, whose threads are a pool of their own beside OpenMP's (which
netbuild's other ops run on). Between two products a step runs other ops, and OpenBLAS's idle
threads either sleep (and a product waits for them to wake) or spin (and take the cores from
OpenMP's threads). :class:`MatrixProduct` runs the same BLAS kernel on OpenMP's threads: each
thread calls single-threaded BLAS on its own rows or columns of the result (whichever are
more, in parts of whole 16-wide panels), so one pool of threads computes the whole step. A
product of fewer than 2^21 multiply-adds per thread runs on fewer threads, down to one.
:class:`BatchedMatrixProduct` gives each thread its own products of a batch (attention's).

Bits: in float32, OpenBLAS's kernels for this CPU compute each value in the same order wherever
its row or column lies, and a product small enough for its "small matrix" kernels (at most 100^3
multiply-adds) is never cut, so the results do not depend on the number of threads (tested at
random shapes on 1 to 4 threads). Its float64 kernels do not promise that: at 27 of 480 random
shapes a cut product differed in its last bits.
"""

from __future__ import annotations

import numpy as np
import pytensor.tensor as pt
from pytensor.compile import optdb
from pytensor.graph.basic import Apply
from pytensor.graph.rewriting.basic import dfs_rewriter, node_rewriter
from pytensor.tensor import blas

from . import CTYPES, BlasCOp, CCall


class MatrixProduct(BlasCOp):
    """``Z = alpha A B + beta C`` for matrices ``C (N, M)``, ``A (N, K)``, ``B (K, M)`` and
    scalars ``alpha, beta``; inputs ``(C, alpha, A, B, beta)`` as PyTensor's ``Gemm`` (C is not
    read when ``beta`` is 0). Without ``accumulate``, inputs ``(A, B, alpha)`` and
    ``Z = alpha A B`` (``Dot22``). With ``inplace``, ``Z`` is ``C`` itself where ``C`` is a
    C-ordered, writeable array (else a copy). Made by :func:`netbuild_matrix_products` after
    the gradients are taken, as PyTensor makes its ``Gemm``: it has no gradient of its own."""

    c_file = "dense.c"
    __props__ = ("accumulate", "inplace")

    def __init__(self, accumulate: bool = False, inplace: bool = False):
        self.accumulate, self.inplace = bool(accumulate), bool(inplace and accumulate)
        if self.inplace:
            self.destroy_map = {0: [0]}

    def make_node(self, *inputs):
        if self.accumulate:
            C, alpha, A, B, beta = inputs
        else:
            A, B, alpha = inputs
        A, B = pt.as_tensor_variable(A), pt.as_tensor_variable(B)
        dtype = A.dtype
        if dtype not in CTYPES or B.dtype != dtype or A.type.ndim != 2 or B.type.ndim != 2:
            raise TypeError(f"MatrixProduct: expected two float32 or float64 matrices of one "
                            f"type; received {A.type} and {B.type}")
        alpha = pt.as_tensor_variable(alpha).astype(dtype)
        if alpha.type.ndim != 0:
            raise TypeError(f"MatrixProduct: alpha is {alpha.type}; expected a scalar")
        if not self.accumulate:
            out = pt.tensor(dtype=dtype, shape=(A.type.shape[0], B.type.shape[1]))
            return Apply(self, [A, B, alpha], [out])
        C = pt.as_tensor_variable(C)
        if C.dtype != dtype or C.type.ndim != 2:
            raise TypeError(f"MatrixProduct: C is {C.type}; expected a {dtype} matrix")
        beta = pt.as_tensor_variable(beta).astype(dtype)
        if beta.type.ndim != 0:
            raise TypeError(f"MatrixProduct: beta is {beta.type}; expected a scalar")
        return Apply(self, [C, alpha, A, B, beta], [C.type()])

    def infer_shape(self, fgraph, node, shapes):
        if self.accumulate:
            return [shapes[0]]
        return [(shapes[0][0], shapes[1][1])]

    def perform(self, node, inputs, output_storage):
        if self.accumulate:
            C, alpha, A, B, beta = inputs
        else:
            (A, B, alpha), C, beta = inputs, None, 0
        if A.shape[1] != B.shape[0] or (C is not None and C.shape != (A.shape[0], B.shape[1])):
            raise ValueError(f"MatrixProduct: A has shape {A.shape} and B {B.shape}"
                             + (f", C {C.shape}" if C is not None else "")
                             + "; expected (N, K), (K, M) and (N, M)")
        Z = alpha * (A @ B)
        if beta != 0:  # as BLAS: C is not read (its NaN not carried) when beta is 0
            Z = Z + beta * C
        output_storage[0][0] = np.asarray(Z, dtype=node.outputs[0].dtype)

    def jax(self, node):
        import jax.numpy as jnp

        if self.accumulate:
            def gemm(C, alpha, A, B, beta):  # C not read when beta is 0, as in C
                scaled = jnp.where(beta == 0, jnp.zeros_like(C), beta * C)
                return alpha * jnp.matmul(A, B, precision="highest") + scaled
            return gemm

        def dot(A, B, alpha):
            return alpha * jnp.matmul(A, B, precision="highest")
        return dot

    def c_code(self, node, name, inputs, outputs, sub):
        dtype = node.outputs[0].dtype
        if dtype not in CTYPES:
            raise NotImplementedError(f"MatrixProduct: no C code for {dtype}")
        (out,) = outputs
        c = CCall(self, node, name, sub)
        if self.accumulate:
            C, alpha, A, B, beta = inputs
        else:
            A, B, alpha = inputs
        c.line(f"npy_intp N = PyArray_DIMS({A})[0], K = PyArray_DIMS({A})[1], "
               f"M = PyArray_DIMS({B})[1];")
        c.check(f"PyArray_DIMS({B})[0] == K", "A has shape (%ld, %ld) and B (%ld, %ld); expected "
                "A's columns to be B's rows", "(long)N", "(long)K",
                f"(long)PyArray_DIMS({B})[0]", "(long)M")
        _operands(c, A, B, first_axis=0)
        if self.accumulate:
            c.check_shape(C, "C", "N, M")
            z = c.updated(out, C, self.inplace)
            beta_value = f"((dtype_{beta}*)PyArray_DATA({beta}))[0]"
        else:
            z = c.output(out, "N, M")
            beta_value = "(T_)0"
        c.run(f"nbdense_product<T_>(N, K, M, ((dtype_{alpha}*)PyArray_DATA({alpha}))[0], "
              f"(const T_*)PyArray_DATA(a_), ta_, lda_, (const T_*)PyArray_DATA(b_), tb_, ldb_, "
              f"{beta_value}, {z})")
        c.line("Py_XDECREF(a_); Py_XDECREF(b_);")
        return c.code()


def _operands(c: CCall, A: str, B: str, first_axis: int) -> None:
    """Declare ``a_, b_`` (``A, B`` themselves, or C-ordered copies when BLAS cannot read a
    matrix of them as it is) and ``ta_, lda_, tb_, ldb_`` (how BLAS reads them, from the
    strides of the matrices' two axes, ``first_axis`` and the next: ``nbdense_trans``), for
    matrices ``(N, K)`` and ``(K, M)`` whose sides fit BLAS's int."""
    c.check("N <= 0x7fffffff && K <= 0x7fffffff && M <= 0x7fffffff",
            "a dimension exceeds BLAS's int: (%ld, %ld) by (%ld, %ld)", "(long)N", "(long)K",
            "(long)K", "(long)M")
    c.line("PyArrayObject* a_ = NULL; PyArrayObject* b_ = NULL; int lda_ = 1, ldb_ = 1; "
           "char ta_ = 0, tb_ = 0;")
    r, k = first_axis, first_axis + 1
    for var, arr, rows, cols, t, ld in ((A, "a_", "N", "K", "ta_", "lda_"),
                                        (B, "b_", "K", "M", "tb_", "ldb_")):
        c.when_ok(f"npy_intp es_ = PyArray_ITEMSIZE({var}); "
                  f"npy_intp rs_ = PyArray_STRIDES({var})[{r}], cs_ = PyArray_STRIDES({var})[{k}]; "
                  f"if (rs_ % es_ == 0 && cs_ % es_ == 0"
                  f"{f' && PyArray_STRIDES({var})[0] % es_ == 0' if first_axis else ''}) "
                  f"{t} = nbdense_trans({rows}, {cols}, rs_ / es_, cs_ / es_, &{ld}); "
                  f"if ({t}) {{ {arr} = {var}; Py_INCREF({arr}); }} "
                  f"else {{ {arr} = (PyArrayObject*)PyArray_NewCopy({var}, NPY_CORDER); "
                  f"if (!{arr}) err_ = 1; "
                  f"else {t} = nbdense_trans({rows}, {cols}, {cols}, 1, &{ld}); }}")


class BatchedMatrixProduct(BlasCOp):
    """``Z[b] = A[b] B[b]`` for ``A (batch, N, K)`` and ``B (batch, K, M)``, as PyTensor's
    ``BatchedDot``: each thread its own products of the batch (each whole, one BLAS call on one
    thread), so the bits do not depend on the number of threads."""

    c_file = "dense.c"
    __props__ = ()

    def make_node(self, A, B):
        A, B = pt.as_tensor_variable(A), pt.as_tensor_variable(B)
        if A.dtype not in CTYPES or B.dtype != A.dtype or A.type.ndim != 3 or B.type.ndim != 3:
            raise TypeError(f"BatchedMatrixProduct: expected two float32 or float64 stacks of "
                            f"matrices (3 axes) of one type; received {A.type} and {B.type}")
        batch = A.type.shape[0] if A.type.shape[0] is not None else B.type.shape[0]
        out = pt.tensor(dtype=A.dtype, shape=(batch, A.type.shape[1], B.type.shape[2]))
        return Apply(self, [A, B], [out])

    def infer_shape(self, fgraph, node, shapes):
        return [(shapes[0][0], shapes[0][1], shapes[1][2])]

    def perform(self, node, inputs, output_storage):
        A, B = inputs
        if A.shape[0] != B.shape[0] or A.shape[2] != B.shape[1]:
            raise ValueError(f"BatchedMatrixProduct: A has shape {A.shape} and B {B.shape}; "
                             f"expected (batch, N, K) and (batch, K, M)")
        output_storage[0][0] = np.asarray(A @ B, dtype=node.outputs[0].dtype)

    def jax(self, node):
        import jax.numpy as jnp

        def batched(A, B):
            return jnp.matmul(A, B, precision="highest")
        return batched

    def c_code(self, node, name, inputs, outputs, sub):
        dtype = node.outputs[0].dtype
        if dtype not in CTYPES:
            raise NotImplementedError(f"BatchedMatrixProduct: no C code for {dtype}")
        A, B = inputs
        (out,) = outputs
        c = CCall(self, node, name, sub)
        c.line(f"npy_intp S = PyArray_DIMS({A})[0], N = PyArray_DIMS({A})[1], "
               f"K = PyArray_DIMS({A})[2], M = PyArray_DIMS({B})[2];")
        c.check(f"PyArray_DIMS({B})[0] == S && PyArray_DIMS({B})[1] == K",
                "A has shape (%ld, %ld, %ld) and B (%ld, %ld, %ld); expected (batch, N, K) and "
                "(batch, K, M)", "(long)S", "(long)N", "(long)K", f"(long)PyArray_DIMS({B})[0]",
                f"(long)PyArray_DIMS({B})[1]", "(long)M")
        _operands(c, A, B, first_axis=1)
        z = c.output(out, "S, N, M")
        c.run(f"nbdense_batched<T_>(S, N, K, M, (const T_*)PyArray_DATA(a_), "
              f"PyArray_STRIDES(a_)[0] / (npy_intp)sizeof(T_), ta_, lda_, "
              f"(const T_*)PyArray_DATA(b_), PyArray_STRIDES(b_)[0] / (npy_intp)sizeof(T_), tb_, "
              f"ldb_, {z})")
        c.line("Py_XDECREF(a_); Py_XDECREF(b_);")
        return c.code()


def _matrices_of_one_float(node) -> bool:
    return node.outputs[0].dtype in CTYPES and all(
        i.dtype == node.outputs[0].dtype for i in node.inputs if i.type.ndim >= 2)


@node_rewriter([blas.Dot22, blas.Gemm, blas.BatchedDot])
def netbuild_matrix_products(fgraph, node):
    """PyTensor's float products on netbuild's threads."""
    if not _matrices_of_one_float(node):
        return False
    op = node.op
    if isinstance(op, blas.BatchedDot):
        return BatchedMatrixProduct()(*node.inputs, return_list=True)
    if isinstance(op, blas.Gemm):
        return MatrixProduct(accumulate=True, inplace=op.inplace)(*node.inputs, return_list=True)
    A, B = node.inputs
    return MatrixProduct()(A, B, np.asarray(1, A.dtype), return_list=True)


#: The tag of the rewrite: netbuild's compile mode includes it (:func:`netbuild.backend.mode`);
#: PyTensor's own modes, and a user's, keep PyTensor's products.
TAG = "netbuild_products"

# After PyTensor's in-place Gemm (50.2), before the elementwise ops go in place (50.5).
optdb.register("netbuild_matrix_products", dfs_rewriter(netbuild_matrix_products), TAG,
               "cxx_only", position=50.25)
