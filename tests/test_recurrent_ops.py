"""The fused recurrent ops (netbuild/ops/recurrent.py): their C code against their numpy
``perform``, both against the ``scan`` implementation of the layers, numerical gradients, and a
compiled training step with no scan and no Python-only node.

Graphs run in the tests' Python mode except the fused ops, which run their C code (see
:func:`function`): g++ compiles only their modules, once per (cell, forward or gradient, float
type), since the activations are run-time parameters of the C code.
"""

from __future__ import annotations

import contextlib
import itertools

import numpy as np
import pytensor
import pytensor.tensor as pt
import pytest
from conftest import TEST_MODE, verify_grad
from pytensor.graph.traversal import ancestors
from pytensor.scan.op import Scan
from test_compile import python_nodes
from test_conv_ops import function as all_in_c

from netbuild.compile import compile_train
from netbuild.layers.base import Context
from netbuild.layers.recurrent import GRU, LSTM, SimpleRNN
from netbuild.network import Network
from netbuild.ops.projection import project as project_rows
from netbuild.ops.recurrent import (ACTIVATIONS, CELLS, RecurrentSequence, RecurrentSequenceGrad,
                                    _RecurrentCOp, sequence)
from netbuild.spec import load_text, validate

LAYERS = {"simple_rnn": SimpleRNN, "lstm": LSTM, "gru": GRU}
#: (activation, recurrent_activation) pairs: the defaults, the piecewise-linear ones, the rest
ACTIVATION_PAIRS = [("tanh", "sigmoid"), ("relu", "hard_sigmoid"), ("hard_sigmoid", "relu"),
                    ("sigmoid", "linear"), ("linear", "tanh")]


@contextlib.contextmanager
def fused_ops_in_c():
    """Functions compiled meanwhile run the fused ops' C code, even in the tests' Python mode."""
    make_thunk = _RecurrentCOp.make_thunk

    def c_thunk(self, node, storage_map, compute_map, no_recycling, impl=None):
        return make_thunk(self, node, storage_map, compute_map, no_recycling, impl="c")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_RecurrentCOp, "make_thunk", c_thunk)
        yield


def function(inputs, outputs, c: bool):
    """``pytensor.function`` in the tests' Python mode; with ``c``, the fused ops run their C
    code (checked) while PyTensor's own ops stay in Python."""
    if not c:
        return pytensor.function(inputs, outputs, mode=TEST_MODE, on_unused_input="ignore")
    with fused_ops_in_c():
        fn = pytensor.function(inputs, outputs, mode=TEST_MODE, on_unused_input="ignore")
    ops = [(n, t) for n, t in zip(fn.vm.nodes, fn.vm.thunks) if isinstance(n.op, _RecurrentCOp)]
    assert ops and all(getattr(t, "cthunk", None) is not None for _, t in ops)
    return fn


def op_inputs(cell: str, T: int, B: int, U: int, rng, dtype="float64") -> list[np.ndarray]:
    """Random ``P, b, W, h0`` and ``c0`` or ``b_hn``."""
    G = CELLS[cell][0] * U
    values = [rng.normal(size=(T, B, G)), rng.normal(size=G), rng.normal(size=(U, G)) * 0.6,
              rng.normal(size=(B, U))]
    extra = CELLS[cell][1]
    if extra == "c0":
        values.append(rng.normal(size=(B, U)))
    elif extra == "b_hn":
        values.append(rng.normal(size=U))
    return [v.astype(dtype) for v in values]


def symbols(values) -> list:
    return [pt.tensor(dtype=v.dtype, shape=(None,) * v.ndim) for v in values]


def step_mask(T: int, B: int, rng, dtype="float64") -> np.ndarray:
    """A mask ``(T, B)``: right padding (lengths 0 to T), and a row with holes."""
    lengths = rng.integers(0, T + 1, B)
    mask = (np.arange(T)[:, None] < lengths[None, :]).astype(dtype)
    if B > 1 and T > 2:
        mask[:, -1] = rng.integers(0, 2, T)
    return mask


