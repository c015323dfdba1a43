#section support_code
/* The fused optimizer steps of netbuild/ops/update.py. Loaded after netbuild.c. */
#include <cmath>

/* A function of its own, not inlined: g++ honours __restrict__ on parameters, and does not treat
   the loop as cold code (inlined after PyTensor's error checks, it was compiled for size: scalar,
   5x slower). */
template <typename T>
__attribute__((noinline)) static void netbuild_adam_span(
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

/* Every element on its own: parts of at least ADAM_PER_PART elements on threads of their own
   (a 784 x 512 weight is 6 MB of p, m, v and g to read and 5 to write: worth a second core),
   the same bits on any number of threads. */
static const npy_intp ADAM_PER_PART = 65536;
template <typename T>
static void netbuild_adam_step(T* P, T* M, T* V, const T* G, npy_intp n, T step, T isb, T keep,
                               T b1, T b2, T eps) {
    netbuild_for_parts(n, ADAM_PER_PART, [&](npy_intp i0, npy_intp i1) {
        netbuild_adam_span(P + i0, M + i0, V + i0, G + i0, i1 - i0, step, isb, keep, b1, b2, eps);
    });
}

/* p -= lr d, the step of SGD with momentum (d its velocity). */
template <typename T>
__attribute__((noinline)) static void netbuild_descent_span(T* __restrict__ P, const T* __restrict__ D,
                                                            npy_intp n, T lr) {
    for (npy_intp i = 0; i < n; ++i) P[i] -= lr * D[i];
}

/* Parts of at least DESCENT_PER_PART elements on threads of their own (3 streams of memory per
   element, against Adam's 7: a part needs twice Adam's elements to be worth a thread; a 512 x 256
   weight is one part); the same bits on any number of threads. */
static const npy_intp DESCENT_PER_PART = 131072;
template <typename T>
static void netbuild_descent_step(T* P, const T* D, npy_intp n, T lr) {
    netbuild_for_parts(n, DESCENT_PER_PART, [&](npy_intp i0, npy_intp i1) {
        netbuild_descent_span(P + i0, D + i0, i1 - i0, lr);
    });
}
