"""Recurrent layers: ``simple_rnn``, ``lstm``, ``gru``.

Input ``(timesteps, features)``; output ``(units,)``, the last state, or ``(timesteps, units)``
with ``return_sequences``; ``bidirectional`` doubles ``units`` (``[forward, backward]`` on the
feature axis). The initial state is zeros.

Parameters follow PyTorch's layout, transposed like ``dense``'s ``W`` (inputs, outputs), so
``W_ih = weight_ih_l0.T`` and ``W_hh = weight_hh_l0.T``; with ``G`` gates stacked on the columns:
``W_ih (features, G*units)``, ``W_hh (units, G*units)``, ``b_ih (G*units,)``, ``b_hh (G*units,)``.
The backward direction of a bidirectional layer owns the same names suffixed ``_reverse``.
``act`` is ``activation`` (tanh) and ``ract`` is ``recurrent_activation`` (sigmoid); ``[k]``
is the k-th block of ``units`` columns.

``simple_rnn`` (G = 1, as ``torch.nn.RNN``)::

    h = act(x W_ih + b_ih + h W_hh + b_hh)

``lstm`` (G = 4, gates i, f, g, o, as ``torch.nn.LSTM``)::

    a = x W_ih + b_ih + h W_hh + b_hh
    i, f, g, o = ract(a[0]), ract(a[1]), act(a[2]), ract(a[3])
    c = f * c + i * g
    h = o * act(c)

``gru`` (G = 3, gates r, z, n, as ``torch.nn.GRU``)::

    p = x W_ih + b_ih,  q = h W_hh + b_hh
    r, z = ract(p[0] + q[0]), ract(p[1] + q[1])
    n = act(p[2] + r * q[2])
    h = (1 - z) * n + z * h

The loop over timesteps, and its gradient, is one C op per direction (:mod:`netbuild.ops.recurrent`)
when both activations are among the ones it computes (linear, tanh, sigmoid, relu, hard_sigmoid):
each step's input projection ``x W_ih`` is computed in the loop, the step's rows at a time, beside
``h W_hh`` and the step's elementwise maths. Any other activation runs :meth:`Recurrent.step` in a
``pytensor.scan``, after one matrix product for the input projection of every timestep; the scan
is also the reference the tests hold the C op to.

``go_backwards`` (Keras semantics) reverses the input sequence before the layer reads it; with
``return_sequences`` the outputs stay in that processing order. ``bidirectional`` adds a second
direction that reads the (possibly reversed) sequence backwards; its outputs are re-aligned to
the forward direction's time order, as ``torch.nn.LSTM(bidirectional=True)`` does, and without
``return_sequences`` each direction contributes its final state (torch's ``h_n``).
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import pytensor
import pytensor.tensor as pt

from .. import activations, backend, initializers
from ..ops import recurrent as recurrent_ops
from .base import Activation, Context, Initializer, Layer, LayerError, ParamSpec, Regularized, Shape, single


class ForgetBias:
    """An initializer: ``base`` everywhere, then 1 on the LSTM forget gate's block
    ``[units:2*units]``. Called like the functions in :mod:`netbuild.initializers`
    (``rng, shape, fan_in, fan_out``); :func:`netbuild.initializers.initialize` accepts it.
    """

    def __init__(self, base: Any, units: int):
        self.base = base
        self.units = units

    def __call__(self, rng, shape, fan_in, fan_out, **_) -> np.ndarray:
        values = initializers.initialize(self.base, rng, shape, fan_in, fan_out)
        values[self.units:2 * self.units] = 1.0
        return values

    def __repr__(self) -> str:
        return f"ForgetBias({self.base!r}, units={self.units})"


class Recurrent(Regularized, Layer):
    """The loop shared by every cell: input projection, directions, the fused C op or scan,
    output selection.

    A subclass sets :attr:`gates`, :attr:`n_states` and :attr:`cell`, and implements
    :meth:`step` (the scan path; the C op has the same equations for its :attr:`cell`) and
    :meth:`fused_extra`.

    Args:
        units: the state's size (each direction's).
        return_sequences: output every step's state ``(timesteps, units)``, not the last.
        go_backwards: read the sequence from its end (Keras).
        bidirectional: a second direction reading the sequence backwards, outputs side by side.
        activation: ``act`` in the equations.
        kernel_initializer: of ``W_ih``.
        recurrent_initializer: of ``W_hh``.
        bias_initializer: of ``b_ih`` and ``b_hh``.
    """

    #: Gate blocks stacked on the columns of ``W_ih`` and ``W_hh``.
    gates: ClassVar[int] = 1
    #: Tensors carried from step to step (``h`` first; the LSTM also carries ``c``).
    n_states: ClassVar[int] = 1
    #: The cell :mod:`netbuild.ops.recurrent` runs.
    cell: ClassVar[str] = ""
    units: int
    return_sequences: bool
    go_backwards: bool
    bidirectional: bool
    activation: Activation
    kernel_initializer: Initializer
    recurrent_initializer: Initializer
    bias_initializer: Initializer

    # -- shape maths ----------------------------------------------------------------------
    def _check_input(self, input_shapes: Sequence[Shape]) -> tuple[int, int]:
        shape = single(input_shapes)
        if len(shape) != 2:
            raise LayerError(f"'{self.type}' reads sequences: expected input of shape "
                             f"(timesteps, features); received shape {shape}", key="inputs")
        return shape[0], shape[1]

    @property
    def directions(self) -> list[str]:
        """The parameter-name suffix of each direction."""
        return ["", "_reverse"] if self.bidirectional else [""]

    def output_shape(self, input_shapes):
        timesteps, _ = self._check_input(input_shapes)
        units = self.units * len(self.directions)
        return (timesteps, units) if self.return_sequences else (units,)

    def param_specs(self, input_shapes):
        _, features = self._check_input(input_shapes)
        units = self.units
        width = self.gates * units
        kernel, recurrent, bias = self.kernel_initializer, self.recurrent_initializer, self.bias_initializer
        specs = []
        for suffix in self.directions:
            specs += [
                ParamSpec("W_ih" + suffix, (features, width), kernel,
                          fan_in=features, fan_out=width),
                ParamSpec("W_hh" + suffix, (units, width), recurrent, fan_in=units, fan_out=width),
                ParamSpec("b_ih" + suffix, (width,), self.input_bias_init(bias),
                          fan_in=features, fan_out=width, regularize=False),
                ParamSpec("b_hh" + suffix, (width,), bias, fan_in=units, fan_out=width,
                          regularize=False),
            ]
        return specs

    def input_bias_init(self, bias: Any) -> Any:
        """The initializer of ``b_ih`` (the LSTM sets its forget gate to 1)."""
        return bias

    # -- the cell ------------------------------------------------------------------------
    def split_bias(self, b_ih, b_hh) -> tuple[Any, Any]:
        """``(bias added to the input projection, bias kept inside the step or None)``."""
        return b_ih + b_hh, None

    def step(self, p, states: Sequence, W_hh, b_inner) -> list:
        """One timestep: ``p`` is this step's input projection ``(batch, G*units)``; returns the
        new states, ``h`` first."""
        raise NotImplementedError

    def _activations(self) -> tuple[Callable, Callable]:
        """``(act, ract)``; a cell without a recurrent activation gets sigmoid, unused."""
        return (activations.get(self.activation),
                activations.get(getattr(self, "recurrent_activation", None) or "sigmoid"))

    def fused_extra(self, zero, inner):
        """The fused op's fourth input: the LSTM's initial cell state, the GRU's ``b_hn``."""
        return None

    # -- graph ----------------------------------------------------------------------------
    #: ``"auto"``: the fused C op where :meth:`fused_activations` allows it, else ``scan``;
    #: ``"scan"``: always ``scan`` (the reference the tests compare the C op against, and what
    #: the ``jax`` backend compiles: PyTensor turns it into ``jax.lax.scan``).
    implementation: ClassVar[str] = "auto"

    def fused_activations(self) -> tuple[str, str] | None:
        """``(activation, recurrent_activation)`` when :mod:`netbuild.ops.recurrent` has C code
        for both (named without options) and :attr:`implementation` allows it, else None."""
        if self.implementation == "scan" or backend.current() == "jax":  # JAX: lax.scan of step
            return None
        names = [self.activation, getattr(self, "recurrent_activation", None) or "sigmoid"]
        names = [n["type"] if isinstance(n, dict) and set(n) == {"type"} else n for n in names]
        if all(isinstance(n, str) and n in recurrent_ops.ACTIVATIONS for n in names):
            return names[0], names[1]
        return None

    # -- masks: a padded step leaves the states as they were ---------------------------------
    def passes_mask(self, masked, input_shapes):
        return any(masked) and self.return_sequences

    def output_mask(self, inputs, ctx):
        """The input's mask, in the order the outputs come (reversed by ``go_backwards``)."""
        if not self.return_sequences:
            return None
        mask = ctx.mask(inputs[0])
        return mask[:, ::-1] if self.go_backwards else mask

    def forward(self, inputs, ctx: Context):
        (x,) = inputs
        batch = x.shape[0]
        xs = x.dimshuffle(1, 0, 2)  # time-major (timesteps, batch, features)
        mask = ctx.mask(x)
        ms = None if mask is None else mask.dimshuffle(1, 0)  # (timesteps, batch)
        if self.go_backwards:
            xs = xs[::-1]
            ms = None if ms is None else ms[::-1]
        # biases: the part added to the input projection, and the part kept inside the step
        outer, inner = zip(*(self.split_bias(self.params["b_ih" + s], self.params["b_hh" + s])
                             for s in self.directions))
        zero = pt.zeros((batch, self.units), dtype=x.dtype)
        fused = self.fused_activations()
        if fused:
            hs = self._fused(xs, outer, inner, zero, *fused, ms)
        else:
            hs = self._scan(xs, outer, inner, zero, ms)
        # hs: h of each direction in its processing order (timesteps, batch, units)
        if self.return_sequences:
            if len(hs) > 1:
                hs = [hs[0], hs[1][::-1]]
            out = [h.dimshuffle(1, 0, 2) for h in hs]
        else:
            out = [h[-1] for h in hs]
        return pt.concatenate(out, axis=-1) if len(out) > 1 else out[0]

    def _fused(self, xs, outer, inner, zero, act: str, ract: str, ms=None) -> list:
        """One C op per direction; the backward direction reads the time-reversed sequence (and
        mask). The op projects each step's inputs itself (``X W_ih``, on netbuild's packed
        products) and adds the bias; its gradient op gives ``W_ih``'s gradient too.
        With a mask ``ms (timesteps, batch)`` the op holds the states at a padded step."""
        ms = None if ms is None else ms.astype(xs.dtype)
        hs = []
        for d, suffix in enumerate(self.directions):
            seq = xs[::-1] if d else xs
            mask = None if ms is None else (ms[::-1] if d else ms)
            hs.append(recurrent_ops.sequence(self.cell, seq, outer[d], self.params["W_hh" + suffix],
                                             zero, self.fused_extra(zero, inner[d]), act, ract,
                                             mask, W_ih=self.params["W_ih" + suffix])[0])
        return hs

    def _scan(self, xs, outer, inner, zero, ms=None) -> list:
        """All directions in one ``scan`` over :meth:`step`, after one matrix product for the
        input projection of every timestep and direction. With a mask ``ms (timesteps, batch)``
        a padded step keeps each state (``new`` where the mask is 1, else ``old``)."""
        dirs = self.directions
        n_dir, n_states = len(dirs), self.n_states
        width = self.gates * self.units
        steps, batch, features = xs.shape[0], xs.shape[1], xs.shape[2]
        W_ih = pt.concatenate([self.params["W_ih" + s] for s in dirs], axis=1) if n_dir > 1 \
            else self.params["W_ih"]
        b = pt.concatenate(outer) if n_dir > 1 else outer[0]
        # (-1, features), not (steps * batch, ...): a product of dimensions is not static in JAX
        proj = (pt.dot(xs.reshape((-1, features)), W_ih) + b).reshape((steps, batch, n_dir * width))
        sequences = [proj[:, :, :width]]
        if n_dir > 1:
            sequences.append(proj[::-1, :, width:])  # the backward direction reads time reversed
        if ms is not None:
            sequences.append(ms.astype(xs.dtype))
            if n_dir > 1:
                sequences.append(ms[::-1].astype(xs.dtype))
        n_seq = len(sequences)

        non_sequences = []
        for s, b_in in zip(dirs, inner):
            non_sequences += [self.params["W_hh" + s]] + ([b_in] if b_in is not None else [])
        per_dir = len(non_sequences) // n_dir

        def loop(*args):
            # scan's order: this step of each sequence, the previous states, the non-sequences
            ps = args[:n_dir]
            steps_mask = args[n_dir:n_seq]
            states = args[n_seq:n_seq + n_dir * n_states]
            rest = args[n_seq + n_dir * n_states:]
            new = []
            for d in range(n_dir):
                W_hh, *b_in = rest[d * per_dir:(d + 1) * per_dir]
                old = states[d * n_states:(d + 1) * n_states]
                out = self.step(ps[d], old, W_hh, b_in[0] if b_in else None)
                if steps_mask:  # a select, as the C op's: a padded input never reaches a state
                    m = pt.neq(steps_mask[d], 0).dimshuffle(0, "x")
                    out = [pt.switch(m, o, s) for o, s in zip(out, old)]
                new += out
            return new

        outputs = pytensor.scan(loop, sequences=sequences,
                                outputs_info=[zero] * (n_dir * n_states),
                                non_sequences=non_sequences, strict=True,
                                return_list=True, return_updates=False,
                                name=f"{self.name}_scan")
        return outputs[::n_states]


