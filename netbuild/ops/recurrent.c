#section support_code
/* The recurrent layers' loop over timesteps (netbuild/ops/recurrent.py), forward and backward.

   The rows of a batch are independent: the batch is cut into one part of consecutive rows per
   thread (netbuild_for_parts, at least ROWS_PER_PART rows each) and each thread runs the whole
   time loop on its rows, one BLAS gemm per step on its rows' states, without waiting for the
   others. The weight gradient (one gemm over all T*B rows) and the bias gradients (column sums
   in double, row by row in order) come after the loop, on every thread. Each step's elementwise
   maths is one fused loop per row, vectorized: templates on the two activations for the default
   pair (tanh, sigmoid) and the simple RNN's, a run-time switch for the other pairs.

   Row-major (B, N) arrays are column-major (N, B) matrices to Fortran BLAS, so every product is
   written transposed: gates[t] (B, G*U) += h (B, U) W (U, G*U) is gemm("N", "N", GU, B, U, W, h). */

namespace nbrec {

enum { LINEAR = 0, TANH = 1, SIGMOID = 2, RELU = 3, HARD_SIGMOID = 4, ANY = -1 };
static const npy_intp ROWS_PER_PART = 16;
static inline bool keeps_input(int code) { return code == RELU || code == HARD_SIGMOID; }

/* float: branch-free exp and tanh (Cephes' expf and tanhf, within 2 ulp) that g++ vectorizes
   (with -fno-trapping-math; no floorf); double: libm's. NaN stays NaN. */
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

/* f(x) for activation code A (a compile-time code, or ANY: the run-time `code`) */
template <int A, typename T> static inline T f(int code, T x) {
    const int c = A == ANY ? code : A;
    switch (c) {
    case TANH: return tanh_(x);
    case SIGMOID: return (T)1 / ((T)1 + exp_(-x));
    case RELU: return (T)0 > x ? (T)0 : x;  // PyTensor's maximum(x, 0): NaN stays NaN
    case HARD_SIGMOID: {                    // clip(x / 6 + 0.5, 0, 1)
        T v = x / (T)6 + (T)0.5;
        return v < (T)0 ? (T)0 : (v > (T)1 ? (T)1 : v);
    }
    default: return x;
    }
}

/* What the gate buffer keeps of a gate: f(x), or x for relu and hard_sigmoid (whose derivative at
   a kink the value alone cannot tell). */
template <int A, typename T> static inline T keep(int code, T x, T y) {
    return keeps_input(A == ANY ? code : A) ? x : y;
}

/* The value f(x) from what the gate buffer keeps. */
template <int A, typename T> static inline T value(int code, T s) {
    return keeps_input(A == ANY ? code : A) ? f<A>(code, s) : s;
}

/* g f'(x), from what the gate buffer keeps (f(x), or x for relu and hard_sigmoid): the
   derivatives of netbuild.activations, boundaries included (relu's is 1 at 0, as PyTensor's
   maximum; hard_sigmoid's 1/6 on the closed interval, as clip). */
template <int A, typename T> static inline T df(int code, T s, T g) {
    const int c = A == ANY ? code : A;
    switch (c) {
    case TANH: return g * ((T)1 - s * s);
    case SIGMOID: return g * s * ((T)1 - s);
    case RELU: return (s >= (T)0 ? (T)1 : (T)0) * g;
    case HARD_SIGMOID: {
        T v = s / (T)6 + (T)0.5;
        return ((v >= (T)0 && v <= (T)1) ? (T)1 : (T)0) * g / (T)6;
    }
    default: return g;
    }
}

/* rows of y = rows of x + bias (rows of n values, y and x with row strides ldy and ldx) */
template <typename T>
static inline void add_bias(T* __restrict y, const T* __restrict x, const T* __restrict bias,
                            npy_intp rows, npy_intp n) {
    for (npy_intp r = 0; r < rows; ++r)
        for (npy_intp k = 0; k < n; ++k) y[r * n + k] = x[r * n + k] + bias[k];
}

/* out[k] = sum over rows r of x[r * ld + off + k], k < n, in double and in row order: the same
   bits whatever the number of threads (each thread sums its own columns). */
template <typename T>
__attribute__((noinline)) static void column_sums(const T* __restrict x, npy_intp rows, npy_intp ld,
                                                  npy_intp off, npy_intp n, T* __restrict out,
                                                  double* __restrict acc) {
    netbuild_for_parts(n, 64, [&](npy_intp k0, npy_intp k1) {
        double* __restrict a = acc + k0;
        for (npy_intp k = 0; k < k1 - k0; ++k) a[k] = 0.0;
        for (npy_intp r = 0; r < rows; ++r) {
            const T* __restrict row = x + r * ld + off + k0;
            for (npy_intp k = 0; k < k1 - k0; ++k) a[k] += row[k];
        }
        for (npy_intp k = k0; k < k1; ++k) out[k] = (T)acc[k];
    });
}

/* dW (U, G) = sum_t h[t-1]^T dA[t]: one gemm over steps 1..T-1 (h = H[0..T-2]), one for step 0
   (h0); OpenBLAS's own threads on the large one. */
template <typename T>
static void weight_grad(int Tn, int Bn, int U, int G, const T* dA, const T* H, const T* h0, T* dW) {
    netbuild_gemm('N', 'T', G, U, (Tn - 1) * Bn, (T)1, dA + (size_t)Bn * G, G, H, U, (T)0, dW, G);
    netbuild_gemm('N', 'T', G, U, Tn > 0 ? Bn : 0, (T)1, dA, G, h0, U, Tn > 1 ? (T)1 : (T)0, dW, G);
}

/* The state's gradient carried to step t - 1, for rows [r0, r0 + nr): dh = dH[t-1] + dA[t] W^T
   (+ what dh already holds when keep); at t = 0 into dh0. dh and dh0 are (Bn, U), dA[t] (Bn, G). */
template <typename T>
static inline void carry(int t, int Bn, int U, int G, npy_intp r0, npy_intp nr, const T* W,
                         const T* dAt, const T* dH, bool keep, T* dh, T* dh0) {
    const size_t step = (size_t)Bn * U, off = (size_t)r0 * U, n = (size_t)nr * U;
    T* __restrict rows = dh + off;
    if (t && keep) {
        const T* __restrict from = dH + (t - 1) * step + off;
        for (size_t k = 0; k < n; ++k) rows[k] += from[k];
    } else if (t) {
        memcpy(rows, dH + (t - 1) * step + off, sizeof(T) * n);
    } else if (keep) {
        memcpy(dh0 + off, rows, sizeof(T) * n);
    }
    netbuild_gemm('T', 'N', U, (int)nr, G, (T)1, W, G, dAt + (size_t)r0 * G, G,
                  (t || keep) ? (T)1 : (T)0, (t ? dh : dh0) + off, U);
}

/* The first gradient of the backward loop, dh = dH[T-1] (or dh0 = 0 with no steps), for rows. */
template <typename T>
static inline void start_backward(int Tn, int Bn, int U, npy_intp r0, npy_intp nr, const T* dH,
                                  T* dh, T* dh0) {
    const size_t off = (size_t)r0 * U, n = (size_t)nr * U;
    if (Tn > 0) memcpy(dh + off, dH + (size_t)(Tn - 1) * Bn * U + off, sizeof(T) * n);
    else memset(dh0 + off, 0, sizeof(T) * n);
}

/* -- simple_rnn: h = act(p + b + h W) ---------------------------------------------------------- */
template <int A, typename T>
__attribute__((noinline)) static void rnn_cells(int a, npy_intp n, T* __restrict s, T* __restrict h) {
    for (npy_intp k = 0; k < n; ++k) {
        T x = s[k], y = f<A>(a, x);
        h[k] = y;
        s[k] = keep<A>(a, x, y);
    }
}

template <int A, typename T>
__attribute__((noinline)) static void rnn_cells_grad(int a, npy_intp n, const T* __restrict s,
                                                     const T* __restrict dh, T* __restrict d) {
    for (npy_intp k = 0; k < n; ++k) d[k] = df<A>(a, s[k], dh[k]);
}

template <int A, typename T>
static void rnn_forward_rows(int a, int Tn, int Bn, int U, npy_intp r0, npy_intp nr, const T* P,
                             const T* bias, const T* W, const T* h0, T* H, T* S) {
    const size_t step = (size_t)Bn * U, off = (size_t)r0 * U;
    for (int t = 0; t < Tn; ++t) {
        T* St = S + t * step + off;
        add_bias(St, P + t * step + off, bias, nr, U);
        const T* hp = (t ? H + (t - 1) * step : h0) + off;
        netbuild_gemm('N', 'N', U, (int)nr, U, (T)1, W, U, hp, U, (T)1, St, U);
        rnn_cells<A>(a, nr * U, St, H + t * step + off);
    }
}

template <typename T>
static void rnn_forward(int a, int Tn, int Bn, int U, const T* P, const T* bias, const T* W,
                        const T* h0, T* H, T* S) {
    netbuild_serial_blas serial(netbuild_threads());
    netbuild_for_parts(Bn, ROWS_PER_PART, [&](npy_intp r0, npy_intp r1) {
        switch (a) {
        case TANH: rnn_forward_rows<TANH>(a, Tn, Bn, U, r0, r1 - r0, P, bias, W, h0, H, S); break;
        case RELU: rnn_forward_rows<RELU>(a, Tn, Bn, U, r0, r1 - r0, P, bias, W, h0, H, S); break;
        default: rnn_forward_rows<ANY>(a, Tn, Bn, U, r0, r1 - r0, P, bias, W, h0, H, S);
        }
    });
}

template <int A, typename T>
static void rnn_backward_rows(int a, int Tn, int Bn, int U, npy_intp r0, npy_intp nr, const T* W,
                              const T* S, const T* dH, T* dP, T* dh0, T* dh) {
    const size_t step = (size_t)Bn * U, off = (size_t)r0 * U;
    start_backward(Tn, Bn, U, r0, nr, dH, dh, dh0);
    for (int t = Tn - 1; t >= 0; --t) {
        T* dPt = dP + t * step;
        rnn_cells_grad<A>(a, nr * U, S + t * step + off, dh + off, dPt + off);
        carry(t, Bn, U, U, r0, nr, W, dPt, dH, false, dh, dh0);
    }
}

template <typename T>
static void rnn_backward(int a, int Tn, int Bn, int U, const T* W, const T* h0, const T* H,
                         const T* S, const T* dH, T* dP, T* db, T* dW, T* dh0, T* dh, double* acc) {
    {
        netbuild_serial_blas serial(netbuild_threads());
        netbuild_for_parts(Bn, ROWS_PER_PART, [&](npy_intp r0, npy_intp r1) {
            switch (a) {
            case TANH: rnn_backward_rows<TANH>(a, Tn, Bn, U, r0, r1 - r0, W, S, dH, dP, dh0, dh); break;
            case RELU: rnn_backward_rows<RELU>(a, Tn, Bn, U, r0, r1 - r0, W, S, dH, dP, dh0, dh); break;
            default: rnn_backward_rows<ANY>(a, Tn, Bn, U, r0, r1 - r0, W, S, dH, dP, dh0, dh);
            }
        });
    }
    column_sums(dP, (npy_intp)Tn * Bn, U, 0, U, db, acc);
    weight_grad(Tn, Bn, U, U, dP, H, h0, dW);
}

/* -- lstm: a = p + b + h W; i, f, g, o = ract, ract, act, ract; c = f c + i g; h = o act(c) ---- */
template <int A, int RA, typename T>
__attribute__((noinline)) static void lstm_cells(int a, int ra, npy_intp rows, int U,
                                                 T* __restrict S, const T* __restrict cp,
                                                 T* __restrict C, T* __restrict AC,
                                                 T* __restrict H) {
    for (npy_intp r = 0; r < rows; ++r) {
        T* __restrict s = S + r * 4 * U;
        const size_t o = (size_t)r * U;
        for (int k = 0; k < U; ++k) {
            T xi = s[k], xf = s[U + k], xg = s[2 * U + k], xo = s[3 * U + k];
            T vi = f<RA>(ra, xi), vf = f<RA>(ra, xf), vg = f<A>(a, xg), vo = f<RA>(ra, xo);
            T c = vf * cp[o + k] + vi * vg;
            T ac = f<A>(a, c);
            C[o + k] = c;
            AC[o + k] = ac;
            H[o + k] = vo * ac;
            s[k] = keep<RA>(ra, xi, vi);
            s[U + k] = keep<RA>(ra, xf, vf);
            s[2 * U + k] = keep<A>(a, xg, vg);
            s[3 * U + k] = keep<RA>(ra, xo, vo);
        }
    }
}

/* One backward step for rows: the gates' gradients d (rows, 4U) and the carried dc, from dh. */
template <int A, int RA, typename T>
__attribute__((noinline)) static void lstm_cells_grad(
        int a, int ra, npy_intp rows, int U, const T* __restrict S, const T* __restrict C,
        const T* __restrict AC, const T* __restrict cp, const T* __restrict dC,
        const T* __restrict dh, T* __restrict dc, T* __restrict D) {
    for (npy_intp r = 0; r < rows; ++r) {
        const T* __restrict s = S + r * 4 * U;
        T* __restrict d = D + r * 4 * U;
        const size_t o = (size_t)r * U;
        for (int k = 0; k < U; ++k) {
            T si = s[k], sf = s[U + k], sg = s[2 * U + k], so = s[3 * U + k];
            T vi = value<RA>(ra, si), vf = value<RA>(ra, sf), vg = value<A>(a, sg);
            T vo = value<RA>(ra, so);
            T ac = AC[o + k], dhk = dh[o + k];
            // h = o act(c): the cell state's gradient through act
            T d_ac = df<A>(a, keeps_input(A == ANY ? a : A) ? C[o + k] : ac, dhk * vo);
            if (dC) d_ac += dC[o + k];
            T dck = dc[o + k] + d_ac;
            d[k] = df<RA>(ra, si, dck * vg);
            d[U + k] = df<RA>(ra, sf, dck * cp[o + k]);
            d[2 * U + k] = df<A>(a, sg, dck * vi);
            d[3 * U + k] = df<RA>(ra, so, dhk * ac);
            dc[o + k] = dck * vf;
        }
    }
}

template <int A, int RA, typename T>
static void lstm_forward_rows(int a, int ra, int Tn, int Bn, int U, npy_intp r0, npy_intp nr,
                              const T* P, const T* bias, const T* W, const T* h0, const T* c0,
                              T* H, T* C, T* S, T* AC) {
    const int G = 4 * U;
    const size_t step = (size_t)Bn * U, off = (size_t)r0 * U, goff = (size_t)r0 * G;
    for (int t = 0; t < Tn; ++t) {
        T* St = S + (size_t)t * Bn * G + goff;
        add_bias(St, P + (size_t)t * Bn * G + goff, bias, nr, G);
        const T* hp = (t ? H + (t - 1) * step : h0) + off;
        netbuild_gemm('N', 'N', G, (int)nr, U, (T)1, W, G, hp, U, (T)1, St, G);
        const T* cp = (t ? C + (t - 1) * step : c0) + off;
        lstm_cells<A, RA>(a, ra, nr, U, St, cp, C + t * step + off, AC + t * step + off,
                          H + t * step + off);
    }
}

template <typename T>
static void lstm_forward(int a, int ra, int Tn, int Bn, int U, const T* P, const T* bias,
                         const T* W, const T* h0, const T* c0, T* H, T* C, T* S, T* AC) {
    netbuild_serial_blas serial(netbuild_threads());
    netbuild_for_parts(Bn, ROWS_PER_PART, [&](npy_intp r0, npy_intp r1) {
        if (a == TANH && ra == SIGMOID)
            lstm_forward_rows<TANH, SIGMOID>(a, ra, Tn, Bn, U, r0, r1 - r0, P, bias, W, h0, c0, H,
                                             C, S, AC);
        else
            lstm_forward_rows<ANY, ANY>(a, ra, Tn, Bn, U, r0, r1 - r0, P, bias, W, h0, c0, H, C,
                                        S, AC);
    });
}

template <int A, int RA, typename T>
static void lstm_backward_rows(int a, int ra, int Tn, int Bn, int U, npy_intp r0, npy_intp nr,
                               const T* W, const T* c0, const T* C, const T* S, const T* AC,
                               const T* dH, const T* dC, T* dP, T* dh0, T* dc0, T* dh, T* dc) {
    const int G = 4 * U;
    const size_t step = (size_t)Bn * U, off = (size_t)r0 * U, goff = (size_t)r0 * G;
    memset(dc + off, 0, sizeof(T) * nr * U);
    start_backward(Tn, Bn, U, r0, nr, dH, dh, dh0);
    for (int t = Tn - 1; t >= 0; --t) {
        const T* cp = (t ? C + (t - 1) * step : c0) + off;
        T* dPt = dP + (size_t)t * Bn * G;
        lstm_cells_grad<A, RA>(a, ra, nr, U, S + (size_t)t * Bn * G + goff, C + t * step + off,
                               AC + t * step + off, cp, dC ? dC + t * step + off : (const T*)0,
                               dh + off, dc + off, dPt + goff);
        carry(t, Bn, U, G, r0, nr, W, dPt, dH, false, dh, dh0);
    }
    memcpy(dc0 + off, dc + off, sizeof(T) * nr * U);
}

/* dC may be NULL (no gradient reaches the cell states) */
template <typename T>
static void lstm_backward(int a, int ra, int Tn, int Bn, int U, const T* W, const T* h0,
                          const T* c0, const T* H, const T* C, const T* S, const T* AC,
                          const T* dH, const T* dC, T* dP, T* db, T* dW, T* dh0, T* dc0,
                          T* dh, T* dc, double* acc) {
    const int G = 4 * U;
    {
        netbuild_serial_blas serial(netbuild_threads());
        netbuild_for_parts(Bn, ROWS_PER_PART, [&](npy_intp r0, npy_intp r1) {
            if (a == TANH && ra == SIGMOID)
                lstm_backward_rows<TANH, SIGMOID>(a, ra, Tn, Bn, U, r0, r1 - r0, W, c0, C, S, AC,
                                                  dH, dC, dP, dh0, dc0, dh, dc);
            else
                lstm_backward_rows<ANY, ANY>(a, ra, Tn, Bn, U, r0, r1 - r0, W, c0, C, S, AC, dH,
                                             dC, dP, dh0, dc0, dh, dc);
        });
    }
    column_sums(dP, (npy_intp)Tn * Bn, G, 0, G, db, acc);
    weight_grad(Tn, Bn, U, G, dP, H, h0, dW);
}

/* -- gru: q = h W; r, z = ract(p + b + q); n = act(p_n + b_n + r (q_n + b_hn));
      h = (1 - z) n + z h ------------------------------------------------------------------- */
template <int A, int RA, typename T>
__attribute__((noinline)) static void gru_cells(int a, int ra, npy_intp rows, int U,
                                                const T* __restrict P, const T* __restrict bias,
                                                const T* __restrict Q, const T* __restrict bhn,
                                                const T* __restrict hp, T* __restrict S,
                                                T* __restrict HN, T* __restrict H) {
    for (npy_intp r = 0; r < rows; ++r) {
        const size_t g = (size_t)r * 3 * U, o = (size_t)r * U;
        const T* __restrict p = P + g;
        const T* __restrict q = Q + g;
        T* __restrict s = S + g;
        for (int k = 0; k < U; ++k) {
            T xr = (p[k] + bias[k]) + q[k], xz = (p[U + k] + bias[U + k]) + q[U + k];
            T vr = f<RA>(ra, xr), vz = f<RA>(ra, xz);
            T hn = q[2 * U + k] + bhn[k];
            T xn = (p[2 * U + k] + bias[2 * U + k]) + vr * hn;
            T vn = f<A>(a, xn);
            HN[o + k] = hn;
            H[o + k] = ((T)1 - vz) * vn + vz * hp[o + k];
            s[k] = keep<RA>(ra, xr, vr);
            s[U + k] = keep<RA>(ra, xz, vz);
            s[2 * U + k] = keep<A>(a, xn, vn);
        }
    }
}

template <int A, int RA, typename T>
__attribute__((noinline)) static void gru_cells_grad(
        int a, int ra, npy_intp rows, int U, const T* __restrict S, const T* __restrict HN,
        const T* __restrict hp, T* __restrict dh, T* __restrict D, T* __restrict DQ) {
    for (npy_intp r = 0; r < rows; ++r) {
        const size_t g = (size_t)r * 3 * U, o = (size_t)r * U;
        const T* __restrict s = S + g;
        T* __restrict d = D + g;
        T* __restrict dq = DQ + g;
        for (int k = 0; k < U; ++k) {
            T sr = s[k], sz = s[U + k], sn = s[2 * U + k];
            T vr = value<RA>(ra, sr), vz = value<RA>(ra, sz), vn = value<A>(a, sn);
            T dhk = dh[o + k];
            T dn = df<A>(a, sn, dhk * ((T)1 - vz));
            T dr = df<RA>(ra, sr, dn * HN[o + k]);
            T dz = df<RA>(ra, sz, dhk * (hp[o + k] - vn));
            d[k] = dr;
            d[U + k] = dz;
            d[2 * U + k] = dn;
            dq[k] = dr;
            dq[U + k] = dz;
            dq[2 * U + k] = dn * vr;
            dh[o + k] = dhk * vz;
        }
    }
}

template <int A, int RA, typename T>
static void gru_forward_rows(int a, int ra, int Tn, int Bn, int U, npy_intp r0, npy_intp nr,
                             const T* P, const T* bias, const T* W, const T* h0, const T* bhn,
                             T* H, T* S, T* HN, T* Q) {
    const int G = 3 * U;
    const size_t step = (size_t)Bn * U, off = (size_t)r0 * U, goff = (size_t)r0 * G;
    for (int t = 0; t < Tn; ++t) {
        const T* hp = (t ? H + (t - 1) * step : h0) + off;
        netbuild_gemm('N', 'N', G, (int)nr, U, (T)1, W, G, hp, U, (T)0, Q + goff, G);
        const size_t tg = (size_t)t * Bn * G + goff;
        gru_cells<A, RA>(a, ra, nr, U, P + tg, bias, Q + goff, bhn, hp, S + tg,
                         HN + t * step + off, H + t * step + off);
    }
}

template <typename T>
static void gru_forward(int a, int ra, int Tn, int Bn, int U, const T* P, const T* bias,
                        const T* W, const T* h0, const T* bhn, T* H, T* S, T* HN, T* Q) {
    netbuild_serial_blas serial(netbuild_threads());
    netbuild_for_parts(Bn, ROWS_PER_PART, [&](npy_intp r0, npy_intp r1) {
        if (a == TANH && ra == SIGMOID)
            gru_forward_rows<TANH, SIGMOID>(a, ra, Tn, Bn, U, r0, r1 - r0, P, bias, W, h0, bhn, H,
                                            S, HN, Q);
        else
            gru_forward_rows<ANY, ANY>(a, ra, Tn, Bn, U, r0, r1 - r0, P, bias, W, h0, bhn, H, S,
                                       HN, Q);
    });
}

template <int A, int RA, typename T>
static void gru_backward_rows(int a, int ra, int Tn, int Bn, int U, npy_intp r0, npy_intp nr,
                              const T* W, const T* h0, const T* H, const T* S, const T* HN,
                              const T* dH, T* dP, T* dh0, T* dh, T* dQ) {
    const int G = 3 * U;
    const size_t step = (size_t)Bn * U, off = (size_t)r0 * U, goff = (size_t)r0 * G;
    start_backward(Tn, Bn, U, r0, nr, dH, dh, dh0);
    for (int t = Tn - 1; t >= 0; --t) {
        const T* hp = (t ? H + (t - 1) * step : h0) + off;
        const size_t tg = (size_t)t * Bn * G;
        gru_cells_grad<A, RA>(a, ra, nr, U, S + tg + goff, HN + t * step + off, hp, dh + off,
                              dP + tg + goff, dQ + tg + goff);
        carry(t, Bn, U, G, r0, nr, W, dQ + tg, dH, true, dh, dh0);
    }
}

template <typename T>
static void gru_backward(int a, int ra, int Tn, int Bn, int U, const T* W, const T* h0,
                         const T* H, const T* S, const T* HN, const T* dH, T* dP, T* db, T* dW,
                         T* dh0, T* dbhn, T* dh, T* dQ, double* acc) {
    const int G = 3 * U;
    {
        netbuild_serial_blas serial(netbuild_threads());
        netbuild_for_parts(Bn, ROWS_PER_PART, [&](npy_intp r0, npy_intp r1) {
            if (a == TANH && ra == SIGMOID)
                gru_backward_rows<TANH, SIGMOID>(a, ra, Tn, Bn, U, r0, r1 - r0, W, h0, H, S, HN,
                                                 dH, dP, dh0, dh, dQ);
            else
                gru_backward_rows<ANY, ANY>(a, ra, Tn, Bn, U, r0, r1 - r0, W, h0, H, S, HN, dH,
                                            dP, dh0, dh, dQ);
        });
    }
    column_sums(dP, (npy_intp)Tn * Bn, G, 0, G, db, acc);
    column_sums(dQ, (npy_intp)Tn * Bn, G, 2 * U, U, dbhn, acc);
    weight_grad(Tn, Bn, U, G, dQ, H, h0, dW);
}

}  // namespace nbrec
