"""Fused optimizer steps: one C loop per parameter instead of PyTensor's elementwise graph.

PyTensor's fused elementwise loops index every operand through run-time strides and write its
float constants as doubles, so g++ cannot vectorize them; Adam's update of a 784 x 512 weight
took 2-3 ms a step, as long as the layer's matrix products. :class:`AdamStep` reads each of
``p, m, v, g`` once, in one contiguous, vectorizable loop, and updates ``p, m, v`` in place.
"""

from __future__ import annotations

import numpy as np
import pytensor.tensor as pt
from pytensor.compile import optdb
from pytensor.graph.basic import Apply
from pytensor.graph.rewriting.basic import WalkingGraphRewriter, node_rewriter

from . import NetbuildCOp


class AdamStep(NetbuildCOp):
    """``(p, m, v, g, step_size, inv_sqrt_bc2, decay) -> (p', m', v')``, elementwise::

        m' = beta1 m + (1 - beta1) g
        v' = beta2 v + (1 - beta2) g^2
        p' = (1 - decay) p - step_size m' / (sqrt(v') inv_sqrt_bc2 + epsilon)

    As PyTorch's Adam: ``step_size = lr / (1 - beta1^t)``, ``inv_sqrt_bc2 = 1 / sqrt(1 - beta2^t)``;
    ``decay = lr * weight_decay`` gives AdamW (0 for Adam). With ``inplace``, ``p, m, v`` are
    overwritten (the compiled function's updates of their shared variables).
    """

    __props__ = ("beta1", "beta2", "epsilon", "inplace")

    def __init__(self, beta1: float, beta2: float, epsilon: float, inplace: bool = False):
        self.beta1, self.beta2, self.epsilon = float(beta1), float(beta2), float(epsilon)
        self.inplace = bool(inplace)
        if self.inplace:
            self.destroy_map = {0: [0], 1: [1], 2: [2]}

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
        m2 = self.beta1 * m + (1 - self.beta1) * g
        v2 = self.beta2 * v + (1 - self.beta2) * g * g
        p2 = (1 - decay) * p - step * m2 / (np.sqrt(v2) * isb + self.epsilon)
        dtype = node.outputs[0].dtype
        for out, value in zip(outputs, (p2, m2, v2)):
            out[0] = np.asarray(value, dtype=dtype)

    def infer_shape(self, fgraph, node, shapes):
        return [shapes[0], shapes[0], shapes[0]]

    def c_code_cache_version(self):
        return (3,)

    def c_compile_args(self, **kwargs):
        return ["-fno-math-errno"]  # lets g++ vectorize sqrt

    def c_code(self, node, name, inputs, outputs, sub):
        p, m, v, g, step, isb, decay = inputs
        fail = sub["fail"]
        dtype = f"dtype_{p}"
        take = []
        for out, src in zip(outputs, (p, m, v)):
            take.append(f"""
            Py_XDECREF({out});
            if ({int(self.inplace)} && PyArray_IS_C_CONTIGUOUS({src}) && PyArray_ISWRITEABLE({src})) {{
                {out} = {src};
                Py_INCREF({out});
            }} else {{
                {out} = (PyArrayObject*)PyArray_NewCopy({src}, NPY_CORDER);
                if (!{out}) {{ {fail} }}
            }}""")
        p_out, m_out, v_out = outputs
        return f"""
        {{
            const npy_intp n = PyArray_SIZE({p});
            if (PyArray_SIZE({m}) != n || PyArray_SIZE({v}) != n || PyArray_SIZE({g}) != n) {{
                PyErr_Format(PyExc_ValueError, "AdamStep: parameter, moments and gradient differ "
                             "in size (%ld, %ld, %ld, %ld)", (long)n, (long)PyArray_SIZE({m}),
                             (long)PyArray_SIZE({v}), (long)PyArray_SIZE({g}));
                {fail}
            }}
            {''.join(take)}
            PyArrayObject* g_c = PyArray_GETCONTIGUOUS({g});
            if (!g_c) {{ {fail} }}
            typedef {dtype} T;
            netbuild_adam_step<T>(
                (T*)PyArray_DATA({p_out}), (T*)PyArray_DATA({m_out}), (T*)PyArray_DATA({v_out}),
                (const T*)PyArray_DATA(g_c), n,
                ((dtype_{step}*)PyArray_DATA({step}))[0], ((dtype_{isb}*)PyArray_DATA({isb}))[0],
                (T)1 - ((dtype_{decay}*)PyArray_DATA({decay}))[0],
                (T){self.beta1!r}, (T){self.beta2!r}, (T){self.epsilon!r});
            Py_DECREF(g_c);
        }}
        """

    def c_headers(self, **kwargs):
        return ["<cmath>"]

    def c_support_code(self, **kwargs):
        # A function of its own, not inlined: g++ honours __restrict__ on parameters, and does
        # not treat the loop as cold code (inlined after PyTensor's error checks, it was compiled
        # for size: scalar, 5x slower).
        return """
        template <typename T>
        __attribute__((noinline)) static void netbuild_adam_step(
                T* __restrict__ P, T* __restrict__ M, T* __restrict__ V, const T* __restrict__ G,
                npy_intp n, T step, T isb, T keep, T b1, T b2, T eps) {
            const T c1 = (T)1 - b1, c2 = (T)1 - b2;
            for (npy_intp i = 0; i < n; ++i) {
                const T gi = G[i];
                const T mi = b1 * M[i] + c1 * gi;
                const T vi = b2 * V[i] + c2 * gi * gi;
                M[i] = mi;
                V[i] = vi;
                P[i] = keep * P[i] - step * mi / (std::sqrt(vi) * isb + eps);
            }
        }
        """


def adam_step(p, m, v, g, step_size, inv_sqrt_bc2, decay, beta1, beta2, epsilon):
    """The three outputs ``(p', m', v')`` of :class:`AdamStep`; compiling makes it work in place
    where the graph allows (a user's graph may not hold in-place ops)."""
    return AdamStep(beta1, beta2, epsilon)(p, m, v, g, step_size, inv_sqrt_bc2, decay)


@node_rewriter([AdamStep], inplace=True)
def inplace_adam_step(fgraph, node):
    """Update ``p, m, v`` in place (PyTensor's destroy handler refuses it where they are still
    read afterwards, or are not the function's own shared variables)."""
    if node.op.inplace:
        return False
    op = AdamStep(node.op.beta1, node.op.beta2, node.op.epsilon, inplace=True)
    return op(*node.inputs, return_list=True)


# In PyTensor's "inplace" phase, beside its own in-place rewrites.
optdb.register("netbuild_inplace_adam_step",
               WalkingGraphRewriter(inplace_adam_step, failure_callback=WalkingGraphRewriter.warn_inplace),
               "fast_run", "inplace", position=50.1)
