"""batch_norm and layer_norm against numpy versions of torch's formulas; shapes; gradients."""


import numpy as np
import pytensor
import pytensor.tensor as pt
import pytest
from conftest import TEST_MODE, assert_same, jax_function, needs_jax, verify_grad

from netbuild import initializers
from netbuild.layers.base import Context, LayerError
from netbuild.layers.normalization import BatchNorm, LayerNorm

BN = {"type": "batch_norm", "momentum": 0.9, "epsilon": 1e-5, "center": True, "scale": True}
LN = {"type": "layer_norm", "epsilon": 1e-5, "center": True, "scale": True}


@pytest.fixture(autouse=True)
def float64():
    with pytensor.config.change_flags(floatX="float64"):
        yield


def build(layer, shape):
    """Create the layer's parameters as ``pytensor.shared`` variables from its specs."""
    rng = np.random.default_rng(0)
    for p in layer.param_specs([shape]):
        value = initializers.initialize(p.init, rng, p.shape, p.fan_in, p.fan_out)
        layer.params[p.name] = pytensor.shared(value, name=f"{layer.name}/{p.name}")
    return layer


def batch(shape, seed=0, n=6):
    return np.random.default_rng(seed).normal(1.5, 2.0, size=(n, *shape))


def np_batch_norm_train(x, gamma, beta, mean, var, momentum, eps):
    """torch BatchNorm in training (Keras momentum): output and new running statistics."""
    axes = (0,) + tuple(range(2, x.ndim))
    lay = [1, -1] + [1] * (x.ndim - 2)
    mu, sigma2 = x.mean(axes), x.var(axes)
    x_hat = (x - mu.reshape(lay)) / np.sqrt(sigma2.reshape(lay) + eps)
    y = x_hat * gamma.reshape(lay) + beta.reshape(lay)
    return y, momentum * mean + (1 - momentum) * mu, momentum * var + (1 - momentum) * x.var(axes, ddof=1)


def np_batch_norm_eval(x, gamma, beta, mean, var, eps):
    lay = [1, -1] + [1] * (x.ndim - 2)
    return (x - mean.reshape(lay)) / np.sqrt(var.reshape(lay) + eps) * gamma.reshape(lay) + beta.reshape(lay)


@pytest.mark.parametrize("shape", [(4,), (3, 5), (2, 3, 4)])
def test_batch_norm_train_then_eval(shape):
    layer = build(BatchNorm("bn", dict(BN, momentum=0.8, epsilon=1e-3)), shape)
    assert layer.output_shape([shape]) == shape
    specs = {p.name: p for p in layer.param_specs([shape])}
    assert {n: p.shape for n, p in specs.items()} == {k: (shape[0],) for k in ("gamma", "beta", "mean", "var")}
    assert [n for n, p in specs.items() if p.trainable] == ["gamma", "beta"]
    assert not any(p.regularize for p in specs.values())

    rng = np.random.default_rng(1)
    gamma, beta = rng.uniform(0.5, 2, shape[0]), rng.normal(size=shape[0])
    layer.params["gamma"].set_value(gamma)
    layer.params["beta"].set_value(beta)
    x = pt.tensor("x", dtype="float64", shape=(None, *shape))
    ctx = Context(training=True)
    y = layer.forward([x], ctx)
    assert set(ctx.updates) == {layer.params["mean"], layer.params["var"]}
    train = pytensor.function([x], y, updates=ctx.updates, mode=TEST_MODE)
    evaluate = pytensor.function([x], layer.forward([x], Context(training=False)), mode=TEST_MODE)

    mean, var = np.zeros(shape[0]), np.ones(shape[0])
    for step in range(2):
        xb = batch(shape, seed=step)
        want, mean, var = np_batch_norm_train(xb, gamma, beta, mean, var, 0.8, 1e-3)
        got = train(xb)
        assert got.shape[1:] == layer.output_shape([shape])
        np.testing.assert_allclose(got, want, atol=1e-5)
        np.testing.assert_allclose(layer.params["mean"].get_value(), mean, atol=1e-5)
        np.testing.assert_allclose(layer.params["var"].get_value(), var, atol=1e-5)

    xb = batch(shape, seed=7, n=3)
    np.testing.assert_allclose(evaluate(xb), np_batch_norm_eval(xb, gamma, beta, mean, var, 1e-3), atol=1e-5)


def test_batch_norm_without_center_and_scale():
    shape = (3, 4)
    layer = build(BatchNorm("bn", dict(BN, center=False, scale=False)), shape)
    assert [p.name for p in layer.param_specs([shape])] == ["mean", "var"]
    x = pt.tensor3("x", dtype="float64")
    ctx = Context(training=True)
    f = pytensor.function([x], layer.forward([x], ctx), updates=ctx.updates, mode=TEST_MODE)
    xb = batch(shape)
    want, _, _ = np_batch_norm_train(xb, np.ones(3), np.zeros(3), np.zeros(3), np.ones(3), 0.9, 1e-5)
    np.testing.assert_allclose(f(xb), want, atol=1e-5)


