"""One table runs every registered layer type through the whole path: YAML -> schema -> Network.

For each row: the statically predicted shape of every layer equals the shape the graph computes,
the parameter count equals the count worked out by hand, and the gradient with respect to every
parameter matches a numerical gradient (``verify_grad``).
"""

from __future__ import annotations

import numpy as np
import pytensor
import pytest
from conftest import TEST_MODE, verify_grad
from pytensor.graph.replace import clone_replace

from netbuild import layers
from netbuild.layers import Context
from netbuild.network import INPUT, Network
from netbuild.spec import load_text, validate

# (id, input_shape, layers as YAML flow items, parameter count worked out by hand)
TABLE = [
    ("dense", [5], ["{type: dense, units: 3, activation: tanh}"], 5 * 3 + 3),
    ("dense-3d", [2, 4], ["{type: dense, units: 3, use_bias: false}"], 4 * 3),
    ("activation", [4], ["{type: activation, activation: {type: elu, alpha: 0.5}}"], 0),
    ("dropout", [4], ["{type: dropout, rate: 0.5}", "{type: dense, units: 2}"], 4 * 2 + 2),
    ("flatten", [2, 3], ["{type: flatten}", "{type: dense, units: 2}"], 6 * 2 + 2),
    ("reshape", [6], ["{type: reshape, shape: [3, -1]}", "{type: dense, units: 2}"], 2 * 2 + 2),
    ("batch_norm", [3, 4], ["{type: batch_norm}"], 4 * 3),
    ("layer_norm", [3, 4], ["{type: layer_norm}"], 2 * 4),
    ("embedding", [5], ["{type: embedding, input_dim: 7, output_dim: 3}", "{type: flatten}"], 7 * 3),
    ("conv2d", [1, 5, 4], ["{type: conv2d, filters: 2, kernel_size: 3, padding: same, activation: tanh}"],
     2 * 1 * 9 + 2),
    ("conv1d", [2, 6], ["{type: conv1d, filters: 2, kernel_size: 3, strides: 2, dilation_rate: 1}"],
     2 * 2 * 3 + 2),
    ("max_pool2d", [1, 4, 4], ["{type: max_pool2d}", "{type: flatten}", "{type: dense, units: 2}"], 4 * 2 + 2),
    ("avg_pool2d", [1, 5, 5], ["{type: avg_pool2d, pool_size: 3, strides: 2, padding: same}", "{type: flatten}",
                               "{type: dense, units: 2}"], 9 * 2 + 2),
    ("max_pool1d", [2, 6], ["{type: max_pool1d, pool_size: 3}", "{type: flatten}", "{type: dense, units: 2}"],
     4 * 2 + 2),
    ("avg_pool1d", [2, 6], ["{type: avg_pool1d}", "{type: flatten}", "{type: dense, units: 2}"], 6 * 2 + 2),
    ("global_max_pool", [3, 4, 4], ["{type: global_max_pool}", "{type: dense, units: 2}"], 3 * 2 + 2),
    ("global_avg_pool", [3, 5], ["{type: global_avg_pool}", "{type: dense, units: 2}"], 3 * 2 + 2),
    ("simple_rnn", [3, 2], ["{type: simple_rnn, units: 4}"], 2 * 4 + 4 * 4 + 2 * 4),
    ("lstm", [3, 2], ["{type: lstm, units: 2, return_sequences: true}"], 4 * (2 * 2 + 2 * 2 + 2 * 2)),
    ("gru", [3, 2], ["{type: gru, units: 2, bidirectional: true, go_backwards: true}"],
     2 * 3 * (2 * 2 + 2 * 2 + 2 * 2)),
    ("add", [4], ["{type: dense, units: 4, name: a}", "{type: dense, units: 4, name: b, inputs: [input]}",
                  "{type: add, inputs: [a, b]}"], 2 * (4 * 4 + 4)),
    ("multiply", [4], ["{type: dense, units: 4, name: a, activation: sigmoid}",
                       "{type: multiply, inputs: [a, input]}"], 4 * 4 + 4),
    ("conv1d_transpose", [2, 4], ["{type: conv1d_transpose, filters: 3, kernel_size: 3, strides: 2, "
                                  "output_padding: 1, activation: tanh}"], 2 * 3 * 3 + 3),
    ("conv2d_transpose", [2, 3, 2], ["{type: conv2d_transpose, filters: 2, kernel_size: [2, 3], "
                                     "strides: [2, 1], padding: 1, dilation_rate: [1, 2]}"], 2 * 2 * 6 + 2),
    ("conv2d_transpose-same", [1, 3, 3], ["{type: conv2d_transpose, filters: 2, kernel_size: 3, strides: 2, "
                                          "padding: same, activation: relu}"], 1 * 2 * 9 + 2),
    ("depthwise_conv2d", [2, 4, 4], ["{type: depthwise_conv2d, kernel_size: 3, depth_multiplier: 2, "
                                     "padding: same, strides: [1, 2]}"], 4 * 9 + 4),
    ("separable_conv2d", [2, 4, 5], ["{type: separable_conv2d, filters: 3, kernel_size: [3, 2], "
                                     "dilation_rate: [1, 2], activation: relu}"], 2 * 6 + 3 * 2 + 3),
    ("multi_head_attention", [4, 6], ["{type: multi_head_attention, num_heads: 2, causal: true}"],
     4 * (6 * 6 + 6)),
    ("multi_head_attention-cross", [3, 4], ["{type: dense, units: 5, name: kv}",
                                            "{type: multi_head_attention, num_heads: 3, key_dim: 2, value_dim: 3, "
                                            "inputs: [input, kv]}"],
     (4 * 5 + 5) + (6 * 4 + 6) + (6 * 5 + 6) + (9 * 5 + 9) + (4 * 9 + 4)),
    ("positional_embedding", [3, 4], ["{type: positional_embedding, max_length: 5}"], 5 * 4),
    ("positional_embedding-sinusoidal", [3, 4], ["{type: positional_embedding, encoding: sinusoidal}",
                                                 "{type: dense, units: 2}"], 4 * 2 + 2),
    ("masking", [4, 3], ["{type: masking, mask_value: 0.5}", "{type: lstm, units: 2}"],
     4 * (3 * 2 + 2 * 2 + 2 * 2)),
    ("permute", [2, 3], ["{type: permute, dims: [2, 1]}", "{type: dense, units: 2}"], 2 * 2 + 2),
    ("zero_padding1d", [2, 3], ["{type: zero_padding1d, padding: [1, 2]}", "{type: flatten}"], 0),
    ("zero_padding2d", [1, 2, 3], ["{type: zero_padding2d, padding: [[1, 0], [0, 2]]}"], 0),
    ("cropping1d", [2, 5], ["{type: cropping1d, cropping: [1, 2]}"], 0),
    ("cropping2d", [1, 4, 5], ["{type: cropping2d, cropping: [1, [0, 2]]}"], 0),
    ("upsampling1d", [2, 3], ["{type: upsampling1d, size: 3, interpolation: linear}"], 0),
    ("upsampling2d", [1, 3, 2], ["{type: upsampling2d, size: [2, 3], interpolation: bilinear}",
                                 "{type: upsampling2d, interpolation: nearest}"], 0),
    ("global_avg_pool-axis", [4, 3], ["{type: global_avg_pool, axis: 1}", "{type: dense, units: 2}"],
     3 * 2 + 2),
    ("global_max_pool-axes", [2, 3, 4], ["{type: global_max_pool, axis: [1, -1]}"], 0),
    ("concatenate", [4], ["{type: dense, units: 2, name: a}", "{type: dense, units: 3, name: b, inputs: [input]}",
                          "{type: concatenate, inputs: [a, b, input]}"], (4 * 2 + 2) + (4 * 3 + 3)),
]


