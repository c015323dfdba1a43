#section support_code
/* Convolution as im2col + one BLAS gemm per image, and its gradients (netbuild/ops/conv.py).
   Loaded after netbuild.c, blas.c and window.c (nbwin::).

   Row-major matrices are column-major transposes to Fortran BLAS: y[n] (F, P) = W (F, CK)
   cols (CK, P) is, column-major, y^T (P, F) = cols^T (P, CK) W^T (CK, F):
   gemm("N", "N", P, F, CK, ...). */
#include <cmath>

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
// relu, applied to each image's output while it is in cache. Images in parallel (no more threads
// than images), each computed alone by a one-thread product whatever the threads (OpenBLAS's
// own threads would change the bits): the result does not depend on the threads.
template <typename T>
static void forward(npy_intp N, const T* x, const T* w, const T* b, int act, T* y,
                    const Scratch<T>& sc, const Geom& g) {
    netbuild_serial_blas serial(sc.nt);
    const npy_intp CK = g.C * g.KH * g.KW, P = g.OH * g.OW, F = g.F;
    #pragma omp parallel for num_threads(netbuild_parts(N, sc.nt, 1)) schedule(static)
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
    #pragma omp parallel for num_threads(netbuild_parts(N, sc.nt, 1)) schedule(static)
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
    #pragma omp parallel for num_threads(netbuild_parts(S, sc.nt, 1)) schedule(static)
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
    #pragma omp parallel for num_threads(netbuild_parts(FCK, sc.nt, 16384)) schedule(static)
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
