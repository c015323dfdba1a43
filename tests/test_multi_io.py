"""Networks with several inputs and several outputs (model.inputs, model.outputs): the shorthand
written out in the long form trains bitwise alike, the weighted total loss against numpy, the
located mistakes of `check`, per-output records, gates, predict, eval and the Python API."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from conftest import CONFIGS

import netbuild
from netbuild.metrics import metric_name
from netbuild.model import Model
from netbuild.network import Network
from netbuild.spec import Spec, validate

MULTI = CONFIGS / "digits-multi.yaml"
#: Shipped configs that take minutes to train on 2 cores (as in test_configs.py).
SLOW = {"digits-cnn.yaml", "digits-lstm.yaml", "digits-resnet.yaml", "digits-transformer.yaml",
        "digits-varlen.yaml"}


# -- the shorthand and the long form --------------------------------------------------------------
def long_form(spec: Spec) -> Spec:
    """``spec`` (the shorthand) with its one input and one output written out: the input keeps
    the name ``input`` (the layers read it so), the output is named ``out``; monitors follow
    the output's metric names."""
    data = copy.deepcopy(spec.data)
    model, train = data["model"], data["train"]
    layers = model["layers"]
    last = layers[-1].get("name") or f"{layers[-1]['type']}_{len(layers) - 1}"
    model["inputs"] = {"input": {"shape": model.pop("input_shape"), "key": data["data"].pop("x_key", "x")}}
    metrics = train.pop("metrics", [])
    model["outputs"] = {"out": {"layer": last, "key": data["data"].pop("y_key", "y"),
                                "loss": train.pop("loss"), "metrics": metrics}}
    names = {metric_name(m) for m in metrics}
    for section in ("early_stopping", "checkpoint", "schedule"):
        cfg = train.get(section) or {}
        bare = cfg.get("monitor", "").removeprefix("val_")
        if bare in names:  # a loss monitor watches the total, the same value
            cfg["monitor"] = cfg["monitor"].replace(bare, f"out_{bare}")
    out = spec.copy()
    out.data = data
    return validate(out)


SHORTHAND = sorted(p.name for p in CONFIGS.glob("*.yaml") if p.name != "digits-multi.yaml")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n
                                  for n in SHORTHAND])
def test_a_shipped_config_in_the_long_form_trains_bitwise_as_the_shorthand(name, tmp_path):
    """Two epochs of each shipped config, as written and with its input and output written out:
    the same parameters to the bit, the same losses (the total is the one output's)."""
    spec = netbuild.load_spec(CONFIGS / name, overrides=["train.epochs=2"])
    short = netbuild.train(spec, tmp_path / "short")
    longer = netbuild.train(long_form(spec), tmp_path / "long")
    a, b = short.model.network.param_values(), longer.model.network.param_values()
    assert sorted(a) == sorted(b)
    for key in a:
        assert np.array_equal(a[key], b[key]), key
    assert len(short.history) == len(longer.history) == 2
    for r, s in zip(short.history, longer.history):
        assert r["loss"] == s["loss"] == s["out_loss"]
        if "val_loss" in r:
            assert r["val_loss"] == s["val_loss"] == s["val_out_loss"]
        for k, v in r.items():
            if k not in ("loss", "val_loss", "seconds", "samples_per_second", "epoch", "learning_rate"):
                assert s[k.replace("val_", "val_out_") if k.startswith("val_") else f"out_{k}"] == v, k


# -- the weighted total loss ----------------------------------------------------------------------
TWO_LOSSES = """\
name: two
seed: 3
data: {train: two.npz}
model:
  inputs:
    a: {shape: [4]}
    b: {shape: [3], key: bee}
  layers:
    - {type: dense, units: 5, activation: tanh, inputs: [a], name: ha}
    - {type: concatenate, inputs: [ha, b], name: both}
    - {type: dense, units: 3, activation: softmax, name: cls}
    - {type: dense, units: 2, inputs: [both], name: reg}
  outputs:
    label: {layer: cls, loss: {type: categorical_crossentropy, label_smoothing: 0.1}, loss_weight: 0.3, metrics: [accuracy]}
    value: {layer: reg, key: v, loss: {type: huber, delta: 0.5}, loss_weight: 2.0, metrics: [mae]}
train:
  optimizer: {type: sgd, learning_rate: 0.1}
  batch_size: 8
  epochs: 1
  shuffle: false
"""


