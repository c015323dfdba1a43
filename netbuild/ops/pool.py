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

import itertools
from typing import Sequence

import numpy as np
import pytensor.tensor as pt
from pytensor import config
from pytensor.gradient import DisconnectedType, disconnected_type, grad_not_implemented
from pytensor.graph.basic import Apply
from pytensor.link.c.params_type import ParamsType
from pytensor.scalar import int64

from . import NetbuildCOp
from .conv import HELPERS

#: Bump whenever the C code below changes: PyTensor's compile cache is keyed by it.
_VERSION = 8

MODES = {"max": 0, "avg": 1}

_KERNELS = r"""
namespace nbpool {
using nbwin::Geom;

// The input rows [*h0, *h1) and columns [*w0, *w1) of output (i, j)'s window.
static inline void window(const Geom& g, npy_intp i, npy_intp j, npy_intp* h0, npy_intp* h1,
                          npy_intp* w0, npy_intp* w1) {
    npy_intp hs = i * g.sh - g.ph, ws = j * g.sw - g.pw;
    *h0 = hs < 0 ? 0 : hs;
    *h1 = hs + g.KH < g.H ? hs + g.KH : g.H;
    *w0 = ws < 0 ? 0 : ws;
    *w1 = ws + g.KW < g.W ? ws + g.KW : g.W;
}

// Whether v replaces m, the maximum so far: larger, or the first NaN.
template <typename T> static inline bool beats(T v, T m) { return v > m || (v != v && m == m); }

// The offset in a plane of the first maximum of output (i, j)'s window (a NaN beats any number).
template <typename T>
static inline npy_intp argmax(const T* __restrict__ x, const Geom& g, npy_intp i, npy_intp j) {
    npy_intp h0, h1, w0, w1;
    window(g, i, j, &h0, &h1, &w0, &w1);
    npy_intp best = h0 * g.W + w0;
    T m = x[best];
    for (npy_intp h = h0; h < h1; ++h) {
        for (npy_intp w = w0; w < w1; ++w) {
            const T v = x[h * g.W + w];
            if (beats(v, m)) {
                m = v;
                best = h * g.W + w;
            }
        }
    }
    return best;
}

// 2x2 windows tiling the input, every window inside it (an odd last row or column is cropped,
// never padded).
static inline bool tiles2x2(const Geom& g) {
    return g.KH == 2 && g.KW == 2 && g.sh == 2 && g.sw == 2 && g.ph == 0 && g.pw == 0
           && 2 * g.OH <= g.H && 2 * g.OW <= g.W;
}

// The 2x2 fast paths compute each window with selects, no branches (comparisons of real data
// mispredict: a branchy argmax was 6x slower), which g++ vectorizes; they ignore NaNs, and
// return whether a window of the row held one (or infinities of both signs: its sum is NaN),
// for the caller to redo that row with the exact code.

// y[j] = max of the window (r0[2j], r0[2j+1] / r1[2j], r1[2j+1]).
template <typename T>
static inline bool max2x2_row(const T* __restrict__ r0, const T* __restrict__ r1,
                              T* __restrict__ y, npy_intp OW) {
    int bad = 0;
    for (npy_intp j = 0; j < OW; ++j) {
        const T a = r0[2 * j], b = r0[2 * j + 1], c = r1[2 * j], d = r1[2 * j + 1];
        const T m1 = a > b ? a : b, m2 = c > d ? c : d;
        const T s = (a + b) + (c + d);
        bad |= s != s;
        y[j] = m1 >= m2 ? m1 : m2;
    }
    return bad;
}

// d0, d1 (the window rows of dx) = dy[j] at each window's first maximum, 0 elsewhere.
template <typename T>
static inline bool max2x2_grad_row(const T* __restrict__ r0, const T* __restrict__ r1,
                                   const T* __restrict__ dy, T* __restrict__ d0,
                                   T* __restrict__ d1, npy_intp OW) {
    int bad = 0;
    for (npy_intp j = 0; j < OW; ++j) {
        const T a = r0[2 * j], b = r0[2 * j + 1], c = r1[2 * j], e = r1[2 * j + 1], d = dy[j];
        const T m1 = a > b ? a : b, m2 = c > e ? c : e, m = m1 >= m2 ? m1 : m2;
        const bool h0 = a == m, h1 = !h0 & (b == m), h2 = !(h0 | h1) & (c == m);
        const bool h3 = !(h0 | h1 | h2);
        const T s = (a + b) + (c + e);
        bad |= s != s;
        d0[2 * j] = h0 ? d : (T)0;
        d0[2 * j + 1] = h1 ? d : (T)0;
        d1[2 * j] = h2 ? d : (T)0;
        d1[2 * j + 1] = h3 ? d : (T)0;
    }
    return bad;
}

// y (planes, OH, OW) from x (planes, H, W); mode 0: max, 1: average of the inputs covered.
template <typename T>
__attribute__((noinline)) static void forward(int mode, npy_intp planes, const T* __restrict__ x,
                                              T* __restrict__ y, const Geom& g) {
    const npy_intp HW = g.H * g.W, P = g.OH * g.OW;
    const int nt = netbuild_threads();
    if (mode == 0 && tiles2x2(g)) {
        #pragma omp parallel for num_threads(nt) schedule(static)
        for (npy_intp p = 0; p < planes; ++p) {
            const T* xp = x + p * HW;
            T* yp = y + p * P;
            for (npy_intp i = 0; i < g.OH; ++i) {
                const T* r0 = xp + 2 * i * g.W;
                if (max2x2_row(r0, r0 + g.W, yp + i * g.OW, g.OW))
                    for (npy_intp j = 0; j < g.OW; ++j) yp[i * g.OW + j] = xp[argmax(xp, g, i, j)];
            }
        }
        return;
    }
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (npy_intp p = 0; p < planes; ++p) {
        const T* xp = x + p * HW;
        T* yp = y + p * P;
        for (npy_intp i = 0; i < g.OH; ++i) {
            for (npy_intp j = 0; j < g.OW; ++j) {
                if (mode == 0) {
                    yp[i * g.OW + j] = xp[argmax(xp, g, i, j)];
                    continue;
                }
                npy_intp h0, h1, w0, w1;
                window(g, i, j, &h0, &h1, &w0, &w1);
                T s = 0;
                for (npy_intp h = h0; h < h1; ++h)
                    for (npy_intp w = w0; w < w1; ++w) s += xp[h * g.W + w];
                yp[i * g.OW + j] = s / (T)((h1 - h0) * (w1 - w0));
            }
        }
    }
}

// dx (planes, H, W) from x and dy (planes, OH, OW).
template <typename T>
__attribute__((noinline)) static void backward(int mode, npy_intp planes, const T* __restrict__ x,
                                               const T* __restrict__ dy, T* __restrict__ dx,
                                               const Geom& g) {
    const npy_intp HW = g.H * g.W, P = g.OH * g.OW;
    const int nt = netbuild_threads();
    if (mode == 0 && tiles2x2(g)) {
        // every element of dx written once, no zeroing pass
        #pragma omp parallel for num_threads(nt) schedule(static)
        for (npy_intp p = 0; p < planes; ++p) {
            const T* xp = x + p * HW;
            const T* dyp = dy + p * P;
            T* dxp = dx + p * HW;
            for (npy_intp i = 0; i < g.OH; ++i) {
                const T* r0 = xp + 2 * i * g.W;
                T* d0 = dxp + 2 * i * g.W;
                T* d1 = d0 + g.W;
                if (max2x2_grad_row(r0, r0 + g.W, dyp + i * g.OW, d0, d1, g.OW)) {
                    memset(d0, 0, sizeof(T) * 2 * g.OW);
                    memset(d1, 0, sizeof(T) * 2 * g.OW);
                    for (npy_intp j = 0; j < g.OW; ++j)
                        dxp[argmax(xp, g, i, j)] += dyp[i * g.OW + j];
                }
                for (npy_intp w = 2 * g.OW; w < g.W; ++w) d0[w] = d1[w] = 0;  // cropped column
            }
            memset(dxp + 2 * g.OH * g.W, 0, sizeof(T) * (g.H - 2 * g.OH) * g.W);  // cropped row
        }
        return;
    }
    #pragma omp parallel for num_threads(nt) schedule(static)
    for (npy_intp p = 0; p < planes; ++p) {
        const T* xp = x + p * HW;
        const T* dyp = dy + p * P;
        T* dxp = dx + p * HW;
        memset(dxp, 0, sizeof(T) * HW);
        for (npy_intp i = 0; i < g.OH; ++i) {
            for (npy_intp j = 0; j < g.OW; ++j) {
                const T d = dyp[i * g.OW + j];
                if (mode == 0) {
                    dxp[argmax(xp, g, i, j)] += d;
                    continue;
                }
                npy_intp h0, h1, w0, w1;
                window(g, i, j, &h0, &h1, &w0, &w1);
                const T share = d / (T)((h1 - h0) * (w1 - w0));
                for (npy_intp h = h0; h < h1; ++h)
                    for (npy_intp w = w0; w < w1; ++w) dxp[h * g.W + w] += share;
            }
        }
    }
}

}  // namespace nbpool
"""


