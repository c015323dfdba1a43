"""Pieces of the training graph: weight penalties and gradient clipping against numpy."""

from __future__ import annotations

import numpy as np
import pytensor
import pytensor.tensor as pt
from conftest import TEST_MODE

from netbuild.compile import clip, penalty
from netbuild.network import Network
from netbuild.spec import load_text, validate

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
    value = pytensor.function([], penalty(net), mode=TEST_MODE)()
    W = net.params["dense_0/W"].get_value()
    assert np.isclose(value, 0.01 * np.abs(W).sum() + 0.1 * (W**2).sum())


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
