"""PyTensor ops that netbuild writes itself, in C, where a composition of PyTensor's own ops is
too slow: :mod:`netbuild.ops.update` (fused optimizer steps) and :mod:`netbuild.ops.recurrent`
(the recurrent layers' loop over timesteps and its gradient), :mod:`netbuild.ops.conv`
(convolution as im2col + BLAS gemm, and its gradients) and :mod:`netbuild.ops.pool` (max and
average pooling, and their gradient)."""
