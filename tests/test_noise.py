"""``dropout`` through :meth:`Dropout.forward` in training mode, compiled to C as training runs it:
the fraction dropped, the scale of what is kept, a new mask at every step, and the same mask for
the same seed and step (the numpy reference of the counter-based draw)."""

from __future__ import annotations

import numpy as np
import pytensor
import pytensor.tensor as pt
import pytest

from netbuild import backend
from netbuild.layers.base import Context
from netbuild.layers.noise import Dropout
from netbuild.ops.random import uniform_reference

SHAPE = (200, 150)  # 30,000 draws: the dropped fraction's standard error is under 0.003


def compiled_dropout(rate: float, seed: int, dtype: str = "float64"):
    """``(fn, step)``: one dropout layer's training output and its shared step counter."""
    step = pytensor.shared(np.asarray(0, dtype="int64"), name="random/step")
    ctx = Context(training=True, seed=seed, step=step)
    x = pt.matrix("x", dtype=dtype)
    y = Dropout("drop", {"type": "dropout", "rate": rate}).forward([x], ctx)
    fn = pytensor.function([x], y, updates=ctx.updates, mode=backend.mode())
    return fn, step


def positive(dtype: str = "float64") -> np.ndarray:
    """Inputs that are never zero, so a zero in the output is a dropped element."""
    return np.random.default_rng(0).uniform(0.5, 2.0, size=SHAPE).astype(dtype)


@pytest.mark.parametrize("rate", [0.1, 0.3, 0.8])
def test_drops_rate_and_scales_the_rest_by_one_over_keep(rate, float64):
    fn, _ = compiled_dropout(rate, seed=3)
    x = positive()
    y = fn(x)
    dropped = y == 0
    assert abs(dropped.mean() - rate) < 0.015
    np.testing.assert_allclose(y[~dropped], x[~dropped] / (1.0 - rate), rtol=1e-12)
    # inverted dropout keeps the expected value: the mean of y is the mean of x
    assert abs(y.mean() / x.mean() - 1.0) < 0.05


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_mask_is_the_counter_draw_of_seed_stream_and_step(dtype):
    """Element i is kept exactly when draw i of (seed, stream 1, step) is below keep: a checkpoint's
    step counter then reproduces every mask."""
    rate, seed = 0.4, 11
    fn, step = compiled_dropout(rate, seed, dtype)
    x = positive(dtype)
    for k in range(3):
        assert int(step.get_value()) == k
        kept = uniform_reference(SHAPE, seed, 1, k, dtype) < 1.0 - rate
        np.testing.assert_array_equal(fn(x) != 0, kept)


def test_a_new_mask_every_step_and_the_same_mask_for_the_same_seed_and_step(float64):
    fn, step = compiled_dropout(0.5, seed=7)
    x = positive()
    masks = [fn(x) != 0 for _ in range(3)]
    assert int(step.get_value()) == 3
    for a, b in [(0, 1), (1, 2), (0, 2)]:
        assert (masks[a] != masks[b]).mean() > 0.4  # independent halves differ in about 1/2
    step.set_value(np.asarray(1, dtype="int64"))  # as a resumed run sets it
    np.testing.assert_array_equal(fn(x) != 0, masks[1])
    other, _ = compiled_dropout(0.5, seed=8)
    assert ((other(x) != 0) != masks[0]).mean() > 0.4  # another seed, another mask


def test_two_dropout_layers_draw_different_masks(float64):
    step = pytensor.shared(np.asarray(0, dtype="int64"))
    ctx = Context(training=True, seed=1, step=step)
    x = pt.matrix("x")
    a = Dropout("a", {"type": "dropout", "rate": 0.5}).forward([x], ctx)
    b = Dropout("b", {"type": "dropout", "rate": 0.5}).forward([x], ctx)
    ya, yb = pytensor.function([x], [a, b], updates=ctx.updates, mode=backend.mode())(positive())
    assert ((ya != 0) != (yb != 0)).mean() > 0.4
    assert int(step.get_value()) == 1  # one step per batch, however many layers draw


@pytest.mark.parametrize("training, rate", [(False, 0.5), (True, 0.0)])
def test_identity_in_inference_and_at_rate_zero(training, rate):
    x = pt.matrix("x")
    ctx = Context(training=training, step=pytensor.shared(np.asarray(0, dtype="int64")))
    assert Dropout("d", {"type": "dropout", "rate": rate}).forward([x], ctx) is x
