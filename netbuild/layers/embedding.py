"""Lookup tables: ``embedding``.

``embedding`` maps integer ids in ``[0, input_dim)`` to rows of ``W`` (``input_dim, output_dim``),
torch ``nn.Embedding.weight``: input ``(T,)`` or ``()`` -> output ``(T, output_dim)`` or
``(output_dim,)``; ``y[..., :] = W[ids[...], :]``. Its input is an integer tensor
(:attr:`Embedding.integer_input`); float ids are truncated to integers.
"""

from __future__ import annotations

from typing import ClassVar

import pytensor
import pytensor.tensor as pt

from ..ops import embedding as embedding_ops
from .base import Initializer, Layer, LayerError, ParamSpec, Regularized, single


class Embedding(Regularized, Layer):
    """Args:
        input_dim: the number of ids (rows of ``W``).
        output_dim: the length of each id's vector.
        embeddings_initializer: of ``W``.
        mask_zero: id 0 is padding: the output carries the mask of a padded sequence (see
            :mod:`netbuild.layers.masking`).
    """

    type = "embedding"
    #: The network feeds this layer integer ids rather than floats.
    integer_input: ClassVar[bool] = True
    input_dim: int
    output_dim: int
    embeddings_initializer: Initializer
    mask_zero: bool

    def passes_mask(self, masked, input_shapes):
        if any(masked):
            raise LayerError("'embedding' reads ids, not a masked sequence of numbers; expected its "
                             "input unmasked (mask_zero makes the mask from id 0)", key="inputs")
        if self.mask_zero and len(input_shapes[0]) != 1:
            raise LayerError(f"mask_zero masks the steps of a sequence of ids; received ids of shape "
                             f"{tuple(input_shapes[0])}, expected (timesteps,)", key="mask_zero")
        return bool(self.mask_zero)

    def output_mask(self, inputs, ctx):
        (ids,) = inputs
        return pt.cast(pt.neq(ids, 0), pytensor.config.floatX)

    def output_shape(self, input_shapes):
        return single(input_shapes) + (self.output_dim,)

    def param_specs(self, input_shapes):
        n, d = self.input_dim, self.output_dim
        return [ParamSpec("W", (n, d), self.embeddings_initializer, fan_in=n, fan_out=d)]

    def forward(self, inputs, ctx):
        (ids,) = inputs
        checked = ids.dtype.startswith(("int", "uint"))  # a network input's, by the data checks
        if not checked:  # another layer's floats, truncated: checked as the graph runs
            ids = pt.cast(ids, "int64")
        W = self.params["W"]
        rows = embedding_ops.gather(W, ids.flatten(), checked)  # its gradient in C (PyTensor's has none)
        return rows.reshape((*[ids.shape[i] for i in range(ids.ndim)], W.shape[1]))
