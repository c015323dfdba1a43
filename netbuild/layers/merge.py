"""Layers that combine several inputs: ``add``, ``multiply``, ``concatenate``.

``add`` and ``multiply``: two or more inputs of one shape ``S`` -> ``S``;
``y = x1 + x2 + ...`` or ``y = x1 * x2 * ...`` elementwise.

``concatenate``: two or more inputs equal except along ``axis`` -> that axis's sizes summed.
``axis`` counts the batch axis as 0 (Keras and torch), so ``1`` is the first example axis and
``-1`` the last; the batch axis itself cannot be joined.
"""

from __future__ import annotations

import functools
import operator
from typing import Any, Callable, ClassVar

import pytensor.tensor as pt

from .base import Layer, LayerError


def _fmt(shapes) -> str:
    return ", ".join(str(tuple(s)) for s in shapes)


class _Elementwise(Layer):
    """Inputs of one shape combined pairwise by :attr:`combine`."""

    min_inputs = 2
    max_inputs = None
    mask_policy = "merge"
    #: The elementwise operation, ``(a, b) -> a op b``; a ``staticmethod`` in each subclass.
    combine: ClassVar[Callable[[Any, Any], Any]]

    def output_shape(self, input_shapes):
        first = tuple(input_shapes[0])
        if any(tuple(s) != first for s in input_shapes[1:]):
            raise LayerError(f"received input shapes {_fmt(input_shapes)}; expected all inputs "
                             "to have the same shape", key="inputs")
        return first

    def forward(self, inputs, ctx):
        return functools.reduce(self.combine, inputs)


class Add(_Elementwise):
    type = "add"
    combine = staticmethod(operator.add)


class Multiply(_Elementwise):
    type = "multiply"
    combine = staticmethod(operator.mul)


class Concatenate(Layer):
    """Args:
        axis: the axis to join along, counting the batch axis as 0 (``-1``: the last).
    """

    type = "concatenate"
    min_inputs = 2
    max_inputs = None
    axis: int

    def example_axis(self, ndim: int) -> int:
        """The configured ``axis`` as an index into an example's ``ndim`` axes."""
        axis = self.axis
        index = axis - 1 if axis > 0 else ndim + axis
        if axis == 0 or not 0 <= index < ndim:
            batch = " (the batch axis)" if axis == 0 or index == -1 else ""
            raise LayerError(f"received axis {axis}{batch} for inputs with {ndim} axes besides the "
                             f"batch axis; expected 1 to {ndim} or -{ndim} to -1", key="axis")
        return index

    def output_shape(self, input_shapes):
        shapes = [tuple(s) for s in input_shapes]
        if len({len(s) for s in shapes}) > 1:
            raise LayerError(f"received input shapes {_fmt(shapes)}; expected the same number "
                             "of axes", key="inputs")
        i = self.example_axis(len(shapes[0]))
        if len({s[:i] + s[i + 1:] for s in shapes}) > 1:
            raise LayerError(f"received input shapes {_fmt(shapes)}; expected them equal except "
                             f"along axis {self.axis}", key="inputs")
        return shapes[0][:i] + (sum(s[i] for s in shapes),) + shapes[0][i + 1:]

    def passes_mask(self, masked, input_shapes):
        """Joined on the features (not the first, the time axis) the mask passes on."""
        if any(masked) and self.example_axis(len(input_shapes[0])) == 0:
            raise LayerError("joins masked sequences along their time axis; expected a mask only "
                             "when joining along the features (an axis after the first)", key="axis")
        return any(masked)

    def forward(self, inputs, ctx):
        return pt.concatenate(inputs, axis=1 + self.example_axis(inputs[0].ndim - 1))
