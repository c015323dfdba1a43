"""The ``jax`` backend against the ``c`` backend on the same weights: predictions within 1e-5 and
gradients within 1e-4 for every shipped config and every row of the layer table, dropout's draws
bit for bit, a few epochs of training that track each other, and models that move between the
backends. Each function is called on the backend it was built for (:class:`netbuild.compile.PerShape`
keeps JAX's mode), so that the comparisons are of JAX against C."""

from __future__ import annotations

import numpy as np
import pytensor
import pytest
from conftest import CONFIGS
from test_layer_table import TABLE, build

from netbuild import api, backend, data
from netbuild.checks import check
from netbuild.errors import DataError
from netbuild.model import ids_in_range
from netbuild.compile import PerShape, _loss_graph, _weighted, compile_predict, function, target_variables

pytest.importorskip("jax")

SHIPPED = sorted(p.name for p in CONFIGS.glob("*.yaml"))


def on(name: str, make):
    """``make()`` with backend ``name``: the graph is built and compiled for it."""
    backend.use(name)
    try:
        fn = make()
    finally:
        backend.use("c")
    assert isinstance(fn, PerShape) == (name == "jax")  # and a PerShape compiles for JAX, called anywhere
    return fn


def gradients_fn(network, ys_like, training: bool, seed: int):
    """``f(*inputs, *targets) -> [loss, d loss / d param for each trainable parameter]``."""
    heads = network.signature.outputs
    targets = target_variables(network, ys_like)
    xs, _, per_example, _ = _loss_graph(network, heads, targets, training, seed)
    loss = _weighted(heads, {name: value.mean() for name, value in per_example.items()})
    grads = pytensor.grad(loss, network.trainable())
    return function(xs + targets, [loss, *grads], name="gradients")


def close(a, b, tol: float, what: str) -> None:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, what
    scale = max(1.0, float(np.max(np.abs(b))) if b.size else 1.0)
    err = float(np.max(np.abs(a - b))) if a.size else 0.0
    assert err <= tol * scale, f"{what}: largest difference {err:.3g} (scale {scale:.3g}, tolerance {tol})"


@pytest.mark.parametrize("config", SHIPPED)
def test_a_shipped_config_predicts_and_differentiates_the_same(config):
    spec = api.load_spec(str(CONFIGS / config))
    network = check(spec, with_data=False)
    network.init_params(int(spec.data.get("seed", 0)))
    sets = data.load_datasets(spec, network)
    n = min(32, len(sets.train))
    batch = [x[:n] for x in sets.train.xs]
    targets = [y[:n] for y in sets.train.ys]

    predictions = {name: on(name, lambda: compile_predict(network))(*batch) for name in backend.BACKENDS}
    for a, b in zip(*(p if isinstance(p, list) else [p] for p in (predictions["jax"], predictions["c"]))):
        close(a, b, 1e-5, f"{config}: predictions")

    for training in (False, True):  # with dropout's draws in training
        seed = int(spec.data.get("seed", 0))
        values = {name: on(name, lambda: gradients_fn(network, sets.train.ys, training, seed))(*batch, *targets)
                  for name in backend.BACKENDS}
        names = ["loss"] + [p.name for p in network.trainable()]
        for name, a, b in zip(names, values["jax"], values["c"]):
            close(a, b, 1e-4, f"{config} (training={training}): {name}")


@pytest.mark.parametrize("case", TABLE, ids=[row[0] for row in TABLE])
def test_a_layer_row_predicts_and_differentiates_the_same(case, float64):
    _, input_shape, items, _ = case
    network = build(input_shape, items)
    rng = np.random.default_rng(0)
    if network.integer_input():
        x = rng.integers(0, network.integer_input(), size=(3, *input_shape))
    else:
        x = rng.normal(size=(3, *input_shape))
    y = rng.normal(size=(3, *network.output_shapes()[network.signature.outputs[0].name]))
    out = {name: on(name, lambda: compile_predict(network))(x) for name in backend.BACKENDS}
    close(out["jax"], out["c"], 1e-5, "predictions")
    values = {name: on(name, lambda: gradients_fn(network, [y], True, 0))(x, y) for name in backend.BACKENDS}
    for p, a, b in zip(["loss"] + [p.name for p in network.trainable()], values["jax"], values["c"]):
        close(a, b, 1e-4, p)


@pytest.mark.parametrize("config", ["digits-mlp.yaml", "digits-cnn.yaml", "digits-lstm.yaml"])
def test_training_on_either_backend_tracks_the_other(config, tmp_path):
    overrides = ["train.epochs=2"]
    runs = {}
    for name in backend.BACKENDS:
        backend.use(name)
        runs[name] = api.train(api.load_spec(str(CONFIGS / config), overrides), tmp_path / name)
    backend.use("c")
    for a, b in zip(runs["jax"].history, runs["c"].history):
        for key in ("loss", "val_loss"):
            if key in b:
                # float32 sums in another order, through two epochs of updates: within 1%
                assert a[key] == pytest.approx(b[key], rel=1e-2), (config, key, a["epoch"])
    # a model trained with one backend evaluates with the other, to the same predictions
    x = data.load_datasets(runs["c"].model.spec, runs["c"].model.network).train.xs[0][:16]
    trained_on_jax = api.load_model(runs["jax"].path)
    backend.use("jax")
    on_jax = api.load_model(runs["jax"].path).predict(x)
    backend.use("c")
    close(on_jax, trained_on_jax.predict(x), 1e-5, f"{config}: a jax model on both backends")


