"""Transposed, depthwise and separable convolutions against independent references: their
definitions written as numpy loops, and torch's functional ops on the same weights where torch
is installed; gradients numerically."""

from __future__ import annotations

import itertools

import numpy as np
import pytensor
import pytest
from conftest import TEST_MODE, verify_grad
from test_shape import located_error

from netbuild.network import Network
from netbuild.spec import load_text, validate

RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def float64():
    with pytensor.config.change_flags(floatX="float64"):
        yield


def built(item: str, shape):
    """The one layer of a spec, its parameters drawn at random (float64)."""
    text = (f"name: t\ndata: {{train: none.npz}}\nmodel:\n  input_shape: {list(shape)}\n  layers:\n"
            f"    - {item}\ntrain: {{loss: mse, optimizer: {{type: sgd}}}}\n")
    net = Network.from_spec(validate(load_text(text, "t.yaml")))
    for var in net.params.values():
        var.set_value(RNG.normal(size=var.get_value().shape))
    return net


def predict(net, x, mode=TEST_MODE):
    """The network's outputs in ``mode`` (``"c"``: the C backend ``netbuild predict`` runs)."""
    from netbuild import backend

    v = net.input_variable()
    mode = backend.mode() if mode == "c" else mode
    return pytensor.function([v], net.forward(v, training=False)[0], mode=mode)(x)


def transposed_reference(x, W, b, strides, dilation, pads, out):
    """Every input value scatters ``W`` times itself into the (padded) output, then the pads are cut."""
    n, c = x.shape[:2]
    f, kernel = W.shape[1], W.shape[2:]
    full = [o + pb + pa for o, (pb, pa) in zip(out, pads)]
    y = np.zeros((n, f, *full))
    for index in itertools.product(*(range(d) for d in x.shape[2:])):
        for offset in itertools.product(*(range(k) for k in kernel)):
            at = tuple(i * s + o * d for i, s, o, d in zip(index, strides, offset, dilation))
            if all(a < m for a, m in zip(at, full)):
                y[(slice(None), slice(None)) + at] += np.einsum("nc,cf->nf", x[(slice(None), slice(None)) + index],
                                                                W[(slice(None), slice(None)) + offset])
    crop = tuple(slice(pb, pb + o) for o, (pb, _) in zip(out, pads))
    y = y[(slice(None), slice(None)) + crop]
    return y if b is None else y + b.reshape((1, -1) + (1,) * len(out))


TRANSPOSED = [
    ("{type: conv2d_transpose, filters: 3, kernel_size: 3, strides: 2}", (2, 3, 4)),
    ("{type: conv2d_transpose, filters: 2, kernel_size: [2, 3], strides: [2, 1], padding: 1, "
     "output_padding: [1, 0], dilation_rate: [1, 2]}", (2, 3, 3)),
    ("{type: conv2d_transpose, filters: 2, kernel_size: 3, strides: 2, padding: same}", (1, 3, 3)),
    ("{type: conv2d_transpose, filters: 2, kernel_size: 1, strides: 3, padding: same}", (2, 2, 2)),
    ("{type: conv1d_transpose, filters: 2, kernel_size: 4, strides: 3, padding: 1, output_padding: 2, "
     "use_bias: false}", (3, 4)),
]


@pytest.mark.parametrize("item, shape", TRANSPOSED)
def test_transposed_convolution_is_its_definition(item, shape):
    net = built(item, shape)
    layer = net.order[0].layer
    geo = layer.geometry(shape)
    x = RNG.normal(size=(2, *shape))
    b = layer.params["b"].get_value() if "b" in layer.params else None
    want = transposed_reference(x, layer.params["W"].get_value(), b, geo.strides, geo.dilation,
                                geo.pads, geo.out)
    assert want.shape[1:] == net.output_shape
    np.testing.assert_allclose(predict(net, x), want, rtol=0, atol=1e-10)
    np.testing.assert_allclose(predict(net, x, mode="c"), want, rtol=0, atol=1e-10)  # the C ops
    verify_grad(lambda t: net.forward(t, training=False)[0], [x])


def depthwise_reference(x, W, b, strides, dilation, pads):
    n, c = x.shape[:2]
    m = W.shape[0] // c
    xp = np.pad(x, [(0, 0), (0, 0)] + list(pads))
    kh, kw = W.shape[2:]
    oh = (xp.shape[2] - dilation[0] * (kh - 1) - 1) // strides[0] + 1
    ow = (xp.shape[3] - dilation[1] * (kw - 1) - 1) // strides[1] + 1
    y = np.zeros((n, c * m, oh, ow))
    for ch, k, i, j in itertools.product(range(c), range(m), range(oh), range(ow)):
        patch = xp[:, ch, i * strides[0]:i * strides[0] + dilation[0] * (kh - 1) + 1:dilation[0],
                   j * strides[1]:j * strides[1] + dilation[1] * (kw - 1) + 1:dilation[1]]
        y[:, ch * m + k, i, j] = np.einsum("nuv,uv->n", patch, W[ch * m + k, 0])
    return y if b is None else y + b.reshape(1, -1, 1, 1)


