"""PyTensor ops that netbuild writes itself, in C, where a composition of PyTensor's own ops is
too slow: :mod:`netbuild.ops.update` (fused optimizer steps), :mod:`netbuild.ops.random`
(counter-based uniform draws for dropout), :mod:`netbuild.ops.recurrent` (the recurrent layers'
loop over timesteps and its gradient), :mod:`netbuild.ops.conv` (convolution as im2col + BLAS
gemm, and its gradients) and :mod:`netbuild.ops.pool` (max and average pooling, and their
gradient).

Every op here derives from :class:`NetbuildCOp`.
"""

from __future__ import annotations

from pytensor.link.c.op import COp
from pytensor.tensor.blas import ldflags
from pytensor.tensor.blas_headers import blas_header_text


class NetbuildCOp(COp):
    """Base of netbuild's C ops (PyTensor's ``COp``). Their hot loops live in ``noinline``
    functions with ``__restrict__`` parameters: inlined into PyTensor's generated function, g++
    compiled them as cold code, unvectorized."""


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


class BlasCOp(NetbuildCOp):
    """A netbuild op whose C code calls BLAS (``sgemm_``/``dgemm_``), linked the way PyTensor's
    own Gemm ops are (``blas__ldflags``, see :mod:`netbuild.backend`), with a scratch buffer
    ``scratch_<name>`` of ``scratch_size_<name>`` bytes that the node keeps between calls
    (grown by ``netbuild_scratch``, :data:`SCRATCH`).
    Subclasses give :attr:`kernels` (their C support code) and :attr:`extra_compile_args`."""

    kernels: tuple[str, ...] = ()
    extra_compile_args: tuple[str, ...] = ()

    def c_support_code(self, **kwargs):
        return [blas_header_text(), SCRATCH, *self.kernels]

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
