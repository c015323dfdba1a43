"""The recurrent layers' loop over timesteps as one op in C, and its gradient as another.

:class:`RecurrentSequence` runs a whole sequence of ``simple_rnn``, ``lstm`` or ``gru`` steps
(PyTorch's equations, as in :mod:`netbuild.layers.recurrent`) in one Apply node, time-major::

    P (T, B, G*U)   every step's input projection x W_ih (one matrix product ahead of the op)
    b (G*U,)        its bias: b_ih + b_hh (the GRU's b_hh without its n block)
    W (U, G*U)      W_hh
    h0 (B, U)       initial state; the LSTM also takes c0 (B, U), the GRU b_hn (U,)

Its first output is ``H (T, B, U)``, the state after every step (the LSTM's second output is the
cell state ``C``); the others are what the gradient reads back (the gates of every step and, for
the LSTM, ``act(C)``, for the GRU ``h W_hn + b_hn``). Each step is one BLAS gemm
(``gates += h W``, the gate buffer preloaded with ``P[t] + b``) and one pass of elementwise
maths.

:class:`RecurrentSequenceGrad` is backpropagation through time in C: one gemm per step for the
state's gradient (``dh += dgates W^T``), the bias gradients summed (in double) as it goes, and
after the loop one gemm over all ``T*B`` rows for ``dW = sum_t h[t-1]^T dgates[t]``. It has no
gradient of its own (no second derivatives).

``activation`` and ``recurrent_activation`` are one of :data:`ACTIVATIONS` (the YAML names of
:mod:`netbuild.activations`, with the same derivatives, boundaries included: relu's is 1 at 0,
as PyTensor's ``maximum``; hard_sigmoid's is 1/6 on the closed interval, as ``clip``). They are
run-time parameters of the C code, so one compiled module serves every choice. The gate buffer
keeps each gate's activated value, or its pre-activation for the piecewise-linear relu and
hard_sigmoid (whose derivative at a kink the value alone cannot tell).

Both ops also have a numpy ``perform``, which PyTensor's Python modes (the tests' FAST_COMPILE)
run; it follows the C code line by line.
"""

from __future__ import annotations

import numpy as np
import pytensor.tensor as pt
from pytensor import config
from pytensor.gradient import DisconnectedType
from pytensor.graph.basic import Apply
from pytensor.link.c.params_type import ParamsType
from pytensor.scalar import int32, upcast
from pytensor.tensor.blas_headers import blas_header_version

from . import BlasCOp

#: The activations the C code computes, by YAML name, and their codes in it.
ACTIVATIONS = {"linear": 0, "tanh": 1, "sigmoid": 2, "relu": 3, "hard_sigmoid": 4}
#: Activations whose gate buffer entry is the pre-activation, not the value.
_KEEPS_INPUT = {"relu", "hard_sigmoid"}
#: cell -> (gate blocks G, name of the extra input after h0 or None)
CELLS = {"simple_rnn": (1, None), "lstm": (4, "c0"), "gru": (3, "b_hn")}

