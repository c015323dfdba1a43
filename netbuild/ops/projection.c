#section support_code
/* The products Y = X W and dW = X^T dY (netbuild/ops/projection.py), on netbuild's packed
   products (packed.c, loaded before this). They were the recurrent layers' input projection
   X W_ih and its weight gradient, which the recurrent ops now compute themselves with the same
   products (netbuild/ops/recurrent.c); the layers' graphs run nbproj_dot for the input's
   gradient dX = dP W_ih^T.

   Why not BLAS: OpenBLAS gained little from a second core at the bench LSTM's projection
   (3200 x 32 by 32 x 512, and 32 x 3200 by 3200 x 512 for its gradient): in PyTensor's per-op
   profile of its training step, 0.77 and 0.81 ms on one thread, 0.64 and 0.64 ms on two. Both
   products here add each value's terms in one fixed order whatever the rows or columns computed
   with it, so their bits do not depend on the number of threads. */

/* Rows of Y per thread, at least; columns of dW per thread, at least (a panel of floats). */
static const npy_intp NBPROJ_ROWS_PER_PART = 64;
static const npy_intp NBPROJ_COLUMNS_PER_PART = 32;

/* Scratch elements of nbproj_dot: W packed. */
template <typename T> static inline size_t nbproj_dot_scratch(npy_intp K, npy_intp M) {
    return netbuild_packed_size<T>(K, M);
}

/* Y (N, M) = X (N, K) W (K, M): the team packs W together into packed (nbproj_dot_scratch),
   then each thread multiplies its rows of X. */
template <typename T>
static void nbproj_dot(npy_intp N, npy_intp K, npy_intp M, const T* X, const T* W, T* Y,
                       T* packed) {
    const int parts = netbuild_parts(N, netbuild_threads(), NBPROJ_ROWS_PER_PART);
    netbuild_team_run(parts, [&](int p, int n, netbuild_team& team) {
        netbuild_pack_part(p, n, K, M, M, [&](npy_intp j) { return W + j; }, packed);
        team.wait(n);
        const npy_intp r0 = netbuild_part_start(N, n, p), r1 = netbuild_part_start(N, n, p + 1);
        if (r1 > r0)
            netbuild_packed_gemm<T>(r1 - r0, M, K, X + r0 * K, K, 1, packed, Y + r0 * M, M, false);
    });
}

static inline int nbproj_column_parts(npy_intp M) {
    return netbuild_parts(M, netbuild_threads(), NBPROJ_COLUMNS_PER_PART);
}

/* Scratch elements of nbproj_weight_grad: each part's block of packed rows of dY, part p's
   NETBUILD_KBLOCK * (c0 + p * NR) elements in. */
template <typename T> static inline size_t nbproj_grad_scratch(npy_intp M) {
    return (size_t)NETBUILD_KBLOCK * (size_t)(M + nbproj_column_parts(M) * netbuild_nr<T>());
}

/* dW (K, M) = X^T dY for X (N, K) and dY (N, M): each thread its columns of dW
   (netbuild_packed_tgemm over all N rows, a block at a time). */
template <typename T>
static void nbproj_weight_grad(npy_intp N, npy_intp K, npy_intp M, const T* X, const T* dY,
                               T* dW, T* scratch) {
    const int parts = nbproj_column_parts(M);
    netbuild_team_run(parts, [&](int p, int n, netbuild_team&) {
        const npy_intp c0 = netbuild_part_start(M, n, p), c1 = netbuild_part_start(M, n, p + 1);
        T* pack = scratch + (size_t)NETBUILD_KBLOCK * (size_t)(c0 + p * netbuild_nr<T>());
        if (c1 > c0)
            netbuild_packed_tgemm<T>(N, K, c1 - c0, X, K, dY + c0, M, dW + c0, M, false, pack);
    });
}
