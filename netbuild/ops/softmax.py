"""Softmax and softmax cross-entropy over the last axis, in C, with their gradients.

Written from PyTensor's elementwise ops and reductions, a softmax classifier's output and loss
took about 25 nodes (max, shift, exp, sum, log, a one-hot mask from ``arange``, and the same
again for the gradient), each a C module of its own: a dozen g++ runs in every cold compile, and
a dozen passes over the logits in every step. Here they are four ops:

- :class:`Softmax` ``p = softmax(x)`` and :class:`SoftmaxGrad` ``dx = p (dp - sum(dp p))``;
- :class:`SoftmaxCrossEntropy` ``loss = -sum(t log softmax(x))``, one value per row, from the
  logits (``logsumexp(x) sum(t) - sum(t x)``: never the log of a probability), for targets ``t``
  of class ids or of rows like ``x``, with label smoothing (``t (1 - s) + s / k``) built in;
- :class:`SoftmaxCrossEntropyGrad` ``dx = dloss (p sum(t) - t)``, which takes ``p`` from the
  network's own :class:`Softmax` node (PyTensor merges the two), so no exponential is computed
  twice.

Rows are every index of the leading axes; each op reads its inputs as C-contiguous rows (copying
a strided input once). Each has a numpy ``perform`` too, for PyTensor's Python modes.
"""

from __future__ import annotations

import numpy as np
import pytensor
import pytensor.tensor as pt
from pytensor.gradient import DisconnectedType, disconnected_type
from pytensor.graph.basic import Apply
from pytensor.graph.replace import graph_replace
from pytensor.link.c.params_type import ParamsType
from pytensor.scalar import float64

from . import CCall, NetbuildCOp


# -- numpy twins (PyTensor's Python modes, and the tests' references) ----------------------------
def _np_lse(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))[..., 0]


def _np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _np_check_classes(op, x: np.ndarray) -> None:
    """The C code's refusal of logits without classes (an empty last axis)."""
    if x.shape[-1] == 0:
        raise ValueError(f"{type(op).__name__}: the logits have no classes (an empty last axis)")


def _np_targets(op, t: np.ndarray, k: int, smoothing: float, dtype) -> np.ndarray:
    """Target rows ``t' = (1 - s) t + s / k`` (class ids become one-hot rows first)."""
    if t.dtype.kind in "iub":
        bad = (t < 0) | (t >= k)
        if bad.any():
            raise ValueError(f"{type(op).__name__}: class id {t[bad].flat[0]} is outside the "
                             f"output's range; expected ids 0..{k - 1}")
        t = np.eye(k, dtype=dtype)[t]
    return ((1.0 - smoothing) * t + smoothing / k).astype(dtype, copy=False)


# -- ops -----------------------------------------------------------------------------------------
def _class_ids(t) -> bool:
    """Whether targets ``t`` are class ids (integers); else they are rows of the logits' type."""
    return t.type.dtype.startswith(("int", "uint"))


def _float(x):
    x = pt.as_tensor_variable(x)
    if x.type.dtype not in ("float32", "float64") or x.type.ndim < 1:
        raise TypeError(f"expected a float tensor of at least one axis; received {x.type}")
    return x


