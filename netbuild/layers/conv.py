"""Convolution layers: ``conv1d`` and ``conv2d`` (cross-correlation, PyTorch parameter layout).

``conv1d``: input ``(C, L)`` -> output ``(filters, L_out)``; ``conv2d``: input ``(C, H, W)`` ->
output ``(filters, H_out, W_out)``. With ``W`` of shape ``(filters, C, *kernel)`` (as
``torch.nn.Conv2d.weight``) and ``b`` of shape ``(filters,)``, on the zero-padded input ``x``::

    y[f, i, j] = activation(b[f] + sum_{c, u, v} W[f, c, u, v] * x[c, i*sh + u*dh, j*sw + v*dw])

Each spatial axis of length ``L`` with kernel ``k``, stride ``s``, dilation ``d`` and padding
``p`` (zeros before and after) gives ``L_out = floor((L + p_before + p_after - d*(k-1) - 1) / s) + 1``.
``padding``: ``valid`` (none), ``same`` (as Keras/TensorFlow: ``L_out = ceil(L / s)``, the odd
extra zero at the end) or an int (or one int per spatial axis) of zeros on both sides.

The graph is one op of netbuild's own, :class:`netbuild.ops.conv.Conv` (im2col and one BLAS gemm
per image, in C, with C gradient ops), given the window geometry computed here; a relu activation
runs inside the op (the pre-activation, recorded for the loss, is a second op that stays out of
the compiled function unless the loss reads it). The same
convolution from PyTensor's own ops (strided slices joined into a patch matrix, one matrix
product) stays as :func:`_graph_conv`, the reference the tests compare the op with. The window
helpers here (geometry, padding, slices) serve the pooling layers too.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import numpy as np
import pytensor.tensor as pt

from ..ops import conv as ops_conv
from .base import ActivatedLayer, Initializer, Ints, Layer, LayerError, Padding, ParamSpec, Regularized, single

AXIS_NAMES = {1: ("length",), 2: ("height", "width"), 3: ("depth", "height", "width")}


# -- shape maths: plain integers, no graph -----------------------------------------------------
def effective_kernel(kernel: int, dilation: int = 1) -> int:
    """The span of a dilated kernel: ``dilation * (kernel - 1) + 1``."""
    return dilation * (kernel - 1) + 1


def same_padding(length: int, kernel: int, stride: int = 1, dilation: int = 1) -> tuple[int, int]:
    """Zeros ``(before, after)`` for ``same`` padding (Keras/TensorFlow): ``ceil(length / stride)``
    outputs; an odd total puts the extra zero after."""
    out = -(-length // stride)
    total = max((out - 1) * stride + effective_kernel(kernel, dilation) - length, 0)
    return total // 2, total - total // 2


def axis_padding(length: int, kernel: int, stride: int, padding: Padding,
                 dilation: int = 1) -> tuple[int, int]:
    """Zeros ``(before, after)`` on one spatial axis for a padding of ``valid``, ``same`` or an int."""
    if padding == "same":
        return same_padding(length, kernel, stride, dilation)
    if padding == "valid":
        return 0, 0
    return int(padding), int(padding)


def conv_output_length(length: int, kernel: int, stride: int = 1, padding: Padding = "valid",
                       dilation: int = 1) -> int:
    """The output length of one spatial axis; below 1 when the (dilated) kernel spans more than
    the padded input."""
    before, after = axis_padding(length, kernel, stride, padding, dilation)
    return (length + before + after - effective_kernel(kernel, dilation)) // stride + 1


def as_tuple(value: Any, rank: int, key: str) -> tuple[int, ...]:
    """An int or a list of ``rank`` ints, as a tuple of ``rank`` ints."""
    if isinstance(value, (list, tuple)):
        if len(value) != rank:
            raise LayerError(f"{key} {list(value)} has {len(value)} value(s); expected an int or a "
                             f"list of {rank} (one per spatial axis)", key=key)
        return tuple(int(v) for v in value)
    return (int(value),) * rank


def padding_per_axis(padding: Padding, rank: int) -> tuple:
    """``padding`` as one entry (``valid``, ``same`` or an int) per spatial axis."""
    if isinstance(padding, str):
        if padding not in ("valid", "same"):
            raise LayerError(f"padding '{padding}' is unknown; expected 'valid', 'same' or an int",
                             key="padding")
        return (padding,) * rank
    return as_tuple(padding, rank, "padding")


@dataclass(frozen=True)
class Window:
    """Where a sliding window reads on each spatial axis, and how many outputs it gives."""

    spatial: tuple[int, ...]            # input lengths
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilation: tuple[int, ...]
    pads: tuple[tuple[int, int], ...]   # (before, after) per axis
    out: tuple[int, ...]                # output lengths

    @property
    def padded(self) -> tuple[int, ...]:
        return tuple(n + b + a for n, (b, a) in zip(self.spatial, self.pads))

    @property
    def size(self) -> int:
        """Elements in one window: ``prod(kernel)``."""
        return math.prod(self.kernel)


def window(spatial: Sequence[int], kernel: Sequence[int], strides: Sequence[int], padding: Sequence,
           dilation: Sequence[int] | None = None, kernel_key: str = "kernel_size") -> Window:
    """The geometry of a window over ``spatial``; raises :class:`LayerError` (blaming ``kernel_key``)
    when the (dilated) kernel is larger than the padded input on some axis."""
    rank = len(spatial)
    dilation = tuple(dilation) if dilation is not None else (1,) * rank
    pads, out = [], []
    for i in range(rank):
        b, a = axis_padding(spatial[i], kernel[i], strides[i], padding[i], dilation[i])
        span = effective_kernel(kernel[i], dilation[i])
        if span > spatial[i] + b + a:
            axis = AXIS_NAMES[rank][i] if rank in AXIS_NAMES else f"axis {i}"
            dilated = f" (spanning {span} with dilation_rate {dilation[i]})" if dilation[i] > 1 else ""
            padded = f"padded {axis} {spatial[i] + b + a}" if b or a else f"{axis} {spatial[i]}"
            raise LayerError(f"{kernel_key} {kernel[i]}{dilated} is larger than the input's "
                             f"{padded} (spatial shape {tuple(spatial)}); expected a window of at "
                             f"most {spatial[i] + b + a}", key=kernel_key)
        pads.append((b, a))
        out.append((spatial[i] + b + a - span) // strides[i] + 1)
    return Window(tuple(spatial), tuple(kernel), tuple(strides), dilation, tuple(pads), tuple(out))


def check_rank(layer: Layer, shape: tuple, rank: int) -> None:
    """Raise :class:`LayerError` unless ``shape`` is ``(channels, *rank spatial axes)``."""
    if len(shape) != rank + 1:
        names = ", ".join(("channels",) + AXIS_NAMES[rank])
        n = len(shape)
        raise LayerError(f"a '{layer.type}' layer takes inputs of shape ({names}); received shape "
                         f"{tuple(shape)}, which has {n} ax{'is' if n == 1 else 'es'}", key="inputs")


def static_shape(layer: Layer, x) -> tuple[int, ...]:
    """The shape of ``x`` without its batch axis: from the graph when static, else the shape the
    layer was last given in :meth:`Layer.output_shape`."""
    shape = tuple(x.type.shape[1:])
    if all(d is not None for d in shape):
        return tuple(int(d) for d in shape)
    known = getattr(layer, "_input_shape", None)
    if known is None or len(known) != len(shape):
        raise ValueError(f"layer '{layer.name}' needs its input's static shape; call output_shape "
                         "first")
    return known


# -- graph helpers --------------------------------------------------------------------------------
#: Zeros (or ``value``) added around every padded input beyond the window's own padding, and never
#: read: every slice then has an explicit start and stop. PyTensor compiles one C module per pattern
#: of omitted bounds (``x[:stop]``, ``x[start:stop]``, ``x[start:]``, ...), not per value, so this
#: keeps a kernel's slices (and their gradients) to one compiled module instead of up to ``K``.
GUARD = 1


def pad_spatial(x, win: Window, value: float, first: int):
    """``x`` with ``win.pads`` plus :data:`GUARD` of ``value`` around the spatial axes
    ``first .. first + rank - 1``; the copy also makes ``x`` contiguous."""
    shape = [x.shape[i] for i in range(x.ndim)]
    index = [slice(None)] * x.ndim
    for i, ((b, _), n, p) in enumerate(zip(win.pads, win.spatial, win.padded)):
        shape[first + i] = p + 2 * GUARD
        index[first + i] = slice(GUARD + b, GUARD + b + n)
    base = pt.alloc(np.asarray(value, dtype=x.dtype), *shape)
    return pt.set_subtensor(base[tuple(index)], x)


def window_slices(x, win: Window, first: int) -> list:
    """One strided slice of ``pad_spatial(x)`` per kernel offset (row-major over the offsets), each
    with the output's spatial shape: slice ``(u, v)`` holds ``x[..., i*sh + u*dh, j*sw + v*dw, ...]``
    (in padded coordinates)."""
    slices = []
    for offset in itertools.product(*(range(k) for k in win.kernel)):
        index = [slice(None)] * x.ndim
        for i, o in enumerate(offset):
            start, step = GUARD + o * win.dilation[i], win.strides[i]
            index[first + i] = slice(start, start + (win.out[i] - 1) * step + 1, step)
        slices.append(x[tuple(index)])
    return slices


def _graph_conv(x, W, b, win: Window, channels: int, filters: int):
    """The same convolution from PyTensor's own ops (the reference the C op is tested against):
    ``x`` channels-last once, each of the ``prod(kernel)`` kernel offsets one strided slice
    ``(N, *out, C)``, joined on the channel axis to ``(N, *out, K*C)`` and multiplied, as
    ``(N*prod(out), K*C)``, by the kernel as ``(K*C, filters)``."""
    r = len(win.spatial)
    x = pad_spatial(x.dimshuffle(0, *range(2, r + 2), 1), win, 0.0, first=1)
    # joined on the channel axis, (N, *out, K*C) stays C-ordered: the reshape is a view
    cols = pt.concatenate(window_slices(x, win, first=1), axis=-1).reshape((-1, win.size * channels))
    # W (F, C, *kernel) -> (F, *kernel, C) -> (F, K*C): the patch matrix's column order
    w = W.dimshuffle(0, *range(2, r + 2), 1).reshape((filters, win.size * channels))
    z = pt.dot(cols, w.T)  # (N*prod(out), F)
    if b is not None:
        z = z + b
    z = z.reshape((x.shape[0], *win.out, filters))
    return z.dimshuffle(0, r + 1, *range(1, r + 1))


# -- layers ---------------------------------------------------------------------------------------
class Windowed(Regularized, ActivatedLayer):
    """A layer that slides a kernel over ``rank`` spatial axes (the convolutions).

    Args:
        kernel_size: the window, an int or one per spatial axis.
        strides: the step between windows, an int or one per spatial axis.
        padding: ``valid``, ``same``, or zeros on both sides (an int or one per axis).
        dilation_rate: the spacing of the kernel's taps, an int or one per spatial axis.
        use_bias: add ``b``.
        kernel_initializer: of ``W``.
        bias_initializer: of ``b``.
    """

    rank: ClassVar[int] = 0
    kernel_size: Ints
    strides: Ints
    padding: Padding
    dilation_rate: Ints
    use_bias: bool
    kernel_initializer: Initializer
    bias_initializer: Initializer

    def geometry(self, input_shape: tuple) -> Window:
        check_rank(self, input_shape, self.rank)
        r = self.rank
        kernel = as_tuple(self.kernel_size, r, "kernel_size")
        strides = as_tuple(self.strides, r, "strides")
        dilation = as_tuple(self.dilation_rate, r, "dilation_rate")
        return window(input_shape[1:], kernel, strides, padding_per_axis(self.padding, r), dilation)

    def channels_out(self, input_shape: tuple) -> int:
        """The output's channels (``filters`` unless a subclass says otherwise)."""
        return int(self.filters)

    def output_shape(self, input_shapes):
        shape = single(input_shapes)
        self._input_shape = shape
        return (self.channels_out(shape),) + self.geometry(shape).out

    def _bias_spec(self, channels: int, **fans) -> list[ParamSpec]:
        return [ParamSpec("b", (channels,), self.bias_initializer, regularize=False, **fans)] \
            if self.use_bias else []

    def _add_bias(self, y):
        """``y (N, C, *spatial) + b`` per channel, when the layer has ``b``."""
        if "b" not in self.params:
            return y
        return y + self.params["b"].dimshuffle("x", 0, *(["x"] * self.rank))


