"""How far a study's winner can be trusted: whether it lies at an edge of the space searched
(the best may lie beyond it), and, where its top configs ran again with other seeds, whether
the winner's lead is larger than the seeds' spread."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from trainable.experiment import METRIC, Role
from trainable.record import SearchSpace

EDGE = 0.1  # the outer tenth of the max_lr range, on a log scale, at either end


def edge_check(best: pd.Series, space: SearchSpace, epochs: int) -> dict[str, Any]:
    """Where the best trial lies in the space searched (`space`: study.json's search_space)
    and a warning for each setting to widen. A peak at an end that cannot move (epoch 1, the
    last epoch) is recorded but not warned about: no wider range could try past it."""
    lo, hi = space.max_lr.range
    position = math.log(best["max_lr"] / lo) / math.log(hi / lo)  # 0 at lo, 1 at hi
    peak, (peak_lo, peak_hi) = int(best["peak_epoch"]), space.peak_epoch.range
    times = list(space.max_lr.estimate_times)
    warnings = []
    if position < EDGE or position > 1 - EDGE:
        end, way = ("low", "down") if position < EDGE else ("high", "up")
        warnings.append(
            f"the best trial's max_lr {best['max_lr']:.4g} lies at the {end} edge of the range "
            f"searched ({lo:.4g} to {hi:.4g}): the best may lie beyond it; widen "
            f"search.max_lr_range (now {times}, times the estimate) {way}wards")
    if (peak == peak_lo and peak_lo > 1) or (peak == peak_hi and peak_hi < epochs):
        end = "low" if peak == peak_lo else "high"
        warnings.append(
            f"the best trial's peak_epoch {peak} is at the {end} end of search.peak_epoch_range "
            f"[{peak_lo}, {peak_hi}]: widen it")
    return {"max_lr_position": round(position, 4), "peak_epoch": peak,
            "peak_epoch_range": [peak_lo, peak_hi], "at_edge": bool(warnings),
            "warnings": warnings}


def seed_spread(table: pd.DataFrame, winner: str) -> dict[str, Any] | None:
    """Each confirmed config's runs (its search trial and its confirmation runs): mean and
    standard deviation of the best val_acc; then whether the winner's lead over the best other
    confirmed config is larger than the larger of the two spreads. None without
    confirmation runs."""
    confirm = table[table["role"] == Role.CONFIRM]
    if confirm.empty:
        return None
    configs = []
    for trial_id in dict.fromkeys(confirm["confirms"]):  # in the order they were confirmed
        runs = table[(table["trial_id"] == trial_id) | (table["confirms"] == trial_id)]
        scores = runs[f"best_{METRIC}"].dropna()
        search_row = runs[runs["trial_id"] == trial_id].iloc[0]
        configs.append({
            "trial_id": trial_id, "max_lr": float(search_row["max_lr"]),
            "peak_epoch": int(search_row["peak_epoch"]),
            "seeds": [int(s) for s in runs.loc[scores.index, "seed"]],
            "mean": float(scores.mean()) if len(scores) else math.nan,
            "std": float(scores.std(ddof=1)) if len(scores) > 1 else math.nan,
        })
    spread = {"metric": f"best_{METRIC}", "configs": configs}
    best = next((c for c in configs if c["trial_id"] == winner), None)
    others = [c for c in configs if c is not best and not math.isnan(c["mean"])]
    if best is None or not others or math.isnan(best["std"]):
        spread["verdict"] = "too few confirmed runs to compare the winner with another config"
        return spread
    runner_up = max(others, key=lambda c: c["mean"])
    lead = best["mean"] - runner_up["mean"]
    noise = max(best["std"], runner_up["std"])
    spread.update(lead=lead, noise=noise, lead_exceeds_spread=bool(lead > noise))
    said = (f"the winner ({winner}) leads the next confirmed config ({runner_up['trial_id']}) "
            f"by {100 * lead:.2f} points of mean {METRIC} over {len(best['seeds'])} seeds, ")
    spread["verdict"] = said + (
        f"more than the seeds' spread (standard deviation up to {100 * noise:.2f} points)"
        if lead > noise else
        f"no more than the seeds' spread (standard deviation up to {100 * noise:.2f} points): "
        "on this evidence the two configs are not told apart")
    return spread
