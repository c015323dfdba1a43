#section support_code
/* The embedding's lookup and its gradient (netbuild/ops/embedding.py). Loaded after netbuild.c. */

/* The position of the first id outside [0, N), or -1 when every id is in it. */
static npy_intp nbemb_first_bad(const npy_int64* ids, npy_intp n, npy_intp N) {
    for (npy_intp i = 0; i < n; ++i)
        if (ids[i] < 0 || ids[i] >= N) return i;
    return -1;
}

/* Rows copied per part: a thread of its own for at least this many values. */
static const npy_intp NBEMB_VALUES_PER_PART = 16384;

/* y[i, :] = W[ids[i], :] for i < n (W: N x D); the ids are in range. Parts of rows on threads. */
template <typename T>
static void nbemb_gather(const T* W, npy_intp D, const npy_int64* ids, npy_intp n, T* y) {
    const npy_intp least = D > 0 ? (NBEMB_VALUES_PER_PART + D - 1) / D : n;
    netbuild_for_parts(n, least, [&](npy_intp i0, npy_intp i1) {
        for (npy_intp i = i0; i < i1; ++i) memcpy(y + i * D, W + ids[i] * D, sizeof(T) * D);
    });
}

/* dW (N x D) = 0, then dW[ids[i], :] += dy[i, :] for i = 0, 1, ..., n - 1 in that order: the same
   bits on any number of threads, since the threads share the columns (each owns a range of them
   in every row), not the ids. */
template <typename T>
static void nbemb_scatter(npy_intp N, npy_intp D, const npy_int64* ids, npy_intp n, const T* dy,
                          T* dW) {
    const npy_intp per_column = N + n;  // values touched per column
    const npy_intp least = per_column > 0 ? (NBEMB_VALUES_PER_PART + per_column - 1) / per_column : D;
    netbuild_for_parts(D, least, [&](npy_intp k0, npy_intp k1) {
        const npy_intp w = k1 - k0;
        for (npy_intp r = 0; r < N; ++r) memset(dW + r * D + k0, 0, sizeof(T) * w);
        for (npy_intp i = 0; i < n; ++i) {
            T* __restrict to = dW + ids[i] * D + k0;
            const T* __restrict from = dy + i * D + k0;
            for (npy_intp k = 0; k < w; ++k) to[k] += from[k];
        }
    });
}