def test_batch_norm_gradient():
    shape = (3, 2)
    layer = build(BatchNorm("bn", BN), shape)
    running = dict(layer.params)

    def fun(x, gamma, beta):
        layer.params = dict(running, gamma=gamma, beta=beta)
        return layer.forward([x], Context(training=True))

    rng = np.random.default_rng(2)
    verify_grad(fun, [batch(shape, n=4), rng.uniform(0.5, 2, 3), rng.normal(size=3)],
                                  rng=rng, mode=TEST_MODE)


def np_layer_norm(x, gamma, beta, eps):
    mu, sigma2 = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(sigma2 + eps) * gamma + beta


@pytest.mark.parametrize("shape", [(5,), (3, 4)])
def test_layer_norm(shape):
    layer = build(LayerNorm("ln", LN), shape)
    assert layer.output_shape([shape]) == shape
    assert [(p.name, p.shape, p.trainable, p.regularize) for p in layer.param_specs([shape])] == \
        [("gamma", (shape[-1],), True, False), ("beta", (shape[-1],), True, False)]
    rng = np.random.default_rng(3)
    gamma, beta = rng.uniform(0.5, 2, shape[-1]), rng.normal(size=shape[-1])
    layer.params["gamma"].set_value(gamma)
    layer.params["beta"].set_value(beta)
    x = pt.tensor("x", dtype="float64", shape=(None, *shape))
    ctx = Context(training=True)
    f = pytensor.function([x], layer.forward([x], ctx), mode=TEST_MODE)
    assert not ctx.updates
    xb = batch(shape)
    got = f(xb)
    assert got.shape[1:] == layer.output_shape([shape])
    np.testing.assert_allclose(got, np_layer_norm(xb, gamma, beta, 1e-5), atol=1e-5)


def test_layer_norm_gradient():
    layer = build(LayerNorm("ln", dict(LN, center=False)), (2, 4))
    assert list(layer.params) == ["gamma"]

    def fun(x, gamma):
        layer.params = {"gamma": gamma}
        return layer.forward([x], Context(training=True))

    rng = np.random.default_rng(4)
    verify_grad(fun, [batch((2, 4), n=3), rng.uniform(0.5, 2, 4)], rng=rng, mode=TEST_MODE)


@pytest.mark.parametrize("cls", [BatchNorm, LayerNorm])
def test_scalar_input_refused(cls):
    with pytest.raises(LayerError, match=r"received a scalar input shape \(\)"):
        cls("norm", BN if cls is BatchNorm else LN).output_shape([()])


# -- the layer_norm C ops (netbuild/ops/normalization.py) -----------------------------------------
def c_function(inputs, outputs):
    from netbuild.backend import mode

    return pytensor.function(inputs, outputs, mode=mode())


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_layer_norm_ops_in_c_against_numpy_and_torch_formulas(dtype):
    """Odd widths (the 8-lane sums' tails), one feature, no rows, and enough rows for several
    threads: the C code against its numpy perform and against the formulas' numpy (float64);
    the gradient's column sums have the same bits on 1 and 2 threads."""
    from netbuild import threads
    from netbuild.ops.normalization import LayerNorm as LayerNormOp
    from netbuild.ops.normalization import LayerNormGrad

    rng = np.random.default_rng(7)
    tol = {"float64": 1e-11, "float32": 2e-5}[dtype]
    for shape in [(3, 5), (2, 3, 17), (4, 1), (0, 6), (600, 64), (7, 128)]:
        x_val = (rng.normal(size=shape) * 3 + 1).astype(dtype)
        k = shape[-1]
        g_val, b_val = rng.uniform(0.5, 2, k).astype(dtype), rng.normal(size=k).astype(dtype)
        dy_val = rng.normal(size=shape).astype(dtype)
        x = pt.tensor(dtype=dtype, shape=(None,) * len(shape))
        gamma, beta, dy = pt.vector(dtype=dtype), pt.vector(dtype=dtype), x.type()
        y, mean, rstd = LayerNormOp(1e-5)(x, gamma, beta)
        grads = LayerNormGrad()(x, gamma, mean, rstd, dy)
        outs = [y, mean, rstd, *grads]
        before = threads.current()
        try:
            runs = []
            for count in (1, 2):
                threads.apply(count)
                runs.append(c_function([x, gamma, beta, dy], outs)(x_val, g_val, b_val, dy_val))
        finally:
            threads.apply(before)
        for a, b in zip(*runs):
            np.testing.assert_array_equal(a, b)
        numpy = pytensor.function([x, gamma, beta, dy], outs, mode=TEST_MODE)(x_val, g_val, b_val,
                                                                              dy_val)
        for i, (c, n) in enumerate(zip(runs[0], numpy)):
            assert c.shape == n.shape and c.dtype == n.dtype
            scale = max(1.0, float(np.abs(n).max())) if n.size else 1.0
            np.testing.assert_allclose(c, n, rtol=0, atol=tol * scale, err_msg=f"{shape} output {i}")
        # the formulas, in float64
        x64, g64, dy64 = (v.astype(np.float64) for v in (x_val, g_val, dy_val))
        want = np_layer_norm(x64, g64, b_val.astype(np.float64), 1e-5)
        np.testing.assert_allclose(runs[0][0], want, rtol=0, atol=tol * 10 * max(1, abs(want).max() if want.size else 1))


