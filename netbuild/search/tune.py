"""A search: Optuna proposes each next point from the results so far and prunes hopeless ones.

``netbuild tune`` reads the spec's ``tune`` section (:mod:`.space`), checks every choice and both
ends of every range as ``netbuild check`` would before anything trains, then runs an Optuna study
whose storage is a SQLite file in the tune directory, shared with the Dask workers through
``optuna-integration``'s ``DaskStorage`` (the storage lives on the scheduler). Each trial is a
task on the same cluster as a sweep's points (:mod:`.cluster`): it trains through
:func:`netbuild.training.train` into ``<tune dir>/trial-NNNN``, reports its monitored value after
every epoch, and stops there when the pruner says so (status ``pruned``, its files kept).

Running the same command again continues the study: finished trials are kept, trials that were
running when the command stopped (Ctrl-C, a kill) resume from their checkpoints, and
``--trials`` is the total. The tune directory holds ``tune.json`` (the search and every trial's
record), ``study.db`` (Optuna's), ``summary.csv`` and ``summary.md`` (sorted by the best
monitored value), ``history.png`` and ``params.png``.

Library code: it reports progress through callbacks and returns values; it never prints.
"""

from __future__ import annotations

import math
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from .. import metrics as metrics_mod
from ..checks import check_point, default_monitor, has_validation
from ..errors import Location, MissingExtra, NetbuildError, SpecError, printable
from ..report import summary
from ..runs import changed_keys, changes_text, resolved_spec_data
from ..spec import Spec, load_file, validate
from ..spec.load import apply_overrides
from . import space as space_mod
from .cluster import Runner, client_for, default_workers, point_threads
from .errors import ArgumentError, SearchError, SearchInterrupted
from .points import check_monitor, note_problem, path_key_issue, problem_lines, set_value, short_names
from .state import SearchDir
from .sweep import SUMMARY_CSV, SUMMARY_MD, Callbacks, Result, where_text
from .task import CANCELLED, COMPLETE, DONE, FAILED, PENDING, PRUNED, SKIPPED, Task, point_record

TUNE_FILE = "tune.json"
STUDY_FILE = "study.db"
HISTORY_PNG = "history.png"
PARAMS_PNG = "params.png"
DEFAULT_TRIALS = 20
SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("hyperband", "median", "none")


def optuna_modules():
    """``optuna`` and ``optuna_integration``, or a :class:`MissingExtra` that says how to get
    them. Optuna's own log lines and its experimental-feature warnings are silenced: the CLI says
    what happens."""
    try:
        import optuna
        import optuna_integration
    except ImportError:
        raise MissingExtra("tune", "optuna and optuna-integration", "netbuild tune") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna, optuna_integration


# ----- the plan: a space checked before anything trains ------------------------------------


@dataclass
class Search:
    """A checked search: the spec without its ``tune`` section, the searched params, the number
    of trials, the monitored metric and its direction, the sampler and pruner, where the trials
    go."""

    name: str
    spec_file: str
    base: Spec
    params: list[space_mod.Param]
    trials: int
    monitor: str
    mode: str
    sampler: str
    pruner: str
    seed: int
    epochs: int
    tune_dir: Path
    workers: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def names(self) -> dict[str, str]:
        return short_names(self.params)

    def summary_of(self) -> summary.SummaryOf:
        return summary.SummaryOf("tune", "trial", self.name, self.spec_file, self.monitor, self.mode,
                                 [p.text for p in self.params], self.names)

    def spec_for(self, values: dict[str, Any], data_checked: set | None = None,
                 where: dict[str, Location] | None = None) -> Spec:
        """The checked spec of a point (path text -> value), each value located at its line of
        the space (or as ``where`` says). Raises located errors."""
        spec = self.base.copy()
        for p in self.params:
            set_value(spec, p.path, values[p.text], (where or {}).get(p.text, p.where))
        return check_point(spec, data_checked)

    def identity(self) -> dict:
        """What makes two commands the same search: the spec each trial starts from, the space,
        the monitored metric, the sampler and pruner (not the number of trials)."""
        return {"spec": resolved_spec_data(self.base), "space": {p.text: p.describe() for p in self.params},
                "monitor": self.monitor, "sampler": self.sampler, "pruner": self.pruner, "seed": self.seed}


