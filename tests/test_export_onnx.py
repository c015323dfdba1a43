"""ONNX export: every layer, activation and shipped config, run by onnxruntime, equals netbuild.

Each case exports a network (its parameters moved off their initial values, batch norm's running
statistics too), checks the file with ``onnx.checker`` (``full_check``), and compares
onnxruntime's outputs with netbuild's predictions (the compiled C graph ``netbuild predict``
runs) on held-out inputs, at batch sizes 1 and 7: within 1e-5, absolute on probabilities.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import onnxruntime
import pytest
from conftest import CONFIGS
from test_layer_table import TABLE

import netbuild
from netbuild import NetbuildError, activations, layers
from netbuild.export import onnx as export
from netbuild.export.onnx import graph_names
from netbuild.model import Model
from netbuild.network import Network
from netbuild.spec import load_text, validate


def build(input_shape, items, seed: int = 0) -> Model:
    """A model of ``items`` (YAML flow mappings) with parameters drawn away from their
    initializers, so that biases, running statistics and gates all take part."""
    text = (f"name: t\ndata: {{train: none.npz}}\nmodel:\n  input_shape: {list(input_shape)}\n"
            "  layers:\n" + "".join(f"    - {item}\n" for item in items)
            + "train: {loss: mse, optimizer: {type: sgd}}\n")
    spec = validate(load_text(text, "case.yaml"))
    network = Network.from_spec(spec)
    rng = np.random.default_rng(seed)
    for name, var in network.params.items():
        value = var.get_value()
        if name.endswith("/var"):
            value = rng.uniform(0.5, 2.0, value.shape)
        else:
            value = value + rng.normal(0.0, 0.3, value.shape)
        var.set_value(value.astype(var.dtype))
    return Model(spec, network, "case.yaml")


def inputs(model: Model, n: int, seed: int = 1, scale: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (n, *model.input_shape)
    ids = model.network.integer_input()
    if ids:
        return rng.integers(0, ids, size=shape)
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def session(proto) -> onnxruntime.InferenceSession:
    return onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def assert_same(theirs: np.ndarray, ours: np.ndarray) -> None:
    """Within 1e-5 absolute; outputs beyond [0, 1] (regression) also within 1e-6 relative."""
    assert theirs.shape == ours.shape and theirs.dtype == np.float32
    probabilities = ours.min() >= 0.0 and ours.max() <= 1.0
    np.testing.assert_allclose(theirs, ours, atol=1e-5, rtol=0.0 if probabilities else 1e-6)


def assert_exports(model: Model, opset: int = export.DEFAULT_OPSET, scale: float = 1.0) -> onnx.ModelProto:
    """Export (checked by onnx.checker inside, with full_check), run at batch 1 and 7."""
    proto = export.to_onnx(model.spec, model.network, model.spec.data, opset)
    onnx.checker.check_model(proto, full_check=True)
    assert proto.opset_import[0].version == opset
    run = session(proto)
    for n in (1, 7):
        x = inputs(model, n, scale=scale)
        assert_same(run.run(["y"], {"x": x})[0], model.predict(x))
    return proto


#: Every case is exported at the oldest and the newest opset netbuild writes.
OPSETS = [export.MIN_OPSET, export.MAX_OPSET]


def test_every_layer_type_and_activation_has_an_exporter():
    assert set(export.EXPORTERS) == set(layers.REGISTRY)
    assert set(export.ACTIVATIONS) == set(activations.REGISTRY)


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("case", TABLE, ids=[row[0] for row in TABLE])
def test_layer_table_row(case, opset):
    _, input_shape, items, _ = case
    model = build(input_shape, items)
    if any(node.masked for node in model.network.order):  # masks: a located error, for now
        with pytest.raises(NetbuildError, match="masks of padded sequences are not exported"):
            export.to_onnx(model.spec, model.network, model.spec.data, opset)
        return
    assert_exports(model, opset)


ACTIVATION_CONFIGS = [name for name in activations.REGISTRY] + [
    "{type: leaky_relu, alpha: 0.05}", "{type: elu, alpha: 0.5}"]


@pytest.mark.parametrize("act", ACTIVATION_CONFIGS)
def test_every_activation(act):
    model = build([2, 5], ["{type: dense, units: 6}", "{type: dense, units: 4, name: out}",
                           f"{{type: activation, activation: {act}}}"])
    # the activation's inputs reach past -6 and 6: both sides of every kink, the saturated tails
    # (hard_sigmoid clips at -3 and 3) and softplus's large-x branch
    pre = build_preactivations(model, inputs(model, 7, scale=4.0))
    assert pre.min() < -6 and pre.max() > 6
    assert_exports(model, scale=4.0)


def build_preactivations(model: Model, x: np.ndarray) -> np.ndarray:
    """The output of the layer named ``out`` (the activation's input) for ``x``."""
    import pytensor

    from netbuild.network import INPUT

    values = {INPUT: model.network.input_variable()}
    from netbuild.layers import Context

    for node in model.network.order:
        values[node.name] = node.layer.forward([values[i] for i in node.inputs], Context(training=False))
    return pytensor.function([values[INPUT]], values["out"])(x)


RECURRENT = {
    "bidirectional-lstm-sequences": ["{type: lstm, units: 5, bidirectional: true, return_sequences: true}"],
    "bidirectional-gru-sequences": ["{type: gru, units: 5, bidirectional: true, return_sequences: true}"],
    "go-backwards-lstm": ["{type: lstm, units: 5, go_backwards: true}"],
    "go-backwards-lstm-sequences": ["{type: lstm, units: 5, go_backwards: true, return_sequences: true}"],
    "go-backwards-bidirectional-gru": ["{type: gru, units: 4, go_backwards: true, bidirectional: true}"],
    "rnn-relu-bidirectional": ["{type: simple_rnn, units: 4, activation: relu, bidirectional: true, "
                               "return_sequences: true}"],
    "lstm-hard-sigmoid-elu": ["{type: lstm, units: 4, recurrent_activation: hard_sigmoid, "
                              "activation: {type: elu, alpha: 0.5}}"],
    "gru-linear-softsign": ["{type: gru, units: 4, activation: linear, recurrent_activation: softsign}"],
    "rnn-leaky-softplus": ["{type: simple_rnn, units: 4, activation: {type: leaky_relu, alpha: 0.1}}",
                           "{type: activation, activation: softplus}"],
    "stacked-lstm-dense": ["{type: lstm, units: 6, return_sequences: true}",
                           "{type: gru, units: 3, return_sequences: true}",
                           "{type: dense, units: 2, activation: softmax}"],
}


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("name", RECURRENT)
def test_recurrent(name, opset):
    assert_exports(build([6, 3], RECURRENT[name]), opset)


def test_embedding_first_layer_reads_int64_ids():
    model = build([6], ["{type: embedding, input_dim: 11, output_dim: 4}",
                        "{type: lstm, units: 3}", "{type: dense, units: 2, activation: softmax}"])
    proto = assert_exports(model)
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64


def test_ids_read_by_other_layers_too():
    """The int64 input feeds an embedding and a dense layer (which reads the ids as float32)."""
    model = build([4], ["{type: embedding, input_dim: 9, output_dim: 3, name: e}", "{type: flatten}",
                        "{type: dense, units: 2, inputs: [input], name: d}",
                        "{type: concatenate, inputs: [flatten_1, d]}"])
    assert model.predict(inputs(model, 3)).dtype == np.float32
    assert_exports(model)


def test_an_id_beyond_the_table_from_another_layer_is_one_line(tmp_path):
    """An embedding reading a dense layer's output (floats truncated to ids) meets ids outside
    its table: predict says so in one line, and export writes nothing."""
    model = build([3], ["{type: dense, units: 2}", "{type: embedding, input_dim: 4, output_dim: 2}"])
    model.network.params["dense_0/b"].set_value(np.full(2, 50.0, dtype=np.float32))
    with pytest.raises(NetbuildError) as caught:
        model.predict(inputs(model, 2))
    assert "an embedding received an id outside its table" in str(caught.value)
    with pytest.raises(NetbuildError) as caught:
        model.export_onnx(tmp_path / "m.onnx")
    assert "nothing was written" in str(caught.value) and not (tmp_path / "m.onnx").exists()


def test_residual_cnn_with_batch_norm_and_same_pooling():
    model = build([2, 9, 9], [
        "{type: conv2d, filters: 4, kernel_size: 3, padding: same, name: stem}",
        "{type: batch_norm, name: bn1}",
        "{type: activation, activation: relu}",
        "{type: conv2d, filters: 4, kernel_size: 3, padding: same, dilation_rate: 2}",
        "{type: batch_norm, name: bn2}",
        "{type: add, inputs: [bn2, stem], name: res}",
        "{type: max_pool2d, pool_size: 3, strides: 2, padding: same}",
        "{type: avg_pool2d, pool_size: 2, padding: same}",
        "{type: conv2d, filters: 3, kernel_size: [2, 1], strides: [1, 2], padding: 1, activation: elu}",
        "{type: concatenate, inputs: [conv2d_8, conv2d_8], axis: 1}",
        "{type: global_avg_pool}",
        "{type: dense, units: 3, activation: softmax}"])
    assert_exports(model)


def test_conv1d_pooling_and_reshapes():
    assert_exports(build([3, 11], [
        "{type: conv1d, filters: 4, kernel_size: 3, strides: 2, padding: same, activation: tanh}",
        "{type: avg_pool1d, pool_size: 3, strides: 1, padding: same}",
        "{type: max_pool1d, pool_size: 2, padding: same}",
        "{type: layer_norm, center: false}",
        "{type: reshape, shape: [-1, 2]}",
        "{type: dense, units: 3}",
        "{type: multiply, inputs: [dense_5, dense_5, dense_5]}",
        "{type: flatten}",
        "{type: batch_norm, scale: false, center: false}",
        "{type: dropout, rate: 0.5}",
        "{type: dense, units: 1, activation: sigmoid}"]))


@pytest.mark.parametrize("opset", OPSETS)
def test_every_operator_runs_at_the_opsets_netbuild_writes(opset):
    model = build([2, 12], [
        "{type: conv1d, filters: 4, kernel_size: 3, padding: same, activation: gelu}",
        "{type: batch_norm}", "{type: avg_pool1d, padding: same, pool_size: 3}",
        "{type: layer_norm}", "{type: max_pool1d}",
        "{type: lstm, units: 4, return_sequences: true, bidirectional: true}",
        "{type: simple_rnn, units: 3, return_sequences: true}",
        "{type: gru, units: 3, go_backwards: true}", "{type: dense, units: 5, activation: selu}",
        "{type: dropout, rate: 0.2}", "{type: reshape, shape: [5, 1]}", "{type: global_max_pool}",
        "{type: activation, activation: swish}", "{type: activation, activation: log_softmax}"])
    assert_exports(model, opset)


def test_an_activation_onnx_recurrent_operators_lack_is_a_located_error(tmp_path, run_cli):
    """Named with its layer and its line in the run's spec.yaml; nothing is written."""
    from netbuild.runs import RunDir

    model = build([4, 2], ["{type: dense, units: 3}",
                           "{type: lstm, units: 2, activation: gelu, return_sequences: true}",
                           "{type: simple_rnn, units: 2, activation: swish, inputs: [input]}"])
    with pytest.raises(export.SpecError) as caught:
        export.to_onnx(model.spec, model.network, model.spec.data)
    assert [line.split(":")[:2] for line in caught.value.lines()] == [["case.yaml", "7"], ["case.yaml", "8"]]
    run = RunDir(tmp_path / "run")
    with run:
        run.create()
        run.write_spec(model.spec)
        run.save_model(model.spec, model.network.param_values())
    result = run_cli("export", run.path, "--out", tmp_path / "m.onnx")
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert len(lines) == 2 and all(line.startswith(f"{run.path / 'spec.yaml'}:") for line in lines)
    assert "model.layers[1].activation: layer 'lstm_1' cannot be exported to ONNX: its activation " \
           "'gelu' has no form in ONNX's LSTM operator; expected one of: linear, sigmoid" in lines[0]
    assert "model.layers[2].activation: layer 'simple_rnn_2'" in lines[1]
    assert not (tmp_path / "m.onnx").exists()


def _shipped_configs():
    return sorted(p.name for p in CONFIGS.glob("*.yaml"))


@pytest.mark.parametrize("config", _shipped_configs())
def test_shipped_config_exports_what_predict_writes(config, tmp_path, run_cli):
    """Train one epoch through the CLI, `netbuild predict` the held-out data, `netbuild export`,
    and run the file in onnxruntime on the same data at batch sizes 1 and 7."""
    run = tmp_path / "run"
    assert run_cli("train", CONFIGS / config, "--run-dir", run, "--epochs", "1", "-q").exit_code == 0
    spec = json.loads(str(np.load(run / "model.npz")["__spec__"]))
    test_file = spec["data"]["test"]
    result = run_cli("predict", run, "--data", test_file, "--out", tmp_path / "p.npz")
    assert result.exit_code == 0, result.output
    result = run_cli("export", run, "--out", tmp_path / "m.onnx")
    if any(layer["type"] == "masking" or layer.get("mask_zero") for layer in spec["model"]["layers"]):
        assert result.exit_code == 1 and "masks of padded sequences are not exported" in result.stderr
        return
    assert result.exit_code == 0, result.output
    assert "onnxruntime matches netbuild" in result.output

    network = netbuild.load_model(run).network
    sig = network.signature
    in_names, out_names = graph_names(network)
    predicted = np.load(tmp_path / "p.npz")
    ours = [predicted["y"]] if sig.shorthand_outputs else [predicted[o.key] for o in sig.outputs]
    proto = onnx.load(str(tmp_path / "m.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input] == in_names
    assert [o.name for o in proto.graph.output] == out_names
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["netbuild_spec"]) == spec
    data = np.load(test_file)
    xs = []
    for i in sig.inputs:
        x = data[i.key].reshape((-1, *i.shape))
        xs.append(x.astype(np.float32) if x.dtype.kind == "f" else x.astype(np.int64))
    run_onnx = session(proto)
    for n in (1, 7):
        batches = [run_onnx.run(out_names, {name: x[i:i + n] for name, x in zip(in_names, xs)})
                   for i in range(0, len(xs[0]), n)]
        for k, want in enumerate(ours):
            assert_same(np.concatenate([b[k] for b in batches]), want)


def test_the_file_says_what_it_is(tmp_path):
    model = build([5], ["{type: dense, units: 3, activation: softmax}"])
    done = model.export_onnx(tmp_path / "m.onnx")
    proto = onnx.load(str(done.path))
    graph = proto.graph
    assert [i.name for i in graph.input] == ["x"] and [o.name for o in graph.output] == ["y"]
    dims = graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [5]
    assert sorted(t.name for t in graph.initializer) == ["dense_0/W", "dense_0/b"]
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["netbuild_version"] == proto.producer_version
    assert json.loads(meta["netbuild_spec"])["model"]["layers"][0]["units"] == 3
    assert proto.opset_import[0].version == export.DEFAULT_OPSET == done.opset
    assert done.examples_checked == 7 and done.max_difference < 1e-6


# -- users' mistakes through the CLI ----------------------------------------------------------------
@pytest.fixture
def trained(tmp_path_factory):
    model = build([4], ["{type: dense, units: 3, activation: softmax}"])
    path = tmp_path_factory.mktemp("model") / "model.npz"
    from netbuild.runs import save_model

    save_model(path, model.spec, model.network.param_values())
    return path


def test_existing_file_is_kept_without_overwrite(trained, tmp_path, run_cli):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"mine")
    result = run_cli("export", trained, "--out", out)
    assert result.exit_code == 1
    assert result.output.splitlines() == [f"{out}: already exists; pass --overwrite to replace it "
                                          "or choose another --out"]
    assert out.read_bytes() == b"mine"
    assert run_cli("export", trained, "--out", out, "--overwrite").exit_code == 0
    assert onnx.load(str(out)).graph.output[0].name == "y"


@pytest.mark.parametrize("what", ["missing", "folder", "not-npz", "checkpoint", "foreign-npz"])
def test_a_model_that_is_not_a_model(what, tmp_path, run_cli):
    target = tmp_path / "target"
    if what == "folder":
        target.mkdir()
    elif what == "not-npz":
        target.write_text("name: x\n")
    elif what == "checkpoint":
        np.savez(target.with_suffix(".npz"), __state__=np.array("{}"))
        target = target.with_suffix(".npz")
    elif what == "foreign-npz":
        np.savez(target.with_suffix(".npz"), weights=np.zeros(3))
        target = target.with_suffix(".npz")
    result = run_cli("export", target, "--out", tmp_path / "m.onnx")
    assert result.exit_code == 1
    (line,) = result.output.splitlines()
    assert line.startswith(str(target)) and "Traceback" not in result.output
    assert not (tmp_path / "m.onnx").exists()


def test_unwritable_out(trained, tmp_path, run_cli, monkeypatch):
    """A folder without write permission (simulated: the tests may run as root, whom permissions
    do not stop), a write that fails (a read-only file system), a folder that does not exist."""
    import errno
    import os

    from netbuild import model as model_mod

    locked = tmp_path / "locked"
    locked.mkdir()
    access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p) == str(locked)
                        else access(p, mode, **kw))
    result = run_cli("export", trained, "--out", locked / "m.onnx")
    assert result.exit_code == 1
    assert result.output.splitlines() == [f"{locked / 'm.onnx'}: cannot write in {locked}"]
    monkeypatch.setattr(os, "access", access)

    def read_only(path, data):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(model_mod, "atomic_write", read_only)
    result = run_cli("export", trained, "--out", tmp_path / "m.onnx")
    assert result.exit_code == 1
    assert result.output.splitlines() == [f"{tmp_path / 'm.onnx'}: cannot write: Read-only file system"]
    result = run_cli("export", trained, "--out", tmp_path / "no" / "m.onnx")
    assert result.output.splitlines() == [f"{tmp_path / 'no' / 'm.onnx'}: the folder "
                                          f"{tmp_path / 'no'} does not exist"]
    assert not any(tmp_path.rglob("*.onnx"))


def test_an_unknown_opset_is_a_usage_error(trained, tmp_path, run_cli):
    result = run_cli("export", trained, "--out", tmp_path / "m.onnx", "--opset", "9")
    assert result.exit_code == 2 and "'--opset': 9 is not in the range 17<=x<=28" in result.output


@pytest.mark.parametrize("module", ["onnx", "onnxruntime"])
def test_without_the_extra_export_says_what_to_install(module, trained, tmp_path, run_cli, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if it were not installed
    result = run_cli("export", trained, "--out", tmp_path / "m.onnx")
    assert result.exit_code == 1
    assert result.output.splitlines() == ["ONNX export needs onnx and onnxruntime, which are not "
                                          "installed; install them with: pip install 'netbuild[onnx]'"]
    assert not (tmp_path / "m.onnx").exists()