def forward_and_backward(cell, act, ract, values, cotangents, c: bool, with_dC=False,
                         masked=False):
    """The forward op's outputs, then the gradient op's, for these values and cotangents (the
    last value is the mask when ``masked``)."""
    fwd = RecurrentSequence(cell, act, ract, masked)
    grad = RecurrentSequenceGrad(cell, act, ract, with_dC, masked)
    ins = symbols(values)
    outs = fwd(*ins, return_list=True)
    by = dict(zip(fwd.input_names(), ins)) | dict(zip(fwd.output_names(), outs))
    cots = symbols(cotangents)
    by |= dict(zip(["dH", "dC"], cots))
    grads = grad(*[by[n] for n in grad.input_names()], return_list=True)
    return function(ins + cots, outs + grads, c)(*values, *cotangents)


# -- C against numpy ------------------------------------------------------------------------------
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("masked", [False, True], ids=["", "masked"])
def test_c_matches_numpy(cell, dtype, masked):
    """Every activation pair and odd shapes (one step, one example, no step at all, dC on and
    off; batches and unit counts that fill no whole tile or panel of the packed products, and
    more than one block of rows, 256, for the weight gradient), with and without a mask: the C
    kernels give the numpy perform's numbers."""
    rng = np.random.default_rng(3)
    tol = {"float64": 1e-12, "float32": 2e-5}[dtype]
    cases = list(itertools.product(ACTIVATION_PAIRS[:3], [(4, 3, 5), (1, 2, 3), (3, 1, 2)]))
    cases += [(ACTIVATION_PAIRS[3], (5, 2, 4)), (ACTIVATION_PAIRS[4], (5, 2, 4)),
              (ACTIVATION_PAIRS[0], (0, 2, 3)), (ACTIVATION_PAIRS[0], (30, 11, 37)),
              (ACTIVATION_PAIRS[1], (3, 17, 70))]
    for (act, ract), (T, B, U) in cases:
        values = op_inputs(cell, T, B, U, rng, dtype)
        if T > 5:  # a contracting W: over many steps rounding grows where h W expands
            values[2] = (values[2] / np.sqrt(U)).astype(dtype)
        if masked:
            values.append(step_mask(T, B, rng, dtype))
        n_cot = 2 if cell == "lstm" else 1
        cotangents = [rng.normal(size=(T, B, U)).astype(dtype) for _ in range(n_cot)]
        with_dC = cell == "lstm" and T % 2 == 0
        if cell == "lstm" and not with_dC:
            cotangents = cotangents[:1]
        got = forward_and_backward(cell, act, ract, values, cotangents, True, with_dC, masked)
        want = forward_and_backward(cell, act, ract, values, cotangents, False, with_dC, masked)
        for i, (g, w) in enumerate(zip(got, want)):
            assert g.shape == w.shape and g.dtype == w.dtype, (act, ract, T, B, U, i)
            scale = max(1.0, float(np.max(np.abs(w)))) if w.size else 1.0
            np.testing.assert_allclose(g, w, rtol=0, atol=tol * scale,
                                       err_msg=f"{cell} {act}/{ract} T,B,U={T, B, U} output {i}")


def test_c_activations_match_numpy_over_a_wide_range():
    """float32 exp, tanh and sigmoid of the C code (fast, vectorized) against float64 numpy,
    saturation and NaN included: a simple_rnn with W = 0 and one unit per value gives act(P + b)."""
    x = np.concatenate([np.linspace(-100, 100, 2001), [0.0, -0.0, 1e-8, -1e-8, 0.6249, 0.6251,
                                                       88.0, -87.5, 1e30, -1e30, np.nan]])
    reference = {"tanh": np.tanh, "sigmoid": lambda v: 1 / (1 + np.exp(-v)),
                 "relu": lambda v: np.where(v < 0, 0.0, v),
                 "hard_sigmoid": lambda v: np.clip(v / 6 + 0.5, 0, 1), "linear": lambda v: v}
    n = x.size
    P = x.astype("float32").reshape(1, 1, n)
    values = [P, np.zeros(n, "float32"), np.zeros((n, n), "float32"), np.zeros((1, n), "float32")]
    ins = symbols(values)
    outs = {}
    for name in ACTIVATIONS:
        H = RecurrentSequence("simple_rnn", name)(*ins)[0]
        outs[name] = H
    fn = function(ins, list(outs.values()), c=True)
    with np.errstate(over="ignore", invalid="ignore"):
        for name, got in zip(outs, fn(*values)):
            want = reference[name](x.astype("float32").astype("float64"))
            np.testing.assert_allclose(got.ravel(), want, rtol=3e-7, atol=1e-37, err_msg=name)


