"""The study end to end, on CPU with tiny synthetic data: `python study/run.py` in a subprocess,
joined to one Ray head started for the whole test session; and every refusal, before Ray.
(The TorchTrainer path under ASHA, with its dashboard: tests/test_multi_worker.py.)"""

from __future__ import annotations

import json
import os
from dataclasses import replace

import optuna
import pandas as pd
import pytest

from analysis.results import Trial, trial_table, winner
from study.plan import BadInput, bind, print_plan, resolve
from study.run import main as study_main
from study.run import parse_args
from study.trial import DivergenceStopper
from trainable.config import load_config
from trainable.constants import DEFAULT_CONFIG, TrialStatus
from trainable.experiment import (
    LR_FINDER_JSON,
    LR_FINDER_PNG,
    METRIC,
    RESULTS_CSV,
    STUDY_JSON,
    Folder,
    Role,
    optuna_url,
)
from trainable.record import MaxLrRange, PeakEpochRange, SearchSpace

from .helpers import EPOCHS, FINISHED_DEADLINE, reports, results, tiny


@pytest.mark.slow
@pytest.mark.timeout(FINISHED_DEADLINE)
def test_three_trials_complete_around_the_estimate(finished):
    experiment, run = finished
    table = results(experiment)
    assert len(table) == 3 and set(table["status"]) == {"COMPLETED"}
    assert (table["epochs_run"] == EPOCHS).all()
    # Where each trial's time went: its start-up apart from its training and validation.
    for column in ("startup_s", "train_s", "val_s"):
        assert (table[column] > 0).all(), table[column]
    assert (table["startup_s"] + table["train_s"] + table["val_s"] < table["wall_s"] + 1).all()
    estimate = json.loads((experiment / LR_FINDER_JSON).read_text())["suggested_lr"]
    assert json.loads((experiment / STUDY_JSON).read_text())["estimate"] == estimate
    lo, hi = 0.5 * estimate, 2.0 * estimate  # smoke.yaml: search.max_lr_range [0.5, 2]
    assert table["max_lr"].between(lo * (1 - 1e-9), hi * (1 + 1e-9)).all()
    assert table["peak_epoch"].between(1, EPOCHS).all()
    # The first trial evaluates the log middle of the range (here the estimate itself), with
    # the original's peak scaled to 2 epochs.
    first = table.loc[table["max_lr"] == estimate]
    assert len(first) == 1 and first["peak_epoch"].item() == 1
    assert "best trial" in run.stdout and "Ray dashboard:" in run.stdout
    assert (experiment / LR_FINDER_PNG).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
@pytest.mark.timeout(FINISHED_DEADLINE)
def test_one_report_per_epoch_with_a_checkpoint(finished):
    experiment, _ = finished
    for trial_id, checkpoint in results(experiment)[["trial_id", "checkpoint"]].itertuples(
            index=False):
        rows = reports(experiment / f"trial_{trial_id}")
        assert [r["epoch"] for r in rows] == list(range(1, EPOCHS + 1))
        assert [r["training_iteration"] for r in rows] == [r["epoch"] for r in rows]
        assert os.path.isfile(os.path.join(checkpoint, "checkpoint.pt"))


@pytest.mark.slow
@pytest.mark.timeout(FINISHED_DEADLINE)
def test_optuna_study_is_kept_in_sqlite(finished):
    experiment, _ = finished
    storage = optuna_url(Folder.at(experiment))
    (summary,) = optuna.get_all_study_summaries(storage)
    trials = optuna.load_study(study_name=summary.study_name, storage=storage).trials
    assert len(trials) == 3
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert all(sorted(t.intermediate_values) == list(range(1, EPOCHS + 1)) for t in trials)
    # GP with 2 startup trials, one trial at a time: the first point, one random draw (1 had
    # finished before it), then the model (2 had)
    assert json.loads((experiment / STUDY_JSON).read_text())["sampler"] == {
        "name": "gp", "startup_trials": 2,
        "trials": {"first_point": 1, "startup": 1, "model": 1, "races": 0}}
    _, run = finished
    assert "search: Optuna's GP over 3 trials: the first point and random draws until 2 have " \
        "finished, then its model\n" in run.stdout


