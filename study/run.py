"""The study: an LR range test, then a Ray Tune search of max_lr and peak_epoch around its
estimate (Optuna TPE), every trial a Ray Train run of the one-cycle loop; then the report.

    python study/run.py --num-samples 8                    # a study on this machine
    python study/run.py --config configs/smoke.yaml --local --num-samples 3
    python study/run.py --resume --name study-20261124T130000Z   # continue an interrupted one
    python study/run.py --address auto ...                 # on a cluster from `ray start --head`

Bad input is refused in one line with exit code 2 before Ray starts or anything is written.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import typing
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import optuna
import ray
import torch
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from analysis.figures import plot_lr_finder
from analysis.report import build_report
from study.layout import LR_FINDER_JSON, LR_FINDER_PNG, STUDY_JSON, optuna_url
from study.results import ENDED, best_trial, write_results
from study.trial import (
    DRIVER_CPU,
    METRIC,
    MODE,
    RAY_ENV,
    DivergenceStopper,
    Resources,
    make_trainable,
)
from trainable.config import Config, ConfigError, from_dict, load_config, to_dict
from trainable.data import DataError, Splits, load_splits
from trainable.loop import steps_per_epoch
from trainable.lr_range import range_test
from trainable.model import build_model

EXIT_BAD_INPUT = 2
REPO = Path(__file__).resolve().parents[1]
ORIGINAL_PEAK = (5, 20)  # the original's LR peaked at epoch 5 of 20
# Tune saves the experiment's state (and flushes each trial's result.json) at most every 10 s
# by default; a driver killed in between loses that much, and resumed trials redo it. Every
# second costs a few ms per save here. The user's own setting wins.
TUNE_STATE_PERIOD = ("TUNE_GLOBAL_CHECKPOINT_S", "1")


class BadInput(ValueError):
    """Input refused before any work: printed as one line, exit code 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, refusing bad flags as every other bad input is: one line, exit code 2."""

    def error(self, message: str) -> typing.NoReturn:
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = OneLineParser(prog="python study/run.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "default.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE", help="override one config value")
    p.add_argument("--data-dir", help="CIFAR-10 directory (sets data.dir)")
    p.add_argument("--num-samples", type=int, help="trials (sets search.num_samples)")
    p.add_argument("--scheduler", help="fifo or asha (sets search.scheduler)")
    p.add_argument("--storage", default="runs", help="folder holding experiments")
    p.add_argument("--name", help="experiment name (default study-<UTC timestamp>)")
    p.add_argument("--resume", action="store_true", help="continue the experiment --name")
    p.add_argument("--overwrite", action="store_true", help="replace the experiment --name")
    p.add_argument("--local", action="store_true",
                   help="run each trial's loop in its Tune trainable: one process, no "
                        "TorchTrainer (what the tests use)")
    p.add_argument("--workers-per-trial", type=int,
                   help="Ray Train workers (DDP) per trial, default 1; train.batch_size is the "
                        "global batch, each worker takes batch_size / workers")
    p.add_argument("--cpus-per-worker", type=float,
                   help="default: 1 less the trial driver's 0.01, so that a trial holds "
                        "whole CPUs and N CPUs fit N one-worker trials")
    p.add_argument("--gpus-per-trial", type=float,
                   help="GPUs per trial, fractions allowed (default: 1 if the cluster has "
                        "GPUs, else 0)")
    p.add_argument("--address", help="join a running cluster ('auto' or host:port)")
    p.add_argument("--dashboard-host", default="127.0.0.1",
                   help="interface the dashboard listens on (only when starting Ray)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    p.add_argument("--no-report", action="store_true", help="skip the analysis at the end")
    return p.parse_args(argv)


# --- everything checked before Ray starts ----------------------------------------------------

@dataclass(frozen=True)
class Plan:
    config: Config
    experiment_dir: Path
    resume: bool


def workers_per_trial(args: argparse.Namespace) -> int:
    return 1 if args.workers_per_trial is None else args.workers_per_trial


def resolve(args: argparse.Namespace) -> Plan:
    """The config and the experiment directory, all checked; nothing written."""
    if args.local and args.workers_per_trial is not None:
        raise BadInput("--local runs each trial in one process: drop --workers-per-trial")
    workers = workers_per_trial(args)
    if workers < 1:
        raise BadInput(f"--workers-per-trial={workers}: must be at least 1")
    if args.cpus_per_worker is not None and not 0 < args.cpus_per_worker < math.inf:
        raise BadInput(f"--cpus-per-worker={args.cpus_per_worker}: must be positive")
    if args.gpus_per_trial is not None and not 0 <= args.gpus_per_trial < math.inf:
        raise BadInput(f"--gpus-per-trial={args.gpus_per_trial}: must be 0 or more")
    if args.resume and args.overwrite:
        raise BadInput("--resume and --overwrite exclude each other")
    if args.resume and not args.name:
        raise BadInput("--resume needs --name of the experiment to continue")

    storage = Path(args.storage).resolve()
    name = args.name or datetime.datetime.now(datetime.UTC).strftime("study-%Y%m%dT%H%M%SZ")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise BadInput(f"--name {name!r}: must be a plain folder name "
                       "(letters, digits, '.', '_', '-'; not starting with '.' or '-')")
    experiment_dir = storage / name

    overrides = list(args.overrides)
    for flag, key in ((args.data_dir, "data.dir"), (args.num_samples, "search.num_samples"),
                      (args.scheduler, "search.scheduler")):
        if flag is not None:
            overrides.append(f"{key}={json.dumps(flag)}")
    if args.resume:
        saved = experiment_dir / STUDY_JSON
        if not saved.is_file():
            raise BadInput(f"{experiment_dir}: no experiment to resume ({STUDY_JSON} missing)")
        if overrides or args.config != parse_args([]).config:
            raise BadInput("--resume continues with the experiment's own config: "
                           "drop --config, --set and the flags that change it")
        config = from_dict(json.loads(saved.read_text())["config"])
    else:
        if experiment_dir.exists() and not args.overwrite:
            raise BadInput(f"{experiment_dir}: experiment exists; use --resume to continue it "
                           "or --overwrite to replace it")
        config = load_config(args.config, overrides)
        if config.peak_epoch_range[1] > config.train.epochs:
            raise BadInput(f"train.epochs={config.train.epochs}: a study needs at least 2 "
                           "epochs to search the peak epoch")
        # Absolute, so that trials on other processes and the report find the data.
        config = config.replace("data", dir=str(Path(config.data.dir).resolve()))
    if config.train.batch_size % workers:
        raise BadInput(f"train.batch_size={config.train.batch_size} (the global batch) does not "
                       f"split evenly over --workers-per-trial={workers}")
    check_storage(experiment_dir, config)
    return Plan(config, experiment_dir, args.resume)


def checkpoint_bytes(config: Config) -> int:
    """Bytes of one trial checkpoint: the model's state and SGD's momentum, one per weight."""
    model = build_model(config.model.name)
    tensors = list(model.state_dict().values()) + list(model.parameters())
    return sum(t.numel() * t.element_size() for t in tensors)


def check_storage(experiment_dir: Path, config: Config) -> None:
    """Refuse a storage place the study could not finish in: not a writable folder, or with
    less free space than every trial's kept checkpoints (a full disk mid-study loses trials)."""
    existing = next(p for p in (experiment_dir, *experiment_dir.parents) if p.exists())
    if not existing.is_dir():
        raise BadInput(f"{existing}: not a folder, so it cannot hold the experiment")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise BadInput(f"{existing}: cannot write there ({err.strerror})") from None
    search = config.search
    each = checkpoint_bytes(config)
    need = search.num_samples * search.num_to_keep * each
    free = shutil.disk_usage(existing).free
    if free < need:
        raise BadInput(f"{existing}: {free / 1e9:.2f} GB free, the study's checkpoints need "
                       f"{need / 1e9:.2f} GB ({search.num_samples} trials x "
                       f"{search.num_to_keep} kept x {each / 1e6:.0f} MB); free space or "
                       "lower search.num_samples or search.num_to_keep")