def two_losses(tmp_path, n: int = 16, seed: int = 0) -> tuple[Spec, dict]:
    rng = np.random.default_rng(seed)
    arrays = {"a": rng.normal(size=(n, 4)).astype(np.float32),
              "bee": rng.normal(size=(n, 3)).astype(np.float32),
              "label": rng.integers(0, 3, n), "v": rng.normal(size=(n, 2)).astype(np.float32)}
    np.savez(tmp_path / "two.npz", **arrays)
    (tmp_path / "two.yaml").write_text(TWO_LOSSES)
    return netbuild.load_spec(tmp_path / "two.yaml"), arrays


def numpy_losses(params: dict, arrays: dict) -> dict[str, float]:
    """The network of TWO_LOSSES and its losses, in float64 numpy."""
    p = {k: v.astype(np.float64) for k, v in params.items()}
    ha = np.tanh(arrays["a"] @ p["ha/W"] + p["ha/b"])
    both = np.concatenate([ha, arrays["bee"]], axis=1)
    logits = both @ p["cls/W"] + p["cls/b"]
    log_p = logits - logits.max(1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
    t = np.eye(3)[arrays["label"]] * 0.9 + 0.1 / 3
    label = float(np.mean(-(t * log_p).sum(1)))
    err = np.abs(both @ p["reg/W"] + p["reg/b"] - arrays["v"])
    quad = np.minimum(err, 0.5)
    value = float(np.mean((0.5 * quad**2 + 0.5 * (err - quad)).mean(1)))
    return {"loss": 0.3 * label + 2.0 * value, "label_loss": label, "value_loss": value}


def test_two_outputs_train_on_the_weighted_sum_of_their_losses(tmp_path):
    """eval's total and per-output losses, and the first training step's loss (one batch of all
    examples, from the initial weights), against numpy."""
    spec, arrays = two_losses(tmp_path)
    initial = Model(spec, Network.from_spec(spec), "initial")
    want = numpy_losses(initial.network.param_values(), arrays)
    inputs = {"a": arrays["a"], "b": arrays["bee"]}
    got = initial.evaluate(inputs, {"label": arrays["label"], "value": arrays["v"]})
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-5), key
    assert set(got) == {"loss", "label_loss", "label_accuracy", "value_loss", "value_mae"}
    run = netbuild.train(netbuild.load_spec(tmp_path / "two.yaml",
                                            overrides=["train.batch_size=16"]), tmp_path / "run")
    assert run.history[0]["loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert run.history[0]["label_loss"] == pytest.approx(want["label_loss"], rel=1e-5)


def test_a_zero_weight_leaves_an_output_untrained_by_its_loss(tmp_path):
    """With loss_weight 0 for `value`, its layer gets no gradient: reg/W does not move."""
    spec, _ = two_losses(tmp_path)
    spec.data["model"]["outputs"]["value"]["loss_weight"] = 0.0
    before = Network.from_spec(validate(spec)).param_values()
    run = netbuild.train(validate(spec), tmp_path / "run")
    after = run.model.network.param_values()
    assert np.array_equal(before["reg/W"], after["reg/W"])
    assert not np.array_equal(before["cls/W"], after["cls/W"])


# -- located mistakes -----------------------------------------------------------------------------
def check_lines(run_cli, tmp_path, text: str) -> list[str]:
    (tmp_path / "bad.yaml").write_text(text)
    result = run_cli("check", tmp_path / "bad.yaml")
    assert result.exit_code == 1
    assert "Traceback" not in result.output + result.stderr
    return result.stderr.splitlines()


@pytest.mark.parametrize("edit, where, message", [
    # a key missing from the data file
    (lambda t: t.replace("b: {shape: [3], key: bee}", "b: {shape: [3], key: beta}"),
     "3:15: data.train", "two.npz: no array 'beta' in the file; its keys are: a, bee, label, v"),
    # the second input's arrays of another shape
    (lambda t: t.replace("b: {shape: [3], key: bee}", "b: {shape: [2], key: bee}"),
     "3:15: data.train", "two.npz: key 'bee': has examples of shape (3,); expected (2,) to "
                                 "fit model.inputs.b.shape (or 2 values per example)"),
    # an output naming an unknown layer
    (lambda t: t.replace("{layer: reg,", "{layer: regr,"),
     "15:20: model.outputs.value.layer", "unknown layer 'regr' (did you mean 'reg'?)"),
    # the same layer as two outputs
    (lambda t: t.replace("{layer: reg,", "{layer: cls,"),
     "15:20: model.outputs.value.layer", "layer 'cls' is already the output 'label'; "
                                                  "expected each output to name a layer of its own"),
    # an input nobody reads
    (lambda t: t.replace("    b: {shape: [3], key: bee}\n", "    b: {shape: [3], key: bee}\n    c: {shape: [2]}\n"),
     "8:8: model.inputs.c", "input 'c' is read by no layer; expected a layer to name it in its "
                                     "inputs (or no such input)"),
    # the first layer of several inputs says nothing of what it reads
    (lambda t: t.replace("inputs: [a], name: ha", "name: ha"),
     "9:7: model.layers[0]", "layer 'ha' is the first layer and names no inputs"),
    # an output class id out of range
    (lambda t: t.replace("units: 3, activation: softmax", "units: 2, activation: softmax"),
     "3:15: data.train", "two.npz: key 'label': holds class id 2, outside the output's range"),
    # the shorthand's keys beside the long form
    (lambda t: t.replace("  shuffle: false", "  shuffle: false\n  loss: mse"),
     "21:3: train.loss", "model.outputs gives each output its loss; expected no train.loss"),
    (lambda t: t.replace("data: {train: two.npz}", "data: {train: two.npz, x_key: a}"),
     "3:24: data.x_key", "model.inputs gives each input its key; expected no data.x_key"),
    # a monitor of a key no output records
    # names that would collide: with an input, with the validation records, one key for two
    # outputs' predictions, one record key for two outputs
    (lambda t: t.replace("    value: {layer: reg,", "    a: {layer: reg,"),
     "15:8: model.outputs.a", "output 'a' has the name of an input"),
    (lambda t: t.replace("    value: {layer: reg,", "    val_x: {layer: reg,"),
     "15:12: model.outputs.val_x", "its records would read as validation records"),
    (lambda t: t.replace("key: v, loss", "key: label, loss"),
     "15:12: model.outputs.value", "writes its predictions under the key 'label', as output 'label' does"),
    (lambda t: t.replace("metrics: [accuracy]}", "metrics: [top_k_accuracy]}").replace(
        "    value: {layer: reg,", "    label_top_k: {layer: reg,").replace("metrics: [mae]", "metrics: [accuracy]"),
     "15:18: model.outputs.label_top_k", "output 'label_top_k' records 'label_top_k_accuracy', as "
                                         "output 'label' does"),
    (lambda t: t.replace("  shuffle: false", "  shuffle: false\n  early_stopping: {monitor: accuracy}"),
     "21:29: train.early_stopping.monitor", "'accuracy' is not recorded by this run; expected "
                                                     "one of: loss, label_loss, label_accuracy, value_loss, value_mae"),
])
def test_a_mistake_of_inputs_or_outputs_is_one_located_line(run_cli, tmp_path, edit, where, message):
    two_losses(tmp_path)
    lines = check_lines(run_cli, tmp_path, edit(TWO_LOSSES))
    assert len(lines) == 1, lines
    assert f"bad.yaml:{where}: " in lines[0] and message in lines[0], lines


def test_every_missing_key_and_a_short_array_each_get_a_line(run_cli, tmp_path):
    spec, arrays = two_losses(tmp_path)
    np.savez(tmp_path / "two.npz", a=arrays["a"], bee=arrays["bee"][:5], label=arrays["label"])
    lines = check_lines(run_cli, tmp_path, TWO_LOSSES)
    assert len(lines) == 2, lines  # the missing key, and the short array beside it
    assert any("no array 'v' in the file" in line for line in lines), lines
    assert any("key 'bee': holds 5 examples" in line for line in lines), lines
    np.savez(tmp_path / "two.npz", a=arrays["a"], bee=arrays["bee"][:5], label=arrays["label"],
             v=arrays["v"])
    lines = check_lines(run_cli, tmp_path, TWO_LOSSES)
    assert len(lines) == 1 and "key 'bee': holds 5 examples; expected 16, as many as 'a'" in lines[0], lines
    np.savez(tmp_path / "two.npz", x=arrays["a"])
    lines = check_lines(run_cli, tmp_path, TWO_LOSSES)
    assert len(lines) == 4, lines  # a, bee, label, v
    assert all("two.npz: no array" in line for line in lines)


# -- the CLI end to end ---------------------------------------------------------------------------
def test_the_shipped_two_output_model_through_the_cli(run_cli, tmp_path):
    """check shows the inputs and outputs; train records each output's loss and metrics, and
    early stopping watches one of them; eval gates on per-output metrics and against a baseline;
    predict writes each output under its key; the API predicts a mapping."""
    result = run_cli("check", MULTI)
    assert result.exit_code == 0, result.stderr
    assert "input   image" in result.output and "output  ink      ink_fraction" in result.output
    run = tmp_path / "run"
    result = run_cli("train", MULTI, "--run-dir", run, "--epochs", "3", "--quiet",
                     "--set", "train.early_stopping={monitor: val_digit_accuracy, patience: 5}")
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert list(records[0])[:12] == ["epoch", "loss", "digit_loss", "digit_accuracy", "ink_loss",
                                     "ink_mae", "ink_r2", "val_loss", "val_digit_loss",
                                     "val_digit_accuracy", "val_ink_loss", "val_ink_mae"]
    for r in records:
        assert r["loss"] == pytest.approx(r["digit_loss"] + 20 * r["ink_loss"], rel=1e-6)  # float32

    result = run_cli("eval", run, "--fail-under", "digit_accuracy=0.5", "--fail-over", "ink_mae=0.5")
    assert result.exit_code == 0, result.stderr
    result = run_cli("eval", run, "--fail-under", "ink_r2=1.1")
    assert result.exit_code == 3 and "ink_r2" in result.stderr
    result = run_cli("eval", run, "--fail-under", "accuracy=0.5")
    assert result.exit_code == 2 and "digit_accuracy" in result.stderr
    result = run_cli("eval", run, "--baseline", run, "--format", "json")
    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.output)["baseline"]["comparison"]
    assert [r["metric"] for r in rows][:3] == ["loss", "digit_loss", "digit_accuracy"]
    assert all(r["change"] == 0 for r in rows)
    result = run_cli("eval", run, "--confusion")
    assert result.exit_code == 0 and "digit:" in result.output

    test = CONFIGS / "data" / "digits-multi-test.npz"
    result = run_cli("predict", run, "--data", test, "--out", tmp_path / "p.npz")
    assert result.exit_code == 0, result.stderr
    assert "digit of shape (360, 10), ink of shape (360, 1)" in result.output
    with np.load(tmp_path / "p.npz") as p, np.load(test) as d:
        assert sorted(p.files) == ["digit", "ink"]
        model = netbuild.load_model(run)
        ours = model.predict({"image": d["image"], "profile": d["profile"]})
        assert sorted(ours) == ["digit", "ink"]
        np.testing.assert_array_equal(ours["digit"], p["digit"])
        np.testing.assert_array_equal(ours["ink"], p["ink"])
        scores = model.evaluate({"image": d["image"], "profile": d["profile"]},
                                {"digit": d["digit"], "ink": d["ink"]})
        assert scores["digit_accuracy"] == pytest.approx(
            float(np.mean(p["digit"].argmax(1) == d["digit"])))
    assert model.input_shapes == {"image": (1, 8, 8), "profile": (16,)}
    assert model.output_shapes == {"digit": (10,), "ink": (1,)}


