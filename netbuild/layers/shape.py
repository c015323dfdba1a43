"""Layers that only rearrange values: ``flatten``, ``reshape``.

``flatten``: ``(d1, d2, ...)`` -> ``(d1 * d2 * ...,)``.

``reshape``: ``(d1, d2, ...)`` -> ``shape`` (row-major order, like numpy), where one entry of
``shape`` may be ``-1``: the size that keeps ``d1 * d2 * ...`` values.
"""

from __future__ import annotations

import math

from .base import Layer, LayerError, single


class Flatten(Layer):
    type = "flatten"

    def output_shape(self, input_shapes):
        return (math.prod(single(input_shapes)),)

    def forward(self, inputs, ctx):
        (x,) = inputs
        return x.reshape((x.shape[0], -1))


class Reshape(Layer):
    type = "reshape"

    def output_shape(self, input_shapes):
        shape = tuple(self.config["shape"])
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
        return x.reshape((x.shape[0], *self.config["shape"]))
