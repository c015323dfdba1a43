"""``layer_norm`` over the last axis as one C op, and its gradient as another.

Written from PyTensor's reductions and elementwise ops, a layer norm took four float64-accumulated
sums over the rows (single-threaded, not vectorized) and two large fused loops per training
step: the bench transformer block spent a third of its step there. :class:`LayerNorm` computes

    mean, var = the mean and biased variance of each row (in double)
    rstd = 1 / sqrt(var + epsilon)
    y = (x - mean) * rstd * gamma + beta

and returns ``y`` with ``mean`` and ``rstd`` (one per row, for the gradient);
:class:`LayerNormGrad` gives ``dx``, ``dgamma``, ``dbeta`` from ``x, gamma, mean, rstd, dy``::

    xh = (x - mean) * rstd,  g = dy * gamma
    dx = rstd * (g - mean(g) - xh * mean(g * xh))
    dgamma = sum over rows of dy * xh,  dbeta = sum over rows of dy

Rows run on threads of their own; the column sums of the gradient are taken over a fixed cut of
the rows into slices (:c:func:`netbuild_slices`), added in slice order: the same bits on any
number of threads. Row sums use 8 double accumulators in a fixed order (vectorized). The layer
passes ones and zeros for a missing ``gamma`` or ``beta``. The C is in ``normalization.c``.
"""

from __future__ import annotations

import numpy as np
import pytensor.tensor as pt
from pytensor.gradient import DisconnectedType, grad_not_implemented
from pytensor.graph.basic import Apply

from . import CCall, NetbuildCOp


def _float(x):
    x = pt.as_tensor_variable(x)
    if x.type.dtype not in ("float32", "float64") or x.type.ndim < 1:
        raise TypeError(f"expected a float tensor of at least one axis; received {x.type}")
    return x


def _np_stats(x: np.ndarray, epsilon: float) -> tuple[np.ndarray, np.ndarray]:
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=-1)
    var = np.square(x64 - mean[..., None]).mean(axis=-1)
    return mean.astype(x.dtype), (1.0 / np.sqrt(var + epsilon)).astype(x.dtype)


class _NormCOp(NetbuildCOp):
    c_file = "normalization.c"

    def _rows(self, c: CCall, x: str) -> None:
        """``nd_``, ``xd_``, ``K_`` (the last axis) and ``ROWS_`` of ``x``."""
        c.line(f"const int nd_ = PyArray_NDIM({x});")
        c.line(f"const npy_intp* xd_ = PyArray_DIMS({x});")
        c.line("const npy_intp K_ = nd_ > 0 ? xd_[nd_ - 1] : 0;")
        c.line("npy_intp ROWS_ = 1;")
        c.line("for (int i_ = 0; i_ < nd_ - 1; ++i_) ROWS_ *= xd_[i_];")

    def _check(self, c: CCall, var: str, what: str, like: str) -> None:
        """``var`` has the shape of ``x`` (``like="x"``), of its rows (``"rows"``) or of its
        last axis (``"k"``)."""
        nd, first = {"x": ("nd_", "0"), "rows": ("nd_ - 1", "0"), "k": ("1", "nd_ - 1")}[like]
        c.when_ok(f"bool ok_ = PyArray_NDIM({var}) == {nd}; "
                  f"for (int i_ = 0; ok_ && i_ < {nd}; ++i_) "
                  f"ok_ = PyArray_DIMS({var})[i_] == xd_[{first} + i_]; "
                  f"if (!ok_) {{ PyErr_Format(PyExc_ValueError, \"{type(self).__name__}: the shape "
                  f"of {what} does not match x's\"); err_ = 1; }}")

    def _np_check(self, x, **others) -> None:
        shapes = {"x": x.shape, "rows": x.shape[:-1], "k": x.shape[-1:]}
        for what, (value, like) in others.items():
            if value.shape != shapes[like]:
                raise ValueError(f"{type(self).__name__}: the shape of {what} does not match x's")