# -- C --------------------------------------------------------------------------------------------
# Row-major (B, N) arrays are column-major (N, B) matrices to Fortran BLAS, so every product is
# written transposed: gates[t] (B, G*U) += h (B, U) W (U, G*U) is gemm("N", "N", GU, B, U, W, h).
_KERNELS = r"""
#include <math.h>
#include <string.h>
#include <stdlib.h>
#include <stdint.h>

namespace nbrec {

enum { LINEAR = 0, TANH = 1, SIGMOID = 2, RELU = 3, HARD_SIGMOID = 4 };
static inline bool keeps_input(int code) { return code == RELU || code == HARD_SIGMOID; }

// float: branch-free exp and tanh (Cephes' expf and tanhf, within 2 ulp) that g++ vectorizes
// (with -fno-trapping-math; no floorf); double: libm's. NaN stays NaN.
static inline float exp_(float x) {
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t e = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &e, sizeof scale);
    return p * scale;
}
static inline double exp_(double x) { return exp(x); }

static inline float tanh_(float x) {
    float a = x < 0.0f ? -x : x;
    float s = x * x;
    float small = -5.70498872745e-3f;
    small = small * s + 2.06390887954e-2f;
    small = small * s - 5.37397155531e-2f;
    small = small * s + 1.33314422036e-1f;
    small = small * s - 3.33332819422e-1f;
    small = small * s * a + a;
    float big = 1.0f - 2.0f / (exp_(2.0f * a) + 1.0f);
    float r = a < 0.625f ? small : big;
    return x < 0.0f ? -r : r;
}
static inline double tanh_(double x) { return tanh(x); }

template <typename T> static inline T sigmoid_(T x) { return (T)1 / ((T)1 + exp_(-x)); }

// y = f(x) over n values (x == y allowed)
template <typename T> static void act(int code, const T* x, T* y, npy_intp n) {
    switch (code) {
    case TANH: for (npy_intp k = 0; k < n; ++k) y[k] = tanh_(x[k]); break;
    case SIGMOID: for (npy_intp k = 0; k < n; ++k) y[k] = sigmoid_(x[k]); break;
    case RELU:  // PyTensor's maximum(x, 0): NaN stays NaN
        for (npy_intp k = 0; k < n; ++k) { T v = x[k]; y[k] = (T)0 > v ? (T)0 : v; } break;
    case HARD_SIGMOID:  // clip(x / 6 + 0.5, 0, 1)
        for (npy_intp k = 0; k < n; ++k) {
            T v = x[k] / (T)6 + (T)0.5;
            y[k] = v < (T)0 ? (T)0 : (v > (T)1 ? (T)1 : v);
        }
        break;
    default: if (x != y) memcpy(y, x, sizeof(T) * n);
    }
}

// g *= f'(x), from what the gate buffer keeps: f(x), or x for relu and hard_sigmoid
template <typename T> static void act_grad(int code, const T* s, T* g, npy_intp n) {
    switch (code) {
    case TANH: for (npy_intp k = 0; k < n; ++k) g[k] = g[k] * ((T)1 - s[k] * s[k]); break;
    case SIGMOID: for (npy_intp k = 0; k < n; ++k) g[k] = g[k] * s[k] * ((T)1 - s[k]); break;
    case RELU: for (npy_intp k = 0; k < n; ++k) g[k] = (s[k] >= (T)0 ? (T)1 : (T)0) * g[k]; break;
    case HARD_SIGMOID:
        for (npy_intp k = 0; k < n; ++k) {
            T v = s[k] / (T)6 + (T)0.5;
            g[k] = ((v >= (T)0 && v <= (T)1) ? (T)1 : (T)0) * g[k] / (T)6;
        }
        break;
    default: break;
    }
}

// The values f(x) of a gate block: the kept ones, or computed into tmp
template <typename T> static inline const T* values(int code, const T* s, T* tmp, npy_intp n) {
    if (!keeps_input(code)) return s;
    act(code, s, tmp, n);
    return tmp;
}

template <typename T> static inline void add(T* __restrict y, const T* __restrict x, npy_intp n) {
    for (npy_intp k = 0; k < n; ++k) y[k] += x[k];
}

// rows of y = rows of x + bias (rows of n values)
template <typename T>
static void add_bias(T* __restrict y, const T* __restrict x, const T* __restrict bias,
                     npy_intp rows, npy_intp n) {
    for (npy_intp r = 0; r < rows; ++r)
        for (npy_intp k = 0; k < n; ++k) y[r * n + k] = x[r * n + k] + bias[k];
}

// a bias gradient: summed in double, then stored
template <typename T>
static inline void accumulate(double* __restrict acc, const T* __restrict d, npy_intp n) {
    for (npy_intp k = 0; k < n; ++k) acc[k] += d[k];
}
template <typename T>
static inline void store(T* __restrict out, const double* __restrict acc, npy_intp n) {
    for (npy_intp k = 0; k < n; ++k) out[k] = (T)acc[k];
}

// dW (U, G) = sum_t h[t-1]^T dA[t]: one gemm over steps 1..T-1 (h = H[0..T-2]), one for step 0 (h0)
template <typename T>
static void weight_grad(int Tn, int Bn, int U, int G, const T* dA, const T* H, const T* h0, T* dW) {
    netbuild_gemm('N', 'T', G, U, (Tn - 1) * Bn, (T)1, dA + (size_t)Bn * G, G, H, U, (T)0, dW, G);
    netbuild_gemm('N', 'T', G, U, Tn > 0 ? Bn : 0, (T)1, dA, G, h0, U, Tn > 1 ? (T)1 : (T)0, dW, G);
}

// The state's gradient carried to step t - 1: dh = dH[t-1] + dA[t] W^T (+ what dh already holds
// when keep); at t = 0 into dh0.
template <typename T>
static void carry(int t, int Bn, int U, int G, const T* W, const T* dAt, const T* dH, bool keep,
                  T* dh, T* dh0) {
    const size_t step = (size_t)Bn * U;
    if (t && keep) add(dh, dH + (t - 1) * step, step);
    else if (t) memcpy(dh, dH + (t - 1) * step, sizeof(T) * step);
    else if (keep) memcpy(dh0, dh, sizeof(T) * step);
    netbuild_gemm('T', 'N', U, Bn, G, (T)1, W, G, dAt, G, (t || keep) ? (T)1 : (T)0, t ? dh : dh0, U);
}

// -- simple_rnn: h = act(p + b + h W) ----------------------------------------------------------
template <typename T>
static void rnn_forward(int a, int Tn, int Bn, int U, const T* P, const T* bias, const T* W,
                        const T* h0, T* H, T* S) {
    const size_t step = (size_t)Bn * U;
    for (int t = 0; t < Tn; ++t) {
        T* St = S + t * step;
        add_bias(St, P + t * step, bias, Bn, U);
        netbuild_gemm('N', 'N', U, Bn, U, (T)1, W, U, t ? H + (t - 1) * step : h0, U, (T)1, St, U);
        act(a, St, H + t * step, step);
        if (!keeps_input(a)) memcpy(St, H + t * step, sizeof(T) * step);
    }
}

template <typename T>
static void rnn_backward(int a, int Tn, int Bn, int U, const T* W, const T* h0, const T* H,
                         const T* S, const T* dH, T* dP, T* db, T* dW, T* dh0, T* dh, double* acc) {
    const size_t step = (size_t)Bn * U;
    memset(acc, 0, sizeof(double) * U);
    if (Tn > 0) memcpy(dh, dH + (Tn - 1) * step, sizeof(T) * step);
    else memset(dh0, 0, sizeof(T) * step);
    for (int t = Tn - 1; t >= 0; --t) {
        T* dPt = dP + t * step;
        memcpy(dPt, dh, sizeof(T) * step);
        act_grad(a, S + t * step, dPt, step);
        for (int b = 0; b < Bn; ++b) accumulate(acc, dPt + (size_t)b * U, U);
        carry(t, Bn, U, U, W, dPt, dH, false, dh, dh0);
    }
    store(db, acc, U);
    weight_grad(Tn, Bn, U, U, dP, H, h0, dW);
}

// -- lstm: a = p + b + h W; i, f, g, o = ract, ract, act, ract; c = f c + i g; h = o act(c) ----
template <typename T>
static void lstm_forward(int a, int ra, int Tn, int Bn, int U, const T* P, const T* bias,
                         const T* W, const T* h0, const T* c0, T* H, T* C, T* S, T* AC, T* y) {
    const int G = 4 * U;
    for (int t = 0; t < Tn; ++t) {
        T* St = S + (size_t)t * Bn * G;
        add_bias(St, P + (size_t)t * Bn * G, bias, Bn, G);
        netbuild_gemm('N', 'N', G, Bn, U, (T)1, W, G, t ? H + (size_t)(t - 1) * Bn * U : h0, U, (T)1, St, G);
        const T* cp = t ? C + (size_t)(t - 1) * Bn * U : c0;
        for (int b = 0; b < Bn; ++b) {
            T* s = St + (size_t)b * G;
            size_t row = ((size_t)t * Bn + b) * U;
            T* __restrict c = C + row;
            T* __restrict ac = AC + row;
            T* __restrict h = H + row;
            const T* __restrict cpb = cp + (size_t)b * U;
            act(ra, s, y, 2 * U);
            act(a, s + 2 * U, y + 2 * U, U);
            act(ra, s + 3 * U, y + 3 * U, U);
            const T *__restrict i = y, *__restrict f = y + U, *__restrict g = y + 2 * U;
            const T* __restrict o = y + 3 * U;
            for (int k = 0; k < U; ++k) c[k] = f[k] * cpb[k] + i[k] * g[k];
            act(a, c, ac, U);
            for (int k = 0; k < U; ++k) h[k] = o[k] * ac[k];
            if (!keeps_input(ra)) {
                memcpy(s, y, sizeof(T) * 2 * U);
                memcpy(s + 3 * U, o, sizeof(T) * U);
            }
            if (!keeps_input(a)) memcpy(s + 2 * U, g, sizeof(T) * U);
        }
    }
}

// dC may be NULL (no gradient reaches the cell states)
template <typename T>
static void lstm_backward(int a, int ra, int Tn, int Bn, int U, const T* W, const T* h0,
                          const T* c0, const T* H, const T* C, const T* S, const T* AC,
                          const T* dH, const T* dC, T* dP, T* db, T* dW, T* dh0, T* dc0,
                          T* dh, T* dc, T* tmp, double* acc) {
    const int G = 4 * U;
    const size_t step = (size_t)Bn * U;
    T *vi = tmp, *vf = tmp + U, *vg = tmp + 2 * U, *vo = tmp + 3 * U;
    T* __restrict d_ac = tmp + 4 * U;
    memset(acc, 0, sizeof(double) * G);
    memset(dc, 0, sizeof(T) * step);
    if (Tn > 0) memcpy(dh, dH + (Tn - 1) * step, sizeof(T) * step);
    else memset(dh0, 0, sizeof(T) * step);
    for (int t = Tn - 1; t >= 0; --t) {
        const T* cp = t ? C + (t - 1) * step : c0;
        T* dPt = dP + (size_t)t * Bn * G;
        for (int b = 0; b < Bn; ++b) {
            const T* s = S + ((size_t)t * Bn + b) * G;
            size_t row = t * step + (size_t)b * U;
            const T *__restrict i = values(ra, s, vi, U), *__restrict f = values(ra, s + U, vf, U);
            const T *__restrict g = values(a, s + 2 * U, vg, U);
            const T* __restrict o = values(ra, s + 3 * U, vo, U);
            const T *__restrict ac = AC + row, *__restrict c = C + row;
            const T* __restrict cpb = cp + (size_t)b * U;
            T *__restrict dhb = dh + (size_t)b * U, *__restrict dcb = dc + (size_t)b * U;
            T* __restrict d = dPt + (size_t)b * G;
            // h = o act(c): the cell state's gradient through act
            for (int k = 0; k < U; ++k) d_ac[k] = dhb[k] * o[k];
            act_grad(a, keeps_input(a) ? c : ac, d_ac, U);
            if (dC) add(d_ac, dC + row, U);
            for (int k = 0; k < U; ++k) {
                T dck = dcb[k] + d_ac[k];
                d[k] = dck * g[k];
                d[U + k] = dck * cpb[k];
                d[2 * U + k] = dck * i[k];
                d[3 * U + k] = dhb[k] * ac[k];
                dcb[k] = dck * f[k];
            }
            act_grad(ra, s, d, 2 * U);
            act_grad(a, s + 2 * U, d + 2 * U, U);
            act_grad(ra, s + 3 * U, d + 3 * U, U);
            accumulate(acc, d, G);
        }
        carry(t, Bn, U, G, W, dPt, dH, false, dh, dh0);
    }
    memcpy(dc0, dc, sizeof(T) * step);
    store(db, acc, G);
    weight_grad(Tn, Bn, U, G, dP, H, h0, dW);
}

// -- gru: q = h W; r, z = ract(p + b + q); n = act(p_n + b_n + r (q_n + b_hn));
//    h = (1 - z) n + z h ---------------------------------------------------------------------
template <typename T>
static void gru_forward(int a, int ra, int Tn, int Bn, int U, const T* P, const T* bias,
                        const T* W, const T* h0, const T* bhn, T* H, T* S, T* HN, T* Q, T* pre,
                        T* y) {
    const int G = 3 * U;
    for (int t = 0; t < Tn; ++t) {
        const T* hp = t ? H + (size_t)(t - 1) * Bn * U : h0;
        netbuild_gemm('N', 'N', G, Bn, U, (T)1, W, G, hp, U, (T)0, Q, G);
        for (int b = 0; b < Bn; ++b) {
            size_t grow = ((size_t)t * Bn + b) * G, row = ((size_t)t * Bn + b) * U;
            const T *__restrict p = P + grow, *__restrict q = Q + (size_t)b * G;
            const T* __restrict hpb = hp + (size_t)b * U;
            T *__restrict s = S + grow, *__restrict hn = HN + row, *__restrict h = H + row;
            for (int k = 0; k < 2 * U; ++k) pre[k] = (p[k] + bias[k]) + q[k];
            act(ra, pre, y, 2 * U);
            const T *__restrict r = y, *__restrict z = y + U;
            for (int k = 0; k < U; ++k) {
                hn[k] = q[2 * U + k] + bhn[k];
                pre[2 * U + k] = (p[2 * U + k] + bias[2 * U + k]) + r[k] * hn[k];
            }
            act(a, pre + 2 * U, y + 2 * U, U);
            const T* __restrict n = y + 2 * U;
            for (int k = 0; k < U; ++k) h[k] = ((T)1 - z[k]) * n[k] + z[k] * hpb[k];
            memcpy(s, keeps_input(ra) ? pre : y, sizeof(T) * 2 * U);
            memcpy(s + 2 * U, keeps_input(a) ? pre + 2 * U : n, sizeof(T) * U);
        }
    }
}

template <typename T>
static void gru_backward(int a, int ra, int Tn, int Bn, int U, const T* W, const T* h0,
                         const T* H, const T* S, const T* HN, const T* dH, T* dP, T* db, T* dW,
                         T* dh0, T* dbhn, T* dh, T* dQ, T* tmp, double* acc) {
    const int G = 3 * U;
    const size_t step = (size_t)Bn * U;
    T *vr = tmp, *vz = tmp + U, *vn = tmp + 2 * U;
    double* acc_hn = acc + G;
    memset(acc, 0, sizeof(double) * (G + U));
    if (Tn > 0) memcpy(dh, dH + (Tn - 1) * step, sizeof(T) * step);
    else memset(dh0, 0, sizeof(T) * step);
    for (int t = Tn - 1; t >= 0; --t) {
        const T* hp = t ? H + (t - 1) * step : h0;
        for (int b = 0; b < Bn; ++b) {
            size_t grow = ((size_t)t * Bn + b) * G, row = t * step + (size_t)b * U;
            const T* s = S + grow;
            const T *__restrict r = values(ra, s, vr, U), *__restrict z = values(ra, s + U, vz, U);
            const T* __restrict n = values(a, s + 2 * U, vn, U);
            const T *__restrict hn = HN + row, *__restrict hpb = hp + (size_t)b * U;
            T *__restrict dhb = dh + (size_t)b * U, *__restrict d = dP + grow;
            T* __restrict dq = dQ + grow;
            for (int k = 0; k < U; ++k) {
                d[U + k] = dhb[k] * (hpb[k] - n[k]);
                d[2 * U + k] = dhb[k] * ((T)1 - z[k]);
            }
            act_grad(a, s + 2 * U, d + 2 * U, U);
            for (int k = 0; k < U; ++k) {
                d[k] = d[2 * U + k] * hn[k];
                dq[2 * U + k] = d[2 * U + k] * r[k];
                dhb[k] = dhb[k] * z[k];
            }
            act_grad(ra, s, d, 2 * U);
            memcpy(dq, d, sizeof(T) * 2 * U);
            accumulate(acc, d, G);
            accumulate(acc_hn, dq + 2 * U, U);
        }
        carry(t, Bn, U, G, W, dQ + (size_t)t * Bn * G, dH, true, dh, dh0);
    }
    store(db, acc, G);
    store(dbhn, acc_hn, U);
    weight_grad(Tn, Bn, U, G, dQ, H, h0, dW);
}

}  // namespace nbrec

// Check an input's shape: a ValueError "op: name has shape (..); expected (Tn, ..) = (..)".
static int nbrec_check(PyArrayObject* a, const char* op, const char* name, const char* expected,
                       int nd, const npy_intp* dims) {
    bool ok = PyArray_NDIM(a) == nd;
    for (int i = 0; ok && i < nd; ++i) ok = PyArray_DIMS(a)[i] == dims[i];
    if (ok) return 0;
    char got[160] = "", want[160] = "";
    size_t g = 0, w = 0;
    for (int i = 0; i < PyArray_NDIM(a) && g < 120; ++i)
        g += snprintf(got + g, sizeof got - g, i ? ", %ld" : "%ld", (long)PyArray_DIMS(a)[i]);
    if (PyArray_NDIM(a) == 1) snprintf(got + g, sizeof got - g, ",");
    for (int i = 0; i < nd && w < 120; ++i)
        w += snprintf(want + w, sizeof want - w, i ? ", %ld" : "%ld", (long)dims[i]);
    if (nd == 1) snprintf(want + w, sizeof want - w, ",");
    PyErr_Format(PyExc_ValueError, "%s: %s has shape (%s); expected (%s) = (%s)", op, name, got,
                 expected, want);
    return -1;
}

"""

