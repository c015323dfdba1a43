"""Masks of padded sequences: a padded batch gives each example the answer of its unpadded
sequence alone (and the same gradients, summed), whatever the padded steps hold; against
torch's packed sequences and key padding masks where torch is installed."""

from __future__ import annotations

import numpy as np
import pytensor
import pytest
from test_conv_variants import predict

from netbuild.network import Network
from netbuild.spec import load_text, validate

RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def float64():
    with pytensor.config.change_flags(floatX="float64"):
        yield


def network(input_shape, items, seed: int = 0, train: str = "{loss: mse, optimizer: {type: sgd}}") -> Network:
    text = (f"name: t\ndata: {{train: none.npz}}\nmodel:\n  input_shape: {list(input_shape)}\n"
            "  layers:\n" + "".join(f"    - {i}\n" for i in items) + f"train: {train}\n")
    net = Network.from_spec(validate(load_text(text, "t.yaml")))
    rng = np.random.default_rng(seed)
    for var in net.params.values():
        var.set_value(rng.normal(0, 0.5, var.get_value().shape))
    return net


def padded(lengths, steps, features, value, left=False):
    x = RNG.normal(size=(len(lengths), steps, features))
    for n, length in enumerate(lengths):
        if left:
            x[n, :steps - length] = value
        else:
            x[n, length:] = value
    return x


STACKS = {
    "lstm": ["{type: lstm, units: 3}"],
    "bidirectional-gru": ["{type: gru, units: 3, bidirectional: true}"],
    "go-backwards-rnn": ["{type: simple_rnn, units: 3, go_backwards: true}"],
    # the outputs of a go_backwards layer come in reversed order: so does their mask
    "go-backwards-sequences": ["{type: simple_rnn, units: 3, go_backwards: true, return_sequences: true}",
                               "{type: lstm, units: 2}"],
    "go-backwards-pooled": ["{type: gru, units: 3, go_backwards: true, return_sequences: true}",
                            "{type: global_avg_pool, axis: 1}"],
    "stacked-lstm-gru": ["{type: dense, units: 4, activation: tanh}", "{type: lstm, units: 3, return_sequences: true, bidirectional: true}",
                         "{type: gru, units: 2}"],
    "pooled-over-time": ["{type: dense, units: 4}", "{type: layer_norm}", "{type: global_avg_pool, axis: 1}"],
    "max-over-time": ["{type: dense, units: 4}", "{type: global_max_pool, axis: 1}"],
    "attention": ["{type: dense, units: 4, name: d}", "{type: multi_head_attention, num_heads: 2, name: a}",
                  "{type: add, inputs: [d, a]}", "{type: global_avg_pool, axis: 1}"],
    "causal-attention": ["{type: dense, units: 4}", "{type: multi_head_attention, num_heads: 2, causal: true}",
                         "{type: global_max_pool, axis: 1}"],
}


@pytest.mark.parametrize("left", [False, True], ids=["right-padded", "left-padded"])
@pytest.mark.parametrize("name", STACKS)
def test_a_padded_batch_answers_as_each_sequence_alone(name, left):
    items = ["{type: masking, mask_value: -7.0}"] + STACKS[name]
    lengths, steps, features = [5, 2, 3, 1], 5, 3
    x = padded(lengths, steps, features, -7.0, left)
    net = network((steps, features), items)
    got = predict(net, x, mode="c" if "lstm" in name else "FAST_COMPILE")
    for n, length in enumerate(lengths):
        real = x[n:n + 1, :length] if not left else x[n:n + 1, steps - length:]
        alone = network((length, features), items)  # no padding: every step real
        alone.set_param_values(net.param_values())
        np.testing.assert_allclose(got[n:n + 1], predict(alone, real), rtol=0, atol=1e-10, err_msg=f"example {n}")


@pytest.mark.parametrize("name", ["bidirectional-gru", "causal-attention", "go-backwards-pooled"])
def test_a_padded_batch_has_the_gradients_of_its_sequences_alone(name):
    """The gradient of the batch's summed outputs is the sum of each sequence's alone."""
    import pytensor.tensor as pt

    items = ["{type: masking, mask_value: -7.0}"] + STACKS[name]
    lengths, steps, features = [4, 2, 3], 4, 3
    x = padded(lengths, steps, features, -7.0)

    def gradients(net, batch):
        v = net.input_variable()
        out, _ = net.forward(v, training=False)
        params = list(net.params.values())
        return pytensor.function([v], pytensor.grad(pt.sum(out), params), mode="FAST_COMPILE")(batch)

    net = network((steps, features), items)
    total = [np.zeros_like(g) for g in gradients(net, x)]
    for n, length in enumerate(lengths):
        alone = network((length, features), items)
        alone.set_param_values(net.param_values())
        total = [t + g for t, g in zip(total, gradients(alone, x[n:n + 1, :length]))]
    for got, want in zip(gradients(net, x), total):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)