class LayerNorm(_NormCOp):
    """``(x, gamma, beta) -> (y, mean, rstd)`` over the last axis of ``x``; see the module."""

    __props__ = ("epsilon",)

    def __init__(self, epsilon: float):
        self.epsilon = float(epsilon)

    def make_node(self, x, gamma, beta):
        x = _float(x)
        gamma, beta = (pt.cast(pt.as_tensor_variable(v), x.dtype) for v in (gamma, beta))
        for v, what in ((gamma, "gamma"), (beta, "beta")):
            if v.type.ndim != 1:
                raise TypeError(f"LayerNorm: {what} must be a vector; received {v.type}")
        rows = pt.tensor(dtype=x.dtype, shape=x.type.shape[:-1])
        return Apply(self, [x, gamma, beta], [x.type(), rows, rows.type()])

    def infer_shape(self, fgraph, node, shapes):
        return [shapes[0], shapes[0][:-1], shapes[0][:-1]]

    def pullback(self, inputs, outputs, cotangents):
        dy, *stats = cotangents
        if any(not isinstance(g.type, DisconnectedType) for g in stats):
            raise NotImplementedError("LayerNorm: no gradient through its mean and rstd outputs")
        x, gamma, _ = inputs
        if isinstance(dy.type, DisconnectedType):
            dy = pt.zeros_like(outputs[0])
        return LayerNormGrad()(x, gamma, outputs[1], outputs[2], dy, return_list=True)

    def perform(self, node, inputs, output_storage):
        x, gamma, beta = inputs
        self._np_check(x, gamma=(gamma, "k"), beta=(beta, "k"))
        mean, rstd = _np_stats(x, self.epsilon)
        y = ((x - mean[..., None]) * rstd[..., None]) * gamma + beta
        for storage, value in zip(output_storage, (y, mean, rstd)):
            storage[0] = np.asarray(value, dtype=x.dtype)

    def c_code(self, node, name, inputs, outputs, sub):
        x, gamma, beta = inputs
        y, mean, rstd = outputs
        c = CCall(self, node, name, sub)
        self._rows(c, x)
        self._check(c, gamma, "gamma", "k")
        self._check(c, beta, "beta", "k")
        X, G, B = c.input(x), c.input(gamma), c.input(beta)
        c.when_ok(f"err_ = netbuild_output(&{y}, nd_, xd_, {c.typenum});")
        for out in (mean, rstd):
            c.when_ok(f"if (!err_) err_ = netbuild_output(&{out}, nd_ - 1, xd_, {c.typenum});")
        Y, M, R = (f"((T_*)PyArray_DATA({o}))" for o in (y, mean, rstd))
        c.run(f"nbnorm::forward<T_>({X}, {G}, {B}, {Y}, {M}, {R}, ROWS_, K_, {self.epsilon!r})")
        return c.code()

    def jax(self, node):
        """``(y, mean, rstd)``: each row's mean and ``rstd = 1 / sqrt(var + epsilon)`` (the biased
        variance), ``y = (x - mean) rstd gamma + beta``."""
        import jax.numpy as jnp

        def layer_norm(x, gamma, beta):
            mean = jnp.mean(x, axis=-1)
            var = jnp.mean(jnp.square(x - mean[..., None]), axis=-1)
            rstd = 1.0 / jnp.sqrt(var + self.epsilon)
            y = (x - mean[..., None]) * rstd[..., None] * gamma + beta
            return y, mean, rstd

        return layer_norm


