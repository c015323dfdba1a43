"""The command line: parse arguments, call one plain function, print, map errors to exit codes.

Exit codes: 0 success, 1 a spec, data or run error (one located line per problem, never a
traceback), 2 a command-line usage error, 3 a quality gate not met.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from . import __version__, report
from .errors import NetbuildError


def _fail(lines: list[str], code: int) -> None:
    for line in lines:
        click.echo(line, err=True)
    sys.exit(code)


def handles_errors(fn):
    """Turn a user's mistake into its located lines on stderr and the error's exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except NetbuildError as exc:
            _fail(exc.lines(), exc.exit_code)
        except KeyboardInterrupt:
            _fail(["interrupted"], 130)

    return wrapper


set_option = click.option("--set", "overrides", multiple=True, metavar="PATH=VALUE",
                          help="Override a spec value, e.g. train.optimizer.learning_rate=0.01 "
                               "or model.layers[0].units=64 (repeatable).")
format_option = click.option("--format", "fmt", type=click.Choice(["text", "json"]),
                             default="text", show_default=True, help="Output format.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="netbuild")
def cli() -> None:
    """netbuild: declare a network in YAML; check, train, evaluate and predict."""


@cli.command()
@click.argument("spec", metavar="SPEC")
@set_option
@format_option
@click.option("--no-data", is_flag=True, help="Check the spec and shapes only, not the data files.")
@handles_errors
def check(spec: str, overrides, fmt: str, no_data: bool) -> None:
    """Validate SPEC and its data; print each layer's output shape and parameter count."""
    from .check import check as run_check
    from .errors import SpecError, format_path

    try:
        resolved, network = run_check(spec, overrides, with_data=not no_data)
    except SpecError as exc:
        if fmt != "json":
            raise
        click.echo(json.dumps({"ok": False, "errors": [
            {"file": i.location.source if i.location else None,
             "line": i.location.line if i.location else None,
             "column": i.location.column if i.location else None,
             "path": format_path(i.path), "message": i.message} for i in exc.issues]}, indent=2))
        sys.exit(exc.exit_code)
    rows = network.summary()
    if fmt == "json":
        click.echo(json.dumps({"ok": True, "name": resolved.data["name"], "layers": rows,
                               "total_params": network.n_params(),
                               "output_shape": list(network.output_shape)}, indent=2))
        return
    click.echo(f"{spec}: ok")
    click.echo(report.layer_table(rows, network.n_params()))


@cli.command()
@click.argument("spec", metavar="SPEC")
@set_option
@click.option("--run-dir", type=click.Path(file_okay=False), default=None,
              help="Where to write the run (default: runs/<name>).")
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="Override train.epochs.")
@click.option("--overwrite", is_flag=True, help="Replace the files of an existing run directory.")
@click.option("--quiet", "-q", is_flag=True, help="Print nothing but errors.")
@handles_errors
def train(spec: str, overrides, run_dir: str | None, epochs: int | None, overwrite: bool,
          quiet: bool) -> None:
    """Train the network of SPEC; write spec.yaml, metrics.jsonl and model.npz."""
    from .check import load_spec
    from .runs import RunDir
    from .train import train as run_training

    resolved = load_spec(spec, overrides)
    total = epochs or int(resolved.data["train"]["epochs"])
    target = RunDir(run_dir or Path("runs") / resolved.data["name"])
    target.create(overwrite=overwrite)
    say = (lambda *_: None) if quiet else click.echo
    say(f"training {resolved.data['name']} into {target.path}")
    say("compiling the training function ...")
    run_training(resolved, target, epochs=epochs,
                 on_compiled=lambda s: say(f"compiled in {s:.1f} s"),
                 on_epoch=lambda r: say(report.epoch_line(r, total)))
    say(f"saved {target.path / 'model.npz'}")


@cli.command(name="eval")
@click.argument("model", metavar="MODEL")
@click.option("--data", "data_file", type=click.Path(dir_okay=False), default=None,
              help="An .npz file to evaluate on (default: the spec's data.test).")
@format_option
@handles_errors
def eval_command(model: str, data_file: str | None, fmt: str) -> None:
    """Evaluate MODEL (a run directory or model.npz): loss and metrics."""
    from .evaluate import evaluate

    result = evaluate(model, data_file)
    if fmt == "json":
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(f"{result['data']}: {result['examples']} examples")
    click.echo(report.metrics_table(result["metrics"]))


@cli.command()
@click.argument("model", metavar="MODEL")
@click.option("--data", "data_file", required=True, type=click.Path(dir_okay=False),
              help="An .npz file with the inputs under the spec's x_key.")
@click.option("--out", "out_file", required=True, type=click.Path(dir_okay=False),
              help="Where to write the outputs (.npz, key y).")
@handles_errors
def predict(model: str, data_file: str, out_file: str) -> None:
    """Run MODEL on the inputs of --data and write its outputs to --out."""
    from .evaluate import predict as run_predict

    result = run_predict(model, data_file, out_file)
    click.echo(f"wrote {result['out']}: y of shape {report.shape(result['output_shape'])}")


@cli.command()
def schema() -> None:
    """Print the JSON Schema of a spec (for editors and other tools)."""
    from .spec import schema as get_schema

    click.echo(json.dumps(get_schema(), indent=2))


def main() -> None:
    cli(prog_name="netbuild")
