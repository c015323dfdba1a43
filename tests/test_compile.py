"""The training graph: weight penalties and gradient clipping against numpy, and C code for every
node of the compiled functions."""

from __future__ import annotations

import numpy as np
import pytensor
import pytensor.tensor as pt
import pytest
from conftest import CONFIGS, TEST_MODE
from pytensor.scan.op import Scan

from netbuild.spec import load_spec
from netbuild.compile import clip, compile_predict, compile_train, penalty
from netbuild.network import Network
from netbuild.spec import load_text, validate
from netbuild.data import load_datasets

SPEC = """\
name: t
data: {train: none.npz}
model:
  input_shape: [3]
  layers:
    - {type: dense, units: 4, l1: 0.01, l2: 0.1}
    - {type: dense, units: 2}
train: {loss: mse, optimizer: {type: sgd}}
"""


def test_penalty_covers_weights_not_biases(float64):
    net = Network.from_spec(validate(load_text(SPEC, "t.yaml")))
    # Biases start at zero, where a penalty on them would add nothing: give them values first.
    net.params["dense_0/b"].set_value(np.array([3.0, -2.0, 1.5, 4.0]))
    net.params["dense_1/b"].set_value(np.array([5.0, -5.0]))
    b = net.params["dense_0/b"]
    grad_b = pytensor.grad(penalty(net), b, disconnected_inputs="ignore")  # zeros unless b counts
    value, grad_b = pytensor.function([], [penalty(net), grad_b], mode=TEST_MODE)()
    W = net.params["dense_0/W"].get_value()
    assert np.isclose(value, 0.01 * np.abs(W).sum() + 0.1 * (W**2).sum(), rtol=1e-12, atol=0)
    np.testing.assert_array_equal(grad_b, 0.0)


def test_clipping_by_value_then_global_norm(float64):
    a, b = pt.vector(), pt.vector()
    ga, gb = np.array([3.0, -4.0, 0.5]), np.array([12.0])
    out = pytensor.function([a, b], clip([a, b], 2.0, None), mode=TEST_MODE)(ga, gb)
    norm = np.sqrt((ga**2).sum() + (gb**2).sum())
    np.testing.assert_allclose(out[0], ga * 2.0 / norm)
    np.testing.assert_allclose(out[1], gb * 2.0 / norm)
    out = pytensor.function([a, b], clip([a, b], None, 1.0), mode=TEST_MODE)(ga, gb)
    np.testing.assert_allclose(out[0], [1.0, -1.0, 0.5])
    small = pytensor.function([a, b], clip([a, b], 100.0, None), mode=TEST_MODE)(ga, gb)
    np.testing.assert_allclose(small[0], ga)  # under the limit: unchanged


def np_clip(grads, clip_norm, clip_value):
    """The documented order in numpy: each value to [-clip_value, clip_value], then the global norm."""
    grads = [np.clip(g, -clip_value, clip_value) for g in grads]
    norm = np.sqrt(sum((g**2).sum() for g in grads))
    return [g * min(1.0, clip_norm / norm) for g in grads]


def test_clipping_by_value_and_norm_at_once(float64):
    """Both limits at once. The values are chosen so that the other order gives other numbers:
    norm first scales [3, -4, 0.5, 12] by 1/13.3 and leaves nothing above 1 to clip."""
    a, b = pt.vector(), pt.vector()
    ga, gb = np.array([3.0, -4.0, 0.5]), np.array([12.0])
    out = pytensor.function([a, b], clip([a, b], 1.0, 1.0), mode=TEST_MODE)(ga, gb)
    want = np_clip([ga, gb], 1.0, 1.0)
    np.testing.assert_allclose(out[0], want[0], rtol=1e-12)
    np.testing.assert_allclose(out[1], want[1], rtol=1e-12)
    assert not np.allclose(out[1], np.clip(gb / np.sqrt(169.25), -1, 1))


def test_the_training_step_clips_by_both_of_the_specs_limits(float64):
    """train.clip_value and train.clip_norm reach the compiled step: one SGD step (learning rate 1)
    moves every parameter by minus its clipped gradient, the gradient computed on its own."""
    text = SPEC.replace("train: {loss: mse, optimizer: {type: sgd}}",
                        "train: {loss: mse, optimizer: {type: sgd, learning_rate: 1.0}, "
                        "clip_value: 0.05, clip_norm: 0.1}")
    spec = validate(load_text(text, "t.yaml"))
    net = Network.from_spec(spec)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8, 3)) * 3, rng.normal(size=(8, 2)) * 3
    params = net.trainable()
    before = [p.get_value() for p in params]
    xv, yv = net.input_variable(), pt.matrix("y")
    out, _ = net.forward(xv, training=True)
    loss = ((out - yv) ** 2).mean(-1).mean() + penalty(net)
    grads = pytensor.function([xv, yv], pytensor.grad(loss, params), mode=TEST_MODE)(x, y)
    assert max(np.abs(g).max() for g in grads) > 0.05  # the value limit bites
    want = np_clip(grads, 0.1, 0.05)
    assert np.sqrt(sum((g**2).sum() for g in np_clip(grads, np.inf, 0.05))) > 0.1  # so does the norm
    compile_train(net, spec.data["train"], [y], 0).step(x, y)
    for p, b, g in zip(params, before, want):
        np.testing.assert_allclose(b - p.get_value(), g, rtol=1e-9, atol=1e-12, err_msg=p.name)


