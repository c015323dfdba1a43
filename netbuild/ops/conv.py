"""Convolution (cross-correlation) as im2col + one BLAS gemm per image, in C, and its gradients.

Inputs are channels first, ``x (N, C, *spatial)``, with one or two spatial axes, and weights in
PyTorch's layout, ``W (F, C, *kernel)``. For each image, :class:`Conv` copies every window of the
zero-padded input into the columns of a buffer ``cols (C*prod(kernel), prod(out))`` (rows in
``W``'s order ``(c, *kernel offset)``, so ``W`` as ``(F, C*prod(kernel))`` is a view), then one
gemm writes ``y[n] (F, prod(out)) = W @ cols (+ b)`` straight into the NCHW output, as Caffe does.
Strides, dilation and padding live in the im2col loop; a 1x1 kernel without stride or padding
reads ``x[n]`` itself. A 1-d convolution is the 2-d one with a height of 1.

The gradients are two more ops, each one pass over the images:

- :class:`ConvGradInput`: ``cols = W^T @ dy[n]`` (gemm), then col2im adds every column back
  into the window it came from (``dx[n]``).
- :class:`ConvGradWeights`: ``dW += dy[n] @ cols^T`` (gemm with beta 1), ``cols`` recomputed
  from ``x[n]`` rather than kept from the forward pass, and ``db = sum dy`` in the same pass.

The geometry (strides, dilation, padding) is a run-time parameter of the C code, so one compiled
module per op and float type serves every layer. Each op also has a numpy ``perform`` (the same
algorithm, vectorized over the batch), which PyTensor's Python modes (the tests' FAST_COMPILE) run.
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence

import numpy as np
import pytensor.tensor as pt
from pytensor import config
from pytensor.gradient import DisconnectedType, disconnected_type, grad_not_implemented
from pytensor.graph.basic import Apply
from pytensor.link.c.params_type import ParamsType
from pytensor.scalar import int64, upcast

from . import BlasCOp, CCall

#: Activations the ops apply themselves, and their codes in the C code.
ACTIVATIONS = {"linear": 0, "relu": 1}


def _lift(shape: str) -> str:
    """The C initializer of a shape ``"a, b, h, w"`` of the 2-d op for ``nd_`` dims: a 1-d op
    (``nd_ == 3``) leaves out ``h``, as ``nbwin::dims`` does."""
    a, b, h, w = (d.strip() for d in shape.split(","))
    return f"{a}, {b}, nd_ == 4 ? {h} : {w}, {w}"


def _pairs(pads: Sequence) -> tuple[tuple[int, int], ...]:
    return tuple((int(b), int(a)) for b, a in pads)


class _ConvCOp(BlasCOp):
    """What the convolution ops share: the geometry, the activation, BLAS linking, the C kernels.

    ``strides``, ``dilation``: one int per spatial axis; ``pads``: ``(before, after)`` zeros per
    spatial axis. The rank (1 or 2) is their length. ``activation``: one of :data:`ACTIVATIONS`.
    """

    c_file = "conv.c"
    shared_files = (*BlasCOp.shared_files, "window.c")

    __props__ = ("strides", "dilation", "pads", "activation")
    params_type = ParamsType(sh=int64, sw=int64, dh=int64, dw=int64, ph=int64, pw=int64,
                             pha=int64, pwa=int64, act=int64)

    def __init__(self, strides: Sequence[int], dilation: Sequence[int], pads: Sequence,
                 activation: str = "linear"):
        if activation not in ACTIVATIONS:
            raise ValueError(f"{type(self).__name__}: no activation '{activation}' in the op; "
                             f"expected one of {sorted(ACTIVATIONS)}")
        self.activation = activation
        self.strides = tuple(int(s) for s in strides)
        self.dilation = tuple(int(d) for d in dilation)
        self.pads = _pairs(pads)
        self.rank = len(self.strides)
        if self.rank not in (1, 2) or len(self.dilation) != self.rank or len(self.pads) != self.rank:
            raise ValueError(f"{type(self).__name__}: strides, dilation and pads need one entry "
                             f"per spatial axis (1 or 2); received {self.strides}, "
                             f"{self.dilation}, {self.pads}")
        if min(self.strides + self.dilation) < 1 or min(sum(self.pads, ())) < 0:
            raise ValueError(f"{type(self).__name__}: strides and dilation must be positive and "
                             f"pads not negative; received {self.strides}, {self.dilation}, "
                             f"{self.pads}")

    def get_params(self, node):
        # a 1-d op is the 2-d one with a height of 1
        s = (1,) * (2 - self.rank) + self.strides
        d = (1,) * (2 - self.rank) + self.dilation
        p = ((0, 0),) * (2 - self.rank) + self.pads
        return self.params_type.get_params(sh=s[0], sw=s[1], dh=d[0], dw=d[1], ph=p[0][0],
                                           pw=p[1][0], pha=p[0][1], pwa=p[1][1],
                                           act=ACTIVATIONS[self.activation])

    @property
    def geometry(self) -> tuple:
        return self.strides, self.dilation, self.pads

    # -- shapes -----------------------------------------------------------------------------------
    def out_lengths(self, spatial, kernel) -> list:
        """Output lengths (ints, or symbolic where the input's are)."""
        out = []
        for n, k, s, d, (b, a) in zip(spatial, kernel, self.strides, self.dilation, self.pads):
            if n is None or k is None:
                out.append(None)
            else:
                out.append((n + b + a - d * (k - 1) - 1) // s + 1)
        return out

    def _np_check(self, x: np.ndarray, w: np.ndarray, dy: np.ndarray | None = None) -> None:
        """The C code's checks, with its messages, for ``perform``."""
        name = type(self).__name__
        if w.shape[1] != x.shape[1]:
            raise ValueError(f"{name}: W has {w.shape[1]} input channels, the input {x.shape[1]}")
        out = self.out_lengths(x.shape[2:], w.shape[2:])
        if min(out) < 1:
            lift = (1,) * (2 - self.rank)  # as the C code: a 1-d op is 2-d with a height of 1
            raise ValueError(f"{name}: the kernel {lift + tuple(w.shape[2:])} spans more than the "
                             f"padded input {lift + tuple(x.shape[2:])}")
        if dy is not None and dy.shape != (x.shape[0], w.shape[0], *out):
            raise ValueError(f"{name}: dy has the wrong shape")

    @staticmethod
    def _floats(*values) -> list:
        tensors = [pt.as_tensor_variable(v) for v in values]
        dtype = upcast(*[t.dtype for t in tensors])
        if dtype not in ("float32", "float64"):
            dtype = config.floatX
        return [pt.cast(t, dtype) for t in tensors]

    def _check(self, x, w):
        nd = self.rank + 2
        if x.type.ndim != nd or w.type.ndim != nd:
            raise TypeError(f"{type(self).__name__}: x and W need {nd} axes (batch or filters, "
                            f"channels, {self.rank} spatial); received {x.type.ndim} and "
                            f"{w.type.ndim}")

    # -- C compilation ------------------------------------------------------------------------------
    def _c_body(self, node, name, sub, x_like: str, w_like: str, checks: list, contig: list[str],
                outs: list[tuple[str, str]], call: str) -> str:
        """C code (:class:`netbuild.ops.CCall`): the geometry from ``x_like`` (N, C, *spatial)
        and ``w_like`` (F, C, *kernel); ``checks``: ``(variable, name, shape)`` of inputs to
        check; contiguous copies of ``contig``; outputs ``(variable, shape)``; the scratch ``sc_``
        (each thread's columns and pre-activation gradient, each slice's partial weight
        gradient); then ``call`` without the GIL, ``{i[k]}`` in it the data of ``contig[k]`` and
        ``{o[k]}`` that of output ``k``.
        A shape is the 2-d op's 4 dims, a C initializer (a 1-d op leaves out the third); the same
        code serves both ranks, so that they share one compiled module."""
        c = CCall(self, node, name, sub)
        p = sub["params"]
        for line in (
            "nbwin::Geom g_;",
            f"const int nd_ = PyArray_NDIM({x_like});",
            f"const npy_intp* xd_ = PyArray_DIMS({x_like});",
            f"const npy_intp* wd_ = PyArray_DIMS({w_like});",
            "const npy_intp N_ = xd_[0];",
            "g_.C = xd_[1]; g_.F = wd_[0];",
            "g_.H = nd_ == 4 ? xd_[2] : 1; g_.W = xd_[nd_ - 1];",
            "g_.KH = nd_ == 4 ? wd_[2] : 1; g_.KW = wd_[nd_ - 1];",
            f"g_.sh = {p}->sh; g_.sw = {p}->sw; g_.dh = {p}->dh; g_.dw = {p}->dw;",
            f"g_.ph = {p}->ph; g_.pw = {p}->pw;",
            f"g_.OH = nbwin::out_length(g_.H, g_.KH, g_.sh, g_.dh, g_.ph, {p}->pha);",
            f"g_.OW = nbwin::out_length(g_.W, g_.KW, g_.sw, g_.dw, g_.pw, {p}->pwa);",
        ):
            c.line(line)
        c.check("wd_[1] == g_.C", "W has %ld input channels, the input %ld", "(long)wd_[1]",
                "(long)g_.C")
        c.check("g_.OH >= 1 && g_.OW >= 1", "the kernel (%ld, %ld) spans more than the padded "
                "input (%ld, %ld)", "(long)g_.KH", "(long)g_.KW", "(long)g_.H", "(long)g_.W")
        op = type(self).__name__
        for v, what, shape in checks:
            nd = "1" if shape.count(",") == 0 else "nd_"
            init = f"d_[0] = {shape};" if nd == "1" else f"nbwin::dims(d_, nd_, {shape});"
            c.when_ok(f"npy_intp d_[4]; {init} err_ = nbwin::check({v}, {nd}, d_, \"{op}\", "
                      f"\"{what}\");")
        ins = [c.input(v) for v in contig]
        data = [c.output(v, shape) if shape.count(",") == 0 else c.output(v, _lift(shape), "nd_")
                for v, shape in outs]
        c.line("nbconv::Scratch<T_> sc_;")
        c.line("const int nt_ = netbuild_threads();")
        s_ = c.scratch("nbconv::scratch_layout<T_>(NULL, N_, nt_, g_, &sc_)")
        c.when_ok(f"nbconv::scratch_layout<T_>({s_}, N_, nt_, g_, &sc_);")
        c.run(call.format(i=ins, o=data))
        return c.code()


class Conv(_ConvCOp):
    """``y (N, F, *out) = act(conv(x (N, C, *spatial), W (F, C, *kernel)) [+ b (F,)])``.

    With ``activation="relu"`` a negative pre-activation comes out as ``-0.0``: the gradient ops
    read the sign bit of ``y`` to give relu's derivative 1 at 0 and 0 below, as PyTensor's
    ``maximum(z, 0)`` (and so every other relu of netbuild) does.
    """

    def make_node(self, x, w, b=None):
        tensors = self._floats(x, w, *([] if b is None else [b]))
        x, w = tensors[0], tensors[1]
        self._check(x, w)
        if b is not None and tensors[2].type.ndim != 1:
            raise TypeError(f"Conv: b needs 1 axis; received {tensors[2].type.ndim}")
        out = self.out_lengths(x.type.shape[2:], w.type.shape[2:])
        y = pt.tensor(dtype=x.dtype, shape=(x.type.shape[0], w.type.shape[0], *out))
        return Apply(self, tensors, [y])

    def infer_shape(self, fgraph, node, shapes):
        xs, ws = shapes[0], shapes[1]
        return [(xs[0], ws[0], *self.out_lengths(xs[2:], ws[2:]))]

    def pullback(self, inputs, outputs, cotangents):
        (dy,) = cotangents
        x, w = inputs[0], inputs[1]
        if isinstance(dy.type, DisconnectedType):
            return [disconnected_type() for _ in inputs]
        y = list(outputs) if self.activation == "relu" else []
        dx = ConvGradInput(*self.geometry, self.activation)(x, w, dy, *y)
        grads = ConvGradWeights(*self.geometry, self.activation, bias=len(inputs) == 3)(
            x, w, dy, *y, return_list=True)
        return [dx] + grads

    def perform(self, node, inputs, output_storage):
        x, w = inputs[0], inputs[1]
        b = inputs[2] if len(inputs) == 3 else None
        self._np_check(x, w)
        if b is not None and b.shape != (w.shape[0],):
            raise ValueError("Conv: b has the wrong shape")
        cols = _np_im2col(x, w.shape[2:], self)            # (N, CK, P)
        y = np.matmul(w.reshape(w.shape[0], -1), cols)    # (N, F, P)
        if b is not None:
            y += b[:, None]
        if self.activation == "relu":
            y = np.where(y < 0, np.asarray(-0.0, dtype=y.dtype), y)
        out = self.out_lengths(x.shape[2:], w.shape[2:])
        output_storage[0][0] = np.asarray(y.reshape(x.shape[0], w.shape[0], *out),
                                          dtype=node.outputs[0].dtype)

    def jax(self, node):
        """``act(conv(x, W) [+ b])`` with ``lax.conv_general_dilated``; relu writes a negative
        value as ``-0.0``, as the C code does."""
        import jax.numpy as jnp

        conv_ = _jax_conv(self)
        relu, lift = self.activation == "relu", (1,) * self.rank

        def conv_forward(x, w, *b):
            y = conv_(x, w)
            if b:
                y = y + b[0].reshape(-1, *lift)
            if relu:
                y = jnp.where(y < 0, jnp.array(-0.0, dtype=y.dtype), y)
            return y

        return conv_forward

    def c_code(self, node, name, inputs, outputs, sub):
        x, w = inputs[0], inputs[1]
        (y,) = outputs
        bias = len(inputs) == 3
        checks = [(inputs[2], "b", "g_.F")] if bias else []
        b = "{i[2]}" if bias else "(const T_*)NULL"
        call = (f"nbconv::forward(N_, {{i[0]}}, {{i[1]}}, {b}, (int){sub['params']}->act, "
                "{o[0]}, sc_, g_)")
        return self._c_body(node, name, sub, x, w, checks, list(inputs),
                            [(y, "N_, g_.F, g_.OH, g_.OW")], call)


class _ConvGradCOp(_ConvCOp):
    """A gradient op of :class:`Conv`: inputs ``(x, W, dy)``, and ``y`` (the forward output)
    after a relu, whose sign bits mask ``dy``."""

    def _inputs(self, x, w, dy, y):
        if (y is None) != (self.activation == "linear"):
            raise TypeError(f"{type(self).__name__}: the forward output y is an input exactly "
                            f"when there is an activation ('{self.activation}')")
        tensors = self._floats(x, w, dy, *([] if y is None else [y]))
        self._check(tensors[0], tensors[1])
        return tensors

    def _np_pre_grad(self, inputs) -> np.ndarray:
        """``dy``, masked by relu's derivative after a relu."""
        dy = inputs[2]
        if self.activation == "relu":
            dy = np.where(np.signbit(inputs[3]), np.zeros((), dtype=dy.dtype), dy)
        return dy

    @staticmethod
    def _jax_pre_grad(dy, *y):
        """:meth:`_np_pre_grad` in JAX: ``dy``, masked by the sign bits of ``y`` after a relu."""
        import jax.numpy as jnp

        return jnp.where(jnp.signbit(y[0]), jnp.zeros((), dtype=dy.dtype), dy) if y else dy

    def _second_order(self, inputs, connected: Sequence[bool]):
        """None for the linear ops, which have second derivatives; else what they return
        instead: an error where an input is connected (``connected``), as ``pytensor.grad``
        raises it only when asked for that derivative."""
        if self.activation == "linear":
            return None
        return [grad_not_implemented(self, i, v, "second derivatives through a convolution "
                                     "with its activation in the op") if c else disconnected_type()
                for i, (v, c) in enumerate(zip(inputs, connected))]


class ConvGradInput(_ConvGradCOp):
    """``dx (N, C, *spatial)``: the gradient of :class:`Conv`'s input, from ``(x, W, dy[, y])``;
    ``x`` gives only the shape."""

    def make_node(self, x, w, dy, y=None):
        tensors = self._inputs(x, w, dy, y)
        return Apply(self, tensors, [tensors[0].type()])

    def connection_pattern(self, node):
        return [[False], [True], [True]] + [[False]] * (len(node.inputs) - 3)

    def infer_shape(self, fgraph, node, shapes):
        return [shapes[0]]

    def pullback(self, inputs, outputs, cotangents):
        # dx is linear in W and in dy: the gradients are a forward convolution and a weight gradient
        not_linear = self._second_order(inputs, [False, True, True, False])
        if not_linear:
            return not_linear
        _, w, dy = inputs
        (g,) = cotangents
        return [disconnected_type(), ConvGradWeights(*self.geometry)(g, w, dy),
                Conv(*self.geometry)(g, w)]

    def perform(self, node, inputs, output_storage):
        x, w, dy = inputs[:3]
        self._np_check(x, w, dy)
        n, f = dy.shape[0], w.shape[0]
        dz = self._np_pre_grad(inputs).reshape(n, f, -1)
        cols = np.matmul(w.reshape(f, -1).T, dz)  # (N, CK, P)
        output_storage[0][0] = np.asarray(_np_col2im(cols, x.shape, w.shape[2:], self),
                                          dtype=node.outputs[0].dtype)

    def jax(self, node):
        """``dx``: the transpose of ``x -> conv(x, W)`` (``x`` gives only its shape, static under
        ``jax.jit``) applied to ``dy``, masked after a relu."""
        import jax

        conv_ = _jax_conv(self)
        taps = _xla_cannot(self)

        def conv_grad_input(x, w, dy, *y):
            dz = self._jax_pre_grad(dy, *y)
            if taps:
                return _jax_input_grad_by_taps(self, x.shape, w, dz)
            like = jax.ShapeDtypeStruct(x.shape, dy.dtype)
            return jax.linear_transpose(lambda v: conv_(v, w), like)(dz)[0]

        return conv_grad_input

    def c_code(self, node, name, inputs, outputs, sub):
        x, w, dy = inputs[:3]
        (dx,) = outputs
        shape = "N_, g_.F, g_.OH, g_.OW"
        checks = [(dy, "dy", shape)] + [(v, "y", shape) for v in inputs[3:]]
        y = "{i[2]}" if len(inputs) == 4 else "(const T_*)NULL"
        call = "nbconv::grad_input(N_, {i[0]}, {i[1]}, " + y + ", {o[0]}, sc_, g_)"
        return self._c_body(node, name, sub, x, w, checks, [w, dy] + list(inputs[3:]),
                            [(dx, "N_, g_.C, g_.H, g_.W")], call)


class ConvGradWeights(_ConvGradCOp):
    """``dW (F, C, *kernel)`` and, with ``bias``, ``db (F,)``: the gradients of :class:`Conv`'s
    weights and bias, from ``(x, W, dy[, y])``; ``W`` gives only the shape."""

    __props__ = ("strides", "dilation", "pads", "activation", "bias")

    def __init__(self, strides, dilation, pads, activation: str = "linear", bias: bool = False):
        super().__init__(strides, dilation, pads, activation)
        self.bias = bool(bias)

    def make_node(self, x, w, dy, y=None):
        tensors = self._inputs(x, w, dy, y)
        w = tensors[1]
        outs = [w.type()]
        if self.bias:
            outs.append(pt.tensor(dtype=w.dtype, shape=(w.type.shape[0],)))
        return Apply(self, tensors, outs)

    def connection_pattern(self, node):
        n = len(node.outputs)
        return [[True] * n, [False] * n, [True] * n] + [[False] * n] * (len(node.inputs) - 3)

    def infer_shape(self, fgraph, node, shapes):
        return [shapes[1]] + ([(shapes[1][0],)] if self.bias else [])

    def pullback(self, inputs, outputs, cotangents):
        not_linear = self._second_order(inputs, [True, False, True, False])
        if not_linear:
            return not_linear
        x, _, dy = inputs
        gx, gdy = pt.zeros_like(x), pt.zeros_like(dy)
        g = cotangents[0]
        if not isinstance(g.type, DisconnectedType):
            gx = gx + ConvGradInput(*self.geometry)(x, g, dy)
            gdy = gdy + Conv(*self.geometry)(x, g)
        if self.bias and not isinstance(cotangents[1].type, DisconnectedType):
            gb = cotangents[1]
            gdy = gdy + gb.dimshuffle("x", 0, *(["x"] * self.rank))
        return [gx, disconnected_type(), gdy]

    def perform(self, node, inputs, output_storage):
        x, w, dy = inputs[:3]
        self._np_check(x, w, dy)
        n, f = dy.shape[0], w.shape[0]
        cols = _np_im2col(x, w.shape[2:], self)               # (N, CK, P)
        d = self._np_pre_grad(inputs).reshape(n, f, -1)
        dtype = node.outputs[0].dtype
        output_storage[0][0] = np.asarray(np.einsum("nfp,nkp->fk", d, cols).reshape(w.shape),
                                          dtype=dtype)
        if self.bias:
            output_storage[1][0] = np.asarray(d.sum(axis=(0, 2), dtype="float64"), dtype=dtype)

    def jax(self, node):
        """``dW``: the transpose of ``W -> conv(x, W)`` (``W`` gives only its shape) applied to
        ``dy``, masked after a relu; with ``bias``, also ``db``: that ``dy`` summed but over
        filters."""
        import jax

        conv_ = _jax_conv(self)
        bias = self.bias

        taps = _xla_cannot(self)

        def conv_grad_weights(x, w, dy, *y):
            dz = self._jax_pre_grad(dy, *y)
            if taps:
                dw = _jax_weight_grad_by_taps(self, x, dz, w.shape[2:])
            else:
                like = jax.ShapeDtypeStruct(w.shape, dz.dtype)
                (dw,) = jax.linear_transpose(lambda v: conv_(x, v), like)(dz)
            return (dw, dz.sum(axis=(0, *range(2, dz.ndim)))) if bias else dw

        return conv_grad_weights

    def c_code(self, node, name, inputs, outputs, sub):
        x, w, dy = inputs[:3]
        shape = "N_, g_.F, g_.OH, g_.OW"
        checks = [(dy, "dy", shape)] + [(v, "y", shape) for v in inputs[3:]]
        y = "{i[2]}" if len(inputs) == 4 else "(const T_*)NULL"
        db = "{o[1]}" if self.bias else "(T_*)NULL"
        call = "nbconv::grad_weights(N_, {i[0]}, {i[1]}, " + y + ", {o[0]}, " + db + ", sc_, g_)"
        outs = [(outputs[0], "g_.F, g_.C, g_.KH, g_.KW")]
        if self.bias:
            outs.append((outputs[1], "g_.F"))
        return self._c_body(node, name, sub, x, w, checks, [x, dy] + list(inputs[3:]), outs, call)


def conv(x, w, b=None, strides: Sequence[int] = (1, 1), dilation: Sequence[int] | None = None,
         pads: Sequence | None = None, activation: str = "linear"):
    """``act(conv(x (N, C, *spatial), W (F, C, *kernel)) [+ b])`` -> ``(N, F, *out)``;
    ``pads``: ``(before, after)`` zeros per spatial axis (default none); ``activation``:
    ``linear`` or ``relu`` (see :class:`Conv`)."""
    rank = len(strides)
    dilation = (1,) * rank if dilation is None else dilation
    pads = ((0, 0),) * rank if pads is None else pads
    op = Conv(strides, dilation, pads, activation)
    return op(x, w) if b is None else op(x, w, b)


def conv_transpose(x, w, out_spatial: Sequence[int], strides: Sequence[int],
                   dilation: Sequence[int], pads: Sequence):
    """The transposed convolution of ``x (N, C_in, *spatial)`` with ``W (C_in, C_out, *kernel)``
    (PyTorch's ``ConvTranspose`` layout) to ``(N, C_out, *out_spatial)``: the gradient of the
    convolution of such an output with ``W`` (``strides``, ``dilation``, ``pads``) with respect to
    its input, so :class:`ConvGradInput` computes it and :class:`Conv` and
    :class:`ConvGradWeights` its gradients."""
    shape = pt.zeros((x.shape[0], w.shape[1], *[int(n) for n in out_spatial]), dtype=w.dtype)
    return ConvGradInput(strides, dilation, pads)(shape, w, x)


# -- JAX: for the jax backend (jax is imported only when a graph is compiled with it) ------------
def _jax_conv(op: _ConvCOp):
    """``conv(x, W)`` in JAX (no bias, no activation) with the geometry of ``op``; float32 at full
    precision (not a GPU's TF32)."""
    from jax import lax

    def conv_(x, w):
        return lax.conv_general_dilated(x, w, op.strides, op.pads, rhs_dilation=op.dilation,
                                        precision=lax.Precision.HIGHEST)

    return conv_


def _xla_cannot(op: _ConvCOp) -> bool:
    """Whether the gradients of ``op`` are computed by :func:`_jax_taps`' products instead of the
    transposed convolutions JAX makes: on XLA's CPU, for a geometry with both strides and
    dilation. XLA's CPU compiler aborted the process on those of the layer table's
    conv2d_transpose row (kernel 2x3, strides [2, 1], dilation [1, 2], padding 1: "Window
    dimensions do not match RHS shape", jax 0.10.2) even to predict, while other strided, dilated
    geometries compiled; which ones abort is not known, so the rule takes them all."""
    import jax

    return max(op.strides) > 1 and max(op.dilation) > 1 and jax.default_backend() == "cpu"


def _jax_taps(op: _ConvCOp, kernel, out):
    """Per kernel tap: its offset, and the ``lax.slice`` bounds and strides of the window
    positions it meets in the padded input ``(N, C, *padded spatial)``."""
    for offset in itertools.product(*(range(k) for k in kernel)):
        first = [o * d for o, d in zip(offset, op.dilation)]
        last = [f + (m - 1) * s + 1 for f, s, m in zip(first, op.strides, out)]
        yield offset, first, last


def _jax_padded(op: _ConvCOp, spatial) -> list[int]:
    """The lengths of the input's spatial axes with the op's padding."""
    return [n + b + a for n, (b, a) in zip(spatial, op.pads)]


def _jax_weight_grad_by_taps(op: _ConvCOp, x, dz, kernel):
    """``dW[f, c, *k] = sum(dz[:, f] * x_padded[:, c, k * dilation + out * strides])``: one
    product per kernel tap, no convolution (see :func:`_xla_cannot`)."""
    import jax.numpy as jnp
    from jax import lax

    xp = jnp.pad(x, [(0, 0), (0, 0)] + [tuple(p) for p in op.pads])
    summed = [0, *range(2, dz.ndim)]
    rows = []
    for _, first, last in _jax_taps(op, kernel, dz.shape[2:]):
        patch = lax.slice(xp, [0, 0, *first], [*xp.shape[:2], *last], [1, 1, *op.strides])
        rows.append(jnp.tensordot(dz, patch, axes=(summed, summed),
                                  precision=lax.Precision.HIGHEST))  # (F, C)
    return jnp.stack(rows, axis=-1).reshape(dz.shape[1], x.shape[1], *kernel)


def _jax_input_grad_by_taps(op: _ConvCOp, x_shape, w, dz):
    """``dx``: each kernel tap's ``W[:, :, k]``-product with ``dz`` added back at the input
    positions it was read from (``lax.pad`` with interior padding places it at the strides),
    the padding then cut off: no convolution (see :func:`_xla_cannot`)."""
    import jax.numpy as jnp
    from jax import lax

    padded = _jax_padded(op, x_shape[2:])
    dx = jnp.zeros((x_shape[0], x_shape[1], *padded), dz.dtype)
    zero = jnp.array(0, dz.dtype)
    for offset, first, last in _jax_taps(op, w.shape[2:], dz.shape[2:]):
        part = jnp.tensordot(dz, w[(slice(None), slice(None), *offset)], axes=([1], [0]),
                             precision=lax.Precision.HIGHEST)  # (N, *out, C)
        part = jnp.moveaxis(part, -1, 1)
        dx = dx + lax.pad(part, zero, [(0, 0, 0), (0, 0, 0)] + [
            (f, n - l, s - 1) for f, l, n, s in zip(first, last, padded, op.strides)])
    return dx[(slice(None), slice(None), *(slice(b, n - a) for (b, a), n in zip(op.pads, padded)))]


# -- numpy: the same algorithm over the whole batch, for PyTensor's Python modes -------------------
def _np_im2col(x: np.ndarray, kernel, op: _ConvCOp) -> np.ndarray:
    """``(N, C*prod(kernel), prod(out))``: rows in ``W``'s order ``(c, *offset)``."""
    n, c = x.shape[:2]
    out = op.out_lengths(x.shape[2:], kernel)
    xp = np.pad(x, [(0, 0), (0, 0)] + list(op.pads))
    cols = np.empty((n, c, *kernel, *out), dtype=x.dtype)
    for offset in itertools.product(*(range(k) for k in kernel)):
        index = tuple(slice(o * d, o * d + (m - 1) * s + 1, s)
                      for o, d, s, m in zip(offset, op.dilation, op.strides, out))
        cols[(slice(None), slice(None)) + offset] = xp[(slice(None), slice(None)) + index]
    return cols.reshape(n, c * math.prod(kernel), math.prod(out))


def _np_col2im(cols: np.ndarray, x_shape, kernel, op: _ConvCOp) -> np.ndarray:
    """The adjoint of :func:`_np_im2col`: every column added back where it was read."""
    n, c, *spatial = x_shape
    out = op.out_lengths(spatial, kernel)
    padded = [s + b + a for s, (b, a) in zip(spatial, op.pads)]
    dxp = np.zeros((n, c, *padded), dtype=cols.dtype)
    cols = cols.reshape(n, c, *kernel, *out)
    for offset in itertools.product(*(range(k) for k in kernel)):
        index = tuple(slice(o * d, o * d + (m - 1) * s + 1, s)
                      for o, d, s, m in zip(offset, op.dilation, op.strides, out))
        dxp[(slice(None), slice(None)) + index] += cols[(slice(None), slice(None)) + offset]
    crop = tuple(slice(b, b + s) for s, (b, _) in zip(spatial, op.pads))
    return dxp[(slice(None), slice(None)) + crop]
