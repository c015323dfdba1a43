"""The Layer contract that every layer family follows.

A layer is its hyperparameters, the parameters it declares once (:class:`ParamSpec`), a pure
:meth:`Layer.output_shape` that never builds a graph, and :meth:`Layer.forward`, which builds the
symbolic output. Shapes exclude the batch axis.

Hyperparameters are the class's annotations (each family documents them in an Args section):
one per spec key the layer type takes, with its type. Their defaults are written once, in the
schema: a validated spec holds every default, and the constructor sets each key as an attribute
(``self.units``), None for an optional key that was not given. ``tests/test_registries.py``
holds each class's annotations and the schema's keys for its type to one another.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import pytensor.tensor as pt

from .. import activations

Shape = tuple

#: Annotation types of hyperparameters (the schema says exactly what each accepts).
Activation = Any   # an activation name, or {type: name, ...options}
Initializer = Any  # an initializer name, or {type: name, ...options}
Ints = Any         # an int, or a list of one int per spatial axis
Padding = Any      # "valid", "same", an int, or a list of ints
Sides = Any        # an int, one int per spatial axis, or [before, after] per axis


class LayerError(Exception):
    """A layer's configuration does not fit its inputs. ``key`` names the spec key to blame."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class ParamSpec:
    """A parameter a layer owns: stored as ``<layer name>/<name>``.

    ``trainable`` parameters get gradients; the others (batch norm's running statistics) are
    updated by the forward pass. ``regularize`` marks weights (not biases) for l1/l2.
    """

    name: str
    shape: tuple
    init: Any
    fan_in: int = 1
    fan_out: int = 1
    trainable: bool = True
    regularize: bool = True


@dataclass
class Context:
    """What a forward pass needs besides its inputs: the phase, randomness, state updates.

    Random draws (dropout) come from :class:`netbuild.ops.random.CounterUniform`: a hash of
    ``seed``, the draw's stream (its order in the forward pass) and ``step``, a shared integer
    that the training function advances once per batch (:attr:`updates` carries that, and any
    running statistics, into the compiled function). ``preactivations`` keeps each activated
    layer's input to its activation, so the loss can work from logits. ``masks`` maps a
    sequence tensor ``(batch, timesteps, ...)`` to its mask ``(batch, timesteps)`` (1 for a real
    step, 0 for padding), where a layer made one (:meth:`Layer.output_mask`).
    """

    training: bool
    seed: int = 0
    step: Any = None
    updates: dict = field(default_factory=dict)
    preactivations: dict = field(default_factory=dict)
    masks: dict = field(default_factory=dict)
    _streams: int = 0

    def mask(self, x) -> Any:
        """The mask of the tensor ``x``, or None."""
        return self.masks.get(x)

    def uniform(self, shape, dtype: str) -> Any:
        """Uniform [0, 1) samples of a symbolic ``shape``, new at every training step."""
        from ..ops.random import CounterUniform

        if self.step is None:
            raise RuntimeError("this forward pass has no random step counter")
        self.updates[self.step] = self.step + 1
        self._streams += 1
        return CounterUniform(dtype, self._streams)(pt.as_tensor_variable(shape), self.seed, self.step)