def search_space(config: Config, estimate: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """The Tune space around the range test's estimate, and the first point to evaluate: the
    estimate itself (brought into the range if the range leaves it out) with the original's
    peak (epoch 5 of 20) scaled to this epoch budget."""
    lo, hi = config.search.max_lr_range
    peak_lo, peak_hi = config.peak_epoch_range
    space = {"max_lr": tune.loguniform(estimate * lo, estimate * hi),
             "peak_epoch": tune.randint(peak_lo, peak_hi + 1)}  # randint's upper is exclusive
    peak = round(config.train.epochs * ORIGINAL_PEAK[0] / ORIGINAL_PEAK[1])
    first = {"max_lr": min(max(estimate, estimate * lo), estimate * hi),
             "peak_epoch": min(max(peak, peak_lo), peak_hi)}
    return space, first


def describe_space(config: Config, estimate: float | None) -> dict[str, Any]:
    lo, hi = config.search.max_lr_range
    described = {"max_lr": {"distribution": "log-uniform", "estimate_times": [lo, hi]},
                 "peak_epoch": {"distribution": "integer uniform",
                                "range": list(config.peak_epoch_range)}}
    if estimate is not None:
        described["max_lr"]["range"] = [estimate * lo, estimate * hi]
    return described


# --- the run ---------------------------------------------------------------------------------

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


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write via a temporary file, so a crash never leaves half a file."""
    partial_path = path.with_suffix(path.suffix + ".partial")
    partial_path.write_text(json.dumps(payload, indent=2))
    os.replace(partial_path, path)


def this_machine() -> dict[str, float]:
    """The resources the Ray this study starts will have (it is told them), known before it
    starts, so that a trial too big for them is refused first."""
    return {"CPU": float(len(os.sched_getaffinity(0))),
            "GPU": float(torch.cuda.device_count())}


def start_ray(args: argparse.Namespace):
    if args.address:
        return ray.init(address=args.address, runtime_env={"env_vars": RAY_ENV},
                        log_to_driver=False)
    os.environ.update(RAY_ENV)
    machine = this_machine()
    return ray.init(num_cpus=int(machine["CPU"]), num_gpus=int(machine["GPU"]),
                    include_dashboard=True, dashboard_host=args.dashboard_host,
                    log_to_driver=False)


def trial_resources(args: argparse.Namespace, cluster: dict[str, float]) -> Resources:
    gpus = args.gpus_per_trial
    if gpus is None:
        gpus = 1.0 if cluster.get("GPU", 0) and not args.local else 0.0
    if gpus and not cluster.get("GPU", 0):
        raise BadInput(f"--gpus-per-trial={gpus}: the cluster has no GPU")
    if gpus > cluster.get("GPU", 0):
        raise BadInput(f"--gpus-per-trial={gpus}: the cluster has only {cluster['GPU']:g} "
                       "GPUs; the trial would wait forever")
    workers = workers_per_trial(args)
    if args.local:
        cpus = 1.0
    elif args.cpus_per_worker is None:
        cpus = 1.0 - DRIVER_CPU / workers
    else:
        cpus = args.cpus_per_worker
    resources = Resources(workers, cpus, gpus / workers, args.local)
    for kind, need in resources.per_trial().items():
        if need > cluster.get(kind, 0):
            raise BadInput(f"one trial needs {need:g} {kind} ({resources.workers} workers) but "
                           f"the cluster has {cluster.get(kind, 0):g}; the trial would wait "
                           "forever")
    return resources


def trials_at_once(resources: Resources, cluster: dict[str, float], max_concurrent: int) -> int:
    fits = min(math.floor(cluster.get(kind, 0) / need + 1e-9)
               for kind, need in resources.per_trial().items() if need)
    return min(fits, max_concurrent)


def print_plan(plan: Plan, resources: Resources, at_once: int, estimate: float | None) -> None:
    config = plan.config
    print(json.dumps({
        "experiment": str(plan.experiment_dir),
        "config": to_dict(config),
        "search_space": describe_space(config, estimate),
        "trials": config.search.num_samples,
        "resources_per_trial": resources.per_trial(),
        "workers_per_trial": resources.workers,
        "batch_size_per_worker": config.train.batch_size // resources.workers,
        "path": "local (loop in the Tune trainable)" if resources.local else "TorchTrainer",
        "max_concurrent": config.search.max_concurrent,
        "trials_fitting_at_once": at_once,
    }, indent=2))


# Here, not in study.trial: every trial process imports that module, and torch-lr-finder
# brings matplotlib (0.4 s a process).
@ray.remote
def remote_range_test(base: dict[str, Any], splits_ref: list) -> dict[str, Any]:
    """The LR range test as a Ray task with one trial worker's resources (so on a GPU node
    whenever the trials are)."""
    return range_test(from_dict(base), ray.get(splits_ref[0]))


def range_test_results(plan: Plan, splits_ref: ray.ObjectRef,
                       resources: Resources) -> dict[str, Any]:
    """The range test's results, from a previous run of this experiment when there is one."""
    saved = plan.experiment_dir / LR_FINDER_JSON
    if saved.is_file():
        return json.loads(saved.read_text())
    bundle = resources.worker_bundle()
    print("LR range test ...", flush=True)
    found = ray.get(remote_range_test.options(
        num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0),
    ).remote(to_dict(plan.config), [splits_ref]))
    plot_lr_finder(found["lrs"], found["losses"], found["suggested_lr"],
                   plan.experiment_dir / LR_FINDER_PNG)
    write_json(saved, found)
    return found


