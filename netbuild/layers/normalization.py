"""Normalization layers: ``batch_norm`` and ``layer_norm``.

Both compute ``y = gamma * (x - mu) / sqrt(sigma2 + epsilon) + beta``; they differ in what the
statistics ``mu`` and ``sigma2`` (the biased variance) are taken over. ``gamma`` (``scale``) and
``beta`` (``center``) are optional.

``batch_norm`` (torch ``BatchNorm1d``/``BatchNorm2d``, channels first): one statistic per channel,
the first example axis, taken over the batch and every other axis. Input ``(C,)``, ``(C, L)`` or
``(C, H, W)``; shape unchanged; parameters ``gamma``, ``beta``, ``mean``, ``var`` all ``(C,)``.
In training it normalizes with the batch statistics and updates the running ones (Keras
momentum, torch's ``running_mean``/``running_var``, ``n`` values per channel)::

    mean <- momentum * mean + (1 - momentum) * mu
    var  <- momentum * var  + (1 - momentum) * sigma2 * n / (n - 1)

In evaluation it normalizes with ``mean`` and ``var``.

``layer_norm`` (torch ``LayerNorm(features)``): statistics of each example over the last axis.
Input ``(..., F)``; shape unchanged; ``gamma``, ``beta`` of shape ``(F,)``.
"""

from __future__ import annotations

import pytensor.tensor as pt

from ..ops import normalization as norm_ops
from .base import Layer, LayerError, ParamSpec, single


class _Normalization(Layer):
    """Shared by both: shape unchanged, ``y = x_hat * gamma + beta``.

    Args:
        epsilon: added to the variance before its square root.
        center: learn ``beta``.
        scale: learn ``gamma``.
    """

    epsilon: float
    center: bool
    scale: bool

    def _affine_specs(self, features: int) -> list[ParamSpec]:
        """``gamma`` (ones) and ``beta`` (zeros) of shape ``(features,)`` as ``scale`` and
        ``center`` ask."""
        specs = []
        if self.scale:
            specs.append(ParamSpec("gamma", (features,), "ones", regularize=False))
        if self.center:
            specs.append(ParamSpec("beta", (features,), "zeros", regularize=False))
        return specs

    def output_shape(self, input_shapes):
        shape = single(input_shapes)
        if not shape:
            raise LayerError(f"'{self.type}' normalizes over an axis; received a scalar "
                             "input shape (); expected at least one axis")
        return shape

    def _affine(self, y, broadcast=lambda v: v):
        """``y * gamma + beta``, the per-feature vectors laid out against ``y`` by ``broadcast``."""
        if "gamma" in self.params:
            y = y * broadcast(self.params["gamma"])
        if "beta" in self.params:
            y = y + broadcast(self.params["beta"])
        return y


class BatchNorm(_Normalization):
    """Args:
        momentum: ``running = momentum * running + (1 - momentum) * batch statistic``.
    """

    type = "batch_norm"
    momentum: float

    def param_specs(self, input_shapes):
        channels = single(input_shapes)[0]
        return self._affine_specs(channels) + [
            ParamSpec("mean", (channels,), "zeros", trainable=False, regularize=False),
            ParamSpec("var", (channels,), "ones", trainable=False, regularize=False),
        ]

    def forward(self, inputs, ctx):
        (x,) = inputs
        axes = (0,) + tuple(range(2, x.ndim))

        def per_channel(v):
            return v.dimshuffle(["x", 0] + ["x"] * (x.ndim - 2))

        epsilon = self.epsilon
        running_mean, running_var = self.params["mean"], self.params["var"]
        if ctx.training:
            mean = x.mean(axis=axes)
            centered = x - per_channel(mean)
            var = pt.square(centered).mean(axis=axes)
            momentum = self.momentum
            n = (x.size // x.shape[1]).astype(x.dtype)
            unbiased = var * n / pt.maximum(n - 1, 1)  # a single value per channel: variance 0
            ctx.updates[running_mean] = (momentum * running_mean
                                         + (1 - momentum) * mean).astype(running_mean.dtype)
            ctx.updates[running_var] = (momentum * running_var
                                        + (1 - momentum) * unbiased).astype(running_var.dtype)
        else:
            centered = x - per_channel(running_mean)
            var = running_var
        return self._affine(centered / per_channel(pt.sqrt(var + epsilon)), per_channel)


class LayerNorm(_Normalization):
    type = "layer_norm"
    mask_policy = "keep"  # each step's statistics are its own

    def param_specs(self, input_shapes):
        return self._affine_specs(single(input_shapes)[-1])

    def forward(self, inputs, ctx):
        (x,) = inputs
        features = x.shape[-1]
        gamma = self.params.get("gamma", pt.ones((features,), dtype=x.dtype))
        beta = self.params.get("beta", pt.zeros((features,), dtype=x.dtype))
        return norm_ops.layer_norm(x, gamma, beta, self.epsilon)  # one C op, and its gradient