@pytest.mark.parametrize("item, shape", [
    ("{type: depthwise_conv2d, kernel_size: 3}", (3, 5, 5)),
    ("{type: depthwise_conv2d, kernel_size: [3, 2], depth_multiplier: 2, strides: [2, 1], padding: same, "
     "dilation_rate: [1, 2]}", (2, 5, 6)),
])
def test_depthwise_convolution_is_its_definition(item, shape):
    net = built(item, shape)
    layer = net.order[0].layer
    win = layer.geometry(shape)
    x = RNG.normal(size=(2, *shape))
    want = depthwise_reference(x, layer.params["W"].get_value(), layer.params["b"].get_value(),
                               win.strides, win.dilation, win.pads)
    np.testing.assert_allclose(predict(net, x), want, rtol=0, atol=1e-10)
    verify_grad(lambda t: net.forward(t, training=False)[0], [x])


def test_separable_convolution_is_depthwise_then_pointwise():
    shape = (2, 5, 5)
    net = built("{type: separable_conv2d, filters: 3, kernel_size: 3, depth_multiplier: 2, padding: 1}", shape)
    p = {k.split("/")[1]: v.get_value() for k, v in net.params.items()}
    x = RNG.normal(size=(2, *shape))
    mid = depthwise_reference(x, p["W_depthwise"], None, (1, 1), (1, 1), [(1, 1), (1, 1)])
    want = np.einsum("fc,nchw->nfhw", p["W_pointwise"][:, :, 0, 0], mid) + p["b"].reshape(1, -1, 1, 1)
    np.testing.assert_allclose(predict(net, x), want, rtol=0, atol=1e-10)
    np.testing.assert_allclose(predict(net, x, mode="c"), want, rtol=0, atol=1e-10)


def test_against_torch():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x2 = RNG.normal(size=(2, 2, 4, 3))
    net = built("{type: conv2d_transpose, filters: 3, kernel_size: [3, 2], strides: 2, padding: 1, "
                "output_padding: 1, dilation_rate: [2, 1]}", x2.shape[1:])
    p = {k.split("/")[1]: torch.from_numpy(v.get_value()) for k, v in net.params.items()}
    theirs = F.conv_transpose2d(torch.from_numpy(x2), p["W"], p["b"], stride=2, padding=1,
                                output_padding=1, dilation=(2, 1))
    np.testing.assert_allclose(predict(net, x2, mode="c"), theirs.numpy(), rtol=0, atol=1e-10)
    x1 = RNG.normal(size=(2, 3, 5))
    net = built("{type: conv1d_transpose, filters: 2, kernel_size: 3, strides: 3, output_padding: 2}", x1.shape[1:])
    p = {k.split("/")[1]: torch.from_numpy(v.get_value()) for k, v in net.params.items()}
    theirs = F.conv_transpose1d(torch.from_numpy(x1), p["W"], p["b"], stride=3, output_padding=2)
    np.testing.assert_allclose(predict(net, x1, mode="c"), theirs.numpy(), rtol=0, atol=1e-10)
    net = built("{type: depthwise_conv2d, kernel_size: 3, depth_multiplier: 2, strides: 2, padding: 1}",
                x2.shape[1:])
    p = {k.split("/")[1]: torch.from_numpy(v.get_value()) for k, v in net.params.items()}
    theirs = F.conv2d(torch.from_numpy(x2), p["W"], p["b"], stride=2, padding=1, groups=2)
    np.testing.assert_allclose(predict(net, x2, mode="c"), theirs.numpy(), rtol=0, atol=1e-10)
    net = built("{type: separable_conv2d, filters: 4, kernel_size: 2}", x2.shape[1:])
    p = {k.split("/")[1]: torch.from_numpy(v.get_value()) for k, v in net.params.items()}
    theirs = F.conv2d(F.conv2d(torch.from_numpy(x2), p["W_depthwise"], groups=2), p["W_pointwise"], p["b"])
    np.testing.assert_allclose(predict(net, x2, mode="c"), theirs.numpy(), rtol=0, atol=1e-10)


@pytest.mark.parametrize("item, shape, message", [
    ("{type: conv2d_transpose, filters: 2, kernel_size: 3, strides: 2, output_padding: 2}", (1, 3, 3),
     "model.layers[0].output_padding: layer 'conv2d_transpose_0': output_padding 2 is not smaller than the "
     "stride 2"),
    ("{type: conv1d_transpose, filters: 2, kernel_size: 2, dilation_rate: 2, output_padding: 1}", (1, 4),
     "output_padding 1 is not smaller than the stride 1"),
    ("{type: conv2d_transpose, filters: 2, kernel_size: 3, strides: 2, padding: same, output_padding: 1}",
     (1, 3, 3), "output_padding with padding 'same'"),
    ("{type: conv1d_transpose, filters: 2, kernel_size: 2, padding: 3}", (1, 2),
     "model.layers[0].padding: layer 'conv1d_transpose_0': the output length would be -3"),
])
def test_transposed_mistakes_are_located(item, shape, message):
    assert message in located_error(item, shape)
