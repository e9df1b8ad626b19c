"""What a study left on disk, read through Ray Tune's results API: one row per trial, and the
per-epoch history of each. Used at the end of a study and by the analysis."""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, replace

import pandas as pd
import ray.train
from pyarrow.fs import FileType
from ray import tune
from ray.tune.experiment import Trial as TuneTrial

from analysis.pick import Pick, Run, params_of, pick
from trainable.config import Config, SearchConfig
from trainable.constants import TrialStatus
from trainable.experiment import (
    CONFIRM_DIR,
    DIVERGED,
    EPOCH,
    METRIC,
    MODE,
    RACES,
    RESULTS_CSV,
    SEARCH_ROLES,
    SEARCHED,
    STARTUP_S,
    TRAIN_RUNS,
    TUNE_STATE,
    Folder,
    Role,
    one_per_epoch,
    role_of,
    train_run_name,
    trial_id_of_folder,
    without_diverged,
)
from trainable.record import SearchSpace

COLUMNS = ["trial_id", "role", "confirms", "seed", "status", "max_lr", "peak_epoch",
           "epochs_run", "best_val_acc", "final_val_acc", "val_loss", "train_loss", "wall_s",
           STARTUP_S, "train_s", "val_s", "config_seeds", "config_mean_val_acc", "checkpoint"]


@dataclass(frozen=True)
class Trial:
    trial_id: str
    role: Role
    confirms: str | None  # a race or confirmation run: the trial whose config it runs again
    seed: int  # train.seed
    status: str  # a TrialStatus, or Tune's own for an interrupted trial (PENDING, ...)
    config: dict  # the searched values
    history: pd.DataFrame  # one row per epoch reported, by the `epoch` metric
    checkpoint: str | None  # the best epoch's checkpoint: its folder's path or URI


def _reported_epochs(result: ray.tune.Result) -> pd.DataFrame:
    frame = result.metrics_dataframe
    if frame is None or EPOCH not in frame:
        return pd.DataFrame(columns=[EPOCH, METRIC])
    return one_per_epoch(frame)


# Reading a finished Train run back logs, at INFO, advice meant for starting a new run there.
TRAIN_SNAPSHOT_LOGGER = "ray.train.v2._internal.execution.checkpoint.checkpoint_manager"


@contextlib.contextmanager
def _quiet(logger_name: str):
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _best_checkpoint(result: ray.tune.Result, experiment: Folder, trial_id: str) -> str | None:
    """The URI of the trial's best checkpoint (a local path for a local experiment)."""
    train_run = experiment / TRAIN_RUNS / train_run_name(trial_id)
    if train_run.is_dir():  # the TorchTrainer path: Ray Train kept the checkpoints
        with _quiet(TRAIN_SNAPSHOT_LOGGER):
            run = ray.train.Result.from_path(train_run.uri)
        checkpoint = run.get_best_checkpoint(METRIC, MODE)
    else:
        scored = [(m.get(METRIC, -math.inf), c) for c, m in result.best_checkpoints or []
                  if not m.get(DIVERGED)]
        checkpoint = max(scored, key=lambda item: item[0])[1] if scored else None
    if checkpoint is None or \
            checkpoint.filesystem.get_file_info(checkpoint.path).type != FileType.Directory:
        return None
    return experiment.uri_of(checkpoint.path)


def _load_experiment(tune_dir: Folder, experiment: Folder, config: Config,
                     role: Role) -> list[Trial]:
    """The trials of one Tune experiment: the search's, or the confirmation runs'."""
    analysis = tune.ExperimentAnalysis(tune_dir.uri, default_metric=METRIC,
                                       default_mode=MODE)
    status_of = {t.trial_id: t.status for t in analysis.trials}
    trials = []
    for result in tune.ResultGrid(analysis):
        trial_id = trial_id_of_folder(result.path)
        history = _reported_epochs(result)
        last = history.iloc[-1] if len(history) else None
        if result.error is not None or status_of.get(trial_id) == TuneTrial.ERROR:
            status = TrialStatus.ERROR
        elif last is not None and bool(last.get(DIVERGED, False)):
            status = TrialStatus.DIVERGED
        elif last is not None and int(last[EPOCH]) >= config.train.epochs:
            status = TrialStatus.COMPLETED
        elif status_of.get(trial_id) == TuneTrial.TERMINATED:
            status = TrialStatus.STOPPED
        else:
            status = status_of.get(trial_id, "UNKNOWN")  # interrupted: PENDING, RUNNING, ...
        params = dict(result.config or {})
        point = params.get("confirm", params)
        trials.append(Trial(trial_id, role_of(params, role),
                            point.get("confirms", params.get(RACES)),
                            point.get("seed", config.train.seed),
                            status, {k: point.get(k) for k in SEARCHED}, history,
                            _best_checkpoint(result, experiment, trial_id)))
    return sorted(trials, key=lambda t: t.trial_id)


def load_trials(experiment: Folder, config: Config) -> list[Trial]:
    """The search's trials, then the confirmation runs' (when the study made some)."""
    trials = _load_experiment(experiment, experiment, config, Role.SEARCH)
    confirm_dir = experiment / CONFIRM_DIR
    if confirm_dir.names(TUNE_STATE):
        trials += _load_experiment(confirm_dir, experiment, config, Role.CONFIRM)
    return trials