class _RowsCOp(NetbuildCOp):
    """The C skeleton the four ops share: rows of ``k`` (the last axis of ``x``), shape checks,
    contiguous copies of the inputs, the output, then one kernel call without the GIL
    (:class:`netbuild.ops.CCall`)."""

    c_file = "softmax.c"
    extra_compile_args = ("-fno-trapping-math",)  # lets g++ vectorize netbuild_exp's selects

    def _c_body(self, node, name, sub, x: str, inputs: list[tuple[str, str, str, str | None]],
                out: str, out_rank: str, call: str) -> str:
        """``inputs``: ``(variable, name, shape, C type)``, the shape ``"rows_k"`` (as ``x``),
        ``"rows"`` (as ``x`` without its last axis), ``"rows_or_one"`` (that, or a single value)
        or ``"any"`` (not checked), the C type of its data (None: the output's, ``T_``);
        ``out_rank``: ``"rows"`` or ``"rows_k"``; ``call`` (with ``{i[k]}`` the data of input
        ``k``, ``{out}`` that of the output, ``ROWS_``, ``K_``) returns 0, or 1 + the first row
        whose class id is out of range."""
        c = CCall(self, node, name, sub)
        op = type(self).__name__
        c.line(f"const int nd_ = PyArray_NDIM({x});")
        c.line(f"const npy_intp* xd_ = PyArray_DIMS({x});")
        c.line("const npy_intp K_ = xd_[nd_ - 1];")
        c.line("npy_intp ROWS_ = 1;")
        c.line("for (int i_ = 0; i_ < nd_ - 1; ++i_) ROWS_ *= xd_[i_];")
        c.check("K_ != 0", "the logits have no classes (an empty last axis)")
        for v, what, shape, _ in inputs:
            if shape == "any":
                continue
            nd = "nd_" if shape == "rows_k" else "nd_ - 1"
            one = f"PyArray_SIZE({v}) == 1" if shape == "rows_or_one" else "false"
            c.when_ok(
                f"const bool one_ = {one}; bool ok_ = one_ || PyArray_NDIM({v}) == {nd}; "
                f"for (int i_ = 0; !one_ && ok_ && i_ < {nd}; ++i_) "
                f"ok_ = PyArray_DIMS({v})[i_] == xd_[i_]; "
                f"if (!ok_) {{ PyErr_Format(PyExc_ValueError, \"{op}: the shape of {what} does not "
                f"match {'the rows of ' if shape != 'rows_k' else ''}the logits\"); err_ = 1; }}")
        ins = [c.input(v, ctype) for v, _, _, ctype in inputs]
        # the output has x's shape, or its rows' (any number of axes: no initializer list)
        nd = "nd_" if out_rank == "rows_k" else "nd_ - 1"
        c.when_ok(f"err_ = netbuild_output(&{out}, {nd}, xd_, {c.typenum});")
        c.line("npy_intp bad_ = 0;")
        c.run("bad_ = " + call.format(i=ins, out=f"(({c.ctype}*)PyArray_DATA({out}))"))
        c.check("bad_ == 0", "the class id of row %ld is outside the output's range; expected "
                "ids 0..%ld", "(long)(bad_ - 1)", "(long)(K_ - 1)")
        return c.code()


class Softmax(_RowsCOp):
    """``p = exp(x - max) / sum(exp(x - max))`` over the last axis."""

    __props__ = ()

    def make_node(self, x):
        x = _float(x)
        return Apply(self, [x], [x.type()])

    def infer_shape(self, fgraph, node, shapes):
        return [shapes[0]]

    def pullback(self, inputs, outputs, cotangents):
        (dp,) = cotangents
        if isinstance(dp.type, DisconnectedType):
            return [disconnected_type()]
        return [SoftmaxGrad()(dp, outputs[0])]

    def perform(self, node, inputs, output_storage):
        _np_check_classes(self, inputs[0])
        output_storage[0][0] = _np_softmax(inputs[0]).astype(node.outputs[0].dtype, copy=False)

    def c_code(self, node, name, inputs, outputs, sub):
        (x,), (p,) = inputs, outputs
        call = "(nbsoftmax::softmax<T_>({i[0]}, {out}, ROWS_, K_), 0)"
        return self._c_body(node, name, sub, x, [(x, "x", "any", None)], p, "rows_k", call)

    def jax(self, node):
        """``p = exp(x - max) / sum(exp(x - max))`` over the last axis."""
        import jax.numpy as jnp

        def softmax(x):
            e = jnp.exp(x - jnp.max(x, axis=-1, keepdims=True))
            return e / jnp.sum(e, axis=-1, keepdims=True)

        return softmax


