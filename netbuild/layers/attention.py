"""Attention: ``multi_head_attention`` and ``positional_embedding``.

``multi_head_attention``: queries ``(Tq, Eq)`` and keys/values ``(Tk, Ekv)`` (one input: the same
sequence, self-attention; ``inputs: [q, kv]``: cross-attention) -> ``(Tq, Eq)``. With ``H``
heads of ``dk`` (``key_dim``) and ``dv`` (``value_dim``) features, as ``torch.nn.MultiheadAttention``
(batch first)::

    Q = q W_q^T + b_q,  K = kv W_k^T + b_k,  V = kv W_v^T + b_v      (split into H heads)
    A = softmax(Q K^T / sqrt(dk))          (causal: key j > query i gets no weight)
    y = concat_heads(A V) W_o^T + b_o

``W_q (H*dk, Eq)``, ``W_k (H*dk, Ekv)``, ``W_v (H*dv, Ekv)``, ``W_o (Eq, H*dv)`` and the biases:
torch's ``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight`` (``in_proj_weight`` is the three
stacked) and ``out_proj``. Dropout on ``A`` during training.

``positional_embedding``: ``(T, E)`` -> ``(T, E)``, each position's vector added: a learned
``W (max_length, E)`` (its first ``T`` rows), or the fixed sinusoids of "Attention is all you
need" (``PE[t, 2i] = sin(t / 10000^(2i/E))``, ``PE[t, 2i+1] = cos(...)``).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytensor.tensor as pt

from .. import activations
from .base import Initializer, Layer, LayerError, ParamSpec, Regularized, single


def _sequence(layer: Layer, shape: tuple, what: str) -> tuple[int, int]:
    if len(shape) != 2:
        raise LayerError(f"'{layer.type}' reads sequences: expected {what} of shape (timesteps, "
                         f"features); received shape {tuple(shape)}", key="inputs")
    return int(shape[0]), int(shape[1])


class MultiHeadAttention(Regularized, Layer):
    """Args:
        num_heads: attention heads.
        key_dim: features per head of queries and keys (default: the queries' features divided
            by num_heads).
        value_dim: features per head of values (default: key_dim).
        dropout: the fraction of attention weights dropped during training.
        use_bias: add the projections' biases.
        causal: a query attends only to keys at its position or before.
        kernel_initializer: of the projections.
        bias_initializer: of their biases.
    """

    type = "multi_head_attention"
    max_inputs: ClassVar[int] = 2
    num_heads: int
    key_dim: int | None
    value_dim: int | None
    dropout: float
    use_bias: bool
    causal: bool
    kernel_initializer: Initializer
    bias_initializer: Initializer

    # -- masks: padded keys get no weight; the queries' mask passes on -----------------------------
    def passes_mask(self, masked, input_shapes):
        return bool(masked[0])

    def output_mask(self, inputs, ctx):
        return ctx.mask(inputs[0])

    def dims(self, input_shapes) -> tuple[int, int, int, int, int, int]:
        """``(Tq, Eq, Tk, Ekv, dk, dv)``."""
        tq, eq = _sequence(self, input_shapes[0], "queries")
        tk, ekv = _sequence(self, input_shapes[-1], "keys and values")
        heads = int(self.num_heads)
        dk = self.key_dim
        if dk is None:
            if eq % heads:
                raise LayerError(f"the queries' {eq} features do not split into {heads} heads; "
                                 f"expected num_heads to divide {eq}, or a key_dim", key="num_heads")
            dk = eq // heads
        dv = self.value_dim or dk
        return tq, eq, tk, ekv, int(dk), int(dv)

    def output_shape(self, input_shapes):
        tq, eq, *_ = self.dims(input_shapes)
        self._input_shapes = [tuple(s) for s in input_shapes]
        return (tq, eq)

    def param_specs(self, input_shapes):
        _, eq, _, ekv, dk, dv = self.dims(input_shapes)
        h = int(self.num_heads)
        init, bias = self.kernel_initializer, self.bias_initializer
        specs = [ParamSpec("W_q", (h * dk, eq), init, fan_in=eq, fan_out=h * dk),
                 ParamSpec("W_k", (h * dk, ekv), init, fan_in=ekv, fan_out=h * dk),
                 ParamSpec("W_v", (h * dv, ekv), init, fan_in=ekv, fan_out=h * dv),
                 ParamSpec("W_o", (eq, h * dv), init, fan_in=h * dv, fan_out=eq)]
        if self.use_bias:
            specs += [ParamSpec(f"b_{k}", (n,), bias, regularize=False)
                      for k, n in (("q", h * dk), ("k", h * dk), ("v", h * dv), ("o", eq))]
        return specs

    def _project(self, x, which: str, heads: int, dim: int):
        """``x (N, T, E) -> (N, heads, T, dim)``."""
        y = pt.dot(x.reshape((-1, x.shape[-1])), self.params[f"W_{which}"].T)
        if f"b_{which}" in self.params:
            y = y + self.params[f"b_{which}"]
        return y.reshape((x.shape[0], x.shape[1], heads, dim)).dimshuffle(0, 2, 1, 3)

    def weights(self, inputs, ctx):
        """The attention weights ``A (N, H, Tq, Tk)`` and the values ``V (N, H, Tk, dv)``."""
        q, kv = inputs[0], inputs[-1]
        tq, _, tk, _, dk, dv = self.dims(self._input_shapes)
        h = int(self.num_heads)
        Q, K, V = self._project(q, "q", h, dk), self._project(kv, "k", h, dk), self._project(kv, "v", h, dv)
        scores = pt.matmul(Q, K.dimshuffle(0, 1, 3, 2)) * np.asarray(1.0 / np.sqrt(dk), dtype=q.dtype)
        allowed = None
        if self.causal:
            allowed = pt.constant(np.tril(np.ones((tq, tk), dtype=bool)))[None, None]
        keys = ctx.mask(kv)
        if keys is not None:
            real = keys.dimshuffle(0, "x", "x", 1) > 0
            allowed = real if allowed is None else pt.and_(allowed, real)
        if allowed is not None:  # a finite floor: a query with no key allowed stays finite
            scores = pt.switch(allowed, scores, np.asarray(-1e9, dtype=q.dtype))
        A = activations.softmax(scores)
        rate = float(self.dropout)
        if ctx.training and rate > 0:
            keep = 1.0 - rate
            A = A * (ctx.uniform(A.shape, A.dtype) < keep).astype(A.dtype) * (1.0 / keep)
        return A, V

    def forward(self, inputs, ctx):
        A, V = self.weights(inputs, ctx)
        out = pt.matmul(A, V).dimshuffle(0, 2, 1, 3)  # (N, Tq, H, dv)
        n, tq = out.shape[0], out.shape[1]
        y = pt.dot(out.reshape((n * tq, -1)), self.params["W_o"].T)
        if "b_o" in self.params:
            y = y + self.params["b_o"]
        return y.reshape((n, tq, self.params["W_o"].shape[0]))


def sinusoids(length: int, features: int) -> np.ndarray:
    """``PE (length, features)``: sines on the even features, cosines on the odd."""
    position = np.arange(length)[:, None]
    rate = np.power(10000.0, -(np.arange(0, features, 2) / features))
    pe = np.zeros((length, features))
    pe[:, 0::2] = np.sin(position * rate)
    pe[:, 1::2] = np.cos(position * rate[: features // 2])
    return pe


class PositionalEmbedding(Layer):
    """Args:
        encoding: ``learned`` (a trained vector per position) or ``sinusoidal`` (fixed).
        max_length: the positions a learned embedding has (default: the input's timesteps).
        embeddings_initializer: of a learned ``W``.
    """

    type = "positional_embedding"
    mask_policy = "keep"
    encoding: str
    max_length: int | None
    embeddings_initializer: Initializer

    def output_shape(self, input_shapes):
        t, _ = _sequence(self, single(input_shapes), "input")
        if self.max_length is not None and t > self.max_length:
            raise LayerError(f"the input has {t} timesteps, more than max_length {self.max_length}; "
                             f"expected at most {self.max_length}", key="max_length")
        self._shape = tuple(single(input_shapes))
        return self._shape

    def param_specs(self, input_shapes):
        if self.encoding != "learned":
            return []
        t, e = single(input_shapes)
        length = self.max_length or t
        return [ParamSpec("W", (length, e), self.embeddings_initializer, fan_in=length, fan_out=e,
                          regularize=False)]

    def table(self, dtype: str):
        """The ``(T, E)`` vectors added to every example."""
        t, e = self._shape
        if self.encoding == "learned":
            return self.params["W"][:t]
        return pt.constant(sinusoids(t, e).astype(dtype))

    def forward(self, inputs, ctx):
        (x,) = inputs
        return x + self.table(x.dtype)[None]