#: Bump on every change of the C code: the compile cache keys a module by this version, not by
#: its text.
_VERSION = 6

# Shapes of the ops' inputs and outputs, as C initializer lists (Tn, Bn, U and G = gates * U).
_SHAPES = {"P": "Tn, Bn, G", "b": "G", "W": "U, G", "h0": "Bn, U", "c0": "Bn, U", "b_hn": "U",
           "H": "Tn, Bn, U", "C": "Tn, Bn, U", "S": "Tn, Bn, G", "AC": "Tn, Bn, U",
           "HN": "Tn, Bn, U", "dH": "Tn, Bn, U", "dC": "Tn, Bn, U"}
for _n in ("P", "b", "W", "h0", "c0", "b_hn"):
    _SHAPES["d" + _n] = _SHAPES[_n]


class _RecurrentCOp(BlasCOp):
    """What the forward and gradient ops share: properties, BLAS linking, the C kernels.

    A subclass names its inputs and outputs (:meth:`input_names`, :meth:`output_names`) and
    gives the kernel call (:meth:`_kernel`)."""

    kernels = (_KERNELS,)
    # without trapping maths g++ may compute both sides of a select: the loops vectorize
    extra_compile_args = ("-fno-trapping-math",)

    __props__ = ("cell", "activation", "recurrent_activation")
    params_type = ParamsType(act=int32, ract=int32)

    def __init__(self, cell: str, activation: str = "tanh", recurrent_activation: str = "sigmoid"):
        if cell not in CELLS:
            raise ValueError(f"unknown cell '{cell}'; expected one of {sorted(CELLS)}")
        for a in (activation, recurrent_activation):
            if a not in ACTIVATIONS:
                raise ValueError(f"no C code for activation '{a}'; expected one of "
                                 f"{sorted(ACTIVATIONS)}")
        self.cell = cell
        self.activation = activation
        self.recurrent_activation = recurrent_activation
        self.gates = CELLS[cell][0]

    def input_names(self) -> list[str]:
        raise NotImplementedError

    def output_names(self) -> list[str]:
        raise NotImplementedError

    def get_params(self, node):
        return self.params_type.get_params(act=ACTIVATIONS[self.activation],
                                           ract=ACTIVATIONS[self.recurrent_activation])

    def _tensors(self, values) -> list:
        """The inputs as tensors of one float type (their upcast, or floatX when that is no
        float), each checked for its number of axes."""
        names = self.input_names()
        if len(values) != len(names):
            raise TypeError(f"{self} takes {len(names)} inputs ({', '.join(names)}); "
                            f"received {len(values)}")
        tensors = [pt.as_tensor_variable(v) for v in values]
        dtype = upcast(*[t.dtype for t in tensors])
        if dtype not in ("float32", "float64"):
            dtype = config.floatX
        tensors = [pt.cast(t, dtype) for t in tensors]
        for t, name in zip(tensors, names):
            ndim = _SHAPES[name].count(",") + 1
            if t.type.ndim != ndim:
                raise TypeError(f"{self}: {name} must have {ndim} axes; received {t.type.ndim}")
        return tensors

    def _output_types(self, by_name: dict) -> list:
        """Output types with the static sizes the inputs tell (T, B from the first sequence
        input, U from W)."""
        seq = next(by_name[n] for n in ("P", "H") if n in by_name)
        T, B = seq.type.shape[:2]
        U = by_name["W"].type.shape[0]
        G = None if U is None else self.gates * U
        sizes = {"Tn": T, "Bn": B, "U": U, "G": G}
        dtype = by_name["W"].dtype
        return [pt.tensor(dtype=dtype, shape=tuple(sizes[d.strip()] for d in
                                                   _SHAPES[n].split(",")))
                for n in self.output_names()]

    def infer_shape(self, fgraph, node, shapes):
        by = dict(zip(self.input_names(), shapes))
        seq = by["P"] if "P" in by else by["H"]
        sizes = {"Tn": seq[0], "Bn": seq[1], "U": by["W"][0], "G": by["W"][1]}
        return [tuple(sizes[d.strip()] for d in _SHAPES[n].split(","))
                for n in self.output_names()]

    # -- C compilation --------------------------------------------------------------------------
    def c_headers(self, **kwargs):
        return ["<math.h>", "<string.h>", "<stdlib.h>", "<stdint.h>"]

    def c_code_cache_version(self):
        return (_VERSION, *blas_header_version())

    def _kernel(self) -> tuple[str, str, str]:
        """``(call, scratch elements, scratch doubles)``: the kernel call with ``{name}`` for
        each input and output and ``{w}``, ``{acc}`` for the scratch buffers."""
        raise NotImplementedError

    def c_code(self, node, name, inputs, outputs, sub):
        """Check the inputs' shapes, make them contiguous, allocate the outputs and the scratch
        buffer (kept by the node between calls), run the kernel without the GIL."""
        dtype = node.outputs[0].dtype
        ctype = {"float32": "npy_float32", "float64": "npy_float64"}[dtype]
        typenum = {"float32": "NPY_FLOAT32", "float64": "NPY_FLOAT64"}[dtype]
        in_names, out_names = self.input_names(), self.output_names()
        n_in = len(inputs)
        seq = inputs[in_names.index("P" if "P" in in_names else "H")]
        W = inputs[in_names.index("W")]
        call, n_work, n_acc = self._kernel()
        args = {n: f"(({ctype}*)PyArray_DATA(c_[{i}]))" for i, n in enumerate(in_names)}
        args.update({n: f"(({ctype}*)PyArray_DATA({o}))" for n, o in zip(out_names, outputs)})
        args.update(w="w_", acc="acc_", null=f"(({ctype}*)0)")
        lines = [
            "{",
            f"int act_ = {sub['params']}->act, ract_ = {sub['params']}->ract;",
            f"PyArrayObject* in_[{n_in}] = {{{', '.join(inputs)}}};",
            f"PyArrayObject* c_[{n_in}] = {{{', '.join(['NULL'] * n_in)}}};",
            "int err_ = 0;",
            f"npy_intp Tn = PyArray_NDIM({seq}) == 3 ? PyArray_DIMS({seq})[0] : 0;",
            f"npy_intp Bn = PyArray_NDIM({seq}) == 3 ? PyArray_DIMS({seq})[1] : 0;",
            f"npy_intp U = PyArray_NDIM({W}) == 2 ? PyArray_DIMS({W})[0] : 0;",
            f"npy_intp G = {self.gates} * U;",
        ]
        for i, n in enumerate(in_names):
            shape = _SHAPES[n]
            lines.append(f"if (!err_) {{ npy_intp d_[] = {{{shape}}}; err_ = nbrec_check(in_[{i}], "
                         f"\"{type(self).__name__}\", \"{n}\", \"{shape}\", "
                         f"{shape.count(',') + 1}, d_); }}")
        lines += [
            f"for (int i_ = 0; !err_ && i_ < {n_in}; ++i_) {{",
            "    c_[i_] = PyArray_GETCONTIGUOUS(in_[i_]);",
            "    if (!c_[i_]) err_ = 1;",
            "}",
        ]
        for n, o in zip(out_names, outputs):
            shape = _SHAPES[n]
            lines.append(f"if (!err_) {{ npy_intp d_[] = {{{shape}}}; "
                         f"err_ = netbuild_output(&{o}, {shape.count(',') + 1}, d_, {typenum}); }}")
        lines += [
            "double* acc_ = NULL;",
            f"{ctype}* w_ = NULL;",
            "if (!err_) {",
            f"    size_t n_acc_ = (size_t)({n_acc}), n_w_ = (size_t)({n_work});",
            f"    acc_ = (double*)netbuild_scratch(&scratch_{name}, &scratch_size_{name}, "
            f"sizeof(double) * n_acc_ + sizeof({ctype}) * n_w_);",
            "    if (!acc_) err_ = 1;",
            f"    else w_ = ({ctype}*)(acc_ + n_acc_);",
            "}",
            "if (!err_) {",
            "    Py_BEGIN_ALLOW_THREADS",
            f"    {call.format(**args)};",
            "    Py_END_ALLOW_THREADS",
            "}",
            f"for (int i_ = 0; i_ < {n_in}; ++i_) Py_XDECREF(c_[i_]);",
            f"if (err_) {sub['fail']}",
            "}",
        ]
        return "\n".join(lines)