def test_layer_norm_gradient_in_c():
    """Finite differences of the C ops with respect to x, gamma and beta."""
    from netbuild.backend import mode
    from netbuild.ops.normalization import layer_norm

    rng = np.random.default_rng(8)
    verify_grad(lambda x, g, b: layer_norm(x, g, b, 1e-5),
                [rng.normal(size=(3, 2, 11)), rng.uniform(0.5, 2, 11), rng.normal(size=11)],
                rng=rng, mode=mode())


def test_layer_norm_shape_mismatch_is_an_error():
    from netbuild.ops.normalization import LayerNorm as LayerNormOp

    x, g, b = pt.matrix(), pt.vector(), pt.vector()
    for fn in (c_function([x, g, b], LayerNormOp(1e-5)(x, g, b)[0]),
               pytensor.function([x, g, b], LayerNormOp(1e-5)(x, g, b)[0], mode=TEST_MODE)):
        with pytest.raises(ValueError, match="LayerNorm: the shape of gamma does not match x's"):
            fn(np.zeros((2, 3), x.dtype), np.ones(4, x.dtype), np.zeros(3, x.dtype))


# -- the jax backend (the ops' ``jax``) against their C code ---------------------------------------
def layer_norm_ops(dtype, ndim, epsilon):
    """Inputs ``x, gamma, beta, dy`` and outputs ``y, mean, rstd, dx, dgamma, dbeta``."""
    from netbuild.ops.normalization import LayerNorm as LayerNormOp
    from netbuild.ops.normalization import LayerNormGrad

    x = pt.tensor(dtype=dtype, shape=(None,) * ndim)
    gamma, beta, dy = pt.vector(dtype=dtype), pt.vector(dtype=dtype), x.type()
    y, mean, rstd = LayerNormOp(epsilon)(x, gamma, beta)
    return [x, gamma, beta, dy], [y, mean, rstd, *LayerNormGrad()(x, gamma, mean, rstd, dy)]


def layer_norm_values(shape, dtype, seed=9):
    rng = np.random.default_rng(seed)
    k = shape[-1]
    return [(rng.normal(size=shape) * 3 + 1).astype(dtype), rng.uniform(0.5, 2, k).astype(dtype),
            rng.normal(size=k).astype(dtype), rng.normal(size=shape).astype(dtype)]


@needs_jax
@pytest.mark.parametrize("epsilon", [1e-5, 0.5])
@pytest.mark.parametrize("shape", [(5,), (3, 5), (2, 3, 17), (4, 1), (0, 6)], ids=str)
def test_jax_layer_norm_ops_match_c(shape, epsilon):
    inputs, outs = layer_norm_ops("float64", len(shape), epsilon)
    values = layer_norm_values(shape, "float64")
    assert_same(jax_function(inputs, outs)(*values), c_function(inputs, outs)(*values), 1e-10)


@needs_jax
def test_jax_layer_norm_ops_in_float32():
    inputs, outs = layer_norm_ops("float32", 2, 1e-5)
    values = layer_norm_values((6, 13), "float32")
    assert_same(jax_function(inputs, outs)(*values), c_function(inputs, outs)(*values), 1e-5)


@needs_jax
def test_jax_layer_norm_gradient_end_to_end():
    """``pytensor.grad`` through LayerNorm (building LayerNormGrad), in JAX and in C."""
    from netbuild.ops.normalization import layer_norm

    x, gamma, beta = pt.tensor3(dtype="float64"), pt.dvector(), pt.dvector()
    w = np.random.default_rng(10).normal(size=(2, 3, 7))
    y = layer_norm(x, gamma, beta, 1e-3)
    cost = (y * w).sum() + (y ** 2).sum()
    outs = [cost, *pytensor.grad(cost, [x, gamma, beta])]
    values = layer_norm_values((2, 3, 7), "float64")[:3]
    assert_same(jax_function([x, gamma, beta], outs)(*values),
                c_function([x, gamma, beta], outs)(*values), 1e-10)
