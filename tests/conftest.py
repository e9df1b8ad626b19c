"""Shared fixtures: small synthetic CIFAR-10 data and configs small enough for a CPU."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest

from study.cluster import RAY_ENV
from trainable.config import Config, load_config
from trainable.constants import REPO
from trainable.synthetic import write_dataset

from .helpers import free_port, offline_env, study

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# A study is tracked only where a test asks for it (tests/test_tracking.py).
os.environ.pop("MLFLOW_TRACKING_URI", None)


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


@pytest.fixture
def offline(monkeypatch):
    """No network for this process: a CIFAR-10 download fails at once."""
    for name, value in offline_env().items():
        monkeypatch.setenv(name, value)


@dataclasses.dataclass(frozen=True)
class RayHead:
    address: str  # the GCS's host:port: what --address takes
    dashboard: str  # the dashboard's URL: where `ray job submit` sends a job


@pytest.fixture(scope="session")
def ray_head():
    """One Ray head for the session (a start costs 5-9 s), as `ray start --head` gives a user;
    studies join it with --address, or are submitted to it as jobs. Its own temp dir keeps it
    apart from any other Ray. It runs in this interpreter's environment, so a job's `python`
    is this one (Ray runs an entrypoint with the head's PATH)."""
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths
    port, dashboard_port = free_port(), free_port()
    ray_bin = Path(sys.executable).with_name("ray")
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    subprocess.run([str(ray_bin), "start", "--head", f"--port={port}", "--num-cpus=2",
                    "--num-gpus=0", f"--temp-dir={temp_dir}",
                    f"--ray-client-server-port={free_port()}", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dashboard_port}", "--disable-usage-stats"],
                   check=True, capture_output=True, timeout=120,
                   env={**os.environ, **RAY_ENV, "PATH": path})
    yield RayHead(f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard_port}")
    stop_ray_started_in(temp_dir, port)
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_address(ray_head) -> str:
    return ray_head.address


def stop_ray_started_in(temp_dir: str, port: int) -> None:
    """End the Ray whose processes name `temp_dir` (GCS, raylet, dashboard) or its GCS port
    (the client server), and their children (workers and agents, which rename themselves):
    never `ray stop`, which ends every Ray on the machine, a user's own cluster too."""
    def started_here(args: list[str]) -> bool:
        return any(temp_dir in arg or (arg.startswith("--address=") and arg.endswith(f":{port}"))
                   for arg in args)

    heads = [p for p in psutil.process_iter(["cmdline"]) if started_here(p.info["cmdline"] or [])]
    family = set(heads)
    for head in heads:
        with contextlib.suppress(psutil.NoSuchProcess):
            family.update(head.children(recursive=True))
    for process in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    _, alive = psutil.wait_procs(family, timeout=5)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


@pytest.fixture(scope="session")
def finished(ray_address, synthetic_dir, tmp_path_factory):
    storage = tmp_path_factory.mktemp("runs")
    run = study(ray_address, storage, "three", synthetic_dir, "--num-samples", "3")
    return storage / "three", run