class _PoolCOp(NetbuildCOp):
    """What the pooling ops share: mode, geometry, the C kernels.

    ``kernel``, ``strides``: one int per spatial axis (1 or 2 axes); ``pads``: ``(before, after)``
    per spatial axis, each smaller than the kernel (so that every window covers an input element).
    """

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
    def c_headers(self, **kwargs):
        return ["<string.h>", "<stdlib.h>"]

    kernels = (HELPERS, _KERNELS)

    def c_code_cache_version(self):
        return (_VERSION,)

    def _c_body(self, node, sub, x: str, contig: list[str], checks: list, out: str,
                out_shape: str, call: str) -> str:
        """C code: the geometry from ``x`` (N, C, *spatial); ``checks``: ``(variable, name,
        shape)``; contiguous copies ``c_[i]`` of ``contig``; the output ``out`` of ``out_shape``;
        then ``call`` (``OUT_`` its data) without the GIL. Shapes are the 2-d op's 4 dims (a 1-d op
        leaves out the third): one compiled module serves both ranks."""
        dtype = node.outputs[0].dtype
        ctype = {"float32": "npy_float32", "float64": "npy_float64"}[dtype]
        typenum = {"float32": "NPY_FLOAT32", "float64": "NPY_FLOAT64"}[dtype]
        p, op, fail = sub["params"], type(self).__name__, sub["fail"]
        lines = [
            "{",
            "int err_ = 0;",
            f"PyArrayObject* c_[{len(contig)}] = {{{', '.join(['NULL'] * len(contig))}}};",
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
            "npy_intp d_[4];",
            f"if (g_.OH < 1 || g_.OW < 1) {{ PyErr_Format(PyExc_ValueError, \"{op}: the window "
            "(%ld, %ld) is larger than the padded input (%ld, %ld)\", (long)g_.KH, (long)g_.KW, "
            "(long)g_.H, (long)g_.W); err_ = 1; }",
        ]
        for v, what, shape in checks:
            lines.append(f"if (!err_) {{ nbwin::dims(d_, nd_, {shape}); err_ = nbwin::check({v}, "
                         f"nd_, d_, \"{op}\", \"{what}\"); }}")
        for i, v in enumerate(contig):
            lines.append(f"if (!err_) {{ c_[{i}] = PyArray_GETCONTIGUOUS({v}); if (!c_[{i}]) err_ = 1; }}")
        lines += [
            f"if (!err_) {{ nbwin::dims(d_, nd_, {out_shape}); "
            f"err_ = netbuild_output(&{out}, nd_, d_, {typenum}); }}",
            f"#define IN_(i) ((const {ctype}*)PyArray_DATA(c_[i]))",
            "if (!err_) {",
            "    Py_BEGIN_ALLOW_THREADS",
            f"    {call.replace('OUT_', f'({ctype}*)PyArray_DATA({out})')};",
            "    Py_END_ALLOW_THREADS",
            "}",
            "#undef IN_",
            f"for (int i_ = 0; i_ < {len(contig)}; ++i_) Py_XDECREF(c_[i_]);",
            f"if (err_) {fail}",
            "}",
        ]
        return "\n".join(lines)


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

    def c_code(self, node, name, inputs, outputs, sub):
        (x,), (y,) = inputs, outputs
        call = f"nbpool::forward({sub['params']}->mode_code, N_ * g_.C, IN_(0), OUT_, g_)"
        return self._c_body(node, sub, x, [x], [], y, "N_, g_.C, g_.OH, g_.OW", call)


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

    def c_code(self, node, name, inputs, outputs, sub):
        x, dy = inputs
        (dx,) = outputs
        checks = [(dy, "dy", "N_, g_.C, g_.OH, g_.OW")]
        call = (f"nbpool::backward({sub['params']}->mode_code, N_ * g_.C, IN_(0), IN_(1), OUT_, "
                "g_)")
        return self._c_body(node, sub, x, [x, dy], checks, dx, "N_, g_.C, g_.H, g_.W", call)


def pool(x, mode: str, kernel: Sequence[int], strides: Sequence[int] | None = None,
         pads: Sequence | None = None):
    """Max (``mode="max"``) or average pooling of ``x (N, C, *spatial)`` -> ``(N, C, *out)``;
    ``strides`` default to ``kernel``, ``pads`` (``(before, after)`` per axis) to none."""
    strides = kernel if strides is None else strides
    pads = ((0, 0),) * len(kernel) if pads is None else pads
    return Pool(mode, kernel, strides, pads)(x)


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
    inside = np.pad(np.ones(x.shape[2:], dtype=bool), list(op.pads))
    stack = np.stack([xp[(slice(None), slice(None)) + s] for s in _np_offsets(op, out)])
    valid = np.stack([inside[s] for s in _np_offsets(op, out)])[:, None, None]
    return stack, valid


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

