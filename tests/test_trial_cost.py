"""What a trial costs beyond its training: the start-up the cost estimate uses, and what a
Ray Train worker imports to run the loop (a budget of modules, not a timing)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from study.cost import LOCAL_TRIAL_S, TRAIN_SETUP_S, estimate
from study.plan import Bound, Resources
from trainable.constants import REPO

# What a worker has no use for: the report's, the tracker's, the search's and the range
# test's libraries. (pandas stays: Ray Train imports it itself.)
HEAVY = ("mlflow", "matplotlib", "pytorch_grad_cam", "torch_lr_finder", "optuna")


def probe(startup_s: float) -> dict[str, float]:
    return {"train_images_per_s": 100.0, "eval_images_per_s": 400.0, "startup_s": startup_s,
            "batch": 32, "device": "cpu"}


def test_the_estimate_takes_the_start_up_the_probes_measured(smoke_config):
    bound = Bound(smoke_config, Resources(1, 1.0, 0.0, local=False), at_once=1)
    quick = estimate([probe(1.0), probe(2.0), probe(30.0)], bound, 320, 80)
    slow = estimate([probe(9.0), probe(10.0), probe(11.0)], bound, 320, 80)
    assert quick.overhead_s == pytest.approx(2.0 + TRAIN_SETUP_S)  # the median probe's
    assert slow.overhead_s == pytest.approx(10.0 + TRAIN_SETUP_S)
    assert slow.trial_s - quick.trial_s == pytest.approx(8.0)
    search = smoke_config.search
    trials = search.num_samples + search.confirm_top * (search.confirm_seeds or 0)
    assert slow.study_s - quick.study_s == pytest.approx(8.0 * trials)
    assert quick.trial_s == pytest.approx(smoke_config.train.epochs * quick.epoch_s
                                          + quick.overhead_s)
    # --local: the trials share one process, whose start the probe's does not say
    local = Bound(smoke_config, Resources(1, 1.0, 0.0, local=True), at_once=1)
    assert estimate([probe(10.0)], local, 320, 80).overhead_s == LOCAL_TRIAL_S


def test_a_ray_train_worker_imports_none_of_the_heavy_libraries():
    """What a Train worker and Train's controller unpickle to run a trial: the trial module
    (the trainer's function and callbacks) and the loop."""
    code = ("import sys, study.trial, trainable.loop; "
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "[]"