def plan(spec_file: str, overrides: tuple | list = (), trials: int | None = None, monitor: str | None = None,
         sampler: str | None = None, pruner: str | None = None, seed: int | None = None,
         tune_dir: str | os.PathLike | None = None, workers: int | None = None) -> Search:
    """Load ``spec_file``, apply ``overrides`` (``--set``), read its ``tune`` section and check
    the search: the space, and the spec at every choice and both ends of every range.

    Command-line values win over the section. Raises :class:`ArgumentError` for a bad option and
    located :class:`SpecError` / :class:`SearchError` for everything else.
    """
    raw = load_file(spec_file)
    if not isinstance(raw.data, dict):
        validate(raw)  # raises the located "expected a mapping"
    base = apply_overrides(raw, overrides)
    try:
        validate(base)
    except SpecError as exc:  # the tune section must be valid as written; the rest may need a point
        own = [path_key_issue(base, i) for i in exc.issues if i.path[:1] == ("tune",)]
        if own:
            raise SpecError(own) from None
    section = base.data.get("tune")
    if not isinstance(section, dict):
        validate(base)  # a mistake elsewhere in the spec comes first
        raise SearchError(f"{spec_file}: no tune section; expected one with the space to search, e.g. "
                          "tune: {space: {train.optimizer.learning_rate: {log_uniform: [1.0e-4, 1.0e-1]}}}")
    params = space_mod.parse(base)
    sampler = sampler or section.get("sampler", "tpe")
    pruner = pruner or section.get("pruner", "hyperband")
    seed = int(seed if seed is not None else section.get("seed", 0))
    notes = []
    grid_size = None
    if sampler == "grid":
        issues = [base.issue(("tune", "space", p.text, p.kind), f"the grid sampler needs values to list; "
                                                                 f"received a continuous {p.kind} range "
                                                                 "(give a step, or use choice)")
                  for p in params if p.grid_values() is None]
        if issues:
            raise SpecError(issues)
        grid_size = math.prod(len(p.grid_values()) for p in params)
    wanted = trials or section.get("trials") or grid_size or DEFAULT_TRIALS
    if grid_size is not None and wanted > grid_size:
        notes.append(f"the grid has {grid_size} points: {grid_size} trials, not {wanted}")
        wanted = grid_size
    for key in ("tune", "sweep"):
        base.data.pop(key, None)

    probes: dict[str, Spec] = {}
    problems: dict[str, list] = {}
    data_checked: set = set()
    search = Search(str(base.data["name"]), str(spec_file), base, params, int(wanted), "", "min", sampler,
                    pruner, seed, 0, Path(tune_dir) if tune_dir else Path("runs") / f"{base.data['name']}-tune",
                    workers or section.get("workers"), notes)
    for param, value, where, values in space_mod.probe_points(params):
        probe = summary.value_text(value)
        try:
            probes[f"{param.text}={probe}"] = search.spec_for(values, data_checked, {param.text: where})
        except NetbuildError as exc:
            note_problem(problems, probe, exc, anywhere=True)
    if problems:
        raise SearchError(problem_lines(problems, "value"))
    first = next(iter(probes.values()))
    search.monitor = monitor or section.get("monitor") or default_monitor(has_validation(first))
    check_monitor(search.monitor, monitor, base, probes, "tune")
    search.mode = metrics_mod.mode_of(search.monitor)
    search.epochs = max(int(s.data["train"]["epochs"]) for s in probes.values())
    return search


# ----- the study ---------------------------------------------------------------------------


