"""embedding: lookup against numpy indexing, shapes, the gradient with respect to W."""

import numpy as np
import pytensor
import pytensor.tensor as pt
import pytest
from conftest import TEST_MODE, verify_grad

from netbuild import initializers
from netbuild.layers.base import Context
from netbuild.layers.embedding import Embedding

CONFIG = {"type": "embedding", "input_dim": 7, "output_dim": 3, "embeddings_initializer": "uniform"}


@pytest.fixture(autouse=True)
def float64():
    with pytensor.config.change_flags(floatX="float64"):
        yield


def build(shape, config=CONFIG):
    layer = Embedding("emb", config)
    for p in layer.param_specs([shape]):
        value = initializers.initialize(p.init, np.random.default_rng(0), p.shape, p.fan_in, p.fan_out)
        layer.params[p.name] = pytensor.shared(value, name=f"{layer.name}/{p.name}")
    return layer


def test_integer_input_flag():
    assert Embedding.integer_input is True


@pytest.mark.parametrize("shape", [(5,), ()])
def test_lookup(shape):
    layer = build(shape)
    assert layer.output_shape([shape]) == shape + (3,)
    (spec,) = layer.param_specs([shape])
    assert (spec.name, spec.shape, spec.init, spec.trainable) == ("W", (7, 3), "uniform", True)
    W = layer.params["W"].get_value()
    assert np.all(np.abs(W) <= 0.05)

    ids = pt.tensor("ids", dtype="int64", shape=(None, *shape))
    f = pytensor.function([ids], layer.forward([ids], Context(training=False)), mode=TEST_MODE)
    values = np.random.default_rng(1).integers(0, 7, size=(4, *shape))
    got = f(values)
    assert got.shape[1:] == layer.output_shape([shape])
    np.testing.assert_array_equal(got, W[values])


def test_float_ids_are_accepted():
    layer = build((2,))
    x = pt.matrix("x", dtype="float64")
    f = pytensor.function([x], layer.forward([x], Context(training=False)), mode=TEST_MODE)
    np.testing.assert_array_equal(f(np.array([[0.0, 6.0]])), layer.params["W"].get_value()[[[0, 6]]])


def test_gradient_with_respect_to_W():
    layer = build((4,))
    ids = pt.constant(np.array([[0, 2, 2, 6], [1, 0, 5, 2]], dtype="int64"))

    def fun(W):
        layer.params = {"W": W}
        return layer.forward([ids], Context(training=True))

    rng = np.random.default_rng(2)
    verify_grad(fun, [rng.normal(size=(7, 3))], rng=rng, mode=TEST_MODE)
