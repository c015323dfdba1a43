"""The product ``Y = X W`` and its gradients, in C, on the recurrent ops' packed products.

The recurrent ops compute ``X W`` and ``X^T dY`` themselves (``RecurrentSequence(project=True)``
and its gradient op, on the same packed products); what the layers' graphs run of this module is
``dX = dY W^T``, for a recurrent layer whose input needs a gradient.

:class:`Projection` takes ``X (N, K)`` and ``W (K, M)`` and gives ``Y (N, M)``: the team of
threads packs ``W`` once (``packed.c``) and each thread multiplies its rows of ``X``. Its
gradients are ``dX = dY W^T`` (a :class:`Projection` of ``dY`` and ``W^T``) and
``dW = X^T dY`` (:class:`ProjectionWeightGrad`: each thread its columns of ``dW``, the rows of
``dY`` packed a block at a time). Both add each value's terms in one fixed order, so their bits
do not depend on the number of threads. The C says why they are not BLAS.
"""

from __future__ import annotations

import numpy as np
import pytensor.tensor as pt
from pytensor import config
from pytensor.graph.basic import Apply
from pytensor.scalar import upcast

from . import CCall, NetbuildCOp


def _matrices(op: str, *values) -> list:
    """The values as matrices of one float type (their upcast, or floatX when that is no float)."""
    tensors = [pt.as_tensor_variable(v) for v in values]
    for t in tensors:
        if t.type.ndim != 2:
            raise TypeError(f"{op}: inputs must be matrices; received {t.type}")
    dtype = upcast(*[t.dtype for t in tensors])
    if dtype not in ("float32", "float64"):
        dtype = config.floatX
    return [pt.cast(t, dtype) for t in tensors]


class _ProjectionCOp(NetbuildCOp):
    """What the two ops share: inputs ``X (N, K)`` and a second matrix whose columns are ``M``.
    A subclass names the second input and its shape, the output's shape, the scratch elements
    it needs and its kernel (C expressions of ``N, K, M``)."""

    c_file = "projection.c"
    shared_files = (*NetbuildCOp.shared_files, "packed.c")
    __props__ = ()
    second: str
    second_dims: str
    out_dims: str
    scratch_elements: str
    kernel: str

    def c_code(self, node, name, inputs, outputs, sub):
        X, B = inputs
        (out,) = outputs
        c = CCall(self, node, name, sub)
        c.check(f"PyArray_NDIM({X}) == 2 && PyArray_NDIM({B}) == 2",
                f"X and {self.second} must be matrices")
        c.line(f"npy_intp N = PyArray_NDIM({X}) == 2 ? PyArray_DIMS({X})[0] : 0, "
               f"K = PyArray_NDIM({X}) == 2 ? PyArray_DIMS({X})[1] : 0, "
               f"M = PyArray_NDIM({B}) == 2 ? PyArray_DIMS({B})[1] : 0;")
        c.check_shape(B, self.second, self.second_dims)
        x, b = c.input(X), c.input(B)
        y = c.output(out, self.out_dims)
        c.scratch(f"sizeof(T_) * {self.scratch_elements}")
        c.run(f"{self.kernel}(N, K, M, {x}, {b}, {y}, (T_*)s_)")
        return c.code()


class Projection(_ProjectionCOp):
    """``Y (N, M) = X (N, K) W (K, M)``."""

    second, second_dims, out_dims = "W", "K, M", "N, M"
    scratch_elements, kernel = "nbproj_dot_scratch<T_>(K, M)", "nbproj_dot"

    def make_node(self, X, W):
        X, W = _matrices("Projection", X, W)
        return Apply(self, [X, W], [pt.tensor(dtype=X.dtype,
                                              shape=(X.type.shape[0], W.type.shape[1]))])

    def infer_shape(self, fgraph, node, shapes):
        return [(shapes[0][0], shapes[1][1])]

    def pullback(self, inputs, outputs, cotangents):
        X, W = inputs
        (dY,) = cotangents
        return [Projection()(dY, W.T), ProjectionWeightGrad()(X, dY)]

    def perform(self, node, inputs, output_storage):
        X, W = inputs
        if X.shape[1] != W.shape[0]:
            raise ValueError(f"Projection: X has shape {X.shape} and W {W.shape}; expected "
                             f"X's columns to be W's rows")
        output_storage[0][0] = np.asarray(X @ W, dtype=node.outputs[0].dtype)

    def jax(self, node):
        """``Y = X W``, at full precision (no TF32 or bfloat16 passes on a GPU)."""
        import jax.numpy as jnp

        def projection(X, W):
            return jnp.matmul(X, W, precision="highest")

        return projection


class ProjectionWeightGrad(_ProjectionCOp):
    """``dW (K, M) = X^T dY`` for ``X (N, K)`` and ``dY (N, M)``."""

    second, second_dims, out_dims = "dY", "N, M", "K, M"
    scratch_elements, kernel = "nbproj_grad_scratch<T_>(M)", "nbproj_weight_grad"

    def make_node(self, X, dY):
        X, dY = _matrices("ProjectionWeightGrad", X, dY)
        return Apply(self, [X, dY], [pt.tensor(dtype=X.dtype,
                                               shape=(X.type.shape[1], dY.type.shape[1]))])

    def infer_shape(self, fgraph, node, shapes):
        return [(shapes[0][1], shapes[1][1])]

    def pullback(self, inputs, outputs, cotangents):
        X, dY = inputs
        (g,) = cotangents  # d<g, X^T dY>: dX = dY g^T, d(dY) = X g
        return [Projection()(dY, g.T), Projection()(X, g)]

    def perform(self, node, inputs, output_storage):
        X, dY = inputs
        if X.shape[0] != dY.shape[0]:
            raise ValueError(f"ProjectionWeightGrad: X has shape {X.shape} and dY {dY.shape}; "
                             f"expected the same rows")
        output_storage[0][0] = np.asarray(X.T @ dY, dtype=node.outputs[0].dtype)

    def jax(self, node):
        """``dW = X^T dY``, at full precision (no TF32 or bfloat16 passes on a GPU)."""
        import jax.numpy as jnp

        def projection_weight_grad(X, dY):
            return jnp.matmul(X.T, dY, precision="highest")

        return projection_weight_grad


def project(X, W):
    """``X @ W`` for matrices, in C with its gradients (see the module docstring)."""
    return Projection()(X, W)
