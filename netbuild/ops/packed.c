#section support_code
/* Matrix products whose right-hand side is packed once and used many times: the recurrent loops'
   weights, multiplied at every step by a small batch of states and inputs
   (netbuild/ops/recurrent.c), and the products of netbuild/ops/projection.c.

   BLAS packs both operands again at every call: on the bench LSTM's per-step products
   (64 x 128 by 128 x 512, and 64 x 512 by 512 x 128, one thread, SkylakeX kernels; a standalone
   timing, each product repeated with its operands in cache) OpenBLAS's sgemm ran at 168-175
   GFLOP/s where this kernel, on weights packed once, ran at 210-220, on an earlier development
   machine (whose OpenBLAS ran a 1024 x 1024 sgemm at 205 GFLOP/s on one thread). On an AMD EPYC
   whose OpenBLAS runs it at 102, the bench LSTM's forward products ran at 110-113 GFLOP/s here
   (50 steps of 64 x 128 by 128 x 512, best of 20).

   The right-hand matrix B (K, N) is packed into panels of netbuild_nr<T>() columns, each panel
   K rows of NR consecutive values (the last panel padded with zeros). The product keeps a tile
   of NETBUILD_MR rows by NR columns in vector registers (g++'s vector extensions, sized to the
   widest vectors the compile flags allow) and adds the products of k = 0, 1, ..., K - 1 in that
   order, the same operations in every lane of every tile: every value of the result is the same
   sum in the same order whatever the tile, the panel or the thread, so its bits depend only on
   the operands (and the compile flags). */

#if defined(__AVX512F__)
#define NETBUILD_VEC_BYTES 64
#define NETBUILD_MR 8  /* 16 accumulators and 2 panel vectors of 32 registers */
#elif defined(__AVX__)
#define NETBUILD_VEC_BYTES 32
#define NETBUILD_MR 6  /* 12 and 2 of 16 */
#else
#define NETBUILD_VEC_BYTES 16
#define NETBUILD_MR 6
#endif

template <typename T> struct netbuild_simd;
template <> struct netbuild_simd<float> {
    typedef float v __attribute__((vector_size(NETBUILD_VEC_BYTES), aligned(4), may_alias));
};
template <> struct netbuild_simd<double> {
    typedef double v __attribute__((vector_size(NETBUILD_VEC_BYTES), aligned(8), may_alias));
};

/* Columns per panel: two vectors. */
template <typename T> static inline npy_intp netbuild_nr(void) {
    return 2 * (npy_intp)(NETBUILD_VEC_BYTES / sizeof(T));
}

/* Elements of B (K, N) packed. */
template <typename T> static inline size_t netbuild_packed_size(npy_intp K, npy_intp N) {
    const npy_intp nr = netbuild_nr<T>();
    return (size_t)K * (size_t)((N + nr - 1) / nr * nr);
}

/* P = B (K, N) packed, where B[k, j] = col(j)[k * sk] (col(j): a pointer to B[0, j]). Row by
   row within a panel, so that a row-major B is read along its rows. */
template <typename T, typename F>
static void netbuild_pack(npy_intp K, npy_intp N, npy_intp sk, F col, T* __restrict P) {
    const npy_intp nr = netbuild_nr<T>();
    for (npy_intp j0 = 0; j0 < N; j0 += nr) {
        T* __restrict panel = P + (size_t)j0 * K;
        const npy_intp w = N - j0 < nr ? N - j0 : nr;
        const T* cols[2 * NETBUILD_VEC_BYTES / sizeof(float)];  // at least NR of any T
        bool run = true;  // the panel's columns side by side in B: rows copied whole
        for (npy_intp j = 0; j < w; ++j) {
            cols[j] = col(j0 + j);
            run = run && cols[j] == cols[0] + j;
        }
        for (npy_intp k = 0; k < K; ++k) {
            T* __restrict row = panel + k * nr;
            if (run) memcpy(row, cols[0] + k * sk, sizeof(T) * w);
            else for (npy_intp j = 0; j < w; ++j) row[j] = cols[j][k * sk];
            for (npy_intp j = w; j < nr; ++j) row[j] = (T)0;
        }
    }
}

/* The tile of MR rows: C[i, 0..w) (+)= sum_k A[i, k] panel[k, 0..w), w <= NR, where
   A[i, k] = A[i * ai + k * ak]. */
template <int MR, typename T>
static inline void netbuild_packed_tile(npy_intp K, const T* __restrict A, npy_intp ai, npy_intp ak,
                                        const T* __restrict panel, T* __restrict C, npy_intp ldc,
                                        npy_intp w, bool add) {
    typedef typename netbuild_simd<T>::v V;
    const npy_intp L = NETBUILD_VEC_BYTES / sizeof(T);
    V c0[MR], c1[MR];
    for (int i = 0; i < MR; ++i) {
        c0[i] = V{};
        c1[i] = V{};
    }
    for (npy_intp k = 0; k < K; ++k) {
        const V b0 = *(const V*)(panel + k * 2 * L), b1 = *(const V*)(panel + k * 2 * L + L);
        for (int i = 0; i < MR; ++i) {
            const T a = A[i * ai + k * ak];
            c0[i] += b0 * a;
            c1[i] += b1 * a;
        }
    }
    for (int i = 0; i < MR; ++i) {
        T* c = C + i * ldc;
        if (w == 2 * L) {
            if (add) {
                *(V*)c = *(V*)c + c0[i];
                *(V*)(c + L) = *(V*)(c + L) + c1[i];
            } else {
                *(V*)c = c0[i];
                *(V*)(c + L) = c1[i];
            }
        } else {
            T t[2 * NETBUILD_VEC_BYTES / sizeof(T)];
            memcpy(t, &c0[i], NETBUILD_VEC_BYTES);
            memcpy(t + L, &c1[i], NETBUILD_VEC_BYTES);
            for (npy_intp j = 0; j < w; ++j) c[j] = add ? c[j] + t[j] : t[j];
        }
    }
}