class SimpleRNN(Recurrent):
    type = "simple_rnn"
    cell = "simple_rnn"
    gates = 1

    def step(self, p, states, W_hh, b_inner):
        (h,) = states
        act, _ = self._activations()
        return [act(p + pt.dot(h, W_hh))]


class LSTM(Recurrent):
    """Args:
        recurrent_activation: ``ract``, of the gates i, f and o.
        unit_forget_bias: start the forget gate's input bias at 1.
    """

    type = "lstm"
    cell = "lstm"
    gates = 4
    n_states = 2
    recurrent_activation: Activation
    unit_forget_bias: bool

    def input_bias_init(self, bias):
        if self.unit_forget_bias:
            return ForgetBias(bias, self.units)
        return bias

    def fused_extra(self, zero, inner):
        return zero

    def step(self, p, states, W_hh, b_inner):
        h, c = states
        u = self.units
        act, ract = self._activations()
        a = p + pt.dot(h, W_hh)
        i, f, g, o = ract(a[:, :u]), ract(a[:, u:2 * u]), act(a[:, 2 * u:3 * u]), ract(a[:, 3 * u:])
        c = f * c + i * g
        return [o * act(c), c]


class GRU(Recurrent):
    """Args:
        recurrent_activation: ``ract``, of the gates r and z.
    """

    type = "gru"
    cell = "gru"
    gates = 3
    recurrent_activation: Activation

    def split_bias(self, b_ih, b_hh):
        # b_hn is scaled by the reset gate, so it stays in the step; b_hr and b_hz are hoisted
        u = self.units
        return b_ih + pt.set_subtensor(b_hh[2 * u:], 0.0), b_hh[2 * u:]

    def fused_extra(self, zero, inner):
        return inner

    def step(self, p, states, W_hh, b_inner):
        (h,) = states
        u = self.units
        act, ract = self._activations()
        q = pt.dot(h, W_hh)
        r = ract(p[:, :u] + q[:, :u])
        z = ract(p[:, u:2 * u] + q[:, u:2 * u])
        n = act(p[:, 2 * u:] + r * (q[:, 2 * u:] + b_inner))
        return [(1.0 - z) * n + z * h]