def test_a_backend_that_does_not_exist_is_one_line(run_cli, monkeypatch):
    monkeypatch.setenv("NETBUILD_BACKEND", "cuda")
    result = run_cli("train", CONFIGS / "digits-mlp.yaml", "--epochs", "1")
    assert result.exit_code == 2
    assert result.stderr.strip() == "NETBUILD_BACKEND='cuda': expected one of: c, jax"


def test_without_jax_the_backend_says_what_to_install(run_cli, monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "jax", None)
    result = run_cli("train", CONFIGS / "digits-mlp.yaml", "--backend", "jax", "--run-dir", tmp_path / "r")
    assert result.exit_code == 1
    assert result.stderr.strip() == ("the jax backend (--backend jax) needs jax, which is not installed; "
                                     "install it with: pip install 'netbuild[jax]'")


def test_jax_training_is_deterministic_and_resumes_to_the_same_bits(tmp_path):
    """digits-mlp (dropout and Adam: a generator step and optimizer state to carry over): two
    runs of 3 epochs on jax give the same bits, and so does one stopped after 2 and resumed."""
    def spec():
        return api.load_spec(str(CONFIGS / "digits-mlp.yaml"), ["train.epochs=3"])

    backend.use("jax")
    runs = [api.train(spec(), tmp_path / name) for name in ("a", "b")]
    api.train(spec(), tmp_path / "c", epochs=2)
    runs.append(api.train(None, tmp_path / "c", resume=True, epochs=3))
    backend.use("c")
    params = [np.load(r.path / "model.npz") for r in runs]
    names = [k for k in params[0].files if not k.startswith("__")]
    for other in params[1:]:
        for k in names:
            assert np.array_equal(params[0][k], other[k]), k


def test_a_jax_function_keeps_a_bounded_number_of_compiled_shapes():
    """Each batch shape is compiled once; beyond PerShape.MOST_SHAPES the least recently used is
    dropped (and compiled again if it comes back), and every shape computes what c does."""
    network = build([3], ["{type: dense, units: 2, activation: tanh}"])
    fns = {name: on(name, lambda: compile_predict(network)) for name in backend.BACKENDS}
    rng = np.random.default_rng(0)
    most = PerShape.MOST_SHAPES
    for n in [*range(1, most + 3), 3, most + 3, 1]:
        x = rng.normal(size=(n, 3)).astype(pytensor.config.floatX)
        close(fns["jax"](x), fns["c"](x), 1e-5, f"batch of {n}")
        assert len(fns["jax"]._fns) <= most
        if n == most + 3:  # 3 was used again just before: 4, the least recently used, went
            assert ((3, 3),) in fns["jax"]._fns and ((4, 3),) not in fns["jax"]._fns
    assert next(reversed(fns["jax"]._fns)) == ((1, 3),)  # compiled again, the latest


@pytest.mark.parametrize("name", backend.BACKENDS)
def test_an_id_out_of_range_that_the_network_computes_is_one_line_on_either_backend(name, tmp_path,
                                                                                    run_cli):
    """An embedding reading another layer's output (floats truncated to ids) meets an id outside
    its table while computing: on c the op raises, on jax a host callback notes it (the rows are
    NaN); either way training and predicting end in the same located line, exit 1."""
    np.savez(tmp_path / "d.npz", x=np.full((20, 3), 100.0, np.float32),
             y=np.zeros((20, 2, 2), np.float32))
    spec = tmp_path / "ids.yaml"
    spec.write_text("name: ids\nseed: 0\ndata: {train: d.npz}\nmodel:\n  input_shape: [3]\n"
                    "  layers: [{type: dense, units: 2}, {type: embedding, input_dim: 4, output_dim: 2}]\n"
                    "train: {loss: mse, optimizer: {type: sgd}, batch_size: 10, epochs: 1}\n")
    # the dense layer has no gradient through the ids: refused, located, before anything trains
    result = run_cli("train", spec, "--run-dir", tmp_path / "run", "--backend", name)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1].startswith(
        f"{spec}:6:12: model.layers[0]: layer 'dense_0' (dense) is not trained by the loss: its output "
        "reaches the outputs only through an embedding's ids"), result.output
    network = check(api.load_spec(spec))
    network.init_params(0)
    backend.use(name)
    try:
        fn = compile_predict(network)
        with pytest.raises(DataError, match="an embedding received an id outside its table"):
            with ids_in_range(network):
                np.asarray(fn(np.full((4, 3), 100.0, pytensor.config.floatX)))
        with ids_in_range(network):  # ids in range: nothing to say
            np.asarray(fn(np.zeros((4, 3), pytensor.config.floatX)))
    finally:
        backend.use("c")
