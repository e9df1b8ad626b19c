"""A study in MLflow: against a real tracking server that each test starts on 127.0.0.1
(`mlflow server`, SQLite backend, local artifacts), read back with `MlflowClient`."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from study.run import main as study_main
from trainable.experiment import RESULTS_CSV, STUDY_JSON

from .helpers import REPO, RUN, free_port, results, tiny

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402  (after the skip)

MLFLOW_SERVER = Path(sys.executable).with_name("mlflow")
SERVER_START_S = 120  # its first start migrates the SQLite database: 10-20 s here
# Without the server's job runner (a dozen huey processes, each importing mlflow): a test
# needs tracking only, and on 2 cores those processes slowed the start past a minute.
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


@contextlib.contextmanager
def tracking_server(root: Path):
    """A real MLflow tracking server on a free port; its URI."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    log = root / "server.log"
    root.mkdir(parents=True, exist_ok=True)
    server = subprocess.Popen(
        [str(MLFLOW_SERVER), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts")],
        stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, **SERVER_ENV})
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            with contextlib.suppress(OSError):
                # Not urlopen: its global opener keeps the proxies of its first use, and an
                # earlier test's was an offline one.
                with urllib.request.build_opener().open(f"{uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            assert server.poll() is None, f"mlflow server exited: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, \
                f"mlflow server did not answer: {log.read_text()[-2000:]}"
            time.sleep(0.5)
        yield uri, server
    finally:
        stop(server)


def stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with tracking_server(tmp_path_factory.mktemp("mlflow")) as (uri, _):
        yield uri


def tracked(data_dir, storage, name, ray_address, *extra, trials=2) -> list[str]:
    return [*RUN, *tiny(data_dir, "--address", ray_address, "--local", "--storage",
                        str(storage), "--name", name, "--num-samples", str(trials), *extra)]


def runs_of(client: MlflowClient, name: str):
    """The study's parent run and its child runs, by trial id."""
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None, f"no MLflow experiment {name}"
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("onecycle.role") == "study"]
    children = [r for r in runs if r is not parent]
    return parent, children


def steps(client: MlflowClient, run, key="val_acc") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run.info.run_id, key))


