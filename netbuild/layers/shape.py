"""Layers that only rearrange values: ``flatten``.

``flatten``: ``(d1, d2, ...)`` -> ``(d1 * d2 * ...,)``.
"""

from __future__ import annotations

import math

from .base import Layer, single


class Flatten(Layer):
    type = "flatten"

    def output_shape(self, input_shapes):
        return (math.prod(single(input_shapes)),)

    def forward(self, inputs, ctx):
        (x,) = inputs
        return x.reshape((x.shape[0], -1))
