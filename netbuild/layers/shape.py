"""Layers that only move, add or drop values: ``flatten``, ``reshape``, ``permute``,
``zero_padding1d``/``zero_padding2d`` and ``cropping1d``/``cropping2d``.

``flatten``: ``(d1, d2, ...)`` -> ``(d1 * d2 * ...,)``.

``reshape``: ``(d1, d2, ...)`` -> ``shape`` (row-major order, like numpy), where one entry of
``shape`` may be ``-1``: the size that keeps ``d1 * d2 * ...`` values.

``permute``: the example axes in the order ``dims`` (numbered from 1, the batch axis excluded, as
Keras's ``Permute``): ``(T, F)`` with ``dims: [2, 1]`` -> ``(F, T)``.

``zero_padding1d``: ``(C, L)`` -> ``(C, b + L + a)``, zeros before and after;
``zero_padding2d``: ``(C, H, W)`` -> ``(C, t + H + b, l + W + r)``. ``cropping1d``/``cropping2d``
remove as many values instead. Their amounts: an int (every side), one int per spatial axis
(both of its sides), or ``[before, after]`` per axis (2-d: ``[[top, bottom], [left, right]]``;
1-d: ``[before, after]``).
"""

from __future__ import annotations

import math
from typing import ClassVar

import pytensor.tensor as pt

from .base import Layer, LayerError, Sides, single
from .conv import check_rank


class Flatten(Layer):
    type = "flatten"

    def output_shape(self, input_shapes):
        return (math.prod(single(input_shapes)),)

    def forward(self, inputs, ctx):
        (x,) = inputs
        return x.reshape((x.shape[0], -1))


class Reshape(Layer):
    """Args:
        shape: the output shape (no batch axis); one entry may be -1.
    """

    type = "reshape"
    shape: list[int]

    def output_shape(self, input_shapes):
        shape = tuple(self.shape)
        source = single(input_shapes)
        size = math.prod(source)
        if any(d < 1 and d != -1 for d in shape) or shape.count(-1) > 1:
            raise LayerError(f"received shape {list(shape)}; expected sizes of at least 1 and at "
                             "most one -1", key="shape")
        known = math.prod(d for d in shape if d != -1)
        if -1 in shape and size % known == 0:
            return tuple(size // known if d == -1 else d for d in shape)
        if -1 not in shape and known == size:
            return shape
        wanted = f"a multiple of {known}" if -1 in shape else str(known)
        raise LayerError(f"cannot reshape {source} ({size} values) to {list(shape)} ({wanted} "
                         f"values); expected a shape of {size} values", key="shape")

    def forward(self, inputs, ctx):
        (x,) = inputs
        return x.reshape((x.shape[0], *self.shape))


class Permute(Layer):
    """Args:
        dims: the example axes in their new order, numbered from 1 (the batch axis excluded).
    """

    type = "permute"
    dims: list[int]

    def output_shape(self, input_shapes):
        shape = single(input_shapes)
        if sorted(self.dims) != list(range(1, len(shape) + 1)):
            raise LayerError(f"dims {list(self.dims)} is not an order of the input's axes 1..{len(shape)} "
                             f"(input shape {shape}); expected each of 1..{len(shape)} once", key="dims")
        return tuple(shape[d - 1] for d in self.dims)

    def forward(self, inputs, ctx):
        (x,) = inputs
        return x.dimshuffle(0, *self.dims)


def side_amounts(value: Sides, rank: int, key: str) -> tuple[tuple[int, int], ...]:
    """``(before, after)`` per spatial axis from an int, one int per axis, or a pair per axis
    (a 1-d layer's pair is ``[before, after]``)."""
    if isinstance(value, int):
        return ((value, value),) * rank
    if rank == 1 and len(value) == 2 and all(isinstance(v, int) for v in value):
        return ((int(value[0]), int(value[1])),)
    if len(value) != rank:
        raise LayerError(f"{key} {value} has {len(value)} entries; expected an int, or one entry per "
                         f"spatial axis ({rank})", key=key)
    return tuple((int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1])) for v in value)


class _Sides(Layer):
    """Zeros added to (or values removed from) each side of the spatial axes."""

    rank: ClassVar[int] = 1
    #: +1 pads, -1 crops.
    sign: ClassVar[int] = 1
    key: ClassVar[str] = "padding"

    def sides(self) -> tuple[tuple[int, int], ...]:
        return side_amounts(getattr(self, self.key), self.rank, self.key)

    def output_shape(self, input_shapes):
        shape = single(input_shapes)
        check_rank(self, shape, self.rank)
        out = [shape[0]]
        for n, (b, a) in zip(shape[1:], self.sides()):
            m = n + self.sign * (b + a)
            if m < 1:
                raise LayerError(f"{self.key} {getattr(self, self.key)} removes {b + a} of {n} values "
                                 f"(input shape {shape}); expected to leave at least one", key=self.key)
            out.append(m)
        return tuple(out)

    def forward(self, inputs, ctx):
        (x,) = inputs
        index = [slice(None), slice(None)]
        if self.sign < 0:
            for (b, a) in self.sides():
                index.append(slice(b, -a if a else None))
            return x[tuple(index)]
        shape = [x.shape[0], x.shape[1]]
        for i, (b, a) in enumerate(self.sides()):
            n = x.shape[2 + i]
            shape.append(n + b + a)
            index.append(slice(b, b + n))
        return pt.set_subtensor(pt.zeros(shape, dtype=x.dtype)[tuple(index)], x)


class ZeroPadding1D(_Sides):
    """Args:
        padding: zeros on both sides (an int) or ``[before, after]``.
    """

    type = "zero_padding1d"
    rank = 1
    padding: Sides


class ZeroPadding2D(_Sides):
    """Args:
        padding: zeros on every side (an int), per axis (``[height, width]``) or per side
            (``[[top, bottom], [left, right]]``).
    """

    type = "zero_padding2d"
    rank = 2
    padding: Sides


class Cropping1D(_Sides):
    """Args:
        cropping: values removed from both sides (an int) or ``[before, after]``.
    """

    type = "cropping1d"
    rank = 1
    sign = -1
    key = "cropping"
    cropping: Sides


class Cropping2D(_Sides):
    """Args:
        cropping: values removed from every side (an int), per axis (``[height, width]``) or per
            side (``[[top, bottom], [left, right]]``).
    """

    type = "cropping2d"
    rank = 2
    sign = -1
    key = "cropping"
    cropping: Sides
