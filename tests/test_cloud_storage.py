"""A study in a bucket (`--storage s3://...`), against a real S3-protocol server on 127.0.0.1
(moto's server mode) that these tests start. Every check reads its files back from the server.
The study starts its own Ray, with the server's address and credentials in its environment, as
a cluster's nodes would have them."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import optuna
import psutil
import pytest

from study.plan import check_bucket
from study.run import main as study_main
from trainable.constants import CHECKPOINT_FILE
from trainable.experiment import (
    LR_FINDER_JSON,
    LR_FINDER_PNG,
    OPTUNA_DB,
    REPORT_DIR,
    RESULTS_CSV,
    STUDY_JSON,
    Folder,
)

from .helpers import EPOCHS, REPO, RUN, free_port, read_results, tiny

MOTO_SERVER = Path(sys.executable).with_name("moto_server")
BUCKET = "studies"


def _s3_env(endpoint: str, key: str = "testing", secret: str = "testing") -> dict[str, str]:
    """What every node needs to reach the bucket: the endpoint and credentials (and no proxy
    for a server on this machine)."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": key,
            "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": "us-east-1",
            "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}


@pytest.fixture
def server_factory() -> Iterator:
    """Starts moto's S3 server on a free local port (with extra environment, e.g. IAM checks
    on); returns the environment that reaches it. Each is stopped after the test."""
    started = []

    def start(**extra_env: str) -> dict[str, str]:
        port = free_port()
        server = subprocess.Popen([str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(port)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  env={**os.environ, **extra_env})
        started.append(server)
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return _s3_env(f"http://127.0.0.1:{port}")
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "no moto_server"
                time.sleep(0.2)

    yield start
    for server in started:
        server.kill()
        server.wait(30)


def _client(env: dict[str, str]):
    return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])


def _keys(env: dict[str, str], bucket: str = BUCKET) -> list[str]:
    pages = _client(env).get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


def _read(env: dict[str, str], key: str) -> bytes:
    return _client(env).get_object(Bucket=BUCKET, Key=key)["Body"].read()


@pytest.fixture
def s3(server_factory, monkeypatch) -> dict[str, str]:
    """A server with one empty bucket; this process reaches it too (for in-process checks)."""
    env = server_factory()
    _client(env).create_bucket(Bucket=BUCKET)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.mark.slow
def test_the_write_check_leaves_nothing_in_the_bucket(s3):
    check_bucket(Folder.at(f"s3://{BUCKET}/a/b/runs"))
    assert _keys(s3) == []


@pytest.mark.slow
@pytest.mark.slow
@pytest.mark.parametrize("storage, message", [
    (f"s3://absent-{BUCKET}/runs", "there is no bucket 'absent-studies'; create it first"),
    ("s3://", "s3://: names no bucket"),
    ("nosuchscheme://x/runs", "not a storage URI pyarrow can open"),
])
def test_a_bucket_that_is_not_there_is_refused_before_ray_starts(s3, synthetic_dir, capsys,
                                                                 storage, message):
    import ray

    code = study_main(tiny(synthetic_dir, "--local", "--storage", storage))
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert _keys(s3) == [] and not ray.is_initialized()


def test_a_server_that_does_not_answer_is_refused(synthetic_dir, capsys, monkeypatch):
    for name, value in _s3_env(f"http://127.0.0.1:{free_port()}").items():
        monkeypatch.setenv(name, value)
    code = study_main(tiny(synthetic_dir, "--local", "--storage", f"s3://{BUCKET}/runs"))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert f"s3://{BUCKET}/runs: cannot use it" in err and "connect" in err.lower()