def test_what_padded_steps_hold_changes_no_output_and_no_gradient():
    """Id 0 is padding: the embedding's row 0 is what padded steps hold; changing it changes
    nothing downstream, not even the gradients of the other parameters."""
    import pytensor.tensor as pt

    items = ["{type: embedding, input_dim: 6, output_dim: 3, mask_zero: true, name: e}",
             "{type: lstm, units: 3, return_sequences: true, name: r}", "{type: gru, units: 2, bidirectional: true}",
             "{type: dense, units: 2}"]
    net = network((5,), items)
    ids = np.array([[1, 2, 3, 0, 0], [4, 0, 0, 0, 0], [5, 5, 5, 5, 5]])
    x = net.input_variable()
    out, _ = net.forward(x, training=False)
    loss = pt.sum(out ** 2)
    others = [v for k, v in net.params.items() if k != "e/W"]
    fn = pytensor.function([x], [out, *pytensor.grad(loss, others)], mode="FAST_COMPILE")
    first = fn(ids)
    table = net.params["e/W"].get_value()
    table[0] = RNG.normal(size=3) * 100
    net.params["e/W"].set_value(table)
    for a, b in zip(first, fn(ids)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


def test_against_torch_packed_sequences():
    torch = pytest.importorskip("torch")
    from torch.nn.utils.rnn import pack_padded_sequence

    lengths, steps, features = [4, 2, 3], 4, 3
    x = padded(lengths, steps, features, 0.0)
    for kind, gates in (("lstm", 4), ("gru", 3)):
        net = network((steps, features), ["{type: masking}", f"{{type: {kind}, units: 3, bidirectional: true}}"])
        p = {k.split("/")[1]: torch.from_numpy(v) for k, v in net.param_values().items()}
        module = getattr(torch.nn, kind.upper())(features, 3, batch_first=True, bidirectional=True,
                                                 dtype=torch.float64)
        with torch.no_grad():
            for suffix, t in (("", ""), ("_reverse", "_reverse")):
                getattr(module, f"weight_ih_l0{t}").copy_(p["W_ih" + suffix].T)
                getattr(module, f"weight_hh_l0{t}").copy_(p["W_hh" + suffix].T)
                getattr(module, f"bias_ih_l0{t}").copy_(p["b_ih" + suffix])
                getattr(module, f"bias_hh_l0{t}").copy_(p["b_hh" + suffix])
        packed = pack_padded_sequence(torch.from_numpy(x), torch.tensor(lengths), batch_first=True,
                                      enforce_sorted=False)
        _, state = module(packed)
        h = state[0] if kind == "lstm" else state
        theirs = torch.cat([h[0], h[1]], dim=1).detach().numpy()
        np.testing.assert_allclose(predict(net, x, mode="c"), theirs, rtol=0, atol=1e-10, err_msg=kind)


def test_against_torch_key_padding_mask():
    torch = pytest.importorskip("torch")
    lengths, steps, features = [4, 2, 3], 4, 4
    x = padded(lengths, steps, features, 0.0)
    net = network((steps, features), ["{type: masking}", "{type: multi_head_attention, num_heads: 2, name: a}",
                                      "{type: global_avg_pool, axis: 1}"])
    p = {k.split("/")[1]: torch.from_numpy(v) for k, v in net.param_values().items()}
    module = torch.nn.MultiheadAttention(features, 2, batch_first=True, dtype=torch.float64)
    with torch.no_grad():
        module.in_proj_weight.copy_(torch.cat([p["W_q"], p["W_k"], p["W_v"]]))
        module.in_proj_bias.copy_(torch.cat([p["b_q"], p["b_k"], p["b_v"]]))
        module.out_proj.weight.copy_(p["W_o"])
        module.out_proj.bias.copy_(p["b_o"])
    t = torch.from_numpy(x)
    pad = torch.from_numpy(np.array([[j >= n for j in range(steps)] for n in lengths]))
    theirs, _ = module(t, t, t, key_padding_mask=pad, need_weights=False)
    # torch's outputs at the real steps, averaged over them (the pool leaves the padded ones out)
    want = np.stack([theirs.detach().numpy()[n, :length].mean(axis=0) for n, length in enumerate(lengths)])
    np.testing.assert_allclose(predict(net, x), want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("items, where, message", [
    (["{type: masking}", "{type: flatten}", "{type: dense, units: 2}"], "model.layers[1]",
     "layer 'flatten_1': 'flatten' cannot take the mask of a padded sequence"),
    (["{type: masking}", "{type: conv1d, filters: 2, kernel_size: 2}", "{type: flatten}"], "model.layers[1]",
     "layer 'conv1d_1': 'conv1d' cannot take the mask"),
    (["{type: masking, name: m}", "{type: concatenate, inputs: [m, m], axis: 1}", "{type: lstm, units: 2}"],
     "model.layers[1].axis", "joins masked sequences along their time axis"),
    (["{type: masking}", "{type: global_avg_pool}", "{type: dense, units: 2}"], "model.layers[2]",
     "'dense' would read a masked sequence's time axis as its features: received shape (4,)"),
    (["{type: masking}", "{type: embedding, input_dim: 3, output_dim: 2}", "{type: flatten}"],
     "model.layers[1]", "'embedding' reads ids, not a masked sequence"),
])
def test_a_mask_where_it_cannot_go_is_located(items, where, message):
    from netbuild.errors import SpecError

    with pytest.raises(SpecError) as caught:
        network((4, 3), items)
    line = caught.value.lines()[0]
    assert f": {where}: " in line and message in line, line


PER_STEP = ["{type: masking, mask_value: -7.0}", "{type: lstm, units: 4, return_sequences: true}",
            "{type: dense, units: 3, activation: softmax}"]


def per_step_loss(net, x, y):
    """Per-example categorical cross-entropy of a per-timestep output, and its gradients."""
    import dataclasses

    import pytensor.tensor as pt

    from netbuild.compile import _loss_graph, target_variable

    target = target_variable(y)
    head = dataclasses.replace(net.signature.outputs[0], loss="categorical_crossentropy")
    xs, _, per_example, _ = _loss_graph(net, [head], [target], False)
    params = list(net.params.values())
    grads = pytensor.grad(pt.sum(per_example[head.name]), params)
    return pytensor.function([*xs, target], [per_example[head.name], *grads],
                             mode="FAST_COMPILE")(x, y)


def test_a_per_timestep_loss_leaves_padded_steps_out():
    """Each example's loss is the mean over its real steps, as for its sequence alone; what the
    targets of padded steps hold changes neither the loss nor a gradient."""
    lengths, steps, features = [4, 2, 3], 4, 3
    x = padded(lengths, steps, features, -7.0)
    y = RNG.integers(0, 3, size=(3, steps))
    net = network((steps, features), PER_STEP)
    loss, *grads = per_step_loss(net, x, y)
    total = [np.zeros_like(g) for g in grads]
    for n, length in enumerate(lengths):
        alone = network((length, features), PER_STEP)
        alone.set_param_values(net.param_values())
        own, *own_grads = per_step_loss(alone, x[n:n + 1, :length], y[n:n + 1, :length])
        np.testing.assert_allclose(loss[n], own[0], rtol=0, atol=1e-12)
        total = [t + g for t, g in zip(total, own_grads)]
    for got, want in zip(grads, total):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)
    other = y.copy()
    for n, length in enumerate(lengths):
        other[n, length:] = (other[n, length:] + 1) % 3
    for a, b in zip([loss, *grads], per_step_loss(net, x, other)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


def test_metrics_of_a_per_timestep_output_count_real_steps_only():
    from netbuild.data import Dataset
    from netbuild.model import Model

    lengths, steps, features = [4, 2, 3], 4, 3
    x = padded(lengths, steps, features, -7.0)
    net = network((steps, features), PER_STEP, train="{loss: categorical_crossentropy, metrics: "
                  "[accuracy], optimizer: {type: sgd}}")
    model = Model(net.spec, net, "t")
    real = np.array([[j < n for j in range(steps)] for n in lengths])
    # targets the model gets right at every padded step and wrong at every real one (its outputs
    # do not depend on the targets): counted over the real steps only, the accuracy is 0. (Drawn
    # targets made the test depend on which tests had drawn from the module's RNG before.)
    _, first = model.evaluate_dataset(Dataset.of(x, np.zeros((3, steps), dtype=np.int64), "arrays"))
    predicted = first.outputs["output"].argmax(-1)
    y = np.where(real, (predicted + 1) % 3, predicted)
    metrics, results = model.evaluate_dataset(Dataset.of(x, y, "arrays"))
    outputs, mask = results.outputs["output"], results.masks["output"]
    np.testing.assert_array_equal(mask > 0.5, real)
    np.testing.assert_array_equal(outputs.argmax(-1), predicted)
    assert metrics["accuracy"] == 0.0  # over every step it would be 3 of 12


def test_a_per_timestep_model_trains_and_evaluates_through_the_cli(tmp_path, run_cli):
    import json

    lengths = RNG.integers(1, 7, 40)
    x = padded(list(lengths), 6, 3, -7.0).astype(np.float32)
    y = RNG.integers(0, 3, size=(40, 6))
    np.savez(tmp_path / "seq.npz", x=x, y=y)
    spec = tmp_path / "seq.yaml"
    spec.write_text("name: seq\ndata: {train: seq.npz, test: seq.npz}\nmodel:\n  input_shape: [6, 3]\n"
                    "  layers:\n" + "".join(f"    - {i}\n" for i in PER_STEP)
                    + "train: {loss: categorical_crossentropy, optimizer: {type: adam}, epochs: 2, "
                      "batch_size: 8, metrics: [accuracy]}\n")
    assert run_cli("check", spec).exit_code == 0
    result = run_cli("train", spec, "--run-dir", tmp_path / "run", "-q")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and 0.0 <= records[-1]["accuracy"] <= 1.0
    result = run_cli("eval", tmp_path / "run", "--format", "json", "--confusion")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert sum(map(sum, report["confusion_matrix"])) == int(lengths.sum())  # the real steps only
