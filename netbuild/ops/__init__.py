"""PyTensor ops that netbuild writes itself, in C, where a composition of PyTensor's own ops is
too slow: :mod:`netbuild.ops.update` (fused optimizer steps) and :mod:`netbuild.ops.recurrent`
(the recurrent layers' loop over timesteps and its gradient)."""
