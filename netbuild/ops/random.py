"""Counter-based uniform random numbers in C, for dropout.

PyTensor's random variables (``UniformRV``) run numpy in Python and thread a generator object
through the graph. :class:`CounterUniform` instead hashes ``(seed, stream, step, element index)``
into each sample: no state but an integer step counter, which the training function advances by
one per batch and a checkpoint saves as a number, so a resumed run draws exactly the same masks.

The hash: SplitMix64 turns ``(seed, stream, step)`` into two 32-bit keys; each element index is
mixed with them by two rounds of MurmurHash3's 32-bit finalizer (vectorizable integer maths),
and its top 24 bits (53 from two draws in float64) become a uniform sample in [0, 1).
"""

from __future__ import annotations

import math

import numpy as np
import pytensor.tensor as pt
from pytensor.gradient import DisconnectedType
from pytensor.graph.basic import Apply, Constant

from . import CCall, NetbuildCOp

_M64 = (1 << 64) - 1


def _splitmix(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def keys(seed: int, stream: int, step: int) -> tuple[int, int]:
    """The two 32-bit keys of one draw (the C code computes the same)."""
    z = _splitmix(_splitmix(_splitmix(seed & _M64) ^ (stream & _M64)) ^ (step & _M64))
    return z & 0xFFFFFFFF, z >> 32


def _fmix32(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def bits(n: int, k1: int, k2: int, offset: int = 0) -> np.ndarray:
    """32 random bits for each of the elements ``offset .. offset + n - 1`` (numpy reference)."""
    i = np.arange(offset, offset + n, dtype=np.uint64)
    lo, hi = (i & np.uint64(0xFFFFFFFF)).astype(np.uint32), (i >> np.uint64(32)).astype(np.uint32)
    with np.errstate(over="ignore"):
        return _fmix32(_fmix32(lo + np.uint32(k1)) ^ hi ^ np.uint32(k2))


def uniform_reference(shape, seed: int, stream: int, step: int, dtype: str) -> np.ndarray:
    """What :class:`CounterUniform` computes, in numpy."""
    n = int(np.prod(shape, dtype=np.int64))
    k1, k2 = keys(seed, stream, step)
    if np.dtype(dtype) == np.float64:
        hi = (bits(n, k1, k2) >> np.uint32(5)).astype(np.float64)
        lo = (bits(n, k2, k1) >> np.uint32(6)).astype(np.float64)
        out = (hi * 67108864.0 + lo) * (1.0 / 9007199254740992.0)
    else:
        out = (bits(n, k1, k2) >> np.uint32(8)).astype(np.float32) * np.float32(1.0 / 16777216.0)
    return out.astype(dtype).reshape(shape)


class CounterUniform(NetbuildCOp):
    """``(shape, seed, step) -> U[0, 1)`` samples of ``shape`` for one ``stream`` (an op
    property: each dropout layer of a network draws from its own)."""

    c_file = "random.c"
    shape_inputs = (0,)

    __props__ = ("dtype", "stream")

    def __init__(self, dtype: str, stream: int):
        self.dtype = str(dtype)
        self.stream = int(stream)

    def make_node(self, shape, seed, step):
        shape = pt.as_tensor_variable(shape, ndim=1).astype("int64")
        if shape.type.shape[0] is None:
            raise TypeError("CounterUniform: the shape must have a known length")
        seed = pt.as_tensor_variable(seed).astype("int64")
        step = pt.as_tensor_variable(step).astype("int64")
        out = pt.tensor(dtype=self.dtype, shape=(None,) * shape.type.shape[0])
        return Apply(self, [shape, seed, step], [out])

    def connection_pattern(self, node):
        return [[False], [False], [False]]

    def grad(self, inputs, output_grads):
        return [DisconnectedType()() for _ in inputs]

    def infer_shape(self, fgraph, node, shapes):
        return [[node.inputs[0][i] for i in range(node.outputs[0].type.ndim)]]

    def jax(self, node):
        """The same draws in JAX's integer arithmetic: the bits :func:`uniform_reference` gives.
        The shape is the node's (a static input of the jitted function)."""
        import jax.numpy as jnp

        stream, dtype = self.stream, self.dtype
        u32, u64 = jnp.uint32, jnp.uint64

        def splitmix(z):
            z = z + u64(0x9E3779B97F4A7C15)
            z = (z ^ (z >> u64(30))) * u64(0xBF58476D1CE4E5B9)
            z = (z ^ (z >> u64(27))) * u64(0x94D049BB133111EB)
            return z ^ (z >> u64(31))

        def fmix32(h):
            h = (h ^ (h >> u32(16))) * u32(0x85EBCA6B)
            h = (h ^ (h >> u32(13))) * u32(0xC2B2AE35)
            return h ^ (h >> u32(16))

        known = node.outputs[0].type.shape
        if isinstance(node.inputs[0], Constant):  # folded from static shapes
            known = tuple(int(d) for d in node.inputs[0].data)

        def counter_uniform(shape, seed, step):
            # static: the output's type knows it, or netbuild.backend made the input a tuple
            dims = known if None not in known else tuple(int(d) for d in shape)
            z = splitmix(splitmix(splitmix(jnp.asarray(seed).astype(u64)) ^ u64(stream))
                         ^ jnp.asarray(step).astype(u64))
            k1, k2 = (z & u64(0xFFFFFFFF)).astype(u32), (z >> u64(32)).astype(u32)
            i = jnp.arange(math.prod(dims), dtype=u64)
            lo, hi = (i & u64(0xFFFFFFFF)).astype(u32), (i >> u64(32)).astype(u32)

            def bits(a, b):
                return fmix32(fmix32(lo + a) ^ hi ^ b)

            if dtype == "float64":
                out = ((bits(k1, k2) >> u32(5)).astype(jnp.float64) * 67108864.0
                       + (bits(k2, k1) >> u32(6)).astype(jnp.float64)) * (1.0 / 9007199254740992.0)
            else:
                out = (bits(k1, k2) >> u32(8)).astype(jnp.float32) * jnp.float32(1.0 / 16777216.0)
            return out.reshape(dims)

        return counter_uniform

    def perform(self, node, inputs, outputs):
        shape, seed, step = inputs
        outputs[0][0] = uniform_reference(tuple(int(s) for s in shape), int(seed), self.stream,
                                          int(step), self.dtype)

    def c_code(self, node, name, inputs, outputs, sub):
        """The shape from its input, the output, the keys, then the draws without the GIL
        (:class:`netbuild.ops.CCall`)."""
        shape, seed, step = inputs
        (out,) = outputs
        ndim = node.outputs[0].type.ndim
        if self.dtype not in ("float32", "float64"):
            raise NotImplementedError(self.dtype)
        c = CCall(self, node, name, sub)
        c.line(f"npy_intp dims_[{max(ndim, 1)}] = {{0}};")
        c.line(f"for (int d_ = 0; d_ < {ndim}; ++d_) "
               f"dims_[d_] = ((npy_int64*)PyArray_GETPTR1({shape}, d_))[0];")
        c.check(" && ".join([f"dims_[{d}] >= 0" for d in range(ndim)]) or "true", "negative shape")
        data = c.output(out, ", ".join(f"dims_[{d}]" for d in range(ndim)) or "0", ndim)
        c.line("npy_uint64 z_ = 0;")
        seed_, step_ = (f"(npy_uint64)((npy_int64*)PyArray_DATA({v}))[0]" for v in (seed, step))
        c.when_ok(f"z_ = netbuild_splitmix({seed_}); "
                  f"z_ = netbuild_splitmix(z_ ^ (npy_uint64){self.stream}ULL); "
                  f"z_ = netbuild_splitmix(z_ ^ {step_});")
        fill = "netbuild_uniform_f32" if self.dtype == "float32" else "netbuild_uniform_f64"
        c.run(f"{fill}({data}, PyArray_SIZE({out}), (npy_uint32)z_, (npy_uint32)(z_ >> 32))")
        return c.code()