def test_table_covers_every_layer_type():
    covered = {item.split("type: ")[1].split(",")[0].split("}")[0] for _, _, items, _ in TABLE for item in items}
    assert covered >= set(layers.REGISTRY)


def build(input_shape, items) -> Network:
    text = (f"name: t\ndata: {{train: none.npz}}\nmodel:\n  input_shape: {input_shape}\n  layers:\n"
            + "".join(f"    - {item}\n" for item in items)
            + "train: {loss: mse, optimizer: {type: sgd}}\n")
    return Network.from_spec(validate(load_text(text, "table.yaml")))


@pytest.mark.parametrize("case", TABLE, ids=[row[0] for row in TABLE])
def test_layer_row(case, float64):
    _, input_shape, items, n_params = case
    net = build(input_shape, items)
    assert net.n_params() == n_params
    rng = np.random.default_rng(0)
    if net.integer_input():
        x_value = rng.integers(0, net.integer_input(), size=(3, *input_shape))
    else:
        x_value = rng.normal(size=(3, *input_shape))
    x = net.input_variable()
    out, _ = net.forward(x, training=False)
    # every layer's computed shape equals its predicted static shape
    values = {INPUT: x}
    probe = Context(training=False)
    for node in net.order:
        values[node.name] = node.layer.forward([values[i] for i in node.inputs], probe)
    names = [node.name for node in net.order]
    computed = pytensor.function([x], [values[n] for n in names], mode=TEST_MODE)(x_value)
    for name, value in zip(names, computed):
        assert value.shape == (3, *net.nodes[name].output_shape), name

    shared = list(net.params.values())
    if not shared:  # a layer without parameters: the gradient with respect to its input
        verify_grad(lambda t: net.forward(t, training=False)[0], [x_value], rng=rng, mode=TEST_MODE)
        return
    fixed_x = {x: pytensor.shared(x_value)}
    verify_grad(lambda *params: clone_replace(out, {**dict(zip(shared, params)), **fixed_x}),
                [v.get_value() for v in shared], rng=rng, mode=TEST_MODE, abs_tol=1e-6, rel_tol=1e-5)
