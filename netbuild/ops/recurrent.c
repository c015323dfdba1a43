#section support_code
/* The recurrent layers' loop over timesteps (netbuild/ops/recurrent.py), forward and backward.

   Threads split the rows of the batch: the rows of a recurrent batch are independent, so each of
   a team of threads (netbuild_team_run, at least ROWS_PER_PART rows each) runs the whole loop over
   timesteps on its rows, with no wait between steps. A forward step is, on each thread, the
   product of its rows of h[t-1] with the whole W (packed once per call, the team sharing the
   packing), with the layers' inputs also their projection x[t] W_ih (W_ih packed likewise), then
   the fused elementwise maths of its rows. A backward step is the elementwise maths of its rows
   (the gates' gradients dA[t]) and the product of those rows of dA[t] with W^T (packed once) for
   its rows of dh. After the loop the team waits once, and each thread then computes its columns
   of the weight gradients, W's and W_ih's (products over all T*B rows, a block of rows at a
   time), and of the bias gradients (column sums in double, row by row in order). With a batch
   too small to split, the team is as large as the units allow, for those gradients alone.

   Every product is netbuild_packed_gemm, not BLAS: it adds each value's terms in one fixed order
   whatever the rows or columns computed with it, so the outputs have the same bits on any number
   of threads. OpenBLAS packs both operands again at every call: in PyTensor's per-op profile of
   the bench LSTM's training step (float32, one thread) the forward op went from 3.9 to 2.9 ms
   and the backward from 7.3 to 5.7 ms when these products replaced its gemms. An earlier version
   split the units instead, which needs the whole h[t] (or dA[t]) of every thread before the next
   step, a wait at every step: on the bench LSTM (2 threads, same profile) the two ops took
   5.0 ms a training step that way and 4.5-4.9 ms in three runs of this one.

   The fused loops are vectorized: templates on the two activations for the default pair (tanh,
   sigmoid) and the simple RNN's tanh and relu, a run-time switch for the other pairs. */