def trial_table(trials: list[Trial]) -> pd.DataFrame:
    rows = []
    for trial in trials:
        h = trial.history
        good = without_diverged(h)
        last = good.iloc[-1] if len(good) else {}
        rows.append({
            "trial_id": trial.trial_id, "role": trial.role, "confirms": trial.confirms,
            "seed": trial.seed, "status": trial.status,
            **{k: trial.config.get(k) for k in SEARCHED},
            "epochs_run": int(h[EPOCH].max()) if len(h) else 0,
            "best_val_acc": float(good[METRIC].max()) if len(good) else math.nan,
            "final_val_acc": last.get(METRIC, math.nan),
            "val_loss": last.get("val_loss", math.nan),
            "train_loss": last.get("train_loss", math.nan),
            "wall_s": last.get("time_total_s", math.nan),
            # its first run's start-up; the seconds of every epoch it reported
            STARTUP_S: h[STARTUP_S].iloc[0] if STARTUP_S in h and len(h) else math.nan,
            "train_s": h["epoch_s"].sum() if "epoch_s" in h else math.nan,
            "val_s": h["val_s"].sum() if "val_s" in h else math.nan,
            "checkpoint": trial.checkpoint,
        })
    table = pd.DataFrame(rows, columns=COLUMNS)
    # each config's finished runs, whatever made them: their seeds and mean final val_acc
    finished: dict[tuple[float, int], list[Run]] = {}
    for run in runs_of(table):
        if run.final is not None:
            finished.setdefault(run.params, []).append(run)
    mine = [finished.get(params_of(m, p), []) if pd.notna(m) and pd.notna(p) else []
            for m, p in zip(table["max_lr"], table["peak_epoch"], strict=True)]
    table["config_seeds"] = [" ".join(str(s) for s in sorted(r.seed for r in runs))
                             for runs in mine]
    table["config_mean_val_acc"] = [sum(r.final for r in runs) / len(runs) if runs else math.nan
                                    for runs in mine]
    return table


def write_results(experiment: Folder, trials: list[Trial]) -> pd.DataFrame:
    """results.csv of `trials` (`load_trials`'), written whole; its table."""
    table = trial_table(trials)
    with experiment.written(RESULTS_CSV) as partial:
        table.to_csv(partial, index=False)
    return table


def runs_of(table: pd.DataFrame) -> list[Run]:
    """Every run in the table that reported an epoch (ERROR ones aside), search, race and
    confirmation alike: finished when COMPLETED (its final val_acc) or DIVERGED (0.0)."""
    runs = []
    for row in table.itertuples():
        diverged = row.status == TrialStatus.DIVERGED
        if row.status == TrialStatus.ERROR or (math.isnan(row.best_val_acc) and not diverged):
            continue
        final = 0.0 if diverged else row.final_val_acc if row.status == TrialStatus.COMPLETED \
            else None
        runs.append(Run(float(row.max_lr), int(row.peak_epoch), int(row.seed),
                        0.0 if math.isnan(row.best_val_acc) else float(row.best_val_acc),
                        None if final is None else float(final), row.trial_id))
    return runs


def winner(table: pd.DataFrame, search: SearchConfig,
           space: SearchSpace | None) -> tuple[pd.Series, Pick] | None:
    """The config `search.pick` picks, and its search or race trial to export: the one with
    the highest best val_acc (ties: fewer epochs) among those neither DIVERGED nor ERROR and
    with a checkpoint. None when there is none. The model scales the searched values to
    `space` (study.json's), or where it has no range yet, to the trials' own."""
    ranked = ranked_search_trials(table)
    if ranked.empty:
        return None
    if space is None or space.max_lr.range is None:
        bounds = ((ranked["max_lr"].min(), ranked["max_lr"].max()),
                  (int(ranked["peak_epoch"].min()), int(ranked["peak_epoch"].max())))
    else:
        bounds = (space.max_lr.range, space.peak_epoch.range)
    runs = runs_of(table)
    chosen = pick(runs, search.pick, bounds)
    mine = ranked[[params_of(r.max_lr, r.peak_epoch) == chosen.params
                   for r in ranked.itertuples()]]
    if mine.empty:  # the rule's config kept no checkpoint: the raw best that did
        first = ranked.iloc[0]
        runs = [r for r in runs if r.params == params_of(first.max_lr, first.peak_epoch)]
        return first, replace(pick(runs, "observed", bounds), note=(
            f"{search.pick}: its pick kept no checkpoint; picked by observed"))
    return mine.iloc[0], chosen


def ranked_search_trials(table: pd.DataFrame) -> pd.DataFrame:
    """The search's trials that can be selected, best first. Confirmation runs are not
    candidates: a seed that happens to do well is no reason to pick a config."""
    failed = table["status"].isin([TrialStatus.DIVERGED, TrialStatus.ERROR])
    eligible = table[table["role"].isin(SEARCH_ROLES) & ~failed & table["checkpoint"].notna()
                     & table["best_val_acc"].notna()]
    return eligible.sort_values(["best_val_acc", "epochs_run"], ascending=[False, True])
