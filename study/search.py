"""The search: the space around the range test's estimate, the Optuna sampler over it (chosen
by the budget, docs/search-range.md) and the Tuner that runs the trials."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from itertools import count
from typing import Any

import optuna
import pandas as pd
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from analysis.pick import Bounds, Params, Run, next_race, params_of
from analysis.results import ranked_search_trials
from study.space import choose_sampler, first_point, races
from study.trial import DivergenceStopper
from trainable.config import Config
from trainable.experiment import (
    CONFIRM_DIR,
    DIVERGED,
    EPOCH,
    METRIC,
    MODE,
    OPTUNA_DB,
    RACE_ATTRS,
    RACES,
    Folder,
    Role,
    optuna_db,
    optuna_url,
    trial_folder,
)
from trainable.record import ConfirmPoint, Sampler, SearchSpace

# Tune saves the experiment's state (and flushes each trial's result.json) at most every 10 s
# by default; a driver killed in between loses that much, and resumed trials redo it. A save
# is cheap (docs/performance.md). The user's own setting wins.
TUNE_STATE_PERIOD = ("TUNE_GLOBAL_CHECKPOINT_S", "1")
TUNE_TRIAL_ID = "tune_trial_id"  # the Optuna trial's user attribute naming its Tune trial


@dataclass(frozen=True)
class Racing:
    """`search.race` as the searcher runs it (analysis.pick.next_race)."""

    rule: str  # search.pick
    bounds: Bounds  # the searched max_lr and peak epoch ranges
    max_config_calls: int
    race_every: int
    base_seed: int  # train.seed: every search trial's; races take the next ones


def tune_space(space: SearchSpace) -> dict[str, Any]:
    """Tune's space for the one description of it (study.json's)."""
    peak_lo, peak_hi = space.peak_epoch.range
    return {"max_lr": tune.loguniform(*space.max_lr.range),
            "peak_epoch": tune.randint(peak_lo, peak_hi + 1)}  # randint's upper is exclusive


def make_sampler(choice: Sampler, seed: int) -> optuna.samplers.BaseSampler:
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

    def __init__(self, *args, epochs: int, racing: Racing | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.epochs = epochs
        self.racing = racing
        self.reported: dict[str, set[int]] = {}  # epochs told, per trial: each once

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        """Ray's suggestion, or a race of the incumbent when one is due; its Optuna trial
        named after the Tune trial (the user attribute `TUNE_TRIAL_ID`): the sampler may
        suggest one point twice, so values name neither."""
        if trial_id not in self._ot_trials and (race := self._due_race()) is not None:
            return race(trial_id)
        suggested = super().suggest(trial_id)
        if trial_id in self._ot_trials:
            self._ot_trials[trial_id].set_user_attr(TUNE_TRIAL_ID, trial_id)
        return suggested

    def _due_race(self):
        """The race to run next, as a function of the Tune trial's id; None when none is due.
        Read from the Optuna study, which outlives a killed driver."""
        if self.racing is None:
            return None
        runs, in_flight, since_race, first_of = self._runs()
        racing = self.racing
        raced = next_race(runs, in_flight, since_race, racing.rule, racing.bounds,
                          racing.max_config_calls, racing.race_every, racing.base_seed)
        if raced is None:
            return None
        (first_trial, params), seed = first_of[raced[0]], raced[1]  # its values exactly

        def race(trial_id: str) -> dict[str, Any]:
            self._ot_study.enqueue_trial(params, user_attrs={
                RACE_ATTRS[0]: Role.RACE.value, RACE_ATTRS[1]: seed, TUNE_TRIAL_ID: trial_id})
            self._ot_trials[trial_id] = self._ot_study.ask(fixed_distributions=self._space)
            return {**params, "seed": seed, RACES: first_trial}
        return race

    def _runs(self) -> tuple[list[Run], list[tuple[Params, int]], int,
                             dict[Params, tuple[str, dict[str, Any]]]]:
        """From the Optuna study: the ended runs, the configs and seeds in flight, the trials
        asked since the last race, and each config's first Tune trial and its values."""
        states = optuna.trial.TrialState
        runs, in_flight, since_race, first_of = [], [], 0, {}
        # a RUNNING trial that Tune does not know was asked by a driver killed before it saved
        # the searcher: no Tune trial will run it
        known = {trial.number for trial in self._ot_trials.values()}
        for trial in self._ot_study.get_trials(deepcopy=False):
            if trial.state in (states.WAITING, states.FAIL) or not trial.params or (
                    trial.state == states.RUNNING and trial.number not in known):
                continue
            config = params_of(trial.params["max_lr"], trial.params["peak_epoch"])
            first_of.setdefault(config, (trial.user_attrs.get(TUNE_TRIAL_ID, ""),
                                         dict(trial.params)))
            role, seed = (trial.user_attrs.get(attr) for attr in RACE_ATTRS)
            race = role == Role.RACE
            seed = self.racing.base_seed if seed is None else seed
            since_race = 0 if race else since_race + 1
            if trial.state == states.RUNNING:
                in_flight.append((config, seed))
                continue
            scores = list(trial.intermediate_values.values())
            final = trial.value if trial.state == states.COMPLETE else None
            if scores or final is not None:
                runs.append(Run(*config, seed, max(scores or [final]), final,
                                trial.user_attrs.get(TUNE_TRIAL_ID, "")))
        return runs, in_flight, since_race, first_of

    def _report(self, trial_id: str, result: dict[str, Any]) -> None:
        told = self.reported.setdefault(trial_id, set())
        if result[EPOCH] not in told:  # a resumed trial may run an epoch again
            self._ot_trials[trial_id].report(result[METRIC], result[EPOCH])
            told.add(result[EPOCH])

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if trial_id not in self._completed_trials:
            self._report(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None,
                          error: bool = False) -> None:
        if trial_id in self._completed_trials or error or not result or EPOCH not in result:
            super().on_trial_complete(trial_id, result, error)
            return
        self._report(trial_id, result)
        if result.get(DIVERGED) or result[EPOCH] >= self.epochs:
            super().on_trial_complete(trial_id, result, error)
            return
        self._ot_study.tell(self._ot_trials[trial_id], state=optuna.trial.TrialState.PRUNED)
        self._completed_trials.add(trial_id)