class LayerNormGrad(_NormCOp):
    """``(x, gamma, mean, rstd, dy) -> (dx, dgamma, dbeta)``; see the module. No gradient of its
    own (no second derivatives)."""

    __props__ = ()

    def make_node(self, x, gamma, mean, rstd, dy):
        x = _float(x)
        rest = [pt.cast(pt.as_tensor_variable(v), x.dtype) for v in (gamma, mean, rstd, dy)]
        return Apply(self, [x, *rest], [x.type(), rest[0].type(), rest[0].type()])

    def infer_shape(self, fgraph, node, shapes):
        return [shapes[0], shapes[1], shapes[1]]

    def pullback(self, inputs, outputs, cotangents):
        return [grad_not_implemented(self, i, v, "layer_norm has no second derivatives")
                for i, v in enumerate(inputs)]

    def perform(self, node, inputs, output_storage):
        x, gamma, mean, rstd, dy = inputs
        self._np_check(x, gamma=(gamma, "k"), mean=(mean, "rows"), rstd=(rstd, "rows"),
                       dy=(dy, "x"))
        xh = (x - mean[..., None]) * rstd[..., None]
        g = dy * gamma
        a = g.astype(np.float64).mean(axis=-1, keepdims=True).astype(x.dtype)
        b = (g.astype(np.float64) * xh).mean(axis=-1, keepdims=True).astype(x.dtype)
        dx = rstd[..., None] * ((g - a) - xh * b)
        rows = int(np.prod(x.shape[:-1]))
        dgamma = (dy.astype(np.float64) * xh).reshape(rows, x.shape[-1]).sum(axis=0)
        dbeta = dy.astype(np.float64).reshape(rows, x.shape[-1]).sum(axis=0)
        for storage, value in zip(output_storage, (dx, dgamma, dbeta)):
            storage[0] = np.asarray(value, dtype=x.dtype)

    def c_code(self, node, name, inputs, outputs, sub):
        x, gamma, mean, rstd, dy = inputs
        dx, dgamma, dbeta = outputs
        c = CCall(self, node, name, sub)
        self._rows(c, x)
        for v, what, like in ((gamma, "gamma", "k"), (mean, "mean", "rows"),
                              (rstd, "rstd", "rows"), (dy, "dy", "x")):
            self._check(c, v, what, like)
        X, G, M, R, DY = (c.input(v) for v in (x, gamma, mean, rstd, dy))
        c.when_ok(f"err_ = netbuild_output(&{dx}, nd_, xd_, {c.typenum});")
        for out in (dgamma, dbeta):
            c.when_ok(f"if (!err_) err_ = netbuild_output(&{out}, 1, &K_, {c.typenum});")
        c.line("const npy_intp S_ = netbuild_slices(ROWS_);")
        s = c.scratch("(sizeof(double) + sizeof(T_)) * 2 * (size_t)(S_ > 0 ? S_ : 1) * (size_t)K_")
        DX, DG, DB = (f"((T_*)PyArray_DATA({o}))" for o in (dx, dgamma, dbeta))
        c.run(f"nbnorm::grad<T_>({X}, {G}, {M}, {R}, {DY}, {DX}, {DG}, {DB}, ROWS_, K_, "
              f"(T_*)({s} + sizeof(double) * 2 * (size_t)(S_ > 0 ? S_ : 1) * (size_t)K_), "
              f"(double*){s})")
        return c.code()

    def jax(self, node):
        """``(dx, dgamma, dbeta)``: with ``xh = (x - mean) rstd`` and ``g = dy gamma``,
        ``dx = rstd (g - mean(g) - xh mean(g xh))``; the sums over the rows of ``dy xh``
        and ``dy``."""
        import jax.numpy as jnp

        def layer_norm_grad(x, gamma, mean, rstd, dy):
            xh = (x - mean[..., None]) * rstd[..., None]
            g = dy * gamma
            a = jnp.mean(g, axis=-1, keepdims=True)
            b = jnp.mean(g * xh, axis=-1, keepdims=True)
            dx = rstd[..., None] * ((g - a) - xh * b)
            rows = tuple(range(x.ndim - 1))
            return dx, jnp.sum(dy * xh, axis=rows), jnp.sum(dy, axis=rows)

        return layer_norm_grad


def layer_norm(x, gamma, beta, epsilon: float):
    """``y`` of :class:`LayerNorm` (a gradient in C)."""
    return LayerNorm(epsilon)(x, gamma, beta)[0]
