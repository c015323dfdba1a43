"""Fused optimizer steps: one C loop per parameter instead of PyTensor's elementwise graph.

PyTensor's fused elementwise loops index every operand through run-time strides and write its
float constants as doubles, so g++ cannot vectorize them; Adam's update of a 784 x 512 weight
took 2-3 ms a step, as long as the layer's matrix products. :class:`AdamStep` reads each of
``p, m, v, g`` once, in one contiguous, vectorizable loop, and updates ``p, m, v`` in place.
:class:`DescentStep` is SGD-momentum's ``p -= lr * v`` (the velocity itself is PyTensor's Gemm,
``v = momentum * v + x.T @ delta``, in place). Both run on netbuild's threads, each element on
its own: the same bits on any thread count.
"""

from __future__ import annotations

import numpy as np
import pytensor.tensor as pt
from pytensor.compile import optdb
from pytensor.graph.basic import Apply
from pytensor.graph.rewriting.basic import WalkingGraphRewriter, node_rewriter

from . import CTYPES, CCall, NetbuildCOp


def _same_shape(c: CCall, p: str, other: str, label: str) -> None:
    """C: ValueError unless ``other`` has the parameter ``p``'s shape (same message as
    :func:`_same_shape_py`)."""
    c.check(f"PyArray_NDIM({other}) == PyArray_NDIM({p}) && PyArray_CompareLists("
            f"PyArray_DIMS({other}), PyArray_DIMS({p}), PyArray_NDIM({p}))",
            f"the parameter and its {label} differ in shape (%ld and %ld elements)",
            f"(long)PyArray_SIZE({p})", f"(long)PyArray_SIZE({other})")


def _same_shape_py(op, p, other, label: str) -> None:
    if p.shape != other.shape:
        raise ValueError(f"{op}: the parameter and its {label} differ in shape "
                         f"({p.size} and {other.size} elements)")


class AdamStep(NetbuildCOp):
    """``(p, m, v, g, step_size, inv_sqrt_bc2, decay) -> (p', m', v')``, elementwise::

        m' = beta1 m + (1 - beta1) g
        v' = beta2 v + (1 - beta2) g^2
        p' = (1 - decay) p - step_size m' / (sqrt(v') inv_sqrt_bc2 + epsilon)

    As PyTorch's Adam: ``step_size = lr / (1 - beta1^t)``, ``inv_sqrt_bc2 = 1 / sqrt(1 - beta2^t)``;
    ``decay = lr * weight_decay`` gives AdamW (0 for Adam). With ``inplace``, ``p, m, v`` are
    overwritten (the compiled function's updates of their shared variables).
    """

    c_file = "update.c"
    extra_compile_args = ("-fno-math-errno",)  # lets g++ vectorize sqrt

    __props__ = ("beta1", "beta2", "epsilon", "inplace")

    def __init__(self, beta1: float, beta2: float, epsilon: float, inplace: bool = False):
        self.beta1, self.beta2, self.epsilon = float(beta1), float(beta2), float(epsilon)
        self.inplace = bool(inplace)
        if self.inplace:
            self.destroy_map = {0: [0], 1: [1], 2: [2]}

    def in_place(self) -> "AdamStep":
        return AdamStep(self.beta1, self.beta2, self.epsilon, inplace=True)

    def make_node(self, p, m, v, g, step_size, inv_sqrt_bc2, decay):
        p = pt.as_tensor_variable(p)
        tensors = [p] + [pt.as_tensor_variable(t).astype(p.dtype) for t in (m, v, g)]
        for t in tensors[1:]:
            if t.type.ndim != p.type.ndim:
                raise TypeError(f"AdamStep: {t} has {t.type.ndim} axes; expected {p.type.ndim}")
        scalars = [pt.as_tensor_variable(s).astype(p.dtype) for s in (step_size, inv_sqrt_bc2, decay)]
        for s in scalars:
            if s.type.ndim != 0:
                raise TypeError(f"AdamStep: {s} is not a scalar")
        return Apply(self, tensors + scalars, [p.type(), p.type(), p.type()])

    def perform(self, node, inputs, outputs):
        p, m, v, g, step, isb, decay = inputs
        for other, label in ((m, "first moment"), (v, "second moment"), (g, "gradient")):
            _same_shape_py(self, p, other, label)
        m2 = self.beta1 * m + (1 - self.beta1) * g
        v2 = self.beta2 * v + (1 - self.beta2) * g * g
        p2 = (1 - decay) * p - step * m2 / (np.sqrt(v2) * isb + self.epsilon)
        dtype = node.outputs[0].dtype
        for out, value in zip(outputs, (p2, m2, v2)):
            out[0] = np.asarray(value, dtype=dtype)

    def infer_shape(self, fgraph, node, shapes):
        return [shapes[0], shapes[0], shapes[0]]

    def jax(self, node):
        """The same step in JAX (its arrays are never updated in place: JAX returns new ones)."""
        import jax.numpy as jnp

        beta1, beta2, epsilon = self.beta1, self.beta2, self.epsilon

        def adam_step(p, m, v, g, step, isb, decay):
            b1, b2, eps = (jnp.asarray(c, p.dtype) for c in (beta1, beta2, epsilon))  # as the C: in T
            m2 = b1 * m + (1 - b1) * g
            v2 = b2 * v + (1 - b2) * g * g
            p2 = (1 - decay) * p - step * m2 / (jnp.sqrt(v2) * isb + eps)
            return p2, m2, v2

        return adam_step

    def c_code(self, node, name, inputs, outputs, sub):
        """Take ``p, m, v`` (themselves when in place and they allow it, else copies), then the
        step without the GIL (:class:`netbuild.ops.CCall`)."""
        if node.outputs[0].dtype not in CTYPES:
            raise NotImplementedError(f"AdamStep: no C code for {node.outputs[0].dtype}")
        p, m, v, g, step, isb, decay = inputs
        c = CCall(self, node, name, sub)
        c.line(f"const npy_intp n_ = PyArray_SIZE({p});")
        for other, label in ((m, "first moment"), (v, "second moment"), (g, "gradient")):
            _same_shape(c, p, other, label)
        # the outputs are p, m, v themselves (in place) or copies of them
        p_out, m_out, v_out = (c.updated(out, src, self.inplace)
                               for out, src in zip(outputs, (p, m, v)))
        grad = c.input(g)
        c.run(f"netbuild_adam_step<T_>({p_out}, {m_out}, {v_out}, {grad}, n_, "
              f"((dtype_{step}*)PyArray_DATA({step}))[0], ((dtype_{isb}*)PyArray_DATA({isb}))[0], "
              f"(T_)1 - ((dtype_{decay}*)PyArray_DATA({decay}))[0], "
              f"(T_){self.beta1!r}, (T_){self.beta2!r}, (T_){self.epsilon!r})")
        return c.code()