def close_orphaned_optuna_trials(experiment_dir: Path) -> None:
    """Mark FAIL the Optuna trials still RUNNING once Tune has finished: suggestions made by a
    driver that was killed before it saved them, which no Tune trial will ever complete."""
    storage = optuna.storages.RDBStorage(optuna_url(experiment_dir))
    running = (optuna.trial.TrialState.RUNNING,)
    for summary in optuna.get_all_study_summaries(storage):
        study_id = storage.get_study_id_from_name(summary.study_name)
        for trial in storage.get_all_trials(study_id, deepcopy=False, states=running):
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
            storage.set_trial_user_attr(trial_id, "closed_by",
                                        "study/run.py: its driver was killed before saving it")
            storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL)


def make_tuner(plan: Plan, trainable, estimate: float, local: bool) -> tune.Tuner:
    os.environ.setdefault(*TUNE_STATE_PERIOD)  # read by Tune's controller, in this process
    config = plan.config
    search = config.search
    if plan.resume and tune.Tuner.can_restore(str(plan.experiment_dir)):
        return tune.Tuner.restore(str(plan.experiment_dir), trainable=trainable,
                                  resume_unfinished=True, resume_errored=True)
    space, first = search_space(config, estimate)
    searcher = OptunaSearch(
        points_to_evaluate=[first], seed=config.train.seed, study_name=plan.experiment_dir.name,
        storage=optuna.storages.RDBStorage(optuna_url(plan.experiment_dir)),
    )
    if search.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="epoch", max_t=config.train.epochs,
                                  grace_period=search.grace_period)
    else:
        scheduler = FIFOScheduler()
    return tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=METRIC, mode=MODE, search_alg=searcher, scheduler=scheduler,
            num_samples=search.num_samples, max_concurrent_trials=search.max_concurrent,
            # A new trial in the last one's process: no Python and torch start per trial.
            # Only with --local: a TorchTrainer trial that Tune stops leaves its Train run
            # behind in the process, so that process cannot take the next trial (Tune would
            # wait on it for ever); ending it ends the run's controller and workers too.
            reuse_actors=local,
            trial_dirname_creator=lambda trial: f"trial_{trial.trial_id}"),
        run_config=tune.RunConfig(
            name=plan.experiment_dir.name, storage_path=str(plan.experiment_dir.parent),
            stop=DivergenceStopper(),
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=search.num_to_keep, checkpoint_score_attribute=METRIC,
                checkpoint_score_order=MODE),
            # The TorchTrainer path retries inside Ray Train; retrying its driver too would
            # multiply the attempts.
            failure_config=tune.FailureConfig(
                max_failures=search.max_failures if local else 0),
            verbose=1),
    )


