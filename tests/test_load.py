"""The YAML loader: locations, safety, duplicate keys, merges, and --set overrides."""

from __future__ import annotations

import pytest

from netbuild.errors import SpecError
from netbuild.spec import apply_overrides, load_text, validate
from netbuild.spec.load import parse_path

TEXT = """\
name: t
data: {train: a.npz}
model:
  input_shape: [4]
  layers:
    - {type: dense, units: 3}
train:
  loss: mse
  optimizer: {type: sgd}
"""


def test_locations_point_at_values_and_keys():
    spec = load_text(TEXT, "t.yaml")
    loc = spec.locate(("model", "layers", 0, "units"))
    assert (loc.source, loc.line, loc.column) == ("t.yaml", 6, 28)
    assert spec.locate(("model", "layers", 0, "units"), key=True).column == 21
    # a path with no node of its own falls back to its closest ancestor
    assert spec.locate(("model", "layers", 0, "missing")).line == 6


def test_duplicate_keys_are_errors():
    with pytest.raises(SpecError) as exc:
        load_text("a: 1\nb: 2\na: 3\n", "d.yaml")
    assert str(exc.value) == "d.yaml:3:1: a: duplicate key 'a' (first given at line 1)"


@pytest.mark.parametrize("tag", ["!!python/object/apply:os.system ['true']", "!!python/name:os.system",
                                 "!custom 3"])
def test_object_tags_are_refused(tag):
    with pytest.raises(SpecError) as exc:
        load_text(f"a: {tag}\n", "t.yaml")
    assert "is not allowed" in str(exc.value) and str(exc.value).startswith("t.yaml:1:4: a:")


def test_merge_keys_and_aliases():
    spec = load_text("base: &b {x: 1, y: 2}\nother:\n  <<: *b\n  y: 3\n", "m.yaml")
    assert spec.data == {"base": {"x": 1, "y": 2}, "other": {"x": 1, "y": 3}}


def test_recursive_alias_is_refused():
    with pytest.raises(SpecError, match="recursive"):
        load_text("a: &x [1, *x]\n", "r.yaml")


def laughs(levels: int = 9, width: int = 10) -> str:
    """A "billion laughs": each anchor a list of ``width`` aliases of the one before."""
    lines = ["a0: &a0 [" + ", ".join(["lol"] * width) + "]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]" for i in range(1, levels)]
    return "\n".join(lines) + f"\nname: *a{levels - 1}\n"


HOSTILE = {
    # about 10^9 values once expanded, from 1 KB of text
    "laughs.yaml": (laughs(), "6:10: $: the YAML holds more than 200,000 values once its aliases "
                              "are expanded"),
    "deep-lists.yaml": ("name: x\ndata: " + "[" * 100_000 + "]" * 100_000 + "\n",
                        "2:70: $: the YAML nests deeper than 64 levels"),
    "deep-mappings.yaml": ("name: x\n" + "".join(" " * i + f"k{i}:\n" for i in range(200)) + " " * 200 + "v: 1\n",
                           "66:65: $: the YAML nests deeper than 64 levels"),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_yaml_is_one_located_line_in_seconds(name, tmp_path):
    """`netbuild check` in a process of its own: exit 1, one located line, in seconds (the
    expanded laughs would take hours and hundreds of GiB; the deep lists overflowed Python's
    stack)."""
    import subprocess
    import sys
    import time

    text, message = HOSTILE[name]
    path = tmp_path / name
    path.write_text(text)
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "netbuild", "check", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=60)
    seconds = time.monotonic() - start
    assert proc.returncode == 1
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{path}:") and message in lines[0], lines
    assert seconds < 20, seconds  # the refusal itself takes milliseconds; the process ~1 s to start


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_yaml_peak_memory_is_bounded(name, tmp_path):
    """The peak resident memory of each refusal, measured by the kernel: under 300 MiB (the
    interpreter and netbuild's imports take about 100)."""
    from conftest import check_in_a_process

    path = tmp_path / name
    path.write_text(HOSTILE[name][0])
    code, peak, lines = check_in_a_process(path)
    assert code == 1 and len(lines) == 1, lines
    assert peak < 300 * 2**20, peak


def test_a_spec_file_too_large_is_refused_unread(tmp_path):
    """A 17 MiB file (sparse: nothing to read) is refused from its size."""
    from netbuild.spec import load_file

    path = tmp_path / "huge.yaml"
    with open(path, "wb") as f:
        f.truncate(17 * 2**20)
    with pytest.raises(SpecError, match=r"holds 17.0 MiB; expected a spec of at most 16 MiB"):
        load_file(path)
    with pytest.raises(SpecError, match=r"holds 17.0 MiB of text"):
        load_text("#" * (17 * 2**20), "t.yaml")


def test_several_documents_are_refused():
    with pytest.raises(SpecError, match="one YAML document"):
        load_text("a: 1\n---\nb: 2\n", "two.yaml")


@pytest.mark.parametrize("text,parts", [
    ("train.optimizer.learning_rate", ("train", "optimizer", "learning_rate")),
    ("model.layers[0].units", ("model", "layers", 0, "units")),
    ("model.layers[-1]", ("model", "layers", -1)),
    ("a..b", None), ("[0]x", None), ("", None), (".a", None), ("a b", None),
])
def test_parse_path(text, parts):
    assert parse_path(text) == parts


def test_set_overrides_apply_and_are_located():
    spec = load_text(TEXT, "t.yaml")
    out = apply_overrides(spec, ["model.layers[0].units=64", "train.optimizer.learning_rate=0.5"])
    assert out.data["model"]["layers"][0]["units"] == 64
    assert out.data["train"]["optimizer"]["learning_rate"] == 0.5
    assert spec.data["model"]["layers"][0]["units"] == 3  # the original is untouched
    with pytest.raises(SpecError) as exc:
        validate(apply_overrides(spec, ["model.layers[0].units=-5"]))
    assert str(exc.value) == ("--set model.layers[0].units=-5: model.layers[0].units: "
                              "-5 is less than the minimum of 1")


@pytest.mark.parametrize("arg,message", [
    ("nonsense", "expected PATH=VALUE"),
    ("a..b=1", "is not a path"),
    ("model.layers[5].units=1", "index 5 is out of range"),
    ("name.x=1", "cannot set 'x' inside a str"),
    ("seed=[1, 2", "cannot read the value"),
])
def test_bad_overrides_name_the_argument(arg, message):
    with pytest.raises(SpecError) as exc:
        apply_overrides(load_text(TEXT, "t.yaml"), [arg])
    assert str(exc.value).startswith(f"--set {arg}:") and message in str(exc.value)


def test_defaults_are_filled_per_layer_type():
    spec = validate(load_text(TEXT, "t.yaml"))
    layer = spec.data["model"]["layers"][0]
    assert layer["activation"] == "linear" and layer["use_bias"] is True
    assert spec.data["train"]["optimizer"] == {"type": "sgd", "learning_rate": 0.01, "momentum": 0,
                                               "nesterov": False}
    assert spec.data["seed"] == 0 and spec.data["train"]["batch_size"] == 32
