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

import contextlib
import json
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
from ..runs import changed_keys, changes_text, read_history, resolved_spec_data
from ..spec import Spec, validate
from . import space as space_mod
from .cluster import Runner, client_for, default_workers, point_threads
from .errors import SearchError, SearchInterrupted
from .points import check_monitor, load_base, note_problem, problem_lines, set_value, short_names
from .state import TUNE_FILE, SearchDir
from .sweep import SUMMARY_CSV, SUMMARY_MD, Callbacks, Result, where_text, write_files
from .task import CANCELLED, COMPLETE, DONE, FAILED, PENDING, PRUNED, SKIPPED, Task, point_record

STUDY_FILE = "study.db"
HISTORY_PNG = "history.png"
PARAMS_PNG = "params.png"
DEFAULT_TRIALS = 20


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

    folder = property(lambda self: self.tune_dir)
    state_file = TUNE_FILE

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
    base = load_base(spec_file, overrides, "tune")
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
                                                                 "(use int or uniform with a step, or choice)")
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
    check_monitor(search.monitor, monitor, base, probes, "tune", "value")
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
    seed = (search.seed + offset) % 2**32  # numpy's seeds stop there
    if search.sampler == "grid":
        grid = {p.text: (p.grid_values() if p.kind != "choice" or space_mod._plain(p.choices)
                         else list(range(len(p.choices)))) for p in search.params}
        return _grid_sampler(optuna)(grid, seed=seed)
    if search.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


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
    number: int
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
    per trial to run) or on the cluster of ``scheduler`` (as many at a time as it has workers);
    write ``tune.json`` and the summary. ``tracking``: a :class:`netbuild.tracking.Tracking`
    under whose parent run each trial is logged. Raises :class:`SearchInterrupted` on Ctrl-C
    (after writing the summary)."""
    optuna_modules()
    folder = search.tune_dir.absolute()
    with SearchDir(folder, TUNE_FILE, "tune") as tune_dir:
        state = _previous(tune_dir, search, overwrite)
        opt = _Optimization(search, tune_dir, callbacks or Callbacks(), tracking,
                            tracking.state() if tracking is not None else state.get("tracking"))
        for record in state.get("trials", []):
            opt.keep(record)
        opt.save()  # before the study exists: a folder with a study always has its tune.json
        # Sized from tune.json: it may lag the study by the trials a killed command had running.
        to_run = max(1, search.trials - sum(r["status"] in FINISHED for r in opt.records.values()))
        n_workers = workers or search.workers or default_workers(to_run)
        per_worker = point_threads(n_workers, per_point_threads)
        interrupted = False
        try:
            with client_for(n_workers, scheduler, per_worker) as client:
                if scheduler:
                    n_workers = max(1, len(client.scheduler_info().get("workers", {})))
                interrupted = opt.run(client, scheduler, n_workers, per_worker)
        except KeyboardInterrupt:  # during the cluster's start or close
            interrupted = True
        for record in opt.records.values():
            if record["status"] == PENDING:
                opt.keep(dict(record, status=CANCELLED, message="cancelled"))
        opt.save()
        ordered = opt.ordered()
        of = search.summary_of()
        rows = summary.rows(of, ordered)
        files = write_files(tune_dir, search.tune_dir, {
            SUMMARY_CSV: summary.summary_csv(of, rows).encode("utf-8"),
            SUMMARY_MD: summary.summary_md(of, rows).encode("utf-8"),
            HISTORY_PNG: summary.history_png(of, rows, opt.order),
            PARAMS_PNG: summary.params_png(of, rows)})
    result = Result(ordered, rows, files, interrupted, ran=opt.ran)
    if interrupted:
        finished = result.count(*FINISHED)
        raise SearchInterrupted(f"interrupted: {finished} of {search.trials} trials finished, "
                                f"{result.count(CANCELLED)} cancelled; the summary is in "
                                f"{search.tune_dir / SUMMARY_MD}; run the same command again to "
                                "continue (finished trials are kept, interrupted ones resume)")
    return result


#: The statuses of a trial that counts toward ``--trials``.
FINISHED = COMPLETE + (PRUNED, FAILED)


class _Optimization:
    """One command's share of a study: the trials' records (in the order they started), the
    trials it runs, and what it tells the study of each."""

    def __init__(self, search: Search, folder: SearchDir, on: Callbacks, tracking, tracking_state: dict | None):
        self.search = search
        self.folder = folder
        self.on = on
        self.tracking = tracking
        self.tracking_state = tracking_state
        self.records: dict[str, dict] = {}
        self.order: list[str] = []
        self.ran: set[str] = set()  # the trials this command trained (or tried to)

    def keep(self, record: dict) -> None:
        if record["id"] not in self.records:
            self.order.append(record["id"])
        self.records[record["id"]] = record

    def ordered(self) -> list[dict]:
        return [self.records[i] for i in self.order]

    def save(self) -> None:
        _write_state(self.folder, self.search, self.ordered(), self.tracking_state)

    def record(self, tid: str, values: dict, status: str, history: list | None = None, message: str = "") -> dict:
        return point_record(tid, values, status, history or [], self.search.monitor, self.search.mode, message)

    def run(self, client, scheduler: str | None, n_workers: int, per_worker: int) -> bool:
        """Ask the study for trials and train them, ``n_workers`` at a time, until it holds
        ``search.trials`` finished ones; True when interrupted."""
        optuna, integration = optuna_modules()
        self.optuna = optuna
        try:
            self.storage = integration.DaskStorage(storage=f"sqlite:///{self.folder.path / STUDY_FILE}",
                                                   client=client)
        except Exception as exc:  # the scheduler lacks optuna, or cannot open the file
            where = f"the scheduler at {scheduler}" if scheduler else "the local scheduler"
            raise SearchError(printable(f"{self.folder.path / STUDY_FILE}: {where} cannot keep the study "
                                        f"({type(exc).__name__}: {exc}); expected optuna and "
                                        "optuna-integration installed beside the scheduler, and the tune "
                                        "directory at the same path there")) from None
        self.study = _study(optuna, self.storage, self.search)
        self.stale = self._reconcile()
        finished = sum(1 for t in self.study.get_trials(deepcopy=False) if t.state.is_finished())
        self.to_run = max(0, self.search.trials - finished)
        self.on.start({"points": self.search.trials, "complete": finished, "to_run": self.to_run,
                       "resumed": min(len(self.stale), self.to_run),
                       "where": where_text(scheduler, n_workers, per_worker), "sweep_dir": self.search.tune_dir,
                       "notes": self.search.notes})
        if self.to_run == 0:
            return False
        self.runner = Runner(client)
        self.n_workers = n_workers
        self.launched = self.heard = 0
        self.data_checked: set = set()
        try:
            self._launch()
            for task, record in self.runner.finished():
                self.heard += 1
                self.on.point(self._settle(task, record), self.heard, self.to_run)
                self._launch()
        except KeyboardInterrupt:
            for task, record in self.runner.cancel():
                self.keep(record)
                with contextlib.suppress(Exception):  # else the next command finds it complete
                    self._settle(task, record)
            self.save()
            return True
        return False

    def _reconcile(self) -> list:
        """What the study says wins over tune.json (a command killed between the two): a record
        for each of its trials; returns the trials left running by a command that stopped."""
        stale = []
        for t in self.study.get_trials(deepcopy=False):
            tid = trial_id_text(t.number)
            values = {p.text: p.value_of(t.params[p.text]) for p in self.search.params if p.text in t.params}
            if t.state.is_finished():
                if self.records.get(tid, {}).get("status") not in FINISHED:
                    status = {"COMPLETE": DONE, "PRUNED": PRUNED}.get(t.state.name, FAILED)
                    self.keep(self.record(tid, values, status, read_history(self.folder.path / tid)))
            elif t.state == self.optuna.trial.TrialState.RUNNING:
                stale.append(t)
                if tid not in self.records:
                    self.keep(self.record(tid, values, CANCELLED, read_history(self.folder.path / tid),
                                          "cancelled"))
        return stale

    def _launch(self) -> None:
        """Start trials until ``n_workers`` run: an interrupted one first (its point again, or
        one suggested now if it was asked and never given one), else a new one from the sampler."""
        TrialState = self.optuna.trial.TrialState
        while self.launched < self.to_run and self.runner.running() < self.n_workers:
            self.launched += 1
            trial = self.optuna.trial.Trial(self.study, self.stale.pop(0)._trial_id) if self.stale \
                else self.study.ask()
            values = {p.text: p.suggest(trial) for p in self.search.params}
            tid = trial_id_text(trial.number)
            self.ran.add(tid)
            self.keep(self.record(tid, values, PENDING))
            try:
                spec = self.search.spec_for(values, self.data_checked)
            except NetbuildError as exc:  # a sampled point the probes did not cover
                self.study.tell(trial.number, state=TrialState.FAIL)
                self.keep(self.record(tid, values, FAILED, message=printable("; ".join(exc.lines()))))
                self.heard += 1
                self.on.point(self.records[tid], self.heard, self.to_run)
                continue
            reporter = Reporter(self.storage.name, self.search.name, trial._trial_id, trial.number,
                                self.search.monitor, self.search.pruner, self.search.epochs)
            self.runner.submit(Task(tid, values, spec, str(self.folder.path / tid), self.search.monitor,
                                    self.search.mode, report=reporter, tracking=self.tracking))
        self.save()

    def _settle(self, task: Task, record: dict) -> dict:
        """Tell the study how a trial ended (a cancelled one stays running in it: the next command
        resumes it); keep and return its record."""
        TrialState = self.optuna.trial.TrialState
        number, status = task.report.number, record["status"]
        if status == SKIPPED:  # trained to its end by a command stopped before it said so
            record = dict(record, status=DONE, message="complete in its folder; recorded now")
        if status in COMPLETE and record["best"] is not None:
            self.study.tell(number, record["best"])
        elif status == PRUNED:
            self.study.tell(number, state=TrialState.PRUNED)
        elif status != CANCELLED:
            self.study.tell(number, state=TrialState.FAIL)
            if status in COMPLETE:
                record = dict(record, status=FAILED, message=f"no finite {self.search.monitor} was recorded")
        self.keep(record)
        return record


def _previous(tune_dir: SearchDir, search: Search, overwrite: bool) -> dict:
    """The state of the search this folder holds (empty for a new one). A folder of a different
    search is refused; with ``overwrite``, its study and trials are removed."""
    file = tune_dir.path / TUNE_FILE
    if overwrite:
        for path in tune_dir.path.iterdir():
            if path.name.startswith("trial-") and path.is_dir():
                shutil.rmtree(path)
            elif path.name in (TUNE_FILE, STUDY_FILE):
                path.unlink()
        return {}
    if not file.exists():
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
        raise SearchError(f"{tune_dir.path}: holds a search of a different spec, space or options (it differs in "
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


__all__ = ["Search", "plan", "run"]