def test_one_output_in_the_long_form_is_named_everywhere(run_cli, tmp_path):
    """A long-form model of one output: predict writes its key, the API returns a mapping, the
    ONNX graph's output has its name; eval --baseline pairs it with the shorthand model it was
    written out from, whatever the names."""
    spec = netbuild.load_spec(CONFIGS / "digits-mlp.yaml", overrides=["train.epochs=1"])
    longer = long_form(spec)
    longer.data["model"]["outputs"]["out"]["key"] = "y"
    short_run = netbuild.train(spec, tmp_path / "short", overwrite=True)
    long_run = netbuild.train(longer, tmp_path / "long", overwrite=True)
    test = CONFIGS / "data" / "digits-test.npz"
    result = run_cli("predict", tmp_path / "long", "--data", test, "--out", tmp_path / "p.npz")
    assert result.exit_code == 0 and "wrote" in result.output and "y of shape (360, 10)" in result.output
    with np.load(test) as d:
        got = long_run.model.predict(d["x"])
        assert list(got) == ["out"]
        np.testing.assert_array_equal(got["out"], short_run.model.predict(d["x"]))
    exported = long_run.model.export_onnx(tmp_path / "m.onnx")
    import onnx

    graph = onnx.load(str(exported.path)).graph
    assert [i.name for i in graph.input] == ["input"] and [o.name for o in graph.output] == ["out"]
    result = run_cli("eval", tmp_path / "long", "--baseline", tmp_path / "short", "--format", "json")
    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.output)["baseline"]["comparison"]
    assert [r["metric"] for r in rows] == ["loss", "out_loss", "out_accuracy"]
    assert all(r["change"] == 0 for r in rows)  # the same bits: the same model
    result = run_cli("eval", tmp_path / "short", "--baseline", tmp_path / "long", "--format", "json")
    assert result.exit_code == 0, result.stderr
    assert [r["metric"] for r in json.loads(result.output)["baseline"]["comparison"]] == ["loss", "accuracy"]


