"""Shared fixtures: small synthetic CIFAR-10 data and configs small enough for a CPU."""

from __future__ import annotations

import os
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
