"""The training graph: weight penalties and gradient clipping against numpy, and C code for every
node of the compiled functions."""

from __future__ import annotations

import numpy as np
import pytensor
import pytensor.tensor as pt
import pytest
from conftest import CONFIGS, TEST_MODE
from pytensor.scan.op import Scan

from netbuild.check import load_spec
from netbuild.compile import clip, compile_predict, compile_train, penalty
from netbuild.network import Network
from netbuild.spec import load_text, validate
from netbuild.train import load_datasets

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


def python_nodes(fn, where: str) -> list[str]:
    """Nodes of a compiled function (and of its scans' inner functions) without a C thunk.
    There are no exceptions: dropout draws from netbuild's own C op."""
    out = []
    for node, thunk in zip(fn.vm.nodes, fn.vm.thunks):
        if isinstance(node.op, Scan):
            out += python_nodes(node.op.fn, f"{where}/scan")
        elif getattr(thunk, "cthunk", None) is None:
            out.append(f"{where}: {node.op}")
    return out


SLOW_CONFIGS = {"digits-cnn.yaml", "digits-lstm.yaml", "digits-resnet.yaml"}


@pytest.mark.parametrize("name", [pytest.param(p.name, marks=pytest.mark.slow) if p.name in SLOW_CONFIGS
                                  else p.name for p in sorted(CONFIGS.glob("*.yaml"))])
def test_shipped_configs_compile_to_c_only(name):
    spec = load_spec(str(CONFIGS / name))
    net = Network.from_spec(spec)
    sets = load_datasets(spec, net)
    step = compile_train(net, spec.data["train"], sets.train.y, 0).step
    assert python_nodes(step, "train") + python_nodes(compile_predict(net), "predict") == []
