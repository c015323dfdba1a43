"""The command line: parse arguments, call one plain function, print, map errors to exit codes.

Exit codes: 0 success, 1 a spec, data or run error (one located line per problem, never a
traceback), 2 a command-line usage error, 3 a quality gate not met.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path

import click

from . import __version__, report
from .backend import BACKENDS
from .errors import NetbuildError, printable


def _fail(lines: list[str], code: int) -> None:
    for line in lines:  # a control character in a file name must not split a message
        click.echo(printable(line), err=True)
    sys.exit(code)


def _annotate(exc: NetbuildError) -> None:
    """A user's mistake as GitHub workflow commands on stdout (``--format github``)."""
    from .errors import ThresholdError
    from .report import github

    title = "netbuild gate" if isinstance(exc, ThresholdError) else github.TITLE
    for line in github.errors(exc, title):
        click.echo(line)


def handles_errors(fn):
    """Turn a user's mistake into its located lines on stderr (GitHub annotations on stdout with
    ``--format github``) and the error's exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with _scan_progress():
                return fn(*args, **kwargs)
        except NetbuildError as exc:
            if kwargs.get("fmt") == "github":
                _annotate(exc)
                sys.exit(exc.exit_code)
            _fail(exc.lines(), exc.exit_code)
        except KeyboardInterrupt:
            _fail(["interrupted"], 130)

    return wrapper


def _scan_progress():
    """A progress line on stderr, when it is a terminal, while a large data file is checked
    (its CRC-32, decompression, value scan: :mod:`netbuild.scans`); the line is cleared at the
    end of each, and on the way out if a pass was cut short (an error, Ctrl-C)."""
    import contextlib

    from . import scans
    from .npz import size_text

    if not sys.stderr.isatty():
        return contextlib.nullcontext()
    drawn = False

    def hook(what: str, done: int, total: int) -> None:
        nonlocal drawn
        drawn = done < total
        click.echo(f"\r{printable(what)}: {100 * done // total}% of {size_text(total)}" if drawn
                   else "\r\033[K", err=True, nl=False)

    @contextlib.contextmanager
    def reporting():
        try:
            with scans.reporting(hook):
                yield
        finally:
            if drawn:
                click.echo("\r\033[K", err=True, nl=False)

    return reporting()


set_option = click.option("--set", "overrides", multiple=True, metavar="PATH=VALUE",
                          help="Override a spec value, e.g. train.optimizer.learning_rate=0.01 "
                               "or model.layers[0].units=64 (repeatable).")
threads_option = click.option("--threads", type=click.IntRange(min=1), default=None, metavar="N",
                              help="Threads to compute with (default: NETBUILD_THREADS, else every "
                                   "core this process may run on; never more than those cores).")


track_option = click.option("--track", type=click.Choice(["mlflow", "none"]), default=None,
                            help="Log the runs to MLflow (parameters, per-epoch metrics, model files); "
                                 "none: not even when the spec's tracking section asks (default: as "
                                 "the spec says).")


def _tracking(spec, option: str | None, beside: Path):
    """The run's tracking (:class:`netbuild.tracking.Tracking`), or None; a tracking store that
    cannot be reached is one line on stderr, and the run goes on untracked."""
    from .tracking import Tracking

    tracking = Tracking.resolve(spec, option, beside)
    if tracking is None:
        return None
    problem = tracking.reach()
    if problem:
        click.echo(printable(problem), err=True)
        return None
    return tracking


backend_option = click.option("--backend", type=click.Choice(BACKENDS), default=None,
                              help="Compile with PyTensor's C backend (c) or through JAX (jax: "
                                   "jax.jit, on a GPU where JAX has one; needs netbuild[jax]); "
                                   "default: NETBUILD_BACKEND, else c.")


def _use_backend(requested: str | None) -> str:
    """Compile with ``--backend`` (or NETBUILD_BACKEND, else c) from here on: a bad
    NETBUILD_BACKEND is one line, exit 2; JAX missing is one line, exit 1."""
    from . import backend

    return backend.use(backend.resolve(requested))


def _use_threads(requested: int | None) -> int:
    """Compute with ``--threads`` (or the default) from here on; a bad NETBUILD_THREADS is one
    line, exit 2."""
    from . import threads

    return threads.apply(threads.resolve(requested))



class _Group(click.Group):
    """Click's group, with control characters escaped in its usage errors too: a value with a
    newline, quoted in "Error: Invalid value ...", must not split that line."""

    def make_context(self, *args, **kwargs):
        try:
            return super().make_context(*args, **kwargs)
        except click.ClickException as exc:
            exc.message = printable(exc.message)
            raise

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.ClickException as exc:
            exc.message = printable(exc.message)
            raise


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="netbuild")
def cli() -> None:
    """netbuild: declare a network in YAML; check, train, evaluate and predict."""


def _format_option(*choices: str, default: str | None = "text"):
    return click.option("--format", "fmt", type=click.Choice(list(choices)), default=default,
                        show_default=default is not None,
                        help="Output format (github: every located problem and failed gate a "
                             "GitHub Actions ::error annotation)." if "github" in choices
                        else "Output format.")


junit_option = click.option("--junit", "junit_file", type=click.Path(dir_okay=False), default=None,
                            metavar="FILE.xml",
                            help="Also write a JUnit XML report (replacing an earlier report).")


@cli.command()
@click.argument("specs", metavar="SPEC...", nargs=-1, required=True)
@set_option
@_format_option("text", "json", "github", default=None)
@click.option("--no-data", is_flag=True, help="Check the spec and shapes only, not the data files.")
@junit_option
@handles_errors
def check(specs: tuple[str, ...], overrides, fmt: str | None, no_data: bool,
          junit_file: str | None) -> None:
    """Validate each SPEC and its data; print each layer's output shape and parameter count.
    Exit 1 when any SPEC has a mistake (each is checked)."""
    import os

    from . import api
    from .errors import SpecError, format_path
    from .report import github, junit

    if fmt is None:
        fmt = "text"
        if os.environ.get("GITHUB_ACTIONS") == "true":
            click.echo("GITHUB_ACTIONS is set: printing text; pass --format github for annotations "
                       "on the specs' lines")
    results, cases = [], []
    for spec in specs:
        start = time.perf_counter()
        try:
            results.append((spec, api.check(api.load_spec(spec, overrides), data=not no_data), None))
        except NetbuildError as exc:
            results.append((spec, None, exc))
        summary, exc = results[-1][1:]
        cases.append(junit.Case(spec, "netbuild.check", None if exc is None else exc.lines()[0],
                                "" if exc is None else "\n".join(exc.lines()),
                                time.perf_counter() - start))
    if fmt == "json":
        docs = []
        for spec, summary, exc in results:
            if exc is None:
                docs.append({"spec": spec, "ok": True, "name": summary.name, "layers": summary.layers,
                             "total_params": summary.total_params,
                             "output_shape": None if summary.output_shape is None
                             else list(summary.output_shape),
                             "inputs": summary.inputs, "outputs": summary.outputs})
            elif isinstance(exc, SpecError):
                docs.append({"spec": spec, "ok": False, "errors": [
                    {"file": i.location.source if i.location else None,
                     "line": i.location.line if i.location else None,
                     "column": i.location.column if i.location else None,
                     "path": format_path(i.path), "message": i.message} for i in exc.issues]})
            else:
                docs.append({"spec": spec, "ok": False, "errors": [
                    {"file": None, "line": None, "column": None, "path": None, "message": line}
                    for line in exc.lines()]})
        click.echo(json.dumps(docs[0] if len(docs) == 1 else docs, indent=2))
    else:
        for spec, summary, exc in results:
            if exc is None:
                click.echo(f"{spec}: ok")
                click.echo(report.layer_table(summary.layers, summary.total_params))
                if summary.long_form:
                    click.echo(report.io_table(summary.inputs, summary.outputs))
            elif fmt == "github":
                for line in github.errors(exc):
                    click.echo(line)
            else:
                for line in exc.lines():
                    click.echo(printable(line), err=True)
    if junit_file:
        junit.write(junit_file, "netbuild check", cases, sum(c.seconds for c in cases))
    codes = [exc.exit_code for _, _, exc in results if exc is not None]
    if codes:
        sys.exit(max(codes))


@cli.command()
@click.argument("spec", metavar="SPEC", required=False)
@set_option
@click.option("--run-dir", type=click.Path(file_okay=False), default=None,
              help="Where to write the run (default: runs/<name>).")
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="Override train.epochs (with --resume: train up to this many).")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False), default=None,
              help="Continue the run in this directory from its last checkpoint.")
@click.option("--force", is_flag=True, help="With --resume: continue even if SPEC differs from the run's.")
@click.option("--overwrite", is_flag=True, help="Replace the files of an existing run directory.")
@click.option("--quiet", "-q", is_flag=True, help="Print nothing but errors.")
@_format_option("text", "github")
@threads_option
@backend_option
@track_option
@click.pass_context
@handles_errors
def train(ctx: click.Context, spec: str | None, overrides, run_dir: str | None, epochs: int | None,
          resume_dir: str | None, force: bool, overwrite: bool, quiet: bool, fmt: str,
          threads: int | None, backend: str | None, track: str | None) -> None:
    """Train the network of SPEC; write spec.yaml, metrics.jsonl, model.npz, checkpoint.npz and
    curves.png into the run directory."""
    from . import api

    if spec is None and resume_dir is None:
        raise click.UsageError("give SPEC, or --resume DIR to continue a run", ctx)
    if resume_dir and (run_dir or overwrite):
        raise click.UsageError("--resume continues its own directory; drop --run-dir/--overwrite", ctx)
    n_threads = _use_threads(threads)
    _use_backend(backend)
    resolved = api.load_spec(spec, overrides) if spec else None
    target = Path(resume_dir or run_dir or Path("runs") / resolved.data["name"])
    tracked_spec = resolved if resolved is not None else _stored_spec(target)
    logged = _tracking(tracked_spec, track, target.parent) if tracked_spec is not None else None
    run = api.train(resolved, target, epochs=epochs, overwrite=overwrite,
                    resume=bool(resume_dir), force=force,
                    callbacks=_progress(epochs, quiet, n_threads), tracking=logged)
    for line in run.tracking_problems:
        click.echo(printable(line), err=True)
    say = (lambda *_: None) if quiet else click.echo
    if run.stopped_early:
        say(f"early stopping after epoch {run.history[-1]['epoch']}; best epoch {run.best_epoch}")
    say(f"saved {run.path / 'model.npz'}")


def _stored_spec(run_dir: Path):
    """The resolved spec of the run in ``run_dir`` (to know how a resumed run is tracked), or None
    when it cannot be read: resuming then says why."""
    from .spec import load_spec

    try:
        return load_spec(str(run_dir / "spec.yaml"))
    except (NetbuildError, OSError):
        return None


def _progress(epochs: int | None, quiet: bool, n_threads: int):
    """The callbacks that print a training run's progress: a line at the start, a progress line
    per batch on a terminal (at most ten a second), a line per epoch. ``epochs``: --epochs."""
    from .api import Callbacks

    say = (lambda *_: None) if quiet else click.echo
    tty = not quiet and sys.stdout.isatty()
    state = {"at": 0.0, "total": epochs, "batch_size": 0}

    def started(spec, path: Path) -> None:
        state["total"] = state["total"] or int(spec.data["train"]["epochs"])
        state["batch_size"] = int(spec.data["train"]["batch_size"])
        real = path.resolve()
        where = f"{path} (resolves to {real})" if real != path.absolute() else str(path)
        say(f"training {spec.data['name']} into {where} on {n_threads} thread{'s' * (n_threads != 1)}")
        say("compiling the training function ...")

    def batch(epoch: int, i: int, n: int, loss: float, seconds: float) -> None:
        now = time.perf_counter()
        if not tty or (now - state["at"] < 0.1 and i < n):
            return
        state["at"] = now
        size = state["batch_size"]
        rate = min(i * size, n * size) / seconds if seconds > 0 else 0.0
        click.echo("\r" + report.progress_line(epoch, state["total"], i, n, loss, rate), nl=False)

    def epoch_done(record: dict) -> None:
        if tty:
            click.echo("\r\033[K", nl=False)
        say(report.epoch_line(record, state["total"]))

    return Callbacks(started=started, compiled=lambda s: say(f"compiled in {s:.1f} s"), batch=batch,
                     epoch=epoch_done,
                     resumed=lambda e: say(f"resumed after epoch {e} of {state['total']}"),
                     note=lambda text: say(f"note: {printable(text)}"))


def _threshold(ctx, param, values) -> list[tuple[str, float]]:
    """``METRIC=VALUE`` options -> ``[(metric, value)]``."""
    out = []
    for text in values:
        name, sep, raw = text.partition("=")
        try:
            if not sep or not name:
                raise ValueError
            out.append((name.strip(), float(raw)))
        except ValueError:
            raise click.BadParameter(f"'{text}' is not METRIC=VALUE, e.g. accuracy=0.95", ctx, param) from None
    return out


def _deltas(ctx, param, values) -> list[tuple[str, float]]:
    """``METRIC=DELTA`` options, each DELTA a change of at least 0."""
    out = _threshold(ctx, param, values)
    for (name, delta), text in zip(out, values):
        if not delta >= 0:
            raise click.BadParameter(f"'{text}': the allowed change must be 0 or more", ctx, param)
    return out


@cli.command(name="eval")
@click.argument("model", metavar="MODEL")
@click.option("--data", "data_file", type=click.Path(), default=None,
              help="An .npz file, or a folder of .npy files, to evaluate on (default: the spec's "
                   "data.test).")
@click.option("--fail-under", multiple=True, callback=_threshold, metavar="METRIC=VALUE",
              help="Exit 3 when METRIC is below VALUE (repeatable), e.g. accuracy=0.95.")
@click.option("--fail-over", multiple=True, callback=_threshold, metavar="METRIC=VALUE",
              help="Exit 3 when METRIC is above VALUE (repeatable), e.g. loss=0.3.")
@click.option("--baseline", default=None, metavar="OTHER",
              help="Evaluate this model (a run directory or model.npz) on the same data too, and "
                   "exit 3 when a metric is worse than its value by more than --max-drop allows.")
@click.option("--max-drop", multiple=True, callback=_deltas, metavar="METRIC=DELTA",
              help="With --baseline: how much worse METRIC may be than the baseline's (default 0), "
                   "e.g. accuracy=0.01 (repeatable).")
@click.option("--confusion", is_flag=True, help="Also print the confusion matrix (classification).")
@_format_option("text", "json", "github")
@junit_option
@threads_option
@backend_option
@click.pass_context
@handles_errors
def eval_command(ctx: click.Context, model: str, data_file: str | None, fail_under, fail_over,
                 baseline: str | None, max_drop, confusion: bool, fmt: str, junit_file: str | None,
                 threads: int | None, backend: str | None) -> None:
    """Evaluate MODEL (a run directory or model.npz): loss and metrics; gate on thresholds and on
    a baseline model."""
    from .errors import ThresholdError
    from .evaluate import baseline_failures, evaluate, failed_thresholds
    from .report import junit

    if max_drop and not baseline:
        raise click.UsageError("--max-drop sets what --baseline allows; give --baseline too", ctx)
    _use_threads(threads)
    _use_backend(backend)
    start = time.perf_counter()
    result = evaluate(model, data_file, confusion=confusion, baseline=baseline,
                      max_drop=dict(max_drop))
    metrics = result["metrics"]
    for option, pairs in (("--fail-under/--fail-over", list(fail_under) + list(fail_over)),
                          ("--max-drop", list(max_drop))):
        for name, _ in pairs:
            if name not in metrics:
                raise click.BadParameter(f"'{name}' is not a metric of this model; expected one of: "
                                         f"{', '.join(metrics)}", ctx, param_hint=option)
    if fmt == "json":
        click.echo(json.dumps(result, indent=2))
    else:
        click.echo(f"{result['data']}: {result['examples']} examples")
        if baseline:
            click.echo(report.baseline_table(result["baseline"]["comparison"]))
        else:
            click.echo(report.metrics_table(metrics))
        if confusion and "confusion_matrix" in result:
            click.echo(report.confusion_table(result["confusion_matrix"]))
        elif confusion:
            for name, matrix in result["confusion_matrices"].items():
                click.echo(f"{name}:")
                click.echo(report.confusion_table(matrix))
    gates = _gate_cases(metrics, fail_under, fail_over, result.get("baseline"))
    if junit_file:
        if not gates:  # no gate: the evaluation itself, its values in the output
            gates = [junit.Case(f"evaluate {model}", "netbuild.eval",
                                output=report.metrics_table(metrics))]
        junit.write(junit_file, "netbuild eval", gates, time.perf_counter() - start)
    failures = failed_thresholds(metrics, fail_under, fail_over)
    if baseline:
        failures += baseline_failures(result["baseline"]["comparison"])
    if failures:
        raise ThresholdError("\n".join(failures))


def _gate_cases(metrics: dict, under, over, baseline: dict | None) -> list:
    """One JUnit test case per threshold and per baseline comparison."""
    from .evaluate import baseline_failures, failed_thresholds
    from .report import junit

    cases = []
    for name, limit in under:
        failed = failed_thresholds(metrics, [(name, limit)], [])
        cases.append(junit.Case(f"{name} >= {limit:g} (--fail-under)", "netbuild.eval.threshold",
                                failed[0] if failed else None,
                                output=f"{name} {metrics[name]:.6g}, threshold {limit:g}"))
    for name, limit in over:
        failed = failed_thresholds(metrics, [], [(name, limit)])
        cases.append(junit.Case(f"{name} <= {limit:g} (--fail-over)", "netbuild.eval.threshold",
                                failed[0] if failed else None,
                                output=f"{name} {metrics[name]:.6g}, threshold {limit:g}"))
    for row in (baseline or {}).get("comparison", []):
        failed = baseline_failures([row])
        cases.append(junit.Case(f"{row['metric']} against the baseline {baseline['model']}",
                                "netbuild.eval.baseline", failed[0] if failed else None,
                                output=(f"{row['metric']} {row['value']:.6g}, baseline "
                                        f"{row['baseline']:.6g}, change {row['change']:+.6g}, "
                                        f"allowed {row['allowed']:g} ({row['better']} is better)")))
    return cases


@cli.command()
@click.argument("model", metavar="MODEL")
@click.option("--data", "data_file", required=True, type=click.Path(),
              help="An .npz file with the inputs under the spec's x_key (each input's key), or a "
                   "folder of .npy files named by those keys.")
@click.option("--out", "out_file", required=True, type=click.Path(dir_okay=False),
              help="Where to write the outputs (.npz, key y; each output's key).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@threads_option
@backend_option
@handles_errors
def predict(model: str, data_file: str, out_file: str, overwrite: bool, threads: int | None,
            backend: str | None) -> None:
    """Run MODEL on the inputs of --data and write its outputs to --out."""
    from .evaluate import predict as run_predict

    _use_threads(threads)
    _use_backend(backend)
    result = run_predict(model, data_file, out_file, overwrite)
    shapes = ", ".join(f"{k} of shape {report.shape(v)}" for k, v in result["outputs"].items())
    click.echo(f"wrote {result['out']}: {shapes}")


@cli.command()
@click.argument("runs", metavar="RUN...", nargs=-1, required=True)
@_format_option("text", "markdown", "json")
@click.option("--out", "out_file", type=click.Path(dir_okay=False), default=None, metavar="FILE.png",
              help="Also draw every metric's curves, one line per run, into this PNG.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@handles_errors
def compare(runs: tuple[str, ...], fmt: str, out_file: str | None, overwrite: bool) -> None:
    """Compare run directories: each metric's last and best value (and the epoch of the best),
    and the spec keys whose values differ between the runs."""
    from . import compare as comparing
    from .model import writable
    from .runs import atomic_write

    if out_file:
        writable(Path(out_file), overwrite)
    result = comparing.compare(list(runs))
    if fmt == "json":
        click.echo(json.dumps(result.as_dict(), indent=2))
    elif fmt == "markdown":
        click.echo(comparing.markdown(result))
    else:
        headers, rows, key_headers, key_rows = comparing.tables(result)
        click.echo(report.table(headers, rows, "l" + "r" * (len(headers) - 1)))
        click.echo("")
        if key_rows:
            click.echo("spec keys that differ:")
            click.echo(report.table(key_headers, key_rows))
        else:
            click.echo("the runs' specs are the same")
    if out_file:
        try:
            atomic_write(Path(out_file), comparing.curves_png(result))
        except OSError as exc:
            raise NetbuildError(f"{out_file}: cannot write: {exc.strerror or exc}") from None
        if fmt == "text":  # markdown and json are for a file or a comment: nothing else in them
            click.echo(f"wrote {out_file}")


def _opset_range():
    from .export import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET  # constants only: no layers imported

    return DEFAULT_OPSET, click.IntRange(MIN_OPSET, MAX_OPSET)


@cli.command()
@click.argument("model", metavar="MODEL")
@click.option("--out", "out_file", required=True, type=click.Path(dir_okay=False),
              help="The ONNX file to write, e.g. model.onnx.")
@click.option("--opset", type=_opset_range()[1], default=_opset_range()[0], show_default=True,
              help="The ONNX opset to write.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@threads_option
@handles_errors
def export(model: str, out_file: str, opset: int, overwrite: bool, threads: int | None) -> None:
    """Write MODEL (a run directory or model.npz) as an ONNX graph: input x, output y, what
    `netbuild predict` writes. Checked by onnx.checker and compared with netbuild's outputs in
    onnxruntime before it is written."""
    from .evaluate import export as run_export

    _use_threads(threads)
    done = run_export(model, out_file, opset, overwrite)
    click.echo(f"wrote {done.path}: ONNX opset {done.opset}, {done.nodes} nodes, "
               f"{done.bytes / 2**20:,.2f} MiB; onnxruntime matches netbuild on "
               f"{done.examples_checked} random inputs (largest difference {done.max_difference:.1e})")


@cli.command()
@_format_option("text", "json")
def doctor(fmt: str) -> None:
    """Print what netbuild computes with: backend, BLAS and its measured speed, threads, cache."""
    from .backend import describe
    from .compile import measure_gemm

    _use_backend(None)  # NETBUILD_BACKEND, as the other commands read it
    info = describe()
    info["gemm_gflops"] = round(measure_gemm(), 1)
    if fmt == "json":
        click.echo(json.dumps(info, indent=2))
        return
    info["compile_cache_bytes"] = f"{info['compile_cache_bytes'] / 2**20:,.1f} MiB"
    info["gemm_gflops"] = f"{info['gemm_gflops']} GFLOP/s (1024 x 1024 {info['float_type']} matrix product)"
    width = max(len(k) for k in info)
    for key, value in info.items():
        click.echo(f"{key.replace('_', ' '):<{width}}  {value}")


@cli.command()
def schema() -> None:
    """Print the JSON Schema of a spec (for editors and other tools)."""
    from .spec import schema as get_schema

    click.echo(json.dumps(get_schema(), indent=2))


cluster_options = [
    click.option("--workers", type=click.IntRange(min=1), default=None, metavar="N",
                 help="Worker processes of the local cluster (default: one per core, at most one "
                      "per point to train)."),
    click.option("--scheduler", default=None, metavar="ADDRESS",
                 help="Run the points on the workers of this Dask scheduler, e.g. tcp://host:8786, "
                      "instead of a local cluster."),
    click.option("--monitor", default=None, metavar="METRIC",
                 help="The recorded metric to rank by, e.g. val_accuracy (default: val_loss with "
                      "validation data, else loss)."),
    click.option("--overwrite", is_flag=True, help="Train every point again from scratch."),
    click.option("--quiet", "-q", is_flag=True, help="Print nothing but errors."),
    click.option("--threads", type=click.IntRange(min=1), default=None, metavar="N",
                 help="Threads each point computes with on the local cluster (default: the cores "
                      "divided among the workers)."),
    backend_option,
    track_option,
]


def _cluster_options(fn):
    for option in reversed(cluster_options):
        fn = option(fn)
    return fn


def _check_cluster_options(ctx, workers, threads, scheduler, backend) -> None:
    if (workers or threads or backend) and scheduler:
        raise click.UsageError("--workers, --threads and --backend set up the local cluster; with "
                               "--scheduler the cluster's own workers run the points (set "
                               "NETBUILD_THREADS and NETBUILD_BACKEND in their environment)", ctx)
    _use_threads(None)  # a bad NETBUILD_THREADS is reported before anything starts
    _use_backend(backend)  # the local workers compute with it (NETBUILD_BACKEND in their environment)


def _run_search(command: str, found, unit: str, spec, track: str | None, overwrite: bool,
                quiet: bool, params: dict, run):
    """A sweep's or a search's face: its tracking (a parent run, the one an earlier command made
    unless ``overwrite``), a line at the start and one per finished point, the summary table, and
    exit 1 for the points that failed. ``found``: its plan; ``run(callbacks, tracking)`` runs it."""
    from . import search
    from .report import summary
    from .search.state import previous_tracking
    from .search.sweep import Callbacks

    say = (lambda *_: None) if quiet else click.echo
    folder = found.folder
    tracking = _tracking(spec, track, folder.parent)
    if tracking is not None:
        earlier = None if overwrite else previous_tracking(folder, found.state_file)
        try:
            tracking = tracking.with_parent(earlier, f"{found.name}-{command}", params)
        except Exception as exc:  # the store answered a moment ago: say so, and go on untracked
            click.echo(printable(f"tracking: cannot start the parent run at {tracking.uri} ({exc}); "
                                 f"the {unit}s go on untracked"), err=True)
            tracking = None

    def count(n: int) -> str:
        return f"{n} {unit}{'s' * (n != 1)}"

    def started(info: dict) -> None:
        word = "finished" if command == "tune" else "complete"  # a search's pruned trials too
        kept = f" ({info['complete']} {word} already)" if info["complete"] else ""
        say(f"{command} {found.name}: {count(info['points'])} into {info['sweep_dir']}{kept}")
        for note in info.get("notes", []):
            say(f"note: {note}")
        if info["to_run"]:
            resumed = f" ({info['resumed']} of them resumed)" if info.get("resumed") else ""
            say(f"training {count(info['to_run'])}{resumed} on {info['where']} ...")

    def finished(record: dict, done: int, total: int) -> None:
        line = f"[{done}/{total}] {record['id']}  {record['status']}"
        if record["best"] is not None:
            line += (f"  {found.monitor} {report.number(record['final'])} (best "
                     f"{report.number(record['best'])} at epoch {record['best_epoch']})")
        line += f"  {record['epochs']} epochs  {record['seconds']:.2f} s training"
        if record.get("wall_seconds") is not None:
            line += f", {record['wall_seconds']:.1f} s in all"
        say(line + (f"  {record['message']}" if record["message"] else ""))

    status = "FAILED"
    try:
        result = run(Callbacks(start=started, point=finished), tracking)
        status = "FINISHED"
    except (search.SearchInterrupted, KeyboardInterrupt):
        status = "KILLED"
        raise
    finally:
        if tracking is not None:
            tracking.end_parent(status)
    headers, rows, align = summary.table(found.summary_of(), result.rows)
    say(report.table(headers, rows, align))
    if command == "tune":
        epochs = sum(r["epochs"] for r in result.records)
        say(f"{count(len(result.records))}, {result.count(search.PRUNED)} pruned; {epochs} epochs trained in all")
    say("wrote " + ", ".join(str(f) for f in result.files))
    # A sweep trains its failed points again when run again; a search counts them toward --trials.
    failed = [r for r in result.rows
              if r["status"] == search.FAILED and (command == "sweep" or r["id"] in result.ran)]
    if failed:
        again = ("run the same command again to retry the failed ones" if command == "sweep" else
                 "failed trials count toward --trials: raise it to train more")
        raise search.SearchError([f"{r['id']}: failed: {r['message']}" for r in failed]
                                 + [f"{len(failed)} of {len(result.rows)} {unit}s failed ({again})"])


@cli.command(name="sweep")
@click.argument("spec", metavar="SPEC")
@click.option("--grid", multiple=True, metavar="PATH=V1,V2,...",
              help="Values to try at PATH (the --set syntax), e.g. train.optimizer.learning_rate="
                   "0.001,0.01 (repeatable; the points are every combination). Adds to, or replaces, "
                   "the spec's sweep.grid.")
@set_option
@click.option("--random", "random_points", type=click.IntRange(min=1), default=None, metavar="N",
              help="Train N points drawn from the grid's combinations instead of all of them.")
@click.option("--seed", type=click.IntRange(min=0), default=None, metavar="S",
              help="Seed of the --random draw (default 0; not the spec's seed).")
@click.option("--sweep-dir", type=click.Path(file_okay=False), default=None,
              help="Where to write the runs and the summary (default: runs/<name>-sweep).")
@_cluster_options
@_format_option("text", "github")
@click.pass_context
@handles_errors
def sweep_command(ctx: click.Context, spec: str, grid, overrides, random_points: int | None,
                  seed: int | None, workers: int | None, scheduler: str | None, monitor: str | None,
                  sweep_dir: str | None, overwrite: bool, quiet: bool, threads: int | None,
                  backend: str | None, track: str | None, fmt: str) -> None:
    """Train SPEC at every combination of the --grid values (and the spec's sweep section), each
    point into its own run directory; write summary.csv, summary.md and summary.png sorted by the
    monitored metric. Exit 1 when a point failed; run again to skip completed points."""
    from . import search
    from .search import sweep as sweeps

    _check_cluster_options(ctx, workers, threads, scheduler, backend)
    try:
        plan = search.plan(spec, grid, overrides, random=random_points, seed=seed, monitor=monitor,
                           sweep_dir=sweep_dir, workers=workers)
    except search.ArgumentError as exc:
        raise click.BadParameter(str(exc), ctx, param_hint=f"'{exc.option}'") from None
    if seed is not None and plan.random is None:
        raise click.UsageError("--seed picks the points of --random N; give --random too", ctx)
    _run_search("sweep", plan, "point", plan.specs[plan.points[0].id], track, overwrite, quiet,
                {f"grid.{a.text}": json.dumps(a.values) for a in plan.axes},
                lambda callbacks, tracking: sweeps.run(plan, scheduler=scheduler, workers=workers,
                                                       overwrite=overwrite, callbacks=callbacks,
                                                       per_point_threads=threads, tracking=tracking))


@cli.command(name="tune")
@click.argument("spec", metavar="SPEC")
@set_option
@click.option("--trials", type=click.IntRange(min=1), default=None, metavar="N",
              help="Trials in all, those of an earlier command included (default: the spec's "
                   "tune.trials, else 20).")
@click.option("--sampler", type=click.Choice(["tpe", "random", "grid"]), default=None,
              help="How the next point is proposed (default: the spec's tune.sampler, else tpe).")
@click.option("--pruner", type=click.Choice(["hyperband", "median", "none"]), default=None,
              help="How hopeless trials are stopped early (default: the spec's tune.pruner, else "
                   "hyperband).")
@click.option("--seed", type=click.IntRange(min=0, max=2**32 - 1), default=None, metavar="S",
              help="Seed of the sampler (default: the spec's tune.seed, else 0; not the spec's seed).")
@click.option("--tune-dir", type=click.Path(file_okay=False), default=None,
              help="Where to write the trials, the study and the summary (default: runs/<name>-tune).")
@_cluster_options
@_format_option("text", "github")
@click.pass_context
@handles_errors
def tune_command(ctx: click.Context, spec: str, overrides, trials: int | None, sampler: str | None,
                 pruner: str | None, seed: int | None, tune_dir: str | None, workers: int | None,
                 scheduler: str | None, monitor: str | None, overwrite: bool, quiet: bool,
                 threads: int | None, backend: str | None, track: str | None, fmt: str) -> None:
    """Search the spec's tune.space with Optuna: each trial trains SPEC at the point the sampler
    proposes into its own run directory, and the pruner stops hopeless trials after a few epochs;
    write summary.csv, summary.md, history.png and params.png. Run the same command again to
    continue the study."""
    from . import search
    from .search import tune

    _check_cluster_options(ctx, workers, threads, scheduler, backend)
    tune.optuna_modules()  # what to install, before anything else
    try:
        found = tune.plan(spec, overrides, trials=trials, monitor=monitor, sampler=sampler, pruner=pruner,
                          seed=seed, tune_dir=tune_dir, workers=workers)
    except search.ArgumentError as exc:
        raise click.BadParameter(str(exc), ctx, param_hint=f"'{exc.option}'") from None
    _run_search("tune", found, "trial", found.base, track, overwrite, quiet,
                {f"space.{p.text}": json.dumps(p.describe()) for p in found.params},
                lambda callbacks, tracking: tune.run(found, scheduler=scheduler, workers=workers,
                                                     overwrite=overwrite, callbacks=callbacks,
                                                     per_point_threads=threads, tracking=tracking))


def main() -> None:
    cli(prog_name="netbuild")