namespace nbrec {

enum { LINEAR = 0, TANH = 1, SIGMOID = 2, RELU = 3, HARD_SIGMOID = 4, ANY = -1 };
static const npy_intp UNITS_PER_PART = 16;
static inline bool keeps_input(int code) { return code == RELU || code == HARD_SIGMOID; }

/* float: branch-free tanh (Cephes' tanhf, within 2 ulp) that g++ vectorizes, on netbuild_exp;
   double: libm's. NaN stays NaN. */
static inline float tanh_(float x) {
    float a = x < 0.0f ? -x : x;
    float s = x * x;
    float small = -5.70498872745e-3f;
    small = small * s + 2.06390887954e-2f;
    small = small * s - 5.37397155531e-2f;
    small = small * s + 1.33314422036e-1f;
    small = small * s - 3.33332819422e-1f;
    small = small * s * a + a;
    float big = 1.0f - 2.0f / (netbuild_exp(2.0f * a) + 1.0f);
    float r = a < 0.625f ? small : big;
    return x < 0.0f ? -r : r;
}
static inline double tanh_(double x) { return tanh(x); }

/* f(x) for activation code A (a compile-time code, or ANY: the run-time `code`) */
template <int A, typename T> static inline T f(int code, T x) {
    const int c = A == ANY ? code : A;
    switch (c) {
    case TANH: return tanh_(x);
    case SIGMOID: return (T)1 / ((T)1 + netbuild_exp(-x));
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

/* out[k] = sum over rows r of x[r * ld + off + k], k < n, in double (acc, n of them) and in row
   order: the same bits however the columns are shared among threads. */
template <typename T>
static void column_sums(const T* __restrict x, npy_intp rows, npy_intp ld, npy_intp off,
                        npy_intp n, T* __restrict out, double* __restrict acc) {
    for (npy_intp k = 0; k < n; ++k) acc[k] = 0.0;
    for (npy_intp r = 0; r < rows; ++r) {
        const T* __restrict row = x + r * ld + off;
        for (npy_intp k = 0; k < n; ++k) acc[k] += row[k];
    }
    for (npy_intp k = 0; k < n; ++k) out[k] = (T)acc[k];
}

/* With the input projection in the op (its inputs X (Tn, Bn, F)): where the gradient op puts
   the projection's weight gradient dW_ih (F, G) = sum_t x[t]^T dP[t]. dW null: not computed. */
template <typename T> struct input_grad {
    const T* X;
    npy_intp F;
    T* dW;
};

/* The part's columns of dW (U, G) = sum_t h[t-1]^T dA[t] (dW null: not computed) and, with
   in.dW, of in.dW = sum_t x[t]^T dA[t], per gate block: the rows of steps 1..T-1
   (h = H[0..T-2]) then those of step 0 (h0), added in that order, from the same blocks of rows
   of dA packed once into pack (netbuild_packed_blocks): each value is the same sum in the same
   order whatever the part, so both have the same bits on any number of threads. Computing in.dW
   here, on dA already packed, rather than with netbuild/ops/projection.c's ProjectionWeightGrad:
   the bench LSTM's two weight gradients (float32, one thread, a standalone timing, best of 20)
   took 6.5-7.1 ms as this and ProjectionWeightGrad, 5.6-6.0 ms together. */
template <typename T>
static void weight_grad_units(int Tn, int Bn, int U, int g, npy_intp u0, npy_intp nu, const T* dA,
                              const T* H, const T* h0, T* dW, T* pack, input_grad<T> in) {
    const npy_intp G = (npy_intp)g * U, rows = (npy_intp)Tn * Bn, F = in.dW ? in.F : 0;
    const npy_intp later = rows > Bn ? rows - Bn : 0, first = rows < Bn ? rows : Bn;
    for (int q = 0; q < g; ++q) {
        T* out = dW ? dW + q * U + u0 : (T*)0;
        T* outx = in.dW ? in.dW + q * U + u0 : (T*)0;
        const T* dAq = dA + q * U + u0;
        bool add = false;
        for (int part = 0; part < 2; ++part) {  // steps 1..T-1, then step 0
            const npy_intp r0 = part ? 0 : Bn, n = part ? first : later;
            const T* h = part ? h0 : H;         // row k goes with row r0 + k of dA
            netbuild_packed_blocks(n, nu, dAq + r0 * G, G, pack,
                                   [&](npy_intp k0, npy_intp kb, const T* P) {
                if (out) netbuild_packed_gemm<T>(U, nu, kb, h + k0 * U, 1, U, P, out, G, add);
                if (outx)
                    netbuild_packed_gemm<T>(F, nu, kb, in.X + (r0 + k0) * F, 1, F, P, outx, G,
                                            add);
                add = true;
            });
        }
        if (!add) {  // no rows
            for (npy_intp i = 0; out && i < U; ++i) memset(out + i * G, 0, sizeof(T) * nu);
            for (npy_intp i = 0; outx && i < F; ++i) memset(outx + i * G, 0, sizeof(T) * nu);
        }
    }
}

/* After the backward loop, on each thread of the team: the part's columns of dW (from dA: dP,
   or the GRU's dQ), of the bias gradient db (column sums of dP) and, with in.dW, of in.dW (from
   dP: with dA = dP from the same packed blocks, else from dP's own). */
template <typename T>
static void part_grads(int Tn, int Bn, int U, int g, npy_intp u0, npy_intp nu, const T* dA,
                       const T* dP, const T* H, const T* h0, T* dW, T* db, T* pack,
                       double* acc, input_grad<T> in) {
    if (dA == dP) {
        weight_grad_units(Tn, Bn, U, g, u0, nu, dA, H, h0, dW, pack, in);
    } else {  // the GRU: dW from dQ, dW_ih from dP
        weight_grad_units(Tn, Bn, U, g, u0, nu, dA, H, h0, dW, pack, input_grad<T>{0, 0, 0});
        if (in.dW) weight_grad_units(Tn, Bn, U, g, u0, nu, dP, H, h0, (T*)0, pack, in);
    }
    for (int q = 0; q < g; ++q)
        column_sums(dP, (npy_intp)Tn * Bn, (npy_intp)g * U, q * U + u0, nu, db + q * U + u0,
                    acc + q * U + u0);
}

/* How many parts the units are cut into for the weight gradients: one per thread, at least
   UNITS_PER_PART units each. */
static inline int unit_parts(int U) {
    return netbuild_parts(U, netbuild_threads(), UNITS_PER_PART);
}

/* How many parts the rows of a batch are cut into for a loop: one per thread, at least a tile of
   the packed product each. */
static const npy_intp ROWS_PER_PART = NETBUILD_MR;
static inline int row_parts(int Bn) {
    return netbuild_parts(Bn, netbuild_threads(), ROWS_PER_PART);
}

/* Part p of n of [0, N): its first item i0 and its count ni. */
#define NBREC_PART(N, p, n, i0, ni)                                  \
    const npy_intp i0 = netbuild_part_start((N), (n), (p));          \
    const npy_intp ni = netbuild_part_start((N), (n), (p) + 1) - i0

/* rows of `to` (row stride U) = (or +=) those of `from` */
template <typename T>
static void copy_rows(npy_intp rows, int U, const T* __restrict from, T* __restrict to, bool add) {
    const size_t n = (size_t)rows * U;
    if (add) for (size_t k = 0; k < n; ++k) to[k] += from[k];
    else memcpy(to, from, sizeof(T) * n);
}

/* The columns [u0, u0 + nu) of rows of to (Bn, U) = those of from */
template <typename T>
static void copy_units(int Bn, int U, npy_intp u0, npy_intp nu, const T* from, T* to) {
    for (npy_intp r = 0; r < Bn; ++r) memcpy(to + r * U + u0, from + r * U + u0, sizeof(T) * nu);
}

/* Masks (M (Tn, Bn), 0 at a padded step of a row): a padded step keeps the states as they were.
   Forward, after a step's kernel: every row padded at this step (mt[r] == 0) takes the previous
   state's (from, to: at the first of the rows). A select, not m h + (1 - m) h', so what the
   padded inputs hold (even inf or NaN) never reaches a state. */
template <typename T>
static void hold_rows(npy_intp rows, int U, const T* mt, const T* from, T* to) {
    for (npy_intp r = 0; r < rows; ++r)
        if (mt[r] == (T)0) memcpy(to + r * U, from + r * U, sizeof(T) * U);
}

/* Backward, after a step's kernel (D, DQ with row stride g*U, dh, dc, dC with row stride U, all
   at the first of the rows): a row padded at this step gets no gate gradient (D and DQ zero) and
   carries dh, and dc (plus dC of this step), as they were before the kernel (saved in sdh, sdc);
   a real row of a cell whose carry is not kept (simple_rnn, lstm: clear) starts dh at 0, since
   with a mask the carry adds onto dh. */
template <typename T>
static void mask_grad_rows(npy_intp rows, int U, int g, const T* mt, bool clear, T* D, T* DQ,
                           T* dh, const T* sdh, T* dc, const T* sdc, const T* dC) {
    const npy_intp G = (npy_intp)g * U;
    for (npy_intp r = 0; r < rows; ++r) {
        const npy_intp o = r * U;
        if (mt[r] != (T)0) {
            if (clear) memset(dh + o, 0, sizeof(T) * U);
            continue;
        }
        memset(D + r * G, 0, sizeof(T) * G);
        if (DQ) memset(DQ + r * G, 0, sizeof(T) * G);
        memcpy(dh + o, sdh + o, sizeof(T) * U);
        if (dc) {
            memcpy(dc + o, sdc + o, sizeof(T) * U);
            if (dC) for (npy_intp k = 0; k < U; ++k) dc[o + k] += dC[o + k];
        }
    }
}

/* The scratch of a backward loop's weight gradient: part p's block of dA rows starts
   rows * (u0 + p * NR) elements in, holding rows x (nu rounded up to NR). */
template <typename T> static inline size_t packed_offset(npy_intp rows, npy_intp u0, int p) {
    return (size_t)rows * (size_t)(u0 + p * netbuild_nr<T>());
}

/* Scratch elements of a forward loop: W packed, then X (Bn, g*U); with project (the input
   projection computed in the loop, from inputs of F features), W_ih packed and a step's
   projection (Bn, g*U). */
template <typename T>
static inline size_t forward_work(int g, int Bn, int U, bool project, npy_intp F) {
    const npy_intp G = (npy_intp)g * U;
    return netbuild_packed_size<T>(U, G) + (size_t)Bn * G
           + (project ? netbuild_packed_size<T>(F, G) + (size_t)Bn * G : 0);
}

/* Rows of a part's block in a backward loop's scratch: the shared W^T packed (g * U rows) during
   the loop, then each part's blocks of dA for the weight gradient (NETBUILD_KBLOCK rows). */
static inline npy_intp pack_rows(int g, int U) {
    return (npy_intp)g * U > NETBUILD_KBLOCK ? (npy_intp)g * U : NETBUILD_KBLOCK;
}

/* Scratch elements of a backward loop's packed blocks (after what the cell's loop needs). */
template <typename T> static inline size_t backward_work(int g, int U) {
    return packed_offset<T>(pack_rows(g, U), U, unit_parts(U));
}

/* A loop's input projection: every step's P (Tn, Bn, G) given (in.P), or computed a step at a
   time from the inputs in.X (Tn, Bn, F) and in.Wih (F, G). */
template <typename T> struct inputs {
    const T* P;
    const T* X;
    const T* Wih;
    npy_intp F;
};

/* The forward loop every cell shares. The team packs W (U, g*U) once, together (and W_ih
   (F, g*U) with in.X); then on each thread, for every step, the product X = h[t-1] W for its rows
   (nr rows from r0), with in.X the rows' projection P[t] = x[t] W_ih (the product
   netbuild/ops/projection.c computes for a whole sequence, row by row the same bits, here while
   the step's rows are in cache), and cells(t, r0, nr, X, Pt, hp) (X, Pt: the part's rows, row
   stride g*U; hp: h[t-1], all rows). work: forward_work elements.

   The projection in the loop: the bench LSTM's forward (64 rows, 50 steps of 32 features, 128
   units, float32; a standalone timing, best of 20) took 6.8-7.1 ms on one thread and 4.0-4.4 ms
   on two as the Projection op then this loop, 6.3 ms and 3.1-3.5 ms with it in the loop: the
   whole P (6.5 MB) is neither written nor read back. Same bits. */
template <typename T, typename F>
static void forward_loop(int g, int Tn, int Bn, int U, inputs<T> in, const T* W, const T* h0,
                         const T* H, T* work, F cells) {
    const size_t step = (size_t)Bn * U;
    const bool project = in.X != 0;
    const npy_intp G = (npy_intp)g * U, Fn = project ? in.F : 0;
    T* Wp = work;
    T* X = Wp + netbuild_packed_size<T>(U, G);
    T* Wip = X + (size_t)Bn * G;                     // with project: W_ih packed
    T* Pl = Wip + netbuild_packed_size<T>(Fn, G);    // and a step's projection
    netbuild_team_run(row_parts(Bn), [&](int p, int n, netbuild_team& team) {
        netbuild_pack_part(p, n, U, G, G, [&](npy_intp c) { return W + c; }, Wp);
        if (project)
            netbuild_pack_part(p, n, Fn, G, G, [&](npy_intp c) { return in.Wih + c; }, Wip);
        team.wait(n);
        NBREC_PART(Bn, p, n, r0, nr);
        T *Xp = X + r0 * G, *Plp = Pl + r0 * G;
        for (int t = 0; t < Tn && nr > 0; ++t) {
            const T* hp = t ? H + (t - 1) * step : h0;
            const size_t rt = (size_t)t * Bn + r0;  // the first of the rows at step t
            if (project)  // (no features: K = 0, a projection of zeros)
                netbuild_packed_gemm<T>(nr, G, Fn, in.X + rt * Fn, Fn, 1, Wip, Plp, G, false);
            netbuild_packed_gemm<T>(nr, G, U, hp + r0 * U, U, 1, Wp, Xp, G, false);
            cells(t, r0, nr, (const T*)Xp, project ? (const T*)Plp : in.P + rt * G, hp);
        }
    });
}

/* The backward loop every cell shares. The team packs W^T once, together, into pack
   (backward_work elements); then on each thread with rows, for its rows: dh = dH[T-1] (dh0 = 0
   with no steps), and for every step, last first, cells(t, r0, nr) (the gates' gradients dA[t],
   from dh) and dh carried to the step before: dh = dH[t-1] + dA[t] W^T (+ what dh holds when
   keep, as for the GRU); at t = 0 into dh0 (dh0 = dh + dA[0] W^T when keep). Then a wait (dA
   complete), and done(u0, nu, block) for each part of the units, with that part's block of pack
   (free again: the weight gradient's blocks of dA go there). */
template <typename T, typename F, typename D>
static void backward_loop(int g, bool keep, int Tn, int Bn, int U, const T* W, const T* dA,
                          const T* dH, T* dh, T* dh0, T* pack, F cells, D done) {
    const size_t step = (size_t)Bn * U;
    const npy_intp G = (npy_intp)g * U;
    const int rows = row_parts(Bn), units = unit_parts(U);
    netbuild_team_run(rows > units ? rows : units, [&](int p, int n, netbuild_team& team) {
        netbuild_pack_part(p, n, G, U, 1, [&](npy_intp j) { return W + j * G; }, pack);
        team.wait(n);
        const int rn = rows < n ? rows : n, un = units < n ? units : n;
        if (p < rn) {
            NBREC_PART(Bn, p, rn, r0, nr);
            T *dhp = dh + r0 * U, *dh0p = dh0 + r0 * U;
            if (Tn > 0) copy_rows(nr, U, dH + (Tn - 1) * step + r0 * U, dhp, false);
            else memset(dh0p, 0, sizeof(T) * nr * U);
            for (int t = Tn - 1; t >= 0; --t) {
                cells(t, r0, nr);
                if (t) copy_rows(nr, U, dH + (t - 1) * step + r0 * U, dhp, keep);
                else if (keep) copy_rows(nr, U, (const T*)dhp, dh0p, false);
                netbuild_packed_gemm<T>(nr, U, G, dA + (t * Bn + r0) * G, G, 1, pack,
                                        t ? dhp : dh0p, U, t || keep);
            }
        }
        team.wait(n);
        if (p < un) {
            NBREC_PART(U, p, un, u0, nu);
            done(u0, nu, pack + packed_offset<T>(pack_rows(g, U), u0, p));
        }
    });
}

/* -- simple_rnn: h = act(p + b + h W) ---------------------------------------------------------- */
/* Bn rows: X = h W, P, S, H (row stride U), each at the first of the rows */
template <int A, typename T>
__attribute__((noinline)) static void rnn_cells(int a, npy_intp Bn, int U,
                                                const T* __restrict X, const T* __restrict P,
                                                const T* __restrict bias, T* __restrict S,
                                                T* __restrict H) {
    for (npy_intp r = 0; r < Bn; ++r)
        for (npy_intp k = 0; k < U; ++k) {
            T x = (P[r * U + k] + bias[k]) + X[r * U + k], y = f<A>(a, x);
            H[r * U + k] = y;
            S[r * U + k] = keep<A>(a, x, y);
        }
}

template <int A, typename T>
__attribute__((noinline)) static void rnn_cells_grad(int a, npy_intp Bn, int U,
                                                     const T* __restrict S,
                                                     const T* __restrict dh, T* __restrict D) {
    for (npy_intp r = 0; r < Bn; ++r)
        for (npy_intp k = 0; k < U; ++k) D[r * U + k] = df<A>(a, S[r * U + k], dh[r * U + k]);
}

template <typename T>
static void rnn_forward(int a, int Tn, int Bn, int U, inputs<T> in, const T* bias, const T* W,
                        const T* h0, const T* M, T* H, T* S, T* work) {
    const size_t step = (size_t)Bn * U;
    forward_loop(1, Tn, Bn, U, in, W, h0, H, work,
                 [&](int t, npy_intp r0, npy_intp nr, const T* X, const T* Pt, const T* hp) {
        const size_t o = t * step + r0 * U;
        T *St = S + o, *Ht = H + o;
        switch (a) {
        case TANH: rnn_cells<TANH>(a, nr, U, X, Pt, bias, St, Ht); break;
        case RELU: rnn_cells<RELU>(a, nr, U, X, Pt, bias, St, Ht); break;
        default: rnn_cells<ANY>(a, nr, U, X, Pt, bias, St, Ht);
        }
        if (M) hold_rows(nr, U, M + (size_t)t * Bn + r0, hp + r0 * U, Ht);
    });
}

template <typename T>
static void rnn_backward(int a, int Tn, int Bn, int U, const T* W, const T* h0, const T* H,
                         const T* S, const T* dH, const T* M, T* dP, T* db, T* dW, T* dh0, T* dh,
                         T* sdh, T* pack, double* acc, input_grad<T> in) {
    const size_t step = (size_t)Bn * U;
    backward_loop(1, M != 0, Tn, Bn, U, W, dP, dH, dh, dh0, pack,
                  [&](int t, npy_intp r0, npy_intp nr) {
        const size_t o = t * step + r0 * U;
        const T* St = S + o;
        T *dPt = dP + o, *dhp = dh + r0 * U, *sdhp = sdh ? sdh + r0 * U : sdh;
        if (M) copy_rows(nr, U, (const T*)dhp, sdhp, false);
        switch (a) {
        case TANH: rnn_cells_grad<TANH>(a, nr, U, St, dhp, dPt); break;
        case RELU: rnn_cells_grad<RELU>(a, nr, U, St, dhp, dPt); break;
        default: rnn_cells_grad<ANY>(a, nr, U, St, dhp, dPt);
        }
        if (M)
            mask_grad_rows(nr, U, 1, M + (size_t)t * Bn + r0, true, dPt, (T*)0, dhp, sdhp,
                           (T*)0, (const T*)0, (const T*)0);
    }, [&](npy_intp u0, npy_intp nu, T* blocks) {
        part_grads(Tn, Bn, U, 1, u0, nu, dP, dP, H, h0, dW, db, blocks, acc, in);
    });
}

/* -- lstm: a = p + b + h W; i, f, g, o = ract, ract, act, ract; c = f c + i g; h = o act(c) ---- */
/* Bn rows: X = h W, P and S (row stride 4U, gate blocks U apart), cp, C, AC, H (row stride U),
   each at the first of the rows. */
template <int A, int RA, typename T>
__attribute__((noinline)) static void lstm_cells(int a, int ra, npy_intp Bn, int U,
                                                 const T* __restrict X, const T* __restrict P,
                                                 const T* __restrict bias, T* __restrict S,
                                                 const T* __restrict cp, T* __restrict C,
                                                 T* __restrict AC, T* __restrict H) {
    for (npy_intp r = 0; r < Bn; ++r) {
        const T* __restrict x = X + r * 4 * U;
        const T* __restrict p = P + r * 4 * U;
        T* __restrict s = S + r * 4 * U;
        const size_t o = (size_t)r * U;
        for (npy_intp k = 0; k < U; ++k) {
            T xi = (p[k] + bias[k]) + x[k], xf = (p[U + k] + bias[U + k]) + x[U + k];
            T xg = (p[2 * U + k] + bias[2 * U + k]) + x[2 * U + k];
            T xo = (p[3 * U + k] + bias[3 * U + k]) + x[3 * U + k];
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

/* One backward step of Bn rows: the gates' gradients D (as S) and the carried dc, from dh; every
   pointer at the first of the rows. DC: whether dC is given (a test inside the loop
   kept g++ from vectorizing it). */
template <int A, int RA, bool DC, typename T>
__attribute__((noinline)) static void lstm_cells_grad(
        int a, int ra, npy_intp Bn, int U, const T* __restrict S, const T* __restrict C,
        const T* __restrict AC, const T* __restrict cp, const T* __restrict dC,
        const T* __restrict dh, T* __restrict dc, T* __restrict D) {
    for (npy_intp r = 0; r < Bn; ++r) {
        const T* __restrict s = S + r * 4 * U;
        T* __restrict d = D + r * 4 * U;
        const size_t o = (size_t)r * U;
        for (npy_intp k = 0; k < U; ++k) {
            T si = s[k], sf = s[U + k], sg = s[2 * U + k], so = s[3 * U + k];
            T vi = value<RA>(ra, si), vf = value<RA>(ra, sf), vg = value<A>(a, sg);
            T vo = value<RA>(ra, so);
            T ac = AC[o + k], dhk = dh[o + k];
            // h = o act(c): the cell state's gradient through act
            T d_ac = df<A>(a, keeps_input(A == ANY ? a : A) ? C[o + k] : ac, dhk * vo);
            if (DC) d_ac += dC[o + k];
            T dck = dc[o + k] + d_ac;
            d[k] = df<RA>(ra, si, dck * vg);
            d[U + k] = df<RA>(ra, sf, dck * cp[o + k]);
            d[2 * U + k] = df<A>(a, sg, dck * vi);
            d[3 * U + k] = df<RA>(ra, so, dhk * ac);
            dc[o + k] = dck * vf;
        }
    }
}

template <typename T>
static void lstm_forward(int a, int ra, int Tn, int Bn, int U, inputs<T> in, const T* bias,
                         const T* W, const T* h0, const T* c0, const T* M, T* H, T* C, T* S,
                         T* AC, T* work) {
    const size_t step = (size_t)Bn * U, gstep = (size_t)Bn * 4 * U;
    forward_loop(4, Tn, Bn, U, in, W, h0, H, work,
                 [&](int t, npy_intp r0, npy_intp nr, const T* X, const T* Pt, const T* hp) {
        const size_t o = t * step + r0 * U, go = t * gstep + r0 * 4 * U;
        const T* cp = (t ? C + (t - 1) * step : c0) + r0 * U;
        T *St = S + go, *Ct = C + o, *ACt = AC + o, *Ht = H + o;
        if (a == TANH && ra == SIGMOID)
            lstm_cells<TANH, SIGMOID>(a, ra, nr, U, X, Pt, bias, St, cp, Ct, ACt, Ht);
        else
            lstm_cells<ANY, ANY>(a, ra, nr, U, X, Pt, bias, St, cp, Ct, ACt, Ht);
        if (M) {
            const T* mt = M + (size_t)t * Bn + r0;
            hold_rows(nr, U, mt, hp + r0 * U, Ht);
            hold_rows(nr, U, mt, cp, Ct);
        }
    });
}

/* dC may be NULL (no gradient reaches the cell states) */
template <typename T>
static void lstm_backward(int a, int ra, int Tn, int Bn, int U, const T* W, const T* h0,
                          const T* c0, const T* H, const T* C, const T* S, const T* AC,
                          const T* dH, const T* dC, const T* M, T* dP, T* db, T* dW, T* dh0,
                          T* dc0, T* dh, T* dc, T* sdh, T* sdc, T* pack, double* acc,
                          input_grad<T> in) {
    const size_t step = (size_t)Bn * U, gstep = (size_t)Bn * 4 * U;
    const bool fast = a == TANH && ra == SIGMOID;
    backward_loop(4, M != 0, Tn, Bn, U, W, dP, dH, dh, dh0, pack, [&](int t, npy_intp r0, npy_intp nr) {
        const size_t o = t * step + r0 * U, go = t * gstep + r0 * 4 * U;
        T *dht = dh + r0 * U, *dct = dc + r0 * U;
        T *sdhp = sdh ? sdh + r0 * U : sdh, *sdcp = sdc ? sdc + r0 * U : sdc;
        if (t == Tn - 1) memset(dct, 0, sizeof(T) * nr * U);
        if (M) {
            copy_rows(nr, U, (const T*)dht, sdhp, false);
            copy_rows(nr, U, (const T*)dct, sdcp, false);
        }
        const T* cp = (t ? C + (t - 1) * step : c0) + r0 * U;
        const T *St = S + go, *Ct = C + o, *ACt = AC + o;
        const T* dCt = dC ? dC + o : (const T*)0;
        T* dPt = dP + go;
        if (fast && dC)
            lstm_cells_grad<TANH, SIGMOID, true>(a, ra, nr, U, St, Ct, ACt, cp, dCt, dht, dct, dPt);
        else if (fast)
            lstm_cells_grad<TANH, SIGMOID, false>(a, ra, nr, U, St, Ct, ACt, cp, dCt, dht, dct, dPt);
        else if (dC)
            lstm_cells_grad<ANY, ANY, true>(a, ra, nr, U, St, Ct, ACt, cp, dCt, dht, dct, dPt);
        else
            lstm_cells_grad<ANY, ANY, false>(a, ra, nr, U, St, Ct, ACt, cp, dCt, dht, dct, dPt);
        if (M)
            mask_grad_rows(nr, U, 4, M + (size_t)t * Bn + r0, true, dPt, (T*)0, dht, sdhp, dct,
                           sdcp, dCt);
    }, [&](npy_intp u0, npy_intp nu, T* blocks) {
        if (Tn > 0) copy_units(Bn, U, u0, nu, dc, dc0);
        else for (npy_intp r = 0; r < Bn; ++r) memset(dc0 + r * U + u0, 0, sizeof(T) * nu);
        part_grads(Tn, Bn, U, 4, u0, nu, dP, dP, H, h0, dW, db, blocks, acc, in);
    });
}

/* -- gru: q = h W; r, z = ract(p + b + q); n = act(p_n + b_n + r (q_n + b_hn));
      h = (1 - z) n + z h ------------------------------------------------------------------- */
/* Bn rows: Q = h W, P, S (row stride 3U, gate blocks U apart), hp, HN, H (row stride U), each at
   the first of the rows. */
template <int A, int RA, typename T>
__attribute__((noinline)) static void gru_cells(int a, int ra, npy_intp Bn, int U,
                                                const T* __restrict P, const T* __restrict bias,
                                                const T* __restrict Q, const T* __restrict bhn,
                                                const T* __restrict hp, T* __restrict S,
                                                T* __restrict HN, T* __restrict H) {
    for (npy_intp r = 0; r < Bn; ++r) {
        const size_t g = (size_t)r * 3 * U, o = (size_t)r * U;
        const T* __restrict p = P + g;
        const T* __restrict q = Q + r * 3 * U;
        T* __restrict s = S + g;
        for (npy_intp k = 0; k < U; ++k) {
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
        int a, int ra, npy_intp Bn, int U, const T* __restrict S,
        const T* __restrict HN, const T* __restrict hp, T* __restrict dh, T* __restrict D,
        T* __restrict DQ) {
    for (npy_intp r = 0; r < Bn; ++r) {
        const size_t g = (size_t)r * 3 * U, o = (size_t)r * U;
        const T* __restrict s = S + g;
        T* __restrict d = D + g;
        T* __restrict dq = DQ + g;
        for (npy_intp k = 0; k < U; ++k) {
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

template <typename T>
static void gru_forward(int a, int ra, int Tn, int Bn, int U, inputs<T> in, const T* bias,
                        const T* W, const T* h0, const T* bhn, const T* M, T* H, T* S, T* HN,
                        T* work) {
    const size_t step = (size_t)Bn * U, gstep = (size_t)Bn * 3 * U;
    forward_loop(3, Tn, Bn, U, in, W, h0, H, work,
                 [&](int t, npy_intp r0, npy_intp nr, const T* Q, const T* Pt, const T* hp) {
        const size_t o = t * step + r0 * U, go = t * gstep + r0 * 3 * U;
        const T* hpr = hp + r0 * U;
        T *St = S + go, *HNt = HN + o, *Ht = H + o;
        if (a == TANH && ra == SIGMOID)
            gru_cells<TANH, SIGMOID>(a, ra, nr, U, Pt, bias, Q, bhn, hpr, St, HNt, Ht);
        else
            gru_cells<ANY, ANY>(a, ra, nr, U, Pt, bias, Q, bhn, hpr, St, HNt, Ht);
        if (M) hold_rows(nr, U, M + (size_t)t * Bn + r0, hpr, Ht);
    });
}

template <typename T>
static void gru_backward(int a, int ra, int Tn, int Bn, int U, const T* W, const T* h0,
                         const T* H, const T* S, const T* HN, const T* dH, const T* M, T* dP,
                         T* db, T* dW, T* dh0, T* dbhn, T* dh, T* dQ, T* sdh, T* pack,
                         double* acc, input_grad<T> in) {
    const int G = 3 * U;
    const size_t step = (size_t)Bn * U, gstep = (size_t)Bn * G;
    backward_loop(3, true, Tn, Bn, U, W, dQ, dH, dh, dh0, pack, [&](int t, npy_intp r0, npy_intp nr) {
        const size_t o = t * step + r0 * U, go = t * gstep + r0 * G;
        const T* hp = (t ? H + (t - 1) * step : h0) + r0 * U;
        const T *St = S + go, *HNt = HN + o;
        T *dPt = dP + go, *dQt = dQ + go, *dhp = dh + r0 * U, *sdhp = sdh ? sdh + r0 * U : sdh;
        if (M) copy_rows(nr, U, (const T*)dhp, sdhp, false);
        if (a == TANH && ra == SIGMOID)
            gru_cells_grad<TANH, SIGMOID>(a, ra, nr, U, St, HNt, hp, dhp, dPt, dQt);
        else
            gru_cells_grad<ANY, ANY>(a, ra, nr, U, St, HNt, hp, dhp, dPt, dQt);
        if (M)
            mask_grad_rows(nr, U, 3, M + (size_t)t * Bn + r0, false, dPt, dQt, dhp, sdhp, (T*)0,
                           (const T*)0, (const T*)0);
    }, [&](npy_intp u0, npy_intp nu, T* blocks) {
        part_grads(Tn, Bn, U, 3, u0, nu, dQ, dP, H, h0, dW, db, blocks, acc, in);
        // b_hn's gradient: the n block of dQ (its accumulators after db's G)
        column_sums(dQ, (npy_intp)Tn * Bn, G, 2 * U + u0, nu, dbhn + u0, acc + G + u0);
    });
}

#undef NBREC_PART

}  // namespace nbrec
