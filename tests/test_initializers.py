"""Initializers: the distributions their names promise, from large samples."""

from __future__ import annotations

import numpy as np
import pytest

from netbuild import initializers

RNG = np.random.default_rng(0)
SHAPE, FAN_IN, FAN_OUT = (400, 300), 400, 300


def sample(config):
    return initializers.initialize(config, np.random.default_rng(1), SHAPE, FAN_IN, FAN_OUT)


@pytest.mark.parametrize("name,limit", [
    ("glorot_uniform", np.sqrt(6 / (FAN_IN + FAN_OUT))),
    ("he_uniform", np.sqrt(6 / FAN_IN)),
    ({"type": "uniform", "limit": 0.3}, 0.3),
])
def test_uniform_families_fill_their_range(name, limit):
    w = sample(name)
    assert np.abs(w).max() <= limit and np.abs(w).max() > 0.99 * limit
    assert w.std() == pytest.approx(limit / np.sqrt(3), rel=0.02)
    assert abs(w.mean()) < 4 * limit / np.sqrt(3) / np.sqrt(w.size)


@pytest.mark.parametrize("name,std", [
    ("glorot_normal", np.sqrt(2 / (FAN_IN + FAN_OUT))),
    ("he_normal", np.sqrt(2 / FAN_IN)),
    ("lecun_normal", np.sqrt(1 / FAN_IN)),
    ({"type": "normal", "stddev": 0.2}, 0.2),
])
def test_normal_families_have_their_deviation(name, std):
    w = sample(name)
    assert w.std() == pytest.approx(std, rel=0.02)
    assert abs(w.mean()) < 4 * std / np.sqrt(w.size)  # four standard errors of the mean
    if name != {"type": "normal", "stddev": 0.2}:  # truncated at two deviations of the unit normal
        assert np.abs(w).max() <= 2 * std / 0.87962566103423978 + 1e-12


def test_orthogonal_is_orthonormal_with_gain():
    w = initializers.initialize({"type": "orthogonal", "gain": 2.0}, RNG, (6, 10), 6, 10)
    np.testing.assert_allclose(w @ w.T, 4.0 * np.eye(6), atol=1e-10)
    tall = initializers.initialize("orthogonal", RNG, (10, 6), 10, 6)
    np.testing.assert_allclose(tall.T @ tall, np.eye(6), atol=1e-10)


def test_constants_and_seeding():
    assert (sample("zeros") == 0).all() and (sample("ones") == 1).all()
    assert np.array_equal(sample("glorot_uniform"), sample("glorot_uniform"))
