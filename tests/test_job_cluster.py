"""Real jobs on a real head (the session's, from `ray start --head`): a study submitted with
`ray job submit --working-dir <a clean copy>`, refused, stopped with `ray job stop` and
resubmitted as a KubeRay retry would; and a --local study resumed with a bare --resume."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from ray.job_submission import JobStatus, JobSubmissionClient

from trainable.constants import REPO
from trainable.experiment import REPORT_DIR, STUDY_JSON

from .helpers import RUN, assert_optuna_told_what_tune_saw, results, tiny, trial_epochs

RAY = str(Path(sys.executable).with_name("ray"))
ENDED = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}


def clean_copy(to: Path) -> Path:
    """The repository's files as a clone has them: what git tracks, and new files not ignored."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (to / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, to / name)
    return to


def submit(dashboard: str, working_dir: Path, submission_id: str, entrypoint: list[str]) -> None:
    """`ray job submit --no-wait`, retried while the head's job agent is not up yet."""
    command = [RAY, "job", "submit", "--address", dashboard, "--working-dir", str(working_dir),
               "--submission-id", submission_id, "--no-wait", "--", *entrypoint]
    deadline = time.monotonic() + 60
    while True:
        run = subprocess.run(command, capture_output=True, text=True, timeout=120)
        said = run.stdout + run.stderr
        if run.returncode == 0:
            return
        assert "No available agent" in said and time.monotonic() < deadline, said[-3000:]
        time.sleep(2)


def wait_until(condition, what: str, timeout: float):
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return found


def gcs_servers() -> int:
    return sum(p.info["name"] == "gcs_server" for p in psutil.process_iter(["name"]))


def entrypoint(synthetic_dir: Path, *flags: str) -> list[str]:
    """A tiny --local study, its config the copy's own (a path relative to the job's dir)."""
    args = tiny(synthetic_dir, "--local", *flags)
    args[args.index("--config") + 1] = "configs/smoke.yaml"
    return ["python", "study/run.py", *args]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_job_joins_its_cluster_is_refused_stopped_and_resubmitted(ray_head, synthetic_dir,
                                                                   tmp_path):
    client = JobSubmissionClient(ray_head.dashboard)
    copy = clean_copy(tmp_path / "repo")
    storage = tmp_path / "runs"
    experiment = storage / "jobbed"

    def ended(submission_id: str) -> JobStatus:
        return wait_until(lambda: (s := client.get_job_status(submission_id)) in ENDED and s,
                          f"job {submission_id} to end", timeout=400)

    # A relative --storage would land in Ray's copy of the working dir: refused in one line.
    submit(ray_head.dashboard, copy, "relative", entrypoint(
        synthetic_dir, "--storage", "runs", "--name", "jobbed"))
    assert ended("relative") == JobStatus.FAILED
    logs = client.get_job_logs("relative").strip().splitlines()
    assert logs[-1].startswith("error: --storage runs: inside this Ray job's copy of its "
                               "working dir"), logs[-5:]
    assert not (copy / "runs").exists() and not storage.exists()

    # The study, with no --address: it joins the job's cluster (no second GCS), and is stopped
    # mid-trial by `ray job stop`, which sends SIGTERM and SIGKILLs 3 s later.
    study = entrypoint(synthetic_dir, "--num-samples", "3", "--storage", str(storage),
                       "--name", "jobbed", "--resume-if-exists")
    servers = gcs_servers()
    submit(ray_head.dashboard, copy, "jobbed-1", study)
    wait_until(lambda: any(trial_epochs(experiment).values()), "a trial's first epoch", 300)
    assert gcs_servers() == servers
    asked = time.monotonic()
    client.stop_job("jobbed-1")
    assert ended("jobbed-1") == JobStatus.STOPPED
    stopped_s = time.monotonic() - asked
    logs = client.get_job_logs("jobbed-1")
    print(f"ray job stop to STOPPED: {stopped_s:.1f} s")
    assert "Ray job jobbed-1" in logs
    assert "interrupted (SIGTERM): stopping the study as on Ctrl-C. Continue with: python " \
        f"study/run.py --resume --name jobbed --storage {storage} (as a Ray job: submit it, or " \
        "this job's entrypoint with --resume-if-exists)" in logs, logs[-3000:]
    print("the study's own end within the stop:", "interrupted: " in logs)

    # The identical entrypoint again, as a RayJob's retry submits it: the study resumes.
    submit(ray_head.dashboard, copy, "jobbed-2", study)
    assert ended("jobbed-2") == JobStatus.SUCCEEDED, client.get_job_logs("jobbed-2")[-3000:]
    table = results(experiment).set_index("trial_id")
    assert len(table) == 3 and set(table["status"]) == {"COMPLETED"}
    assert_optuna_told_what_tune_saw(experiment, table)
    assert (experiment / REPORT_DIR / "index.html").is_file()
    record = json.loads((experiment / STUDY_JSON).read_text())
    assert record["jobs"] == ["jobbed-1", "jobbed-2"] and record["path"] == "local"

    # Once more, outside a job: it is finished, so it says its result and trains nothing.
    again = subprocess.run(study, cwd=copy, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{experiment}: finished earlier, 3 trials; nothing to run" in again.stdout
    assert f"report: {experiment / REPORT_DIR / 'index.html'}" in again.stdout


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_local_study_killed_finishes_on_the_local_path_with_a_bare_resume(
        ray_address, synthetic_dir, tmp_path):
    experiment = tmp_path / "bare"
    where = ["--address", ray_address, "--storage", str(tmp_path), "--name", "bare"]
    driver = subprocess.Popen([*RUN, *tiny(synthetic_dir, "--local", "--num-samples", "2",
                                           "--no-report", *where)], cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: any(trial_epochs(experiment).values()) or driver.poll() is not None,
                   "a trial's first epoch", 300)
        assert driver.poll() is None, "the study ended before it could be killed"
        driver.send_signal(signal.SIGKILL)
        driver.wait(30)
    finally:
        driver.kill()
    resumed = subprocess.run([*RUN, "--resume", *where, "--no-report"], cwd=REPO,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "Traceback" not in resumed.stderr
    table = results(experiment)
    assert len(table) == 2 and set(table["status"]) == {"COMPLETED"}
    assert json.loads((experiment / STUDY_JSON).read_text())["path"] == "local"
