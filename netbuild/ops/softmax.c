#section support_code
/* Softmax and softmax cross-entropy over the last axis, and their gradients
   (netbuild/ops/softmax.py). Loaded after netbuild.c. */
#include <cmath>

namespace nbsoftmax {

// The maximum and log(sum(exp(x - max))) of one row: logsumexp(x) = max + log(sum).
template <typename T>
static inline void row_lse(const T* __restrict__ x, npy_intp k, T* mx, double* lse) {
    T m = -INFINITY;
    for (npy_intp j = 0; j < k; ++j) m = x[j] > m ? x[j] : m;
    double s = 0.0;
    for (npy_intp j = 0; j < k; ++j) s += std::exp((double)(x[j] - m));
    *mx = m;
    *lse = (double)m + std::log(s);
}

// Rows per thread at least: waking a thread costs more than a few thousand exponentials.
static const npy_intp SOFTMAX_PER_PART = 16384;
static inline npy_intp rows_per_part(npy_intp k) {
    return k > 0 ? (SOFTMAX_PER_PART + k - 1) / k : 1;
}

/* The row maximum over 8 lanes (j % 8), folded in a fixed order: vectorized (the sums:
   netbuild_lane_sum). */
static const int LANES = 8;

template <typename T>
static inline T row_max(const T* __restrict__ x, npy_intp k) {
    T lane[LANES];
    for (int l = 0; l < LANES; ++l) lane[l] = -INFINITY;
    npy_intp j = 0;
    for (; j + LANES <= k; j += LANES)
        for (int l = 0; l < LANES; ++l) lane[l] = x[j + l] > lane[l] ? x[j + l] : lane[l];
    T m = -INFINITY;
    for (int l = 0; l < LANES; ++l) m = lane[l] > m ? lane[l] : m;
    for (; j < k; ++j) m = x[j] > m ? x[j] : m;
    return m;
}

/* p = exp(x - max) / sum, the exponentials vectorized (netbuild_exp), their sum in double. */
template <typename T>
__attribute__((noinline)) static void softmax_rows(const T* __restrict__ X, T* __restrict__ P,
                                                   npy_intp lo, npy_intp hi, npy_intp k) {
    for (npy_intp r = lo; r < hi; ++r) {
        const T* __restrict__ x = X + r * k;
        T* __restrict__ p = P + r * k;
        const T m = row_max(x, k);
        for (npy_intp j = 0; j < k; ++j) p[j] = netbuild_exp(x[j] - m);
        const T inv = (T)(1.0 / netbuild_lane_sum(k, [&](npy_intp j) { return (double)p[j]; }));
        for (npy_intp j = 0; j < k; ++j) p[j] *= inv;
    }
}

// Rows in parallel, each alone: the bits do not depend on the threads.
template <typename T>
static void softmax(const T* __restrict__ X, T* __restrict__ P, npy_intp rows, npy_intp k) {
    netbuild_for_parts(rows, rows_per_part(k),
                       [&](npy_intp lo, npy_intp hi) { softmax_rows(X, P, lo, hi, k); });
}

// dx = p * (dp - sum(dp * p)), row by row.
template <typename T>
__attribute__((noinline)) static void softmax_grad_rows(const T* __restrict__ DP,
                                                        const T* __restrict__ P,
                                                        T* __restrict__ DX, npy_intp lo,
                                                        npy_intp hi, npy_intp k) {
    for (npy_intp r = lo; r < hi; ++r) {
        const T* dp = DP + r * k;
        const T* p = P + r * k;
        T* dx = DX + r * k;
        const double s = netbuild_lane_sum(k, [&](npy_intp j) { return (double)dp[j] * p[j]; });
        const T st = (T)s;
        for (npy_intp j = 0; j < k; ++j) dx[j] = p[j] * (dp[j] - st);
    }
}

template <typename T>
static void softmax_grad(const T* __restrict__ DP, const T* __restrict__ P, T* __restrict__ DX,
                         npy_intp rows, npy_intp k) {
    netbuild_for_parts(rows, rows_per_part(k),
                       [&](npy_intp lo, npy_intp hi) { softmax_grad_rows(DP, P, DX, lo, hi, k); });
}

// Class ids: loss = lse - (1 - s) x[y] - s/k sum(x). Returns 0, or 1 + the first row whose id
// is outside [0, k).
template <typename T, typename I>
__attribute__((noinline)) static npy_intp xent_ids(const T* __restrict__ X, const I* __restrict__ Y,
                                                   T* __restrict__ L, npy_intp rows, npy_intp k,
                                                   double smooth) {
    for (npy_intp r = 0; r < rows; ++r) {
        const T* x = X + r * k;
        const npy_intp y = (npy_intp)Y[r];
        if (y < 0 || y >= k) return r + 1;
        T m;
        double lse, sx = 0.0;
        row_lse(x, k, &m, &lse);
        if (smooth != 0.0)
            for (npy_intp j = 0; j < k; ++j) sx += x[j];
        L[r] = (T)(lse - (1.0 - smooth) * x[y] - smooth / k * sx);
    }
    return 0;
}

// Target rows: with t' = (1 - s) t + s/k, loss = sum(t') lse - sum(t' x).
template <typename T>
__attribute__((noinline)) static void xent_rows(const T* __restrict__ X, const T* __restrict__ Tg,
                                                T* __restrict__ L, npy_intp rows, npy_intp k,
                                                double smooth) {
    for (npy_intp r = 0; r < rows; ++r) {
        const T* x = X + r * k;
        const T* t = Tg + r * k;
        T m;
        double lse, st = 0.0, stx = 0.0, sx = 0.0;
        row_lse(x, k, &m, &lse);
        for (npy_intp j = 0; j < k; ++j) {
            st += t[j];
            stx += (double)t[j] * x[j];
            sx += x[j];
        }
        const double a = 1.0 - smooth;
        L[r] = (T)((a * st + smooth) * lse - a * stx - smooth / k * sx);
    }
}

// Class ids: dx = dl (p - (1 - s) [j == y] - s/k). ``gstep`` is 0 when dl is one value for all.
template <typename T, typename I>
__attribute__((noinline)) static npy_intp xent_ids_grad(
        const T* __restrict__ DL, npy_intp gstep, const T* __restrict__ P, const I* __restrict__ Y,
        T* __restrict__ DX, npy_intp rows, npy_intp k, double smooth) {
    const T a = (T)(1.0 - smooth), b = (T)(smooth / k);
    for (npy_intp r = 0; r < rows; ++r) {
        const npy_intp y = (npy_intp)Y[r];
        if (y < 0 || y >= k) return r + 1;
        const T g = DL[r * gstep];
        const T* p = P + r * k;
        T* dx = DX + r * k;
        for (npy_intp j = 0; j < k; ++j) dx[j] = g * (p[j] - b);
        dx[y] -= g * a;
    }
    return 0;
}

// Target rows: dx = dl (p sum(t') - t').
template <typename T>
__attribute__((noinline)) static void xent_rows_grad(
        const T* __restrict__ DL, npy_intp gstep, const T* __restrict__ P,
        const T* __restrict__ Tg, T* __restrict__ DX, npy_intp rows, npy_intp k, double smooth) {
    const T a = (T)(1.0 - smooth), b = (T)(smooth / k);
    for (npy_intp r = 0; r < rows; ++r) {
        const T g = DL[r * gstep];
        const T* p = P + r * k;
        const T* t = Tg + r * k;
        T* dx = DX + r * k;
        double st = 0.0;
        for (npy_intp j = 0; j < k; ++j) st += t[j];
        const T sum_t = (T)((1.0 - smooth) * st + smooth);
        for (npy_intp j = 0; j < k; ++j) dx[j] = g * (p[j] * sum_t - a * t[j] - b);
    }
}

}  // namespace nbsoftmax