def test_an_existing_experiment_is_never_overwritten(synthetic_dir, tmp_path, capsys):
    experiment = tmp_path / "kept"
    experiment.mkdir()
    (experiment / RESULTS_CSV).write_text("trial_id\nabc\n")
    code = study_main(tiny(synthetic_dir, "--storage", str(tmp_path), "--name", "kept"))
    assert code == 2
    assert "experiment exists; use --resume" in capsys.readouterr().err
    assert [p.name for p in experiment.iterdir()] == [RESULTS_CSV]
    assert (experiment / RESULTS_CSV).read_text() == "trial_id\nabc\n"


def test_a_diverged_trial_is_never_the_winner_and_the_study_goes_on():
    """What a study makes of a trial whose loss went non-finite (the loop's side:
    tests/test_loop.py::test_a_non_finite_loss_ends_the_run_as_diverged): Tune stops that
    trial and no other, the table says DIVERGED with finite figures, and it is never picked."""
    stopper = DivergenceStopper()
    assert stopper("a", {"epoch": 2, "diverged": True, "val_acc": 0.0})
    assert not stopper("b", {"epoch": 2, "diverged": False, "val_acc": 0.5})
    assert not stopper.stop_all()
    history = pd.DataFrame({"epoch": [1, 2], METRIC: [0.12, 0.0], "diverged": [False, True]})
    diverged = Trial("a", Role.SEARCH, None, 0, TrialStatus.DIVERGED,
                     {"max_lr": 1e6, "peak_epoch": 1}, history, "/runs/x/trial_a/checkpoint_0")
    table = trial_table([diverged])
    assert table["status"].tolist() == ["DIVERGED"] and table["epochs_run"].tolist() == [2]
    assert table["best_val_acc"].tolist() == [0.12]  # the epoch before it diverged
    search, space = load_config(DEFAULT_CONFIG).search, SearchSpace(
        max_lr=MaxLrRange(estimate_times=(1, 8), range=(0.01, 0.08)),
        peak_epoch=PeakEpochRange(range=(1, 2)))
    for rule in ("observed", "model", "pessimistic"):  # nothing to report on: analysis refuses
        assert winner(table, replace(search, pick=rule), space) is None
    fine = Trial("b", Role.SEARCH, None, 0, TrialStatus.COMPLETED,
                 {"max_lr": 0.01, "peak_epoch": 1},
                 pd.DataFrame({"epoch": [1, 2], METRIC: [0.05, 0.06],
                               "diverged": [False, False]}), "/runs/x/trial_b/checkpoint_1")
    for rule in ("observed", "model", "pessimistic"):
        best, _ = winner(trial_table([diverged, fine]), replace(search, pick=rule), space)
        assert best["trial_id"] == "b"


@pytest.mark.parametrize("extra, message", [
    (["--num-samples", "0"], "search.num_samples: 0 is below the minimum 1"),
    (["--set", "train.epochs=0"], "train.epochs: 0 is below the minimum 1"),
    (["--set", "train.epochs=1", "--set", "train.peak_epoch=1",
      "--set", "search.peak_epoch_range=null"],
     "train.epochs=1: a study needs at least 2 epochs"),
    (["--set", "search.peak_epoch_range=[1, 5]"], "search.peak_epoch_range=[1, 5] needs"),
    (["--set", "search.peak_epoch_range=[2, 2]"], "search.peak_epoch_range=[2, 2] needs"),
    (["--set", "search.max_lr_range=[3, 1]"], "search.max_lr_range=[3.0, 1.0] needs"),
    (["--set", "train.batch_size=0"], "train.batch_size: 0 is below the minimum 1"),
    (["--workers-per-trial", "0"], "--workers-per-trial=0: must be at least 1"),
    (["--workers-per-trial", "3"], "train.batch_size=16 (the global batch) does not split "
                                   "evenly over --workers-per-trial=3"),
    (["--workers-per-trial", "3", "--dry-run"], "does not split evenly"),
    (["--workers-per-trial", "16"], "one trial needs 16 CPU (16 workers) but the cluster has"),
    (["--workers-per-trial", "1", "--local"],
     "--local runs each trial in one process: drop --workers-per-trial"),
    (["--set", "data.limit_train=15"], "15 training images make no full batch of "
                                       "train.batch_size=16"),
    (["--scheduler", "pbt"], "search.scheduler: 'pbt' is not one of fifo, asha"),
    (["--data-dir", "/nonexistent/cifar"], "/nonexistent/cifar: CIFAR-10 could not be downloaded"),
    (["--resume", "--name", "never-ran"], "no experiment to resume"),
    (["--set", "train.max_lrr=1"], "unknown config key train.max_lrr"),
])
def test_bad_input_is_refused_before_ray_starts(synthetic_dir, tmp_path, capsys, offline,
                                                extra, message):
    import ray

    code = study_main(tiny(synthetic_dir, "--storage", str(tmp_path / "runs"), *extra))
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()
    assert not ray.is_initialized()