@pytest.mark.parametrize("uri, said", [
    ("closed", "the tracking server does not answer"),
    ("closed-with-credentials", "the tracking server does not answer"),
    ("ftp://127.0.0.1/x", "expected a tracking server's URI"),
    ("http://127.0.0.1:port/", "not a URI"),
])
@pytest.mark.parametrize("given", ["flag", "environment"])
def test_a_server_that_cannot_be_used_is_refused_before_anything(
        uri, said, given, synthetic_dir, tmp_path, capsys, monkeypatch):
    if uri.startswith("closed"):  # nothing listens there
        user = "alice:s3cret@" if uri.endswith("credentials") else ""
        uri = f"http://{user}127.0.0.1:{free_port()}"
    argv = tiny(synthetic_dir, "--storage", str(tmp_path / "runs"), "--local")
    if given == "flag":
        argv += ["--mlflow", uri]
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert study_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and said in err, err
    assert ("--mlflow" if given == "flag" else "MLFLOW_TRACKING_URI") in err
    assert "s3cret" not in err  # a URI is said without its credentials
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_tracked_study_killed_and_resumed_is_one_experiment_with_a_run_per_trial(
        server, ray_address, synthetic_dir, tmp_path):
    """A 2-trial study sent to the server, its driver SIGKILLed once a trial has checkpointed
    two of its 3 epochs; that trial's newer checkpoint is then cut short, and the study resumed
    and reported. The resumed study's own output says what the trial did (the damaged
    checkpoint skipped, the older one taken, the epoch it resumed after), and read back, MLflow
    holds one experiment with one parent run and one child run per trial, each epoch's
    metrics there once although the trial ran an epoch again."""
    experiment = tmp_path / "tracked"
    args = tracked(synthetic_dir, tmp_path, "tracked", ray_address, "--mlflow", server,
                   "--set", "train.epochs=3")

    def checkpointed_twice() -> list[Path]:
        for trial in experiment.glob("trial_*"):
            saved = sorted(trial.glob("checkpoint_*/checkpoint.pt"))
            if len(saved) >= 2:
                return saved
        return []

    driver = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not checkpointed_twice():
            assert driver.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        driver.send_signal(signal.SIGKILL)
        driver.wait(30)
    finally:
        driver.kill()
    newest = checkpointed_twice()[-1]
    newest.write_bytes(newest.read_bytes()[:4096])
    resumed = subprocess.run([*RUN, "--resume", "--name", "tracked", "--storage", str(tmp_path),
                              "--address", ray_address, "--local", "--mlflow", server],
                             cwd=REPO, capture_output=True, text=True, timeout=400)
    out = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, out[-3000:]
    # The trial's warnings reach the driver's output (Ray's log_to_driver).
    assert f"checkpoint {newest.parent} is unreadable" in out, out[-3000:]
    older = re.search(r"continuing from the older checkpoint \S+ \(epoch (\d)\)", out)
    assert older is not None, out[-3000:]
    assert f"resumed after epoch {older[1]} of 3" in out, out[-3000:]
    client = MlflowClient(server)
    parent, children = runs_of(client, "tracked")  # one parent: the same run continued
    table = results(experiment).set_index("trial_id")
    assert len(table) == 2 and set(table["status"]) == {"COMPLETED"}
    assert parent.info.status == "FINISHED"
    params = parent.data.params
    assert float(params["lr_estimate"]) > 0 and params["sampler"] == "gp"
    assert {"max_lr_low", "max_lr_high", "peak_epoch_low", "peak_epoch_high"} <= set(params)
    assert params["winner"] in table.index
    assert parent.data.metrics["winner_test_acc"] >= 0 and "trust" in parent.data.tags
    # the winner's val_acc as observed, and as its pick rule expects it on a new seed
    metrics = parent.data.metrics
    assert metrics["winner_val_acc"] == table.loc[params["winner"], "best_val_acc"]
    assert 0 <= metrics["winner_estimated_val_acc"] <= 1
    assert metrics["winner_estimated_val_acc_se"] > 0
    assert params["winner_pick"] in ("observed", "model", "pessimistic")
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {STUDY_JSON, "report", "model_card.md"} <= artifacts
    trial_ids = [r.data.tags["onecycle.trial_id"] for r in children]
    assert sorted(trial_ids) == sorted(table.index)  # no trial twice
    for child in children:
        row = table.loc[child.data.tags["onecycle.trial_id"]]
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.tags["onecycle.status"] == row["status"]
        assert child.info.status == "FINISHED"
        assert float(child.data.params["max_lr"]) == pytest.approx(row["max_lr"])
        assert int(child.data.params["peak_epoch"]) == row["peak_epoch"]
        assert child.data.params["seed"] == "0" and child.data.params["role"] == "search"
        for key in ("val_acc", "val_loss", "train_loss", "lr"):
            assert steps(client, child, key) == [1, 2, 3], key  # each epoch once
        assert client.get_metric_history(child.info.run_id, "val_acc")[-1].value == \
            pytest.approx(row["final_val_acc"])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_server_gone_mid_study_is_warned_about_once_and_the_study_ends_whole(
        ray_address, synthetic_dir, tmp_path):
    experiment = tmp_path / "orphan"
    with tracking_server(tmp_path / "mlflow") as (uri, server):
        client = MlflowClient(uri)
        log = tmp_path / "driver.log"
        with log.open("w") as out:
            driver = subprocess.Popen(
                tracked(synthetic_dir, tmp_path, "orphan", ray_address, "--mlflow", uri,
                        "--no-report", "--set", "train.epochs=3", trials=1),
                cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
            try:  # the server goes once it holds a trial's first epoch
                deadline = time.monotonic() + 300
                while True:
                    with contextlib.suppress(Exception):
                        _, children = runs_of(client, "orphan")
                        if any(steps(client, child) for child in children):
                            break
                    assert driver.poll() is None and time.monotonic() < deadline, \
                        log.read_text()[-3000:]
                    time.sleep(0.5)
                stop(server)
                assert driver.wait(400) == 0, log.read_text()[-3000:]
            finally:
                driver.kill()
    said = log.read_text()
    assert said.count("the study goes on without it") == 1, said[-3000:]
    table = results(experiment)
    assert len(table) == 1 and set(table["status"]) == {"COMPLETED"}
    assert (table["epochs_run"] == 3).all()
    assert {STUDY_JSON, RESULTS_CSV} <= {p.name for p in experiment.iterdir()}


def test_a_study_that_is_not_tracked_never_imports_mlflow():
    probe = "import sys, study.driver; print('mlflow' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert run.stdout.strip() == "False", run.stderr[-2000:]
