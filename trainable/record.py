"""study.json, typed: how a study was run, what it searched and what it cost. The study writes
it through `StudyRecord` and everything reads it back through the same model: the study on
resume, the plan, and the report. A field that a later phase fills is None until then."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from trainable.config import Config
from trainable.experiment import STUDY_JSON, Folder


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MaxLrRange(_Record):
    distribution: Literal["log-uniform"] = "log-uniform"
    estimate_times: tuple[float, float]  # search.max_lr_range: the range, in estimates
    range: tuple[float, float] | None = None  # in LR units, once the range test has run


class PeakEpochRange(_Record):
    distribution: Literal["integer uniform"] = "integer uniform"
    range: tuple[int, int]  # both ends searched


class SearchSpace(_Record):
    """What the search searches, the one description of it: study/search.py makes Tune's
    space from it, and study.json holds it as it is."""

    max_lr: MaxLrRange
    peak_epoch: PeakEpochRange


class Draws(_Record):
    """How a finished search's trials were chosen (counted from optuna.db)."""

    first_point: int  # enqueued: the middle of the range
    startup: int  # random draws before the sampler's model took over
    model: int  # the sampler's model
    races: int = 0  # the incumbent again, on another seed (search.race)


MODEL_FREE = ("random", "qmc")  # samplers with no model: every trial a draw of its own


class Sampler(_Record):
    name: Literal["tpe", "gp", "qmc", "random"]
    startup_trials: int  # random trials before the model (counted over finished trials)
    trials: Draws | None = None  # once the search has ended


class Seeds(_Record):
    train: int  # train.seed: weights, order, augmentation
    split: int  # data.split_seed: the validation split
    search: int  # the sampler's


class Estimate(_Record):
    """The study's cost, measured before its first trial (study/cost.py)."""

    device: str  # where the trials' workers compute
    workers: int  # per trial
    images_per_s: float  # training, one trial (all its workers)
    epoch_s: float  # one epoch: training and validation
    overhead_s: float  # a trial's fixed seconds
    trial_s: float  # one trial, every epoch
    range_test_s: float
    trials: int
    at_once: int  # trials that fit at once
    study_s: float  # the range test, then the trials, `at_once` at a time


class ConfirmPoint(_Record):
    """One confirmation run: a search trial's searched values again, with another seed."""

    max_lr: float
    peak_epoch: int
    seed: int
    confirms: str  # the search trial's id


class Confirmation(_Record):
    seeds: int  # more seeds per top config
    points: tuple[ConfirmPoint, ...]


class StudyRecord(_Record):
    config: Config  # resolved: every default and override in place
    seeds: Seeds
    versions: dict[str, str]  # package: version
    git_commit: str | None  # None outside a git checkout
    path: Literal["local", "TorchTrainer"]  # where a trial's loop runs
    sampler: Sampler
    workers_per_trial: int
    resources_per_trial: dict[str, float]  # resource: amount, the whole trial
    selected_on: Literal["val", "test"]
    cost_estimate: Estimate
    wall_s: float = 0.0  # the search's seconds, summed over the driver's runs
    estimate: float | None = None  # the LR range test's suggested max_lr
    search_space: SearchSpace | None = None  # with the LR range, once the range test has run
    confirmation: Confirmation | None = None
    finished: bool | None = None  # every trial ended; None while the search runs
    mlflow_run_id: str | None = None  # the study's parent run, when it is tracked (--mlflow)
    jobs: tuple[str, ...] = ()  # the Ray jobs' submission ids that ran it, in order

    def write(self, experiment: Folder) -> None:
        experiment.write_text(STUDY_JSON, self.model_dump_json(indent=2))

    @classmethod
    def read(cls, experiment: Folder) -> StudyRecord:
        return cls.model_validate_json(experiment.read_text(STUDY_JSON))
