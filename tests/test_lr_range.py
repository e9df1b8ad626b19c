from __future__ import annotations

import numpy as np
import pytest

from trainable.data import load_splits
from trainable.lr_range import range_test, steepest_descent


def test_estimate_is_the_steepest_descent_before_the_blow_up():
    lrs = list(np.logspace(-5, 1, 100))
    log_lr = np.log10(lrs)
    # Falls fastest at 1e-3, bottoms out at 1e-2, blows up, then falls again past 1 (as a real
    # sweep does once the weights are ruined): that late fall is steeper, and must be ignored.
    losses = 2.3 - 0.3 / (1 + np.exp(-4 * (log_lr + 3)))
    losses = np.where(log_lr > -2, losses + 2 * (log_lr + 2) ** 2, losses)
    losses = np.where(log_lr > 0, losses[np.searchsorted(log_lr, 0)] - 3 * log_lr, losses)
    assert steepest_descent(lrs, list(losses)) == pytest.approx(1e-3, rel=0.15)


def test_range_test_sweeps_exponentially_with_the_trials_settings(tiny_config):
    config = tiny_config.replace("lr_finder", num_iter=17, start_lr=1e-4, end_lr=1.0)
    found = range_test(config, load_splits(config.data))
    lrs = np.asarray(found["lrs"])
    assert len(lrs) <= 17 and lrs[0] == pytest.approx(1e-4, rel=0.2)
    ratios = lrs[1:] / lrs[:-1]
    assert np.allclose(ratios, ratios[0], rtol=1e-6)  # exponential steps
    assert found["suggested_lr"] in found["lrs"]
    assert np.isfinite(found["losses"]).all()
    settings = found["settings"]
    assert (settings["batch_size"], settings["momentum"], settings["nesterov"]) == \
        (16, 0.9, True)
