"""The search: the space around the range test's estimate, the Optuna sampler over it (chosen
by the budget, docs/search-range.md) and the Tuner that runs the trials."""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from typing import Any

import optuna
import pandas as pd
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from analysis.experiment import CONFIRM_DIR, METRIC, MODE, OPTUNA_DB, Folder, optuna_db, optuna_url
from analysis.results import ranked_search_trials
from study.trial import DivergenceStopper
from trainable.config import Config

# Confirmation seeds per top config when trials get a GPU: 2 more make 3 runs a config, the
# fewest that give a spread with a second degree of freedom.
CONFIRM_SEEDS_GPU = 2
ORIGINAL_PEAK = (5, 20)  # the original's LR peaked at epoch 5 of 20
# `search.sampler: auto`: in simulated studies on the measured table, Optuna's GP with 2 random
# startup trials came closest to the best config at 8, 16 and 32 trials, beyond the noise
# (docs/search-range.md).
AUTO_SAMPLER = "gp"
GP_STARTUP_TRIALS = 2
# trials: up to this budget, TPE, QMC and random search were within the simulated studies'
# noise of each other (the budgets measured: 8, 16, 32)
AS_GOOD_AS_RANDOM_UP_TO = 32
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


@dataclass(frozen=True)
class SamplerChoice:
    """The Optuna sampler a study runs, and how many of its first trials it draws at random
    before its model takes over (counted over finished trials, as Optuna does)."""

    name: str  # tpe, gp, qmc or random
    startup_trials: int

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "startup_trials": self.startup_trials}


def choose_sampler(config: Config) -> SamplerChoice:
    """`search.sampler` and `search.startup_trials`, with `auto` and null resolved by the rule
    the simulated searches measured (docs/search-range.md)."""
    search = config.search
    name = AUTO_SAMPLER if search.sampler == "auto" else search.sampler
    if name in ("random", "qmc"):
        return SamplerChoice(name, search.num_samples)  # every trial is a draw of its own
    if search.startup_trials is not None:
        return SamplerChoice(name, search.startup_trials)
    return SamplerChoice(name, fitted_startup_trials(name, search.num_samples))


def fitted_startup_trials(name: str, num_samples: int) -> int:
    """Random startup trials for a study of `num_samples` trials, as measured
    (docs/search-range.md): GP, 2 (the only count simulated, and the best sampler); TPE, a
    quarter of the budget, at least 2 (the best count tried at each budget, or within noise)."""
    return GP_STARTUP_TRIALS if name == "gp" else max(2, num_samples // 4)


def describe_sampler(choice: SamplerChoice, num_samples: int) -> str:
    """The line a study prints before its search: how its trials will be chosen, and what
    that is worth at its budget."""
    how = _how_chosen(choice, num_samples)
    if choice.name != "gp" and num_samples <= AS_GOOD_AS_RANDOM_UP_TO:
        how += ("; at this budget the search is as good as random (simulated on a measured "
                "table: docs/search-range.md)")
    return how


def _how_chosen(choice: SamplerChoice, num_samples: int) -> str:
    if choice.name in ("random", "qmc"):
        how = "random search" if choice.name == "random" else "scrambled Sobol points (QMC)"
        return f"search: the first point, then {how} for {num_samples} trials"
    title = {"tpe": "Optuna's TPE", "gp": "Optuna's GP"}[choice.name]
    if choice.startup_trials >= num_samples:
        return (f"search: {title}, but its {choice.startup_trials} random startup trials "
                f"cover all {num_samples}: this is random search")
    return (f"search: {title} over {num_samples} trials: the first point and random draws "
            f"until {choice.startup_trials} have finished, then its model")


def asha_warning(config: Config) -> str | None:
    """Under ASHA, a rung before the peak range's end compares trials that are still warming
    up with ones that have peaked: on the measured table the best point then lost."""
    peak_end = config.peak_epoch_range[1]
    if config.search.scheduler != "asha" or config.grace_period >= peak_end:
        return None
    return (f"search.grace_period={config.grace_period} lets ASHA stop trials before the peak "
            f"range ends (epoch {peak_end}); there early ranks did not hold "
            "(docs/search-range.md)")


def make_sampler(choice: SamplerChoice, seed: int) -> optuna.samplers.BaseSampler:
    samplers = {
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
        # scrambled: a seeded Sobol sequence of its own per study, not the same points always
        "qmc": lambda: optuna.samplers.QMCSampler(qmc_type="sobol", scramble=True, seed=seed,
                                                  warn_asynchronous_seeding=False),
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed,
                                                  n_startup_trials=choice.startup_trials),
        "gp": lambda: optuna.samplers.GPSampler(seed=seed,
                                                n_startup_trials=choice.startup_trials),
    }
    return samplers[choice.name]()


