"""The study: an LR range test, then a Ray Tune search of max_lr and peak_epoch around its
estimate (an Optuna sampler), every trial a Ray Train run of the one-cycle loop; then the report.

    python study/run.py --num-samples 8                    # a study on this machine
    python study/run.py --config configs/smoke.yaml --local --num-samples 3
    python study/run.py --resume --name study-20261124T130000Z   # continue an interrupted one
    python study/run.py --address auto ...                 # on a cluster from `ray start --head`

Bad input is refused in one line with exit code 2 before Ray starts or anything is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import shutil
import subprocess
import sys
import time
import typing
from importlib import metadata
from typing import Any

import pandas as pd
import ray

from analysis.experiment import LR_FINDER_JSON, LR_FINDER_PNG, STUDY_JSON, Folder, Role
from analysis.figures import plot_lr_finder
from analysis.report import build_report, sampler_draws, where
from analysis.results import best_trial, write_results
from analysis.trust import edge_check, seed_spread
from study import cost
from study.cluster import dashboard_line, start_ray
from study.plan import (
    BadInput,
    Plan,
    print_plan,
    resolve,
    this_machine,
    trial_resources,
    trials_at_once,
)
from study.search import (
    asha_warning,
    choose_sampler,
    close_orphaned_optuna_trials,
    confirmation_points,
    default_confirm_seeds,
    describe_sampler,
    describe_space,
    make_confirm_tuner,
    make_tuner,
)
from study.trial import Resources, make_trainable
from trainable.config import ConfigError, from_dict, to_dict
from trainable.constants import ENDED, EXIT_BAD_INPUT, EXIT_INTERRUPTED, REPO
from trainable.data import DataError, Splits, load_splits
from trainable.loop import steps_per_epoch
from trainable.lr_range import range_test


class OneLineParser(argparse.ArgumentParser):
    """argparse, refusing bad flags as every other bad input is: one line, exit code 2."""

    def error(self, message: str) -> typing.NoReturn:
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = OneLineParser(prog="python study/run.py", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (default: configs/default.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE", help="override one config value")
    p.add_argument("--data-dir", help="CIFAR-10 directory (sets data.dir)")
    p.add_argument("--num-samples", type=int, help="trials (sets search.num_samples)")
    p.add_argument("--scheduler", help="fifo or asha (sets search.scheduler)")
    p.add_argument("--confirm-seeds", type=int,
                   help="after the search, rerun its top configs with K more seeds each (sets "
                        "search.confirm_seeds; default 2 when trials get a GPU, else 0)")
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


def study_record(args: argparse.Namespace, plan: Plan, resources: Resources,
                 splits: Splits) -> dict[str, Any]:
    """What study.json records before the search: enough to know how the study was run."""
    config = plan.config
    return {"config": to_dict(config),
            "seeds": {"train": config.train.seed, "split": config.data.split_seed,
                      "search": config.train.seed},
            "versions": package_versions(), "git_commit": git_commit(),
            "path": "local" if args.local else "TorchTrainer",
            "sampler": choose_sampler(config).describe(),
            "workers_per_trial": resources.workers,
            "resources_per_trial": resources.per_trial(),
            "selected_on": "test" if splits.val_is_test else "val"}


def write_json(experiment: Folder, name: str, payload: dict[str, Any]) -> None:
    experiment.write_text(name, json.dumps(payload, indent=2))


# Here, not in study.trial: every trial process imports that module, and torch-lr-finder
# brings matplotlib, slow to import (docs/performance.md).
@ray.remote
def remote_range_test(base: dict[str, Any], splits_ref: list) -> dict[str, Any]:
    """The LR range test as a Ray task with one trial worker's resources (so on a GPU node
    whenever the trials are)."""
    return range_test(from_dict(base), ray.get(splits_ref[0]))


def range_test_results(plan: Plan, splits_ref: ray.ObjectRef,
                       resources: Resources) -> dict[str, Any]:
    """The range test's results, from a previous run of this experiment when there is one."""
    if plan.experiment.is_file(LR_FINDER_JSON):
        return json.loads(plan.experiment.read_text(LR_FINDER_JSON))
    bundle = resources.worker_bundle()
    print("LR range test ...", flush=True)
    found = ray.get(remote_range_test.options(
        num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0),
    ).remote(to_dict(plan.config), [splits_ref]))
    with plan.experiment.written(LR_FINDER_PNG) as partial:
        plot_lr_finder(found["lrs"], found["losses"], found["suggested_lr"], partial)
    write_json(plan.experiment, LR_FINDER_JSON, found)
    return found


