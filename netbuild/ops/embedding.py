"""The embedding's lookup ``y = W[ids]`` and its gradient, in C.

PyTensor's ``W[ids]`` has C code, but the gradient it builds (``AdvancedIncSubtensor1`` of a
matrix) has none in PyTensor 3: every training step of an embedding ran a Python node.
:class:`Gather` takes ``W (N, D)`` and a vector of ``ids (n,)`` and gives ``y (n, D)``; its
gradient :class:`GatherGrad` is ``dW (N, D)``: zeros, then ``dW[ids[i]] += dy[i]`` for every
``i`` in order (the same bits on any number of threads: threads share the columns, not the ids).
An id outside ``[0, N)`` is an IndexError naming it (negative ids do not wrap around).
"""

from __future__ import annotations

import numpy as np
import pytensor.tensor as pt
from pytensor.gradient import disconnected_type
from pytensor.graph.basic import Apply

from . import CCall, NetbuildCOp


def _ids(ids):
    ids = pt.as_tensor_variable(ids)
    if ids.type.ndim != 1 or not ids.dtype.startswith(("int", "uint")):
        raise TypeError(f"ids must be a vector of integers; received {ids.type}")
    return pt.cast(ids, "int64")


def _check_ids(ids: np.ndarray, rows: int) -> None:
    bad = np.flatnonzero((ids < 0) | (ids >= rows))
    if bad.size:
        i = int(bad[0])
        raise IndexError(f"id {int(ids[i])} at position {i} is outside [0, {rows})")


class _EmbeddingCOp(NetbuildCOp):
    c_file = "embedding.c"
    __props__ = ()

    def _ids_check(self, c: CCall, W: str, ids: str) -> str:
        """The ids' data pointer, after an IndexError for the first one outside W's rows."""
        ptr = c.input(ids, "npy_int64")
        c.line("npy_intp bad_ = -1;")
        c.when_ok(f"bad_ = nbemb_first_bad({ptr}, PyArray_SIZE({ids}), PyArray_DIMS({W})[0]); "
                  f"if (bad_ >= 0) {{ PyErr_Format(PyExc_IndexError, \"id %ld at position %ld is "
                  f"outside [0, %ld)\", (long){ptr}[bad_], (long)bad_, "
                  f"(long)PyArray_DIMS({W})[0]); err_ = 1; }}")
        return ptr


#: The ids out of range that the jax backend's :class:`Gather` met while computing, as
#: ``(id, position, rows)``: JAX cannot raise inside a compiled function, so a host callback
#: notes them here and :func:`netbuild.model.ids_in_range` raises the first.
jax_bad_ids: list = []


def _note_bad_ids(rows: int, any_bad, position, value) -> None:
    if any_bad:
        jax_bad_ids.append((int(value), int(position), rows))


class Gather(_EmbeddingCOp):
    """``y (n, D) = W[ids]`` for ``W (N, D)`` and ``ids (n,)``. ``checked``: the ids were checked
    before the graph runs (a network input's, by the data checks); on jax, ids the graph computes
    (``checked`` False) are checked as it runs, by a host callback (:data:`jax_bad_ids`)."""

    __props__ = ("checked",)

    def __init__(self, checked: bool = False):
        super().__init__()
        self.checked = bool(checked)

    def make_node(self, W, ids):
        W = pt.as_tensor_variable(W)
        if W.type.ndim != 2:
            raise TypeError(f"Gather: W must be a matrix; received {W.type}")
        ids = _ids(ids)
        return Apply(self, [W, ids], [pt.tensor(dtype=W.dtype, shape=(ids.type.shape[0],
                                                                      W.type.shape[1]))])

    def infer_shape(self, fgraph, node, shapes):
        return [(shapes[1][0], shapes[0][1])]

    def connection_pattern(self, node):
        return [[True], [False]]

    def pullback(self, inputs, outputs, cotangents):
        W, ids = inputs
        return [GatherGrad()(W, ids, cotangents[0]), disconnected_type()]

    def perform(self, node, inputs, output_storage):
        W, ids = inputs
        _check_ids(ids, W.shape[0])
        output_storage[0][0] = W[ids]

    def c_code(self, node, name, inputs, outputs, sub):
        W, ids = inputs
        (y,) = outputs
        c = CCall(self, node, name, sub)
        c.check(f"PyArray_NDIM({W}) == 2 && PyArray_NDIM({ids}) == 1",
                "W must be a matrix and ids a vector")
        w = c.input(W)
        i = self._ids_check(c, W, ids)
        out = c.output(y, f"PyArray_SIZE({ids}), PyArray_DIMS({W})[1]")
        c.run(f"nbemb_gather({w}, PyArray_DIMS({W})[1], {i}, PyArray_SIZE({ids}), {out})")
        return c.code()

    def jax(self, node):
        """``y = W[ids]`` (``jnp.take``); NaN rows for ids outside ``[0, N)`` (JAX cannot raise
        inside a compiled function, and negative ids must not wrap around), noted in
        :data:`jax_bad_ids` unless the ids were ``checked``."""
        import functools

        import jax
        import jax.numpy as jnp

        checked = self.checked

        def gather(W, ids):
            n = W.shape[0]
            bad = (ids < 0) | (ids >= n)
            if not checked and ids.shape[0]:  # (static under jax.jit)
                first = jnp.argmax(bad)
                jax.debug.callback(functools.partial(_note_bad_ids, n), jnp.any(bad), first,
                                   ids[first])
            ids = jnp.where(bad, n, ids)  # n: out of bounds, filled
            return jnp.take(W, ids, axis=0, mode="fill", fill_value=jnp.nan)

        return gather


