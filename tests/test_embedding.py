"""embedding: lookup against numpy indexing, shapes, the gradient with respect to W."""


import numpy as np
import pytensor
import pytensor.tensor as pt
import pytest
from conftest import TEST_MODE, assert_same, jax_function, needs_jax, verify_grad

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


# -- the C ops (netbuild/ops/embedding.py) ---------------------------------------------------------
def c_function(inputs, outputs):
    """Compiled in netbuild's own mode: the embedding ops run their C code."""
    from netbuild.backend import mode

    return pytensor.function(inputs, outputs, mode=mode())


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_c_gather_and_its_gradient_against_numpy(dtype):
    """Repeated ids add up in order (np.add.at's sums), in C and in numpy; a wide table runs on
    several threads and gives the same bits as one."""
    from netbuild import threads
    from netbuild.ops.embedding import Gather, GatherGrad

    rng = np.random.default_rng(4)
    for N, D, n in [(7, 3, 12), (50, 700, 400), (3, 1, 0)]:
        W_val = rng.normal(size=(N, D)).astype(dtype)
        ids_val = rng.integers(0, N, n)
        dy_val = rng.normal(size=(n, D)).astype(dtype)
        W, ids, dy = pt.matrix(dtype=dtype), pt.vector(dtype="int64"), pt.matrix(dtype=dtype)
        outs = [Gather()(W, ids), GatherGrad()(W, ids, dy)]
        fn = c_function([W, ids, dy], outs)
        ops = [t for node, t in zip(fn.vm.nodes, fn.vm.thunks)
               if isinstance(node.op, (Gather, GatherGrad))]
        assert len(ops) == 2 and all(getattr(t, "cthunk", None) is not None for t in ops)
        want_dW = np.zeros_like(W_val)
        np.add.at(want_dW, ids_val, dy_val)
        runs = []
        before = threads.current()
        try:
            for count in (1, 2):
                threads.apply(count)
                runs.append(fn(W_val, ids_val, dy_val))
        finally:
            threads.apply(before)
        for y, dW in runs:
            np.testing.assert_array_equal(y, W_val[ids_val])
            np.testing.assert_allclose(dW, want_dW, rtol=1e-6 if dtype == "float32" else 1e-13,
                                       atol=1e-6 if dtype == "float32" else 1e-13)
        np.testing.assert_array_equal(runs[0][1], runs[1][1])
        py = pytensor.function([W, ids, dy], outs, mode=TEST_MODE)(W_val, ids_val, dy_val)
        np.testing.assert_array_equal(py[0], runs[0][0])
        np.testing.assert_allclose(py[1], runs[0][1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("compiled", [True, False], ids=["c", "numpy"])
def test_an_id_outside_the_table_is_an_index_error(compiled):
    """Negative ids do not wrap around: -1 is outside the table, as 7 is."""
    from netbuild.ops.embedding import gather

    W, ids = pt.matrix(), pt.vector(dtype="int64")
    fn = (c_function if compiled else lambda i, o: pytensor.function(i, o, mode=TEST_MODE))(
        [W, ids], pytensor.grad(gather(W, ids).sum(), W))
    W_val = np.zeros((7, 2), dtype=W.dtype)
    for bad, where in [(7, 1), (-1, 2)]:
        with pytest.raises(IndexError, match=rf"id {bad} at position {where} is outside \[0, 7\)"):
            fn(W_val, np.array([0, 3, 1, 2])[:where].tolist() + [bad])


# -- the jax backend (the ops' ``jax``) against their C code ---------------------------------------
def gather_ops(dtype):
    from netbuild.ops.embedding import Gather, GatherGrad

    W, ids, dy = pt.matrix(dtype=dtype), pt.vector(dtype="int64"), pt.matrix(dtype=dtype)
    return [W, ids, dy], [Gather()(W, ids), GatherGrad()(W, ids, dy)]


def gather_values(N, D, ids, dtype, seed=5):
    rng = np.random.default_rng(seed)
    ids = np.asarray(ids, dtype=np.int64)
    return [rng.normal(size=(N, D)).astype(dtype), ids,
            rng.normal(size=(len(ids), D)).astype(dtype)]


# (N, D, ids): repeated ids (they add up), one column, no ids, every row
GATHER_CASES = [(7, 3, [0, 2, 2, 6, 1, 0, 5, 2, 2]), (3, 1, [2, 2, 0]), (4, 5, []),
                (5, 4, [4, 3, 2, 1, 0])]


@needs_jax
@pytest.mark.parametrize("N, D, ids", GATHER_CASES)
def test_jax_gather_ops_match_c(N, D, ids):
    inputs, outs = gather_ops("float64")
    values = gather_values(N, D, ids, "float64")
    assert_same(jax_function(inputs, outs)(*values), c_function(inputs, outs)(*values), 1e-10)


@needs_jax
def test_jax_gather_ops_in_float32():
    inputs, outs = gather_ops("float32")
    values = gather_values(9, 6, [8, 0, 3, 3, 3, 7, 0], "float32")
    assert_same(jax_function(inputs, outs)(*values), c_function(inputs, outs)(*values), 1e-5)


@needs_jax
def test_jax_gather_gradient_end_to_end():
    """``pytensor.grad`` through Gather (building GatherGrad), in JAX and in C."""
    from netbuild.ops.embedding import gather

    W, ids = pt.dmatrix("W"), pt.vector("ids", dtype="int64")
    v = np.random.default_rng(6).normal(size=(6, 3))
    cost = (gather(W, ids) * v).sum() + (gather(W, ids) ** 2).sum()
    outs = [cost, pytensor.grad(cost, W)]
    W_val, ids_val, _ = gather_values(5, 3, [1, 4, 1, 0, 1, 3], "float64")
    assert_same(jax_function([W, ids], outs)(W_val, ids_val),
                c_function([W, ids], outs)(W_val, ids_val), 1e-10)


@needs_jax
@pytest.mark.parametrize("bad", [7, -1])
def test_jax_an_id_outside_the_table_is_nan(bad):
    """JAX cannot raise inside a compiled function: the row of an id outside ``[0, N)`` is NaN
    (a negative id does not wrap around), and so is the whole gradient."""
    inputs, outs = gather_ops("float64")
    W_val, ids_val, dy_val = gather_values(7, 2, [0, 3, bad, 2], "float64")
    y, dW = (np.asarray(v) for v in jax_function(inputs, outs)(W_val, ids_val, dy_val))
    assert np.isnan(y[2]).all() and np.isnan(dW).all()
    np.testing.assert_array_equal(y[[0, 1, 3]], W_val[[0, 3, 2]])
