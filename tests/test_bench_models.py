"""The benchmark's PyTorch twins (bench/models.py) compute what netbuild's networks compute, from
the same weights: otherwise ``make bench`` would compare two different models. One batch of each
model's own synthetic data (the masked LSTM's padded sequences included), float32."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytensor
import pytest

from netbuild.compile import compile_predict
from netbuild.network import Network
from netbuild.spec import load_text, validate

torch = pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from models import MODELS  # noqa: E402


@pytest.mark.parametrize("name", MODELS)
def test_the_torch_twin_computes_netbuilds_network(name):
    model = MODELS[name]
    with pytensor.config.change_flags(floatX="float32"):
        net = Network.from_spec(validate(load_text(model.spec_text("none.npz"), "bench.yaml")))
        x = model.data()[0][:8]
        want = compile_predict(net)(x)
    twin = model.torch_model({k: v.astype(np.float32) for k, v in net.param_values().items()})
    with torch.no_grad():
        got = torch.softmax(twin(torch.from_numpy(x)), dim=-1).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)
