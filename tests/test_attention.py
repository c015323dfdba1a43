"""multi_head_attention and positional_embedding against the equations in numpy, and against
torch.nn.MultiheadAttention on the same weights where torch is installed."""

from __future__ import annotations

import numpy as np
import pytensor
import pytest
from test_conv_variants import built, predict
from test_shape import located_error

RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def float64():
    with pytensor.config.change_flags(floatX="float64"):
        yield


def softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def attention_reference(q, kv, p, heads, causal=False):
    """The module docstring's equations, one head at a time."""
    Q, K, V = q @ p["W_q"].T + p["b_q"], kv @ p["W_k"].T + p["b_k"], kv @ p["W_v"].T + p["b_v"]
    dk, dv = Q.shape[-1] // heads, V.shape[-1] // heads
    outs = []
    for h in range(heads):
        s = Q[..., h * dk:(h + 1) * dk] @ np.swapaxes(K[..., h * dk:(h + 1) * dk], -1, -2) / np.sqrt(dk)
        if causal:
            s = np.where(np.tril(np.ones(s.shape[-2:], dtype=bool)), s, -np.inf)
        outs.append(softmax(s) @ V[..., h * dv:(h + 1) * dv])
    return np.concatenate(outs, axis=-1) @ p["W_o"].T + p["b_o"]


def params(net, name):
    return {k.split("/")[1]: v.get_value() for k, v in net.params.items() if k.startswith(name + "/")}


@pytest.mark.parametrize("causal", [False, True])
def test_self_attention_is_its_equations(causal):
    net = built(f"{{type: multi_head_attention, num_heads: 2, causal: {str(causal).lower()}}}", (5, 6))
    x = RNG.normal(size=(3, 5, 6))
    want = attention_reference(x, x, params(net, "multi_head_attention_0"), 2, causal)
    np.testing.assert_allclose(predict(net, x), want, rtol=0, atol=1e-10)
    np.testing.assert_allclose(predict(net, x, mode="c"), want, rtol=0, atol=1e-10)


def test_cross_attention_with_its_own_head_sizes():
    from netbuild.network import Network
    from netbuild.spec import load_text, validate

    text = ("name: t\ndata: {train: none.npz}\nmodel:\n  input_shape: [4, 3]\n  layers:\n"
            "    - {type: dense, units: 5, name: kv}\n"
            "    - {type: multi_head_attention, num_heads: 3, key_dim: 2, value_dim: 4, inputs: [input, kv], name: a}\n"
            "train: {loss: mse, optimizer: {type: sgd}}\n")
    net = Network.from_spec(validate(load_text(text, "t.yaml")))
    for var in net.params.values():
        var.set_value(RNG.normal(size=var.get_value().shape))
    x = RNG.normal(size=(2, 4, 3))
    d = params(net, "kv")
    kv = x @ d["W"] + d["b"]
    want = attention_reference(x, kv, params(net, "a"), 3)
    np.testing.assert_allclose(predict(net, x, mode="c"), want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("causal", [False, True])
def test_against_torch_multihead_attention(causal):
    torch = pytest.importorskip("torch")
    net = built(f"{{type: multi_head_attention, num_heads: 4, causal: {str(causal).lower()}}}", (6, 8))
    p = {k: torch.from_numpy(v) for k, v in params(net, "multi_head_attention_0").items()}
    module = torch.nn.MultiheadAttention(8, 4, batch_first=True, dtype=torch.float64)
    with torch.no_grad():
        module.in_proj_weight.copy_(torch.cat([p["W_q"], p["W_k"], p["W_v"]]))
        module.in_proj_bias.copy_(torch.cat([p["b_q"], p["b_k"], p["b_v"]]))
        module.out_proj.weight.copy_(p["W_o"])
        module.out_proj.bias.copy_(p["b_o"])
    x = RNG.normal(size=(3, 6, 8))
    t = torch.from_numpy(x)
    mask = torch.triu(torch.ones(6, 6, dtype=torch.bool), 1) if causal else None
    theirs, _ = module(t, t, t, attn_mask=mask, need_weights=False)
    np.testing.assert_allclose(predict(net, x, mode="c"), theirs.detach().numpy(), rtol=0, atol=1e-10)


def test_attention_dropout_drops_weights_only_in_training():
    import pytensor.tensor as pt

    from netbuild.layers.base import Context

    net = built("{type: multi_head_attention, num_heads: 1, dropout: 0.5}", (4, 2))
    layer = net.order[0].layer
    x = pt.tensor3("x")
    step = pytensor.shared(np.asarray(0, dtype="int64"))
    values = RNG.normal(size=(2, 4, 2))
    A, _ = layer.weights([x], Context(training=True, seed=1, step=step))
    dropped = pytensor.function([x], A, mode="FAST_COMPILE")(values)
    E, _ = layer.weights([x], Context(training=False))
    kept = pytensor.function([x], E, mode="FAST_COMPILE")(values)
    np.testing.assert_allclose(kept.sum(-1), 1.0)  # evaluation: every weight, rows summing to 1
    zero = dropped == 0
    assert 0.2 < zero.mean() < 0.8  # about half dropped
    np.testing.assert_allclose(dropped[~zero], kept[~zero] / 0.5, rtol=1e-12)  # the rest scaled


def test_positional_embeddings():
    from netbuild.layers.attention import sinusoids

    x = RNG.normal(size=(2, 5, 4))
    net = built("{type: positional_embedding, encoding: sinusoidal}", (5, 4))
    pe = np.array([[np.sin(t / 10000 ** (2 * (i // 2) / 4)) if i % 2 == 0 else
                    np.cos(t / 10000 ** (2 * (i // 2) / 4)) for i in range(4)] for t in range(5)])
    np.testing.assert_allclose(sinusoids(5, 4), pe, rtol=0, atol=1e-12)
    np.testing.assert_allclose(predict(net, x), x + pe, rtol=0, atol=1e-12)
    net = built("{type: positional_embedding, max_length: 9}", (5, 4))
    W = net.params["positional_embedding_0/W"].get_value()
    assert W.shape == (9, 4)
    np.testing.assert_allclose(predict(net, x, mode="c"), x + W[:5], rtol=0, atol=1e-12)


@pytest.mark.parametrize("item, shape, message", [
    ("{type: multi_head_attention, num_heads: 4}", (3, 6),
     "model.layers[0].num_heads: layer 'multi_head_attention_0': the queries' 6 features do not split into 4 heads"),
    ("{type: multi_head_attention, num_heads: 2}", (6,), "reads sequences: expected queries of shape (timesteps, features)"),
    ("{type: positional_embedding, max_length: 4}", (5, 3),
     "model.layers[0].max_length: layer 'positional_embedding_0': the input has 5 timesteps, more than max_length 4"),
])
def test_attention_mistakes_are_located(item, shape, message):
    assert message in located_error(item, shape)
