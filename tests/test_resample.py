"""upsampling1d and upsampling2d against independent references: numpy's repeat for nearest, the
interpolation formula evaluated point by point for linear and bilinear (and torch's
``interpolate`` where torch is installed)."""

from __future__ import annotations

import numpy as np
import pytensor
import pytensor.tensor as pt
import pytest
from conftest import TEST_MODE, verify_grad
from test_shape import layer_from

from netbuild.layers.base import Context


@pytest.fixture(autouse=True)
def float64():
    with pytensor.config.change_flags(floatX="float64"):
        yield


def forward(layer, values):
    x = pt.tensor("x", dtype="float64", shape=(None, *values.shape[1:]))
    return pytensor.function([x], layer.forward([x], Context(training=False)), mode=TEST_MODE)(values)


def linear_reference(x: np.ndarray, size: int, axis: int) -> np.ndarray:
    """torch's align_corners=False linear upsampling along ``axis``, one output at a time."""
    n = x.shape[axis]
    out = []
    for i in range(n * size):
        src = max((i + 0.5) / size - 0.5, 0.0)
        lo = int(np.floor(src))
        hi = min(lo + 1, n - 1)
        w = src - lo
        out.append((1 - w) * np.take(x, lo, axis=axis) + w * np.take(x, hi, axis=axis))
    return np.stack(out, axis=axis)


RNG = np.random.default_rng(0)


@pytest.mark.parametrize("item, shape, reference", [
    ("{type: upsampling1d, size: 3}", (2, 4), lambda x: np.repeat(x, 3, axis=2)),
    ("{type: upsampling2d, size: [2, 3]}", (2, 3, 4), lambda x: np.repeat(np.repeat(x, 2, axis=2), 3, axis=3)),
    ("{type: upsampling1d, size: 2, interpolation: linear}", (2, 5), lambda x: linear_reference(x, 2, 2)),
    ("{type: upsampling1d, size: 3, interpolation: linear}", (1, 1), lambda x: linear_reference(x, 3, 2)),
    ("{type: upsampling2d, size: [3, 2], interpolation: bilinear}", (2, 3, 4),
     lambda x: linear_reference(linear_reference(x, 3, 2), 2, 3)),
])
def test_upsampling_matches_its_reference(item, shape, reference):
    layer = layer_from(item, shape)
    x = RNG.normal(size=(3, *shape))
    got = forward(layer, x)
    assert got.shape[1:] == layer.output_shape([shape])
    np.testing.assert_allclose(got, reference(x), rtol=0, atol=1e-12)
    verify_grad(lambda t: layer.forward([t], Context(training=False)), [x])


@pytest.mark.parametrize("mode, size", [("linear", 3), ("bilinear", (2, 3)), ("nearest", (2, 2))])
def test_upsampling_matches_torch(mode, size):
    torch = pytest.importorskip("torch")
    rank = 1 if mode == "linear" else 2
    shape = (2, 5) if rank == 1 else (2, 4, 3)
    kind = "upsampling1d" if rank == 1 else "upsampling2d"
    layer = layer_from(f"{{type: {kind}, size: {list(size) if rank == 2 else size}, interpolation: {mode}}}",
                       shape)
    x = RNG.normal(size=(3, *shape))
    theirs = torch.nn.functional.interpolate(torch.from_numpy(x), scale_factor=size, mode=mode,
                                             **({} if mode == "nearest" else {"align_corners": False}))
    np.testing.assert_allclose(forward(layer, x), theirs.numpy(), rtol=0, atol=1e-12)
