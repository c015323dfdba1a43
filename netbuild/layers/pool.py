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
from .base import Layer, LayerError, single
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
    :attr:`rank` and :attr:`mode` (``max`` or ``avg``)."""

    rank: ClassVar[int] = 0
    mode: ClassVar[str] = "max"

    def geometry(self, input_shape: tuple) -> Window:
        check_rank(self, input_shape, self.rank)
        cfg, r = self.config, self.rank
        pool = as_tuple(cfg.get("pool_size", 2), r, "pool_size")
        strides = as_tuple(cfg["strides"], r, "strides") if cfg.get("strides") is not None else pool
        padding = cfg.get("padding", "valid")
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
    """Max or mean over every axis after the channels: ``(C, ...)`` -> ``(C,)``."""

    mode: ClassVar[str] = "max"

    def output_shape(self, input_shapes):
        shape = single(input_shapes)
        if len(shape) < 2:
            raise LayerError(f"a '{self.type}' layer takes inputs of shape (channels, ...) with at "
                             f"least one axis after the channels; received shape {tuple(shape)}",
                             key="inputs")
        return (shape[0],)

    def forward(self, inputs, ctx):
        (x,) = inputs
        if x.ndim < 3:
            raise LayerError(f"a '{self.type}' layer needs an axis after the channels; received an "
                             f"input with {x.ndim - 1} axes besides the batch", key="inputs")
        axes = tuple(range(2, x.ndim))
        return pt.max(x, axis=axes) if self.mode == "max" else pt.mean(x, axis=axes)


class GlobalMaxPool(GlobalPool):
    type = "global_max_pool"
    mode = "max"


class GlobalAvgPool(GlobalPool):
    type = "global_avg_pool"
    mode = "avg"