def _study(optuna, storage, search: Search):
    """The search's study in ``storage``: the one an earlier command made, or a new one. The
    sampler's seed moves on by the trials the study holds, so that a continued study does not
    draw its first trials' points again."""
    pruner = make_pruner(optuna, search.pruner, search.epochs)
    if search.name in optuna.study.get_all_study_names(storage):  # (load_if_exists: Dask logs an error)
        study = optuna.load_study(study_name=search.name, storage=storage, pruner=pruner)
        study.sampler = make_sampler(optuna, search, len(study.get_trials(deepcopy=False)))
        return study
    return optuna.create_study(storage=storage, study_name=search.name, pruner=pruner,
                               direction="maximize" if search.mode == "max" else "minimize",
                               sampler=make_sampler(optuna, search, 0))


def make_sampler(optuna, search: Search, offset: int = 0):
    if search.sampler == "grid":
        grid = {p.text: (p.grid_values() if p.kind != "choice" or space_mod._plain(p.choices)
                         else list(range(len(p.choices)))) for p in search.params}
        return _grid_sampler(optuna)(grid, seed=search.seed + offset)
    if search.sampler == "random":
        return optuna.samplers.RandomSampler(seed=search.seed + offset)
    return optuna.samplers.TPESampler(seed=search.seed + offset)


def _grid_sampler(optuna):
    """Optuna's grid sampler, without its call of ``Study.stop`` once every point has had its
    trial: that works only inside ``Study.optimize``, and this command asks and tells, counting
    the trials itself (no more than the grid's points)."""

    class Grid(optuna.samplers.GridSampler):
        def after_trial(self, study, trial, state, values) -> None:
            pass

    return Grid


def make_pruner(optuna, kind: str, epochs: int):
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(1, epochs), reduction_factor=3)
    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1)
    return optuna.pruners.NopPruner()


@dataclass
class Reporter:
    """A trial's link to its study from the worker that trains it: after each epoch, report the
    monitored value and ask the pruner (:meth:`callbacks`, a training callback)."""

    storage: str  # the name of the study's DaskStorage on the scheduler
    study: str
    trial_id: int
    monitor: str
    pruner: str
    epochs: int

    def callbacks(self):
        from ..training import Callbacks as TrainCallbacks

        optuna, integration = optuna_modules()
        with warnings.catch_warnings():  # DaskStorage is "experimental"
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = integration.DaskStorage(name=self.storage, register=False)
        study = optuna.load_study(study_name=self.study, storage=storage,
                                  pruner=make_pruner(optuna, self.pruner, self.epochs))
        trial = optuna.trial.Trial(study, self.trial_id)

        def stop(record: dict) -> bool:
            value = record.get(self.monitor)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                return False
            with warnings.catch_warnings():  # a resumed trial reports its last epoch again
                warnings.simplefilter("ignore")
                trial.report(float(value), int(record["epoch"]))
            return trial.should_prune()

        return TrainCallbacks(stop=stop)


def trial_id_text(number: int) -> str:
    return f"trial-{number:04d}"