@pytest.mark.slow
def test_a_bucket_this_driver_may_only_read_is_refused(server_factory, synthetic_dir, capsys,
                                                       monkeypatch):
    # IAM checks start after the 4 set-up calls below: a user who may only read the bucket.
    env = server_factory(INITIAL_NO_AUTH_ACTION_COUNT="4")
    _client(env).create_bucket(Bucket=BUCKET)
    iam = boto3.client("iam", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                       aws_access_key_id="testing", aws_secret_access_key="testing")
    iam.create_user(UserName="reader")
    iam.put_user_policy(UserName="reader", PolicyName="read", PolicyDocument=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": ["s3:Get*", "s3:List*"], "Resource": "*"}]}))
    key = iam.create_access_key(UserName="reader")["AccessKey"]
    reader = _s3_env(env["AWS_ENDPOINT_URL"], key["AccessKeyId"], key["SecretAccessKey"])
    for name, value in reader.items():
        monkeypatch.setenv(name, value)
    code = study_main(tiny(synthetic_dir, "--local", "--storage", f"s3://{BUCKET}/runs"))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert f"s3://{BUCKET}/runs: cannot use it" in err and "ACCESS_DENIED" in err
    assert _keys(reader) == []


def _children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_study_in_a_bucket_resumes_after_a_driver_kill_and_is_reported_from_there(
        s3, synthetic_dir, tmp_path):
    """2 trials with --local; the driver SIGKILLed once the first checkpoint is in the bucket;
    `--resume` from the URI; `python -m analysis URI`. Nothing but caches on local disk."""
    storage = f"s3://{BUCKET}/runs"
    workdir, home = tmp_path / "workdir", tmp_path / "home"  # where the commands run; $HOME
    workdir.mkdir()
    home.mkdir()
    env = {**os.environ, **s3, "PYTHONPATH": str(REPO), "HOME": str(home)}
    first = [*RUN, *tiny(synthetic_dir, "--local", "--storage", storage, "--name", "cloud",
                         "--num-samples", "2", "--no-report")]
    driver = subprocess.Popen(first, cwd=workdir, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    family: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 240
        while not any("/checkpoint_" in key for key in _keys(s3)):
            assert driver.poll() is None, f"the study ended first: {driver.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "no checkpoint reached the bucket"
            family = _children(driver.pid) or family
            time.sleep(0.2)
        family = _children(driver.pid) or family
        driver.send_signal(signal.SIGKILL)
        driver.wait(30)
    finally:
        driver.kill()
    # Its own Ray's raylet, GCS and workers go with it; its dashboard and runtime-env agents
    # outlive it by minutes (docs/reliability.md): ended here, as an operator would.
    _, alive = psutil.wait_procs(family, timeout=10)
    for process in alive:
        process.kill()
    assert STUDY_JSON in {k.rsplit("/", 1)[-1] for k in _keys(s3)}
    assert RESULTS_CSV not in {k.rsplit("/", 1)[-1] for k in _keys(s3)}

    # Resumed as on another machine: without the driver's copy of the Optuna database.
    shutil.rmtree(Folder.at(f"{storage}/cloud").cache())
    resume = [*RUN, "--resume", "--name", "cloud", "--storage", storage, "--local",
              "--no-report"]
    resumed = subprocess.run(resume, cwd=workdir, env=env, capture_output=True, text=True,
                             timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    report = subprocess.run([sys.executable, "-m", "analysis", f"{storage}/cloud"],
                            cwd=workdir, env=env, capture_output=True, text=True, timeout=400)
    assert report.returncode == 0, report.stderr[-3000:]
    assert f"report: {storage}/cloud/{REPORT_DIR}/index.html" in report.stdout

    keys = _keys(s3)
    prefix = "runs/cloud/"
    for name in (STUDY_JSON, LR_FINDER_JSON, LR_FINDER_PNG, RESULTS_CSV, OPTUNA_DB,
                 f"{REPORT_DIR}/index.html", f"{REPORT_DIR}/summary.json",
                 f"{REPORT_DIR}/gradcam.png"):
        assert prefix + name in keys, name
    table = read_results(io.BytesIO(_read(s3, prefix + RESULTS_CSV)))
    assert len(table) == 2 and set(table["status"]) == {"COMPLETED"}
    assert (table["epochs_run"] == EPOCHS).all()
    for trial_id, checkpoint in table[["trial_id", "checkpoint"]].itertuples(index=False):
        assert checkpoint.startswith(f"{storage}/cloud/trial_{trial_id}/checkpoint_")
        assert checkpoint.removeprefix(f"s3://{BUCKET}/") + "/checkpoint.pt" in keys
    summary = json.loads(_read(s3, f"{prefix}{REPORT_DIR}/summary.json"))
    assert summary["best_trial"]["trial_id"] in set(table["trial_id"])
    assert summary["trials_by_status"] == {"COMPLETED": 2}
    # The bucket's copy of the Optuna study is its final state: both trials told.
    database = tmp_path / OPTUNA_DB
    database.write_bytes(_read(s3, prefix + OPTUNA_DB))
    told = optuna.load_study(study_name="cloud", storage=f"sqlite:///{database}").trials
    assert [t.state for t in told] == [optuna.trial.TrialState.COMPLETE] * 2
    # Nothing but caches on local disk: no experiment folder where the commands ran, and none
    # of the experiment's files in either folder (the driver's cache is in the temp folder).
    assert list(workdir.iterdir()) == []
    experiment_files = {STUDY_JSON, LR_FINDER_JSON, RESULTS_CSV, OPTUNA_DB, CHECKPOINT_FILE,
                        "index.html", "result.json", "experiment_state"}
    assert [p for p in home.rglob("*") if p.name.split("-")[0] in experiment_files] == []


def test_a_folder_under_a_uri_keeps_its_scheme_and_options(tmp_path):
    runs = Folder.at("s3://studies/runs/?endpoint_override=http://127.0.0.1:9")
    experiment = runs / "cloud"
    assert experiment.uri == "s3://studies/runs/cloud?endpoint_override=http://127.0.0.1:9"
    assert (experiment.path, experiment.name, experiment.is_local) == \
        ("studies/runs/cloud", "cloud", False)
    assert experiment.parent == runs
    assert experiment.uri_of("studies/runs/cloud/trial_1") == \
        "s3://studies/runs/cloud/trial_1?endpoint_override=http://127.0.0.1:9"
    local = Folder.at(tmp_path / "runs") / "cloud"
    assert (local.uri, local.is_local) == (str(tmp_path / "runs" / "cloud"), True)
