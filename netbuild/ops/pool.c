#section support_code
/* Max and average pooling, and their gradient (netbuild/ops/pool.py). Loaded after netbuild.c and
   window.c (nbwin::). */

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

// d if h, else +0.0, without a branch: g++ turned a select in the scalar tail loop (all of a
// row of 5 windows, 5 of 13) into a jump that mispredicts on the data: 1.9 ms for the bench CNN's
// first pooling gradient, where the forward pass takes 0.2.
template <typename T> struct nbpool_bits;
template <> struct nbpool_bits<float> { typedef uint32_t type; };
template <> struct nbpool_bits<double> { typedef uint64_t type; };
template <typename T> static inline T or_zero(bool h, T d) {
    typedef typename nbpool_bits<T>::type U;
    U u;
    memcpy(&u, &d, sizeof u);
    u &= (U)0 - (U)h;
    memcpy(&d, &u, sizeof u);
    return d;
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
        d0[2 * j] = or_zero(h0, d);
        d0[2 * j + 1] = or_zero(h1, d);
        d1[2 * j] = or_zero(h2, d);
        d1[2 * j + 1] = or_zero(h3, d);
    }
    return bad;
}

// Threads for a loop over planes of hw inputs each: one per POOL_PER_PART inputs at most. Waking
// a thread costs more than pooling a few thousand values (a batch of one 8x8 image's channels).
static const npy_intp POOL_PER_PART = 16384;
static inline int pool_threads(npy_intp planes, npy_intp hw) {
    return netbuild_parts(planes, netbuild_threads(), hw > 0 ? (POOL_PER_PART + hw - 1) / hw : 1);
}

// y (planes, OH, OW) from x (planes, H, W); mode 0: max, 1: average of the inputs covered.
template <typename T>
__attribute__((noinline)) static void forward(int mode, npy_intp planes, const T* __restrict__ x,
                                              T* __restrict__ y, const Geom& g) {
    const npy_intp HW = g.H * g.W, P = g.OH * g.OW;
    const int nt = pool_threads(planes, HW);
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
    const int nt = pool_threads(planes, HW);
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