def run(args: argparse.Namespace, plan: Plan, splits: Splits) -> int:
    context = start_ray(args)
    try:
        cluster = ray.cluster_resources()
        resources = trial_resources(args, cluster)
        at_once = trials_at_once(resources, cluster, plan.config.search.max_concurrent)
        if args.dry_run:
            print_plan(plan, resources, at_once, None)
            return 0
        print(f"Ray dashboard: http://{context.dashboard_url}" if context.dashboard_url
              else "Ray dashboard: not running", flush=True)
        if not plan.resume:
            if plan.experiment_dir.exists():  # --overwrite, checked in resolve()
                shutil.rmtree(plan.experiment_dir)
            plan.experiment_dir.mkdir(parents=True)
        study = {"config": to_dict(plan.config), "seeds": {
            "train": plan.config.train.seed, "split": plan.config.data.split_seed,
            "search": plan.config.train.seed},
            "versions": package_versions(), "git_commit": git_commit(),
            "path": "local" if args.local else "TorchTrainer",
            "workers_per_trial": resources.workers,
            "resources_per_trial": resources.per_trial(), "selected_on":
            "test" if splits.val_is_test else "val"}
        write_json(plan.experiment_dir / STUDY_JSON, study)

        splits_ref = ray.put(splits)
        found = range_test_results(plan, splits_ref, resources)
        estimate = found["suggested_lr"]
        print(f"LR range test estimate: {estimate:.4g}", flush=True)
        write_json(plan.experiment_dir / STUDY_JSON, {
            **study, "estimate": estimate, "search_space": describe_space(plan.config, estimate)})

        trainable = make_trainable(to_dict(plan.config), splits_ref, resources,
                                   plan.experiment_dir)
        make_tuner(plan, trainable, estimate, resources.local).fit()
        table = write_results(plan.experiment_dir, plan.config)
        if len(table) == plan.config.search.num_samples and table["status"].isin(ENDED).all():
            close_orphaned_optuna_trials(plan.experiment_dir)
    finally:
        ray.shutdown()
    print(table.to_string(index=False), flush=True)
    best = best_trial(table)
    if best is None:
        print("no trial completed an epoch without diverging or failing", flush=True)
    else:
        scope = " (selected on the test set: data.val_size=0)" if splits.val_is_test else ""
        print(f"best trial {best['trial_id']}: val_acc {best['best_val_acc']:.4f}{scope}, "
              f"max_lr {best['max_lr']:.4g}, peak_epoch {int(best['peak_epoch'])}", flush=True)
    if args.no_report or best is None:
        return 0
    report = build_report(plan.experiment_dir)
    print(f"report: {report / 'index.html'}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        plan = resolve(args)
        if not args.address:
            trial_resources(args, this_machine())  # a trial too big for it, before Ray starts
        splits = load_splits(plan.config.data)
        steps_per_epoch(plan.config, len(splits.train.labels))
        return run(args, plan, splits)
    except (BadInput, ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