class StudySearch(OptunaSearch):
    """Ray's OptunaSearch, but Optuna gets every epoch's val_acc as an intermediate value
    (Ray skips the result a scheduler stops a trial on, and a trial's last under ASHA), and a
    trial that a scheduler stopped before its last epoch is told as PRUNED: Ray tells it
    COMPLETE with its cut-off value, so TPE would rank epoch 2 against full runs. A diverged
    trial stays COMPLETE with its finite 0.0, ranked last."""

    def __init__(self, *args, epochs: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.epochs = epochs
        self.reported: dict[str, set[int]] = {}  # epochs told, per trial: each once

    def _report(self, trial_id: str, result: dict[str, Any]) -> None:
        told = self.reported.setdefault(trial_id, set())
        if result["epoch"] not in told:  # a resumed trial may run an epoch again
            self._ot_trials[trial_id].report(result[METRIC], result["epoch"])
            told.add(result["epoch"])

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if trial_id not in self._completed_trials:
            self._report(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None,
                          error: bool = False) -> None:
        if trial_id in self._completed_trials or error or not result or "epoch" not in result:
            super().on_trial_complete(trial_id, result, error)
            return
        self._report(trial_id, result)
        if result.get("diverged") or result["epoch"] >= self.epochs:
            super().on_trial_complete(trial_id, result, error)
            return
        self._ot_study.tell(self._ot_trials[trial_id], state=optuna.trial.TrialState.PRUNED)
        self._completed_trials.add(trial_id)


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


class OptunaCopy(tune.Callback):
    """For a study in a bucket: the driver's Optuna database copied there whenever it has
    changed, checked after every step of Tune's loop (so after every suggestion, result and
    trial end). SQLite cannot live in a bucket."""

    def __init__(self, experiment: Folder):
        self.experiment = experiment
        self.copied: tuple[int, int] | None = None  # (mtime_ns, size) of the last copy

    def copy(self) -> None:
        database = optuna_db(self.experiment)
        if not database.is_file():
            return
        stat = database.stat()
        if (stat.st_mtime_ns, stat.st_size) == self.copied:
            return
        with self.experiment.written(OPTUNA_DB) as partial:
            shutil.copyfile(database, partial)
        self.copied = (stat.st_mtime_ns, stat.st_size)

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        self.copy()

    def on_experiment_end(self, trials: list, **info) -> None:
        self.copy()


def open_optuna_db(experiment: Folder) -> None:
    """For a study in a bucket: its Optuna database on the driver, fetched from the bucket
    when this machine has none (a resume elsewhere). A copy here is the newer one."""
    database = optuna_db(experiment)
    database.parent.mkdir(parents=True, exist_ok=True)
    if not experiment.is_local and not database.is_file() and experiment.is_file(OPTUNA_DB):
        with experiment.local_copy(OPTUNA_DB) as copy:
            shutil.copyfile(copy, database)


def close_orphaned_optuna_trials(experiment: Folder) -> None:
    """Mark FAIL the Optuna trials still RUNNING once Tune has finished: suggestions made by a
    driver that was killed before it saved them, which no Tune trial will ever complete."""
    storage = optuna.storages.RDBStorage(optuna_url(experiment))
    running = (optuna.trial.TrialState.RUNNING,)
    for summary in optuna.get_all_study_summaries(storage):
        study_id = storage.get_study_id_from_name(summary.study_name)
        for trial in storage.get_all_trials(study_id, deepcopy=False, states=running):
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
            storage.set_trial_user_attr(trial_id, "closed_by",
                                        "study/run.py: its driver was killed before saving it")
            storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL)
    storage.remove_session()
    if not experiment.is_local:
        OptunaCopy(experiment).copy()


def make_tuner(config: Config, experiment: Folder, resume: bool, trainable, estimate: float,
               local: bool, callbacks: list[tune.Callback]) -> tune.Tuner:
    """The Tuner of a new study, or of the one in `experiment` when resuming it."""
    os.environ.setdefault(*TUNE_STATE_PERIOD)  # read by Tune's controller, in this process
    search = config.search
    open_optuna_db(experiment)
    if resume and tune.Tuner.can_restore(experiment.uri):  # its callbacks come back with it
        return tune.Tuner.restore(experiment.uri, trainable=trainable,
                                  resume_unfinished=True, resume_errored=True)
    if not experiment.is_local:
        callbacks = [*callbacks, OptunaCopy(experiment)]
    space, first = search_space(config, estimate)
    searcher = StudySearch(
        points_to_evaluate=[first], study_name=experiment.name,
        sampler=make_sampler(choose_sampler(config), config.train.seed),
        storage=optuna.storages.RDBStorage(optuna_url(experiment)), epochs=config.train.epochs,
    )
    if search.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="epoch", max_t=config.train.epochs,
                                  grace_period=config.grace_period)
    else:
        scheduler = FIFOScheduler()
    return tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=METRIC, mode=MODE, search_alg=searcher, scheduler=scheduler,
            num_samples=search.num_samples, max_concurrent_trials=search.max_concurrent,
            **_trial_processes(local)),
        run_config=_run_config(config, experiment, local, callbacks),
    )


def make_confirm_tuner(config: Config, experiment: Folder, resume: bool, trainable,
                       points: list[dict[str, Any]], local: bool,
                       callbacks: list[tune.Callback]) -> tune.Tuner:
    """The confirmation runs (`points`: searched values, `seed`, the trial they `confirm`),
    each once, as a Tune experiment of its own in `<experiment>/confirm/`: the search's
    Tuner can only add trials its searcher suggests."""
    confirm_dir = experiment / CONFIRM_DIR
    if resume and tune.Tuner.can_restore(confirm_dir.uri):
        return tune.Tuner.restore(confirm_dir.uri, trainable=trainable,
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


def _run_config(config: Config, tune_dir: Folder, local: bool,
                callbacks: list[tune.Callback]) -> tune.RunConfig:
    search = config.search
    return tune.RunConfig(
        name=tune_dir.name, storage_path=tune_dir.parent.uri,
        stop=DivergenceStopper(), callbacks=callbacks,
        checkpoint_config=tune.CheckpointConfig(
            num_to_keep=search.num_to_keep, checkpoint_score_attribute=METRIC,
            checkpoint_score_order=MODE),
        # The TorchTrainer path retries inside Ray Train; retrying its driver too would
        # multiply the attempts.
        failure_config=tune.FailureConfig(max_failures=search.max_failures if local else 0),
        verbose=1)
