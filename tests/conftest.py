"""Shared fixtures: small synthetic CIFAR-10 data and configs small enough for a CPU."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def ray_address():
    """One Ray head for the session (a start costs 5-9 s), as `ray start --head` gives a user;
    studies join it with --address. Its own temp dir keeps it apart from any other Ray."""
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths
    port = _free_port()
    ray_bin = Path(sys.executable).with_name("ray")
    subprocess.run([str(ray_bin), "start", "--head", f"--port={port}", "--num-cpus=2",
                    "--num-gpus=0", f"--temp-dir={temp_dir}", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={_free_port()}", "--disable-usage-stats"],
                   check=True, capture_output=True, timeout=120,
                   env={**os.environ, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"})
    yield f"127.0.0.1:{port}"
    subprocess.run([str(ray_bin), "stop", "--force"], capture_output=True, timeout=120)
    shutil.rmtree(temp_dir, ignore_errors=True)
