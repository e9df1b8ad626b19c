"""What a study searches and how, decided from the config alone: the space around the range
test's estimate, its first point, the Optuna sampler for the budget (docs/search-range.md),
and the confirmation seeds. No Ray, no Optuna: the plan says all of it before either starts."""

from __future__ import annotations

import math
from typing import Any

from trainable.config import Config
from trainable.record import MODEL_FREE, MaxLrRange, PeakEpochRange, Sampler, SearchSpace

# Confirmation seeds per top config when trials get a GPU: 2 more make 3 runs a config, the
# fewest that give a spread with a second degree of freedom.
CONFIRM_SEEDS_GPU = 2
ORIGINAL_PEAK = (5, 20)  # the original's LR peaked at epoch 5 of 20
# `search.sampler: auto`: in simulated studies on the measured table, Optuna's GP with 2 random
# startup trials came closest to the best config at 8, 16 and 32 trials, beyond the noise
# (docs/search-range.md).
AUTO_SAMPLER = "gp"
GP_STARTUP_TRIALS = 2
# trials: up to this budget, TPE, QMC and random search were within the simulated studies'
# noise of each other (the budgets measured: 8, 16, 32)
AS_GOOD_AS_RANDOM_UP_TO = 32


def search_space(config: Config, estimate: float | None) -> SearchSpace:
    """The space around the range test's estimate (its LR range unknown without one)."""
    lo, hi = config.search.max_lr_range
    lr_range = None if estimate is None else (estimate * lo, estimate * hi)
    return SearchSpace(max_lr=MaxLrRange(estimate_times=(lo, hi), range=lr_range),
                       peak_epoch=PeakEpochRange(range=config.peak_epoch_range))


def first_point(config: Config, space: SearchSpace) -> dict[str, Any]:
    """The first point to evaluate: the middle of the max_lr range (on a log scale) with the
    original's peak (epoch 5 of 20) scaled to this epoch budget."""
    lr_lo, lr_hi = space.max_lr.range
    peak_lo, peak_hi = space.peak_epoch.range
    peak = round(config.train.epochs * ORIGINAL_PEAK[0] / ORIGINAL_PEAK[1])
    return {"max_lr": math.sqrt(lr_lo * lr_hi), "peak_epoch": min(max(peak, peak_lo), peak_hi)}


def choose_sampler(config: Config) -> Sampler:
    """`search.sampler` and `search.startup_trials`, with `auto` and null resolved by the rule
    the simulated searches measured (docs/search-range.md)."""
    search = config.search
    name = AUTO_SAMPLER if search.sampler == "auto" else search.sampler
    if name in MODEL_FREE:
        startup = search.num_samples
    elif search.startup_trials is not None:
        startup = search.startup_trials
    else:
        startup = fitted_startup_trials(name, search.num_samples)
    return Sampler(name=name, startup_trials=startup)


def fitted_startup_trials(name: str, num_samples: int) -> int:
    """Random startup trials for a study of `num_samples` trials, as measured
    (docs/search-range.md): GP, 2 (the only count simulated, and the best sampler); TPE, a
    quarter of the budget, at least 2 (the best count tried at each budget, or within noise)."""
    return GP_STARTUP_TRIALS if name == "gp" else max(2, num_samples // 4)


def describe_sampler(sampler: Sampler, num_samples: int) -> str:
    """The line a study prints before its search: how its trials will be chosen, and what
    that is worth at its budget."""
    how = _how_chosen(sampler, num_samples)
    if sampler.name != "gp" and num_samples <= AS_GOOD_AS_RANDOM_UP_TO:
        how += ("; at this budget the search is as good as random (simulated on a measured "
                "table: docs/search-range.md)")
    return how


def _how_chosen(sampler: Sampler, num_samples: int) -> str:
    if sampler.name in MODEL_FREE:
        how = "random search" if sampler.name == "random" else "scrambled Sobol points (QMC)"
        return f"search: the first point, then {how} for {num_samples} trials"
    title = {"tpe": "Optuna's TPE", "gp": "Optuna's GP"}[sampler.name]
    if sampler.startup_trials >= num_samples:
        return (f"search: {title}, but its {sampler.startup_trials} random startup trials "
                f"cover all {num_samples}: this is random search")
    return (f"search: {title} over {num_samples} trials: the first point and random draws "
            f"until {sampler.startup_trials} have finished, then its model")


def asha_warning(config: Config) -> str | None:
    """Under ASHA, a rung before the peak range's end compares trials that are still warming
    up with ones that have peaked: on the measured table the best point then lost."""
    peak_end = config.peak_epoch_range[1]
    if config.search.scheduler != "asha" or config.grace_period >= peak_end:
        return None
    return (f"search.grace_period={config.grace_period} lets ASHA stop trials before the peak "
            f"range ends (epoch {peak_end}); there early ranks did not hold "
            "(docs/search-range.md)")


def race_warning(config: Config) -> str | None:
    """Racing in a study too small for it: it would spend most of its trials on reruns."""
    search = config.search
    if not search.race or search.num_samples > search.max_config_calls:
        return None
    return (f"search.race: {search.num_samples} trials are too few to race (it needs "
            f"search.max_config_calls + 1 = {search.max_config_calls + 1}); this study does not")


def races(config: Config) -> bool:
    """Whether the study races its incumbent (`search.race`, in a study large enough)."""
    return config.search.race and race_warning(config) is None


def default_confirm_seeds(gpus_per_worker: float) -> int:
    """More seeds for the top configs when trials get a GPU (there each costs minutes);
    none on CPUs, where each costs hours (docs/search-range.md): `--confirm-seeds` asks."""
    return CONFIRM_SEEDS_GPU if gpus_per_worker > 0 else 0
