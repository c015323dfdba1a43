"""add, multiply and concatenate: values, shapes, refusals, gradients."""

import numpy as np
import pytensor
import pytensor.tensor as pt
import pytest
from conftest import TEST_MODE, verify_grad

from netbuild.layers.base import Context, LayerError
from netbuild.layers.merge import Add, Concatenate, Multiply


@pytest.fixture(autouse=True)
def float64():
    with pytensor.config.change_flags(floatX="float64"):
        yield


def inputs(*shapes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(3, *s)) for s in shapes]


def run(layer, values):
    xs = [pt.tensor(f"x{i}", dtype="float64", shape=(None,) * v.ndim) for i, v in enumerate(values)]
    return pytensor.function(xs, layer.forward(xs, Context(training=False)), mode=TEST_MODE)(*values)


@pytest.mark.parametrize("cls, reference", [(Add, lambda a, b, c: a + b + c),
                                            (Multiply, lambda a, b, c: a * b * c)])
def test_elementwise(cls, reference):
    layer = cls("m", {"type": cls.type})
    assert (cls.min_inputs, cls.max_inputs) == (2, None)
    shapes = [(2, 4)] * 3
    assert layer.output_shape(shapes) == (2, 4)
    assert layer.param_specs(shapes) == []
    values = inputs(*shapes)
    got = run(layer, values)
    assert got.shape[1:] == layer.output_shape(shapes)
    np.testing.assert_allclose(got, reference(*values), atol=1e-12)
    verify_grad(lambda *xs: layer.forward(list(xs), Context(training=True)),
                                  values, rng=np.random.default_rng(1), mode=TEST_MODE)


@pytest.mark.parametrize("cls", [Add, Multiply])
def test_elementwise_shapes_must_match(cls):
    with pytest.raises(LayerError, match=r"received input shapes \(4,\), \(5,\); expected") as err:
        cls("m", {"type": cls.type}).output_shape([(4,), (5,)])
    assert err.value.key == "inputs"


@pytest.mark.parametrize("axis, shapes, out", [
    (-1, [(2, 3), (2, 1), (2, 4)], (2, 8)),
    (1, [(2, 3), (5, 3)], (7, 3)),
    (2, [(2, 3), (2, 5)], (2, 8)),
    (-3, [(1, 3, 2), (4, 3, 2)], (5, 3, 2)),
    (-2, [(3, 1, 2), (3, 4, 2)], (3, 5, 2)),
    (-1, [(3,), (4,)], (7,)),
])
def test_concatenate(axis, shapes, out):
    layer = Concatenate("c", {"type": "concatenate", "axis": axis})
    assert layer.output_shape(shapes) == out
    values = inputs(*shapes)
    got = run(layer, values)
    assert got.shape[1:] == out
    np.testing.assert_array_equal(got, np.concatenate(values, axis=axis))


def test_concatenate_gradient():
    layer = Concatenate("c", {"type": "concatenate", "axis": -1})
    verify_grad(lambda a, b: layer.forward([a, b], Context(training=True)),
                                  inputs((2, 3), (2, 2)), rng=np.random.default_rng(2), mode=TEST_MODE)


@pytest.mark.parametrize("axis, shapes, key, message", [
    (0, [(2,), (2,)], "axis", r"received axis 0 \(the batch axis\).*expected 1 to 1 or -1 to -1"),
    (-3, [(2, 3), (2, 3)], "axis", r"received axis -3 \(the batch axis\)"),
    (3, [(2, 3), (2, 3)], "axis", r"received axis 3 for inputs with 2 axes"),
    (-1, [(2, 3), (3, 3)], "inputs", r"received input shapes \(2, 3\), \(3, 3\); expected them equal "
                                     r"except along axis -1"),
    (1, [(2, 3), (2,)], "inputs", r"expected the same number of axes"),
])
def test_concatenate_refusals(axis, shapes, key, message):
    with pytest.raises(LayerError, match=message) as err:
        Concatenate("c", {"type": "concatenate", "axis": axis}).output_shape(shapes)
    assert err.value.key == key
