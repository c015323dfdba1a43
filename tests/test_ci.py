"""netbuild in CI, through the real CLI: GitHub annotations on the spec's lines, JUnit reports,
a gate against a baseline model, and run comparison."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
import xmlschema
from conftest import CONFIGS, ROOT, SPECS

from netbuild.report import github

MLP = CONFIGS / "digits-mlp.yaml"
INVALID = sorted((SPECS / "invalid").glob("*.yaml"))
JUNIT = xmlschema.XMLSchema(str(ROOT / "tests" / "schemas" / "junit.xsd"))
LOCATED = re.compile(r"^(?P<file>.+?):(?P<line>\d+):(?P<col>\d+): (?P<message>.*)$")


def annotation(line: str) -> dict:
    """``::error file=F,line=L,col=C,title=T::message`` -> its properties and message, unescaped."""
    match = re.fullmatch(r"::error (?P<props>[^:]*)::(?P<message>.*)", line)
    assert match, line

    def unescape(text):
        for code, char in (("%3A", ":"), ("%2C", ","), ("%0D", "\r"), ("%0A", "\n"), ("%25", "%")):
            text = text.replace(code, char)
        return text

    props = dict(p.split("=", 1) for p in match["props"].split(","))
    return {**{k: unescape(v) for k, v in props.items()}, "message": unescape(match["message"])}


# -- annotations ------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", INVALID, ids=[p.stem for p in INVALID])
def test_every_invalid_spec_is_annotated_on_its_lines(path, run_cli):
    """Each line `check` prints, ``FILE:LINE:COL: message``, is one annotation with that file,
    line and column; the exit code is the same."""
    text = run_cli("check", path)
    annotated = run_cli("check", path, "--format", "github")
    assert annotated.exit_code == text.exit_code == 1
    wanted = text.stderr.splitlines()
    got = [annotation(line) for line in annotated.stdout.splitlines()]
    assert len(got) == len(wanted) and annotated.stderr == ""
    for line, note in zip(wanted, got):
        assert note["title"] == "netbuild"
        located = LOCATED.match(line)
        if located:
            assert (note["file"], note["line"], note["col"]) == \
                (located["file"], located["line"], located["col"])
            assert note["message"] == located["message"]
        else:  # a problem with the file as a whole (empty, not YAML...): the file, no line
            assert line.endswith(note["message"]) and "line" not in note


def test_messages_and_properties_are_escaped():
    line = github.error("50% of\nthe rows\r", file="dir,a:b.yaml", line=3, col=4, title="t:1,2")
    assert line == "::error file=dir%2Ca%3Ab.yaml,line=3,col=4,title=t%3A1%2C2::50%25 of%0Athe rows%0D"
    assert annotation(line)["message"] == "50% of\nthe rows\r"


def test_a_spec_with_a_percent_and_a_newline_in_a_value(tmp_path, run_cli):
    spec = tmp_path / "odd.yaml"
    spec.write_text(MLP.read_text().replace("activation: relu", 'activation: "re%lu\\nx"'))
    result = run_cli("check", spec, "--format", "github")
    assert result.exit_code == 1
    (line,) = result.stdout.splitlines()
    note = annotation(line)
    assert note["file"] == str(spec) and note["line"] == "14"
    assert "unknown value 're%lu\\nx'" in note["message"] or "re%lu" in note["message"]


def test_github_actions_without_format_says_so_and_keeps_text(run_cli, monkeypatch):
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    result = run_cli("check", MLP, "--no-data")
    lines = result.stdout.splitlines()
    assert result.exit_code == 0
    assert lines[0] == ("GITHUB_ACTIONS is set: printing text; pass --format github for annotations "
                        "on the specs' lines")
    assert lines[1] == f"{MLP}: ok"
    assert run_cli("check", MLP, "--no-data", "--format", "text").stdout.splitlines()[0] == f"{MLP}: ok"
    monkeypatch.delenv("GITHUB_ACTIONS")
    assert run_cli("check", MLP, "--no-data").stdout.splitlines()[0] == f"{MLP}: ok"


def test_train_and_sweep_annotate_their_mistakes(tmp_path, run_cli):
    bad = SPECS / "invalid" / "missing-data-file.yaml"
    text = run_cli("train", bad, "--run-dir", tmp_path / "a")
    result = run_cli("train", bad, "--run-dir", tmp_path / "b", "--format", "github")
    assert result.exit_code == text.exit_code == 1
    (note,) = [annotation(line) for line in result.stdout.splitlines() if line.startswith("::")]
    located = LOCATED.match(text.stderr.strip())
    assert (note["file"], note["line"], note["col"]) == (located["file"], located["line"], located["col"])
    result = run_cli("sweep", MLP, "--grid", "model.layers[0].units=8,-5", "--sweep-dir",
                     tmp_path / "s", "--format", "github")
    assert result.exit_code == 1
    notes = [annotation(line) for line in result.stdout.splitlines() if line.startswith("::")]
    assert notes and all(n["title"] == "netbuild" for n in notes)
    assert any("-5 is less than the minimum of 1" in n["message"] for n in notes)


# -- several specs, JUnit -----------------------------------------------------------------------------
def junit_cases(path) -> list[tuple[str, str | None]]:
    """Validate ``path`` against the JUnit schema; ``[(case name, failure message or None)]``."""
    JUNIT.validate(str(path))
    root = ET.parse(path).getroot()
    suite = root.find("testsuite")
    cases = [(c.get("name"), c.find("failure").get("message") if c.find("failure") is not None else None)
             for c in suite.findall("testcase")]
    assert int(suite.get("tests")) == int(root.get("tests")) == len(cases)
    assert int(suite.get("failures")) == int(root.get("failures")) == sum(f is not None for _, f in cases)
    return cases


def test_check_several_specs_into_one_junit_report(tmp_path, run_cli):
    specs = [MLP, SPECS / "invalid" / "negative-units.yaml", CONFIGS / "digits-cnn.yaml",
             SPECS / "invalid" / "many-errors.yaml"]
    report = tmp_path / "check.xml"
    result = run_cli("check", *specs, "--no-data", "--junit", report)
    assert result.exit_code == 1
    assert result.stdout.count(": ok\n") == 2
    cases = junit_cases(report)
    assert [name for name, _ in cases] == [str(s) for s in specs]
    assert [f is None for _, f in cases] == [True, False, True, False]
    assert cases[1][1] == ("tests/specs/invalid/negative-units.yaml:8:28: model.layers[1].units: -5 is "
                           "less than the minimum of 1").replace("tests/specs/invalid/", f"{SPECS}/invalid/")
    # a later run replaces its own report, but never another file
    assert run_cli("check", MLP, "--no-data", "--junit", report).exit_code == 0
    assert junit_cases(report) == [(str(MLP), None)]
    mine = tmp_path / "notes.xml"
    mine.write_text("<notes/>")
    result = run_cli("check", MLP, "--no-data", "--junit", mine)
    assert result.exit_code == 1 and mine.read_text() == "<notes/>"
    assert result.stderr.strip() == (f"{mine}: exists and is not a JUnit report; expected a new file "
                                     "(or a report netbuild wrote, which it replaces)")


def test_check_json_for_several_specs_is_a_list(run_cli):
    one = json.loads(run_cli("check", MLP, "--no-data", "--format", "json").stdout)
    assert one["ok"] is True and one["spec"] == str(MLP)
    both = json.loads(run_cli("check", MLP, SPECS / "invalid" / "negative-units.yaml", "--no-data",
                              "--format", "json").stdout)
    assert [d["ok"] for d in both] == [True, False]
    assert both[1]["errors"][0]["line"] == 8


# -- the baseline gate --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A weak model (1 epoch) and a better one (4 epochs) of the digits MLP, and a regression
    model whose inputs do not fit the digits."""
    from click.testing import CliRunner

    from netbuild.cli import cli

    root = tmp_path_factory.mktemp("models")
    out = {}
    for name, spec, epochs in (("weak", MLP, 1), ("good", MLP, 4),
                               ("other", CONFIGS / "diabetes-regression.yaml", 1)):
        result = CliRunner().invoke(cli, ["train", str(spec), "--epochs", str(epochs), "--run-dir",
                                          str(root / name), "-q"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        out[name] = root / name
    return out


def eval_json(run_cli, *args) -> tuple[int, dict]:
    result = run_cli("eval", *args, "--format", "json")
    return result.exit_code, json.loads(result.stdout)


def test_an_equal_model_passes(models, run_cli):
    code, result = eval_json(run_cli, models["good"], "--baseline", models["good"])
    assert code == 0
    assert all(r["change"] == 0 and r["passed"] for r in result["baseline"]["comparison"])
    assert result["baseline"]["metrics"] == result["metrics"]


def test_a_worse_model_fails_in_each_metrics_direction(models, run_cli, tmp_path):
    weak, good = models["weak"], models["good"]
    code, result = eval_json(run_cli, weak, "--baseline", good)
    assert code == 3
    rows = {r["metric"]: r for r in result["baseline"]["comparison"]}
    assert rows["loss"]["better"] == "lower" and rows["loss"]["change"] > 0 and not rows["loss"]["passed"]
    assert rows["accuracy"]["better"] == "higher" and rows["accuracy"]["change"] < 0
    assert not rows["accuracy"]["passed"]
    # each direction alone: the loss (lower is better) with accuracy allowed, and the other way
    drop = rows["accuracy"]["worse_by"]
    assert run_cli("eval", weak, "--baseline", good, "--max-drop", f"accuracy={drop * 2}").exit_code == 3
    assert run_cli("eval", weak, "--baseline", good, "--max-drop", f"loss={rows['loss']['worse_by'] * 2}",
                   ).exit_code == 3
    # within the allowed drops
    result = run_cli("eval", weak, "--baseline", good, "--max-drop", f"accuracy={drop * 2}",
                     "--max-drop", f"loss={rows['loss']['worse_by'] * 2}")
    assert result.exit_code == 0, result.output
    # a better model than its baseline passes; the table shows both
    result = run_cli("eval", good, "--baseline", weak)
    assert result.exit_code == 0
    header = result.stdout.splitlines()[1].split()
    assert header == ["metric", "model", "baseline", "change", "better", "max", "drop", "gate"]


def test_a_failed_baseline_gate_in_github_and_junit(models, run_cli, tmp_path):
    report = tmp_path / "eval.xml"
    result = run_cli("eval", models["weak"], "--baseline", models["good"], "--max-drop", "loss=100",
                     "--fail-under", "accuracy=0.5", "--format", "github", "--junit", report)
    assert result.exit_code == 3
    notes = [annotation(line) for line in result.stdout.splitlines() if line.startswith("::")]
    assert [n["title"] for n in notes] == ["netbuild gate"]
    assert notes[0]["message"].startswith("accuracy ") and "worse than the baseline's" in notes[0]["message"]
    cases = junit_cases(report)
    assert [name for name, _ in cases] == [
        "accuracy >= 0.5 (--fail-under)", f"loss against the baseline {models['good']}",
        f"accuracy against the baseline {models['good']}"]
    assert [f is None for _, f in cases] == [True, True, False]


def test_a_baseline_that_does_not_fit_the_data(models, run_cli):
    result = run_cli("eval", models["good"], "--baseline", models["other"])
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        f"{models['other']}: the baseline does not fit the data the model is evaluated on: "
        "configs/data/digits-test.npz: has examples of shape (64,); expected (10,) to fit "
        "model.input_shape (or 10 values per example)"]


def test_max_drop_needs_a_baseline_and_known_metrics(models, run_cli):
    result = run_cli("eval", models["good"], "--max-drop", "accuracy=0.1")
    assert result.exit_code == 2 and "--max-drop sets what --baseline allows" in result.stderr
    result = run_cli("eval", models["good"], "--baseline", models["weak"], "--max-drop", "acc=0.1")
    assert result.exit_code == 2 and "'acc' is not a metric of this model" in result.stderr
    result = run_cli("eval", models["good"], "--baseline", models["weak"], "--max-drop", "loss=-1")
    assert result.exit_code == 2 and "the allowed change must be 0 or more" in result.stderr


# -- compare ------------------------------------------------------------------------------------------
def test_compare_three_runs_of_a_sweep(tmp_path, run_cli):
    from netbuild import compare as comparing

    out = tmp_path / "sweep"
    result = run_cli("sweep", MLP, "--grid", "train.optimizer.learning_rate=0.001,0.01",
                     "--grid", "model.layers[0].units=16,32", "--random", "3", "--set",
                     "train.epochs=2", "--sweep-dir", out, "--workers", "1", "-q")
    assert result.exit_code == 0, result.output
    runs = sorted(p for p in out.iterdir() if (p / "metrics.jsonl").exists())
    assert len(runs) == 3
    result = comparing.compare(runs)
    swept = {"train.optimizer.learning_rate", "model.layers[0].units"}
    values = {key: {str(v) for v in vs} for key, vs in result.differing.items()}
    assert set(result.differing) <= swept and all(len(v) > 1 for v in values.values())
    assert set(result.differing) == {k for k in swept if len({_at(r, k) for r in runs}) > 1}
    figure = comparing.curves_figure(result)
    assert [ax.get_title() for ax in figure.axes] == ["loss", "accuracy", "val_loss", "val_accuracy"]
    assert all(len(ax.get_lines()) == 3 for ax in figure.axes)

    png = tmp_path / "compare.png"
    text = run_cli("compare", *runs, "--out", png)
    assert text.exit_code == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "spec keys that differ:" in text.stdout
    markdown = run_cli("compare", *runs, "--format", "markdown").stdout
    assert markdown.startswith("**netbuild compare**: 3 runs\n\n| run | epochs | loss: last / best @epoch |")
    assert "| train.optimizer.learning_rate |" in markdown or "| model.layers[0].units |" in markdown
    data = json.loads(run_cli("compare", *runs, "--format", "json").stdout)
    assert [r["epochs"] for r in data["runs"]] == [2, 2, 2]
    best = data["runs"][0]["metrics"]["val_accuracy"]
    history = [json.loads(line) for line in (runs[0] / "metrics.jsonl").read_text().splitlines()]
    assert best["best"] == max(r["val_accuracy"] for r in history) and best["last"] == history[-1]["val_accuracy"]
    assert run_cli("compare", *runs, "--out", png).exit_code == 1  # an existing picture is kept


def _at(run, key):
    import yaml

    spec = yaml.safe_load((run / "spec.yaml").read_text())
    return spec["train"]["optimizer"]["learning_rate"] if key.startswith("train") else \
        spec["model"]["layers"][0]["units"]


def test_compare_mistakes_are_one_line(tmp_path, run_cli):
    result = run_cli("compare", tmp_path / "nothing")
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [f"{tmp_path / 'nothing'}: not a folder; expected a run "
                                          "directory written by `netbuild train`"]
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "spec.yaml").write_text("name: x\n")
    result = run_cli("compare", tmp_path / "half")
    assert result.stderr.splitlines() == [f"{tmp_path / 'half'}: not a run directory (no "
                                          "metrics.jsonl); expected a folder written by `netbuild train`"]


