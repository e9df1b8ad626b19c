"""Which evaluated config a study's runs point to (`search.pick`), what it should score on a new
seed, and which config deserves another seed next (`search.race`). Pure functions of `Run`s:
the study's searcher, the report and the simulator call the same ones (docs/search-range.md).

- observed: the config holding the highest val_acc any run reported (the raw maximum);
- model: the highest posterior mean, among the evaluated configs, of a GP (scikit-learn's) fitted
  on every finished run's final val_acc over (log max_lr, peak_epoch), its noise learned; when
  its leave-one-out fit is poor, observed, saying so;
- pessimistic: a config's mean final val_acc less `PESSIMISM` standard errors.
Every run of a config counts as one of its seeds, whatever made it (search, race, confirm).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import count

import numpy as np
from scipy.stats import spearmanr

PESSIMISM = 1.0  # c in mean - c * SE
# val_acc's standard deviation over seeds of one config, before a study has two seeds of any:
# the committed table's median within-point SD of the final val_acc over its seeds 0-1 (0.013
# over all its seeds; the figures of docs/search-range.md were simulated with 0.015)
PRIOR_SEED_SD = 0.015
MIN_MODEL_RUNS = 5  # finished runs before the model is fitted at all
MIN_MODEL_CONFIGS = 3
# The model's fit is poor when its leave-one-out predictions rank the held-out runs no better
# than this (Spearman); a coefficient of determination would call a good model poor wherever
# the seed noise is large, which is where the model is needed.
MIN_LOO_RANK_CORRELATION = 0.3

Params = tuple[float, int]  # the searched values: (max_lr, peak_epoch)
Bounds = tuple[tuple[float, float], tuple[int, int]]  # the searched max_lr and peak ranges


@dataclass(frozen=True)
class Run:
    """One run of a config: its own seed, and what it reported."""

    max_lr: float
    peak_epoch: int
    seed: int
    best: float  # the highest val_acc it reported, at any epoch
    final: float | None  # val_acc after its last epoch (0.0 diverged); None: not finished
    label: str = ""  # the trial's id

    @property
    def params(self) -> Params:
        return params_of(self.max_lr, self.peak_epoch)


def params_of(max_lr: float, peak_epoch: int) -> Params:
    """A config's key: max_lr to 10 digits, so that a CSV round trip names the same one."""
    return float(f"{max_lr:.10g}"), int(peak_epoch)


@dataclass(frozen=True)
class Pick:
    params: Params
    rule: str  # the rule that picked: `observed` where `model` fell back
    observed: float  # the highest val_acc the config's runs reported
    estimate: float  # its val_acc expected on a new seed
    estimate_se: float  # the estimate's standard error
    seeds: tuple[int, ...]  # of its finished runs
    note: str | None = None  # why the rule fell back

    def sentence(self) -> str:
        """The winner's curse correction, said once."""
        how = {"observed": "its runs' mean final val_acc (the observed rule corrects nothing)",
               "model": "the GP's posterior mean", "pessimistic": "its runs' mean final "
               "val_acc"}[self.rule]
        return (f"observed val_acc {self.observed:.4f}; expected on a new seed "
                f"{self.estimate:.4f} +- {self.estimate_se:.4f} ({how}, {len(self.seeds)} "
                f"seed{'s' if len(self.seeds) != 1 else ''}): the winner's curse takes "
                f"{100 * (self.observed - self.estimate):.2f} points off")


def _finished(runs: Sequence[Run]) -> list[Run]:
    return [r for r in runs if r.final is not None]


def seed_sd(runs: Sequence[Run]) -> float:
    """The pooled within-config standard deviation of the final val_acc over the configs with
    two or more finished runs; `PRIOR_SEED_SD` before there are any."""
    by_config: dict[Params, list[float]] = {}
    for run in _finished(runs):
        by_config.setdefault(run.params, []).append(run.final)
    freedom = sum(len(v) - 1 for v in by_config.values())
    if freedom == 0:
        return PRIOR_SEED_SD
    squares = sum(float(np.sum((np.array(v) - np.mean(v)) ** 2)) for v in by_config.values())
    return math.sqrt(squares / freedom)


def _features(configs: Sequence[Params], bounds: Bounds) -> np.ndarray:
    """(log max_lr, peak_epoch), each scaled to [0, 1] over the searched range."""
    (lr_lo, lr_hi), (peak_lo, peak_hi) = bounds
    return np.array([[math.log(lr / lr_lo) / max(math.log(lr_hi / lr_lo), 1e-9),
                      (peak - peak_lo) / max(peak_hi - peak_lo, 1)] for lr, peak in configs])


def _gp(kernel=None):
    from sklearn.gaussian_process import GaussianProcessRegressor
    from sklearn.gaussian_process.kernels import ConstantKernel, Matern, WhiteKernel
    if kernel is not None:  # hyperparameters fixed: the leave-one-out refits
        return GaussianProcessRegressor(kernel=kernel, optimizer=None, normalize_y=True)
    kernel = (ConstantKernel(1.0, (1e-3, 1e3))
              * Matern(length_scale=[0.5, 0.5], length_scale_bounds=(0.05, 20.0), nu=2.5)
              + WhiteKernel(0.1, (1e-6, 10.0)))
    return GaussianProcessRegressor(kernel=kernel, normalize_y=True, n_restarts_optimizer=2,
                                    random_state=0)


