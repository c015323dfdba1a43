"""PyTensor ops that netbuild writes itself, in C, where a composition of PyTensor's own ops is
too slow: :mod:`netbuild.ops.update` (fused optimizer steps), :mod:`netbuild.ops.random`
(counter-based uniform draws for dropout), :mod:`netbuild.ops.recurrent` (the recurrent layers'
loop over timesteps and its gradient), :mod:`netbuild.ops.conv` (convolution as im2col + BLAS
gemm, and its gradients), :mod:`netbuild.ops.pool` (max and average pooling, and their
gradient) and :mod:`netbuild.ops.softmax` (softmax and softmax cross-entropy, and their
gradients).

Every op here derives from :class:`NetbuildCOp`.
"""

from __future__ import annotations

from pytensor.link.c.op import COp
from pytensor.tensor.blas import ldflags
from pytensor.tensor.blas_headers import blas_header_text

#: C: ``*out`` as a C-contiguous, writeable array of ``dims`` and ``typenum``: kept when it
#: already is one (the node's output from the previous call), else newly allocated.
OUTPUT = r"""
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
"""

#: The most slices a batch is cut into (see :data:`THREADS`): more threads than this gain nothing
#: on a weight gradient.
SLICES = 16

#: C: threads (OpenMP). ``netbuild_threads()``: how many a parallel loop may use (netbuild's thread
#: count, :mod:`netbuild.threads`); ``netbuild_thread()``: the caller's index among them.
#: ``netbuild_slices(n)`` and ``netbuild_slice_start(n, s)``: a fixed cut of ``n`` items (a batch)
#: into at most :data:`SLICES` slices of consecutive items, a function of ``n`` alone, so that a sum
#: over slices taken in slice order has the same bits whatever the number of threads.
THREADS = r"""
#ifdef _OPENMP
#include <omp.h>
static inline int netbuild_threads(void) { int n = omp_get_max_threads(); return n > 0 ? n : 1; }
static inline int netbuild_thread(void) { return omp_get_thread_num(); }
#else
static inline int netbuild_threads(void) { return 1; }
static inline int netbuild_thread(void) { return 0; }
#endif
static inline npy_intp netbuild_slices(npy_intp n) { return n < %(slices)d ? n : %(slices)d; }
static inline npy_intp netbuild_slice_start(npy_intp n, npy_intp s) {
    npy_intp k = netbuild_slices(n);
    return k ? s * n / k : 0;
}
""" % {"slices": SLICES}

#: C: a scratch buffer of at least ``n`` bytes, kept by the node between calls.
SCRATCH = r"""
static void* netbuild_scratch(void** buf, size_t* size, size_t n) {
    if (n > *size) {
        free(*buf);
        *buf = malloc(n ? n : 1);
        *size = *buf ? n : 0;
        if (!*buf) PyErr_NoMemory();
    }
    return *buf;
}
"""


#: C: ``netbuild_gemm``, BLAS ``?gemm_`` for float and double (column-major, as Fortran sees
#: arrays): ``c (m, n) = alpha op(a) op(b) + beta c``, safe for empty sizes (``k = 0`` scales
#: ``c`` by ``beta``, as the reference BLAS does).
GEMM = r"""
#include <string.h>

// OpenBLAS's thread count, if the BLAS is OpenBLAS (weak: another BLAS leaves these NULL).
extern "C" {
void openblas_set_num_threads(int) __attribute__((weak));
int openblas_get_num_threads(void) __attribute__((weak));
}

// BLAS on its caller's thread while it lives: inside netbuild's parallel loops each thread calls
// gemm on its own slice, and OpenBLAS's own threads (for PyTensor's large products) would queue
// the calls one behind another (OpenBLAS warns "Detect OpenMP Loop" and runs 6x slower).
struct netbuild_serial_blas {
    int previous;
    explicit netbuild_serial_blas(int threads) : previous(0) {
        if (threads > 1 && openblas_set_num_threads && openblas_get_num_threads) {
            int n = openblas_get_num_threads();
            if (n > 1) {
                previous = n;
                openblas_set_num_threads(1);
            }
        }
    }
    ~netbuild_serial_blas() {
        if (previous) openblas_set_num_threads(previous);
    }
};

template <typename T>
static inline void netbuild_gemm_empty_k(int m, int n, T beta, T* c, int ldc) {
    for (int j = 0; j < n; ++j)
        for (int i = 0; i < m; ++i) c[(size_t)j * ldc + i] = beta == (T)0 ? (T)0 : beta * c[(size_t)j * ldc + i];
}
static inline void netbuild_gemm(char ta, char tb, int m, int n, int k, float alpha,
                                 const float* a, int lda, const float* b, int ldb, float beta,
                                 float* c, int ldc) {
    if (m <= 0 || n <= 0) return;
    if (k <= 0) { netbuild_gemm_empty_k(m, n, beta, c, ldc); return; }
    sgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}
static inline void netbuild_gemm(char ta, char tb, int m, int n, int k, double alpha,
                                 const double* a, int lda, const double* b, int ldb, double beta,
                                 double* c, int ldc) {
    if (m <= 0 || n <= 0) return;
    if (k <= 0) { netbuild_gemm_empty_k(m, n, beta, c, ldc); return; }
    dgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}
"""


class NetbuildCOp(COp):
    """Base of netbuild's C ops (PyTensor's ``COp``). Their hot loops live in ``noinline``
    functions with ``__restrict__`` parameters: inlined into PyTensor's generated function, g++
    compiled them as cold code, unvectorized.

    Subclasses give :attr:`kernels`, their C support code; :data:`OUTPUT` comes with it."""

    kernels: tuple[str, ...] = ()

    def c_support_code(self, **kwargs):
        return [THREADS, OUTPUT, *self.kernels]

    def c_compile_args(self, **kwargs):
        return ["-fopenmp"]

    def c_libraries(self, **kwargs):
        return ["gomp"]


class BlasCOp(NetbuildCOp):
    """A netbuild op whose C code calls BLAS (``netbuild_gemm``, :data:`GEMM`), linked the way
    PyTensor's own Gemm ops are (``blas__ldflags``, see :mod:`netbuild.backend`), with a scratch buffer
    ``scratch_<name>`` of ``scratch_size_<name>`` bytes that the node keeps between calls
    (grown by ``netbuild_scratch``, :data:`SCRATCH`).
    Subclasses give :attr:`kernels` (their C support code) and :attr:`extra_compile_args`."""

    extra_compile_args: tuple[str, ...] = ()

    def c_support_code(self, **kwargs):
        return [blas_header_text(), THREADS, SCRATCH, OUTPUT, GEMM, *self.kernels]

    def c_libraries(self, **kwargs):
        return [*ldflags(), *super().c_libraries()]

    def c_compile_args(self, **kwargs):
        return [*ldflags(libs=False, flags=True), *super().c_compile_args(), *self.extra_compile_args]

    def c_lib_dirs(self, **kwargs):
        return ldflags(libs=False, libs_dir=True)

    def c_header_dirs(self, **kwargs):
        return ldflags(libs=False, include_dir=True)

    def c_support_code_struct(self, node, name):
        return f"void* scratch_{name}; size_t scratch_size_{name};"

    def c_init_code_struct(self, node, name, sub):
        return f"scratch_{name} = NULL; scratch_size_{name} = 0;"

    def c_cleanup_code_struct(self, node, name):
        return f"free(scratch_{name}); scratch_{name} = NULL; scratch_size_{name} = 0;"