@pytest.mark.parametrize("storage, message", [
    ("/proc/onecycle-runs", "/proc: cannot write there"),  # a read-only file system
    ("{tmp}/a-file/runs", "a-file: not a folder, so it cannot hold the experiment"),
])
def test_unwritable_storage_is_refused_before_ray_starts(synthetic_dir, tmp_path, capsys,
                                                         storage, message):
    import ray

    (tmp_path / "a-file").write_text("not a folder")
    code = study_main(tiny(synthetic_dir, "--storage", storage.format(tmp=tmp_path)))
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
    assert not ray.is_initialized()


def test_a_disk_too_full_for_the_checkpoints_is_refused(synthetic_dir, tmp_path, capsys,
                                                         monkeypatch):
    import shutil

    import ray

    free = 500e6  # bytes: room for 5 checkpoints of 89 MB, not for 3 trials x 2 kept
    monkeypatch.setattr(shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(1e12, 0, free))
    code = study_main(tiny(synthetic_dir, "--storage", str(tmp_path / "runs"),
                           "--num-samples", "3", "--set", "search.num_to_keep=2"))
    assert code == 2
    err = capsys.readouterr().err
    assert "0.50 GB free, the study's checkpoints need 0.54 GB (3 trials x 2 kept x 89 MB)" in err
    assert not (tmp_path / "runs").exists() and not ray.is_initialized()


def test_gpus_requested_on_a_cluster_without_any(synthetic_dir, tmp_path, capsys,
                                                monkeypatch):
    import ray

    no_gpu = {"CPU": 2.0, "GPU": 0.0}
    plan = resolve(parse_args(tiny(synthetic_dir, "--gpus-per-trial", "0.5", "--address", "x:1")))
    with pytest.raises(BadInput, match=r"--gpus-per-trial=0.5: the cluster has no GPU"):
        bind(plan, no_gpu)  # a cluster's, as ray.cluster_resources() gives it
    # This machine's, before Ray starts: one line, nothing written.
    monkeypatch.setattr("study.run.this_machine", lambda: no_gpu)
    code = study_main(tiny(synthetic_dir, "--storage", str(tmp_path), "--gpus-per-trial", "0.5"))
    assert code == 2
    err = capsys.readouterr().err
    assert "--gpus-per-trial=0.5: the cluster has no GPU" in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == [] and not ray.is_initialized()


def test_dry_run_plan_says_workers_batches_resources_and_trials_at_once(synthetic_dir,
                                                                        tmp_path, capsys):
    request = parse_args(tiny(synthetic_dir, "--storage", str(tmp_path), "--name", "plan",
                              "--dry-run", "--num-samples", "5", "--workers-per-trial", "2",
                              "--cpus-per-worker", "0.25", "--set", "search.max_concurrent=8"))
    plan = resolve(request)
    print_plan(plan, bind(plan, {"CPU": 2.0, "GPU": 0.0}), {}, None)
    plan = json.loads(capsys.readouterr().out)
    assert plan["trials"] == 5 and plan["path"] == "TorchTrainer"
    assert plan["workers_per_trial"] == 2 and plan["batch_size_per_worker"] == 8
    assert plan["resources_per_trial"] == {"CPU": 0.51}  # 2 workers x 0.25 + the driver
    assert plan["trials_fitting_at_once"] == 3  # 2 CPUs / 0.51
    assert plan["search_space"]["peak_epoch"]["range"] == [1, 2]
    assert not (tmp_path / "plan").exists()
