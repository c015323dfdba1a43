"""The ``activation`` layer: applies an activation function on its own; shape unchanged."""

from __future__ import annotations

from .base import ActivatedLayer, single


class Activation(ActivatedLayer):
    type = "activation"
    mask_policy = "keep"

    def output_shape(self, input_shapes):
        return single(input_shapes)

    def linear(self, inputs, ctx):
        return inputs[0]
