"""The search measured without training: the grid's table, the simulator that replays a study's
search on it, and what the study tells Optuna about trials a scheduler cut off."""

from __future__ import annotations

import csv
import math
import subprocess
import sys

import optuna
import pandas as pd
import pytest
from ray import tune

from study.search import TUNE_TRIAL_ID, StudySearch, make_sampler
from study.space import choose_sampler, describe_sampler
from tools import lr_grid, simulate
from trainable.config import load_config
from trainable.constants import DEFAULT_CONFIG, EXIT_BAD_INPUT, REPO
from trainable.record import Sampler

ESTIMATE = 0.01


def write_table(path, final, epochs=4, multiples=(0.5, 1, 2, 4, 8, 16), peaks=(1, 2, 3),
                seeds=(0, 1), early=None) -> None:
    """A table in lr_grid's format: final val_acc `final(multiple, peak, seed)`; the curve
    rises linearly to it, unless `early(multiple, peak)` gives the val_acc of epoch 1 (then
    it rises linearly from there)."""
    with path.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(lr_grid.TABLE_COLUMNS)
        for m in multiples:
            for p in peaks:
                for s in seeds:
                    last = final(m, p, s)
                    first = early(m, p) if early else last / epochs
                    for e in range(1, epochs + 1):
                        value = first + (last - first) * (e - 1) / (epochs - 1)
                        writer.writerow([m, m * ESTIMATE, p, s, e, round(value, 4)])


def smooth(m, p, s):
    """One best point (2x, peak 2), 2 points of seed noise."""
    return 0.7 - 0.03 * (math.log2(m) - 1) ** 2 - 0.02 * (p - 2) ** 2 + 0.02 * (s % 2)


@pytest.fixture
def table_path(tmp_path):
    path = tmp_path / "table.csv"
    write_table(path, smooth)
    return path


def config_for(table):
    return simulate.study_config(str(DEFAULT_CONFIG), [], table)


def test_a_study_of_one_trial_picks_the_first_point(table_path):
    """The first point is the log middle of [1, 8]x, 2.83x: between the 2x and 4x grid
    points, which resolves to the smaller; its peak is epoch 5 of 20 scaled to 4 epochs."""
    table = simulate.read_table(table_path)
    config = config_for(table)
    choice = choose_sampler(config.replace("search", sampler="tpe"))
    assert simulate.simulate(table, config, choice, [1], seed=0) == {"observed": [(2.0, 1)]}


def test_tpe_as_ray_builds_it_is_random_search_for_its_first_10_trials(table_path):
    """Ray's OptunaSearch makes TPESampler(seed=seed): 10 random startup trials. Its studies of
    8 pick exactly what random search picks; by 32 its model has made other choices."""
    table = simulate.read_table(table_path)
    config = config_for(table)
    ray_tpe, random = simulate.sampler_choice("tpe:10", 8), simulate.sampler_choice("random", 8)
    for seed in range(5):
        assert simulate.simulate(table, config, ray_tpe, [8], seed) == \
            simulate.simulate(table, config, random, [8], seed)
    per_run = simulate.Rules(("observed",), race=False, common_seed=False)
    assert any(simulate.simulate(table, config, ray_tpe, [32], seed, per_run)
               != simulate.simulate(table, config, random, [32], seed, per_run)
               for seed in range(5))


def test_the_simulator_gives_the_same_figures_twice_with_the_same_seed(table_path):
    argv = ["--table", str(table_path), "--budget", "4", "8", "--repeats", "6",
            "--samplers", "random", "tpe", "--pick", "observed", "pessimistic",
            "--race", "off", "on", "--seed", "3"]
    run = [sys.executable, str(REPO / "tools" / "simulate.py"), *argv]
    first, second = (subprocess.run(run, capture_output=True, text=True, check=True).stdout
                     for _ in range(2))
    assert first == second
    assert "| tpe | observed | off | common | 8 | 2 |" in first  # 2 startup trials at 8
    assert "| random | pessimistic | on | common | 8 | 8 |" in first
    table = simulate.read_table(table_path)
    other = simulate.measure(table, config_for(table), "random", [8], 6, seed=100)
    again = simulate.measure(table, config_for(table), "random", [8], 6, seed=3)
    assert [r["regret_mean"] for r in again] != [r["regret_mean"] for r in other]