def confirmation_points(table: pd.DataFrame, config: Config) -> tuple[ConfirmPoint, ...]:
    """The search's best `search.confirm_top` configs, each with `search.confirm_seeds` more
    seeds: the next of the shared list (`train.seed` + 1, + 2, ...) that its search trial and
    races have not run on."""
    search, seed = config.search, config.train.seed
    ranked = ranked_search_trials(table)
    params = [params_of(m, p) for m, p in zip(ranked["max_lr"], ranked["peak_epoch"],
                                              strict=True)]
    top = ranked[~pd.Series(params, index=ranked.index).duplicated()].head(search.confirm_top)
    points = []
    for _, row in top.iterrows():
        mine = params_of(row["max_lr"], row["peak_epoch"])
        taken = {int(s) for s, m, p in zip(table["seed"], table["max_lr"], table["peak_epoch"],
                                           strict=True) if params_of(m, p) == mine}
        free = (seed + k for k in count(1) if seed + k not in taken)
        points += [ConfirmPoint(max_lr=float(row["max_lr"]), peak_epoch=int(row["peak_epoch"]),
                                seed=next(free), confirms=row["trial_id"])
                   for _ in range(search.confirm_seeds)]
    return tuple(points)


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


def make_tuner(config: Config, experiment: Folder, resume: bool, trainable, space: SearchSpace,
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
    searcher = StudySearch(
        points_to_evaluate=[first_point(config, space)], study_name=experiment.name,
        sampler=make_sampler(choose_sampler(config), config.train.seed),
        storage=optuna.storages.RDBStorage(optuna_url(experiment)), epochs=config.train.epochs,
        racing=Racing(search.pick, (space.max_lr.range, space.peak_epoch.range),
                      search.max_config_calls, search.race_every, config.train.seed)
        if races(config) else None,
    )
    if search.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="epoch", max_t=config.train.epochs,
                                  grace_period=config.grace_period)
    else:
        scheduler = FIFOScheduler()
    return tune.Tuner(
        trainable,
        param_space=tune_space(space),
        tune_config=tune.TuneConfig(
            metric=METRIC, mode=MODE, search_alg=searcher, scheduler=scheduler,
            num_samples=search.num_samples, max_concurrent_trials=search.max_concurrent,
            **_trial_processes(local)),
        run_config=_run_config(config, experiment, local, callbacks),
    )


def make_confirm_tuner(config: Config, experiment: Folder, resume: bool, trainable,
                       points: tuple[ConfirmPoint, ...], local: bool,
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
        param_space={"confirm": tune.grid_search([p.model_dump() for p in points])},
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
        trial_dirname_creator=lambda trial: trial_folder(trial.trial_id))


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