# -- against scan ---------------------------------------------------------------------------------
def layer_graph(kind: str, cfg: dict, values: dict, x, implementation: str, mask=None):
    layer = LAYERS[kind]("l", cfg)
    layer.implementation = implementation
    params = {n: pt.tensor(dtype="float64", shape=v.shape, name=n) for n, v in values.items()}
    layer.params = params
    out = layer.forward([x], Context(training=False, masks={} if mask is None else {x: mask}))
    assert any(isinstance(v.owner.op, Scan) for v in ancestors([out]) if v.owner) \
        == (implementation == "scan")
    cost = (out + out ** 2).sum()  # a cotangent that differs from element to element
    grads = pytensor.grad(cost, [x, *params.values()])
    return list(params.values()), [out, *grads]


SCAN_CASES = [
    # kind, timesteps, batch, overrides
    ("simple_rnn", 4, 3, {"activation": "relu", "bidirectional": True, "return_sequences": True}),
    ("simple_rnn", 1, 1, {}),
    ("lstm", 5, 2, {"go_backwards": True}),
    ("lstm", 3, 1, {"bidirectional": True, "activation": "hard_sigmoid",
                    "recurrent_activation": "relu", "return_sequences": True}),
    ("lstm", 1, 2, {"activation": "linear", "recurrent_activation": "tanh"}),
    ("gru", 4, 2, {"bidirectional": True, "go_backwards": True, "return_sequences": True}),
    ("gru", 1, 1, {"activation": "relu", "recurrent_activation": "hard_sigmoid"}),
    ("gru", 3, 2, {"activation": "sigmoid", "recurrent_activation": "linear"}),
]


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("masked", [False, True], ids=["", "masked"])
def test_fused_layer_matches_scan(kind, masked):
    """The layer's output and the gradients of a cost with respect to its input and every
    parameter: fused op (compiled to C) against scan (PyTensor's own gradient of the step),
    with and without a mask (right padding and holes; the scan's select keeps a padded step's
    states)."""
    rng = np.random.default_rng(11)
    features, units = 3, 4
    for case_kind, T, B, overrides in SCAN_CASES:
        if case_kind != kind:
            continue
        cfg = {"type": kind, "units": units, "return_sequences": False, "go_backwards": False,
               "bidirectional": False, "activation": "tanh", "recurrent_activation": "sigmoid",
               "kernel_initializer": "glorot_uniform", "recurrent_initializer": "orthogonal",
               "bias_initializer": "zeros", **overrides}
        specs = LAYERS[kind]("l", cfg).param_specs([(T, features)])
        values = {s.name: rng.normal(0, 0.6, size=s.shape) for s in specs}
        x_val = rng.normal(size=(B, T, features))
        x = pt.tensor3("x", dtype="float64")
        m = pt.matrix("m", dtype="float64")
        m_val = step_mask(T, B, rng).T  # (batch, timesteps), as a layer's mask
        results = {}
        for implementation in ("auto", "scan"):
            params, outs = layer_graph(kind, cfg, values, x, implementation,
                                       m if masked else None)
            fn = function([x, m, *params], outs, c=implementation == "auto")
            results[implementation] = fn(x_val, m_val, *values.values())
        names = ["output", "d x"] + [f"d {n}" for n in values]
        for name, fused, scanned in zip(names, results["auto"], results["scan"]):
            np.testing.assert_allclose(fused, scanned, rtol=1e-10, atol=1e-12,
                                       err_msg=f"{kind} T={T} B={B} {overrides}: {name}")