def all_ended(table: pd.DataFrame, role: Role, expected: int) -> bool:
    """Whether all `expected` trials of this role are in the table, each ended."""
    rows = table[table["role"] == role]
    return len(rows) == expected and bool(rows["status"].isin(ENDED).all())


def resume_command(args: argparse.Namespace, plan: Plan) -> str:
    """The command that continues this study, with the flags that say where it runs."""
    command = ["python", "study/run.py", "--resume", "--name", plan.experiment.name,
               "--storage", str(plan.experiment.parent)]
    for flag in ("address", "workers_per_trial", "cpus_per_worker", "gpus_per_trial"):
        if getattr(args, flag) is not None:
            command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    command += ["--local"] * args.local + ["--no-report"] * args.no_report
    return shlex.join(command)


def interrupted(args: argparse.Namespace, plan: Plan, ended: int, total: int) -> int:
    print(f"interrupted: {ended} of {total} trials ended. Continue with: "
          f"{resume_command(args, plan)}", flush=True)
    return EXIT_INTERRUPTED


def with_confirm_seeds(plan: Plan, resources: Resources) -> Plan:
    """The plan with `search.confirm_seeds` resolved by the trials' device (then saved, so
    that a resume keeps it)."""
    if plan.config.search.confirm_seeds is not None:
        return plan
    seeds = default_confirm_seeds(resources.gpus_per_worker)
    return dataclasses.replace(plan, config=plan.config.replace("search", confirm_seeds=seeds))


def open_experiment(args: argparse.Namespace, plan: Plan, resources: Resources, splits: Splits,
                    estimate: cost.Estimate) -> dict[str, Any]:
    """study.json of a new experiment, written in a fresh folder, or of the one resumed, with
    the wall time its earlier runs took."""
    experiment = plan.experiment
    earlier_s = 0.0
    if plan.resume:
        earlier_s = json.loads(experiment.read_text(STUDY_JSON)).get("wall_s", 0.0)
    else:
        if experiment.exists():  # --overwrite, checked in resolve()
            experiment.remove()
        shutil.rmtree(experiment.cache(), ignore_errors=True)  # an earlier study's, if any
        experiment.make()
    study = {**study_record(args, plan, resources, splits),
             "cost_estimate": estimate.to_dict(), "wall_s": earlier_s}
    write_json(experiment, STUDY_JSON, study)
    return study


def confirm(plan: Plan, study: dict[str, Any], table: pd.DataFrame, trainable,
            resources: Resources, estimate: cost.Estimate) -> tuple[pd.DataFrame, int, bool]:
    """The confirmation runs of a finished search: the table with them, how many there are,
    and whether they all ended."""
    search = plan.config.search
    points = confirmation_points(table, plan.config)
    if not points:
        return table, 0, True
    study["confirmation"] = {"seeds": search.confirm_seeds, "points": points}
    write_json(plan.experiment, STUDY_JSON, study)
    print(f"confirmation: the search's top {len({p['confirms'] for p in points})} configs "
          f"again, {search.confirm_seeds} more seed{'s' * (search.confirm_seeds > 1)} each",
          flush=True)
    make_confirm_tuner(plan.config, plan.experiment, plan.resume, trainable, points,
                       resources.local, [cost.TimeLeft(estimate, len(points))]).fit()
    table = write_results(plan.experiment, plan.config)
    return table, len(points), all_ended(table, Role.CONFIRM, len(points))