def _check_shapes(op: _RecurrentCOp, values: list) -> None:
    """The numpy twin of the C code's ``nbrec_check``."""
    by = dict(zip(op.input_names(), values))
    seq = by["P"] if "P" in by else by["H"]
    T, B = seq.shape[:2] if seq.ndim == 3 else (0, 0)
    U = by["W"].shape[0] if by["W"].ndim == 2 else 0
    sizes = {"Tn": T, "Bn": B, "U": U, "G": op.gates * U}
    for name, value in by.items():
        expected = _SHAPES[name]
        want = tuple(sizes[d.strip()] for d in expected.split(","))
        if value.shape != want:
            raise ValueError(f"{type(op).__name__}: {name} has shape {value.shape}; expected "
                             f"({expected}) = {want}")


def _zeros_if_disconnected(g, like):
    return pt.zeros_like(like) if isinstance(g.type, DisconnectedType) else g


class RecurrentSequence(_RecurrentCOp):
    """A whole sequence of recurrent steps; see the module docstring.

    Inputs ``P, b, W, h0`` and ``c0`` (lstm) or ``b_hn`` (gru); outputs ``simple_rnn: H, S``,
    ``lstm: H, C, S, AC``, ``gru: H, S, HN``.
    """

    def input_names(self):
        extra = CELLS[self.cell][1]
        return ["P", "b", "W", "h0"] + ([extra] if extra else [])

    def output_names(self):
        return {"simple_rnn": ["H", "S"], "lstm": ["H", "C", "S", "AC"],
                "gru": ["H", "S", "HN"]}[self.cell]

    def make_node(self, *values):
        tensors = self._tensors(values)
        return Apply(self, tensors, self._output_types(dict(zip(self.input_names(), tensors))))

    def pullback(self, inputs, outputs, cotangents):
        n_states = 2 if self.cell == "lstm" else 1
        for g in cotangents[n_states:]:
            if not isinstance(g.type, DisconnectedType):
                raise NotImplementedError(f"{self}: no gradient through its gate outputs")
        by = dict(zip(self.input_names(), inputs))
        by.update(zip(self.output_names(), outputs))
        by["dH"] = _zeros_if_disconnected(cotangents[0], outputs[0])
        with_dC = self.cell == "lstm" and not isinstance(cotangents[1].type, DisconnectedType)
        if with_dC:
            by["dC"] = cotangents[1]
        grad = RecurrentSequenceGrad(self.cell, self.activation, self.recurrent_activation,
                                     with_dC)
        return grad(*[by[n] for n in grad.input_names()], return_list=True)

    def perform(self, node, inputs, output_storage):
        dtype = node.outputs[0].dtype
        values = [np.asarray(i, dtype=dtype) for i in inputs]
        _check_shapes(self, values)
        outs = _np_forward(self.cell, self.activation, self.recurrent_activation, *values)
        for storage, value in zip(output_storage, outs):
            storage[0] = np.asarray(value, dtype=dtype)

    def _kernel(self):
        if self.cell == "simple_rnn":
            return "nbrec::rnn_forward(act_, Tn, Bn, U, {P}, {b}, {W}, {h0}, {H}, {S})", "1", "1"
        if self.cell == "lstm":
            return ("nbrec::lstm_forward(act_, ract_, Tn, Bn, U, {P}, {b}, {W}, {h0}, {c0}, "
                    "{H}, {C}, {S}, {AC}, {w})", "G", "1")
        return ("nbrec::gru_forward(act_, ract_, Tn, Bn, U, {P}, {b}, {W}, {h0}, {b_hn}, {H}, "
                "{S}, {HN}, {w}, {w} + Bn * G, {w} + Bn * G + G)", "Bn * G + 2 * G", "1")


