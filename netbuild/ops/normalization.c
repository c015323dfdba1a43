#section support_code
/* layer_norm over the last axis, and its gradient (netbuild/ops/normalization.py). Loaded after
   netbuild.c. */
#include <cmath>

namespace nbnorm {

/* Rows per thread at least: waking a thread costs more than a few thousand values. */
static const npy_intp VALUES_PER_PART = 16384;

/* y = (x - mean) rstd gamma + beta, row by row; mean and rstd = 1 / sqrt(var + eps) of each row
   (the biased variance, in double) kept for the gradient. */
template <typename T>
__attribute__((noinline)) static void forward_rows(const T* __restrict__ X,
                                                   const T* __restrict__ G,
                                                   const T* __restrict__ B, T* __restrict__ Y,
                                                   T* __restrict__ M, T* __restrict__ R,
                                                   npy_intp lo, npy_intp hi, npy_intp k,
                                                   double eps) {
    for (npy_intp r = lo; r < hi; ++r) {
        const T* x = X + r * k;
        T* y = Y + r * k;
        const double mean = netbuild_lane_sum(k, [&](npy_intp j) { return (double)x[j]; }) / (double)k;
        const double var = netbuild_lane_sum(k, [&](npy_intp j) {
            const double d = (double)x[j] - mean;
            return d * d;
        }) / (double)k;
        const T m = (T)mean, rs = (T)(1.0 / std::sqrt(var + eps));
        M[r] = m;
        R[r] = rs;
        for (npy_intp j = 0; j < k; ++j) y[j] = ((x[j] - m) * rs) * G[j] + B[j];
    }
}

template <typename T>
static void forward(const T* X, const T* G, const T* B, T* Y, T* M, T* R, npy_intp rows,
                    npy_intp k, double eps) {
    netbuild_for_parts(rows, k > 0 ? (VALUES_PER_PART + k - 1) / k : rows,
                       [&](npy_intp lo, npy_intp hi) { forward_rows(X, G, B, Y, M, R, lo, hi, k, eps); });
}

/* One slice of rows of the gradient: dx of each row,
       xh = (x - mean) rstd,  g = dy gamma,  dx = rstd (g - mean(g) - xh mean(g xh)),
   and the slice's sums of dy xh and dy per column (dgamma, dbeta) in double, in row order. */
template <typename T>
__attribute__((noinline)) static void grad_rows(const T* __restrict__ X, const T* __restrict__ G,
                                                const T* __restrict__ M, const T* __restrict__ R,
                                                const T* __restrict__ DY, T* __restrict__ DX,
                                                T* __restrict__ work, double* __restrict__ dg,
                                                double* __restrict__ db, npy_intp lo, npy_intp hi,
                                                npy_intp k) {
    for (npy_intp j = 0; j < k; ++j) dg[j] = db[j] = 0.0;
    T* __restrict__ xh = work;      // k values
    T* __restrict__ gg = work + k;  // k values
    for (npy_intp r = lo; r < hi; ++r) {
        const T* x = X + r * k;
        const T* dy = DY + r * k;
        T* dx = DX + r * k;
        const T m = M[r], rs = R[r];
        for (npy_intp j = 0; j < k; ++j) {
            xh[j] = (x[j] - m) * rs;
            gg[j] = dy[j] * G[j];
            dg[j] += (double)dy[j] * (double)xh[j];
            db[j] += (double)dy[j];
        }
        const double sg = netbuild_lane_sum(k, [&](npy_intp j) { return (double)gg[j]; });
        const double sgx = netbuild_lane_sum(k, [&](npy_intp j) { return (double)gg[j] * (double)xh[j]; });
        const T a = (T)(sg / (double)k), b = (T)(sgx / (double)k);
        for (npy_intp t = 0; t < k; ++t) dx[t] = rs * ((gg[t] - a) - xh[t] * b);
    }
}

/* The gradient: rows cut into netbuild_slices(rows) fixed slices, on threads; dgamma and dbeta
   the slices' sums added in slice order (the same bits on any number of threads). work: per
   slice 2k values of T; acc: per slice 2k doubles. */
template <typename T>
static void grad(const T* X, const T* G, const T* M, const T* R, const T* DY, T* DX, T* DG, T* DB,
                 npy_intp rows, npy_intp k, T* work, double* acc) {
    const npy_intp slices = netbuild_slices(rows);
    const npy_intp per_slice = slices ? (rows / slices + 1) * k : 1;
    netbuild_for_parts(slices, (VALUES_PER_PART + per_slice - 1) / per_slice,
                       [&](npy_intp s0, npy_intp s1) {
        for (npy_intp s = s0; s < s1; ++s)
            grad_rows(X, G, M, R, DY, DX, work + s * 2 * k, acc + s * 2 * k, acc + s * 2 * k + k,
                      netbuild_slice_start(rows, s), netbuild_slice_start(rows, s + 1), k);
    });
    for (npy_intp j = 0; j < k; ++j) {
        double g = 0.0, b = 0.0;
        for (npy_intp s = 0; s < slices; ++s) {
            g += acc[s * 2 * k + j];
            b += acc[s * 2 * k + k + j];
        }
        DG[j] = (T)g;
        DB[j] = (T)b;
    }
}

}  // namespace nbnorm
