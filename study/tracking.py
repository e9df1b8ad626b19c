"""Which tracker a study's trials report to: the one `study/mlflow_runs.py` opens when the
study is tracked (`--mlflow`), else none. Apart from it so that a study that is not tracked
never imports mlflow."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol

from ray import tune

from trainable.experiment import Role, role_of


class EpochTracker(Protocol):
    def epoch(self, trial_id: str, point: dict, role: Role, metrics: dict) -> None: ...


_ACTIVE: list[EpochTracker] = []  # the driver's tracker while a study runs; see TrackTrials


@contextlib.contextmanager
def active(tracker: EpochTracker | None) -> Iterator[None]:
    """`tracker` as the one `TrackTrials` callbacks log to, for the block."""
    if tracker is None:
        yield
        return
    _ACTIVE.append(tracker)
    try:
        yield
    finally:
        _ACTIVE.remove(tracker)


class TrackTrials(tune.Callback):
    """Each epoch of each trial to the study's tracker as Tune reports it. Holds no client:
    Tune pickles its callbacks with the experiment and a resume brings them back from there,
    so it finds the driver's live tracker (`active`), if the study is tracked at all."""

    def __init__(self, role: Role):
        self.role = role

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info):
        if _ACTIVE:
            params = dict(trial.config or {})
            _ACTIVE[-1].epoch(trial.trial_id, params.get("confirm", params),
                              role_of(params, self.role), result)