# -- the shipped workflow -------------------------------------------------------------------------------
WORKFLOW = ROOT / "docs" / "netbuild-ci.yml"


def test_the_workflow_is_a_valid_github_workflow():
    """Against the GitHub workflow schema check-jsonschema vendors (offline)."""
    result = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema",
                             "vendor.github-workflows", str(WORKFLOW)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_docs_and_readme_show_the_workflow_as_shipped():
    text = WORKFLOW.read_text()
    for doc in (ROOT / "docs" / "ci.md", ROOT / "README.md"):
        assert f"```yaml\n{text}```" in doc.read_text(), doc


def test_the_workflows_netbuild_commands_are_real(run_cli):
    """Every `netbuild ...` command of the workflow parses (its options exist)."""
    import shlex

    from netbuild.cli import cli

    lines = [line.strip().removeprefix("run: ") for line in WORKFLOW.read_text().splitlines()]
    commands = [line for line in lines if line.startswith("netbuild ")]
    assert {c.split()[1] for c in commands} >= {"check", "train", "eval", "compare"}
    for command in commands:
        args = shlex.split(command.split(">")[0])[1:]
        name, *rest = args
        sub = cli.commands[name]
        ctx = sub.make_context(name, [a if "$" not in a and "*" not in a else "x" for a in rest],
                               resilient_parsing=True)
        assert ctx.params, command
