"""What a trial costs beyond its training: the start-up the cost estimate uses, and what a
Ray Train worker imports to run the loop (a budget of modules, not a timing)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from study.cost import TRAIN_SETUP_S, estimate
from study.plan import Bound, Resources
from trainable.constants import REPO

# What a worker has no use for: the report's, the tracker's, the search's and the range
# test's libraries. (pandas stays: Ray Train imports it itself.)
HEAVY = ("mlflow", "matplotlib", "pytorch_grad_cam", "torch_lr_finder", "optuna")


def probe(startup_s: float) -> dict[str, float]:
    return {"train_images_per_s": 100.0, "eval_images_per_s": 400.0, "startup_s": startup_s,
            "batch": 32, "device": "cpu"}


@pytest.mark.parametrize("local", [True, False])
def test_the_estimate_takes_the_start_up_the_probes_measured(smoke_config, local):
    bound = Bound(smoke_config, Resources(1, 1.0, 0.0, local), at_once=1)
    quick = estimate([probe(1.0), probe(2.0), probe(30.0)], bound, 320, 80)
    slow = estimate([probe(9.0), probe(10.0), probe(11.0)], bound, 320, 80)
    train = TRAIN_SETUP_S * (not local)
    assert quick.overhead_s == pytest.approx(2.0 + train)  # the median probe's
    assert slow.overhead_s == pytest.approx(10.0 + train)
    epochs = smoke_config.train.epochs
    assert slow.trial_s - quick.trial_s == pytest.approx(8.0)
    trials = smoke_config.search.num_samples + smoke_config.search.confirm_top * (
        smoke_config.search.confirm_seeds or 0)
    assert slow.study_s - quick.study_s == pytest.approx(8.0 * trials)
    assert quick.trial_s == pytest.approx(epochs * quick.epoch_s + quick.overhead_s)


def test_a_ray_train_worker_imports_none_of_the_heavy_libraries():
    """What a Train worker and Train's controller unpickle to run a trial: the trial module
    (the trainer's function and callbacks) and the loop."""
    code = ("import sys, study.trial, trainable.loop; "
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "[]"
