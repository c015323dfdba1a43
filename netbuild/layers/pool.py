"""Pooling layers: ``max_pool1d``, ``max_pool2d``, ``avg_pool1d``, ``avg_pool2d``,
``global_max_pool``, ``global_avg_pool``. No parameters.

``max_pool1d``/``avg_pool1d``: ``(C, L)`` -> ``(C, L_out)``; ``max_pool2d``/``avg_pool2d``:
``(C, H, W)`` -> ``(C, H_out, W_out)``. Each channel on its own, over the window ``R(i, j)`` of
``pool_size`` ``(ph, pw)`` at ``(i*sh, j*sw)`` of the padded input::

    max: y[c, i, j] = max_{(u, v) in R(i, j)} x[c, u, v]
    avg: y[c, i, j] = mean_{(u, v) in R(i, j), inside the input} x[c, u, v]

``strides`` default to ``pool_size``. ``padding`` is ``valid`` (``L_out = floor((L - p) / s) + 1``)
or ``same`` (as Keras/TensorFlow: ``L_out = ceil(L / s)``, an odd extra pad at the end). Padding
never takes part: it is ``-inf`` for max pooling, and average pooling divides by the number of
input elements in each window, not by ``prod(pool_size)``.

``global_max_pool``/``global_avg_pool``: ``(C, ...)`` -> ``(C,)``, over every axis after the
channels.

The graph is one op of netbuild's own, :class:`netbuild.ops.pool.Pool` (a C loop over the
windows; its gradient another, which sends max pooling's gradient to the first maximum of each
window, as PyTorch does). The same pooling from PyTensor's own ops stays as :func:`_graph_pool`,
the reference the tests compare the op with.
"""

from __future__ import annotations

import itertools
from typing import ClassVar

import numpy as np
import pytensor.tensor as pt

from ..ops import pool as ops_pool
from .base import Ints, Layer, LayerError, single
from .conv import (
    Window,
    as_tuple,
    check_rank,
    pad_spatial,
    static_shape,
    window,
    window_slices,
)


def avg_pool_counts(win: Window) -> np.ndarray:
    """The number of input (not padding) elements in each window: shape ``win.out``."""
    counts = np.ones((), dtype=np.int64)
    for n, k, s, (before, _), m in zip(win.spatial, win.kernel, win.strides, win.pads, win.out):
        start = np.arange(m) * s - before
        axis = np.minimum(start + k, n) - np.maximum(start, 0)
        counts = np.multiply.outer(counts, axis)
    return counts


def _graph_pool(x, mode: str, win: Window, channels: int):
    """The same pooling from PyTensor's own ops (the reference the C op is tested against): for
    each offset in the window, the input values at that offset in every window, stacked and
    reduced. Windows that tile the unpadded input (``strides == pool_size``, the rest cropped)
    take these from a reshape (``[:, :, :, u, :, v]`` of ``(N, C, o1, p1, o2, p2)``); the others
    from one strided slice of the padded input per offset."""
    pad_value = -np.inf if mode == "max" else 0.0
    if win.strides == win.kernel and not any(b or a for b, a in win.pads):
        tiled = tuple(o * k for o, k in zip(win.out, win.kernel))
        if tiled != win.spatial:
            x = x[(slice(None), slice(None)) + tuple(slice(0, t) for t in tiled)]
        split = [d for o, k in zip(win.out, win.kernel) for d in (o, k)]
        tiles = x.reshape((x.shape[0], channels, *split))
        parts = [tiles[(slice(None), slice(None)) + sum(((slice(None), u) for u in offset), ())]
                 for offset in itertools.product(*(range(k) for k in win.kernel))]
    else:
        parts = window_slices(pad_spatial(x, win, pad_value, first=2), win, first=2)
    stack = pt.stack(parts, axis=0)  # (K, N, C, *out)
    y = pt.max(stack, axis=0) if mode == "max" else pt.sum(stack, axis=0)
    if mode == "max":
        return y
    counts = avg_pool_counts(win)
    if np.all(counts == win.size):
        return y * np.asarray(1.0 / win.size, dtype=x.dtype)
    return y * pt.constant((1.0 / counts).astype(x.dtype)[None, None])


