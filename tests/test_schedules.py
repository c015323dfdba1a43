"""Each schedule's learning rate per epoch equals a table computed by hand; a saved and restored
schedule continues with the same rates."""

from __future__ import annotations

import json

import pytest

from netbuild import metrics, schedules

#: Validation losses after epochs 1..17 for the reduce_on_plateau (mode min) case. With
#: min_delta 0.1 the best goes 1.0 (e1), 0.8 (e3), 0.5 (e7); more than 2 epochs without an
#: improvement end at e6, e10, e13 and e16, halving the rate for the next epoch, down to 0.2.
PLATEAU_MIN = [1.0, 0.95, 0.8, 0.75, 0.72, 0.71, 0.5, 0.45, 0.44, 0.43, 0.42, 0.41, 0.40, 0.39,
               0.38, 0.37, 0.36]
#: Validation accuracies after epochs 1..9 for the mode max case: e1 is warm-up (ignored); the
#: best goes 0.5 (e2), 0.6 (e3), 0.7 (e6); two epochs without improvement end at e5 and e8.
PLATEAU_MAX = [0.3, 0.5, 0.6, 0.6, 0.55, 0.7, 0.7, 0.69, 0.8]

# (config, base learning rate, monitored key and values or None, expected rate of epochs 1..n)
CASES = [
    ({"type": "constant"}, 0.1, None, [0.1] * 10),
    ({"type": "constant", "warmup_epochs": 3}, 0.1, None,
     [0.025, 0.05, 0.075, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]),
    ({"type": "step", "step_size": 3, "gamma": 0.5}, 0.1, None,
     [0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025, 0.025, 0.025, 0.0125]),
    ({"type": "step", "step_size": 4}, 1.0, None,
     [1.0, 1.0, 1.0, 1.0, 0.1, 0.1, 0.1, 0.1, 0.01, 0.01]),
    ({"type": "step", "step_size": 2, "gamma": 0.5, "warmup_epochs": 1}, 0.2, None,
     [0.1, 0.2, 0.2, 0.1, 0.1, 0.05, 0.05, 0.025, 0.025, 0.0125]),
    ({"type": "exponential", "gamma": 0.5}, 1.0, None,
     [1.0, 0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625, 0.0078125, 0.00390625, 0.001953125]),
    ({"type": "exponential", "gamma": 0.9, "warmup_epochs": 2}, 0.1, None,
     [0.0333333333, 0.0666666667, 0.1, 0.09, 0.081, 0.0729, 0.06561, 0.059049, 0.0531441,
      0.04782969]),
    ({"type": "cosine", "t_max": 4}, 1.0, None,
     [1.0, 0.8535533906, 0.5, 0.1464466094, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]),
    ({"type": "cosine", "t_max": 6, "eta_min": 0.01, "warmup_epochs": 2}, 0.1, None,
     [0.0333333333, 0.0666666667, 0.1, 0.0939711432, 0.0775, 0.055, 0.0325, 0.0160288568,
      0.01, 0.01]),
    ({"type": "reduce_on_plateau", "factor": 0.5, "patience": 2, "min_delta": 0.1,
      "min_lr": 0.2}, 1.0, ("val_loss", PLATEAU_MIN),
     [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.2, 0.2, 0.2, 0.2]),
    ({"type": "reduce_on_plateau", "monitor": "val_accuracy", "patience": 1, "warmup_epochs": 1},
     0.1, ("val_accuracy", PLATEAU_MAX),
     [0.05, 0.1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01, 0.001]),
]
IDS = [f"{c[0]['type']}-{i}" for i, c in enumerate(CASES)]


def run(schedule: schedules.Schedule, first: int, last: int, monitored=None) -> list[float]:
    """The training loop's calls for epochs ``first..last``; the rates it was given."""
    out = []
    for epoch in range(first, last + 1):
        out.append(schedule.learning_rate(epoch))
        record = {"epoch": epoch, "loss": 1.0}
        if monitored:
            record[monitored[0]] = monitored[1][epoch - 1]
        schedule.observe(epoch, record)
    return out


def test_every_schedule_is_covered():
    assert {c[0]["type"] for c in CASES} == set(schedules.REGISTRY)


@pytest.mark.parametrize("cfg,base_lr,monitored,expected", CASES, ids=IDS)
def test_rates_equal_the_hand_computed_table(cfg, base_lr, monitored, expected):
    rates = run(schedules.get(cfg, base_lr), 1, len(expected), monitored)
    assert rates == pytest.approx(expected, rel=1e-8, abs=1e-12)


@pytest.mark.parametrize("cfg,base_lr,monitored,expected", CASES, ids=IDS)
def test_restored_state_continues_with_the_same_rates(cfg, base_lr, monitored, expected):
    for split in (1, 5, len(expected) - 2):
        first = schedules.get(cfg, base_lr)
        before = run(first, 1, split, monitored)
        saved = json.loads(json.dumps(first.state(), allow_nan=False))
        resumed = schedules.get(cfg, base_lr)
        resumed.load_state(saved)
        after = run(resumed, split + 1, len(expected), monitored)
        assert before + after == pytest.approx(expected, rel=1e-8, abs=1e-12)


def test_plateau_mode_follows_the_metric():
    assert metrics.mode_of("val_loss") == "min"
    assert metrics.mode_of("val_mae") == "min"
    assert metrics.mode_of("val_accuracy") == "max"
    assert metrics.mode_of("f1") == "max"
    assert metrics.mode_of("val_r2") == "max"
    explicit = schedules.get({"type": "reduce_on_plateau", "monitor": "loss", "mode": "max",
                              "patience": 0}, 1.0)
    # mode max: a falling loss is no improvement, so every epoch after the first reduces
    assert run(explicit, 1, 4, ("loss", [3.0, 2.0, 1.0, 0.5])) == pytest.approx([1.0, 1.0, 0.1, 0.01])


def test_plateau_names_a_missing_monitored_key():
    schedule = schedules.get({"type": "reduce_on_plateau", "warmup_epochs": 2}, 0.1)
    with pytest.raises(ValueError, match=r"'val_loss'.*epoch, loss"):
        schedule.observe(1, {"epoch": 1, "loss": 0.5})


def test_unknown_schedule_suggests_the_closest():
    with pytest.raises(KeyError, match="unknown schedule 'cosin'.*did you mean 'cosine'"):
        schedules.get({"type": "cosin"}, 0.1)