class Conv(Windowed):
    """A convolution over ``rank`` spatial axes; subclasses set :attr:`type` and :attr:`rank`.

    Args:
        filters: output channels.
    """

    filters: int

    def param_specs(self, input_shapes):
        shape = single(input_shapes)
        kernel = self.geometry(shape).kernel
        channels, filters, k = shape[0], int(self.filters), math.prod(kernel)
        fans = dict(fan_in=channels * k, fan_out=filters * k)
        return [ParamSpec("W", (filters, channels) + kernel, self.kernel_initializer, **fans)] + \
            self._bias_spec(filters, **fans)

    def linear(self, inputs, ctx):
        return self._conv(inputs[0], "linear")

    def forward(self, inputs, ctx):
        if self.activation_name == "linear" or self.activation_name not in ops_conv.ACTIVATIONS:
            return super().forward(inputs, ctx)
        # the op applies the activation to each image's output while it is in cache, and masks
        # the gradient inside the gradient ops: two passes over the output fewer each way
        ctx.preactivations[self.name] = (self.linear(inputs, ctx), self.activation_name)
        return self._conv(inputs[0], self.activation_name)

    def _conv(self, x, activation: str):
        win = self.geometry(static_shape(self, x))
        return ops_conv.conv(x, self.params["W"], self.params.get("b"), win.strides,
                             win.dilation, win.pads, activation)