class RecurrentSequenceGrad(_RecurrentCOp):
    """Backpropagation through a :class:`RecurrentSequence`.

    Inputs: ``W, h0`` (and ``c0``), the forward op's outputs, then the gradient ``dH`` of ``H``
    (and ``dC`` of ``C`` when ``with_dC``). Outputs the gradients of the forward op's inputs:
    ``dP, db, dW, dh0`` and ``dc0`` (lstm) or ``db_hn`` (gru).
    """

    __props__ = (*_RecurrentCOp.__props__, "with_dC")

    def __init__(self, cell: str, activation: str = "tanh", recurrent_activation: str = "sigmoid",
                 with_dC: bool = False):
        super().__init__(cell, activation, recurrent_activation)
        self.with_dC = bool(with_dC) and cell == "lstm"

    def input_names(self):
        return {"simple_rnn": ["W", "h0", "H", "S", "dH"],
                "lstm": ["W", "h0", "c0", "H", "C", "S", "AC", "dH"] + ["dC"] * self.with_dC,
                "gru": ["W", "h0", "H", "S", "HN", "dH"]}[self.cell]

    def output_names(self):
        extra = CELLS[self.cell][1]
        return ["dP", "db", "dW", "dh0"] + (["d" + extra] if extra else [])

    def make_node(self, *values):
        tensors = self._tensors(values)
        return Apply(self, tensors, self._output_types(dict(zip(self.input_names(), tensors))))

    def perform(self, node, inputs, output_storage):
        dtype = node.outputs[0].dtype
        values = [np.asarray(i, dtype=dtype) for i in inputs]
        _check_shapes(self, values)
        by = dict(zip(self.input_names(), values))
        outs = _np_backward(self.cell, self.activation, self.recurrent_activation, by)
        for storage, value in zip(output_storage, outs):
            storage[0] = np.asarray(value, dtype=dtype)

    def _kernel(self):
        if self.cell == "simple_rnn":
            return ("nbrec::rnn_backward(act_, Tn, Bn, U, {W}, {h0}, {H}, {S}, {dH}, {dP}, {db}, "
                    "{dW}, {dh0}, {w}, {acc})", "Bn * U", "U")
        if self.cell == "lstm":
            dC = "{dC}" if self.with_dC else "{null}"
            return ("nbrec::lstm_backward(act_, ract_, Tn, Bn, U, {W}, {h0}, {c0}, {H}, {C}, "
                    "{S}, {AC}, {dH}, " + dC + ", {dP}, {db}, {dW}, {dh0}, {dc0}, "
                    "{w}, {w} + Bn * U, {w} + 2 * Bn * U, {acc})", "2 * Bn * U + 5 * U", "G")
        return ("nbrec::gru_backward(act_, ract_, Tn, Bn, U, {W}, {h0}, {H}, {S}, {HN}, {dH}, "
                "{dP}, {db}, {dW}, {dh0}, {db_hn}, {w}, {w} + Bn * U, {w} + Bn * U + Tn * Bn * G, "
                "{acc})", "Bn * U + Tn * Bn * G + 3 * U", "G + U")


