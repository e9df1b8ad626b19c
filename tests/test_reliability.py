"""Faults a study must survive, as Ray's own release tests provoke them, on CPU with tiny data:
a driver killed at several moments and interrupted in its confirmation phase, a node lost
mid-trial, many trials. docs/reliability.md
tabulates what these tests do and what was lost (nothing)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import optuna
import psutil
import pytest

from analysis.report import SUMMARY_JSON
from trainable.checkpoint import load_checkpoint
from trainable.experiment import (
    CONFIRM_DIR,
    LR_FINDER_JSON,
    REPORT_DIR,
    STUDY_JSON,
    Folder,
    optuna_url,
)

from .helpers import (
    REPO,
    RUN,
    assert_optuna_told_what_tune_saw,
    reports,
    results,
    tiny,
    trial_epochs,
)


def _wait_for(driver: subprocess.Popen, condition, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        assert driver.poll() is None, f"the study ended before {what}"
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def _kill_when(args: list[str], condition, what: str) -> None:
    """Start the driver and SIGKILL it as soon as `condition()` holds."""
    driver = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        _wait_for(driver, condition, what)
        driver.send_signal(signal.SIGKILL)
        driver.wait(30)
    finally:
        driver.kill()


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_one_study_killed_at_four_moments_and_interrupted_in_its_confirmation_ends_whole(
        ray_address, synthetic_dir, tmp_path):
    """One study with a confirmation phase (3 trials, then the top 2 configs with one more
    seed): its driver SIGKILLed during the LR range test, between two trials, in the middle of
    a trial; Ctrl-C once the confirmation has begun; SIGKILLed while the report is written.
    Each time the study is continued, the last times with the command it printed."""
    epochs = 4  # peak searched in [2, 3]: the best is always at an end that can be widened
    experiment = tmp_path / "killed"
    first = [*RUN, *tiny(synthetic_dir, "--address", ray_address, "--local", "--storage",
                         str(tmp_path), "--name", "killed", "--num-samples", "3",
                         "--confirm-seeds", "1", "--set", f"train.epochs={epochs}",
                         "--set", "search.peak_epoch_range=[2, 3]",
                         # the raw maximum: its pick is checked against the scores below
                         "--set", "search.pick=observed")]
    resume = [*RUN, "--address", ray_address, "--storage", str(tmp_path), "--name", "killed",
              "--resume", "--local"]

    def finished_trials() -> list[str]:
        return [t for t, seen in trial_epochs(experiment).items() if seen[-1:] == [epochs]]

    def running_trials() -> dict[str, list[int]]:
        return {t: seen for t, seen in trial_epochs(experiment).items()
                if seen and seen[-1] < epochs}

    # Its plan first, against the cluster it will run on: printed, and nothing trained or kept.
    dry = subprocess.run([*first, "--dry-run"], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert dry.returncode == 0, dry.stderr[-3000:]
    plan = json.loads(dry.stdout)
    assert (plan["trials"], plan["confirmation_runs"]) == (3, 2)
    assert plan["trials_fitting_at_once"] == 1  # search.max_concurrent in smoke.yaml
    assert not experiment.exists()

    _kill_when(first, lambda: _in_range_test(experiment), "the LR range test")
    assert not (experiment / LR_FINDER_JSON).exists()

    _kill_when(resume, lambda: len(finished_trials()) == 1 and not running_trials(),
               "the end of the first trial")
    assert [seen for seen in trial_epochs(experiment).values() if seen] == \
        [list(range(1, epochs + 1))]

    _kill_when(resume, lambda: bool(running_trials()), "a trial's first epochs")
    (interrupted, before), = running_trials().items()

    # Ctrl-C in the second phase: exit 130 and this project's command to continue.
    driver = subprocess.Popen(resume, cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(driver, lambda: any(reports(d) for d in (experiment / CONFIRM_DIR).glob(
            "trial_*") if (d / "result.json").exists()), "a confirmation run's first epoch",
            timeout=400)
        driver.send_signal(signal.SIGINT)
        out, _ = driver.communicate(timeout=120)
    finally:
        driver.kill()
    assert driver.returncode == 130, out[-3000:]
    assert "confirmation: the search's top 2 configs again, 1 more seed each" in out
    assert not any(line.startswith("best trial ") and " so far " not in line
                   for line in out.splitlines())
    # How it runs (--local) comes back from study.json; where (--address) is said.
    said = f"python study/run.py --resume --name killed --storage {tmp_path} --address " \
           f"{ray_address}"
    assert re.search(rf"interrupted: [34] of 5 trials ended\. Continue with: {re.escape(said)}\n",
                     out), out[-3000:]
    continued = [*RUN[:-1], *shlex.split(said)[1:]]

    _kill_when(continued, lambda: (experiment / f"{REPORT_DIR}.partial").exists(), "the report")
    assert not (experiment / REPORT_DIR).exists()

    last = subprocess.run(continued, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert last.returncode == 0, last.stdout[-2000:] + last.stderr[-2000:]

    table = results(experiment)
    search, confirm = table[table["role"] == "search"], table[table["role"] == "confirm"]
    assert len(search) == 3 and len(confirm) == 2
    assert set(table["status"]) == {"COMPLETED"}
    # A trial started in the second before a kill, before Tune saved it, leaves an empty
    # folder; Tune starts another in its place. Every trial that reported is in results.csv.
    seen = {trial: reported for trial, reported in trial_epochs(experiment).items() if reported}
    assert set(seen) == {f"trial_{t}" for t in search["trial_id"]}
    for trial, reported in seen.items():
        # Each epoch ran once: the newest checkpoint's history (kept across resumes) has every
        # epoch once. Tune's record may lack the epoch that ended in the instant before a kill
        # (its checkpoint is written before Tune logs the report), never repeat one.
        newest = max((experiment / trial).glob("checkpoint_*"))
        ran = [m["epoch"] for m in load_checkpoint(newest)["history"]]
        assert ran == list(range(1, epochs + 1)), (trial, ran)
        assert reported == sorted(set(reported)) and reported[-1] == epochs, (trial, reported)
    # The trial killed mid-way went on from its checkpoint: no epoch it had reported ran again.
    assert seen[interrupted][:len(before)] == before
    assert seen[interrupted].count(1) == 1, seen[interrupted]
    storage = optuna_url(Folder.at(experiment))
    (summary,) = optuna.get_all_study_summaries(storage)
    states = [t.state for t in optuna.load_study(study_name=summary.study_name,
                                                 storage=storage).trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 3, states
    assert optuna.trial.TrialState.RUNNING not in states

    # The confirmation reran the configs of the two best search trials (by score: tiny data
    # ties often), each exactly, with the next seed.
    scores = search.set_index("trial_id")["best_val_acc"]
    assert sorted(scores[confirm["confirms"]]) == sorted(scores)[-2:]
    assert confirm["confirms"].nunique() == 2
    assert set(confirm["seed"]) == {search["seed"].iloc[0] + 1}
    for row in confirm.itertuples():
        source = search.set_index("trial_id").loc[row.confirms]
        assert (row.max_lr, row.peak_epoch) == (source["max_lr"], source["peak_epoch"])

    # The report is whole and agrees with results.csv; the winner is a search trial, selected
    # on val, and how far to trust it is said.
    assert not (experiment / f"{REPORT_DIR}.partial").exists()
    summary = json.loads((experiment / REPORT_DIR / SUMMARY_JSON).read_text())
    best = summary["best_trial"]["trial_id"]
    assert best in set(search["trial_id"]) and scores[best] == scores.max()
    assert summary["trials_by_status"] == {"COMPLETED": 3}
    assert summary["trust"]["edge_check"]["at_edge"]
    assert "search.peak_epoch_range" in last.stdout
    spread = summary["trust"]["confirmation"]
    assert [len(c["seeds"]) for c in spread["configs"]] == [2, 2]
    assert f"confirmation: {spread['verdict']}" in last.stdout
    index = (experiment / REPORT_DIR / "index.html").read_text()
    assert all(trial_id in index for trial_id in table["trial_id"])
    assert "How far to trust the winner" in index and "search.peak_epoch_range" in index


def _in_range_test(experiment: Path) -> bool:
    """study.json is written just before the range test's Ray task starts, and lr_finder.json
    when it ends; two seconds on, the task is under way rather than still queued."""
    study_json = experiment / STUDY_JSON
    return (study_json.exists() and not (experiment / LR_FINDER_JSON).exists()
            and time.time() - study_json.stat().st_mtime > 2.0)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_lost_node_s_trial_continues_from_its_checkpoint_on_the_other(synthetic_dir,
                                                                         tmp_path):
    """Two Ray nodes on one machine (Ray's own `Cluster` test utility), one CPU each, so the
    two trials run one per node; the worker node is killed once both have checkpointed an
    epoch. The lost trial is retried (FailureConfig) on the head from its checkpoint."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "num_gpus": 0, "include_dashboard": False,
        "env_vars": {"RAY_AUTH_MODE": os.environ["RAY_AUTH_MODE"]}})
    worker = cluster.add_node(num_cpus=1, num_gpus=0)
    epochs = 3
    experiment = tmp_path / "nodes"
    args = [*RUN, *tiny(synthetic_dir, "--address", cluster.address, "--local", "--storage",
                        str(tmp_path), "--name", "nodes", "--num-samples", "2", "--no-report",
                        "--set", f"train.epochs={epochs}", "--set", "search.max_concurrent=2",
                        "--set", "search.max_failures=2")]
    log = tmp_path / "driver.log"  # a file, not a pipe: an unread pipe would block the driver
    with log.open("w") as out:
        driver = subprocess.Popen(args, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_for(driver, lambda: len([t for t in trial_epochs(experiment).values() if t]) == 2,
                  "both trials' first epoch", timeout=180)
        cluster.remove_node(worker, allow_graceful=False)
        assert driver.wait(300) == 0, log.read_text()[-3000:]
    finally:
        driver.kill()
        cluster.shutdown()
    table = results(experiment)
    assert len(table) == 2 and set(table["status"]) == {"COMPLETED"}
    restored = []
    for trial_dir in experiment.glob("trial_*"):
        rows = reports(trial_dir)
        assert [r["epoch"] for r in rows] == list(range(1, epochs + 1)), trial_dir.name
        if any(r["iterations_since_restore"] < r["training_iteration"] for r in rows):
            restored.append(trial_dir.name)
    assert len(restored) == 1, "exactly the lost node's trial was restored"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_many_tiny_trials_finish_within_num_to_keep_and_flat_memory(ray_address,
                                                                    synthetic_dir, tmp_path):
    """20 two-step-per-epoch trials under ASHA, two at a time: all end, ASHA stops some at its
    rung (epoch 2), each keeps at most num_to_keep checkpoints besides its latest, and the
    driver's memory does not grow with the number of trials."""
    trials, epochs = 20, 3
    experiment = tmp_path / "many"
    args = [*RUN, *tiny(synthetic_dir, "--address", ray_address, "--local", "--storage",
                        str(tmp_path), "--name", "many", "--num-samples", str(trials),
                        "--scheduler", "asha", "--no-report", "--set", f"train.epochs={epochs}",
                        "--set", "data.val_size=48", "--set", "search.max_concurrent=2",
                        "--set", "search.num_to_keep=1", "--set", "search.grace_period=2",
                        "--set", "search.peak_epoch_range=[1, 2]",
                        # wide, so that trials differ at the rung and ASHA stops some
                        "--set", "search.max_lr_range=[0.05, 20]")]
    log = tmp_path / "driver.log"  # a file, not a pipe: an unread pipe would block the driver
    rss_by_trials: dict[int, int] = {}  # driver's resident bytes, by trials started
    with log.open("w") as out:
        driver = subprocess.Popen(args, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        try:
            process = psutil.Process(driver.pid)
            deadline = time.monotonic() + 420
            while driver.poll() is None and time.monotonic() < deadline:
                started = len(list(experiment.glob("trial_*")))
                with contextlib.suppress(psutil.NoSuchProcess):
                    rss_by_trials[started] = max(rss_by_trials.get(started, 0),
                                                 process.memory_info().rss)
                time.sleep(0.25)
        finally:
            driver.kill()
    assert driver.wait() == 0, log.read_text()[-3000:]
    table = results(experiment).set_index("trial_id")
    assert len(table) == trials
    assert set(table["status"]) <= {"COMPLETED", "STOPPED", "DIVERGED"}
    stopped = table[table["status"] == "STOPPED"]
    assert len(stopped) >= 1 and (stopped["epochs_run"] < epochs).all()
    assert (table.loc[table["status"] == "COMPLETED", "epochs_run"] == epochs).all()
    assert_optuna_told_what_tune_saw(experiment, table)
    # Ray keeps the best num_to_keep checkpoints and, beside them, always the latest.
    for trial_dir in experiment.glob("trial_*"):
        kept = len(list(trial_dir.glob("checkpoint_*")))
        row = table.loc[trial_dir.name.removeprefix("trial_")]
        best_is_latest = row["best_val_acc"] == row["final_val_acc"]
        assert kept <= (1 if best_is_latest else 2), (trial_dir.name, kept)
    early = max(rss for n, rss in rss_by_trials.items() if 5 <= n <= 10)
    late = max(rss for n, rss in rss_by_trials.items() if n >= trials - 3)
    print(f"driver RSS: {early / 1e6:.0f} MB at 5-10 trials, {late / 1e6:.0f} MB at the end")
    assert late < early * 1.25

