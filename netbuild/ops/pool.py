"""Max and average pooling over one or two spatial axes, in C, and their gradient.

``x (N, C, *spatial)`` -> ``y (N, C, *out)``: each channel of each image on its own, over the
window of ``kernel`` at ``o * stride - pad_before`` on each axis. Padding never takes part: a
window reads only the input elements it covers (there is at least one), the max of those, or
their mean (the sum divided by their number, not by ``prod(kernel)``).

:class:`Pool` is the forward pass; :class:`PoolGrad` the gradient of its input, from ``x`` and
``dy``. Max pooling's gradient goes to the first maximum of each window in row-major order (as
PyTorch's CPU max pooling; a NaN counts as the maximum), found again from ``x`` rather than kept
from the forward pass. Average pooling spreads ``dy / count`` over the window's input elements.

As in :mod:`netbuild.ops.conv`, the mode and geometry are run-time parameters of the C code (one
compiled module per op and float type), the loops are ``noinline`` functions with ``__restrict__``
pointers, and a numpy ``perform`` (the same semantics, vectorized) serves PyTensor's Python modes.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Sequence

import numpy as np
import pytensor.tensor as pt
from pytensor import config
from pytensor.gradient import DisconnectedType, disconnected_type, grad_not_implemented
from pytensor.graph.basic import Apply
from pytensor.link.c.params_type import ParamsType
from pytensor.scalar import int64

from . import CCall, NetbuildCOp

MODES = {"max": 0, "avg": 1}


class _PoolCOp(NetbuildCOp):
    """What the pooling ops share: mode, geometry, the C kernels.

    ``kernel``, ``strides``: one int per spatial axis (1 or 2 axes); ``pads``: ``(before, after)``
    per spatial axis, each smaller than the kernel (so that every window covers an input element).
    """

    c_file = "pool.c"
    shared_files = (*NetbuildCOp.shared_files, "window.c")

    __props__ = ("mode", "kernel", "strides", "pads")
    params_type = ParamsType(mode_code=int64, kh=int64, kw=int64, sh=int64, sw=int64, ph=int64,
                             pw=int64, pha=int64, pwa=int64)

    def __init__(self, mode: str, kernel: Sequence[int], strides: Sequence[int], pads: Sequence):
        if mode not in MODES:
            raise ValueError(f"unknown pooling mode '{mode}'; expected one of {sorted(MODES)}")
        self.mode = mode
        self.kernel = tuple(int(k) for k in kernel)
        self.strides = tuple(int(s) for s in strides)
        self.pads = tuple((int(b), int(a)) for b, a in pads)
        self.rank = len(self.kernel)
        name = type(self).__name__
        if self.rank not in (1, 2) or len(self.strides) != self.rank or len(self.pads) != self.rank:
            raise ValueError(f"{name}: kernel, strides and pads need one entry per spatial axis "
                             f"(1 or 2); received {self.kernel}, {self.strides}, {self.pads}")
        if min(self.kernel + self.strides) < 1 or any(
                not 0 <= p < k for (b, a), k in zip(self.pads, self.kernel) for p in (b, a)):
            raise ValueError(f"{name}: kernel and strides must be positive, pads at least 0 and "
                             f"less than the kernel; received {self.kernel}, {self.strides}, "
                             f"{self.pads}")

    def get_params(self, node):
        k = (1,) * (2 - self.rank) + self.kernel
        s = (1,) * (2 - self.rank) + self.strides
        p = ((0, 0),) * (2 - self.rank) + self.pads
        return self.params_type.get_params(mode_code=MODES[self.mode], kh=k[0], kw=k[1], sh=s[0],
                                           sw=s[1], ph=p[0][0], pw=p[1][0], pha=p[0][1],
                                           pwa=p[1][1])

    def out_lengths(self, spatial) -> list:
        """Output lengths (ints, or symbolic where the input's are; None where unknown)."""
        return [None if n is None else (n + b + a - k) // s + 1
                for n, k, s, (b, a) in zip(spatial, self.kernel, self.strides, self.pads)]

    def _np_check(self, x: np.ndarray, dy: np.ndarray | None = None) -> None:
        """The C code's checks, with its messages, for ``perform``."""
        name = type(self).__name__
        out = self.out_lengths(x.shape[2:])
        if min(out) < 1:
            k = (1,) * (2 - self.rank) + self.kernel
            spatial = (1,) * (2 - self.rank) + tuple(x.shape[2:])
            raise ValueError(f"{name}: the window {k} is larger than the padded input {spatial}")
        if dy is not None and dy.shape != (*x.shape[:2], *out):
            raise ValueError(f"{name}: dy has the wrong shape")

    def _float(self, x):
        x = pt.as_tensor_variable(x)
        if x.dtype not in ("float32", "float64"):
            x = pt.cast(x, config.floatX)
        if x.type.ndim != self.rank + 2:
            raise TypeError(f"{type(self).__name__}: x needs {self.rank + 2} axes (batch, "
                            f"channels, {self.rank} spatial); received {x.type.ndim}")
        return x

    # -- C compilation ------------------------------------------------------------------------------
    def _c_body(self, node, name, sub, x: str, contig: list[str], checks: list, out: str,
                out_shape: str, call: str) -> str:
        """C code (:class:`netbuild.ops.CCall`): the geometry from ``x`` (N, C, *spatial);
        ``checks``: ``(variable, name, shape)``; contiguous copies of ``contig``; the output
        ``out`` of ``out_shape``; then ``call`` without the GIL, ``{i[k]}`` in it the data of
        ``contig[k]`` and ``{out}`` that of the output. Shapes are the 2-d op's 4 dims (a 1-d op
        leaves out the third): one compiled module serves both ranks."""
        c = CCall(self, node, name, sub)
        p = sub["params"]
        for line in (
            "nbwin::Geom g_;",
            f"const int nd_ = PyArray_NDIM({x});",
            f"const npy_intp* xd_ = PyArray_DIMS({x});",
            "const npy_intp N_ = xd_[0];",
            "g_.C = xd_[1]; g_.F = 0; g_.dh = 1; g_.dw = 1;",
            "g_.H = nd_ == 4 ? xd_[2] : 1; g_.W = xd_[nd_ - 1];",
            f"g_.KH = {p}->kh; g_.KW = {p}->kw; g_.sh = {p}->sh; g_.sw = {p}->sw;",
            f"g_.ph = {p}->ph; g_.pw = {p}->pw;",
            f"g_.OH = nbwin::out_length(g_.H, g_.KH, g_.sh, 1, g_.ph, {p}->pha);",
            f"g_.OW = nbwin::out_length(g_.W, g_.KW, g_.sw, 1, g_.pw, {p}->pwa);",
        ):
            c.line(line)
        c.check("g_.OH >= 1 && g_.OW >= 1", "the window (%ld, %ld) is larger than the padded "
                "input (%ld, %ld)", "(long)g_.KH", "(long)g_.KW", "(long)g_.H", "(long)g_.W")
        op = type(self).__name__
        for v, what, shape in checks:
            c.when_ok(f"npy_intp d_[4]; nbwin::dims(d_, nd_, {shape}); err_ = nbwin::check({v}, "
                      f"nd_, d_, \"{op}\", \"{what}\");")
        ins = [c.input(v) for v in contig]
        a, b, h, w = (d.strip() for d in out_shape.split(","))
        # a 1-d op (nd_ == 3) leaves out h, as nbwin::dims does
        data = c.output(out, f"{a}, {b}, nd_ == 4 ? {h} : {w}, {w}", "nd_")
        c.run(call.format(i=ins, out=data))
        return c.code()


class Pool(_PoolCOp):
    """``y (N, C, *out)``: the max or mean of each window of ``x (N, C, *spatial)``."""

    def make_node(self, x):
        x = self._float(x)
        y = pt.tensor(dtype=x.dtype, shape=(*x.type.shape[:2], *self.out_lengths(x.type.shape[2:])))
        return Apply(self, [x], [y])

    def infer_shape(self, fgraph, node, shapes):
        (xs,) = shapes
        return [(xs[0], xs[1], *self.out_lengths(xs[2:]))]

    def pullback(self, inputs, outputs, cotangents):
        (dy,) = cotangents
        if isinstance(dy.type, DisconnectedType):
            return [disconnected_type()]
        return [PoolGrad(self.mode, self.kernel, self.strides, self.pads)(inputs[0], dy)]

    def perform(self, node, inputs, output_storage):
        (x,) = inputs
        self._np_check(x)
        stack, valid = _np_windows(x, self)
        if self.mode == "max":
            y = np.take_along_axis(stack, _np_argmax(stack, valid)[None], 0)[0]
        else:
            y = np.where(valid, stack, 0).sum(0) / valid.sum(0)
        output_storage[0][0] = np.asarray(y, dtype=node.outputs[0].dtype)

    def jax(self, node):
        """``y`` with ``lax.reduce_window``: the max (a NaN propagates), or the sum divided by the
        number of input elements each window covers."""
        return _jax_pool(self)

    def c_code(self, node, name, inputs, outputs, sub):
        (x,), (y,) = inputs, outputs
        call = f"nbpool::forward({sub['params']}->mode_code, N_ * g_.C, {{i[0]}}, {{out}}, g_)"
        return self._c_body(node, name, sub, x, [x], [], y, "N_, g_.C, g_.OH, g_.OW", call)


class PoolGrad(_PoolCOp):
    """``dx (N, C, *spatial)``: the gradient of :class:`Pool`'s input, from ``(x, dy)``."""

    def make_node(self, x, dy):
        x = self._float(x)
        dy = pt.cast(pt.as_tensor_variable(dy), x.dtype)
        if dy.type.ndim != x.type.ndim:
            raise TypeError(f"PoolGrad: dy needs {x.type.ndim} axes; received {dy.type.ndim}")
        return Apply(self, [x, dy], [x.type()])

    def connection_pattern(self, node):
        return [[self.mode == "max"], [True]]

    def infer_shape(self, fgraph, node, shapes):
        return [shapes[0]]

    def pullback(self, inputs, outputs, cotangents):
        x, dy = inputs
        (g,) = cotangents
        if self.mode == "avg":  # linear in dy: the adjoint of the adjoint is the pooling itself
            return [disconnected_type(), Pool("avg", self.kernel, self.strides, self.pads)(g)]
        # max: piecewise constant in x; in dy, a gather at each window's maximum (not written)
        return [pt.zeros_like(x),
                grad_not_implemented(self, 1, dy, "the second derivative of max pooling (the "
                                     "gradient of its gradient with respect to dy) has no op")]

    def perform(self, node, inputs, output_storage):
        x, dy = inputs
        self._np_check(x, dy)
        stack, valid = _np_windows(x, self)
        if self.mode == "max":
            idx = _np_argmax(stack, valid)
            parts = [np.where(idx == k, dy, 0) for k in range(len(stack))]
        else:
            parts = [np.where(v, dy / valid.sum(0), 0) for v in valid]
        output_storage[0][0] = np.asarray(_np_scatter(parts, x.shape, self),
                                          dtype=node.outputs[0].dtype)

    def jax(self, node):
        """``dx``: average pooling's transpose applied to ``dy``; for max pooling, each ``dy`` at
        its window's first maximum in row-major order (a NaN first), as the C code, where JAX's
        own gradient of a max may pick another of equal values."""
        import jax
        import jax.numpy as jnp

        forward = _jax_pool(self)

        def pool_grad(x, dy):
            like = jax.ShapeDtypeStruct(x.shape, dy.dtype)
            if self.mode == "avg":
                return jax.linear_transpose(forward, like)(dy)[0]
            # the windows (K, N, C, *out) are linear in x: their transpose adds each back
            windows = functools.partial(_jax_windows, self)
            valid = _np_valid(x.shape[2:], self)
            v = jnp.where(valid, windows(x), -jnp.inf)
            nan = jnp.isnan(v)
            hit = valid & jnp.where(nan.any(0), nan, v == v.max(0))
            k = jnp.arange(math.prod(self.kernel)).reshape(-1, *(1,) * dy.ndim)
            parts = jnp.where(k == jnp.argmax(hit, 0), dy, jnp.zeros((), dtype=dy.dtype))
            return jax.linear_transpose(windows, like)(parts)[0]

        return pool_grad

    def c_code(self, node, name, inputs, outputs, sub):
        x, dy = inputs
        (dx,) = outputs
        checks = [(dy, "dy", "N_, g_.C, g_.OH, g_.OW")]
        call = (f"nbpool::backward({sub['params']}->mode_code, N_ * g_.C, {{i[0]}}, {{i[1]}}, "
                "{out}, g_)")
        return self._c_body(node, name, sub, x, [x, dy], checks, dx, "N_, g_.C, g_.H, g_.W", call)


def pool(x, mode: str, kernel: Sequence[int], strides: Sequence[int] | None = None,
         pads: Sequence | None = None):
    """Max (``mode="max"``) or average pooling of ``x (N, C, *spatial)`` -> ``(N, C, *out)``;
    ``strides`` default to ``kernel``, ``pads`` (``(before, after)`` per axis) to none."""
    strides = kernel if strides is None else strides
    pads = ((0, 0),) * len(kernel) if pads is None else pads
    return Pool(mode, kernel, strides, pads)(x)


# -- JAX: for the jax backend (jax is imported only when a graph is compiled with it) -------------
def _jax_pool(op: _PoolCOp):
    """:class:`Pool` of ``op``'s mode and geometry as a JAX function of ``x``."""
    from jax import lax

    dims, strides = (1, 1, *op.kernel), (1, 1, *op.strides)
    pads = ((0, 0), (0, 0), *op.pads)

    def pool_(x):
        if op.mode == "max":  # padding's -inf never wins: a window covers an input element
            return lax.reduce_window(x, np.array(-np.inf, dtype=x.dtype), lax.max, dims, strides,
                                     pads)
        # a constant (numpy) zero: JAX's windowed sum, which has a transpose (PoolGrad)
        total = lax.reduce_window(x, np.zeros((), dtype=x.dtype), lax.add, dims, strides, pads)
        return total / _np_valid(x.shape[2:], op).sum(0).astype(x.dtype)

    return pool_


def _jax_windows(op: _PoolCOp, x):
    """:func:`_np_windows`'s ``(K, N, C, *out)`` window values (zeros on padding) in JAX."""
    import jax.numpy as jnp
    from jax import lax

    xp = jnp.pad(x, [(0, 0), (0, 0), *op.pads])
    out = op.out_lengths(x.shape[2:])
    return jnp.stack([lax.slice(xp, (0, 0, *(s.start for s in index)),
                                (*x.shape[:2], *(s.stop for s in index)),
                                (1, 1, *(s.step for s in index)))
                      for index in _np_offsets(op, out)])


# -- numpy: the same semantics, vectorized, for PyTensor's Python modes ------------------------------
def _np_offsets(op: _PoolCOp, out):
    """Per window offset (row-major), the strided slices of the padded input it reads."""
    for offset in itertools.product(*(range(k) for k in op.kernel)):
        yield tuple(slice(o, o + (m - 1) * s + 1, s) for o, s, m in zip(offset, op.strides, out))


def _np_windows(x: np.ndarray, op: _PoolCOp) -> tuple[np.ndarray, np.ndarray]:
    """``(K, N, C, *out)`` window values (zeros on padding) and ``(K, 1, 1, *out)``: which are
    inputs."""
    out = op.out_lengths(x.shape[2:])
    xp = np.pad(x, [(0, 0), (0, 0)] + list(op.pads))
    stack = np.stack([xp[(slice(None), slice(None)) + s] for s in _np_offsets(op, out)])
    return stack, _np_valid(x.shape[2:], op)


def _np_valid(spatial, op: _PoolCOp) -> np.ndarray:
    """``(K, 1, 1, *out)``: which window values of an input of ``spatial`` lengths are inputs."""
    inside = np.pad(np.ones(spatial, dtype=bool), list(op.pads))
    return np.stack([inside[s] for s in _np_offsets(op, op.out_lengths(spatial))])[:, None, None]


def _np_argmax(stack: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """``(N, C, *out)``: the index of each window's first maximum among its inputs (a NaN first)."""
    v = np.where(valid, stack, -np.inf)
    nan = np.isnan(v)
    hit = valid & np.where(nan.any(0), nan, v == v.max(0))
    return hit.argmax(0)


def _np_scatter(parts: list, shape, op: _PoolCOp) -> np.ndarray:
    """``dx``: each offset's ``(N, C, *out)`` part added back where that offset read."""
    padded = [n + b + a for n, (b, a) in zip(shape[2:], op.pads)]
    dxp = np.zeros((*shape[:2], *padded), dtype=parts[0].dtype if parts else float)
    for s, part in zip(_np_offsets(op, op.out_lengths(shape[2:])), parts):
        dxp[(slice(None), slice(None)) + s] += part
    crop = tuple(slice(b, b + n) for n, (b, _) in zip(shape[2:], op.pads))
    return dxp[(slice(None), slice(None)) + crop]

