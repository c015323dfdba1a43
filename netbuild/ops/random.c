#section support_code
/* Counter-based uniform random numbers (netbuild/ops/random.py). Loaded after netbuild.c. */
static inline npy_uint64 netbuild_splitmix(npy_uint64 z) {
    z += 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}
static inline npy_uint32 netbuild_fmix32(npy_uint32 h) {
    h ^= h >> 16; h *= 0x85EBCA6BU; h ^= h >> 13; h *= 0xC2B2AE35U; return h ^ (h >> 16);
}
static inline npy_uint32 netbuild_bits(npy_uint64 i, npy_uint32 k1, npy_uint32 k2) {
    return netbuild_fmix32(netbuild_fmix32((npy_uint32)i + k1) ^ (npy_uint32)(i >> 32) ^ k2);
}
// Not inlined into PyTensor's generated function, where loops compile as cold code.
__attribute__((noinline)) static void netbuild_uniform_f32(
        float* __restrict__ out, npy_intp n, npy_uint32 k1, npy_uint32 k2) {
    for (npy_intp i = 0; i < n; ++i)
        out[i] = (float)(netbuild_bits((npy_uint64)i, k1, k2) >> 8) * (1.0f / 16777216.0f);
}
__attribute__((noinline)) static void netbuild_uniform_f64(
        double* __restrict__ out, npy_intp n, npy_uint32 k1, npy_uint32 k2) {
    for (npy_intp i = 0; i < n; ++i) {
        double hi = (double)(netbuild_bits((npy_uint64)i, k1, k2) >> 5);
        double lo = (double)(netbuild_bits((npy_uint64)i, k2, k1) >> 6);
        out[i] = (hi * 67108864.0 + lo) * (1.0 / 9007199254740992.0);
    }
}
