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


class NetbuildCOp(COp):
    """Base of netbuild's C ops (PyTensor's ``COp``). Their hot loops live in ``noinline``
    functions with ``__restrict__`` parameters: inlined into PyTensor's generated function, g++
    compiled them as cold code, unvectorized."""
