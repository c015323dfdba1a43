"""The benchmark models, each as a netbuild spec and as the same network in PyTorch, and the
optimizers they train with.

Both sides start from netbuild's initial weights (copied into torch's layout), see the same
synthetic data in the same batch order, and train with the same optimizer (:data:`OPTIMIZERS`)
on softmax cross-entropy.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class Model:
    name: str
    title: str
    input_shape: tuple
    batch: int
    examples: int          # one epoch
    layers: str            # the spec's model.layers, YAML flow style
    torch_model: Callable  # (params: dict[str, np.ndarray]) -> torch.nn.Module
    #: Sequences of random lengths in ``[lo, hi]`` (uniform), padded with zeros at the end to
    #: ``input_shape[0]`` steps: netbuild masks them (a ``masking`` layer), PyTorch packs them.
    lengths: tuple[int, int] | None = None

    def spec_text(self, data_file: str, epochs: int = 1, optimizer: str = "adam") -> str:
        return f"""
name: bench-{self.name}
seed: 0
data: {{train: {data_file}}}
model:
  input_shape: {list(self.input_shape)}
  layers: {self.layers}
train:
  loss: categorical_crossentropy
  optimizer: {OPTIMIZERS[optimizer][0]}
  batch_size: {self.batch}
  epochs: {epochs}
  shuffle: true
