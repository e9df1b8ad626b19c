"""Checks on the real CIFAR-10 copy in ../shared; skipped where it is absent."""

from __future__ import annotations

import tarfile

import numpy as np
import pytest

from trainable.config import DataConfig
from trainable.constants import CLASSES, MEAN
from trainable.data import load_splits

from .helpers import SHARED_DATA

pytestmark = [
    pytest.mark.real_data,
    pytest.mark.skipif(not SHARED_DATA.exists(), reason=f"{SHARED_DATA} is absent"),
]


@pytest.fixture(scope="module")
def real_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cifar10-jpeg")
    with tarfile.open(SHARED_DATA) as archive:
        archive.extractall(out, filter="data")
    (root,) = [p for p in out.iterdir() if p.is_dir()]
    return root


def test_real_copy_loads_as_cifar10_with_its_statistics(real_dir):
    splits = load_splits(DataConfig(dir=str(real_dir), val_size=500, limit_train=2000,
                                    limit_test=1000))
    assert splits.classes == CLASSES
    assert (len(splits.train.labels), len(splits.val.labels), len(splits.test.labels)) == \
        (2000, 500, 1000)
    assert np.bincount(splits.test.labels).tolist() == [100] * 10
    # RGB order and the shared normalisation constants agree with the real images.
    mean = splits.train.images.reshape(-1, 3).mean(0) / 255
    assert np.allclose(mean, MEAN, atol=0.02)