def run(search: Search, scheduler: str | None = None, workers: int | None = None, overwrite: bool = False,
        callbacks: Callbacks | None = None, per_point_threads: int | None = None,
        tracking: Any = None) -> Result:
    """Run the study of ``search`` until it holds ``search.trials`` finished trials (complete,
    pruned or failed), ``workers`` at a time on a local cluster (default one per core, at most one
    per trial to run) or on the cluster of ``scheduler``; write ``tune.json`` and the summary.
    ``tracking``: a :class:`netbuild.tracking.Tracking` under whose parent run each trial is
    logged. Raises :class:`SearchInterrupted` on Ctrl-C (after writing the summary)."""
    optuna, integration = optuna_modules()
    on = callbacks or Callbacks()
    folder = search.tune_dir.absolute()
    with SearchDir(folder, TUNE_FILE, "tune") as tune_dir:
        state = _previous(tune_dir, search, overwrite)
        records: dict[str, dict] = {r["id"]: r for r in state.get("trials", [])}
        order: list[str] = [r["id"] for r in state.get("trials", [])]
        tracking_state = tracking.state() if tracking is not None else state.get("tracking")
        finished_before = sum(1 for r in records.values() if r["status"] in COMPLETE + (PRUNED, FAILED))
        to_run = max(0, search.trials - finished_before)
        n_workers = workers or search.workers or default_workers(max(1, to_run))
        per_worker = point_threads(n_workers, per_point_threads)

        def save() -> None:
            _write_state(tune_dir, search, [records[i] for i in order], tracking_state)

        interrupted = False
        try:
            with client_for(n_workers, scheduler, per_worker) as client:
                storage = integration.DaskStorage(storage=f"sqlite:///{folder / STUDY_FILE}", client=client)
                study = _study(optuna, storage, search)
                interrupted = _optimize(optuna, study, storage, search, folder, records, order, save,
                                        tracking, n_workers, scheduler, per_worker, client, on)
        except KeyboardInterrupt:  # during the cluster's start or close
            interrupted = True
        for tid, record in records.items():
            if record["status"] == PENDING:
                records[tid] = dict(record, status=CANCELLED, message="cancelled")
        ordered = [records[i] for i in order]
        of = search.summary_of()
        rows = summary.rows(of, ordered)
        files = write_summary(tune_dir, search.tune_dir, of, rows, order)
        save()
    result = Result(ordered, rows, files, interrupted)
    if interrupted:
        finished = result.count(DONE, SKIPPED, PRUNED, FAILED)
        raise SearchInterrupted(f"interrupted: {finished} of {search.trials} trials finished, "
                                f"{result.count(CANCELLED)} cancelled; the summary is in "
                                f"{search.tune_dir / SUMMARY_MD}; run the same command again to "
                                "continue (finished trials are kept, interrupted ones resume)")
    return result


def _optimize(optuna, study, storage, search: Search, folder: Path, records: dict, order: list, save,
              tracking, n_workers: int, scheduler: str | None, per_worker: int, client, on: Callbacks) -> bool:
    """Ask the study for trials and train them, ``n_workers`` at a time, until it holds
    ``search.trials`` finished ones; True when interrupted."""
    TrialState = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False)
    finished = sum(1 for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL))
    stale = [t for t in trials if t.state == TrialState.RUNNING]  # a command stopped while they ran
    for t in trials:  # what the study says wins over tune.json (a command killed between the two)
        tid = trial_id_text(t.number)
        if tid not in records:
            order.append(tid)
        if t.state.is_finished() and (tid not in records
                                      or records[tid]["status"] not in COMPLETE + (PRUNED, FAILED)):
            records[tid] = _record_of_frozen(t, search, folder)
    total = search.trials
    to_run = max(0, total - finished)
    on.start({"points": total, "complete": finished, "to_run": to_run,
              "resumed": min(len(stale), to_run), "where": where_text(scheduler, n_workers, per_worker),
              "sweep_dir": search.tune_dir, "notes": search.notes})
    if to_run == 0:
        return False
    runner = Runner(client)
    data_checked: set = set()
    launched = 0
    heard = 0

    def launch() -> None:
        """Start trials until ``n_workers`` run: an interrupted one first (its point again, or
        one suggested now if it was asked and never given one), else a new one from the sampler."""
        nonlocal launched, heard
        while launched < to_run and runner.running() < n_workers:
            launched += 1
            trial = optuna.trial.Trial(study, stale.pop(0)._trial_id) if stale else study.ask()
            values = {p.text: p.suggest(trial) for p in search.params}
            tid = trial_id_text(trial.number)
            if tid not in records:
                order.append(tid)
            try:
                spec = search.spec_for(values, data_checked)
            except NetbuildError as exc:  # a sampled point the probes did not cover
                study.tell(trial.number, state=TrialState.FAIL)
                records[tid] = point_record(tid, values, FAILED, [], search.monitor, search.mode,
                                            printable("; ".join(exc.lines())))
                heard += 1
                on.point(records[tid], heard, to_run)
                continue
            records[tid] = point_record(tid, values, PENDING, [], search.monitor, search.mode)
            reporter = Reporter(storage.name, search.name, trial._trial_id, search.monitor, search.pruner,
                                search.epochs)
            runner.submit(Task(tid, values, spec, str(folder / tid), search.monitor, search.mode,
                               report=reporter, tracking=tracking))
        save()

    try:
        launch()
        for task, record in runner.finished():
            number = int(task.id.split("-")[1])
            status = record["status"]
            if status == SKIPPED:  # trained to the end by a command stopped before it said so
                record = dict(record, status=DONE, message="complete in its folder; recorded now")
            if status in COMPLETE and record["best"] is not None:
                study.tell(number, record["best"])
            elif status == PRUNED:
                study.tell(number, state=TrialState.PRUNED)
            elif status != CANCELLED:
                study.tell(number, state=TrialState.FAIL)
                if status in COMPLETE:
                    record = dict(record, status=FAILED, message=f"no finite {search.monitor} was recorded")
            records[task.id] = record
            heard += 1
            on.point(record, heard, to_run)
            launch()
    except KeyboardInterrupt:
        for task, record in runner.cancel():
            records[task.id] = record  # left running in the study: the next command resumes it
        save()
        return True
    return False