class Layer:
    """Base class. Subclasses set :attr:`type` (the YAML name) and implement the contract."""

    #: The YAML ``type`` name; the registry key.
    type: ClassVar[str] = ""
    #: How many inputs the layer takes (``max_inputs=None``: any number).
    min_inputs: ClassVar[int] = 1
    max_inputs: ClassVar[int | None] = 1
    #: What the layer does with the mask of a padded sequence (:meth:`passes_mask`): ``keep``
    #: (it works step by step: the mask passes on), ``merge`` (several inputs: a step is real
    #: where it is in every masked input), or ``refuse`` (it would mix padded steps with real
    #: ones: a mask reaching it is an error). Layers that honour a mask override the methods.
    mask_policy: ClassVar[str] = "refuse"

    def __init__(self, name: str, config: dict):
        self.name = name
        #: The layer's mapping in the validated spec (defaults filled in).
        self.config = config
        #: The shared variables of this layer's parameters, keyed by the short name (``W``).
        self.params: dict[str, Any] = {}
        for key in type(self).hyperparameters():
            setattr(self, key, config.get(key))  # every default is in the spec already

    @classmethod
    def hyperparameters(cls) -> dict[str, str]:
        """The spec keys this layer type takes, each with its annotated type (the class's
        annotations and its bases', ClassVars aside)."""
        out: dict[str, str] = {}
        for klass in reversed(cls.__mro__):
            for key, annotation in vars(klass).get("__annotations__", {}).items():
                if not str(annotation).startswith("ClassVar"):
                    out[key] = str(annotation)
        return out

    # -- shape maths: pure, no graph -------------------------------------------------------
    def output_shape(self, input_shapes: Sequence[Shape]) -> Shape:
        """The output shape (no batch axis) for these input shapes; raises :class:`LayerError`."""
        raise NotImplementedError

    def param_specs(self, input_shapes: Sequence[Shape]) -> list[ParamSpec]:
        """The parameters this layer owns for these input shapes."""
        return []

    # -- graph ----------------------------------------------------------------------------
    def forward(self, inputs: list, ctx: Context):
        """The symbolic output for symbolic ``inputs`` (each with a leading batch axis)."""
        raise NotImplementedError

    # -- masks ----------------------------------------------------------------------------
    def passes_mask(self, masked: Sequence[bool], input_shapes: Sequence[Shape]) -> bool:
        """Whether the output has a mask, given which inputs have one; raises
        :class:`LayerError` when a mask reaches a layer that cannot take it (static: ``check``)."""
        if not any(masked):
            return False
        if self.mask_policy == "refuse":
            raise LayerError(f"'{self.type}' cannot take the mask of a padded sequence (its input "
                             "comes from a masking layer or an embedding with mask_zero); expected "
                             "the mask to end first, in a recurrent layer without "
                             "return_sequences or a global pool over time", key="inputs")
        for shape, m in zip(input_shapes, masked):
            if m and len(shape) < 2:
                raise LayerError(f"'{self.type}' would read a masked sequence's time axis as its "
                                 f"features: received shape {tuple(shape)}, without features "
                                 "after the time axis (a global pool without axis pools the "
                                 "features; axis: 1 pools over time)", key="inputs")
        return True

    def output_mask(self, inputs: list, ctx: Context) -> Any:
        """The mask of this layer's output, from its inputs' masks (see :attr:`mask_policy`)."""
        masks = [m for m in (ctx.mask(x) for x in inputs) if m is not None]
        if not masks:
            return None
        out = masks[0]
        for m in masks[1:]:
            out = out * m
        return out

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


class ActivatedLayer(Layer):
    """A layer whose output is ``activation(linear(inputs))``; records the pre-activation.

    Args:
        activation: applied to the linear output (a name, or a mapping with options).
    """

    activation: Activation

    def linear(self, inputs: list, ctx: Context):
        raise NotImplementedError

    @property
    def activation_name(self) -> str:
        return activations.name_of(self.activation)

    def forward(self, inputs: list, ctx: Context):
        z = self.linear(inputs, ctx)
        ctx.preactivations[self.name] = (z, self.activation_name)
        return activations.get(self.activation)(z)


class Regularized:
    """A mixin for layers with weights: ``l1`` and ``l2`` penalties on them (not on biases).

    Args:
        l1: the weight of the sum of absolute weights in the loss (none when not given).
        l2: the weight of the sum of squared weights in the loss (none when not given).
    """

    l1: float | None
    l2: float | None


def single(input_shapes: Sequence[Shape]) -> Shape:
    """The one input shape of a single-input layer."""
    return tuple(input_shapes[0])
