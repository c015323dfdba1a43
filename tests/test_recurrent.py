"""Recurrent layers against plain numpy loops written from PyTorch's equations.

All of a cell's configurations come from one compiled function; gradients are checked by finite
differences, one cell type at a time. float64 throughout. The layers run the fused op of
netbuild/ops/recurrent.py (here its numpy ``perform``: TEST_MODE is Python) where it has C code for
the activations, and ``scan`` otherwise (the "custom" case's softsign); tests/test_recurrent_ops.py
checks the op's C code and compares it with ``scan``.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytensor
import pytensor.tensor as pt
import pytest
from conftest import TEST_MODE, verify_grad

from netbuild.layers.base import Context, LayerError
from netbuild.layers.recurrent import GRU, LSTM, ForgetBias, Recurrent, SimpleRNN

BATCH, STEPS, FEATURES, UNITS = 2, 5, 4, 3
CELLS = {"simple_rnn": SimpleRNN, "lstm": LSTM, "gru": GRU}
GATES = {"simple_rnn": 1, "lstm": 4, "gru": 3}
MODES = ["forward", "go_backwards", "bidirectional"]


def config(kind: str, **overrides) -> dict:
    """A layer spec with the schema's defaults filled in."""
    cfg = {"type": kind, "units": UNITS, "return_sequences": False, "go_backwards": False,
           "bidirectional": False, "activation": "tanh", "kernel_initializer": "glorot_uniform",
           "recurrent_initializer": "orthogonal", "bias_initializer": "zeros"}
    if kind in ("lstm", "gru"):
        cfg["recurrent_activation"] = "sigmoid"
    if kind == "lstm":
        cfg["unit_forget_bias"] = True
    cfg.update(overrides)
    return cfg


