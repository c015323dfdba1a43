"""Convolution (cross-correlation) as im2col + one BLAS gemm per image, in C, and its gradients.

Inputs are channels first, ``x (N, C, *spatial)``, with one or two spatial axes, and weights in
PyTorch's layout, ``W (F, C, *kernel)``. For each image, :class:`Conv` copies every window of the
zero-padded input into the columns of a buffer ``cols (C*prod(kernel), prod(out))`` (rows in
``W``'s order ``(c, *kernel offset)``, so ``W`` as ``(F, C*prod(kernel))`` is a view), then one
gemm writes ``y[n] (F, prod(out)) = W @ cols (+ b)`` straight into the NCHW output, as Caffe does.
Strides, dilation and padding live in the im2col loop; a 1x1 kernel without stride or padding
reads ``x[n]`` itself. A 1-d convolution is the 2-d one with a height of 1.

The gradients are two more ops, each one pass over the images:

- :class:`ConvGradInput`: ``cols = W^T @ dy[n]`` (gemm), then col2im adds every column back
  into the window it came from (``dx[n]``).
- :class:`ConvGradWeights`: ``dW += dy[n] @ cols^T`` (gemm with beta 1), ``cols`` recomputed
  from ``x[n]`` rather than kept from the forward pass, and ``db = sum dy`` in the same pass.

The geometry (strides, dilation, padding) is a run-time parameter of the C code, so one compiled
module per op and float type serves every layer. Each op also has a numpy ``perform`` (the same
algorithm, vectorized over the batch), which PyTensor's Python modes (the tests' FAST_COMPILE) run.
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence

import numpy as np
import pytensor.tensor as pt
from pytensor import config
from pytensor.gradient import DisconnectedType, disconnected_type, grad_not_implemented
from pytensor.graph.basic import Apply
from pytensor.link.c.params_type import ParamsType
from pytensor.scalar import int64, upcast
from pytensor.tensor.blas_headers import blas_header_version

from . import BlasCOp

#: Bump whenever the C code below changes: PyTensor's compile cache is keyed by it.
_VERSION = 11

#: Activations the ops apply themselves, and their codes in the C code.
ACTIVATIONS = {"linear": 0, "relu": 1}

# -- C --------------------------------------------------------------------------------------------
#: Helpers shared with :mod:`netbuild.ops.pool` (PyTensor drops repeated support code).
HELPERS = r"""
#include <string.h>
#include <stdlib.h>