class SoftmaxGrad(_RowsCOp):
    """``dx = p (dp - sum(dp p))`` over the last axis: the gradient of :class:`Softmax`'s input
    from its output ``p`` and the output's gradient ``dp``."""

    __props__ = ()

    def make_node(self, dp, p):
        p = _float(p)
        dp = pt.cast(pt.as_tensor_variable(dp), p.dtype)
        if dp.type.ndim != p.type.ndim:
            raise TypeError(f"SoftmaxGrad: dp has {dp.type.ndim} axes; expected {p.type.ndim}")
        return Apply(self, [dp, p], [p.type()])

    def infer_shape(self, fgraph, node, shapes):
        return [shapes[1]]

    def pullback(self, inputs, outputs, cotangents):
        return _pullback_of(lambda dp, p: p * (dp - (dp * p).sum(axis=-1, keepdims=True)), inputs,
                            cotangents[0])

    def perform(self, node, inputs, output_storage):
        dp, p = inputs
        _np_check_classes(self, p)
        dx = p * (dp - (dp * p).sum(axis=-1, keepdims=True))
        output_storage[0][0] = dx.astype(node.outputs[0].dtype, copy=False)

    def c_code(self, node, name, inputs, outputs, sub):
        (dp, p), (dx,) = inputs, outputs
        call = "(nbsoftmax::softmax_grad<T_>({i[0]}, {i[1]}, {out}, ROWS_, K_), 0)"
        return self._c_body(node, name, sub, p, [(dp, "dp", "rows_k", None), (p, "p", "any", None)],
                            dx, "rows_k", call)

    def jax(self, node):
        """``dx = p (dp - sum(dp p))`` over the last axis."""
        import jax.numpy as jnp

        def softmax_grad(dp, p):
            return p * (dp - jnp.sum(dp * p, axis=-1, keepdims=True))

        return softmax_grad


class _CrossEntropyCOp(_RowsCOp):
    """The label smoothing ``s`` is a run-time parameter: one module serves every value."""

    __props__ = ("smoothing",)
    params_type = ParamsType(smoothing=float64)

    def __init__(self, smoothing: float = 0.0):
        self.smoothing = float(smoothing)
        if not 0.0 <= self.smoothing <= 1.0:
            raise ValueError(f"label smoothing must be in [0, 1]; received {smoothing}")

    def get_params(self, node):
        return self.params_type.get_params(smoothing=self.smoothing)

    @staticmethod
    def _targets(t, x):
        """Class ids (an integer tensor with one axis fewer than ``x``) or rows like ``x``."""
        t = pt.as_tensor_variable(t)
        if _class_ids(t) and t.type.ndim == x.type.ndim - 1:
            return t
        if t.type.ndim != x.type.ndim:
            raise TypeError(f"targets {t.type} need {x.type.ndim - 1} axes (class ids) or "
                            f"{x.type.ndim} (rows like the logits {x.type})")
        return pt.cast(t, x.dtype)

    def _smoothed_rows(self, t, k, dtype: str):
        """Symbolic ``t' = (1 - s) t + s / k`` (class ids as one-hot rows)."""
        if _class_ids(t):
            t = pt.eq(t[..., None], pt.arange(k)).astype(dtype)
        return (1.0 - self.smoothing) * t + self.smoothing / k.astype(dtype)

    def _jax_rows(self, t, k: int, ids: bool, dtype):
        """JAX: the smoothed target rows ``t' = (1 - s) t + s / k`` (class ids as one-hot rows).
        JAX cannot raise inside a compiled function: for a class id outside ``[0, k)`` the ops
        give NaN in its row instead of the C code's ValueError."""
        import jax.numpy as jnp

        if ids:
            t = (t[..., None] == jnp.arange(k)).astype(dtype)
        return (1.0 - self.smoothing) * t + self.smoothing / k


