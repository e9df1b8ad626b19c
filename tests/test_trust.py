"""How far a study's winner can be trusted: the edge check, and confirmation runs with other
seeds, as pure code. (A study's confirmation phase, through an interruption, into results.csv
and the report: tests/test_reliability.py.)"""

from __future__ import annotations

import pandas as pd
import pytest

from analysis.trust import edge_check, seed_spread
from trainable.record import PeakEpochRange, SearchSpace

SPACE = SearchSpace.model_validate(  # as study.json holds it
    {"max_lr": {"distribution": "log-uniform", "estimate_times": [1.0, 8.0],
                "range": [0.01, 0.08]},
     "peak_epoch": {"distribution": "integer uniform", "range": [2, 5]}})


@pytest.mark.parametrize(("max_lr", "peak_epoch", "settings"), [
    (0.028, 3, []),                                   # inside on both
    (0.0105, 3, ["search.max_lr_range", "downwards"]),  # lowest tenth of the log range
    (0.078, 4, ["search.max_lr_range", "upwards"]),   # highest tenth
    (0.028, 2, ["search.peak_epoch_range [2, 5]"]),   # at a widenable end
    (0.028, 5, ["search.peak_epoch_range [2, 5]"]),
])
def test_the_edge_check_names_the_setting_to_widen(max_lr, peak_epoch, settings):
    check = edge_check(pd.Series({"max_lr": max_lr, "peak_epoch": peak_epoch}), SPACE, epochs=10)
    assert check["at_edge"] == bool(settings)
    said = " ".join(check["warnings"])
    assert all(setting in said for setting in settings), said
    assert 0 <= check["max_lr_position"] <= 1


def test_a_peak_at_a_range_end_no_range_could_pass_is_not_warned_about():
    space = SPACE.model_copy(update={"peak_epoch": PeakEpochRange(range=(1, 10))})
    for peak in (1, 10):
        check = edge_check(pd.Series({"max_lr": 0.028, "peak_epoch": peak}), space, epochs=10)
        assert not check["at_edge"] and check["peak_epoch"] == peak


def _confirmed(winner_scores, runner_up_scores) -> pd.DataFrame:
    rows = []
    for trial_id, scores in (("a", winner_scores), ("b", runner_up_scores)):
        rows.append({"trial_id": trial_id, "role": "search", "confirms": None, "seed": 0,
                     "max_lr": 0.03, "peak_epoch": 2, "best_val_acc": scores[0]})
        rows += [{"trial_id": f"{trial_id}{seed}", "role": "confirm", "confirms": trial_id,
                  "seed": seed, "max_lr": 0.03, "peak_epoch": 2, "best_val_acc": score}
                 for seed, score in enumerate(scores[1:], start=1)]
    return pd.DataFrame(rows)


def test_the_verdict_says_whether_the_lead_is_larger_than_the_seed_spread():
    clear = seed_spread(_confirmed([0.80, 0.81, 0.79], [0.70, 0.71, 0.69]), "a")
    assert clear["lead_exceeds_spread"] and "more than the seeds' spread" in clear["verdict"]
    assert [c["seeds"] for c in clear["configs"]] == [[0, 1, 2], [0, 1, 2]]
    assert clear["configs"][0]["mean"] == pytest.approx(0.80)
    assert clear["configs"][0]["std"] == pytest.approx(0.01)
    blurred = seed_spread(_confirmed([0.80, 0.72, 0.76], [0.78, 0.77, 0.76]), "a")
    assert not blurred["lead_exceeds_spread"] and "not told apart" in blurred["verdict"]
    without = _confirmed([0.8], [0.7])
    assert seed_spread(without, "a") is None