def test_derivatives_at_the_kinks_match_scan():
    """relu at 0 and hard_sigmoid at -3 and 3 (derivative 1 and 1/6, as PyTensor's maximum and
    clip): a zero input and biases of 0 and +-3 put the first step's pre-activations exactly
    there."""
    rng = np.random.default_rng(2)
    x_val = np.zeros((2, 3, 2))
    x = pt.tensor3("x", dtype="float64")
    for kind in ("simple_rnn", "lstm"):
        cfg = {"type": kind, "units": 3, "activation": "relu",
               "recurrent_activation": "hard_sigmoid", "return_sequences": True}
        specs = LAYERS[kind]("l", cfg).param_specs([(3, 2)])
        values = {s.name: rng.normal(0, 0.6, size=s.shape) for s in specs}
        G = values["b_ih"].size
        values["b_ih"] = np.resize([0.0, 3.0, -3.0], G)
        values["b_hh"] = np.zeros(G)
        results = {}
        for implementation in ("auto", "scan"):
            params, outs = layer_graph(kind, cfg, values, x, implementation)
            results[implementation] = function([x, *params], outs, c=implementation == "auto")(
                x_val, *values.values())
        for fused, scanned in zip(results["auto"], results["scan"]):
            np.testing.assert_allclose(fused, scanned, rtol=1e-10, atol=1e-12, err_msg=kind)


# -- numerical gradients --------------------------------------------------------------------------
@pytest.mark.parametrize("cell,act,ract", [("simple_rnn", "tanh", "sigmoid"),
                                           ("lstm", "tanh", "sigmoid"),
                                           ("lstm", "relu", "hard_sigmoid"),
                                           ("gru", "tanh", "sigmoid"),
                                           ("gru", "hard_sigmoid", "relu")])
def test_verify_grad_on_the_op(cell, act, ract):
    """Finite differences with respect to every input of the forward op, run in C; the LSTM's
    cost reads both H and C."""
    rng = np.random.default_rng(5)
    values = op_inputs(cell, 3, 2, 3, rng)
    op = RecurrentSequence(cell, act, ract)

    def fun(*inputs):
        outs = op(*inputs, return_list=True)
        return outs[0] + outs[1] if cell == "lstm" else outs[0]

    with fused_ops_in_c():
        verify_grad(fun, values, n_tests=1)

    # masked: step 1 of row 0 and step 2 of row 1 are padding (held states)
    mask = pt.constant(np.array([[1.0, 1.0], [0.0, 1.0], [1.0, 0.0]]))
    masked = RecurrentSequence(cell, act, ract, masked=True)

    def fun_masked(*inputs):
        outs = masked(*inputs, mask, return_list=True)
        return outs[0] + outs[1] if cell == "lstm" else outs[0]

    with fused_ops_in_c():
        verify_grad(fun_masked, values, n_tests=1)

    # projecting its inputs itself: X (3, 2, 2) W_ih (2, G) in place of P
    X, W_ih = rng.normal(size=(3, 2, 2)), rng.normal(size=(2, values[0].shape[2]))
    projecting = RecurrentSequence(cell, act, ract, project=True)

    def fun_projecting(*inputs):
        outs = projecting(*inputs, return_list=True)
        return outs[0] + outs[1] if cell == "lstm" else outs[0]

    with fused_ops_in_c():
        verify_grad(fun_projecting, [X, W_ih, *values[1:]], n_tests=1)


