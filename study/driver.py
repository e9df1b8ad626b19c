"""A study once its plan has passed every check (study/run.py): Ray started or joined, the cost
measured, then its phases in order, each reading and adding to the one study record (study.json):
the LR range test, the search, the confirmation runs, and the conclusion with the report.
"""

from __future__ import annotations

import contextlib
import io
import json
import shlex
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING

import pandas as pd
import ray

from analysis.export import CARD_FILE, MODEL_DIR
from analysis.figures import plot_lr_finder
from analysis.report import SUMMARY_JSON, build_report, sampler_draws, where
from analysis.results import load_trials, winner, write_results
from analysis.trust import edge_check, seed_spread
from study import cost, tracking
from study.cluster import dashboard_line, start_ray
from study.plan import Bound, Plan, bind, print_plan, read_record, storage_note
from study.search import (
    close_orphaned_optuna_trials,
    confirmation_points,
    make_confirm_tuner,
    make_tuner,
)
from study.space import (
    asha_warning,
    choose_sampler,
    describe_sampler,
    race_warning,
    search_space,
)
from study.tracking import TrackTrials
from study.trial import make_trainable
from trainable.config import Config
from trainable.constants import ENDED, EXIT_INTERRUPTED, REPO
from trainable.data import Splits, load_splits
from trainable.experiment import (
    LR_FINDER_JSON,
    LR_FINDER_PNG,
    REPORT_DIR,
    RESULTS_CSV,
    SEARCH_ROLES,
    STUDY_JSON,
    Folder,
    Role,
)
from trainable.loop import steps_per_epoch
from trainable.lr_range import range_test
from trainable.record import Confirmation, Estimate, SearchSpace, Seeds, StudyRecord

if TYPE_CHECKING:
    from study.mlflow_runs import Tracker


@dataclass
class Study:
    """A running study, as its phases share it: the plan bound to the cluster, the data (in
    Ray's object store too), the cost estimate, the Tune trainable, and the record so far."""

    plan: Plan
    bound: Bound
    splits: Splits
    splits_ref: ray.ObjectRef
    estimate: Estimate
    record: StudyRecord
    tracker: Tracker | None = None  # the study's MLflow runs, when it is tracked

    @property
    def config(self) -> Config:
        return self.bound.config

    def save(self, **changes) -> None:
        """The record with `changes`, written to study.json."""
        self.record = self.record.model_copy(update=changes)
        self.record.write(self.plan.experiment)


def load_data(plan: Plan) -> Splits:
    """The study's data, checked: at least one full batch to train on."""
    splits = load_splits(plan.config.data)
    steps_per_epoch(plan.config, len(splits.train.labels))
    return splits


def package_versions() -> dict[str, str]:
    names = ("torch", "torchvision", "ray", "optuna", "albumentations", "torch-lr-finder",
             "grad-cam", "numpy", "onecycle-study")
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def new_record(bound: Bound, splits: Splits, estimate: Estimate, wall_s: float) -> StudyRecord:
    """What study.json records before the range test: enough to know how the study was run."""
    config, resources = bound.config, bound.resources
    return StudyRecord(
        config=config,
        seeds=Seeds(train=config.train.seed, split=config.data.split_seed,
                    search=config.train.seed),
        versions=package_versions(), git_commit=git_commit(),
        path="local" if resources.local else "TorchTrainer",
        sampler=choose_sampler(config), workers_per_trial=resources.workers,
        resources_per_trial=resources.per_trial(),
        selected_on="test" if splits.val_is_test else "val",
        cost_estimate=estimate, wall_s=wall_s)


def open_experiment(plan: Plan, bound: Bound, splits: Splits, estimate: Estimate) -> StudyRecord:
    """study.json of a new experiment, written in a fresh folder, or of the one resumed, with
    the wall time its earlier runs took."""
    experiment = plan.experiment
    earlier_s, run_id, earlier = 0.0, None, None
    if plan.resume:
        earlier = read_record(experiment)
        earlier_s, run_id = earlier.wall_s, earlier.mlflow_run_id
    else:
        if experiment.exists():  # --overwrite, checked in resolve()
            experiment.remove()
        shutil.rmtree(experiment.cache(), ignore_errors=True)  # an earlier study's, if any
        experiment.make()
    jobs = earlier.jobs if earlier is not None else ()
    if plan.launch.job is not None:
        jobs = (*jobs, plan.launch.job.submission_id)
    record = new_record(bound, splits, estimate, earlier_s).model_copy(
        update={"mlflow_run_id": run_id, "jobs": jobs})
    record.write(experiment)
    return record


