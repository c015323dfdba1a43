"""Padded sequences: ``masking``.

``masking``: ``(T, F)`` -> ``(T, F)``, and a mask: a step whose every feature equals
``mask_value`` is padding (as Keras's ``Masking``); its values are set to 0. The mask travels with
the sequence through the layers that work step by step (``dense``, ``dropout``, ``activation``,
``layer_norm``, ``positional_embedding``, ``add``, ``multiply``, ``concatenate`` on the features,
``multi_head_attention`` as queries) and is honoured by ``simple_rnn``, ``lstm`` and ``gru`` (a
padded step leaves the state as it was: the final state is the last real step's, and a reverse
direction starts at the last real step), by the global pools over time (padded steps count for
nothing) and by ``multi_head_attention`` (padded keys get no weight). ``embedding`` with
``mask_zero`` makes the same mask from id 0.
"""

from __future__ import annotations

import pytensor.tensor as pt

from .base import Layer, LayerError, single


def sequence_shape(layer: Layer, shape: tuple) -> None:
    if len(shape) < 2:
        raise LayerError(f"'{layer.type}' masks the steps of sequences: expected an input of shape "
                         f"(timesteps, features, ...); received shape {tuple(shape)}", key="inputs")


class Masking(Layer):
    """Args:
        mask_value: the value every feature of a padded step holds.
    """

    type = "masking"
    mask_value: float

    def output_shape(self, input_shapes):
        shape = single(input_shapes)
        sequence_shape(self, shape)
        return shape

    def passes_mask(self, masked, input_shapes):
        return True  # it makes one

    def output_mask(self, inputs, ctx):
        (x,) = inputs
        real = pt.neq(x, self.mask_value)
        if x.ndim > 2:
            real = pt.any(real, axis=tuple(range(2, x.ndim)))
        mask = pt.cast(real, x.dtype)
        given = ctx.mask(x)
        return mask if given is None else mask * given

    def forward(self, inputs, ctx):
        (x,) = inputs
        mask = self.output_mask(inputs, ctx)
        return x * mask.dimshuffle(0, 1, *(["x"] * (x.ndim - 2)))