def _projected(cell: str, dtype: str, masked: bool, project: bool, reads_c: bool = True):
    """The op's outputs and the gradients of all its inputs but the mask, with ``P`` computed by
    the Projection op (``project`` false) or by the op itself from ``X`` and ``W_ih``; the LSTM's
    cost reads its cell states too with ``reads_c`` (the gradient op's ``with_dC``)."""
    names = ["X", "W_ih", "b", "W", "h0"] + [e for e in [CELLS[cell][1]] if e]
    ndims = {"X": 3, "W_ih": 2, "b": 1, "W": 2, "h0": 2, "c0": 2, "b_hn": 1}
    ins = [pt.tensor(n, dtype=dtype, shape=(None,) * ndims[n]) for n in names]
    X, W_ih, *rest = ins
    mask = pt.tensor("mask", dtype=dtype, shape=(None, None)) if masked else None
    if project:
        outs = sequence(cell, X, *rest[:3], *(rest[3:] or [None]), mask=mask, W_ih=W_ih)
    else:
        T, B = X.shape[0], X.shape[1]
        P = project_rows(X.reshape((T * B, X.shape[2])), W_ih).reshape((T, B, W_ih.shape[1]))
        outs = sequence(cell, P, *rest[:3], *(rest[3:] or [None]), mask=mask)
    weights = pt.tensor("weights", dtype=dtype, shape=(None, None, None))
    loss = (outs[0] * weights).sum() + ((outs[1] ** 2).sum() if cell == "lstm" and reads_c else 0)
    return ins + [mask] * masked + [weights], [*outs, *pytensor.grad(loss, ins)]


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("masked", [False, True], ids=["", "masked"])
def test_projecting_op_gives_the_bits_of_the_projection_op_then_the_op(cell, masked):
    """With ``W_ih`` the op projects each step's rows itself, with the product the Projection op
    computes whole sequences with (one fixed order of terms per value): its outputs and every
    gradient but ``W_ih``'s have the bits of Projection then the op on ``P``, in C, float64 and
    float32, at shapes that fill no whole tile or panel and more rows than one block (256) of the
    weight gradients, with no step and with no feature; the LSTM with and without a gradient
    reaching its cell states. ``W_ih``'s gradient, which the gradient op computes beside
    ``W_hh``'s (its rows in that order: steps 1..T-1, then step 0), agrees to rounding. The numpy
    perform agrees with the C code."""
    rng = np.random.default_rng(7)
    shapes = [(4, 3, 5, 2), (30, 11, 37, 7), (2, 1, 3, 1), (0, 2, 3, 2), (3, 2, 3, 0)]
    reads = (True, False) if cell == "lstm" else (True,)
    for dtype, (T, B, U, F), reads_c in itertools.product(("float64", "float32"), shapes, reads):
        G = CELLS[cell][0] * U
        values = [rng.normal(size=(T, B, F)), rng.normal(size=(F, G)) / np.sqrt(max(F, 1)),
                  *op_inputs(cell, T, B, U, rng)[1:]]
        values[3] = values[3] / np.sqrt(U)  # W: contracting, as in test_c_matches_numpy
        values += [step_mask(T, B, rng)] * masked + [rng.normal(size=(T, B, U))]
        values = [v.astype(dtype) for v in values]
        separate = all_in_c(*_projected(cell, dtype, masked, False, reads_c), c=True)(*values)
        ins, outs = _projected(cell, dtype, masked, True, reads_c)
        fused = all_in_c(ins, outs, c=True)(*values)
        tol = {"float64": 1e-12, "float32": 2e-5}[dtype]
        dW_ih = len(outs) - (len(ins) - masked - 1) + 1  # outputs, then dX, dW_ih, ...
        for i, (a, b) in enumerate(zip(separate, fused)):
            if i == dW_ih:
                scale = max(1.0, float(np.abs(a).max())) if a.size else 1.0
                np.testing.assert_allclose(b, a, rtol=0, atol=tol * scale,
                                           err_msg=f"{dtype} {T, B, U, F} dW_ih")
            else:
                np.testing.assert_array_equal(a, b, err_msg=f"{dtype} {T, B, U, F} output {i}")
        for i, (c, py) in enumerate(zip(fused, function(ins, outs, c=False)(*values))):
            scale = max(1.0, float(np.max(np.abs(py)))) if py.size else 1.0
            np.testing.assert_allclose(c, py, rtol=0, atol=tol * scale,
                                       err_msg=f"{dtype} {T, B, U, F} output {i}")


# -- the compiled training step -------------------------------------------------------------------
def c_only_training_step(layers: str, input_shape: str, x: np.ndarray) -> list:
    """The ops of the compiled training step (netbuild's own compile mode) of ``layers`` and a
    2-way softmax: no Scan and no node without C code, and one step on ``x`` is finite."""
    spec = validate(load_text(f"""\
name: t
data: {{train: none.npz}}
model:
  input_shape: {input_shape}
  layers:
{layers}    - {{type: dense, units: 2, activation: softmax}}
train: {{loss: categorical_crossentropy, optimizer: {{type: adam}}}}
""", "t.yaml"))
    y = np.eye(2, dtype=pytensor.config.floatX)[[0, 1, 1]]
    step = compile_train(Network.from_spec(spec), spec.data["train"], [y], 0).step
    ops = [n.op for n in step.fn.maker.fgraph.apply_nodes]
    assert not [op for op in ops if isinstance(op, Scan)]
    assert python_nodes(step, "train") == []
    assert np.isfinite(step(x, y).loss)
    return ops


