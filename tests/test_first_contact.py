"""What a new user meets first: --help and a typo answered at once, the data fetched (or one
line saying how to point at a copy), the cost said before any trial, the way into the
dashboard. (Ctrl-C, its exit code and the
resume command it prints: tests/test_reliability.py, which interrupts a study's second phase.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pandas as pd
import pytest

from study.cluster import dashboard_line
from study.cost import describe
from study.run import main as study_main
from trainable.data import load_splits
from trainable.experiment import RESULTS_CSV, STUDY_JSON
from trainable.record import Estimate

from .helpers import FINISHED_DEADLINE, REPO, RUN, free_port, offline_env, tiny

# Runs an entry point as `python ...` would, then says its exit code and which of the slow
# imports it made: seconds each, so a refusal that needs neither the data nor a cluster
# must come before them.
HEAVY = ("torch", "ray", "optuna", "matplotlib", "pytorch_grad_cam")
PROBE = f"""
import json, runpy, sys
target, *sys.argv[1:] = sys.argv[1:]
try:
    if target.endswith(".py"):
        sys.argv[0] = target
        runpy.run_path(target, run_name="__main__")
    else:
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    code = 0
except SystemExit as exit_:
    code = exit_.code
print(json.dumps({{"code": code, "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""


def _probe(target: str, *argv: str, cwd) -> dict:
    run = subprocess.run([sys.executable, "-c", PROBE, target, *argv], capture_output=True,
                         text=True, timeout=60, cwd=cwd)
    assert run.returncode == 0, run.stderr[-2000:]
    return {**json.loads(run.stdout.strip().splitlines()[-1]), "stderr": run.stderr}


@pytest.mark.parametrize("argv", [
    ["--num-samplez", "3"],  # a bad flag
    ["--num-samples", "0"],  # a bad config value
    ["--set", "train.epochz=3"],  # a bad --set
    ["--set", "train.epochs"],
    ["--workers-per-trial", "3"],  # 512 does not split over 3 workers
    ["--resume", "--name", "nothing-here"],  # an experiment that does not exist
], ids=["flag", "value", "set-key", "set-form", "batch-split", "resume-missing"])
def test_a_refusal_comes_before_torch_ray_and_optuna_are_imported(argv, tmp_path):
    said = _probe(str(REPO / "study" / "run.py"), *argv, "--storage", str(tmp_path), cwd=REPO)
    assert said["code"] == 2 and said["heavy"] == [], said
    assert said["stderr"].startswith("error: ") and said["stderr"].count("\n") == 1, said
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("target", [str(REPO / "study" / "run.py"), "trainable", "analysis"])
def test_help_imports_none_of_the_slow_libraries(target):
    said = _probe(target, "--help", cwd=REPO)
    assert said["code"] == 0 and said["heavy"] == [], said


def test_a_fresh_clone_offline_is_told_in_one_line_and_keeps_no_half_download(tmp_path):
    # The README's first command in a fresh clone: the default config, data/cifar10 missing.
    run = subprocess.run([*RUN, "--local", "--dry-run", "--storage", str(tmp_path / "runs")],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={**os.environ, **offline_env()})
    assert run.returncode == 2, run.stderr[-2000:]
    error = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and "CIFAR-10 could not be downloaded" in error[0]
    assert "--data-dir" in error[0] and "cifar-10-batches-py/" in error[0]
    assert "train/<class>/" in error[0]
    assert not (tmp_path / "data").exists() and not (tmp_path / "runs").exists()


def test_a_data_dir_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "cifar").write_text("not a folder")
    code = study_main(tiny(tmp_path / "cifar", "--storage", str(tmp_path / "runs")))
    assert code == 2
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path / 'cifar'}: a file, not a data folder\n"
    assert not (tmp_path / "runs").exists()


def test_an_address_where_nothing_listens_is_refused_at_once(synthetic_dir, tmp_path, capsys):
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    code = study_main(tiny(synthetic_dir, "--address", address, "--storage", str(tmp_path)))
    assert code == 2 and time.monotonic() - started < 30
    err = capsys.readouterr().err
    assert err.startswith(f"error: --address {address}: cannot reach it") and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_the_dashboard_line_says_how_to_sign_in(monkeypatch):
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    assert "`ray get-auth-token` prints it" in dashboard_line("127.0.0.1:8265")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert "RAY_AUTH_MODE=disabled" in dashboard_line("127.0.0.1:8265")


def test_a_long_study_without_a_gpu_says_so_and_names_smaller_runs(smoke_config):
    splits = load_splits(smoke_config.data)
    long = Estimate(device="cpu", workers=1, images_per_s=50.0, epoch_s=900.0, overhead_s=30.0,
                    trial_s=18030.0, range_test_s=60.0, trials=8, at_once=2, study_s=72180.0)
    said = describe(long, smoke_config, splits)
    assert said[-1].startswith("warning: this study will take about 20 h 3 min here, without a "
                               "GPU; it runs as asked")
    assert "configs/smoke.yaml" in said[-1] and "data.limit_train" in said[-1]
    assert not describe(long.model_copy(update={"device": "cuda:0"}), smoke_config,
                        splits)[-1].startswith("warning")
    assert not describe(long.model_copy(update={"study_s": 1800.0}), smoke_config,
                        splits)[-1].startswith("warning")


@pytest.mark.slow
@pytest.mark.timeout(FINISHED_DEADLINE)
def test_the_cost_is_said_before_the_trials_and_is_near_their_time(finished):
    """The session's 3-trial --local study (2 at a time): what it said, and what it took."""
    experiment, run = finished
    lines = run.stdout.splitlines()
    said = next(i for i, line in enumerate(lines) if line.startswith("cost estimate "))
    assert lines[said + 4].startswith("  the study: about ")
    assert said < next(i for i, line in enumerate(lines) if "LR range test estimate" in line)
    assert any(line.startswith("Ray dashboard: http://") for line in lines)
    assert sum("of 3 trials ended; about" in line for line in lines) == 3
    estimate = json.loads((experiment / STUDY_JSON).read_text())["cost_estimate"]
    trial_s = pd.read_csv(experiment / RESULTS_CSV)["wall_s"]
    print(f"estimated {estimate['trial_s']:.1f} s a trial, measured {list(trial_s)}")
    assert all(0.5 <= estimate["trial_s"] / measured <= 2 for measured in trial_s)
