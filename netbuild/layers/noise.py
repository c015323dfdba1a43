"""Regularizing noise: ``dropout``.

``dropout`` zeroes each input with probability ``rate`` during training and scales the rest by
``1 / (1 - rate)`` (inverted dropout), so evaluation is the identity.
"""

from __future__ import annotations

from .base import Layer, single


class Dropout(Layer):
    """Args:
        rate: the fraction of inputs set to zero during training.
    """

    type = "dropout"
    mask_policy = "keep"
    rate: float

    def output_shape(self, input_shapes):
        return single(input_shapes)

    def forward(self, inputs, ctx):
        (x,) = inputs
        rate = float(self.rate)
        if not ctx.training or rate == 0.0:
            return x
        keep = 1.0 - rate
        mask = ctx.uniform(x.shape, x.dtype) < keep
        return x * mask.astype(x.dtype) * (1.0 / keep)