def test_training_step_is_c_only_without_scan():
    """Every cell, both directions and go_backwards in one network."""
    ops = c_only_training_step("""\
    - {type: simple_rnn, units: 4, bidirectional: true, return_sequences: true}
    - {type: gru, units: 3, go_backwards: true, return_sequences: true}
    - {type: lstm, units: 2}
""", "[5, 3]", np.random.default_rng(0).normal(size=(3, 5, 3)).astype(pytensor.config.floatX))
    assert {op.cell for op in ops if isinstance(op, RecurrentSequence)} == set(CELLS)
    assert {op.cell for op in ops if isinstance(op, RecurrentSequenceGrad)} == set(CELLS)


def test_masked_training_step_is_c_only_without_scan():
    """Masks from ``embedding mask_zero`` run the fused ops with their mask input."""
    ops = c_only_training_step("""\
    - {type: embedding, input_dim: 5, output_dim: 3, mask_zero: true}
    - {type: lstm, units: 4, bidirectional: true, return_sequences: true}
    - {type: simple_rnn, units: 3, return_sequences: true, go_backwards: true}
    - {type: gru, units: 2}
""", "[6]", np.array([[1, 2, 3, 0, 0, 0], [4, 4, 0, 0, 0, 0], [1, 2, 3, 4, 1, 2]]))
    fused = [op for op in ops if isinstance(op, (RecurrentSequence, RecurrentSequenceGrad))]
    assert {op.cell for op in fused if op.masked} == set(CELLS)


# -- the layer's choice, the op's contract ---------------------------------------------------------
@pytest.mark.parametrize("overrides,fused", [
    ({}, True),
    ({"activation": "relu", "recurrent_activation": "hard_sigmoid"}, True),
    ({"activation": {"type": "tanh"}}, True),
    ({"activation": "softsign"}, False),
    ({"recurrent_activation": "swish"}, False),
    ({"activation": {"type": "leaky_relu", "alpha": 0.1}}, False),
])
def test_layer_uses_the_op_when_it_has_c_code(overrides, fused):
    cfg = {"type": "lstm", "units": 2, "activation": "tanh", "recurrent_activation": "sigmoid",
           **overrides}
    layer = LSTM("l", cfg)
    assert (layer.fused_activations() is not None) == fused
    layer.implementation = "scan"
    assert layer.fused_activations() is None
    # simple_rnn has no recurrent activation: whatever the config says, it is not consulted
    rnn = SimpleRNN("r", {"type": "simple_rnn", "units": 2, "activation": "tanh",
                          "recurrent_activation": "softsign"})
    assert rnn.fused_activations() == ("tanh", "sigmoid")


def test_fused_graph_is_one_projecting_op_per_direction():
    """The op projects each step's inputs itself: no Projection, no product, no scan; its
    gradient op gives W_ih's gradient (no ProjectionWeightGrad), and one Projection per
    direction gives the input's."""
    from pytensor.tensor.math import Dot

    from netbuild.ops.projection import Projection, ProjectionWeightGrad
    from netbuild.spec.validate import fill_defaults, schema

    x = pt.tensor3("x")
    for kind, bidirectional in itertools.product(LAYERS, (False, True)):
        cfg = fill_defaults({"type": kind, "units": 3, "bidirectional": bidirectional},
                            schema()["$defs"]["layer"])  # the schema's defaults, as a spec has them
        layer = LAYERS[kind]("l", cfg)
        for s in layer.param_specs([(4, 2)]):
            layer.params[s.name] = pt.tensor(shape=s.shape, name=s.name)
        out = layer.forward([x], Context(training=False))
        nodes = {v.owner for v in ancestors([out]) if v.owner}
        n_dir = 2 if bidirectional else 1
        ops = [n.op for n in nodes if isinstance(n.op, RecurrentSequence)]
        assert len(ops) == n_dir and all(op.project for op in ops)
        assert not [n for n in nodes if isinstance(n.op, (Projection, Dot, Scan))]
        grads = pytensor.grad(out.sum(), [x, *layer.params.values()])
        backward = [n.op for n in {v.owner for v in ancestors(grads) if v.owner}]
        grad_ops = [op for op in backward if isinstance(op, RecurrentSequenceGrad)]
        assert len(grad_ops) == n_dir and all(op.project for op in grad_ops)
        assert len([op for op in backward if isinstance(op, Projection)]) == n_dir
        assert not [op for op in backward if isinstance(op, (ProjectionWeightGrad, Dot, Scan))]