class GatherGrad(_EmbeddingCOp):
    """``dW (N, D)`` from ``(W, ids, dy)``: zeros, then ``dW[ids[i]] += dy[i]`` in order of
    ``i``. ``W`` gives only the shape."""

    def make_node(self, W, ids, dy):
        W = pt.as_tensor_variable(W)
        dy = pt.cast(pt.as_tensor_variable(dy), W.dtype)
        if W.type.ndim != 2 or dy.type.ndim != 2:
            raise TypeError(f"GatherGrad: W and dy must be matrices; received {W.type}, {dy.type}")
        return Apply(self, [W, _ids(ids), dy], [W.type()])

    def infer_shape(self, fgraph, node, shapes):
        return [shapes[0]]

    def connection_pattern(self, node):
        return [[False], [False], [True]]

    def pullback(self, inputs, outputs, cotangents):
        W, ids, dy = inputs
        return [disconnected_type(), disconnected_type(), Gather()(cotangents[0], ids)]

    def perform(self, node, inputs, output_storage):
        W, ids, dy = inputs
        _check_ids(ids, W.shape[0])
        if dy.shape != (ids.shape[0], W.shape[1]):
            raise ValueError(f"GatherGrad: dy has shape {dy.shape}; expected "
                             f"{(ids.shape[0], W.shape[1])}")
        dW = np.zeros_like(W)
        for i, row in enumerate(ids):  # in order, as the C code
            dW[row] += dy[i]
        output_storage[0][0] = dW

    def c_code(self, node, name, inputs, outputs, sub):
        W, ids, dy = inputs
        (dW,) = outputs
        c = CCall(self, node, name, sub)
        c.check(f"PyArray_NDIM({W}) == 2 && PyArray_NDIM({ids}) == 1 && PyArray_NDIM({dy}) == 2",
                "W and dy must be matrices and ids a vector")
        i = self._ids_check(c, W, ids)
        c.line(f"npy_intp n_ = PyArray_SIZE({ids}), D = PyArray_NDIM({W}) == 2 ? "
               f"PyArray_DIMS({W})[1] : 0;")
        c.check_shape(dy, "dy", "n_, D")
        g = c.input(dy)
        out = c.output(dW, f"PyArray_DIMS({W})[0], D")
        c.run(f"nbemb_scatter(PyArray_DIMS({W})[0], D, {i}, n_, {g}, {out})")
        return c.code()

    def jax(self, node):
        """``dW = zeros, dW[ids[i]] += dy[i]`` (``.at[].add``: repeated ids add up); all NaN when
        an id is outside ``[0, N)`` (JAX cannot raise inside a compiled function)."""
        import jax.numpy as jnp

        def gather_grad(W, ids, dy):
            bad = jnp.any((ids < 0) | (ids >= W.shape[0]))
            dW = jnp.zeros_like(W).at[ids].add(dy, mode="drop")
            return jnp.where(bad, jnp.nan, dW)

        return gather_grad


def gather(W, ids, checked: bool = False):
    """``W[ids]`` for a vector of ids, with a gradient in C; ``checked``: see :class:`Gather`."""
    return Gather(checked)(W, ids)
