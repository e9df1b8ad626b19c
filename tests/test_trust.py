"""How far a study's winner can be trusted: the edge check, and confirmation runs with other
seeds (`--confirm-seeds`), through an interruption, into results.csv and the report."""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import time

import pandas as pd
import pytest

from analysis.experiment import CONFIRM_DIR, REPORT_DIR
from analysis.report import SUMMARY_JSON
from analysis.trust import edge_check, seed_spread

from .helpers import REPO, RUN, reports, results, tiny

SPACE = {"max_lr": {"distribution": "log-uniform", "estimate_times": [1.0, 8.0],
                    "range": [0.01, 0.08]},
         "peak_epoch": {"distribution": "integer uniform", "range": [2, 5]}}


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
    space = {**SPACE, "peak_epoch": {"range": [1, 10]}}
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


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_confirm_seeds_reruns_the_top_configs_through_an_interruption(ray_address,
                                                                      synthetic_dir, tmp_path):
    """Three 4-epoch trials, peak searched in [2, 3] (so the best is always at a widenable end),
    then the top two configs again with one more seed; Ctrl-C once the confirmation has begun,
    then --resume to the end and the report."""
    experiment = tmp_path / "confirmed"
    first = [*RUN, *tiny(synthetic_dir, "--address", ray_address, "--local", "--storage",
                         str(tmp_path), "--name", "confirmed", "--num-samples", "3",
                         "--confirm-seeds", "1", "--set", "train.epochs=4",
                         "--set", "search.peak_epoch_range=[2, 3]")]
    driver = subprocess.Popen(first, cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not any(reports(d) for d in (experiment / CONFIRM_DIR).glob("trial_*")
                      if (d / "result.json").exists()):
            assert driver.poll() is None and time.monotonic() < deadline, "no confirmation run"
            time.sleep(0.2)
        driver.send_signal(signal.SIGINT)
        out, _ = driver.communicate(timeout=120)
    finally:
        driver.kill()
    assert driver.returncode == 130, out[-3000:]
    assert "confirmation: the search's top 2 configs again, 1 more seed each" in out
    assert not any(line.startswith("best trial ") and " so far " not in line
                   for line in out.splitlines())
    # Ctrl-C is said, with this project's command to continue: run exactly that.
    said = f"python study/run.py --resume --name confirmed --storage {tmp_path} --address " \
           f"{ray_address} --local"
    assert re.search(rf"interrupted: [34] of 5 trials ended\. Continue with: {re.escape(said)}\n",
                     out), out[-3000:]
    resume = subprocess.run([*RUN[:-1], *shlex.split(said)[1:]], cwd=REPO, capture_output=True,
                            text=True, timeout=400)
    assert resume.returncode == 0, resume.stdout[-2000:] + resume.stderr[-2000:]

    table = results(experiment)
    search, confirm = table[table["role"] == "search"], table[table["role"] == "confirm"]
    assert len(search) == 3 and len(confirm) == 2
    assert set(table["status"]) == {"COMPLETED"}
    # The configs of the two best search trials (by score: tiny data ties often).
    scores = search.set_index("trial_id")["best_val_acc"]
    assert sorted(scores[confirm["confirms"]]) == sorted(scores)[-2:]
    assert confirm["confirms"].nunique() == 2
    assert set(confirm["seed"]) == {search["seed"].iloc[0] + 1}
    for row in confirm.itertuples():  # the confirmed config, exactly
        source = search.set_index("trial_id").loc[row.confirms]
        assert (row.max_lr, row.peak_epoch) == (source["max_lr"], source["peak_epoch"])

    summary = json.loads((experiment / REPORT_DIR / SUMMARY_JSON).read_text())
    best = summary["best_trial"]["trial_id"]  # a search trial, selected on val
    assert best in set(search["trial_id"]) and scores[best] == scores.max()
    assert summary["trust"]["edge_check"]["at_edge"]
    assert "search.peak_epoch_range" in resume.stdout
    spread = summary["trust"]["confirmation"]
    assert [len(c["seeds"]) for c in spread["configs"]] == [2, 2]
    assert f"confirmation: {spread['verdict']}" in resume.stdout
    index = (experiment / REPORT_DIR / "index.html").read_text()
    assert "How far to trust the winner" in index and "search.peak_epoch_range" in index