class DescentStep(NetbuildCOp):
    """``(p, d, lr) -> p - lr * d``, elementwise (``d``: SGD's velocity); with ``inplace``, ``p``
    is overwritten (the compiled function's update of its shared variable)."""

    c_file = "update.c"
    __props__ = ("inplace",)

    def __init__(self, inplace: bool = False):
        self.inplace = bool(inplace)
        if self.inplace:
            self.destroy_map = {0: [0]}

    def in_place(self) -> "DescentStep":
        return DescentStep(inplace=True)

    def make_node(self, p, d, lr):
        p = pt.as_tensor_variable(p)
        d = pt.as_tensor_variable(d).astype(p.dtype)
        lr = pt.as_tensor_variable(lr).astype(p.dtype)
        if d.type.ndim != p.type.ndim:
            raise TypeError(f"DescentStep: {d} has {d.type.ndim} axes; expected {p.type.ndim}")
        if lr.type.ndim != 0:
            raise TypeError(f"DescentStep: {lr} is not a scalar")
        return Apply(self, [p, d, lr], [p.type()])

    def perform(self, node, inputs, outputs):
        p, d, lr = inputs
        _same_shape_py(self, p, d, "step")
        outputs[0][0] = np.asarray(p - lr * d, dtype=node.outputs[0].dtype)

    def infer_shape(self, fgraph, node, shapes):
        return [shapes[0]]

    def jax(self, node):
        def descent_step(p, d, lr):
            return p - lr * d

        return descent_step

    def c_code(self, node, name, inputs, outputs, sub):
        if node.outputs[0].dtype not in CTYPES:
            raise NotImplementedError(f"DescentStep: no C code for {node.outputs[0].dtype}")
        p, d, lr = inputs
        c = CCall(self, node, name, sub)
        c.line(f"const npy_intp n_ = PyArray_SIZE({p});")
        _same_shape(c, p, d, "step")
        p_out = c.updated(outputs[0], p, self.inplace)
        step = c.input(d)
        c.run(f"netbuild_descent_step<T_>({p_out}, {step}, n_, "
              f"((dtype_{lr}*)PyArray_DATA({lr}))[0])")
        return c.code()


def descent_step(p, d, lr):
    """``p - lr * d`` (:class:`DescentStep`); compiling makes it work in place where the graph
    allows."""
    return DescentStep()(p, d, lr)


def adam_step(p, m, v, g, step_size, inv_sqrt_bc2, decay, beta1, beta2, epsilon):
    """The three outputs ``(p', m', v')`` of :class:`AdamStep`; compiling makes it work in place
    where the graph allows (a user's graph may not hold in-place ops)."""
    return AdamStep(beta1, beta2, epsilon)(p, m, v, g, step_size, inv_sqrt_bc2, decay)


@node_rewriter([AdamStep, DescentStep], inplace=True)
def inplace_update_step(fgraph, node):
    """Update the parameter (and Adam's moments) in place (PyTensor's destroy handler refuses it
    where they are still read afterwards, or are not the function's own shared variables)."""
    if node.op.inplace:
        return False
    return node.op.in_place()(*node.inputs, return_list=True)


# In PyTensor's "inplace" phase, beside its own in-place rewrites.
optdb.register("netbuild_inplace_update_step",
               WalkingGraphRewriter(inplace_update_step, failure_callback=WalkingGraphRewriter.warn_inplace),
               "fast_run", "inplace", position=50.1)
