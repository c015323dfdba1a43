"""Resampling layers: ``upsampling1d`` and ``upsampling2d``. No parameters.

``upsampling1d``: ``(C, L)`` -> ``(C, L * size)``; ``upsampling2d``: ``(C, H, W)`` ->
``(C, H * sh, W * sw)``. ``nearest`` repeats each value ``size`` times along each axis;
``linear`` (1-d) and ``bilinear`` (2-d) interpolate as ``torch.nn.Upsample(mode=...,
align_corners=False)``: output position ``i`` reads the input at ``(i + 0.5) / size - 0.5``
(clamped to the first value), between its two neighbours, weighted by distance; separable, so
the 2-d interpolation is one axis after the other.

The graph: nearest is a broadcast and a reshape; the interpolations are one matrix product per
axis with a constant ``(L * size, L)`` matrix of the weights (:func:`interpolation_matrix`), the
same numbers the ONNX export multiplies by.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytensor.tensor as pt

from .base import Ints, Layer, single
from .conv import as_tuple, check_rank


def interpolation_matrix(length: int, size: int) -> np.ndarray:
    """``A`` (length * size, length): ``A @ x`` is ``x`` linearly upsampled ``size`` times, as
    torch with ``align_corners=False``."""
    out = length * size
    A = np.zeros((out, length))
    src = np.maximum((np.arange(out) + 0.5) / size - 0.5, 0.0)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, length - 1)
    w = src - lo
    np.add.at(A, (np.arange(out), lo), 1.0 - w)
    np.add.at(A, (np.arange(out), hi), w)
    return A


def along(x, A: np.ndarray, axis: int):
    """``A`` applied to ``x``'s axis ``axis``: that axis moved last, one matrix product, moved back."""
    order = [i for i in range(x.ndim) if i != axis] + [axis]
    moved = x.dimshuffle(*order)
    lead = [moved.shape[i] for i in range(x.ndim - 1)]
    y = pt.dot(moved.reshape((-1, A.shape[1])), pt.constant(A.T.astype(x.dtype)))
    y = y.reshape((*lead, A.shape[0]))
    return y.dimshuffle(*[order.index(i) for i in range(x.ndim)])


class Upsampling(Layer):
    """Args:
        size: the factor, an int or one per spatial axis.
        interpolation: ``nearest``, or ``linear`` (1-d) / ``bilinear`` (2-d).
    """

    rank: ClassVar[int] = 1
    size: Ints
    interpolation: str

    def factors(self) -> tuple[int, ...]:
        return as_tuple(self.size, self.rank, "size")

    def output_shape(self, input_shapes):
        shape = single(input_shapes)
        check_rank(self, shape, self.rank)
        self._spatial = tuple(shape[1:])
        return (shape[0],) + tuple(n * f for n, f in zip(shape[1:], self.factors()))

    def forward(self, inputs, ctx):
        (x,) = inputs
        factors = self.factors()
        if self.interpolation == "nearest":
            # (N, C, H, W) -> (N, C, H, 1, W, 1) broadcast to (N, C, H, sh, W, sw) -> (N, C, H*sh, W*sw)
            pattern = [0, 1]
            for i in range(self.rank):
                pattern += [2 + i, "x"]
            expanded = x.dimshuffle(*pattern)
            shape = [x.shape[0], x.shape[1]]
            for i, f in enumerate(factors):
                shape += [x.shape[2 + i], f]
            tiled = pt.alloc(expanded, *shape)
            return tiled.reshape((x.shape[0], x.shape[1],
                                  *[x.shape[2 + i] * f for i, f in enumerate(factors)]))
        y = x
        for i, A in enumerate(self.matrices()):
            y = along(y, A, 2 + i)
        return y

    def matrices(self) -> list[np.ndarray]:
        """Each spatial axis's interpolation matrix (linear and bilinear)."""
        return [interpolation_matrix(n, f) for n, f in zip(self._spatial, self.factors())]


class Upsampling1D(Upsampling):
    type = "upsampling1d"
    rank = 1


class Upsampling2D(Upsampling):
    type = "upsampling2d"
    rank = 2
