"""The study in an MLflow tracking server, on request (`--mlflow URI`, or MLflow's own
MLFLOW_TRACKING_URI): one MLflow experiment named after the study, holding one parent run for
the study and a child run per trial, search and confirmation alike.

Through mlflow's own client, not Ray's `MLflowLoggerCallback`: that callback keys a run on
the trial object of one driver, so a resumed study would log its trials again as new runs,
and it steps metrics by `training_iteration`, which restarts on a resumed TorchTrainer trial.
Here a run is found again by its tags, and a step is an epoch, each logged once. Credentials
stay in mlflow's environment variables; nothing here writes them down. A server that goes
away mid-study is warned about once, and the study goes on without it.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from analysis.results import Trial
from trainable.config import Config, dump_config
from trainable.constants import ENDED, TrialStatus
from trainable.errors import first_line
from trainable.experiment import (
    DIVERGED,
    EPOCH,
    METRIC,
    SEARCHED,
    Role,
    trial_folder,
    without_diverged,
)
from trainable.record import StudyRecord

log = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"  # MLflow's: the run a child run nests under
STUDY_TAG = "onecycle.study"  # every run: the study's experiment folder
TRIAL_TAG = "onecycle.trial_id"  # a child run: its Tune trial
ROLE_TAG = "onecycle.role"  # study, search or confirm
STATUS_TAG = "onecycle.status"  # a child run's end: COMPLETED, STOPPED, DIVERGED, ERROR
EPOCH_METRICS = (METRIC, "val_loss", "train_loss", "lr")  # logged at step = epoch
# mlflow's client retries a failed request for minutes by default; a study whose server went
# away should say so within seconds. The user's own settings win.
CLIENT_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
BATCH = 100  # params per log_batch call: the server's limit


class Tracker:
    """A study's runs in one MLflow experiment. Every call to the server goes through
    `_call`: the first failure is warned about, and tracking stops there."""

    def __init__(self, client: MlflowClient, where: str, name: str, seed: int):
        self.client, self.where, self.name, self.seed = client, where, name, seed
        self.experiment_id: str | None = None
        self.parent_run_id: str | None = None
        self.runs: dict[str, str] = {}  # trial id: run id
        self.logged: dict[str, set[int]] = {}  # trial id: epochs logged
        self.ended: set[str] = set()  # trial ids whose run this driver has ended
        self.failed = False

    def _call(self, what: str, call: Callable[[], Any]) -> Any:
        if self.failed:
            return None
        try:
            return call()
        except Exception as error:  # noqa: BLE001 - any failure of the server: say it, go on
            self.failed = True
            log.warning("MLflow at %s failed while %s (%s: %s); the study goes on without it, "
                        "its own folder complete", self.where, what, type(error).__name__,
                        first_line(error))
            return None

    def open(self, parent_run_id: str | None) -> str | None:
        """The study's experiment and parent run (the one named, when resuming); its id."""
        def opened() -> str:
            found = self.client.get_experiment_by_name(self.name)
            self.experiment_id = found.experiment_id if found is not None \
                else self.client.create_experiment(self.name)
            run_id = parent_run_id
            if run_id is None:
                run_id = self.client.create_run(
                    self.experiment_id, run_name=self.name,
                    tags={STUDY_TAG: self.name, ROLE_TAG: "study"}).info.run_id
            self.parent_run_id = run_id
            return run_id

        return self._call("opening the study's run", opened)

    def log_study(self, record: StudyRecord) -> None:
        """The parent run's params: the LR estimate, the search space, the sampler and the
        config (constant over a study: a resume logs the same values again)."""
        space = record.search_space
        params = {"lr_estimate": record.estimate,
                  "max_lr_low": space.max_lr.range[0], "max_lr_high": space.max_lr.range[1],
                  "peak_epoch_low": space.peak_epoch.range[0],
                  "peak_epoch_high": space.peak_epoch.range[1],
                  "sampler": record.sampler.name,
                  "sampler_startup_trials": record.sampler.startup_trials,
                  **_flat(dump_config(record.config))}
        self._log_params(self.parent_run_id, params)

    def _log_params(self, run_id: str | None, params: dict[str, Any]) -> None:
        if run_id is None:
            return
        items = [Param(k, str(v)) for k, v in params.items()]
        for start in range(0, len(items), BATCH):
            self._call("logging params", lambda chunk=items[start:start + BATCH]:
                       self.client.log_batch(run_id, params=chunk))

    def _run(self, trial_id: str, point: dict[str, Any], role: Role) -> str | None:
        """The trial's child run: found again by its tag, or made, with its params."""
        if trial_id in self.runs or self.failed or self.experiment_id is None:
            return self.runs.get(trial_id)

        def found_or_made() -> str:
            found = self.client.search_runs(
                [self.experiment_id], f"tags.`{TRIAL_TAG}` = '{trial_id}'", max_results=1)
            if found:
                run_id = found[0].info.run_id
                self.logged[trial_id] = {m.step for m in
                                         self.client.get_metric_history(run_id, METRIC)}
                return run_id
            run_id = self.client.create_run(
                self.experiment_id, run_name=trial_folder(trial_id),
                tags={PARENT_TAG: self.parent_run_id, STUDY_TAG: self.name,
                      TRIAL_TAG: trial_id, ROLE_TAG: role}).info.run_id
            params = {**{k: point[k] for k in SEARCHED}, "seed": point.get("seed", self.seed),
                      "role": role, "confirms": point.get("confirms")}
            self.client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()
                                                  if v is not None])
            self.logged[trial_id] = set()
            return run_id

        run_id = self._call(f"opening trial {trial_id}'s run", found_or_made)
        if run_id is not None:
            self.runs[trial_id] = run_id
        return run_id

    def epoch(self, trial_id: str, point: dict[str, Any], role: Role,
              metrics: dict[str, Any]) -> None:
        """One epoch's metrics, at step = epoch, unless that epoch is logged already (or it
        diverged: its status says so, and its val_acc of 0 is no measurement)."""
        run_id = self._run(trial_id, point, role)
        if run_id is None or EPOCH not in metrics or metrics.get(DIVERGED):
            return
        step = int(metrics[EPOCH])
        if step in self.logged[trial_id]:
            return
        values = [Metric(k, float(metrics[k]), 0, step) for k in EPOCH_METRICS
                  if k in metrics and math.isfinite(float(metrics[k]))]
        self._call(f"logging trial {trial_id}'s epoch {step}",
                   lambda: self.client.log_batch(run_id, metrics=values))
        if not self.failed:
            self.logged[trial_id].add(step)

    def sync(self, trials: list[Trial]) -> None:
        """What the study saved, once a phase's Tuner returns: every epoch not yet logged,
        and each ended trial's status (its run ended, FAILED for ERROR)."""
        for trial in trials:
            point = {**trial.config, "seed": trial.seed, "confirms": trial.confirms}
            for row in without_diverged(trial.history).to_dict("records"):
                self.epoch(trial.trial_id, point, trial.role, row)
            run_id = self._run(trial.trial_id, point, trial.role)
            if run_id is None or trial.status not in ENDED or trial.trial_id in self.ended:
                continue  # a later phase's sync ends no run twice
            self._call(f"ending trial {trial.trial_id}'s run",
                       lambda r=run_id, t=trial: self._end(r, t.trial_id, t.status))

    def _end(self, run_id: str, trial_id: str, status: str) -> None:
        self.client.set_tag(run_id, STATUS_TAG, status)
        self.client.set_terminated(run_id, "FAILED" if status == TrialStatus.ERROR
                                   else "FINISHED")
        self.ended.add(trial_id)

    def finish(self, summary: dict[str, Any] | None, best: dict[str, Any] | None,
               files: list[Path], report: Path | None) -> None:
        """The parent run's end: the winner, its test accuracy and the trust verdict, with
        study.json, the report (model card included) as artifacts."""
        run_id = self.parent_run_id
        if run_id is None:
            return
        if best is not None:
            self._log_params(run_id, {"winner": best["trial_id"],
                                      "winner_max_lr": best["max_lr"],
                                      "winner_peak_epoch": int(best["peak_epoch"]),
                                      "winner_pick": best["pick"]})
            # observed: the highest val_acc its runs reported; estimated: on a new seed
            metrics = [Metric("winner_val_acc", float(best["best_val_acc"]), 0, 0),
                       Metric("winner_estimated_val_acc", best["estimated_val_acc"], 0, 0),
                       Metric("winner_estimated_val_acc_se", best["estimated_val_acc_se"], 0, 0)]
            if summary is not None:
                metrics.append(Metric("winner_test_acc", summary["test"]["accuracy"], 0, 0))
            self._call("logging the winner", lambda: self.client.log_batch(run_id, metrics))
        if summary is not None:
            self._call("tagging the verdict", lambda: self.client.set_tag(
                run_id, "trust", _verdict(summary["trust"])))
        for file in files:
            self._call(f"uploading {file.name}", lambda f=file: self.client.log_artifact(
                run_id, str(f)))
        if report is not None:
            self._call("uploading the report", lambda: self.client.log_artifacts(
                run_id, str(report), artifact_path=report.name))
        self._call("ending the study's run", lambda: self.client.set_terminated(run_id))


def _verdict(trust: dict[str, Any]) -> str:
    said = list(trust["edge_check"]["warnings"])
    if trust["confirmation"] is not None:
        said.append(trust["confirmation"]["verdict"])
    return "; ".join(said) or "inside the searched ranges; no confirmation seeds"


def _flat(config: dict[str, Any]) -> dict[str, Any]:
    return {f"{section}.{key}": value for section, values in config.items()
            for key, value in values.items()}


def open_tracker(uri: str, where: str, record: StudyRecord, name: str,
                 config: Config) -> Tracker:
    """The tracker of a study (its parent run continued when the record names one)."""
    for key, value in CLIENT_ENV.items():
        os.environ.setdefault(key, value)
    tracker = Tracker(MlflowClient(tracking_uri=uri), where, name, config.train.seed)
    tracker.open(record.mlflow_run_id)
    return tracker
