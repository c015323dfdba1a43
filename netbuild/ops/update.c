#section support_code
/* The fused optimizer steps of netbuild/ops/update.py. Loaded after netbuild.c. */
#include <cmath>

/* A function of its own, not inlined: g++ honours __restrict__ on parameters, and does not treat
   the loop as cold code (inlined after PyTensor's error checks, it was compiled for size: scalar,
   5x slower). */
template <typename T>
__attribute__((noinline)) static void netbuild_adam_step(
        T* __restrict__ P, T* __restrict__ M, T* __restrict__ V, const T* __restrict__ G,
        npy_intp n, T step, T isb, T keep, T b1, T b2, T eps) {
    const T c1 = (T)1 - b1, c2 = (T)1 - b2;
    for (npy_intp i = 0; i < n; ++i) {
        const T gi = G[i];
        const T mi = b1 * M[i] + c1 * gi;
        const T vi = b2 * V[i] + c2 * gi * gi;
        M[i] = mi;
        V[i] = vi;
        P[i] = keep * P[i] - step * mi / (std::sqrt(vi) * isb + eps);
    }
}