# Here, not in study.trial: every trial process imports that module, and torch-lr-finder
# brings matplotlib, slow to import (docs/performance.md).
@ray.remote
def remote_range_test(config: Config, splits_ref: list) -> dict:
    """The LR range test as a Ray task with one trial worker's resources (so on a GPU node
    whenever the trials are)."""
    return range_test(config, ray.get(splits_ref[0]))


def run_range_test(study: Study) -> None:
    """The range test's estimate and the space around it, into the record; from a previous
    run of this experiment when there is one."""
    experiment = study.plan.experiment
    if experiment.is_file(LR_FINDER_JSON):
        found = json.loads(experiment.read_text(LR_FINDER_JSON))
    else:
        bundle = study.bound.resources.worker_bundle()
        print("LR range test ...", flush=True)
        found = ray.get(remote_range_test.options(
            num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0),
        ).remote(study.config, [study.splits_ref]))
        with experiment.written(LR_FINDER_PNG) as partial:
            plot_lr_finder(found["lrs"], found["losses"], found["suggested_lr"], partial)
        experiment.write_text(LR_FINDER_JSON, json.dumps(found, indent=2))
    estimate = found["suggested_lr"]
    print(f"LR range test estimate: {estimate:.4g}", flush=True)
    study.save(estimate=estimate, search_space=search_space(study.config, estimate))
    if study.tracker is not None:
        study.tracker.log_study(study.record)


def record_results(study: Study) -> pd.DataFrame:
    """results.csv as the study saved it; the same trials and epochs to MLflow, when tracked."""
    trials = load_trials(study.plan.experiment, study.config)
    table = write_results(study.plan.experiment, trials)
    if study.tracker is not None:
        study.tracker.sync(trials)
    return table


def all_ended(table: pd.DataFrame, roles: tuple[Role, ...], expected: int) -> bool:
    """Whether all `expected` trials of these roles are in the table, each ended."""
    rows = table[table["role"].isin(roles)]
    return len(rows) == expected and bool(rows["status"].isin(ENDED).all())


def run_search(study: Study, trainable) -> tuple[pd.DataFrame, bool]:
    """The search's trials: the table of them, and whether they all ended."""
    config, plan = study.config, study.plan
    print(describe_sampler(study.record.sampler, config.search.num_samples), flush=True)
    for warning in (asha_warning(config), race_warning(config)):
        if warning is not None:
            print(f"warning: {warning}", flush=True)
    search = config.search
    time_left = cost.TimeLeft(study.estimate, search.num_samples,
                              later=search.confirm_top * search.confirm_seeds)
    make_tuner(config, plan.experiment, plan.resume, trainable, study.record.search_space,
               study.bound.resources.local, [time_left, TrackTrials(Role.SEARCH)]).fit()
    table = record_results(study)
    finished = all_ended(table, SEARCH_ROLES, search.num_samples)
    if finished:
        close_orphaned_optuna_trials(plan.experiment)
        study.save(sampler=sampler_draws(plan.experiment, study.record.sampler)
                   or study.record.sampler)
    return table, finished


def run_confirmation(study: Study, trainable, table: pd.DataFrame) -> tuple[pd.DataFrame, bool]:
    """The confirmation runs of a finished search: the table with them, and whether they all
    ended."""
    config, plan = study.config, study.plan
    points = confirmation_points(table, config)
    if not points:
        return table, True
    seeds = config.search.confirm_seeds
    study.save(confirmation=Confirmation(seeds=seeds, points=points))
    print(f"confirmation: the search's top {len({p.confirms for p in points})} configs "
          f"again, {seeds} more seed{'s' * (seeds > 1)} each", flush=True)
    make_confirm_tuner(config, plan.experiment, plan.resume, trainable, points,
                       study.bound.resources.local,
                       [cost.TimeLeft(study.estimate, len(points)),
                        TrackTrials(Role.CONFIRM)]).fit()
    table = record_results(study)
    return table, all_ended(table, (Role.CONFIRM,), len(points))