class Pool(Layer):
    """Max or average pooling over ``rank`` spatial axes; subclasses set :attr:`type`,
    :attr:`rank` and :attr:`mode` (``max`` or ``avg``).

    Args:
        pool_size: the window, an int or one per spatial axis.
        strides: the step between windows (default: ``pool_size``).
        padding: ``valid`` or ``same``.
    """

    rank: ClassVar[int] = 0
    mode: ClassVar[str] = "max"
    pool_size: Ints
    strides: Ints | None
    padding: str

    def geometry(self, input_shape: tuple) -> Window:
        check_rank(self, input_shape, self.rank)
        r = self.rank
        pool = as_tuple(self.pool_size, r, "pool_size")
        strides = as_tuple(self.strides, r, "strides") if self.strides is not None else pool
        padding = self.padding
        if padding not in ("valid", "same"):
            raise LayerError(f"padding {padding!r} is not a pooling padding; expected 'valid' or "
                             "'same'", key="padding")
        return window(input_shape[1:], pool, strides, (padding,) * r, kernel_key="pool_size")

    def output_shape(self, input_shapes):
        shape = single(input_shapes)
        self._input_shape = shape
        return (shape[0],) + self.geometry(shape).out

    def forward(self, inputs, ctx):
        (x,) = inputs
        win = self.geometry(static_shape(self, x))
        return ops_pool.pool(x, self.mode, win.kernel, win.strides, win.pads)


class MaxPool1D(Pool):
    type = "max_pool1d"
    rank = 1
    mode = "max"


class MaxPool2D(Pool):
    type = "max_pool2d"
    rank = 2
    mode = "max"


class AvgPool1D(Pool):
    type = "avg_pool1d"
    rank = 1
    mode = "avg"


class AvgPool2D(Pool):
    type = "avg_pool2d"
    rank = 2
    mode = "avg"


class GlobalPool(Layer):
    """Max or mean over every axis after the channels: ``(C, ...)`` -> ``(C,)``; or over
    ``axis``.

    Args:
        axis: the axes to pool over, counting the batch axis as 0 (an int or a list; negative
            from the last). Not given: every axis after the first. ``axis: 1`` pools a
            ``(timesteps, units)`` sequence over time.
    """

    mode: ClassVar[str] = "max"
    axis: Ints | None

    def pooled(self, shape: tuple) -> tuple[int, ...]:
        """The pooled axes as indices into the axes of an example of ``shape``."""
        rank = len(shape)
        if self.axis is None:
            if rank < 2:
                raise LayerError(f"a '{self.type}' layer takes inputs of shape (channels, ...) with at "
                                 f"least one axis after the channels; received shape {tuple(shape)}",
                                 key="inputs")
            return tuple(range(1, rank))
        given = [self.axis] if isinstance(self.axis, int) else list(self.axis)
        out = []
        for a in given:
            index = a - 1 if a > 0 else rank + a
            if a == 0 or not 0 <= index < rank:
                batch = " (the batch axis)" if a == 0 else ""
                raise LayerError(f"received axis {a}{batch} for inputs with {rank} axes besides the "
                                 f"batch axis; expected 1 to {rank} or -{rank} to -1", key="axis")
            if index in out:
                raise LayerError(f"axis {given} names axis {a} twice; expected each axis once", key="axis")
            out.append(index)
        if len(out) == rank:
            raise LayerError(f"axis {given} pools every axis of the input; expected at least one to "
                             "remain", key="axis")
        return tuple(sorted(out))

    def output_shape(self, input_shapes):
        shape = single(input_shapes)
        pooled = self.pooled(shape)
        return tuple(d for i, d in enumerate(shape) if i not in pooled)

    # -- masks: pooled over time, padded steps count for nothing ------------------------------
    def passes_mask(self, masked, input_shapes):
        """The mask ends when the time axis (the first) is pooled, else passes on."""
        return any(masked) and 0 not in self.pooled(tuple(input_shapes[0]))

    def output_mask(self, inputs, ctx):
        return ctx.mask(inputs[0])

    def forward(self, inputs, ctx):
        (x,) = inputs
        pooled = self.pooled(tuple(x.type.shape[1:]))
        axes = tuple(1 + i for i in pooled)
        mask = ctx.mask(x)
        if mask is None or 0 not in pooled:
            return pt.max(x, axis=axes) if self.mode == "max" else pt.mean(x, axis=axes)
        m = mask.dimshuffle(0, 1, *(["x"] * (x.ndim - 2)))
        if self.mode == "max":  # a sequence without a real step pools to 0
            low = pt.switch(m > 0, x, np.asarray(-np.inf, dtype=x.dtype))
            best = pt.max(low, axis=axes)
            return pt.switch(pt.isinf(best), np.asarray(0.0, dtype=x.dtype), best)
        total = pt.sum(x * m, axis=axes)
        count = pt.sum(pt.ones_like(x) * m, axis=axes)
        return total / pt.maximum(count, 1.0)


class GlobalMaxPool(GlobalPool):
    type = "global_max_pool"
    mode = "max"


class GlobalAvgPool(GlobalPool):
    type = "global_avg_pool"
    mode = "avg"
