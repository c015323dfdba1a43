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


def layer_from(item: str, input_shape):
    """The layer of a one-layer spec (defaults filled by the schema) with its static shapes."""
    from netbuild.network import Network
    from netbuild.spec import load_text, validate

    text = (f"name: t\ndata: {{train: none.npz}}\nmodel:\n  input_shape: {list(input_shape)}\n"
            f"  layers:\n    - {item}\ntrain: {{loss: mse, optimizer: {{type: sgd}}}}\n")
    net = Network.from_spec(validate(load_text(text, "t.yaml")), init=False)
    return net.order[0].layer


def located_error(item: str, input_shape) -> str:
    """The one line ``check`` prints for a one-layer spec that must be refused at its layer's line
    (line 6 of the spec :func:`layer_from` writes)."""
    from netbuild.errors import SpecError

    with pytest.raises(SpecError) as caught:
        layer_from(item, input_shape)
    (line,) = caught.value.lines()
    assert line.startswith("t.yaml:6:"), line
    return line


def test_permute_matches_numpy_transpose():
    layer = layer_from("{type: permute, dims: [3, 1, 2]}", (2, 3, 4))
    values, got = run(layer, (2, 3, 4))
    np.testing.assert_array_equal(got, values.transpose(0, 3, 1, 2))


@pytest.mark.parametrize("item, shape, pads", [
    ("{type: zero_padding1d}", (2, 3), [(1, 1)]),
    ("{type: zero_padding1d, padding: [0, 2]}", (2, 3), [(0, 2)]),
    ("{type: zero_padding2d, padding: 2}", (1, 2, 3), [(2, 2), (2, 2)]),
    ("{type: zero_padding2d, padding: [1, 3]}", (1, 2, 3), [(1, 1), (3, 3)]),
    ("{type: zero_padding2d, padding: [[1, 0], [0, 2]]}", (2, 2, 3), [(1, 0), (0, 2)]),
])
def test_zero_padding_matches_numpy_pad(item, shape, pads):
    values, got = run(layer_from(item, shape), shape)
    np.testing.assert_array_equal(got, np.pad(values, [(0, 0), (0, 0)] + pads))


@pytest.mark.parametrize("item, shape, index", [
    ("{type: cropping1d}", (2, 5), np.s_[:, :, 1:4]),
    ("{type: cropping1d, cropping: [0, 2]}", (2, 5), np.s_[:, :, 0:3]),
    ("{type: cropping2d}", (1, 3, 4), np.s_[:, :, :, :]),
    ("{type: cropping2d, cropping: [1, [0, 2]]}", (1, 4, 5), np.s_[:, :, 1:3, 0:3]),
])
def test_cropping_matches_numpy_slices(item, shape, index):
    values, got = run(layer_from(item, shape), shape)
    np.testing.assert_array_equal(got, values[index])


@pytest.mark.parametrize("item, shape, message", [
    ("{type: permute, dims: [1, 1]}", (2, 3), "dims [1, 1] is not an order of the input's axes 1..2"),
    ("{type: permute, dims: [1, 2, 3]}", (2, 3), "dims [1, 2, 3] is not an order of the input's axes 1..2"),
    ("{type: cropping1d, cropping: [2, 3]}", (2, 5), "cropping [2, 3] removes 5 of 5 values"),
    ("{type: cropping2d, cropping: [1, 2, 3]}", (1, 4, 5), "cropping: received a list of 3 items; expected at most 2"),
    ("{type: zero_padding2d}", (2, 3), "a 'zero_padding2d' layer takes inputs of shape (channels, height, width)"),
])
def test_shape_mistakes_are_located(item, shape, message):
    assert message in located_error(item, shape)