class Conv1D(Conv):
    type = "conv1d"
    rank = 1


class Conv2D(Conv):
    type = "conv2d"
    rank = 2


@dataclass(frozen=True)
class TransposedGeometry:
    """A transposed convolution as the convolution it transposes: that convolution's window
    (its input is this layer's output, ``out``) and pads."""

    out: tuple[int, ...]
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilation: tuple[int, ...]
    pads: tuple[tuple[int, int], ...]


class ConvTranspose(Windowed):
    """A transposed convolution (the gradient of a convolution with respect to its input: each
    input value scatters ``W`` times itself into the output) over ``rank`` spatial axes.

    ``W (channels, filters, *kernel)``, as ``torch.nn.ConvTranspose1d/2d.weight``, and
    ``b (filters,)``. Each spatial axis of length ``L`` gives ``(L - 1) * s - p_before - p_after
    + d * (k - 1) + output_padding + 1`` outputs; ``same`` padding gives ``L * s`` (the pads of
    the ``same`` convolution of that many values, Keras's ``Conv2DTranspose``).

    ``strides`` step between the windows an input scatters into; ``padding`` is ``valid`` (0),
    ``same``, or an int (or one per axis) removed from both sides (torch's ``padding``).

    Args:
        filters: output channels.
        output_padding: values added at the end of each axis (less than its stride), to tell
            apart the output lengths one input length can come from.
    """

    filters: int
    output_padding: Ints

    def geometry(self, input_shape: tuple) -> TransposedGeometry:
        check_rank(self, input_shape, self.rank)
        r = self.rank
        kernel = as_tuple(self.kernel_size, r, "kernel_size")
        strides = as_tuple(self.strides, r, "strides")
        dilation = as_tuple(self.dilation_rate, r, "dilation_rate")
        extra = as_tuple(self.output_padding, r, "output_padding")
        padding = padding_per_axis(self.padding, r)
        out, pads = [], []
        for n, k, s, d, e, p in zip(input_shape[1:], kernel, strides, dilation, extra, padding):
            if e >= s:
                raise LayerError(f"output_padding {e} is not smaller than the stride {s}; expected "
                                 f"0 to {s - 1} (Keras's rule: a larger one adds values no window "
                                 "reaches)", key="output_padding")
            if p == "same":
                if e:
                    raise LayerError("output_padding with padding 'same', whose output length is "
                                     "the input's times the stride; expected 0", key="output_padding")
                length = n * s
                pads.append(same_padding(length, k, s, d))
            else:
                b = a = 0 if p == "valid" else int(p)
                length = (n - 1) * s - b - a + effective_kernel(k, d) + e
                pads.append((b, a))
            if length < 1:
                raise LayerError(f"the output length would be {length}: padding {p} removes more "
                                 f"than the {(n - 1) * s + effective_kernel(k, d) + e} values the "
                                 f"windows cover (input shape {tuple(input_shape)}); expected less "
                                 "padding", key="padding")
            out.append(length)
        return TransposedGeometry(tuple(out), kernel, strides, dilation, tuple(pads))

    def param_specs(self, input_shapes):
        shape = single(input_shapes)
        kernel = self.geometry(shape).kernel
        channels, filters, k = shape[0], int(self.filters), math.prod(kernel)
        # torch's fans for its (in, out, *kernel) layout: fan_in from the second axis
        fans = dict(fan_in=filters * k, fan_out=channels * k)
        return [ParamSpec("W", (channels, filters) + kernel, self.kernel_initializer, **fans)] + \
            self._bias_spec(filters, **fans)

    def linear(self, inputs, ctx):
        (x,) = inputs
        geo = self.geometry(static_shape(self, x))
        return self._add_bias(ops_conv.conv_transpose(x, self.params["W"], geo.out, geo.strides,
                                                      geo.dilation, geo.pads))