def test_an_onnx_name_clash_is_located(run_cli, tmp_path):
    """An input named y beside the shorthand's one output (the graph's y)."""
    spec, arrays = two_losses(tmp_path)
    data = copy.deepcopy(spec.data)
    data["model"]["inputs"] = {"y": {"shape": [4], "key": "a"}}
    data["model"]["layers"] = [{"type": "dense", "units": 3, "activation": "softmax", "inputs": ["y"]}]
    del data["model"]["outputs"]
    data["train"]["loss"] = "categorical_crossentropy"
    spec.data = data
    model = Model(validate(spec), Network.from_spec(validate(spec)), "m")
    with pytest.raises(netbuild.SpecError, match=r"model.inputs.y: 'y' would name both an input and "
                                                 r"an output of the ONNX graph"):
        model.export_onnx(tmp_path / "m.onnx")


def test_the_api_names_a_missing_or_unknown_input(tmp_path):
    spec, arrays = two_losses(tmp_path)
    model = Model(spec, Network.from_spec(spec), "m")
    with pytest.raises(netbuild.DataError, match=r"x: has no input b; expected the inputs a, b"):
        model.predict({"a": arrays["a"]})
    with pytest.raises(netbuild.DataError, match="x: is one array; expected a mapping from each "
                                                 r"input's name \(a, b\) to its array"):
        model.predict(arrays["a"])
    with pytest.raises(netbuild.DataError, match=r"x\['b'\]: has examples of shape \(2,\)"):
        model.predict({"a": arrays["a"], "b": arrays["bee"][:, :2]})
    with pytest.raises(netbuild.DataError, match=r"x: has unknown inputs c; expected the inputs a, b"):
        model.predict({"a": arrays["a"], "b": arrays["bee"], "c": arrays["a"]})
    with pytest.raises(netbuild.DataError, match=r"x: is a list of 3 arrays; expected 2 \(a, b\)"):
        model.predict([arrays["a"], arrays["bee"], arrays["a"]])
    import types

    got = model.predict(types.MappingProxyType({"a": arrays["a"], "b": arrays["bee"]}))
    assert sorted(got) == ["label", "value"]