def sequence(cell: str, P, b, W, h0, extra=None, activation: str = "tanh",
             recurrent_activation: str = "sigmoid") -> list:
    """All of the forward op's outputs for a sequence; ``[0]`` is ``H (T, B, U)``."""
    op = RecurrentSequence(cell, activation, recurrent_activation)
    return op(P, b, W, h0, *([] if extra is None else [extra]), return_list=True)


# -- numpy: the same algorithm, for PyTensor's Python modes ----------------------------------------
def _np_act(name: str, x: np.ndarray) -> np.ndarray:
    if name == "tanh":
        return np.tanh(x)
    if name == "sigmoid":
        with np.errstate(over="ignore"):
            return 1.0 / (1.0 + np.exp(-x))
    if name == "relu":
        return np.where(0 > x, 0, x).astype(x.dtype)
    if name == "hard_sigmoid":
        return np.clip(x / x.dtype.type(6) + x.dtype.type(0.5), 0, 1)
    return x.copy()


def _np_keep(name: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """What the gate buffer keeps: the pre-activation for relu and hard_sigmoid."""
    return x if name in _KEEPS_INPUT else y


def _np_value(name: str, s: np.ndarray) -> np.ndarray:
    return _np_act(name, s) if name in _KEEPS_INPUT else s


def _np_act_grad(name: str, s: np.ndarray, g: np.ndarray) -> np.ndarray:
    if name == "tanh":
        return g * (1 - s * s)
    if name == "sigmoid":
        return g * s * (1 - s)
    if name == "relu":
        return (s >= 0) * g
    if name == "hard_sigmoid":
        v = s / s.dtype.type(6) + s.dtype.type(0.5)
        return ((v >= 0) & (v <= 1)) * g / s.dtype.type(6)
    return g


def _np_forward(cell, act, ract, P, b, W, h0, extra=None):
    T, B, G = P.shape
    U = W.shape[0]
    H = np.empty((T, B, U), P.dtype)
    S = np.empty_like(P)
    h = h0
    if cell == "simple_rnn":
        for t in range(T):
            a = (P[t] + b) + h @ W
            H[t] = h = _np_act(act, a)
            S[t] = _np_keep(act, a, h)
        return H, S
    if cell == "lstm":
        C, AC = np.empty_like(H), np.empty_like(H)
        c = extra
        for t in range(T):
            a = (P[t] + b) + h @ W
            y = np.concatenate([_np_act(ract, a[:, :2 * U]), _np_act(act, a[:, 2 * U:3 * U]),
                                _np_act(ract, a[:, 3 * U:])], axis=1)
            i, f, g, o = np.split(y, 4, axis=1)
            C[t] = c = f * c + i * g
            AC[t] = _np_act(act, c)
            H[t] = h = o * AC[t]
            S[t] = np.concatenate([_np_keep(ract, a[:, :2 * U], y[:, :2 * U]),
                                   _np_keep(act, a[:, 2 * U:3 * U], g),
                                   _np_keep(ract, a[:, 3 * U:], o)], axis=1)
        return H, C, S, AC
    HN = np.empty_like(H)
    for t in range(T):
        p = P[t] + b
        q = h @ W
        pre_rz = p[:, :2 * U] + q[:, :2 * U]
        rz = _np_act(ract, pre_rz)
        r, z = rz[:, :U], rz[:, U:]
        HN[t] = q[:, 2 * U:] + extra
        pre_n = p[:, 2 * U:] + r * HN[t]
        n = _np_act(act, pre_n)
        H[t] = h = (1 - z) * n + z * h
        S[t] = np.concatenate([_np_keep(ract, pre_rz, rz), _np_keep(act, pre_n, n)], axis=1)
    return H, S, HN


def _np_backward(cell, act, ract, by: dict) -> list:
    W, h0, H, S, dH = by["W"], by["h0"], by["H"], by["S"], by["dH"]
    U = W.shape[0]
    T = H.shape[0]
    Hprev = np.concatenate([h0[None], H[:-1]]) if T else H
    dP = np.empty_like(S)
    dh = dH[T - 1].copy() if T else np.zeros_like(h0)
    if cell == "simple_rnn":
        for t in reversed(range(T)):
            dP[t] = _np_act_grad(act, S[t], dh)
            dh = dP[t] @ W.T + (dH[t - 1] if t else 0)
        return [dP, dP.sum(axis=(0, 1)), np.einsum("tbu,tbg->ug", Hprev, dP), dh]
    if cell == "lstm":
        C, AC, c0 = by["C"], by["AC"], by["c0"]
        dC = by.get("dC", np.zeros_like(C))
        Cprev = np.concatenate([c0[None], C[:-1]]) if T else C
        dc = np.zeros_like(c0)
        for t in reversed(range(T)):
            s = S[t]
            i, f = _np_value(ract, s[:, :U]), _np_value(ract, s[:, U:2 * U])
            g, o = _np_value(act, s[:, 2 * U:3 * U]), _np_value(ract, s[:, 3 * U:])
            d_ac = _np_act_grad(act, C[t] if act in _KEEPS_INPUT else AC[t], dh * o) + dC[t]
            dck = dc + d_ac
            d = np.concatenate([dck * g, dck * Cprev[t], dck * i, dh * AC[t]], axis=1)
            dc = dck * f
            dP[t] = np.concatenate([_np_act_grad(ract, s[:, :2 * U], d[:, :2 * U]),
                                    _np_act_grad(act, s[:, 2 * U:3 * U], d[:, 2 * U:3 * U]),
                                    _np_act_grad(ract, s[:, 3 * U:], d[:, 3 * U:])], axis=1)
            dh = dP[t] @ W.T + (dH[t - 1] if t else 0)
        return [dP, dP.sum(axis=(0, 1)), np.einsum("tbu,tbg->ug", Hprev, dP), dh, dc]
    HN = by["HN"]
    dQ = np.empty_like(S)
    for t in reversed(range(T)):
        s = S[t]
        r, z = _np_value(ract, s[:, :U]), _np_value(ract, s[:, U:2 * U])
        n = _np_value(act, s[:, 2 * U:])
        dpre_n = _np_act_grad(act, s[:, 2 * U:], dh * (1 - z))
        dz = dh * (Hprev[t] - n)
        dr = dpre_n * HN[t]
        dP[t] = np.concatenate([_np_act_grad(ract, s[:, :2 * U], np.concatenate([dr, dz], 1)),
                                dpre_n], axis=1)
        dQ[t] = np.concatenate([dP[t, :, :2 * U], dpre_n * r], axis=1)
        dh = dh * z + dQ[t] @ W.T + (dH[t - 1] if t else 0)
    return [dP, dP.sum(axis=(0, 1)), np.einsum("tbu,tbg->ug", Hprev, dQ), dh,
            dQ[:, :, 2 * U:].sum(axis=(0, 1))]