class SoftmaxCrossEntropy(_CrossEntropyCOp):
    """``loss = -sum(t' log softmax(x))`` over the last axis, from the logits ``x`` and targets
    ``t``: class ids (``t' `` their one-hot rows) or rows like ``x``, smoothed to
    ``t' = (1 - s) t + s / k``."""

    def make_node(self, x, t):
        x = _float(x)
        t = self._targets(t, x)
        return Apply(self, [x, t], [pt.tensor(dtype=x.dtype, shape=x.type.shape[:-1])])

    def infer_shape(self, fgraph, node, shapes):
        return [shapes[0][:-1]]

    def connection_pattern(self, node):
        return [[True], [not _class_ids(node.inputs[1])]]

    def pullback(self, inputs, outputs, cotangents):
        x, t = inputs
        (dl,) = cotangents
        if isinstance(dl.type, DisconnectedType):
            return [disconnected_type(), disconnected_type()]
        dx = SoftmaxCrossEntropyGrad(self.smoothing)(dl, Softmax()(x), t)
        if _class_ids(t):
            return [dx, disconnected_type()]
        m = pt.max(x, axis=-1, keepdims=True)
        log_p = x - m - pt.log(pt.exp(x - m).sum(axis=-1, keepdims=True))
        return [dx, -(1.0 - self.smoothing) * dl[..., None] * log_p]

    def perform(self, node, inputs, output_storage):
        x, t = inputs
        x = x.astype(np.float64)  # as the C code: logsumexp - x[y] in double, no cancellation
        _np_check_classes(self, x)
        rows = _np_targets(self, t, x.shape[-1], self.smoothing, x.dtype)
        loss = rows.sum(axis=-1) * _np_lse(x) - (rows * x).sum(axis=-1)
        output_storage[0][0] = np.asarray(loss, dtype=node.outputs[0].dtype)

    def c_code(self, node, name, inputs, outputs, sub):
        (x, t), (loss,) = inputs, outputs
        s = f"{sub['params']}->smoothing"
        if not _class_ids(node.inputs[1]):
            call = f"(nbsoftmax::xent_rows<T_>({{i[0]}}, {{i[1]}}, {{out}}, ROWS_, K_, {s}), 0)"
            shape, it = "rows_k", None
        else:
            it = f"dtype_{t}"
            call = f"nbsoftmax::xent_ids<T_, {it}>({{i[0]}}, {{i[1]}}, {{out}}, ROWS_, K_, {s})"
            shape = "rows"
        return self._c_body(node, name, sub, x, [(x, "x", "any", None),
                                                 (t, "the targets", shape, it)], loss, "rows", call)

    def jax(self, node):
        """``loss = sum(t') logsumexp(x) - sum(t' x)`` over the last axis, as
        ``sum(t') log(sum(exp(z))) - sum(t' z)`` of ``z = x - max`` (no cancellation of large
        logits in float32); for class ids ``y``, as the C: ``log(sum(exp(z))) - (1 - s) z[y] -
        s/k sum(z)`` (a ``-inf`` logit of another class stays out); NaN in a row whose class id
        is outside ``[0, k)``."""
        import jax.numpy as jnp

        ids, s = _class_ids(node.inputs[1]), self.smoothing

        def softmax_cross_entropy(x, t):
            k = x.shape[-1]
            z = x - jnp.max(x, axis=-1, keepdims=True)
            lse = jnp.log(jnp.sum(jnp.exp(z), axis=-1))
            if not ids:
                rows = self._jax_rows(t, k, False, x.dtype)
                return jnp.sum(rows, axis=-1) * lse - jnp.sum(rows * z, axis=-1)
            zy = jnp.take_along_axis(z, t[..., None], axis=-1, mode="clip")[..., 0]
            loss = lse - (1.0 - s) * zy - (s / k * jnp.sum(z, axis=-1) if s else 0.0)
            return jnp.where((t < 0) | (t >= k), jnp.nan, loss)

        return softmax_cross_entropy


