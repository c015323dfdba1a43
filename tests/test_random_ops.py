"""Dropout's counter-based uniform draws: C equals the numpy reference, the samples are uniform,
and each stream and step is a new draw."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytensor
import pytensor.tensor as pt
import pytest

from netbuild import backend
from netbuild.ops.random import CounterUniform, uniform_reference


def _compiled(dtype: str, stream: int):
    shape = pt.vector("shape", dtype="int64", shape=(2,))
    seed, step = pt.scalar("seed", dtype="int64"), pt.scalar("step", dtype="int64")
    fn = pytensor.function([shape, seed, step], CounterUniform(dtype, stream)(shape, seed, step),
                           mode=backend.mode())
    assert all(getattr(t, "cthunk", None) is not None for t in fn.vm.thunks)
    return lambda s, seed, step: fn(np.asarray(s, dtype="int64"), seed, step)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_c_matches_reference_and_is_uniform(dtype):
    draw = _compiled(dtype, stream=3)
    u = draw((300, 700), 42, 7)
    assert u.dtype == dtype and u.shape == (300, 700)
    np.testing.assert_array_equal(u, uniform_reference((300, 700), 42, 3, 7, dtype))
    assert u.min() >= 0.0 and u.max() < 1.0
    assert abs(u.mean() - 0.5) < 0.003 and abs(u.var() - 1 / 12) < 0.002
    counts, _ = np.histogram(u, bins=20, range=(0, 1))
    expected = u.size / 20
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 45  # 19 degrees of freedom: p < 0.001 above 43.8
    # neighbours are not correlated
    flat = u.ravel().astype(np.float64) - 0.5
    assert abs(np.mean(flat[1:] * flat[:-1])) < 0.002


def test_streams_steps_and_seeds_differ():
    draw = _compiled("float32", stream=1)
    base = draw((50, 40), 0, 0)
    np.testing.assert_array_equal(base, draw((50, 40), 0, 0))  # deterministic
    for other in (draw((50, 40), 0, 1), draw((50, 40), 1, 0), _compiled("float32", 2)((50, 40), 0, 0)):
        assert np.mean(np.abs(base - other)) > 0.2  # an independent draw, not a shifted copy
    assert draw((0, 4), 0, 0).shape == (0, 4)


def test_dropout_keeps_the_expected_fraction(float64):
    from netbuild.layers.base import Context

    step = pytensor.shared(np.asarray(0, dtype="int64"))
    ctx = Context(training=True, seed=5, step=step)
    x = pt.matrix("x")
    mask = ctx.uniform(x.shape, "float64") < 0.7
    fn = pytensor.function([x], mask.mean(), updates=ctx.updates, mode=backend.mode())
    fractions = [float(fn(np.ones((200, 100)))) for _ in range(3)]
    assert all(abs(f - 0.7) < 0.01 for f in fractions)
    assert len(set(fractions)) == 3  # a new mask at every step
    assert int(step.get_value()) == 3


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax not installed")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_jax_draws_are_the_same_bits(dtype):
    """The jax backend's CounterUniform draws what the numpy reference (and the C code) draws."""
    backend.jax_modules()
    x, seed, step = pt.matrix("x", dtype=dtype), pt.lscalar("seed"), pt.lscalar("step")
    fn = pytensor.function([x, seed, step], CounterUniform(dtype, 7)(x.shape, seed, step), mode="JAX")
    for shape, s, k in [((5, 7), 42, 9), ((1, 1), 0, 0), ((33, 65), 2**40 + 3, 123456)]:
        got = np.asarray(fn(np.zeros(shape, dtype), s, k))
        assert got.dtype == dtype and np.array_equal(got, uniform_reference(shape, s, 7, k, dtype))