def resume_command(plan: Plan) -> str:
    """The command that continues this study: where it runs; how is in its study.json."""
    command = ["python", "study/run.py", "--resume", "--name", plan.experiment.name,
               "--storage", str(plan.experiment.parent)]
    if plan.launch.address is not None:
        command += ["--address", plan.launch.address]
    command += ["--no-report"] * (not plan.report)
    tracking = plan.tracking
    if tracking is not None and tracking.flag and tracking.shown == tracking.uri:
        command += ["--mlflow", tracking.uri]  # never one with credentials in it
    return shlex.join(command)


def continue_with(plan: Plan) -> str:
    again = " (as a Ray job: submit it, or this job's entrypoint with --resume-if-exists)" \
        if plan.launch.job else ""
    return f"Continue with: {resume_command(plan)}{again}"


def interrupted(plan: Plan, ended: int, total: int) -> int:
    print(f"interrupted: {ended} of {total} trials ended. {continue_with(plan)}", flush=True)
    return EXIT_INTERRUPTED


def stop_on_sigterm(plan: Plan) -> None:
    """SIGTERM (`ray job stop`, a pod deleted) stops the study as Ctrl-C does: whichever
    handles SIGINT now (Tune's saves the experiment; else KeyboardInterrupt) handles it. The
    command that continues it is said at once: `ray job stop` SIGKILLs 3 s later. Set after
    ray.init, whose own handler exits at once."""
    def as_sigint(signum, frame) -> None:
        print(f"interrupted (SIGTERM): stopping the study as on Ctrl-C. {continue_with(plan)}",
              flush=True)
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler):
            handler(signal.SIGINT, frame)
        else:
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, as_sigint)


def said_result(plan: Plan) -> bool:
    """For a finished study run again: its best trial and its report, said without Ray or
    training; False when its report is still to be written."""
    experiment = plan.experiment
    report = experiment / REPORT_DIR
    if not experiment.is_file(RESULTS_CSV) or (plan.report and not report.is_file("index.html")):
        return False
    table = pd.read_csv(io.StringIO(experiment.read_text(RESULTS_CSV)),
                        dtype={"trial_id": str, "confirms": str})
    print(f"{experiment}: finished earlier, {len(table)} trials; nothing to run", flush=True)
    say_winner(table, plan.config, read_record(experiment).search_space)
    if plan.report:
        print("\n".join(where(report)), flush=True)
    return True


def say_winner(table: pd.DataFrame, config: Config, space: SearchSpace, so_far: str = "",
               scope: str = "") -> pd.Series | None:
    """The winner's line (and why its rule fell back, if it did); the winner's row, with how
    it was picked (`pick`, `estimated_val_acc`, `estimated_val_acc_se`)."""
    found = winner(table, config.search, space)
    if found is None:
        return None
    best, chosen = found
    races = int((table["role"] == Role.RACE).sum())
    print(f"best trial{so_far} {best['trial_id']} (pick: {chosen.rule}; {races} of "
          f"{int(table['role'].isin(SEARCH_ROLES).sum())} search trials were races): max_lr "
          f"{best['max_lr']:.4g}, peak_epoch {int(best['peak_epoch'])}{scope}; "
          f"{chosen.sentence()}", flush=True)
    if chosen.note is not None:
        print(f"note: {chosen.note}", flush=True)
    return pd.concat([best, pd.Series({"pick": chosen.rule, "estimated_val_acc": chosen.estimate,
                                       "estimated_val_acc_se": chosen.estimate_se})])