template <int MR, typename T>
static inline void netbuild_packed_rows(npy_intp rows, npy_intp K, const T* A, npy_intp ai,
                                        npy_intp ak, const T* panel, T* C, npy_intp ldc,
                                        npy_intp w, bool add) {
    if (rows == MR) netbuild_packed_tile<MR>(K, A, ai, ak, panel, C, ldc, w, add);
    else if (MR > 1)
        netbuild_packed_rows<(MR > 1 ? MR - 1 : 1)>(rows, K, A, ai, ak, panel, C, ldc, w, add);
}

/* C (M, N; row stride ldc) = A B, or C += A B with add: A (M, K) with A[i, k] = A[i * ai + k * ak]
   (a row-major A: ai = its row stride, ak = 1; a transposed one: ai = 1, ak = its row stride),
   B (K, N) packed by netbuild_pack. */
template <typename T>
static void netbuild_packed_gemm(npy_intp M, npy_intp N, npy_intp K, const T* A, npy_intp ai,
                                 npy_intp ak, const T* P, T* C, npy_intp ldc, bool add) {
    const npy_intp nr = netbuild_nr<T>();
    for (npy_intp j0 = 0; j0 < N; j0 += nr) {
        const npy_intp w = N - j0 < nr ? N - j0 : nr;
        const T* panel = P + (size_t)j0 * K;
        npy_intp i = 0;
        for (; i + NETBUILD_MR <= M; i += NETBUILD_MR)
            netbuild_packed_tile<NETBUILD_MR>(K, A + i * ai, ai, ak, panel, C + i * ldc + j0, ldc,
                                              w, add);
        if (i < M)
            netbuild_packed_rows<NETBUILD_MR - 1>(M - i, K, A + i * ai, ai, ak, panel,
                                                  C + i * ldc + j0, ldc, w, add);
    }
}


/* Part p of n of netbuild_pack(K, N, sk, col, P): its share of the panels, so that a team of
   threads packs one B together. */
template <typename T, typename F>
static void netbuild_pack_part(int p, int n, npy_intp K, npy_intp N, npy_intp sk, F col, T* P) {
    const npy_intp nr = netbuild_nr<T>(), panels = (N + nr - 1) / nr;
    const npy_intp j0 = netbuild_part_start(panels, n, p) * nr;
    npy_intp j1 = netbuild_part_start(panels, n, p + 1) * nr;
    if (j1 > N) j1 = N;
    if (j1 > j0)
        netbuild_pack(K, j1 - j0, sk, [&](npy_intp j) { return col(j0 + j); }, P + (size_t)j0 * K);
}

/* Rows of B that netbuild_packed_tgemm packs at a time (a panel of them, 256 x 32 floats, stays
   in the L1 cache). */
static const npy_intp NETBUILD_KBLOCK = 256;

/* Elements of the scratch netbuild_packed_tgemm needs for nu columns. */
template <typename T> static inline size_t netbuild_tgemm_scratch(npy_intp nu) {
    return netbuild_packed_size<T>(NETBUILD_KBLOCK, nu);
}

/* For each block of NETBUILD_KBLOCK rows of B (rows, nu; row stride ldb; B at its first column),
   first to last: the block packed into pack, then use(k0, kb, pack) (its first row, its rows). */
template <typename T, typename F>
static void netbuild_packed_blocks(npy_intp rows, npy_intp nu, const T* B, npy_intp ldb, T* pack,
                                   F use) {
    for (npy_intp k0 = 0; k0 < rows; k0 += NETBUILD_KBLOCK) {
        const npy_intp kb = rows - k0 < NETBUILD_KBLOCK ? rows - k0 : NETBUILD_KBLOCK;
        const T* Bk = B + k0 * ldb;
        netbuild_pack(kb, nu, ldb, [&](npy_intp j) { return Bk + j; }, pack);
        use(k0, kb, (const T*)pack);
    }
}

/* C (M, nu; row stride ldc) = A^T B, or C += A^T B with add: A (rows, M) and B (rows, nu) with
   row strides lda and ldb (B at its first column). NETBUILD_KBLOCK rows of B are packed at a
   time into pack and their products added in row order: each value is the same sum in the same
   order whatever the columns computed with it. With no rows and no add, C = 0. */
template <typename T>
static void netbuild_packed_tgemm(npy_intp rows, npy_intp M, npy_intp nu, const T* A,
                                  npy_intp lda, const T* B, npy_intp ldb, T* C, npy_intp ldc,
                                  bool add, T* pack) {
    netbuild_packed_blocks(rows, nu, B, ldb, pack, [&](npy_intp k0, npy_intp kb, const T* P) {
        netbuild_packed_gemm<T>(M, nu, kb, A + k0 * lda, 1, lda, P, C, ldc, add || k0 > 0);
    });
    if (!add && rows == 0)
        for (npy_intp i = 0; i < M; ++i) memset(C + i * ldc, 0, sizeof(T) * nu);
}