class Conv1DTranspose(ConvTranspose):
    type = "conv1d_transpose"
    rank = 1


class Conv2DTranspose(ConvTranspose):
    type = "conv2d_transpose"
    rank = 2


def depthwise(x, W, win: Window, channels: int, multiplier: int):
    """Each of ``x``'s ``channels`` convolved with its own ``multiplier`` kernels of
    ``W (channels * multiplier, 1, *kernel)`` (torch's grouped layout): output channel
    ``c * multiplier + m`` reads input channel ``c``. Written from PyTensor's ops: one strided
    slice of the padded input per kernel offset, each times its column of weights, summed."""
    padded = pad_spatial(x, win, 0.0, first=2)
    w = W.reshape((channels, multiplier, win.size))
    r = len(win.spatial)
    total = None
    for k, part in enumerate(window_slices(padded, win, first=2)):  # (N, C, *out) each
        term = part.dimshuffle(0, 1, "x", *range(2, 2 + r)) * \
            w[:, :, k].dimshuffle("x", 0, 1, *(["x"] * r))
        total = term if total is None else total + term
    return total.reshape((x.shape[0], channels * multiplier, *win.out))


class DepthwiseConv2D(Windowed):
    """Each channel convolved on its own with ``depth_multiplier`` kernels, as
    ``torch.nn.Conv2d(C, C * depth_multiplier, kernel_size, groups=C)``: ``W (C * M, 1, kh, kw)``,
    ``b (C * M,)``; output channel ``c * M + m`` reads input channel ``c``.

    Args:
        depth_multiplier: kernels per input channel.
    """

    type = "depthwise_conv2d"
    rank = 2
    depth_multiplier: int

    def channels_out(self, input_shape):
        return input_shape[0] * self.depth_multiplier

    def param_specs(self, input_shapes):
        shape = single(input_shapes)
        kernel = self.geometry(shape).kernel
        out, k = shape[0] * self.depth_multiplier, math.prod(kernel)
        fans = dict(fan_in=k, fan_out=out * k)  # torch's, for the (C * M, 1, *kernel) layout
        return [ParamSpec("W", (out, 1) + kernel, self.kernel_initializer, **fans)] + \
            self._bias_spec(out, **fans)

    def linear(self, inputs, ctx):
        (x,) = inputs
        shape = static_shape(self, x)
        return self._add_bias(depthwise(x, self.params["W"], self.geometry(shape), shape[0],
                                        self.depth_multiplier))