def conclude(study: Study, table: pd.DataFrame, finished: bool, total: int) -> int:
    """The trials, the best, how far to trust it, and the report; or the resume command."""
    print(table.to_string(index=False), flush=True)
    so_far = "" if finished else " so far"
    scope = " (selected on the test set: data.val_size=0)" if study.splits.val_is_test else ""
    best = say_winner(table, study.config, study.record.search_space, so_far, scope)
    if best is None:
        print(f"no trial{so_far} completed an epoch without diverging or failing", flush=True)
    if not finished:
        return interrupted(study.plan, int(table["status"].isin(ENDED).sum()), total)
    if best is not None:
        trust = edge_check(best, study.record.search_space, study.config.train.epochs)
        for warning in trust["warnings"]:
            print(f"warning: {warning}", flush=True)
        spread = seed_spread(table, best["trial_id"])
        if spread is not None:
            print(f"confirmation: {spread['verdict']}", flush=True)
    report = None
    if study.plan.report and best is not None:
        report = build_report(study.plan.experiment)
        print("\n".join(where(report)), flush=True)
    if study.tracker is not None:
        finish_tracking(study, best, report)
    return 0


def finish_tracking(study: Study, best: pd.Series | None, report: Folder | None) -> None:
    """The study's parent run ended: the winner, the verdict, study.json and the report."""
    experiment = study.plan.experiment
    with contextlib.ExitStack() as stack:
        record = stack.enter_context(experiment.local_copy(STUDY_JSON))
        summary, folder, files = None, None, [record]
        if report is not None:
            folder = stack.enter_context(experiment.local_copy(REPORT_DIR))
            summary = json.loads((folder / SUMMARY_JSON).read_text())
            files.append(folder / MODEL_DIR / CARD_FILE)
        study.tracker.finish(summary, None if best is None else best.to_dict(), files, folder)


def run(plan: Plan, splits: Splits) -> int:
    context = start_ray(plan.experiment.name, plan.launch.join, plan.launch.dashboard_host)
    stop_on_sigterm(plan)
    try:
        bound = bind(plan, ray.cluster_resources())
        note = storage_note(plan, sum(node["Alive"] for node in ray.nodes()))
        splits_ref = ray.put(splits)
        estimate = cost.measure(bound, splits_ref, splits)
        said = cost.describe(estimate, bound.config, splits)
        if plan.dry_run:
            print_plan(plan, bound, {**estimate.model_dump(), "said": said}, note)
            return 0
        job = plan.launch.job
        print(f"experiment: {plan.experiment}"
              + (f" (Ray job {job.submission_id})" if job else ""), flush=True)
        if note is not None:
            print(f"warning: {note}", flush=True)
        print("\n".join(said), flush=True)
        print(dashboard_line(context.dashboard_url), flush=True)
        record = open_experiment(plan, bound, splits, estimate)
        study = Study(plan, bound, splits, splits_ref, estimate, record,
                      tracker=open_tracking(plan, record))
        if study.tracker is not None:
            study.save(mlflow_run_id=study.tracker.parent_run_id)

        started = time.monotonic()  # the search: what the estimate's study_s covers
        with tracking.active(study.tracker):
            run_range_test(study)
            trainable = make_trainable(study.config, splits_ref, bound.resources,
                                       plan.experiment)
            table, finished = run_search(study, trainable)
            total = study.config.search.num_samples
            if finished:
                table, finished = run_confirmation(study, trainable, table)
                total += len(study.record.confirmation.points) \
                    if study.record.confirmation else 0
        # The study's wall time (range test, search, confirmation), summed over the driver's
        # runs when resumed.
        study.save(wall_s=study.record.wall_s + time.monotonic() - started, finished=finished)
    finally:
        ray.shutdown()
    return conclude(study, table, finished, total)


def open_tracking(plan: Plan, record: StudyRecord) -> Tracker | None:
    """The study's MLflow runs (its parent run continued on resume), when it is tracked."""
    if plan.tracking is None:
        return None
    from study.mlflow_runs import open_tracker  # mlflow: only for a tracked study

    print(f"MLflow: {plan.tracking.shown}, experiment {plan.experiment.name}", flush=True)
    return open_tracker(plan.tracking.uri, plan.tracking.shown, record, plan.experiment.name,
                        plan.config)