def model_fit(runs: Sequence[Run], bounds: Bounds) -> tuple[dict[Params, tuple[float, float]],
                                                           str | None]:
    """The GP's posterior mean and its standard deviation (of the mean, not of a seed) at
    every evaluated config; or none and why the fit is not to be used."""
    finished = _finished(runs)
    configs = list(dict.fromkeys(r.params for r in finished))
    if len(finished) < MIN_MODEL_RUNS or len(configs) < MIN_MODEL_CONFIGS:
        return {}, (f"{len(finished)} finished runs of {len(configs)} configs are too few for "
                    f"the model (it needs {MIN_MODEL_RUNS} runs of {MIN_MODEL_CONFIGS})")
    x = _features([r.params for r in finished], bounds)
    y = np.array([r.final for r in finished])
    if np.ptp(y) == 0:
        return {}, "every finished run scored the same: nothing to model"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bounds reached while fitting: the fit still stands
        gp = _gp().fit(x, y)
        keep = np.ones(len(y), bool)
        predicted = np.empty(len(y))
        for i in range(len(y)):
            keep[i] = False
            predicted[i] = _gp(gp.kernel_).fit(x[keep], y[keep]).predict(x[i:i + 1])[0]
            keep[i] = True
        mean, sd = gp.predict(_features(configs, bounds), return_std=True)
    ranks = spearmanr(predicted, y).statistic
    if not ranks >= MIN_LOO_RANK_CORRELATION:  # NaN: predictions all equal
        return {}, (f"the model's leave-one-out fit is poor (its predictions rank the held-out "
                    f"runs at {ranks:.2f}, Spearman, over {len(y)} runs)")
    # the prediction's SD includes the learned noise of one seed: take it out
    noise = gp.kernel_.k2.noise_level * float(np.std(y)) ** 2
    latent = np.sqrt(np.maximum(sd ** 2 - noise, 0.0))
    return {c: (float(m), float(s)) for c, m, s in zip(configs, mean, latent, strict=True)}, None


def pick(runs: Sequence[Run], rule: str, bounds: Bounds) -> Pick | None:
    """The config `rule` picks among the runs' configs (None without runs). Only finished
    runs count for `model` and `pessimistic`; without any, they fall back to `observed`."""
    if not runs:
        return None
    finished = _finished(runs)
    sd = seed_sd(runs)
    by_config: dict[Params, list[Run]] = {}
    for run in runs:
        by_config.setdefault(run.params, []).append(run)

    def summary(config: Params, rule: str, estimate: float | None = None,
                estimate_se: float | None = None, note: str | None = None) -> Pick:
        mine = by_config[config]
        finals = [r.final for r in mine if r.final is not None]
        mean = float(np.mean(finals)) if finals else max(r.best for r in mine)
        se = sd / math.sqrt(max(len(finals), 1))
        return Pick(config, rule, max(r.best for r in mine),
                    mean if estimate is None else estimate,
                    se if estimate_se is None else estimate_se,
                    tuple(r.seed for r in mine if r.final is not None), note)

    note = None
    if rule == "model":
        fitted, note = model_fit(runs, bounds)
        if fitted:
            best = max(fitted, key=lambda c: fitted[c][0])
            return summary(best, "model", *fitted[best])
    if rule == "pessimistic" and finished:
        def score(config: Params) -> float:
            finals = [r.final for r in by_config[config] if r.final is not None]
            return np.mean(finals) - PESSIMISM * sd / math.sqrt(len(finals)) if finals \
                else -math.inf
        return summary(max(by_config, key=score), "pessimistic")
    if rule != "observed" and note is None:
        note = "no run has finished"
    best_run = max(runs, key=lambda r: r.best)  # ties: the earlier run
    return summary(best_run.params, "observed",
                   note=None if note is None else f"{rule}: {note}; picked by observed")


def next_race(runs: Sequence[Run], in_flight: Sequence[tuple[Params, int]], since_race: int,
              rule: str, bounds: Bounds, max_config_calls: int, race_every: int,
              base_seed: int) -> tuple[Params, int] | None:
    """The incumbent (under `rule`) and the seed to run it on next, when a race is due (None
    when not). Counting each config's runs, finished or in flight, up to `max_config_calls`:
    at once when the incumbent has fewer than another config has (as in SMAC, a challenger
    matches the incumbent's seeds before it replaces it for good); else once `race_every` new
    trials have been asked since the last race. Its seed is the first of the shared list
    (`base_seed` + 1, + 2, ...) that it has not run on."""
    if not _finished(runs):
        return None
    incumbent = pick(runs, rule, bounds)
    seeds: dict[Params, set[int]] = {}
    for params, seed in [*((r.params, r.seed) for r in runs), *in_flight]:
        seeds.setdefault(params, set()).add(seed)
    taken = seeds[incumbent.params]
    most = min(max(len(s) for s in seeds.values()), max_config_calls)
    if len(taken) >= max_config_calls or (len(taken) >= most and since_race < race_every):
        return None
    return incumbent.params, next(base_seed + k for k in count(1) if base_seed + k not in taken)
