"""The on-device augmentation (data.augment_on: gpu) against the albumentations pipeline, the
fast-path switches, and the benchmark. On a CPU-only machine the device is the CPU."""

from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess

import numpy as np
import pytest
import torch

from trainable.config import DataConfig
from trainable.constants import MEAN_UINT8, TrialStatus
from trainable.data import (
    ImageSet,
    LoaderBatches,
    eval_transform,
    load_splits,
    to_uint8_images,
)
from trainable.device import select_runtime
from trainable.device_data import DeviceBatches
from trainable.loop import make_batches, train

from .helpers import REPO, RUN, coordinate_image, explain


def identical(count: int) -> ImageSet:
    images = np.repeat(coordinate_image()[None], count, axis=0)
    return ImageSet(images, np.arange(count) % 10, np.arange(count))


def test_device_augmentation_matches_the_albumentations_statistics():
    samples = 1500
    batches = DeviceBatches(identical(samples), DataConfig(), samples, torch.device("cpu"),
                            train=True)
    batches.seed(0)
    (augmented, labels), = list(batches)
    assert augmented.dtype == torch.float32 and augmented.shape == (samples, 3, 32, 32)
    source = coordinate_image()
    offsets, flips = np.zeros((9, 9), int), 0
    for image in to_uint8_images(augmented):
        found = explain(image, source)
        assert found is not None, "output is not a padded crop of the input"
        dy, dx, flipped, hole = found
        offsets[dy, dx] += 1
        flips += flipped
        rows, cols = np.nonzero(hole)
        assert len(rows) > 0
        assert rows.max() - rows.min() < 8 and cols.max() - cols.min() < 8
        if dy == 4 and dx == 4:
            assert len(rows) == 64  # the whole hole is inside the image
    assert abs(flips / samples - 0.5) < 0.05
    assert offsets.min() > 0
    expected = samples / 81
    assert ((offsets - expected) ** 2 / expected).sum() < 130  # chi2, 80 dof, p ~ 0.0005
    assert sorted(labels.tolist()) == sorted((np.arange(samples) % 10).tolist())


def test_device_normalisation_is_the_albumentations_one():
    images = ImageSet(np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), np.uint8),
                      np.zeros(8, np.int64), np.arange(8))
    batches = DeviceBatches(images, DataConfig(), 8, torch.device("cpu"), train=False)
    (normalised, _), = list(batches)
    reference = torch.stack([eval_transform()(image=i)["image"] for i in images.images])
    assert torch.allclose(normalised, reference, atol=1e-5)
    fill = torch.zeros(1, 3, 32, 32) + torch.tensor(MEAN_UINT8, dtype=torch.float32).view(
        1, 3, 1, 1)
    assert batches.normalise(fill).abs().max() < 0.01  # the mean colour is 0


def test_device_batches_shuffle_by_seed_in_full_batches_of_distinct_images():
    images = identical(10)
    batches = DeviceBatches(images, DataConfig(), 4, torch.device("cpu"), train=True)
    assert len(batches) == 2  # the last partial batch (2 images) is dropped
    batches.seed(5)
    first = torch.cat([labels for _, labels in batches])
    batches.seed(5)
    again = torch.cat([labels for _, labels in batches])
    batches.seed(6)
    other = torch.cat([labels for _, labels in batches])
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert len(set(first.tolist())) == 8 and set(first.tolist()) <= set(range(10))


def test_augmentation_goes_on_the_device_by_default_only_on_a_gpu(tiny_config):
    cpu = select_runtime("cpu")
    gpu = dataclasses.replace(cpu, device=torch.device("cuda", 0))  # no GPU is touched
    assert tiny_config.data.augment_on == "auto"
    assert [cpu.augments_on_device(v) for v in ("auto", "cpu", "gpu")] == [False, False, True]
    assert [gpu.augments_on_device(v) for v in ("auto", "cpu", "gpu")] == [True, False, True]
    splits = load_splits(tiny_config.data)
    assert isinstance(make_batches(splits.train, tiny_config, cpu, train=True), LoaderBatches)


def test_training_with_device_augmentation_and_the_switches(tiny_config):
    config = tiny_config.replace("data", augment_on="gpu").replace(
        "train", epochs=2, label_smoothing=0.1, eval_flip_tta=True)
    outcome = train(config, load_splits(config.data), lambda m, c: None)
    assert outcome.status == TrialStatus.COMPLETED and len(outcome.history) == 2
    assert all(np.isfinite(m["val_loss"]) for m in outcome.history)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_benchmark_runs_and_writes_its_keys(ray_address, tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run([RUN[0], str(REPO / "tools" / "bench.py"), "--device", "cpu",
                          "--images", "32", "--batch-size", "16", "--trials", "1",
                          "--repeats", "2", "--out", str(out), "--address", ray_address],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    bench = json.loads(out.read_text())
    for key in ("direct_images_per_s", "ray_images_per_s", "ray_vs_direct_throughput_ratio",
                "trial_overhead_s", "augment_images_per_s", "device"):
        assert key in bench
    # Two interleaved throughput rounds, each path measured in both; the medians reported.
    for path in ("direct", "direct_ray_idle", "ray"):
        each = bench[f"{path}_images_per_s_each"]
        assert len(each) == 2 and all(v > 0 for v in each)
        assert bench[f"{path}_images_per_s"] == statistics.median(each)
    assert set(bench["trial_overhead_s"]) == {"torch_trainer", "local"}
    # The trial of each path was timed, and took longer than its epoch's training.
    assert [len(each) for each in bench["trial_overhead_each_s"].values()] == [1, 1]
    assert all(v > 0 for each in bench["trial_overhead_each_s"].values() for v in each)
    assert {"albumentations_1_process", "device"} <= set(bench["augment_images_per_s"])
    assert all(v > 0 for v in bench["augment_images_per_s"].values())
    assert "Ray / direct" in run.stdout
