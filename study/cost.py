"""What a study will cost: measured before the first trial, said plainly, kept up to date.

A short Ray task, with one trial worker's resources (so on the device the trials get), times a
few training steps of the configured model and batch; the rest is arithmetic on the plan.
"""

from __future__ import annotations

import math
import statistics
import time

import ray
from ray import tune
from ray.tune.experiment import Trial as TuneTrial

from analysis.html import duration
from study.plan import Bound
from trainable.config import Config
from trainable.data import Splits
from trainable.errors import DataError
from trainable.loop import steps_per_epoch
from trainable.record import Estimate
from trainable.speed import measure_speed

# A TorchTrainer trial's fixed seconds: the start-up its speed probe measured on this study's
# cluster (a new Ray worker process, its imports, the data and the model) plus what Ray Train
# adds (the controller's process, the placement group, the worker group; their end): 21.7 s
# of trial overhead against a 6.6 s probe start-up on a 2-core CPU (tools/bench.py,
# docs/performance.md). A --local trial runs in a reused process: 2 s there.
TRAIN_SETUP_S = 15.0
LOCAL_TRIAL_S = 2.0
PROBES = 4  # speed probes run at once, at most
# Past this, a study on CPUs only says plainly that it is long, and names smaller runs.
LONG_S = 3600.0
SMALLER_RUNS = ("--config configs/smoke.yaml", "--set data.limit_train=5000",
                "--set train.epochs=5", "a smaller --num-samples")


@ray.remote
def _remote_speed(config: Config, splits_ref: list, workers: int, submitted_at: float
                  ) -> dict[str, float]:
    return measure_speed(config, ray.get(splits_ref[0]).train, workers,
                         started_at=submitted_at)


def measure(bound: Bound, splits_ref: ray.ObjectRef, splits: Splits) -> Estimate:
    """The study's cost, from a few steps timed with one worker's resources."""
    resources = bound.resources
    bundle = resources.worker_bundle()
    task = _remote_speed.options(num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0))
    try:
        # As many at once as the trials' workers will run at once (up to PROBES): workers
        # sharing a machine or a GPU slow each other down, and the estimate should say so.
        probes = ray.get([task.remote(bound.config, [splits_ref], resources.workers,
                                      time.time())
                          for _ in range(min(bound.at_once * resources.workers, PROBES))])
    except ray.exceptions.RayTaskError as err:
        if isinstance(err.cause, DataError):  # say the data's problem, not Ray's traceback
            raise err.cause from None
        raise
    return estimate(probes, bound, len(splits.train.labels), len(splits.val.labels))


def estimate(probes: list[dict[str, float]], bound: Bound, train_images: int,
             val_images: int) -> Estimate:
    """The arithmetic: the probes' median rates and start-up, over the plan. A TorchTrainer
    trial's fixed seconds are the start-up a probe measured plus Ray Train's set-up."""
    config, resources, at_once = bound.config, bound.resources, bound.at_once
    speed = {key: statistics.median(p[key] for p in probes)
             for key in ("train_images_per_s", "eval_images_per_s", "startup_s")}
    t = config.train
    images_per_s = speed["train_images_per_s"] * resources.workers
    epoch_s = (steps_per_epoch(config, train_images) * t.batch_size / images_per_s
               + val_images / (speed["eval_images_per_s"] * resources.workers))
    overhead_s = LOCAL_TRIAL_S if resources.local else speed["startup_s"] + TRAIN_SETUP_S
    trial_s = t.epochs * epoch_s + overhead_s
    # The range test runs on one worker at the global batch.
    range_test_s = config.lr_finder.num_iter * t.batch_size / speed["train_images_per_s"]
    search = config.search
    trials = search.num_samples + search.confirm_top * (search.confirm_seeds or 0)
    study_s = range_test_s + math.ceil(trials / at_once) * trial_s
    return Estimate(device=probes[0]["device"], workers=resources.workers,
                    images_per_s=images_per_s, epoch_s=epoch_s, overhead_s=overhead_s,
                    trial_s=trial_s, range_test_s=range_test_s, trials=trials,
                    at_once=at_once, study_s=study_s)


def describe(estimate: Estimate, config: Config, splits: Splits) -> list[str]:
    """The estimate as printed, and a plain warning when it is long on CPUs only."""
    workers = f"{estimate.workers} workers" if estimate.workers > 1 else "1 worker"
    lines = [
        f"cost estimate (a few steps timed on {estimate.device}, as a trial's workers get it):",
        f"  training: {estimate.images_per_s:.0f} images/s a trial ({workers})",
        f"  an epoch: about {duration(estimate.epoch_s)} ({len(splits.train.labels):,} images "
        f"trained, {len(splits.val.labels):,} validated)",
        f"  a trial:  about {duration(estimate.trial_s)} ({config.train.epochs} epochs + "
        f"{duration(estimate.overhead_s)} to start and end)",
        f"  the study: about {duration(estimate.study_s)} ({estimate.trials} trials"
        f"{_confirming(config)}, "
        f"{estimate.at_once} at a time, after a range test of about "
        f"{duration(estimate.range_test_s)})"]
    if estimate.study_s > LONG_S and not estimate.device.startswith("cuda"):
        lines.append(f"warning: this study will take about {duration(estimate.study_s)} here, "
                     f"without a GPU; it runs as asked. Smaller: {', '.join(SMALLER_RUNS)}")
    return lines


def _confirming(config: Config) -> str:
    runs = config.search.confirm_top * (config.search.confirm_seeds or 0)
    return f", of which {runs} confirmation runs" if runs else ""


class TimeLeft(tune.Callback):
    """After each of a Tuner's `trials` ends: how many have, and about how long the rest and
    the `later` trials of a phase to come will take, from the ended trials' own wall times
    (from the estimate until one has a time)."""

    def __init__(self, estimate: Estimate, trials: int, later: int = 0):
        self.estimate, self.trials, self.later = estimate, trials, later

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._report(trials, trial)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._report(trials, trial)

    def _report(self, trials: list, trial) -> None:
        ended = [t for t in trials
                 if t is trial or t.status in (TuneTrial.TERMINATED, TuneTrial.ERROR)]
        walls = [t.last_result["time_total_s"] for t in ended
                 if (t.last_result or {}).get("time_total_s")]
        each = statistics.median(walls) if walls else self.estimate.trial_s
        rest = max(self.trials - len(ended), 0) + self.later
        left = math.ceil(rest / self.estimate.at_once)
        print(f"{len(ended)} of {self.trials} trials ended; about "
              f"{duration(left * each)} left", flush=True)