def _record_of_frozen(t, search: Search, folder: Path) -> dict:
    from ..runs import read_history

    status = {"COMPLETE": DONE, "PRUNED": PRUNED, "FAIL": FAILED}[t.state.name]
    values = {p.text: p.value_of(t.params[p.text]) for p in search.params if p.text in t.params}
    tid = trial_id_text(t.number)
    return point_record(tid, values, status, read_history(folder / tid), search.monitor, search.mode)


def _previous(tune_dir: SearchDir, search: Search, overwrite: bool) -> dict:
    """The state of the search this folder holds (empty for a new one). A folder of a different
    search is refused; with ``overwrite``, its study and trials are removed."""
    import json

    file = tune_dir.path / TUNE_FILE
    if overwrite:
        for path in tune_dir.path.iterdir():
            if path.name.startswith("trial-") and path.is_dir():
                shutil.rmtree(path)
            elif path.name in (TUNE_FILE, STUDY_FILE):
                path.unlink()
        return {}
    if not file.exists():
        if (tune_dir.path / STUDY_FILE).exists():
            return {"search": search.identity()}  # a study whose state file was lost: continued
        return {}
    try:
        state = json.loads(file.read_text("utf-8"))
        stored = state["search"]
        assert isinstance(state.get("trials", []), list)
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as exc:
        raise SearchError(f"{file}: not a readable tune state ({exc}); expected one written by "
                          "`netbuild tune` (pass --overwrite to start the search again)") from None
    changed = changed_keys(stored, json.loads(json.dumps(search.identity(), default=str)))
    if changed:
        raise SearchError(f"{tune_dir.path}: holds a search of a different spec or space (it differs in "
                          f"{changes_text(changed)}); expected the same search to continue it (pass "
                          "--overwrite to start again, or --tune-dir to search elsewhere)")
    return state


def _write_state(tune_dir: SearchDir, search: Search, records: list[dict], tracking: dict | None) -> None:
    tune_dir.write_state({
        "name": search.name,
        "spec": str(Path(search.spec_file).absolute()),
        "trials_wanted": search.trials,
        "epochs_trained": sum(r["epochs"] for r in records if r["status"] != SKIPPED),
        "search": search.identity(),
        "tracking": tracking,
        "netbuild_version": __version__,
        "trials": records,
    })


def write_summary(folder: SearchDir, shown: Path, of: summary.SummaryOf, rows: list[dict],
                  order: list[str]) -> list[Path]:
    """summary.csv, summary.md, history.png and params.png, each written atomically; their paths
    under ``shown`` (the folder as the user named it)."""
    folder.write(SUMMARY_CSV, summary.summary_csv(of, rows).encode("utf-8"))
    folder.write(SUMMARY_MD, summary.summary_md(of, rows).encode("utf-8"))
    folder.write(HISTORY_PNG, summary.history_png(of, rows, order))
    folder.write(PARAMS_PNG, summary.params_png(of, rows))
    return [shown / n for n in (SUMMARY_CSV, SUMMARY_MD, HISTORY_PNG, PARAMS_PNG)]


__all__ = ["ArgumentError", "PRUNERS", "SAMPLERS", "Search", "plan", "run"]
