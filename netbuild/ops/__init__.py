"""PyTensor ops that netbuild writes itself, in C, where a composition of PyTensor's own ops is
too slow: :mod:`netbuild.ops.update` (fused optimizer steps), :mod:`netbuild.ops.random`
(counter-based uniform draws for dropout), :mod:`netbuild.ops.recurrent` (the recurrent layers'
loop over timesteps and its gradient), :mod:`netbuild.ops.conv` (convolution as im2col + BLAS
gemm, and its gradients) and :mod:`netbuild.ops.pool` (max and average pooling, and their
gradient).

Every op here derives from :class:`NetbuildCOp`: g++ compiles it at ``-O3`` (its hot loops are
written to vectorize) even though netbuild compiles PyTensor's own ops at ``-O1``
(:data:`netbuild.backend.GENERIC_OPTIMIZATION`), which halves a cold compile.
"""

from __future__ import annotations

from pytensor.link.c.op import COp


class NetbuildCOp(COp):
    """Base of netbuild's C ops: compiled at PyTensor's default ``-O3``."""

    def c_no_compile_args(self, **kwargs):
        from .. import backend

        return list(backend.generic_optimization_flags())
