"""flatten and reshape: shapes, values (numpy's row-major order), refusals."""

import numpy as np
import pytensor
import pytensor.tensor as pt
import pytest
from conftest import TEST_MODE

from netbuild.layers.base import Context, LayerError
from netbuild.layers.shape import Flatten, Reshape


@pytest.fixture(autouse=True)
def float64():
    with pytensor.config.change_flags(floatX="float64"):
        yield


def run(layer, shape):
    x = pt.tensor("x", dtype="float64", shape=(None, *shape))
    values = np.arange(2 * np.prod(shape), dtype="float64").reshape((2, *shape))
    got = pytensor.function([x], layer.forward([x], Context(training=False)), mode=TEST_MODE)(values)
    assert got.shape[1:] == layer.output_shape([shape])
    return values, got


def test_flatten():
    values, got = run(Flatten("f", {"type": "flatten"}), (2, 3, 4))
    np.testing.assert_array_equal(got, values.reshape(2, -1))


@pytest.mark.parametrize("shape, target, out", [
    ((2, 6), [3, 4], (3, 4)),
    ((2, 6), [-1], (12,)),
    ((12,), [2, -1, 3], (2, 2, 3)),
    ((2, 3, 4), [4, 6], (4, 6)),
])
def test_reshape(shape, target, out):
    layer = Reshape("r", {"type": "reshape", "shape": target})
    assert layer.output_shape([shape]) == out
    assert layer.param_specs([shape]) == []
    values, got = run(layer, shape)
    np.testing.assert_array_equal(got, values.reshape((2, *out)))


@pytest.mark.parametrize("target, message", [
    ([5, 2], r"cannot reshape \(2, 6\) \(12 values\) to \[5, 2\] \(10 values\); expected a shape of 12"),
    ([5, -1], r"to \[5, -1\] \(a multiple of 5 values\)"),
    ([-1, -1], r"received shape \[-1, -1\]; expected .* at most one -1"),
    ([0, 12], r"received shape \[0, 12\]"),
])
def test_reshape_refusals(target, message):
    with pytest.raises(LayerError, match=message) as err:
        Reshape("r", {"type": "reshape", "shape": target}).output_shape([(2, 6)])
    assert err.value.key == "shape"