namespace nbwin {

// The window geometry of one image, 2-d (a 1-d op has H = KH = OH = sh = dh = 1, ph = 0).
struct Geom {
    npy_intp C, H, W;           // input channels, height, width
    npy_intp F, KH, KW;         // filters (conv only), kernel
    npy_intp OH, OW;            // output height, width
    npy_intp sh, sw, dh, dw;    // strides, dilation
    npy_intp ph, pw;            // zeros before each axis
};

// Output lengths of one axis: floor((L + before + after - d*(k-1) - 1) / s) + 1 (< 1: no room).
static inline npy_intp out_length(npy_intp L, npy_intp k, npy_intp s, npy_intp d, npy_intp before,
                                  npy_intp after) {
    npy_intp span = d * (k - 1) + 1, padded = L + before + after;
    return padded < span ? 0 : (padded - span) / s + 1;
}

// The outputs o in [*lo, *hi) of an axis whose reads o*s + off fall inside [0, L).
static inline void inside(npy_intp off, npy_intp s, npy_intp L, npy_intp O, npy_intp* lo,
                          npy_intp* hi) {
    npy_intp a = off >= 0 ? 0 : (-off + s - 1) / s;
    npy_intp b = L - 1 - off < 0 ? 0 : (L - 1 - off) / s + 1;
    if (b > O) b = O;
    if (a > b) a = b;
    *lo = a;
    *hi = b;
}

// The shape (a, b, h, w) of a 2-d op's array, as nd = 4 dims, or as nd = 3 (a, b, w) for a 1-d op.
static inline void dims(npy_intp* d, int nd, npy_intp a, npy_intp b, npy_intp h, npy_intp w) {
    d[0] = a;
    d[1] = b;
    if (nd == 4) {
        d[2] = h;
        d[3] = w;
    } else {
        d[2] = w;
    }
}

// Whether a has the shape d (nd dims); else a ValueError naming the op and the array.
static int check(PyArrayObject* a, int nd, const npy_intp* d, const char* op, const char* what) {
    bool ok = PyArray_NDIM(a) == nd;
    for (int i = 0; ok && i < nd; ++i) ok = PyArray_DIMS(a)[i] == d[i];
    if (!ok) PyErr_Format(PyExc_ValueError, "%s: %s has the wrong shape", op, what);
    return ok ? 0 : -1;
}

}  // namespace nbwin
"""

# Row-major matrices are column-major transposes to Fortran BLAS: y[n] (F, P) = W (F, CK) cols
# (CK, P) is, column-major, y^T (P, F) = cols^T (P, CK) W^T (CK, F): gemm("N", "N", P, F, CK, ...).
_KERNELS = r"""
namespace nbconv {
using nbwin::Geom;
using nbwin::inside;

// x reads itself as the column buffer: a 1x1 kernel, no stride, no padding.
static inline bool direct(const Geom& g) {
    return g.KH == 1 && g.KW == 1 && g.sh == 1 && g.sw == 1 && g.ph == 0 && g.pw == 0
           && g.OH == g.H && g.OW == g.W;
}

// cols (C*KH*KW, OH*OW) of one image x (C, H, W); zeros where a window reads padding.
template <typename T>
__attribute__((noinline)) static void im2col(const T* __restrict__ x, T* __restrict__ cols,
                                             const Geom& g) {
    const npy_intp OW = g.OW, P = g.OH * g.OW, sw = g.sw;
    T* __restrict__ row = cols;
    for (npy_intp c = 0; c < g.C; ++c) {
        const T* xc = x + c * g.H * g.W;
        for (npy_intp u = 0; u < g.KH; ++u) {
            npy_intp ilo, ihi;
            inside(u * g.dh - g.ph, g.sh, g.H, g.OH, &ilo, &ihi);
            for (npy_intp v = 0; v < g.KW; ++v, row += P) {
                npy_intp jlo, jhi;
                const npy_intp off = v * g.dw - g.pw;
                inside(off, sw, g.W, OW, &jlo, &jhi);
                if (sw == 1 && jlo == 0 && jhi == OW && ilo == 0 && ihi == g.OH) {
                    // no padding read: short rows copied by a loop, not memcpy (2x faster)
                    const T* __restrict__ src = xc + (u * g.dh - g.ph) * g.W + off;
                    T* __restrict__ dst = row;
                    for (npy_intp i = 0; i < g.OH; ++i, src += g.sh * g.W, dst += OW)
                        for (npy_intp j = 0; j < OW; ++j) dst[j] = src[j];
                    continue;
                }
                memset(row, 0, sizeof(T) * ilo * OW);
                for (npy_intp i = ilo; i < ihi; ++i) {
                    const T* __restrict__ src = xc + (i * g.sh + u * g.dh - g.ph) * g.W + off;
                    T* __restrict__ dst = row + i * OW;
                    for (npy_intp j = 0; j < jlo; ++j) dst[j] = 0;
                    if (sw == 1) {
                        memcpy(dst + jlo, src + jlo, sizeof(T) * (jhi - jlo));
                    } else {
                        for (npy_intp j = jlo; j < jhi; ++j) dst[j] = src[j * sw];
                    }
                    for (npy_intp j = jhi; j < OW; ++j) dst[j] = 0;
                }
                memset(row + ihi * OW, 0, sizeof(T) * (g.OH - ihi) * OW);
            }
        }
    }
}

// dx (C, H, W) += every column of cols added back where im2col read it (padding dropped).
template <typename T>
__attribute__((noinline)) static void col2im(const T* __restrict__ cols, T* __restrict__ dx,
                                             const Geom& g) {
    const npy_intp OW = g.OW, P = g.OH * g.OW, sw = g.sw;
    const T* __restrict__ row = cols;
    for (npy_intp c = 0; c < g.C; ++c) {
        T* dc = dx + c * g.H * g.W;
        for (npy_intp u = 0; u < g.KH; ++u) {
            npy_intp ilo, ihi;
            inside(u * g.dh - g.ph, g.sh, g.H, g.OH, &ilo, &ihi);
            for (npy_intp v = 0; v < g.KW; ++v, row += P) {
                npy_intp jlo, jhi;
                const npy_intp off = v * g.dw - g.pw;
                inside(off, sw, g.W, OW, &jlo, &jhi);
                for (npy_intp i = ilo; i < ihi; ++i) {
                    T* __restrict__ dst = dc + (i * g.sh + u * g.dh - g.ph) * g.W + off;
                    const T* __restrict__ src = row + i * OW;
                    if (sw == 1) {
                        for (npy_intp j = jlo; j < jhi; ++j) dst[j] += src[j];
                    } else {
                        for (npy_intp j = jlo; j < jhi; ++j) dst[j * sw] += src[j];
                    }
                }
            }
        }
    }
}

// The sum of n values, accumulated in double as PyTensor sums float32 (so the bias gradient has
// the graph version's precision), in 8 running sums: one would wait on each previous addition.
template <typename T>
static inline double sum(const T* __restrict__ d, npy_intp n) {
    double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    npy_intp p = 0;
    for (; p + 8 <= n; p += 8)
        for (int k = 0; k < 8; ++k) acc[k] += (double)d[p + k];
    double s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (; p < n; ++p) s += (double)d[p];
    return s;
}

// relu in place, a negative value written as -0.0: its gradient tells z < 0 (0) from z = 0 (1,
// as PyTensor's maximum) by the sign bit.
template <typename T>
static inline void relu(T* __restrict__ y, npy_intp n) {
    for (npy_intp i = 0; i < n; ++i) {
        const T v = y[i];
        y[i] = v < 0 ? (T)-0.0 : v;
    }
}

// dz = dy where relu's output y has a clear sign bit (z >= 0), else 0 (copysign, not signbit:
// g++ vectorizes it).
template <typename T>
static inline void relu_grad(const T* __restrict__ y, const T* __restrict__ dy, T* __restrict__ dz,
                             npy_intp n) {
    for (npy_intp i = 0; i < n; ++i) dz[i] = std::copysign((T)1, y[i]) > 0 ? dy[i] : (T)0;
}

// Each thread's scratch: the columns of one image and one image's pre-activation gradient; for the
// weight gradient, a partial dW and bias sums per slice of the batch.
template <typename T>
struct Scratch {
    T* cols;            // nt * per_thread values: thread t's columns at cols + t * per_thread
    npy_intp per_thread;
    T* part;            // slices * F * CK: each slice's partial dW
    double* acc;        // slices * F: each slice's bias sums
    int nt;             // threads
};

// The scratch layout for N images with nt threads: its size in bytes; with a buffer, the
// pointers into it.
template <typename T>
static size_t scratch_layout(char* base, npy_intp N, int nt, const Geom& g, Scratch<T>* s) {
    const npy_intp CK = g.C * g.KH * g.KW, P = g.OH * g.OW, S = netbuild_slices(N);
    s->nt = nt;
    s->per_thread = (CK + g.F) * P;
    const size_t acc = sizeof(double) * (size_t)(S * g.F);
    const size_t part = sizeof(T) * (size_t)(S * g.F * CK);
    if (base) {
        s->acc = (double*)base;
        s->part = (T*)(base + acc);
        s->cols = (T*)(base + acc + part);
    }
    return acc + part + sizeof(T) * (size_t)(nt * s->per_thread);
}

// y (N, F, OH, OW) = act(conv(x (N, C, H, W), w (F, C, KH, KW)) + b (F,)); b may be NULL; act 1:
// relu, applied to each image's output while it is in cache. Images in parallel: each is computed
// alone, so the result does not depend on the threads.
template <typename T>
static void forward(npy_intp N, const T* x, const T* w, const T* b, int act, T* y,
                    const Scratch<T>& sc, const Geom& g) {
    netbuild_serial_blas serial(sc.nt);
    const npy_intp CK = g.C * g.KH * g.KW, P = g.OH * g.OW, F = g.F;
    #pragma omp parallel for num_threads(sc.nt) schedule(static)
    for (npy_intp n = 0; n < N; ++n) {
        T* cols = sc.cols + netbuild_thread() * sc.per_thread;
        const T* xn = x + n * g.C * g.H * g.W;
        T* yn = y + n * F * P;
        const T* a = xn;
        if (!direct(g)) {
            im2col(xn, cols, g);
            a = cols;
        }
        if (b) {
            for (npy_intp f = 0; f < F; ++f) {
                T* yf = yn + f * P;
                const T bf = b[f];
                for (npy_intp p = 0; p < P; ++p) yf[p] = bf;
            }
        }
        if (CK == 0) {
            if (!b) memset(yn, 0, sizeof(T) * F * P);
        } else {
            netbuild_gemm('N', 'N', (int)P, (int)F, (int)CK, (T)1, a, (int)P, w, (int)CK,
                 b ? (T)1 : (T)0, yn, (int)P);
        }
        if (act) relu(yn, F * P);
    }
}

// The gradient of the pre-activation for image n: dy[n] itself, or, after a relu (y not NULL),
// dy[n] masked into dz.
template <typename T>
static inline const T* pre_grad(const T* dy, const T* y, T* dz, npy_intp n, npy_intp FP) {
    if (!y) return dy + n * FP;
    relu_grad(y + n * FP, dy + n * FP, dz, FP);
    return dz;
}

// dx (N, C, H, W) = the input gradient of y = act(conv(x, w) + b), given dy (N, F, OH, OW) and,
// after a relu, y (else NULL). Images in parallel, each alone.
template <typename T>
static void grad_input(npy_intp N, const T* w, const T* dy, const T* y, T* dx, const Scratch<T>& sc,
                       const Geom& g) {
    netbuild_serial_blas serial(sc.nt);
    const npy_intp CK = g.C * g.KH * g.KW, P = g.OH * g.OW, F = g.F, HW = g.H * g.W;
    const bool dir = direct(g);
    #pragma omp parallel for num_threads(sc.nt) schedule(static)
    for (npy_intp n = 0; n < N; ++n) {
        T* cols = sc.cols + netbuild_thread() * sc.per_thread;
        T* dz = cols + CK * P;
        T* dxn = dx + n * g.C * HW;
        if (F == 0 || P == 0) {
            memset(dxn, 0, sizeof(T) * g.C * HW);
            continue;
        }
        const T* d = pre_grad(dy, y, dz, n, F * P);
        // cols^T (P, CK) = dz^T (P, F) W (F, CK)
        netbuild_gemm('N', 'T', (int)P, (int)CK, (int)F, (T)1, d, (int)P, w, (int)CK, (T)0,
             dir ? dxn : cols, (int)P);
        if (!dir) {
            memset(dxn, 0, sizeof(T) * g.C * HW);
            col2im(cols, dxn, g);
        }
    }
}

// dw (F, C, KH, KW) and db (F,) (db may be NULL) of y = act(conv(x, w) + b), given dy and, after
// a relu, y (else NULL). The batch is cut into netbuild_slices(N) slices, a function of N alone;
// each slice sums its images' products in order into its own partial, in parallel, and the
// partials are added in slice order: the same bits with any number of threads.
template <typename T>
static void grad_weights(npy_intp N, const T* x, const T* dy, const T* y, T* dw, T* db,
                         const Scratch<T>& sc, const Geom& g) {
    netbuild_serial_blas serial(sc.nt);
    const npy_intp CK = g.C * g.KH * g.KW, P = g.OH * g.OW, F = g.F, S = netbuild_slices(N);
    if (P == 0 || S == 0) {
        memset(dw, 0, sizeof(T) * F * CK);
        if (db) memset(db, 0, sizeof(T) * F);
        return;
    }
    #pragma omp parallel for num_threads(sc.nt) schedule(static)
    for (npy_intp s = 0; s < S; ++s) {
        T* cols = sc.cols + netbuild_thread() * sc.per_thread;
        T* dz = cols + CK * P;
        T* part = sc.part + s * F * CK;
        double* acc = sc.acc + s * F;
        memset(part, 0, sizeof(T) * F * CK);
        for (npy_intp f = 0; f < F; ++f) acc[f] = 0;
        for (npy_intp n = netbuild_slice_start(N, s); n < netbuild_slice_start(N, s + 1); ++n) {
            const T* xn = x + n * g.C * g.H * g.W;
            const T* d = pre_grad(dy, y, dz, n, F * P);
            const T* a = xn;
            if (!direct(g)) {
                im2col(xn, cols, g);
                a = cols;
            }
            // dW^T (CK, F) += cols (CK, P) dz^T (P, F)
            if (CK > 0 && F > 0)
                netbuild_gemm('T', 'N', (int)CK, (int)F, (int)P, (T)1, a, (int)P, d, (int)P, (T)1,
                              part, (int)CK);
            if (db)
                for (npy_intp f = 0; f < F; ++f) acc[f] += sum(d + f * P, P);
        }
    }
    const npy_intp FCK = F * CK;
    #pragma omp parallel for num_threads(sc.nt) schedule(static)
    for (npy_intp i = 0; i < FCK; ++i) {
        T v = sc.part[i];
        for (npy_intp s = 1; s < S; ++s) v += sc.part[s * FCK + i];
        dw[i] = v;
    }
    if (db) {
        for (npy_intp f = 0; f < F; ++f) {
            double v = sc.acc[f];
            for (npy_intp s = 1; s < S; ++s) v += sc.acc[s * F + f];
            db[f] = (T)v;
        }
    }
}

}  // namespace nbconv
"""


def _pairs(pads: Sequence) -> tuple[tuple[int, int], ...]:
    return tuple((int(b), int(a)) for b, a in pads)


class _ConvCOp(BlasCOp):
    """What the convolution ops share: the geometry, the activation, BLAS linking, the C kernels.

    ``strides``, ``dilation``: one int per spatial axis; ``pads``: ``(before, after)`` zeros per
    spatial axis. The rank (1 or 2) is their length. ``activation``: one of :data:`ACTIVATIONS`.
    """

    kernels = (HELPERS, _KERNELS)

    __props__ = ("strides", "dilation", "pads", "activation")
    params_type = ParamsType(sh=int64, sw=int64, dh=int64, dw=int64, ph=int64, pw=int64,
                             pha=int64, pwa=int64, act=int64)

    def __init__(self, strides: Sequence[int], dilation: Sequence[int], pads: Sequence,
                 activation: str = "linear"):
        if activation not in ACTIVATIONS:
            raise ValueError(f"{type(self).__name__}: no activation '{activation}' in the op; "
                             f"expected one of {sorted(ACTIVATIONS)}")
        self.activation = activation
        self.strides = tuple(int(s) for s in strides)
        self.dilation = tuple(int(d) for d in dilation)
        self.pads = _pairs(pads)
        self.rank = len(self.strides)
        if self.rank not in (1, 2) or len(self.dilation) != self.rank or len(self.pads) != self.rank:
            raise ValueError(f"{type(self).__name__}: strides, dilation and pads need one entry "
                             f"per spatial axis (1 or 2); received {self.strides}, "
                             f"{self.dilation}, {self.pads}")
        if min(self.strides + self.dilation) < 1 or min(sum(self.pads, ())) < 0:
            raise ValueError(f"{type(self).__name__}: strides and dilation must be positive and "
                             f"pads not negative; received {self.strides}, {self.dilation}, "
                             f"{self.pads}")

    def get_params(self, node):
        # a 1-d op is the 2-d one with a height of 1
        s = (1,) * (2 - self.rank) + self.strides
        d = (1,) * (2 - self.rank) + self.dilation
        p = ((0, 0),) * (2 - self.rank) + self.pads
        return self.params_type.get_params(sh=s[0], sw=s[1], dh=d[0], dw=d[1], ph=p[0][0],
                                           pw=p[1][0], pha=p[0][1], pwa=p[1][1],
                                           act=ACTIVATIONS[self.activation])

    @property
    def geometry(self) -> tuple:
        return self.strides, self.dilation, self.pads

    # -- shapes -----------------------------------------------------------------------------------
    def out_lengths(self, spatial, kernel) -> list:
        """Output lengths (ints, or symbolic where the input's are)."""
        out = []
        for n, k, s, d, (b, a) in zip(spatial, kernel, self.strides, self.dilation, self.pads):
            if n is None or k is None:
                out.append(None)
            else:
                out.append((n + b + a - d * (k - 1) - 1) // s + 1)
        return out

    def _np_check(self, x: np.ndarray, w: np.ndarray, dy: np.ndarray | None = None) -> None:
        """The C code's checks, with its messages, for ``perform``."""
        name = type(self).__name__
        if w.shape[1] != x.shape[1]:
            raise ValueError(f"{name}: W has {w.shape[1]} input channels, the input {x.shape[1]}")
        out = self.out_lengths(x.shape[2:], w.shape[2:])
        if min(out) < 1:
            lift = (1,) * (2 - self.rank)  # as the C code: a 1-d op is 2-d with a height of 1
            raise ValueError(f"{name}: the kernel {lift + tuple(w.shape[2:])} spans more than the "
                             f"padded input {lift + tuple(x.shape[2:])}")
        if dy is not None and dy.shape != (x.shape[0], w.shape[0], *out):
            raise ValueError(f"{name}: dy has the wrong shape")

    @staticmethod
    def _floats(*values) -> list:
        tensors = [pt.as_tensor_variable(v) for v in values]
        dtype = upcast(*[t.dtype for t in tensors])
        if dtype not in ("float32", "float64"):
            dtype = config.floatX
        return [pt.cast(t, dtype) for t in tensors]

    def _check(self, x, w):
        nd = self.rank + 2
        if x.type.ndim != nd or w.type.ndim != nd:
            raise TypeError(f"{type(self).__name__}: x and W need {nd} axes (batch or filters, "
                            f"channels, {self.rank} spatial); received {x.type.ndim} and "
                            f"{w.type.ndim}")

    # -- C compilation ------------------------------------------------------------------------------
    def c_headers(self, **kwargs):
        return ["<string.h>", "<stdlib.h>", "<cmath>"]

    def c_code_cache_version(self):
        return (_VERSION, *blas_header_version())

    def _c_body(self, node, name, sub, x_like: str, w_like: str, checks: list, contig: list[str],
                outs: list[tuple[str, str]], call: str) -> str:
        """C code: the geometry from ``x_like`` (N, C, *spatial) and ``w_like`` (F, C, *kernel);
        ``checks``: ``(variable, name, shape)`` of inputs to check; contiguous copies ``c_[i]`` of
        ``contig``; outputs ``(variable, shape)``; the scratch ``sc_`` (each thread's columns
        and pre-activation gradient, each slice's partial weight gradient); then ``call``
        without the GIL.
        A shape is the 2-d op's 4 dims, a C initializer (a 1-d op leaves out the third); the same
        code serves both ranks, so that they share one compiled module."""
        dtype = node.outputs[0].dtype
        ctype = {"float32": "npy_float32", "float64": "npy_float64"}[dtype]
        typenum = {"float32": "NPY_FLOAT32", "float64": "NPY_FLOAT64"}[dtype]
        p = sub["params"]
        op = type(self).__name__
        fail = sub["fail"]
        lines = [
            "{",
            "int err_ = 0;",
            f"PyArrayObject* c_[{len(contig)}] = {{{', '.join(['NULL'] * len(contig))}}};",
            f"typedef {ctype} T_;",
            "nbwin::Geom g_;",
            f"const int nd_ = PyArray_NDIM({x_like});",
            f"const npy_intp* xd_ = PyArray_DIMS({x_like});",
            f"const npy_intp* wd_ = PyArray_DIMS({w_like});",
            "const npy_intp N_ = xd_[0];",
            "g_.C = xd_[1]; g_.F = wd_[0];",
            "g_.H = nd_ == 4 ? xd_[2] : 1; g_.W = xd_[nd_ - 1];",
            "g_.KH = nd_ == 4 ? wd_[2] : 1; g_.KW = wd_[nd_ - 1];",
            f"g_.sh = {p}->sh; g_.sw = {p}->sw; g_.dh = {p}->dh; g_.dw = {p}->dw;",
            f"g_.ph = {p}->ph; g_.pw = {p}->pw;",
            f"g_.OH = nbwin::out_length(g_.H, g_.KH, g_.sh, g_.dh, g_.ph, {p}->pha);",
            f"g_.OW = nbwin::out_length(g_.W, g_.KW, g_.sw, g_.dw, g_.pw, {p}->pwa);",
            "npy_intp d_[4];",
            f"if (wd_[1] != g_.C) {{ PyErr_Format(PyExc_ValueError, \"{op}: W has %ld input "
            "channels, the input %ld\", (long)wd_[1], (long)g_.C); err_ = 1; }",
            f"if (!err_ && (g_.OH < 1 || g_.OW < 1)) {{ PyErr_Format(PyExc_ValueError, \"{op}: "
            "the kernel (%ld, %ld) spans more than the padded input (%ld, %ld)\", (long)g_.KH, "
            "(long)g_.KW, (long)g_.H, (long)g_.W); err_ = 1; }",
        ]
        for v, what, shape in checks:
            nd = "1" if shape.count(",") == 0 else "nd_"
            init = f"d_[0] = {shape};" if nd == "1" else f"nbwin::dims(d_, nd_, {shape});"
            lines.append(f"if (!err_) {{ {init} err_ = nbwin::check({v}, {nd}, d_, \"{op}\", "
                         f"\"{what}\"); }}")
        for i, v in enumerate(contig):
            lines.append(f"if (!err_) {{ c_[{i}] = PyArray_GETCONTIGUOUS({v}); if (!c_[{i}]) err_ = 1; }}")
        for v, shape in outs:
            if shape.count(",") == 0:
                lines.append(f"if (!err_) {{ d_[0] = {shape}; err_ = netbuild_output(&{v}, 1, d_, "
                             f"{typenum}); }}")
            else:
                lines.append(f"if (!err_) {{ nbwin::dims(d_, nd_, {shape}); "
                             f"err_ = netbuild_output(&{v}, nd_, d_, {typenum}); }}")
        lines += [
            f"nbconv::Scratch<{ctype}> sc_;",
            "const int nt_ = netbuild_threads();",
            f"if (!err_) {{ size_t n_ = nbconv::scratch_layout<{ctype}>(NULL, N_, nt_, g_, &sc_); "
            f"char* s_ = (char*)netbuild_scratch(&scratch_{name}, &scratch_size_{name}, n_); "
            f"if (!s_) err_ = 1; else nbconv::scratch_layout<{ctype}>(s_, N_, nt_, g_, &sc_); }}",
            f"#define IN_(i) ((const {ctype}*)PyArray_DATA(c_[i]))",
            f"#define OUT_(o) (({ctype}*)PyArray_DATA(o))",
            "if (!err_) {",
            "    Py_BEGIN_ALLOW_THREADS",
            f"    {call};",
            "    Py_END_ALLOW_THREADS",
            "}",
            "#undef IN_",
            "#undef OUT_",
            f"for (int i_ = 0; i_ < {len(contig)}; ++i_) Py_XDECREF(c_[i_]);",
            f"if (err_) {fail}",
            "}",
        ]
        return "\n".join(lines)


class Conv(_ConvCOp):
    """``y (N, F, *out) = act(conv(x (N, C, *spatial), W (F, C, *kernel)) [+ b (F,)])``.

    With ``activation="relu"`` a negative pre-activation comes out as ``-0.0``: the gradient ops
    read the sign bit of ``y`` to give relu's derivative 1 at 0 and 0 below, as PyTensor's
    ``maximum(z, 0)`` (and so every other relu of netbuild) does.
    """

    def make_node(self, x, w, b=None):
        tensors = self._floats(x, w, *([] if b is None else [b]))
        x, w = tensors[0], tensors[1]
        self._check(x, w)
        if b is not None and tensors[2].type.ndim != 1:
            raise TypeError(f"Conv: b needs 1 axis; received {tensors[2].type.ndim}")
        out = self.out_lengths(x.type.shape[2:], w.type.shape[2:])
        y = pt.tensor(dtype=x.dtype, shape=(x.type.shape[0], w.type.shape[0], *out))
        return Apply(self, tensors, [y])

    def infer_shape(self, fgraph, node, shapes):
        xs, ws = shapes[0], shapes[1]
        return [(xs[0], ws[0], *self.out_lengths(xs[2:], ws[2:]))]

    def pullback(self, inputs, outputs, cotangents):
        (dy,) = cotangents
        x, w = inputs[0], inputs[1]
        if isinstance(dy.type, DisconnectedType):
            return [disconnected_type() for _ in inputs]
        y = list(outputs) if self.activation == "relu" else []
        dx = ConvGradInput(*self.geometry, self.activation)(x, w, dy, *y)
        grads = ConvGradWeights(*self.geometry, self.activation, bias=len(inputs) == 3)(
            x, w, dy, *y, return_list=True)
        return [dx] + grads

    def perform(self, node, inputs, output_storage):
        x, w = inputs[0], inputs[1]
        b = inputs[2] if len(inputs) == 3 else None
        self._np_check(x, w)
        if b is not None and b.shape != (w.shape[0],):
            raise ValueError("Conv: b has the wrong shape")
        cols = _np_im2col(x, w.shape[2:], self)            # (N, CK, P)
        y = np.matmul(w.reshape(w.shape[0], -1), cols)    # (N, F, P)
        if b is not None:
            y += b[:, None]
        if self.activation == "relu":
            y = np.where(y < 0, np.asarray(-0.0, dtype=y.dtype), y)
        out = self.out_lengths(x.shape[2:], w.shape[2:])
        output_storage[0][0] = np.asarray(y.reshape(x.shape[0], w.shape[0], *out),
                                          dtype=node.outputs[0].dtype)

    def c_code(self, node, name, inputs, outputs, sub):
        x, w = inputs[0], inputs[1]
        (y,) = outputs
        bias = len(inputs) == 3
        checks = [(inputs[2], "b", "g_.F")] if bias else []
        b = "IN_(2)" if bias else "(const T_*)NULL"
        call = (f"nbconv::forward(N_, IN_(0), IN_(1), {b}, (int){sub['params']}->act, OUT_({y}), "
                "sc_, g_)")
        return self._c_body(node, name, sub, x, w, checks, list(inputs),
                            [(y, "N_, g_.F, g_.OH, g_.OW")], call)


class _ConvGradCOp(_ConvCOp):
    """A gradient op of :class:`Conv`: inputs ``(x, W, dy)``, and ``y`` (the forward output)
    after a relu, whose sign bits mask ``dy``."""

    def _inputs(self, x, w, dy, y):
        if (y is None) != (self.activation == "linear"):
            raise TypeError(f"{type(self).__name__}: the forward output y is an input exactly "
                            f"when there is an activation ('{self.activation}')")
        tensors = self._floats(x, w, dy, *([] if y is None else [y]))
        self._check(tensors[0], tensors[1])
        return tensors

    def _np_pre_grad(self, inputs) -> np.ndarray:
        """``dy``, masked by relu's derivative after a relu."""
        dy = inputs[2]
        if self.activation == "relu":
            dy = np.where(np.signbit(inputs[3]), np.zeros((), dtype=dy.dtype), dy)
        return dy

    def _second_order(self, inputs, connected: Sequence[bool]):
        """None for the linear ops, which have second derivatives; else what they return
        instead: an error where an input is connected (``connected``), as ``pytensor.grad``
        raises it only when asked for that derivative."""
        if self.activation == "linear":
            return None
        return [grad_not_implemented(self, i, v, "second derivatives through a convolution "
                                     "with its activation in the op") if c else disconnected_type()
                for i, (v, c) in enumerate(zip(inputs, connected))]


class ConvGradInput(_ConvGradCOp):
    """``dx (N, C, *spatial)``: the gradient of :class:`Conv`'s input, from ``(x, W, dy[, y])``;
    ``x`` gives only the shape."""

    def make_node(self, x, w, dy, y=None):
        tensors = self._inputs(x, w, dy, y)
        return Apply(self, tensors, [tensors[0].type()])

    def connection_pattern(self, node):
        return [[False], [True], [True]] + [[False]] * (len(node.inputs) - 3)

    def infer_shape(self, fgraph, node, shapes):
        return [shapes[0]]

    def pullback(self, inputs, outputs, cotangents):
        # dx is linear in W and in dy: the gradients are a forward convolution and a weight gradient
        not_linear = self._second_order(inputs, [False, True, True, False])
        if not_linear:
            return not_linear
        _, w, dy = inputs
        (g,) = cotangents
        return [disconnected_type(), ConvGradWeights(*self.geometry)(g, w, dy),
                Conv(*self.geometry)(g, w)]

    def perform(self, node, inputs, output_storage):
        x, w, dy = inputs[:3]
        self._np_check(x, w, dy)
        n, f = dy.shape[0], w.shape[0]
        dz = self._np_pre_grad(inputs).reshape(n, f, -1)
        cols = np.matmul(w.reshape(f, -1).T, dz)  # (N, CK, P)
        output_storage[0][0] = np.asarray(_np_col2im(cols, x.shape, w.shape[2:], self),
                                          dtype=node.outputs[0].dtype)

    def c_code(self, node, name, inputs, outputs, sub):
        x, w, dy = inputs[:3]
        (dx,) = outputs
        shape = "N_, g_.F, g_.OH, g_.OW"
        checks = [(dy, "dy", shape)] + [(v, "y", shape) for v in inputs[3:]]
        y = "IN_(2)" if len(inputs) == 4 else "(const T_*)NULL"
        call = f"nbconv::grad_input(N_, IN_(0), IN_(1), {y}, OUT_({dx}), sc_, g_)"
        return self._c_body(node, name, sub, x, w, checks, [w, dy] + list(inputs[3:]),
                            [(dx, "N_, g_.C, g_.H, g_.W")], call)


class ConvGradWeights(_ConvGradCOp):
    """``dW (F, C, *kernel)`` and, with ``bias``, ``db (F,)``: the gradients of :class:`Conv`'s
    weights and bias, from ``(x, W, dy[, y])``; ``W`` gives only the shape."""

    __props__ = ("strides", "dilation", "pads", "activation", "bias")

    def __init__(self, strides, dilation, pads, activation: str = "linear", bias: bool = False):
        super().__init__(strides, dilation, pads, activation)
        self.bias = bool(bias)

    def make_node(self, x, w, dy, y=None):
        tensors = self._inputs(x, w, dy, y)
        w = tensors[1]
        outs = [w.type()]
        if self.bias:
            outs.append(pt.tensor(dtype=w.dtype, shape=(w.type.shape[0],)))
        return Apply(self, tensors, outs)

    def connection_pattern(self, node):
        n = len(node.outputs)
        return [[True] * n, [False] * n, [True] * n] + [[False] * n] * (len(node.inputs) - 3)

    def infer_shape(self, fgraph, node, shapes):
        return [shapes[1]] + ([(shapes[1][0],)] if self.bias else [])

    def pullback(self, inputs, outputs, cotangents):
        not_linear = self._second_order(inputs, [True, False, True, False])
        if not_linear:
            return not_linear
        x, _, dy = inputs
        gx, gdy = pt.zeros_like(x), pt.zeros_like(dy)
        g = cotangents[0]
        if not isinstance(g.type, DisconnectedType):
            gx = gx + ConvGradInput(*self.geometry)(x, g, dy)
            gdy = gdy + Conv(*self.geometry)(x, g)
        if self.bias and not isinstance(cotangents[1].type, DisconnectedType):
            gb = cotangents[1]
            gdy = gdy + gb.dimshuffle("x", 0, *(["x"] * self.rank))
        return [gx, disconnected_type(), gdy]

    def perform(self, node, inputs, output_storage):
        x, w, dy = inputs[:3]
        self._np_check(x, w, dy)
        n, f = dy.shape[0], w.shape[0]
        cols = _np_im2col(x, w.shape[2:], self)               # (N, CK, P)
        d = self._np_pre_grad(inputs).reshape(n, f, -1)
        dtype = node.outputs[0].dtype
        output_storage[0][0] = np.asarray(np.einsum("nfp,nkp->fk", d, cols).reshape(w.shape),
                                          dtype=dtype)
        if self.bias:
            output_storage[1][0] = np.asarray(d.sum(axis=(0, 2), dtype="float64"), dtype=dtype)

    def c_code(self, node, name, inputs, outputs, sub):
        x, w, dy = inputs[:3]
        shape = "N_, g_.F, g_.OH, g_.OW"
        checks = [(dy, "dy", shape)] + [(v, "y", shape) for v in inputs[3:]]
        y = "IN_(2)" if len(inputs) == 4 else "(const T_*)NULL"
        db = f"OUT_({outputs[1]})" if self.bias else "(T_*)NULL"
        call = (f"nbconv::grad_weights(N_, IN_(0), IN_(1), {y}, OUT_({outputs[0]}), {db}, sc_, g_)")
        outs = [(outputs[0], "g_.F, g_.C, g_.KH, g_.KW")]
        if self.bias:
            outs.append((outputs[1], "g_.F"))
        return self._c_body(node, name, sub, x, w, checks, [x, dy] + list(inputs[3:]), outs, call)


def conv(x, w, b=None, strides: Sequence[int] = (1, 1), dilation: Sequence[int] | None = None,
         pads: Sequence | None = None, activation: str = "linear"):
    """``act(conv(x (N, C, *spatial), W (F, C, *kernel)) [+ b])`` -> ``(N, F, *out)``;
    ``pads``: ``(before, after)`` zeros per spatial axis (default none); ``activation``:
    ``linear`` or ``relu`` (see :class:`Conv`)."""
    rank = len(strides)
    dilation = (1,) * rank if dilation is None else dilation
    pads = ((0, 0),) * rank if pads is None else pads
    op = Conv(strides, dilation, pads, activation)
    return op(x, w) if b is None else op(x, w, b)


# -- numpy: the same algorithm over the whole batch, for PyTensor's Python modes -------------------
def _np_im2col(x: np.ndarray, kernel, op: _ConvCOp) -> np.ndarray:
    """``(N, C*prod(kernel), prod(out))``: rows in ``W``'s order ``(c, *offset)``."""
    n, c = x.shape[:2]
    out = op.out_lengths(x.shape[2:], kernel)
    xp = np.pad(x, [(0, 0), (0, 0)] + list(op.pads))
    cols = np.empty((n, c, *kernel, *out), dtype=x.dtype)
    for offset in itertools.product(*(range(k) for k in kernel)):
        index = tuple(slice(o * d, o * d + (m - 1) * s + 1, s)
                      for o, d, s, m in zip(offset, op.dilation, op.strides, out))
        cols[(slice(None), slice(None)) + offset] = xp[(slice(None), slice(None)) + index]
    return cols.reshape(n, c * math.prod(kernel), math.prod(out))


def _np_col2im(cols: np.ndarray, x_shape, kernel, op: _ConvCOp) -> np.ndarray:
    """The adjoint of :func:`_np_im2col`: every column added back where it was read."""
    n, c, *spatial = x_shape
    out = op.out_lengths(spatial, kernel)
    padded = [s + b + a for s, (b, a) in zip(spatial, op.pads)]
    dxp = np.zeros((n, c, *padded), dtype=cols.dtype)
    cols = cols.reshape(n, c, *kernel, *out)
    for offset in itertools.product(*(range(k) for k in kernel)):
        index = tuple(slice(o * d, o * d + (m - 1) * s + 1, s)
                      for o, d, s, m in zip(offset, op.dilation, op.strides, out))
        dxp[(slice(None), slice(None)) + index] += cols[(slice(None), slice(None)) + offset]
    crop = tuple(slice(b, b + s) for s, (b, _) in zip(spatial, op.pads))
    return dxp[(slice(None), slice(None)) + crop]