class SoftmaxCrossEntropyGrad(_CrossEntropyCOp):
    """``dx = dl (p sum(t') - t')``: the gradient of :class:`SoftmaxCrossEntropy`'s logits from
    the loss's gradient ``dl`` (one value per row, or one for all), the softmax ``p`` of the
    logits and the targets ``t``."""

    def make_node(self, dl, p, t):
        p = _float(p)
        dl = pt.cast(pt.as_tensor_variable(dl), p.dtype)
        if dl.type.ndim != p.type.ndim - 1:
            raise TypeError(f"SoftmaxCrossEntropyGrad: dl has {dl.type.ndim} axes; expected "
                            f"{p.type.ndim - 1}")
        t = self._targets(t, p)
        return Apply(self, [dl, p, t], [p.type()])

    def infer_shape(self, fgraph, node, shapes):
        return [shapes[1]]

    def connection_pattern(self, node):
        return [[True], [True], [not _class_ids(node.inputs[2])]]

    def pullback(self, inputs, outputs, cotangents):
        dl, p, t = inputs

        def dx(dl, p, t=t):
            rows = self._smoothed_rows(t, p.shape[-1], p.dtype)
            return dl[..., None] * (p * rows.sum(axis=-1, keepdims=True) - rows)

        if not _class_ids(t):
            return _pullback_of(dx, [dl, p, t], cotangents[0])
        return _pullback_of(dx, [dl, p], cotangents[0]) + [disconnected_type()]

    def perform(self, node, inputs, output_storage):
        dl, p, t = inputs
        _np_check_classes(self, p)
        rows = _np_targets(self, t, p.shape[-1], self.smoothing, p.dtype)
        dl = np.broadcast_to(dl, p.shape[:-1])
        dx = dl[..., None] * (p * rows.sum(axis=-1, keepdims=True) - rows)
        output_storage[0][0] = dx.astype(node.outputs[0].dtype, copy=False)

    def c_code(self, node, name, inputs, outputs, sub):
        (dl, p, t), (dx,) = inputs, outputs
        s = f"{sub['params']}->smoothing"
        # dl: one value per row, or a single value broadcast to every row (gstep 0)
        gstep = f"(PyArray_SIZE({dl}) == 1 && ROWS_ != 1 ? 0 : 1)"
        if not _class_ids(node.inputs[2]):
            call = (f"(nbsoftmax::xent_rows_grad<T_>({{i[0]}}, {gstep}, {{i[1]}}, {{i[2]}}, "
                    f"{{out}}, ROWS_, K_, {s}), 0)")
            shape, it = "rows_k", None
        else:
            it = f"dtype_{t}"
            call = (f"nbsoftmax::xent_ids_grad<T_, {it}>({{i[0]}}, {gstep}, {{i[1]}}, {{i[2]}}, "
                    f"{{out}}, ROWS_, K_, {s})")
            shape = "rows"
        return self._c_body(node, name, sub, p, [(dl, "dl", "rows_or_one", None),
                                                 (p, "p", "any", None),
                                                 (t, "the targets", shape, it)], dx, "rows_k", call)

    def jax(self, node):
        """``dx = dl (p sum(t') - t')`` (``dl`` one value per row, or one for all); NaN in a row
        whose class id is outside ``[0, k)``."""
        import jax.numpy as jnp

        ids = _class_ids(node.inputs[2])

        def softmax_cross_entropy_grad(dl, p, t):
            k = p.shape[-1]
            rows = self._jax_rows(t, k, ids, p.dtype)
            dx = dl[..., None] * (p * jnp.sum(rows, axis=-1, keepdims=True) - rows)
            return jnp.where(((t < 0) | (t >= k))[..., None], jnp.nan, dx) if ids else dx

        return softmax_cross_entropy_grad


def _pullback_of(build, inputs: list, cotangent) -> list:
    """The pullback of ``build(*inputs)``, a symbolic expression (second derivatives, rarely
    needed). It is differentiated with respect to stand-ins of ``inputs``, then the inputs
    replace them: where one input is computed from another (``dp = 2 p``), the chain rule
    already follows that path outside this op."""
    if isinstance(cotangent.type, DisconnectedType):
        return [disconnected_type() for _ in inputs]
    stand_ins = [v.type() for v in inputs]
    grads = pytensor.grad(None, stand_ins, known_grads={build(*stand_ins): cotangent},
                          disconnected_inputs="ignore", return_disconnected="zero")
    return graph_replace(grads, dict(zip(stand_ins, inputs)), strict=False)


def softmax(x):
    """The softmax of ``x`` over its last axis (:class:`Softmax`)."""
    return Softmax()(x)


def softmax_cross_entropy(logits, targets, smoothing: float = 0.0):
    """Each row's cross-entropy of ``softmax(logits)`` against ``targets`` (class ids or rows),
    label-smoothed by ``smoothing`` (:class:`SoftmaxCrossEntropy`)."""
    return SoftmaxCrossEntropy(smoothing)(logits, targets)