"""

    def data(self, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((self.examples, *self.input_shape), dtype=np.float32)
        y = rng.integers(0, 10, self.examples)
        if self.lengths:
            lengths = rng.integers(self.lengths[0], self.lengths[1] + 1, self.examples)
            x[np.arange(self.input_shape[0])[None, :] >= lengths[:, None]] = 0.0
        return x, y


def _t(a):
    import torch

    return torch.nn.Parameter(torch.from_numpy(np.ascontiguousarray(a)))


def _linear(params: dict, name: str):
    import torch

    w = params[f"{name}/W"]
    layer = torch.nn.Linear(*w.shape)
    layer.weight, layer.bias = _t(w.T), _t(params[f"{name}/b"])
    return layer


def _conv(params: dict, name: str):
    import torch

    w = params[f"{name}/W"]
    layer = torch.nn.Conv2d(w.shape[1], w.shape[0], w.shape[2:])
    layer.weight, layer.bias = _t(w), _t(params[f"{name}/b"])
    return layer


def torch_mlp(params: dict):
    import torch.nn as nn

    return nn.Sequential(_linear(params, "h1"), nn.ReLU(), _linear(params, "h2"), nn.ReLU(),
                         _linear(params, "out"))


def torch_cnn(params: dict):
    import torch.nn as nn

    return nn.Sequential(_conv(params, "c1"), nn.ReLU(), nn.MaxPool2d(2),
                         _conv(params, "c2"), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         _linear(params, "h"), nn.ReLU(), _linear(params, "out"))


def _torch_recurrent(kind: str, gates: int, packed: bool = False):
    """``nn.LSTM`` or ``nn.GRU`` (batch first) then a linear layer on the last hidden state.
    ``packed``: the batch's zero-padded sequences as a ``PackedSequence`` (lengths from the
    steps that are not all zeros, as netbuild's ``masking`` layer reads them; unsorted, as a
    batch comes), so the last hidden state is each sequence's last real step's."""

    def build(params: dict):
        import torch.nn as nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                w_ih = params["rnn/W_ih"]
                self.rnn = getattr(nn, kind)(w_ih.shape[0], w_ih.shape[1] // gates,
                                             batch_first=True)
                self.rnn.weight_ih_l0 = _t(w_ih.T)
                self.rnn.weight_hh_l0 = _t(params["rnn/W_hh"].T)
                self.rnn.bias_ih_l0 = _t(params["rnn/b_ih"])
                self.rnn.bias_hh_l0 = _t(params["rnn/b_hh"])
                self.rnn.flatten_parameters()
                self.out = _linear(params, "out")

            def forward(self, x):
                if packed:
                    import torch

                    lengths = (x != 0).any(dim=2).sum(dim=1)
                    x = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True,
                                                                enforce_sorted=False)
                _, state = self.rnn(x)
                h = state[0] if kind == "LSTM" else state
                return self.out(h[0])

        return Net()

    return build


def torch_transformer(params: dict):
    """``nn.MultiheadAttention`` (netbuild's W_q, W_k, W_v stacked as its in_projection), a
    residual add, ``nn.LayerNorm``, the mean over time, a linear layer."""
    import torch
    import torch.nn as nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            width = params["att/W_q"].shape[1]
            self.att = nn.MultiheadAttention(width, 4, batch_first=True)
            self.att.in_proj_weight = _t(np.concatenate([params[f"att/W_{k}"] for k in "qkv"]))
            self.att.in_proj_bias = _t(np.concatenate([params[f"att/b_{k}"] for k in "qkv"]))
            self.att.out_proj.weight = _t(params["att/W_o"])
            self.att.out_proj.bias = _t(params["att/b_o"])
            self.norm = nn.LayerNorm(width)
            self.norm.weight, self.norm.bias = _t(params["ln/gamma"]), _t(params["ln/beta"])
            self.out = _linear(params, "out")

        def forward(self, x):
            a, _ = self.att(x, x, x, need_weights=False)
            return self.out(torch.mean(self.norm(x + a), dim=1))

    return Net()


#: By name: (the spec's ``train.optimizer``, the same optimizer in PyTorch).
OPTIMIZERS = {
    "sgd-momentum": ("{type: sgd, learning_rate: 0.01, momentum: 0.9}",
                     lambda torch, params: torch.optim.SGD(params, lr=0.01, momentum=0.9)),
    "adam": ("{type: adam, learning_rate: 0.001}",
             lambda torch, params: torch.optim.Adam(params, lr=1e-3)),
}


MODELS = {m.name: m for m in [
    Model("mlp", "MLP 784-512-256-10", (784,), 128, 128 * 40,
          "[{type: dense, units: 512, activation: relu, name: h1}, "
          "{type: dense, units: 256, activation: relu, name: h2}, "
          "{type: dense, units: 10, activation: softmax, name: out}]", torch_mlp),
    Model("cnn", "CNN conv32-pool-conv64-pool-128-10, 28x28", (1, 28, 28), 64, 64 * 20,
          "[{type: conv2d, filters: 32, kernel_size: 3, activation: relu, name: c1}, "
          "{type: max_pool2d, pool_size: 2}, "
          "{type: conv2d, filters: 64, kernel_size: 3, activation: relu, name: c2}, "
          "{type: max_pool2d, pool_size: 2}, {type: flatten}, "
          "{type: dense, units: 128, activation: relu, name: h}, "
          "{type: dense, units: 10, activation: softmax, name: out}]", torch_cnn),
    Model("lstm", "LSTM 128 units, 50 steps x 32 features", (50, 32), 64, 64 * 20,
          "[{type: lstm, units: 128, name: rnn}, "
          "{type: dense, units: 10, activation: softmax, name: out}]",
          _torch_recurrent("LSTM", 4)),
    Model("masked-lstm", "Masked LSTM 128 units, lengths 10 to 50 of 50 steps x 32 features",
          (50, 32), 64, 64 * 20,
          "[{type: masking, name: mask}, {type: lstm, units: 128, name: rnn}, "
          "{type: dense, units: 10, activation: softmax, name: out}]",
          _torch_recurrent("LSTM", 4, packed=True), lengths=(10, 50)),
    Model("gru", "GRU 128 units, 50 steps x 32 features", (50, 32), 64, 64 * 20,
          "[{type: gru, units: 128, name: rnn}, "
          "{type: dense, units: 10, activation: softmax, name: out}]",
          _torch_recurrent("GRU", 3)),
    Model("transformer", "Transformer block: attention 4 heads, width 128, 64 steps", (64, 128), 32, 32 * 20,
          "[{type: multi_head_attention, num_heads: 4, name: att}, "
          "{type: add, inputs: [input, att]}, {type: layer_norm, name: ln}, "
          "{type: global_avg_pool, axis: 1}, "
          "{type: dense, units: 10, activation: softmax, name: out}]", torch_transformer),
]}


#: The MLP's layer widths, input first.
MLP_WIDTHS = (784, 512, 256, 10)


def matmul_shapes(model: Model) -> list[tuple[int, int, int]]:
    """The ``(m, k, n)`` matrix products of one MLP training step: each layer's forward product,
    its weight gradient, and (above the first layer) its input gradient."""
    assert model.name == "mlp"
    b = model.batch
    shapes = []
    for i, (fan_in, fan_out) in enumerate(pairwise(MLP_WIDTHS)):
        shapes.append((b, fan_in, fan_out))        # forward  x W
        shapes.append((fan_in, b, fan_out))        # dW = x^T dy
        if i > 0:
            shapes.append((b, fan_out, fan_in))    # dx = dy W^T
    return shapes
