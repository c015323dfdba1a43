"""Fully connected layers: ``dense``.

``dense`` acts on the last axis: input ``(..., inputs)`` -> output ``(..., units)``;
``y = activation(x @ W + b)`` with ``W`` of shape ``(inputs, units)`` and ``b`` of ``(units,)``.
"""

from __future__ import annotations

import pytensor.tensor as pt

from .base import ActivatedLayer, ParamSpec, single


class Dense(ActivatedLayer):
    type = "dense"

    def output_shape(self, input_shapes):
        shape = single(input_shapes)
        return shape[:-1] + (self.config["units"],)

    def param_specs(self, input_shapes):
        n_in = single(input_shapes)[-1]
        units = self.config["units"]
        specs = [ParamSpec("W", (n_in, units), self.config.get("kernel_initializer", "glorot_uniform"),
                           fan_in=n_in, fan_out=units)]
        if self.config.get("use_bias", True):
            specs.append(ParamSpec("b", (units,), self.config.get("bias_initializer", "zeros"),
                                   fan_in=n_in, fan_out=units, regularize=False))
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