def test_a_sweep_and_compare_address_an_outputs_metrics_by_name(run_cli, tmp_path):
    """A grid over an output's loss_weight ranked by val_digit_accuracy (higher first); a
    monitor the outputs do not record is a usage error naming those they do; compare lists the
    per-output keys."""
    out = tmp_path / "sweep"
    result = run_cli("sweep", MULTI, "--grid", "model.outputs.ink.loss_weight=1,20",
                     "--set", "train.epochs=1", "--monitor", "val_digit_accuracy",
                     "--workers", "1", "--sweep-dir", out)
    assert result.exit_code == 0, result.stderr
    state = json.loads((out / "sweep.json").read_text())
    assert state["monitor"] == "val_digit_accuracy" and state["mode"] == "max"
    rows = (out / "summary.csv").read_text().splitlines()
    assert "best_val_digit_accuracy" in rows[0] and len(rows) == 3
    result = run_cli("sweep", MULTI, "--grid", "model.outputs.ink.loss_weight=1,20",
                     "--monitor", "val_accuracy", "--sweep-dir", tmp_path / "other")
    assert result.exit_code == 2
    assert "'val_accuracy' is not recorded by this run" in result.stderr
    assert "val_digit_accuracy" in result.stderr

    points = sorted(p for p in out.iterdir() if (p / "metrics.jsonl").exists())
    result = run_cli("compare", *points, "--format", "json")
    assert result.exit_code == 0, result.stderr
    compared = json.loads(result.output)
    assert {"digit_accuracy", "ink_r2", "ink_loss"} <= set(compared["metrics"])


def test_the_readme_shows_the_shipped_configs_model():
    """The README's block under "Several inputs and outputs" is digits-multi's model section."""
    import re

    import yaml
    from conftest import ROOT

    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Several inputs and outputs"):]
    block = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    shown = yaml.safe_load(block)
    config = yaml.safe_load(MULTI.read_text())
    assert shown["model"] == config["model"]
    assert shown["train"]["optimizer"] == config["train"]["optimizer"]
