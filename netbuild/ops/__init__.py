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
        return [OUTPUT, *self.kernels]


class BlasCOp(NetbuildCOp):
    """A netbuild op whose C code calls BLAS (``netbuild_gemm``, :data:`GEMM`), linked the way
    PyTensor's own Gemm ops are (``blas__ldflags``, see :mod:`netbuild.backend`), with a scratch buffer
    ``scratch_<name>`` of ``scratch_size_<name>`` bytes that the node keeps between calls
    (grown by ``netbuild_scratch``, :data:`SCRATCH`).
    Subclasses give :attr:`kernels` (their C support code) and :attr:`extra_compile_args`."""

    extra_compile_args: tuple[str, ...] = ()

    def c_support_code(self, **kwargs):
        return [blas_header_text(), SCRATCH, OUTPUT, GEMM, *self.kernels]

    def c_libraries(self, **kwargs):
        return ldflags()

    def c_compile_args(self, **kwargs):
        return [*ldflags(libs=False, flags=True), *self.extra_compile_args]

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
