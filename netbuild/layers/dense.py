"""Fully connected layers: ``dense``.

``dense`` acts on the last axis: input ``(..., inputs)`` -> output ``(..., units)``;
``y = activation(x @ W + b)`` with ``W`` of shape ``(inputs, units)`` and ``b`` of ``(units,)``.
"""

from __future__ import annotations

import pytensor.tensor as pt

from .base import ActivatedLayer, Initializer, ParamSpec, Regularized, single


class Dense(Regularized, ActivatedLayer):
    """Args:
        units: output features.
        use_bias: add ``b``.
        kernel_initializer: of ``W``.
        bias_initializer: of ``b``.
    """

    type = "dense"
    mask_policy = "keep"  # step by step on a sequence
    units: int
    use_bias: bool
    kernel_initializer: Initializer
    bias_initializer: Initializer

    def output_shape(self, input_shapes):
        shape = single(input_shapes)
        return shape[:-1] + (self.units,)

    def param_specs(self, input_shapes):
        n_in = single(input_shapes)[-1]
        units = self.units
        specs = [ParamSpec("W", (n_in, units), self.kernel_initializer, fan_in=n_in, fan_out=units)]
        if self.use_bias:
            specs.append(ParamSpec("b", (units,), self.bias_initializer, fan_in=n_in, fan_out=units,
                                   regularize=False))
        return specs

    def linear(self, inputs, ctx):
        (x,) = inputs
        W = self.params["W"]
        if x.ndim == 2:
            z = pt.dot(x, W)
        else:  # fold the leading axes into one matrix product
            lead = x.shape[:-1]
            z = pt.dot(x.reshape((-1, x.shape[-1])), W).reshape((*[lead[i] for i in range(x.ndim - 1)], W.shape[1]))
        if "b" in self.params:
            z = z + self.params["b"]
        return z