def test_op_rejects_bad_arguments():
    with pytest.raises(ValueError, match="no C code for activation 'softsign'"):
        RecurrentSequence("lstm", "softsign")
    with pytest.raises(ValueError, match="unknown cell"):
        RecurrentSequence("rnn")
    P, b, W, h0 = pt.tensor3(), pt.vector(), pt.matrix(), pt.matrix()
    with pytest.raises(TypeError, match="takes 5 inputs"):
        RecurrentSequence("lstm")(P, b, W, h0)
    with pytest.raises(TypeError, match="W must have 2 axes"):
        RecurrentSequence("simple_rnn")(P, b, pt.tensor3(), h0)
    with pytest.raises(TypeError, match="takes 6 inputs"):  # X, W_ih in place of P
        RecurrentSequence("lstm", project=True)(P, b, W, h0, h0)
    with pytest.raises(TypeError, match="W_ih must have 2 axes"):
        RecurrentSequence("simple_rnn", project=True)(P, pt.tensor3(), b, W, h0)


@pytest.mark.parametrize("c", [True, False], ids=["c", "numpy"])
def test_shape_mismatch_is_an_error(c):
    """W with 3 gate blocks for an LSTM (4 expected) fails at run time, in C and in numpy."""
    rng = np.random.default_rng(0)
    values = op_inputs("lstm", 2, 2, 3, rng)
    values[2] = values[2][:, :9]
    ins = symbols(values)
    fn = function(ins, sequence("lstm", *ins)[0], c)
    with pytest.raises(ValueError, match=r"RecurrentSequence: W has shape \(3, 9,?\); "
                                         r"expected \(U, G\) = \(3, 12,?\)"):
        fn(*values)
    # projecting: W_ih with 4 rows for inputs of 5 features
    values = [rng.normal(size=(2, 2, 5)), rng.normal(size=(4, 12))] + op_inputs("lstm", 2, 2, 3,
                                                                               rng)[1:]
    ins = symbols(values)
    fn = function(ins, sequence("lstm", ins[0], *ins[2:], W_ih=ins[1])[0], c)
    with pytest.raises(ValueError, match=r"RecurrentSequence: W_ih has shape \(4, 12,?\); "
                                         r"expected \(F, G\) = \(5, 12,?\)"):
        fn(*values)


def test_infer_shape():
    """Output shapes come from the inputs' shapes, without running the ops."""
    from pytensor.graph.fg import FunctionGraph
    from pytensor.tensor.rewriting.shape import ShapeFeature

    rng = np.random.default_rng(0)
    for cell, project in itertools.product(CELLS, (False, True)):
        values = op_inputs(cell, 3, 2, 4, rng)
        if project:  # X (3, 2, 5) and W_ih (5, G) in place of P
            values = [rng.normal(size=(3, 2, 5)), rng.normal(size=(5, values[0].shape[2]))] + \
                values[1:]
        ins = symbols(values)
        op = RecurrentSequence(cell, project=project)
        outs = op(*ins, return_list=True)
        grads = op.pullback(ins, outs, [pt.ones_like(outs[0])] +
                            [pytensor.gradient.disconnected_type() for _ in outs[1:]])
        every = outs + list(grads)
        fgraph = FunctionGraph(ins, every, clone=False, features=[ShapeFeature()])
        shapes = [pt.stack(fgraph.shape_feature.shape_of[v]) for v in every]
        assert not [v for v in ancestors(shapes) if v.owner and
                    isinstance(v.owner.op, (RecurrentSequence, RecurrentSequenceGrad))]
        computed = function(ins, shapes, c=False)(*values)
        real = function(ins, every, c=False)(*values)
        assert [tuple(s) for s in computed] == [r.shape for r in real]
