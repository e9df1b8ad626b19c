"""Shared fixtures: small synthetic CIFAR-10 data and configs small enough for a CPU."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest

from study.layout import RESULTS_CSV
from study.trial import RAY_ENV
from trainable.config import Config, load_config
from trainable.synthetic import write_dataset

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    """500 training and 200 test images in the official python format."""
    out = tmp_path_factory.mktemp("synthetic")
    write_dataset(out, train=500, test=200, seed=0)
    return out


@pytest.fixture
def smoke_config(synthetic_dir) -> Config:
    return load_config(REPO / "configs" / "smoke.yaml", [f"data.dir={synthetic_dir}"])


@pytest.fixture
def tiny_config(synthetic_dir) -> Config:
    """Seconds per epoch: 64 training images in batches of 16."""
    return load_config(REPO / "configs" / "smoke.yaml", [
        f"data.dir={synthetic_dir}", "data.limit_train=64", "data.val_size=16",
        "data.limit_test=32", "train.batch_size=16", "train.epochs=3", "train.peak_epoch=1",
    ])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def ray_address():
    """One Ray head for the session (a start costs 5-9 s), as `ray start --head` gives a user;
    studies join it with --address. Its own temp dir keeps it apart from any other Ray."""
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths
    port = free_port()
    ray_bin = Path(sys.executable).with_name("ray")
    subprocess.run([str(ray_bin), "start", "--head", f"--port={port}", "--num-cpus=2",
                    "--num-gpus=0", f"--temp-dir={temp_dir}", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={free_port()}", "--disable-usage-stats"],
                   check=True, capture_output=True, timeout=120,
                   env={**os.environ, **RAY_ENV})
    yield f"127.0.0.1:{port}"
    subprocess.run([str(ray_bin), "stop", "--force"], capture_output=True, timeout=120)
    shutil.rmtree(temp_dir, ignore_errors=True)


# --- studies: python study/run.py on tiny synthetic data ---------------------------------

RUN = [sys.executable, str(REPO / "study" / "run.py")]
EPOCHS = 2


def tiny(data_dir, *extra: str) -> list[str]:
    """Seconds per trial: 32 training images in 2 batches, 16 validation images."""
    return ["--config", str(REPO / "configs" / "smoke.yaml"), "--data-dir", str(data_dir),
            "--set", "data.limit_train=32", "--set", "data.val_size=16",
            "--set", "train.batch_size=16", "--set", f"train.epochs={EPOCHS}",
            "--set", "lr_finder.num_iter=17", *extra]


def study(ray_address, storage, name, data_dir, *extra, timeout=300):
    """A --local study joined to the session's Ray, without its report."""
    run = subprocess.run([*RUN, *tiny(data_dir, "--address", ray_address, "--local",
                                      "--storage", str(storage), "--name", name,
                                      "--no-report", *extra)],
                         capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def results(experiment) -> pd.DataFrame:
    return pd.read_csv(experiment / RESULTS_CSV)


def reports(trial_dir) -> list[dict]:
    """Every result Tune recorded for a trial, in order (result.json is appended to)."""
    return [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines()
            if line.strip()]


def trial_epochs(experiment) -> dict[str, list[int]]:
    """Every epoch each trial reported, in order (an epoch run twice appears twice)."""
    found = {}
    for trial_dir in experiment.glob("trial_*"):
        if (trial_dir / "result.json").exists():
            found[trial_dir.name] = [r["epoch"] for r in reports(trial_dir)]
    return found


@pytest.fixture(scope="session")
def finished(ray_address, synthetic_dir, tmp_path_factory):
    storage = tmp_path_factory.mktemp("runs")
    run = study(ray_address, storage, "three", synthetic_dir, "--num-samples", "3")
    return storage / "three", run