def python_nodes(fn, where: str) -> list[str]:
    """Nodes of a compiled function (and of its scans' inner functions) without a C thunk.
    There are no exceptions: dropout draws from netbuild's own C op."""
    from netbuild.compile import Compiled

    fn = fn.fn if isinstance(fn, Compiled) else fn
    out = []
    for node, thunk in zip(fn.vm.nodes, fn.vm.thunks):
        if isinstance(node.op, Scan):
            out += python_nodes(node.op.fn, f"{where}/scan")
        elif getattr(thunk, "cthunk", None) is None:
            out.append(f"{where}: {node.op}")
    return out


SLOW_CONFIGS = {"digits-cnn.yaml", "digits-lstm.yaml", "digits-resnet.yaml", "digits-transformer.yaml",
                "digits-varlen.yaml"}


@pytest.mark.parametrize("name", [pytest.param(p.name, marks=pytest.mark.slow) if p.name in SLOW_CONFIGS
                                  else p.name for p in sorted(CONFIGS.glob("*.yaml"))])
def test_shipped_configs_compile_to_c_only(name):
    spec = load_spec(str(CONFIGS / name))
    net = Network.from_spec(spec)
    sets = load_datasets(spec, net)
    step = compile_train(net, spec.data["train"], sets.train.ys, 0).step
    assert python_nodes(step, "train") + python_nodes(compile_predict(net), "predict") == []


#: A network of each layer type that no shipped config has yet, trained and predicted in C.
NEW_LAYERS = """\
name: t
data: {train: none.npz}
model:
  input_shape: [2, 6, 5]
  layers:
    - {type: zero_padding2d, padding: [[1, 0], [0, 2]]}
    - {type: cropping2d, cropping: [1, [0, 1]]}
    - {type: upsampling2d, size: 2}
    - {type: upsampling2d, size: [1, 2], interpolation: bilinear}
    - {type: conv2d_transpose, filters: 3, kernel_size: 3, strides: 2, output_padding: 1}
    - {type: depthwise_conv2d, kernel_size: 3, depth_multiplier: 2, activation: relu}
    - {type: separable_conv2d, filters: 3, kernel_size: 3, strides: 2}
    - {type: conv2d, filters: 3, kernel_size: 3}
    - {type: reshape, shape: [3, -1]}
    - {type: permute, dims: [2, 1]}
    - {type: zero_padding1d}
    - {type: cropping1d, cropping: [2, 0]}
    - {type: upsampling1d, size: 2, interpolation: linear}
    - {type: upsampling1d}
    - {type: global_avg_pool, axis: 1}
    - {type: dense, units: 2}
train: {loss: mse, optimizer: {type: adam}}
"""


def assert_trains_in_c(text: str, x: np.ndarray, y: np.ndarray) -> None:
    """The spec ``text`` takes a finite training step on ``(x, y)`` (with its own loss, Adam), and
    every node of its training and predict functions has C code."""
    spec = validate(load_text(text, "t.yaml"))
    net = Network.from_spec(spec)
    train = {"loss": spec.data["train"]["loss"], "optimizer": {"type": "adam", "learning_rate": 0.01}}
    fns = compile_train(net, train, [y], 0)
    assert np.isfinite(fns.step(x.astype(pytensor.config.floatX), y).loss)
    assert python_nodes(fns.step, "train") + python_nodes(compile_predict(net), "predict") == []


def test_new_layers_compile_to_c_only():
    x = np.random.default_rng(0).normal(size=(4, 2, 6, 5))
    assert_trains_in_c(NEW_LAYERS, x, np.zeros((4, 2), dtype=pytensor.config.floatX))


#: A transformer block: positional embedding, attention (with dropout), residual, layer norm.
TRANSFORMER = """\
name: t
data: {train: none.npz}
model:
  input_shape: [6, 8]
  layers:
    - {type: positional_embedding, name: pos}
    - {type: multi_head_attention, num_heads: 2, causal: true, dropout: 0.1, name: att}
    - {type: add, inputs: [pos, att]}
    - {type: layer_norm}
    - {type: dense, units: 8, activation: relu}
    - {type: global_avg_pool, axis: 1}
    - {type: dense, units: 3, activation: softmax}
train: {loss: categorical_crossentropy, optimizer: {type: adam}}
"""


def test_attention_compiles_to_c_only():
    x = np.random.default_rng(0).normal(size=(4, 6, 8))
    assert_trains_in_c(TRANSFORMER, x, np.array([0, 1, 2, 1]))


def test_masked_sequences_compile_to_c_only():
    """A masked recurrent layer (the fused op with its mask input) and attention with a key
    padding mask, behind a ``masking`` layer."""
    text = TRANSFORMER.replace("    - {type: positional_embedding, name: pos}\n",
                               "    - {type: masking}\n    - {type: lstm, units: 8, return_sequences: true}\n"
                               "    - {type: positional_embedding, name: pos}\n")
    x = np.random.default_rng(0).normal(size=(4, 6, 8))
    x[1, 3:] = 0.0  # padding
    assert_trains_in_c(text, x, np.array([0, 1, 2, 1]))