def test_regret_is_zero_when_every_study_finds_the_best(tmp_path):
    """A table whose every point in the searched range is equally the best."""
    path = tmp_path / "flat.csv"
    write_table(path, lambda m, p, s: 0.5)
    table = simulate.read_table(path)
    (row,) = simulate.measure(table, config_for(table), "tpe", [4], 5, seed=0)
    assert row["regret_mean"] == 0 and row["within_spread"] == 1


@pytest.mark.parametrize(("change", "message"), [
    (lambda f: f.drop(columns=["peak_epoch"]), "lacks the columns peak_epoch"),
    (lambda f: f.drop(index=f.index[(f["epoch"] == 3) & (f["multiple"] == 2)][:1]),
     "multiple 2, peak epoch 1, seed 0 lacks some of epochs 1-4"),
    (lambda f: f.assign(val_acc=f["val_acc"].where(f.index != 5)), "empty cells"),
])
def test_a_table_it_cannot_replay_is_refused_in_one_line(table_path, capsys, change,
                                                         message):
    change(pd.read_csv(table_path)).to_csv(table_path, index=False)
    assert simulate.main(["--table", str(table_path)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.parametrize(("argv", "message"), [
    (["--budget", "8", "0"], "--budget 0: a study needs at least 1 trial"),
    (["--samplers", "cmaes"], "--samplers cmaes: expected default, random"),
    (["--pick", "median"], "--pick median: expected one of observed, model, pessimistic"),
    (["--race", "maybe"], "--race maybe: expected on or off"),
    (["--samplers", "random:3"], "--samplers random:3"),
    (["--repeats", "0"], "--repeats 0"),
])
def test_bad_flags_are_refused_before_any_simulation(table_path, capsys, argv, message):
    assert simulate.main(["--table", str(table_path), *argv]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_a_missing_table_is_refused(tmp_path, capsys):
    assert simulate.main(["--table", str(tmp_path / "none.csv")]) == EXIT_BAD_INPUT
    assert "cannot read the table" in capsys.readouterr().err


def test_asha_loses_the_winner_when_early_epochs_rank_the_other_way(tmp_path):
    """Curves whose order at epoch 1 is the reverse of their final order (late peaks start
    slow): the rank correlation at epoch 1 is negative, and with a grace period of 1 ASHA
    often stops every trial of the best point drawn; where early and final agree, never."""
    reversed_path, agreeing_path = tmp_path / "reversed.csv", tmp_path / "agreeing.csv"
    write_table(reversed_path, smooth, early=lambda m, p: 0.9 - smooth(m, p, 0))
    write_table(agreeing_path, smooth)
    reversed_table = simulate.read_table(reversed_path)
    agreeing_table = simulate.read_table(agreeing_path)
    config = config_for(reversed_table)
    assert simulate.rung_correlations(reversed_table, config)[1] < 0
    assert simulate.rung_correlations(agreeing_table, config)[1] > 0.9
    lost = simulate.asha_figures(reversed_table, config, 16, 20, seed=0)[0]
    kept = simulate.asha_figures(agreeing_table, config, 16, 20, seed=0)[0]
    assert lost["grace_period"] == kept["grace_period"] == 1
    assert lost["best_point_survives"] < 0.5 and lost["asha_regret_mean"] > \
        lost["fifo_regret_mean"]
    assert kept["best_point_survives"] == 1


@pytest.mark.timeout(240)
def test_the_grid_writes_a_table_the_simulator_replays(synthetic_dir, tmp_path):
    """The real lr_grid command on tiny data: one row per run and epoch, then simulated."""
    out = tmp_path / "grid.csv"
    run = subprocess.run(
        [sys.executable, str(REPO / "tools" / "lr_grid.py"), "--data-dir", str(synthetic_dir),
         "--config", str(REPO / "configs" / "smoke.yaml"), "--out", str(out),
         "--set", "data.limit_train=32", "--set", "data.val_size=16",
         "--set", "train.batch_size=16", "--set", "train.epochs=2",
         "--set", "train.peak_epoch=1", "--set", "lr_finder.num_iter=17",
         "--multiples", "1", "4", "--seeds", "0"],
        capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    table = pd.read_csv(out)
    assert list(table.columns) == list(lr_grid.TABLE_COLUMNS)
    # 2 multiples x the search's peaks at 2 epochs ([1, 2]) x 1 seed x 2 epochs
    assert len(table) == 8
    assert sorted(table["peak_epoch"].unique()) == [1, 2]
    estimate = table["max_lr"] / table["multiple"]
    assert estimate.max() == pytest.approx(estimate.min(), rel=1e-4)
    assert table["val_acc"].between(0, 1).all()
    assert "| multiple | peak 1 | peak 2 |" in run.stdout
    again = subprocess.run([sys.executable, str(REPO / "tools" / "lr_grid.py"), "--data-dir",
                            str(synthetic_dir), "--out", str(out)], capture_output=True,
                           text=True)
    assert again.returncode == EXIT_BAD_INPUT and "exists" in again.stderr
    assert len(pd.read_csv(out)) == 8  # not overwritten
    assert simulate.main(["--table", str(out), "--budget", "2", "--repeats", "2",
                          "--race", "off"]) == 0


# --- what Optuna is told -------------------------------------------------------------------

def searcher(epochs=4):
    config = load_config(DEFAULT_CONFIG, []).replace("search", sampler="tpe")
    search = StudySearch(sampler=make_sampler(choose_sampler(config), 0), epochs=epochs)
    search.set_search_properties("val_acc", "max", {"max_lr": tune.loguniform(0.01, 0.1),
                                                    "peak_epoch": tune.randint(1, 3)})
    return search


def test_a_trial_a_scheduler_stopped_is_pruned_with_its_epochs():
    search = searcher()
    search.suggest("stopped")
    search.on_trial_result("stopped", {"val_acc": 0.2, "epoch": 1})
    search.on_trial_complete("stopped", {"val_acc": 0.3, "epoch": 2, "diverged": False})
    search.suggest("finished")  # under ASHA: its last result reaches only the completion
    for epoch in range(1, 4):
        search.on_trial_result("finished", {"val_acc": 0.1 * epoch, "epoch": epoch})
    search.on_trial_complete("finished", {"val_acc": 0.4, "epoch": 4, "diverged": False})
    search.suggest("fifo")  # under FIFO: its last result reaches both
    for epoch in range(1, 5):
        search.on_trial_result("fifo", {"val_acc": 0.5, "epoch": epoch})
    search.on_trial_complete("fifo", {"val_acc": 0.5, "epoch": 4, "diverged": False})
    search.suggest("diverged")
    search.on_trial_complete("diverged", {"val_acc": 0.0, "epoch": 1, "diverged": True})
    stopped, finished, fifo, diverged = search._ot_study.trials
    states = optuna.trial.TrialState
    assert stopped.state == states.PRUNED and stopped.intermediate_values == {1: 0.2, 2: 0.3}
    assert finished.state == states.COMPLETE and finished.value == 0.4
    assert finished.intermediate_values == {1: 0.1, 2: 0.2, 3: pytest.approx(0.3), 4: 0.4}
    assert fifo.state == states.COMPLETE and fifo.intermediate_values == dict.fromkeys(
        range(1, 5), 0.5)
    assert diverged.state == states.COMPLETE and diverged.value == 0.0  # finite, ranked last
    # Each Optuna trial names its Tune trial: the sampler may suggest one point twice.
    assert [t.user_attrs[TUNE_TRIAL_ID] for t in search._ot_study.trials] == [
        "stopped", "finished", "fifo", "diverged"]


def test_the_sampler_follows_the_budget_unless_set():
    config = load_config(DEFAULT_CONFIG, [])
    assert choose_sampler(config) == Sampler(name="gp", startup_trials=2)
    assert choose_sampler(config.replace("search", sampler="tpe", num_samples=32)) \
        .startup_trials == 8
    assert choose_sampler(config.replace("search", sampler="random")) == Sampler(
        name="random", startup_trials=8)
    fixed = config.replace("search", sampler="tpe", startup_trials=5, num_samples=32)
    assert choose_sampler(fixed).startup_trials == 5
    assert isinstance(make_sampler(choose_sampler(config.replace("search", sampler="gp")), 0),
                      optuna.samplers.GPSampler)


def test_the_study_says_when_its_search_is_random_search():
    """Ray's default TPE at the default budget: its 10 startup trials cover all 8."""
    def tpe(startup: int) -> Sampler:
        return Sampler(name="tpe", startup_trials=startup)

    assert "cover all 8: this is random search;" in describe_sampler(tpe(10), 8)
    assert describe_sampler(tpe(2), 8).startswith(
        "search: Optuna's TPE over 8 trials: the first point and random draws until 2 have "
        "finished, then its model; at this budget the search is as good as random")
    assert "as good as random" not in describe_sampler(tpe(16), 64)
    assert "as good as random" not in describe_sampler(Sampler(name="gp", startup_trials=2), 8)


# --- the measured table (docs/search-range.md): what the defaults rest on ------------------

MEASURED_TABLE = REPO / "docs" / "tables" / "cpu-1500x4.csv"


@pytest.fixture(scope="module")
def measured():
    table = simulate.read_table(MEASURED_TABLE)
    return table, config_for(table)


@pytest.mark.slow  # no study or server, but 200 GP-driven studies: about 3 min on 2 cores
@pytest.mark.timeout(600)
def test_on_the_measured_table_the_default_sampler_beats_random_search_at_8_trials(measured):
    """The figures of docs/search-range.md (200 studies, seeds 0-199): the default (Optuna's
    GP, 2 startup trials) has a lower mean regret than random search at 8 trials, by more than
    two standard errors of the difference."""
    table, config = measured
    (default,) = simulate.measure(table, config, "gp", [8], 200, 0)
    (random,) = simulate.measure(table, config, "random", [8], 200, 0)
    assert default["startup_trials"] == 2
    noise = 2 * math.hypot(default["regret_se"], random["regret_se"])
    assert default["regret_mean"] + noise < random["regret_mean"]


def test_on_the_measured_table_tpe_is_as_good_as_random_and_qmc_no_better(measured):
    """TPE with its startup fitted to the budget is no worse than random search by more than
    two standard errors at 8 and 32 trials, every pick of both lies within a seed spread of
    the best, and at 32 scrambled Sobol points are no better than TPE by more than two
    standard errors (worse on the table's seeds 0-1; within the noise on all four)."""
    table, config = measured
    tpe = dict(zip((8, 32), simulate.measure(table, config, "tpe", [8, 32], 200, 0),
                   strict=True))
    random = dict(zip((8, 32), simulate.measure(table, config, "random", [8, 32], 200, 0),
                      strict=True))
    for budget in (8, 32):
        noise = 2 * math.hypot(tpe[budget]["regret_se"], random[budget]["regret_se"])
        assert tpe[budget]["regret_mean"] <= random[budget]["regret_mean"] + noise
        assert tpe[budget]["within_spread"] == random[budget]["within_spread"] == 1
    (qmc,) = simulate.measure(table, config, "qmc", [32], 200, 0)
    noise = 2 * math.hypot(tpe[32]["regret_se"], qmc["regret_se"])
    assert qmc["regret_mean"] >= tpe[32]["regret_mean"] - noise


def test_on_the_measured_table_asha_keeps_the_best_point_once_its_rung_covers_the_peaks(
        measured):
    """The default grace period (the peak range's end, epoch 3 here) never lost the best point
    drawn; a rung at epoch 1, where the ranks do not yet hold, did."""
    table, config = measured
    assert config.grace_period == 3
    by_grace = {r["grace_period"]: r for r in simulate.asha_figures(table, config, 32, 200, 0)}
    assert by_grace[3]["best_point_survives"] == 1
    assert by_grace[1]["best_point_survives"] < 0.9
    assert simulate.rung_correlations(table, config)[1] < 0.2


def test_a_grid_given_an_estimate_that_is_no_learning_rate_is_refused(tmp_path, capsys):
    out = tmp_path / "grid.csv"
    assert lr_grid.main(["--data-dir", str(tmp_path), "--out", str(out),
                         "--estimate", "0"]) == EXIT_BAD_INPUT
    assert capsys.readouterr().err == "error: --estimate 0.0: a learning rate above 0\n"
    assert not out.exists()
