#section support_code
/* Matrix products on netbuild's threads (netbuild/ops/dense.py): Z = alpha A B + beta Z, each
   thread calling single-threaded BLAS on its own rows or columns of Z. Loaded after netbuild.c
   and blas.c. */

/* Multiply-adds of every part, at least: smaller parts gain little from a thread, and OpenBLAS
   computes products of at most 100^3 with other kernels ("small matrix" kernels, which add in
   another order), so that a part that small could differ in its bits from the whole. */
static const double NBDENSE_PART_MNK = 2097152.0;
/* Where parts start: whole SIMD panels of rows or columns of Z. */
static const npy_intp NBDENSE_ALIGN = 16;

/* Rows (or columns) s0..s1 of part p of `parts`, in whole panels of a span of `span`. */
static inline void nbdense_part(npy_intp span, int parts, int p, npy_intp* s0, npy_intp* s1) {
    const npy_intp panels = (span + NBDENSE_ALIGN - 1) / NBDENSE_ALIGN;
    *s0 = netbuild_part_start(panels, parts, p) * NBDENSE_ALIGN;
    *s1 = netbuild_part_start(panels, parts, p + 1) * NBDENSE_ALIGN;
    if (*s0 > span) *s0 = span;
    if (*s1 > span) *s1 = span;
}

/* The parts a span of rows (or columns) is cut into, at most `threads`: as many as leave every
   part, the last (clipped) one included, at least NBDENSE_PART_MNK multiply-adds (`per` each
   row or column). */
static inline int nbdense_parts(npy_intp span, double per, int threads) {
    const npy_intp panels = (span + NBDENSE_ALIGN - 1) / NBDENSE_ALIGN;
    int parts = threads < panels ? threads : (int)panels;
    for (; parts > 1; --parts) {
        npy_intp smallest = span;
        for (int p = 0; p < parts; ++p) {
            npy_intp s0, s1;
            nbdense_part(span, parts, p, &s0, &s1);
            if (s1 - s0 < smallest) smallest = s1 - s0;
        }
        if ((double)smallest * per >= NBDENSE_PART_MNK) break;
    }
    return parts < 1 ? 1 : parts;
}

/* A (N, K) with element strides (rs, cs), seen by column-major BLAS as A^T: 'N' with leading
   dimension rs when its rows are contiguous, 'T' with cs when its columns are; 0 if neither
   (the caller copies it). */
static inline char nbdense_trans(npy_intp rows, npy_intp cols, npy_intp rs, npy_intp cs,
                                 int* ld) {
    if (cs == 1 && rs >= (cols > 1 ? cols : 1) && rs <= 0x7fffffff) { *ld = (int)rs; return 'N'; }
    if (rs == 1 && cs >= (rows > 1 ? rows : 1) && cs <= 0x7fffffff) { *ld = (int)cs; return 'T'; }
    if (rows <= 1 && cs == 1) { *ld = (int)(cols > 1 ? cols : 1); return 'N'; }
    if (cols <= 1 && rs == 1) { *ld = (int)(rows > 1 ? rows : 1); return 'T'; }
    return 0;
}

/* Z (N, M, C-contiguous) = alpha A (N, K) B (K, M) + beta Z, A and B as nbdense_trans sees
   them. In column-major terms Z^T = B^T A^T: gemm(tb, ta, M, N, K, ...). The larger of N and M
   is cut into one part per thread (nbdense_parts). */
template <typename T>
static void nbdense_product(npy_intp N, npy_intp K, npy_intp M, T alpha, const T* A, char ta,
                            int lda, const T* B, char tb, int ldb, T beta, T* Z) {
    if (N <= 0 || M <= 0) return;
    const bool rows = N >= M;  // cut Z's rows (A's rows), else its columns (B's columns)
    const npy_intp span = rows ? N : M;
    const double per = (double)(rows ? M : N) * (double)(K > 0 ? K : 1);
    const int parts = nbdense_parts(span, per, netbuild_threads());
    netbuild_serial_blas serial(netbuild_threads());  // OpenBLAS's own threads: none
    if (parts <= 1) {
        netbuild_gemm(tb, ta, (int)M, (int)N, (int)K, alpha, B, ldb, A, lda, beta, Z, (int)M);
        return;
    }
#pragma omp parallel for num_threads(parts) schedule(static, 1)
    for (int p = 0; p < parts; ++p) {
        npy_intp s0, s1;
        nbdense_part(span, parts, p, &s0, &s1);
        if (s1 <= s0) continue;
        if (rows) {  // rows s0..s1 of Z and of A
            const T* a = ta == 'N' ? A + (size_t)s0 * lda : A + s0;
            netbuild_gemm(tb, ta, (int)M, (int)(s1 - s0), (int)K, alpha, B, ldb, a, lda, beta,
                          Z + (size_t)s0 * M, (int)M);
        } else {  // columns s0..s1 of Z and of B
            const T* b = tb == 'N' ? B + s0 : B + (size_t)s0 * ldb;
            netbuild_gemm(tb, ta, (int)(s1 - s0), (int)N, (int)K, alpha, b, ldb, A, lda, beta,
                          Z + s0, (int)M);
        }
    }
}

/* Z[s] (N, M, C-contiguous) = A[s] (N, K) B[s] (K, M) for s < S, A[s] at A + s * sa (and B[s]
   at B + s * sb) read as nbdense_trans sees one of them: each thread its own products, each one
   single-threaded BLAS call, on threads of at least NBDENSE_PART_MNK multiply-adds each. */
template <typename T>
static void nbdense_batched(npy_intp S, npy_intp N, npy_intp K, npy_intp M, const T* A,
                            npy_intp sa, char ta, int lda, const T* B, npy_intp sb, char tb,
                            int ldb, T* Z) {
    if (S <= 0 || N <= 0 || M <= 0) return;
    const double mnk = (double)S * (double)N * (double)M * (double)(K > 0 ? K : 1);
    const double most = mnk / NBDENSE_PART_MNK;
    const int threads = most < netbuild_threads() ? (most < 1 ? 1 : (int)most) : netbuild_threads();
    const int parts = netbuild_parts(S, threads, 1);
    netbuild_serial_blas serial(netbuild_threads());
#pragma omp parallel for num_threads(parts) schedule(static) if (parts > 1)
    for (npy_intp s = 0; s < S; ++s)
        netbuild_gemm(tb, ta, (int)M, (int)N, (int)K, (T)1, B + s * sb, ldb, A + s * sa, lda,
                      (T)0, Z + s * N * M, (int)M);
}
