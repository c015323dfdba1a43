#section support_code
/* The glue every netbuild op shares (loaded before the op's own .c file; see
   netbuild/ops/__init__.py): threads and the fixed cut of a batch into slices, outputs, a scratch
   buffer kept by the node, and shape checks that name what they received. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* exp. float: branch-free (Cephes' expf, within 2 ulp), which g++ vectorizes where libm's expf
   is a call per value (with -fno-trapping-math, which lets it compute both sides of a select;
   no floorf); double: libm's. NaN stays NaN. */
static inline float netbuild_exp(float x) {
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
static inline double netbuild_exp(double x) { return exp(x); }

/* sum of term(j) for j < n, in double over 8 lanes (j % 8) folded in a fixed order, then the
   tail: vectorized, and the same bits wherever a row lies and whichever thread sums it (the row
   sums of softmax and layer_norm). */
template <typename F> static inline double netbuild_lane_sum(npy_intp n, F term) {
    double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    npy_intp j = 0;
    for (; j + 8 <= n; j += 8)
        for (int l = 0; l < 8; ++l) acc[l] += term(j + l);
    double s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (; j < n; ++j) s += term(j);
    return s;
}

/* Threads (OpenMP). netbuild_threads(): how many a parallel loop may use (netbuild's thread count,
   netbuild/threads.py); netbuild_thread(): the caller's index among them. */
#ifdef _OPENMP
#include <omp.h>
static inline int netbuild_threads(void) { int n = omp_get_max_threads(); return n > 0 ? n : 1; }
static inline int netbuild_thread(void) { return omp_get_thread_num(); }
#else
static inline int netbuild_threads(void) { return 1; }
static inline int netbuild_thread(void) { return 0; }
#endif

/* The most slices a batch is cut into: more threads than this gain nothing on a weight
   gradient. */
#define NETBUILD_SLICES 16

/* A fixed cut of n items (a batch) into at most NETBUILD_SLICES slices of consecutive items, a
   function of n alone, so that a sum over slices taken in slice order has the same bits whatever
   the number of threads. */
static inline npy_intp netbuild_slices(npy_intp n) { return n < NETBUILD_SLICES ? n : NETBUILD_SLICES; }
static inline npy_intp netbuild_slice_start(npy_intp n, npy_intp s) {
    npy_intp k = netbuild_slices(n);
    return k ? s * n / k : 0;
}

/* A cut of n items into one part per thread (at most `threads`, each of at least `least` items):
   for loops whose bits do not depend on how the items are grouped, or that say so. */
static inline int netbuild_parts(npy_intp n, int threads, npy_intp least) {
    npy_intp most = least > 0 ? n / least : n;
    if (most < 1) most = 1;
    return (int)(threads < most ? threads : most);
}
static inline npy_intp netbuild_part_start(npy_intp n, int parts, int p) {
    return parts ? (npy_intp)p * n / parts : 0;
}

/* f(start, stop) for each part of a cut of n items into netbuild_parts(n, threads, least) parts,
   the parts on threads of their own. */
template <typename F> static void netbuild_for_parts(npy_intp n, npy_intp least, F f) {
    const int parts = netbuild_parts(n, netbuild_threads(), least);
#pragma omp parallel for num_threads(parts) schedule(static, 1) if (parts > 1)
    for (int p = 0; p < parts; ++p)
        f(netbuild_part_start(n, parts, p), netbuild_part_start(n, parts, p + 1));
}

/* A team of threads that wait for one another at every step of a loop (a recurrent op's
   timesteps): wait(n) returns once all n have called it. It spins: between two balanced steps a
   thread waits microseconds, where OpenMP's own barrier under OMP_WAIT_POLICY=passive puts it to
   sleep and wakes it tens of microseconds later. A wait that lasts (a thread descheduled, a CPU
   quota spent) yields the core, then sleeps 50 us at a time instead of burning it. */
#include <atomic>
#include <sched.h>
#include <time.h>
static inline void netbuild_pause(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}
struct netbuild_team {
    alignas(64) std::atomic<int> arrived{0};
    alignas(64) std::atomic<int> generation{0};
    void wait(int n) {
        if (n <= 1) return;
        const int gen = generation.load(std::memory_order_acquire);
        if (arrived.fetch_add(1, std::memory_order_acq_rel) == n - 1) {
            arrived.store(0, std::memory_order_relaxed);
            generation.fetch_add(1, std::memory_order_release);
            return;
        }
        for (int spins = 0; generation.load(std::memory_order_acquire) == gen; ++spins) {
            if (spins < 4096) {
                netbuild_pause();
            } else if (spins < 4096 + 256) {
                sched_yield();
            } else {
                struct timespec pause = {0, 50000};
                nanosleep(&pause, NULL);
            }
        }
    }
};

/* f(p, n, team) on each of n threads (p = 0..n-1; n <= parts, whatever OpenMP grants). */
template <typename F> static void netbuild_team_run(int parts, F f) {
    netbuild_team team;
#pragma omp parallel num_threads(parts) if (parts > 1)
    {
#ifdef _OPENMP
        f(omp_get_thread_num(), omp_get_num_threads(), team);
#else
        f(0, 1, team);
#endif
    }
}

/* *out as a C-contiguous, writeable array of dims and typenum: kept when it already is one (the
   node's output from the previous call), else newly allocated. */
static int netbuild_output(PyArrayObject** out, int nd, const npy_intp* dims, int typenum) {
    if (*out && PyArray_NDIM(*out) == nd && PyArray_TYPE(*out) == typenum
        && PyArray_IS_C_CONTIGUOUS(*out) && PyArray_ISWRITEABLE(*out)) {
        bool same = true;
        for (int i = 0; i < nd; ++i) same = same && PyArray_DIMS(*out)[i] == dims[i];
        if (same) return 0;
    }
    Py_XDECREF(*out);
    *out = (PyArrayObject*)PyArray_EMPTY(nd, (npy_intp*)dims, typenum, 0);
    return *out ? 0 : -1;
}

/* A scratch buffer of at least n bytes, kept by the node between calls (its pointer and size are
   the node's scratch_<name>, scratch_size_<name>: see support_code_struct below). */
static void* netbuild_scratch(void** buf, size_t* size, size_t n) {
    if (!*buf || n > *size) {
        free(*buf);
        *buf = malloc(n ? n : 1);
        *size = *buf ? n : 0;
        if (!*buf) PyErr_NoMemory();
    }
    return *buf;
}

/* "(2, 3)" or "(5,)" into buf */
static void netbuild_format_dims(char* buf, size_t size, int nd, const npy_intp* dims) {
    size_t k = snprintf(buf, size, "(");
    for (int i = 0; i < nd && k < size; ++i)
        k += snprintf(buf + k, size - k, i ? ", %ld" : "%ld", (long)dims[i]);
    if (k < size) snprintf(buf + k, size - k, nd == 1 ? ",)" : ")");
}

/* Check an input's shape: 0, or -1 with a ValueError
   "Op: name has shape (..); expected (what) = (..)". */
static int netbuild_check_shape(PyArrayObject* a, const char* op, const char* name,
                                const char* what, int nd, const npy_intp* dims) {
    bool ok = PyArray_NDIM(a) == nd;
    for (int i = 0; ok && i < nd; ++i) ok = PyArray_DIMS(a)[i] == dims[i];
    if (ok) return 0;
    char got[200], want[200];
    netbuild_format_dims(got, sizeof got, PyArray_NDIM(a), PyArray_DIMS(a));
    netbuild_format_dims(want, sizeof want, nd, dims);
    PyErr_Format(PyExc_ValueError, "%s: %s has shape %s; expected (%s) = %s", op, name, got, what,
                 want);
    return -1;
}

#section support_code_struct
void* APPLY_SPECIFIC(scratch);
size_t APPLY_SPECIFIC(scratch_size);

#section init_code_struct
APPLY_SPECIFIC(scratch) = NULL;
APPLY_SPECIFIC(scratch_size) = 0;

#section cleanup_code_struct
free(APPLY_SPECIFIC(scratch));
APPLY_SPECIFIC(scratch) = NULL;
APPLY_SPECIFIC(scratch_size) = 0;
