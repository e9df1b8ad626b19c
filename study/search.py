"""The search: the space around the range test's estimate, Optuna's TPE over it and the
Tuner that runs the trials."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from analysis.experiment import CONFIRM_DIR, METRIC, MODE, optuna_url
from analysis.results import ranked_search_trials
from study.trial import DivergenceStopper
from trainable.config import Config

# Confirmation seeds per top config when trials get a GPU: 2 more make 3 runs a config, the
# fewest that give a spread with a second degree of freedom.
CONFIRM_SEEDS_GPU = 2
ORIGINAL_PEAK = (5, 20)  # the original's LR peaked at epoch 5 of 20
# Tune saves the experiment's state (and flushes each trial's result.json) at most every 10 s
# by default; a driver killed in between loses that much, and resumed trials redo it. A save
# is cheap (docs/performance.md). The user's own setting wins.
TUNE_STATE_PERIOD = ("TUNE_GLOBAL_CHECKPOINT_S", "1")


def search_space(config: Config, estimate: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """The Tune space around the range test's estimate, and the first point to evaluate: the
    middle of the max_lr range (on a log scale) with the original's peak (epoch 5 of 20)
    scaled to this epoch budget."""
    lo, hi = config.search.max_lr_range
    peak_lo, peak_hi = config.peak_epoch_range
    space = {"max_lr": tune.loguniform(estimate * lo, estimate * hi),
             "peak_epoch": tune.randint(peak_lo, peak_hi + 1)}  # randint's upper is exclusive
    peak = round(config.train.epochs * ORIGINAL_PEAK[0] / ORIGINAL_PEAK[1])
    first = {"max_lr": estimate * math.sqrt(lo * hi),
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


def default_confirm_seeds(gpus_per_worker: float) -> int:
    """More seeds for the top configs when trials get a GPU (there each costs minutes);
    none on CPUs, where each costs hours (docs/search-range.md): `--confirm-seeds` asks."""
    return CONFIRM_SEEDS_GPU if gpus_per_worker > 0 else 0


def confirmation_points(table: pd.DataFrame, config: Config) -> list[dict[str, Any]]:
    """The search's best `search.confirm_top` configs, each with `search.confirm_seeds` more
    seeds (after the study's own, which their search trials ran with)."""
    search, seed = config.search, config.train.seed
    top = ranked_search_trials(table).head(search.confirm_top)
    return [{"max_lr": float(row["max_lr"]), "peak_epoch": int(row["peak_epoch"]),
             "seed": seed + extra, "confirms": row["trial_id"]}
            for _, row in top.iterrows() for extra in range(1, search.confirm_seeds + 1)]


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


def make_tuner(config: Config, experiment_dir: Path, resume: bool, trainable, estimate: float,
               local: bool, callbacks: list[tune.Callback]) -> tune.Tuner:
    """The Tuner of a new study, or of the one in `experiment_dir` when resuming it."""
    os.environ.setdefault(*TUNE_STATE_PERIOD)  # read by Tune's controller, in this process
    search = config.search
    if resume and tune.Tuner.can_restore(str(experiment_dir)):
        return tune.Tuner.restore(str(experiment_dir), trainable=trainable,
                                  resume_unfinished=True, resume_errored=True)
    space, first = search_space(config, estimate)
    searcher = OptunaSearch(
        points_to_evaluate=[first], seed=config.train.seed, study_name=experiment_dir.name,
        storage=optuna.storages.RDBStorage(optuna_url(experiment_dir)),
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
            **_trial_processes(local)),
        run_config=_run_config(config, experiment_dir, local, callbacks),
    )


def make_confirm_tuner(config: Config, experiment_dir: Path, resume: bool, trainable,
                       points: list[dict[str, Any]], local: bool,
                       callbacks: list[tune.Callback]) -> tune.Tuner:
    """The confirmation runs (`points`: searched values, `seed`, the trial they `confirm`),
    each once, as a Tune experiment of its own in `<experiment>/confirm/`: the search's
    Tuner can only add trials its searcher suggests."""
    confirm_dir = experiment_dir / CONFIRM_DIR
    if resume and tune.Tuner.can_restore(str(confirm_dir)):
        return tune.Tuner.restore(str(confirm_dir), trainable=trainable,
                                  resume_unfinished=True, resume_errored=True)
    return tune.Tuner(
        trainable,
        param_space={"confirm": tune.grid_search(points)},
        tune_config=tune.TuneConfig(metric=METRIC, mode=MODE,
                                    max_concurrent_trials=config.search.max_concurrent,
                                    **_trial_processes(local)),
        run_config=_run_config(config, confirm_dir, local, callbacks),
    )


def _trial_processes(local: bool) -> dict[str, Any]:
    return dict(
        # A new trial in the last one's process: no Python and torch start per trial.
        # Only with --local: a TorchTrainer trial that Tune stops leaves its Train run
        # behind in the process, so that process cannot take the next trial (Tune would
        # wait on it for ever); ending it ends the run's controller and workers too.
        reuse_actors=local,
        trial_dirname_creator=lambda trial: f"trial_{trial.trial_id}")


def _run_config(config: Config, tune_dir: Path, local: bool,
                callbacks: list[tune.Callback]) -> tune.RunConfig:
    search = config.search
    return tune.RunConfig(
        name=tune_dir.name, storage_path=str(tune_dir.parent),
        stop=DivergenceStopper(), callbacks=callbacks,
        checkpoint_config=tune.CheckpointConfig(
            num_to_keep=search.num_to_keep, checkpoint_score_attribute=METRIC,
            checkpoint_score_order=MODE),
        # The TorchTrainer path retries inside Ray Train; retrying its driver too would
        # multiply the attempts.
        failure_config=tune.FailureConfig(max_failures=search.max_failures if local else 0),
        verbose=1)