class SeparableConv2D(Windowed):
    """A depthwise convolution (:class:`DepthwiseConv2D`, no bias), then a 1x1 convolution to
    ``filters`` channels (Keras's ``SeparableConv2D``): ``W_depthwise (C * M, 1, kh, kw)``,
    ``W_pointwise (filters, C * M, 1, 1)`` (torch's layouts), ``b (filters,)``.

    Args:
        filters: output channels.
        depth_multiplier: depthwise kernels per input channel.
        pointwise_initializer: of ``W_pointwise`` (``kernel_initializer`` is the depthwise's).
    """

    type = "separable_conv2d"
    rank = 2
    filters: int
    depth_multiplier: int
    pointwise_initializer: Initializer

    def param_specs(self, input_shapes):
        shape = single(input_shapes)
        kernel = self.geometry(shape).kernel
        mid, k = shape[0] * self.depth_multiplier, math.prod(kernel)
        return [ParamSpec("W_depthwise", (mid, 1) + kernel, self.kernel_initializer,
                          fan_in=k, fan_out=mid * k),
                ParamSpec("W_pointwise", (int(self.filters), mid, 1, 1), self.pointwise_initializer,
                          fan_in=mid, fan_out=int(self.filters))] + \
            self._bias_spec(int(self.filters), fan_in=mid, fan_out=int(self.filters))

    def linear(self, inputs, ctx):
        (x,) = inputs
        shape = static_shape(self, x)
        mid = depthwise(x, self.params["W_depthwise"], self.geometry(shape), shape[0],
                        self.depth_multiplier)
        return ops_conv.conv(mid, self.params["W_pointwise"], self.params.get("b"), (1, 1))