def random_params(layer: Recurrent, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random values (biases included, non-zero) for every parameter the layer declares."""
    return {s.name: rng.normal(0.0, 0.5, size=s.shape)
            for s in layer.param_specs([(STEPS, FEATURES)])}


def build(kind: str, cfg: dict, values: dict[str, np.ndarray], x):
    """The layer, its shared parameters named ``<layer>/<param>``, and its symbolic output."""
    layer = CELLS[kind]("l", cfg)
    for name, value in values.items():
        layer.params[name] = pytensor.shared(value, name=f"l/{name}")
    return layer, layer.forward([x], Context(training=False))


# -- numpy references: one timestep each, torch equations ---------------------------------------
def sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


NP_ACT = {"tanh": np.tanh, "sigmoid": sigmoid, "softsign": lambda a: a / (1.0 + np.abs(a)),
          "hard_sigmoid": lambda a: np.clip(a / 6.0 + 0.5, 0.0, 1.0),
          "relu": lambda a: np.maximum(a, 0.0)}


def np_rnn(x, state, W_ih, W_hh, b_ih, b_hh, act, ract):
    (h,) = state
    return (act(x @ W_ih + b_ih + h @ W_hh + b_hh),)


def np_lstm(x, state, W_ih, W_hh, b_ih, b_hh, act, ract):
    h, c = state
    a = x @ W_ih + b_ih + h @ W_hh + b_hh
    i, f, g, o = np.split(a, 4, axis=-1)
    c = ract(f) * c + ract(i) * act(g)
    return ract(o) * act(c), c


def np_gru(x, state, W_ih, W_hh, b_ih, b_hh, act, ract):
    (h,) = state
    x_r, x_z, x_n = np.split(x @ W_ih + b_ih, 3, axis=-1)
    h_r, h_z, h_n = np.split(h @ W_hh + b_hh, 3, axis=-1)
    r = ract(x_r + h_r)
    z = ract(x_z + h_z)
    n = act(x_n + r * h_n)
    return ((1.0 - z) * n + z * h,)


NP_CELLS = {"simple_rnn": (np_rnn, 1), "lstm": (np_lstm, 2), "gru": (np_gru, 1)}


def reference(kind: str, cfg: dict, values: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    cell, n_states = NP_CELLS[kind]
    act = NP_ACT[cfg["activation"]]
    ract = NP_ACT[cfg.get("recurrent_activation", "sigmoid")]

    def run(seq, suffix):  # h at every step, in processing order: (batch, steps, units)
        params = [values[p + suffix] for p in ("W_ih", "W_hh", "b_ih", "b_hh")]
        state = tuple(np.zeros((seq.shape[0], cfg["units"])) for _ in range(n_states))
        hs = []
        for t in range(seq.shape[1]):
            state = cell(seq[:, t], state, *params, act, ract)
            hs.append(state[0])
        return np.stack(hs, axis=1)

    if cfg["go_backwards"]:
        x = x[:, ::-1]
    fwd = run(x, "")
    if not cfg["bidirectional"]:
        return fwd if cfg["return_sequences"] else fwd[:, -1]
    bwd = run(x[:, ::-1], "_reverse")
    if cfg["return_sequences"]:
        return np.concatenate([fwd, bwd[:, ::-1]], axis=-1)  # backward re-aligned to input time
    return np.concatenate([fwd[:, -1], bwd[:, -1]], axis=-1)


# -- every configuration of a cell, one compiled function per cell ------------------------------
CONFIGS = [(mode, rs) for mode in MODES for rs in (False, True)] + [("custom", True),
                                                                      ("custom_fused", True)]


def case_config(kind: str, mode: str, return_sequences: bool) -> dict:
    # non-default activations, to check they reach the right places: softsign has no C code
    # (scan), relu and hard_sigmoid have (the fused op)
    if mode == "custom":
        extra = {"recurrent_activation": "hard_sigmoid"} if kind != "simple_rnn" else {}
        return config(kind, return_sequences=True, activation="softsign", **extra)
    if mode == "custom_fused":
        extra = {"recurrent_activation": "hard_sigmoid"} if kind != "simple_rnn" else {}
        return config(kind, return_sequences=True, activation="relu", bidirectional=True, **extra)
    return config(kind, return_sequences=return_sequences, go_backwards=mode == "go_backwards",
                  bidirectional=mode == "bidirectional")


@pytest.mark.parametrize("kind", CELLS)
def test_matches_numpy_reference(kind):
    """(forward, go_backwards, bidirectional) x return_sequences, plus custom activations."""
    rng = np.random.default_rng(1234)
    x_val = rng.normal(size=(BATCH, STEPS, FEATURES))
    # one set of values: the one-way layers use the forward direction's subset
    values = random_params(CELLS[kind]("l", config(kind, bidirectional=True)), rng)
    with pytensor.config.change_flags(floatX="float64"):
        x = pt.tensor3("x", dtype="float64")
        built = {}
        for case in CONFIGS:
            cfg = case_config(kind, *case)
            layer = CELLS[kind]("l", cfg)
            own = {s.name: values[s.name] for s in layer.param_specs([(STEPS, FEATURES)])}
            built[case] = (cfg, own, *build(kind, cfg, own, x))
        fn = pytensor.function([x], [b[-1] for b in built.values()], mode=TEST_MODE)
        outs = dict(zip(built, fn(x_val)))

    failures = []
    for case, (cfg, own, layer, _) in built.items():
        expected = reference(kind, cfg, own, x_val)
        out = outs[case]
        if out.shape != expected.shape or out.shape[1:] != layer.output_shape([(STEPS, FEATURES)]):
            failures.append(f"{case}: shape {out.shape}, reference {expected.shape}, "
                            f"output_shape {layer.output_shape([(STEPS, FEATURES)])}")
        elif not np.allclose(out, expected, rtol=1e-5, atol=1e-5):
            failures.append(f"{case}: max error {np.max(np.abs(out - expected)):.3g}")
    assert not failures, "\n".join(failures)

    # guards against a reversal that silently does nothing, and a misplaced direction
    assert not np.allclose(outs[("forward", True)], outs[("go_backwards", True)])
    for rs in (False, True):
        np.testing.assert_allclose(outs[("bidirectional", rs)][..., :UNITS], outs[("forward", rs)])


# -- shapes and parameters ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", CELLS)
@pytest.mark.parametrize("return_sequences", [False, True])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_output_shape(kind, return_sequences, bidirectional):
    layer = CELLS[kind]("l", config(kind, units=7, return_sequences=return_sequences,
                                    bidirectional=bidirectional))
    units = 14 if bidirectional else 7
    assert layer.output_shape([(11, 5)]) == ((11, units) if return_sequences else (units,))


@pytest.mark.parametrize("kind", CELLS)
@pytest.mark.parametrize("shape", [(5,), (5, 4, 3), ()])
def test_rank_error(kind, shape):
    layer = CELLS[kind]("l", config(kind))
    with pytest.raises(LayerError, match=r"\(timesteps, features\).*received shape") as err:
        layer.output_shape([shape])
    assert err.value.key == "inputs"
    with pytest.raises(LayerError):
        layer.param_specs([shape])


@pytest.mark.parametrize("kind", CELLS)
def test_param_specs(kind):
    g = GATES[kind]
    layer = CELLS[kind]("l", config(kind, units=7, bidirectional=True))
    specs = {s.name: s for s in layer.param_specs([(11, 5)])}
    expected = {"W_ih": (5, g * 7), "W_hh": (7, g * 7), "b_ih": (g * 7,), "b_hh": (g * 7,)}
    expected.update({k + "_reverse": v for k, v in expected.items()})
    assert {n: s.shape for n, s in specs.items()} == expected
    assert list(specs)[:4] == ["W_ih", "W_hh", "b_ih", "b_hh"]  # torch's order
    assert specs["W_ih"].regularize and specs["W_hh"].regularize
    assert not specs["b_ih"].regularize and not specs["b_hh"].regularize
    assert specs["W_ih"].init == "glorot_uniform" and specs["W_hh"].init == "orthogonal"
    one_way = CELLS[kind]("l", config(kind, units=7)).param_specs([(11, 5)])
    assert [s.name for s in one_way] == ["W_ih", "W_hh", "b_ih", "b_hh"]


def test_lstm_unit_forget_bias():
    specs = {s.name: s for s in LSTM("l", config("lstm", units=3)).param_specs([(5, 2)])}
    init = specs["b_ih"].init
    assert isinstance(init, ForgetBias)
    values = init(np.random.default_rng(0), (12,), 2, 12)
    np.testing.assert_array_equal(values, [0] * 3 + [1] * 3 + [0] * 6)
    assert specs["b_hh"].init == "zeros"
    off = LSTM("l", config("lstm", units=3, unit_forget_bias=False)).param_specs([(5, 2)])
    assert {s.name: s.init for s in off}["b_ih"] == "zeros"


def test_step_has_one_matrix_product_per_direction(monkeypatch):
    """The input projection is hoisted: the scan's inner graph multiplies only ``h @ W_hh``
    (the fused op's graph: tests/test_recurrent_ops.py)."""
    from pytensor.graph.traversal import ancestors
    from pytensor.scan.op import Scan
    from pytensor.tensor.math import Dot

    monkeypatch.setattr(Recurrent, "implementation", "scan")

    with pytensor.config.change_flags(floatX="float64"):
        x = pt.tensor3("x", dtype="float64")
        for kind, bidirectional in itertools.product(CELLS, (False, True)):
            cfg = config(kind, bidirectional=bidirectional)
            layer = CELLS[kind]("l", cfg)
            _, out = build(kind, cfg, random_params(layer, np.random.default_rng(0)), x)
            scans = [v.owner for v in ancestors([out])
                     if v.owner is not None and isinstance(v.owner.op, Scan)]
            assert len({id(n) for n in scans}) == 1
            inner = scans[0].op.fgraph
            dots = [n for n in inner.apply_nodes if isinstance(n.op, Dot)]
            assert len(dots) == (2 if bidirectional else 1)


# -- gradients ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,bidirectional,implementation", [
    ("simple_rnn", True, "auto"), ("lstm", False, "auto"), ("gru", False, "auto"),
    ("simple_rnn", True, "scan")])
def test_gradient(kind, bidirectional, implementation):
    """Finite differences with respect to the input and every parameter, through the fused op
    and through scan. The directions share their loop code, so one cell (the cheapest) checks
    the bidirectional wiring."""
    rng = np.random.default_rng(7)
    cfg = config(kind, units=2, return_sequences=True, bidirectional=bidirectional,
                 go_backwards=True)
    layer = CELLS[kind]("l", cfg)
    layer.implementation = implementation
    values = random_params(layer, rng)
    names = list(values)
    x = rng.normal(size=(2, 3, FEATURES))

    def fun(x, *params):
        layer.params = dict(zip(names, params))
        return layer.forward([x], Context(training=False))

    with pytensor.config.change_flags(floatX="float64"):
        verify_grad(fun, [x] + [values[n] for n in names], n_tests=1,
                                      rng=np.random.default_rng(0), mode=TEST_MODE)