def conclude(args: argparse.Namespace, plan: Plan, splits: Splits, study: dict[str, Any],
             table: pd.DataFrame, finished: bool, total: int) -> int:
    """The trials, the best, how far to trust it, and the report; or the resume command."""
    print(table.to_string(index=False), flush=True)
    best = best_trial(table)
    so_far = "" if finished else " so far"
    if best is None:
        print(f"no trial{so_far} completed an epoch without diverging or failing", flush=True)
    else:
        scope = " (selected on the test set: data.val_size=0)" if splits.val_is_test else ""
        print(f"best trial{so_far} {best['trial_id']}: val_acc {best['best_val_acc']:.4f}"
              f"{scope}, max_lr {best['max_lr']:.4g}, peak_epoch {int(best['peak_epoch'])}",
              flush=True)
    if not finished:
        return interrupted(args, plan, int(table["status"].isin(ENDED).sum()), total)
    if best is not None:
        trust = edge_check(best, study["search_space"], plan.config.train.epochs)
        for warning in trust["warnings"]:
            print(f"warning: {warning}", flush=True)
        spread = seed_spread(table, best["trial_id"])
        if spread is not None:
            print(f"confirmation: {spread['verdict']}", flush=True)
    if args.no_report or best is None:
        return 0
    print("\n".join(where(build_report(plan.experiment))), flush=True)
    return 0


def run(args: argparse.Namespace, plan: Plan, splits: Splits) -> int:
    context = start_ray(args, plan.experiment.name)
    try:
        cluster = ray.cluster_resources()
        resources = trial_resources(args, cluster)
        plan = with_confirm_seeds(plan, resources)
        at_once = trials_at_once(resources, cluster, plan.config.search.max_concurrent)
        splits_ref = ray.put(splits)
        estimate = cost.measure(plan.config, splits_ref, splits, resources, at_once)
        said = cost.describe(estimate, plan.config, splits)
        if args.dry_run:
            print_plan(plan, resources, at_once, {**estimate.to_dict(), "said": said})
            return 0
        print("\n".join(said), flush=True)
        print(dashboard_line(context.dashboard_url), flush=True)
        study = open_experiment(args, plan, resources, splits, estimate)

        started = time.monotonic()  # the search: what the estimate's study_s covers
        found = range_test_results(plan, splits_ref, resources)
        print(f"LR range test estimate: {found['suggested_lr']:.4g}", flush=True)
        study.update(estimate=found["suggested_lr"],
                     search_space=describe_space(plan.config, found["suggested_lr"]))
        write_json(plan.experiment, STUDY_JSON, study)
        print(describe_sampler(choose_sampler(plan.config), plan.config.search.num_samples),
              flush=True)
        if (warning := asha_warning(plan.config)) is not None:
            print(f"warning: {warning}", flush=True)

        trainable = make_trainable(to_dict(plan.config), splits_ref, resources,
                                   plan.experiment)
        search = plan.config.search
        make_tuner(plan.config, plan.experiment, plan.resume, trainable,
                   found["suggested_lr"], resources.local,
                   [cost.TimeLeft(estimate, search.num_samples,
                                  later=search.confirm_top * search.confirm_seeds)]).fit()
        table = write_results(plan.experiment, plan.config)
        total = search.num_samples
        finished = all_ended(table, Role.SEARCH, total)
        if finished:
            close_orphaned_optuna_trials(plan.experiment)
            study["sampler"] = sampler_draws(plan.experiment, study["sampler"]) \
                or study["sampler"]
            table, confirm_runs, finished = confirm(plan, study, table, trainable, resources,
                                                    estimate)
            total += confirm_runs
        # The study's wall time (range test, search, confirmation), summed over the driver's
        # runs when resumed.
        write_json(plan.experiment, STUDY_JSON,
                   {**study, "wall_s": study["wall_s"] + time.monotonic() - started,
                    "finished": finished})
    finally:
        ray.shutdown()
    return conclude(args, plan, splits, study, table, finished, total)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = None
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
    except KeyboardInterrupt:  # before the search, or before Tune took over Ctrl-C
        if plan is not None and plan.experiment.is_file(STUDY_JSON):
            return interrupted(args, plan, 0, plan.config.search.num_samples)
        print("interrupted before the study started; nothing was written", flush=True)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
