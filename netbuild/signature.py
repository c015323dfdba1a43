"""A model's inputs and outputs, as the spec declares them: what each reads from the data files,
and what each output is trained for.

The long form names them::

    model:
      inputs:                                  # name -> one example's shape and its npz key
        image: {shape: [1, 8, 8]}              # key: the input's name unless given
        features: {shape: [16], key: feats}
      outputs:                                 # name -> the layer, its npz key and its training
        digit: {layer: out, loss: categorical_crossentropy, metrics: [accuracy]}
        ink: {layer: ink, key: ink, loss: mse, loss_weight: 0.5}

Layers read an input by its name in ``inputs:``, as they read other layers. Training minimizes
the sum of the outputs' losses, each times its ``loss_weight`` (default 1); each output's loss
and metrics are recorded as ``<output>_loss`` and ``<output>_<metric>`` (``val_`` before them on
the validation data), the weighted total as ``loss``.

The shorthand, one input and one output, is what a spec without ``model.inputs`` and
``model.outputs`` means: the input ``input`` of shape ``model.input_shape`` under ``data.x_key``,
and the output of the last layer under ``data.y_key``, trained with ``train.loss`` and scored by
``train.metrics``, recorded without a prefix (``loss``, ``accuracy``, ``val_accuracy``). Either
half may be written out alone: ``model.inputs`` with ``train.loss``, or ``input_shape`` with
``model.outputs``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import metrics as metrics_mod
from .spec import Spec

#: The name of the only input of the shorthand (``model.input_shape``).
INPUT = "input"


@dataclass(frozen=True)
class Input:
    """One input: its name (what layers read), one example's shape, its npz key, and the spec
    path that declares it."""

    name: str
    shape: tuple
    key: str
    path: tuple


@dataclass(frozen=True)
class Output:
    """One output: its name, the layer that produces it, its npz key, its loss (a spec entry)
    and weight, its metrics (spec entries), the spec path that declares it, and the prefix of
    its recorded keys (empty for the shorthand's only output)."""

    name: str
    layer: str | None
    key: str
    loss: Any
    loss_weight: float
    metrics: list = field(default_factory=list)
    path: tuple = ()
    prefix: str = ""

    @property
    def metric_names(self) -> list[str]:
        return [metrics_mod.metric_name(m) for m in self.metrics]

    @property
    def loss_path(self) -> tuple:
        return self.path + ("loss",) if self.prefix else ("train", "loss")

    @property
    def metrics_path(self) -> tuple:
        return self.path + ("metrics",) if self.prefix else ("train", "metrics")

    def keys(self) -> list[str]:
        """The keys an epoch's record holds for this output (without ``val_``): its loss (long
        form only; the shorthand's loss is the total) and its metrics."""
        return ([f"{self.prefix}loss"] if self.prefix else []) + \
            [self.prefix + n for n in self.metric_names]


@dataclass(frozen=True)
class Signature:
    inputs: list[Input]
    outputs: list[Output]

    @property
    def shorthand_inputs(self) -> bool:
        return len(self.inputs) == 1 and self.inputs[0].path == ("model", "input_shape")

    @property
    def shorthand_outputs(self) -> bool:
        return len(self.outputs) == 1 and not self.outputs[0].prefix

    def input(self, name: str) -> Input:
        return next(i for i in self.inputs if i.name == name)

    def recorded(self, has_validation: bool) -> list[str]:
        """Every key of an epoch's record a monitor, a gate or a sweep can name."""
        keys = ["loss"] + [k for o in self.outputs for k in o.keys()]
        return keys + ([f"val_{k}" for k in keys] if has_validation else [])


def of(spec: Spec) -> Signature:
    """The inputs and outputs of a validated spec (the validator has checked that the
    shorthand and the long form are not mixed: see :func:`netbuild.spec.validate.validate`)."""
    model, data, train = spec.data["model"], spec.data["data"], spec.data["train"]
    if "inputs" in model:
        inputs = [Input(name, tuple(cfg["shape"]), cfg.get("key", name), ("model", "inputs", name))
                  for name, cfg in model["inputs"].items()]
    else:
        inputs = [Input(INPUT, tuple(model["input_shape"]), data.get("x_key", "x"),
                        ("model", "input_shape"))]
    if "outputs" in model:
        outputs = [Output(name, cfg["layer"], cfg.get("key", name), cfg["loss"],
                          float(cfg.get("loss_weight", 1.0)), list(cfg.get("metrics", [])),
                          ("model", "outputs", name), f"{name}_")
                   for name, cfg in model["outputs"].items()]
    else:
        outputs = [Output("output", None, data.get("y_key", "y"), train["loss"], 1.0,
                          list(train.get("metrics", [])))]
    return Signature(inputs, outputs)
