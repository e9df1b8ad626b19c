from __future__ import annotations

import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from trainable.config import DataConfig
from trainable.constants import CLASSES, MEAN_UINT8, PICKLE_FOLDER, TRAIN_BATCHES
from trainable.data import (
    DataError,
    ImageSet,
    eval_transform,
    load_splits,
    make_loader,
    seed_epoch,
    to_uint8_images,
    train_transform,
)
from trainable.synthetic import main as synthetic_main

from .helpers import coordinate_image, explain


def data_config(directory, **values) -> DataConfig:
    return DataConfig(dir=str(directory), **{"val_size": 100, "num_workers": 0, **values})


# --- sources and splits --------------------------------------------------------------------

def test_official_format_splits_are_stratified_disjoint_and_seeded(synthetic_dir):
    splits = load_splits(data_config(synthetic_dir))
    assert splits.classes == CLASSES and not splits.val_is_test
    assert (len(splits.train.labels), len(splits.val.labels), len(splits.test.labels)) == \
        (400, 100, 200)
    assert not set(splits.train.indices) & set(splits.val.indices)
    assert np.bincount(splits.val.labels, minlength=10).tolist() == [10] * 10
    assert splits.train.images.shape == (400, 32, 32, 3)
    assert splits.train.images.dtype == np.uint8
    again = load_splits(data_config(synthetic_dir))
    assert np.array_equal(again.val.indices, splits.val.indices)
    other = load_splits(data_config(synthetic_dir, split_seed=1))
    assert not np.array_equal(other.val.indices, splits.val.indices)


def test_limits_and_selecting_on_test(synthetic_dir):
    splits = load_splits(data_config(synthetic_dir, val_size=0, limit_train=50, limit_test=30))
    assert splits.val_is_test and splits.val is splits.test
    assert (len(splits.train.labels), len(splits.test.labels)) == (50, 30)
    assert np.bincount(splits.train.labels, minlength=10).tolist() == [5] * 10


def test_val_size_larger_than_train_is_refused(synthetic_dir):
    with pytest.raises(DataError, match="data.val_size=600 exceeds the 500 images"):
        load_splits(data_config(synthetic_dir, val_size=600))


def write_folder(root, per_class=3, classes=CLASSES[:3]):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


def test_image_folder_layout(tmp_path):
    splits = load_splits(data_config(write_folder(tmp_path), val_size=3))
    assert splits.classes == CLASSES[:3]
    assert (len(splits.train.labels), len(splits.val.labels), len(splits.test.labels)) == (6, 3, 9)
    original = np.asarray(Image.open(tmp_path / "test" / CLASSES[1] / "0.png"))
    assert np.array_equal(splits.test.images[3], original)


# --- bad input: one clear error naming the path, nothing written ---------------------------

def snapshot(root):
    return sorted((p, p.stat().st_size) for p in root.rglob("*"))


def test_a_missing_directory_is_downloaded_into_or_left_absent(tmp_path, offline):
    missing = tmp_path / "nope" / "cifar10"
    with pytest.raises(DataError, match=f"{missing}: CIFAR-10 could not be downloaded"):
        load_splits(data_config(missing))
    assert list(tmp_path.iterdir()) == []  # not even the folders it made


def test_a_file_is_not_a_data_directory(tmp_path):
    (tmp_path / "cifar10").write_text("")
    with pytest.raises(DataError, match="cifar10: a file, not a data folder"):
        load_splits(data_config(tmp_path / "cifar10"))


def test_directory_without_data(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="neither the CIFAR-10 python release"):
        load_splits(data_config(tmp_path))


@pytest.mark.parametrize("damage, message", [
    (lambda f: f.write_bytes(b""), "unreadable image"),
    (lambda f: f.write_bytes(b"\x89PNG not really"), "unreadable image"),
    (lambda f: Image.new("RGB", (16, 16)).save(f, format="PNG"), "image is 16x16, expected 32x32"),
])
def test_bad_image_is_named(tmp_path, damage, message):
    root = write_folder(tmp_path)
    bad = root / "test" / CLASSES[2] / "1.png"
    damage(bad)
    before = snapshot(root)
    with pytest.raises(DataError) as err:
        load_splits(data_config(root, val_size=0))
    assert str(bad) in str(err.value) and message in str(err.value)
    assert snapshot(root) == before


def test_class_folders_must_match(tmp_path):
    root = write_folder(tmp_path)
    shutil.rmtree(root / "test" / CLASSES[2])
    with pytest.raises(DataError, match="class folders differ between train/"):
        load_splits(data_config(root, val_size=3))


def test_empty_class_folder(tmp_path):
    root = write_folder(tmp_path)
    for f in (root / "train" / CLASSES[0]).iterdir():
        f.unlink()
    with pytest.raises(DataError, match=f"{root / 'train' / CLASSES[0]}: class folder holds no"):
        load_splits(data_config(root, val_size=3))


def copy_release(synthetic_dir, tmp_path):
    shutil.copytree(synthetic_dir, tmp_path, dirs_exist_ok=True)
    return tmp_path / PICKLE_FOLDER / TRAIN_BATCHES[2]


def test_pickle_with_wrong_shape(synthetic_dir, tmp_path):
    batch = copy_release(synthetic_dir, tmp_path)
    with batch.open("wb") as f:
        pickle.dump({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}, f, protocol=2)
    with pytest.raises(DataError, match=f"{batch}: 'data' must be a uint8 array of shape"):
        load_splits(data_config(tmp_path))


class RunsACommand:
    """A payload that would run a shell command if it were unpickled with pickle.load."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickle_carrying_code_is_refused_without_running_it(synthetic_dir, tmp_path):
    batch = copy_release(synthetic_dir, tmp_path / "data")
    marker = tmp_path / "ran"
    with batch.open("wb") as f:
        pickle.dump({b"data": RunsACommand(marker), b"labels": []}, f, protocol=2)
    with pytest.raises(DataError, match=r"not an official CIFAR-10 pickle \(refused global"):
        load_splits(data_config(tmp_path / "data"))
    assert not marker.exists()


def test_truncated_pickle(synthetic_dir, tmp_path):
    batch = copy_release(synthetic_dir, tmp_path)
    batch.write_bytes(batch.read_bytes()[:1000])
    with pytest.raises(DataError, match=f"{batch}: not an official CIFAR-10 pickle"):
        load_splits(data_config(tmp_path))


def test_synthetic_cli_refuses_a_used_directory(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_info:
        synthetic_main([str(tmp_path), "--train", "50", "--test", "10"])
    assert exit_info.value.code == 2
    assert "not an empty directory" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


# --- augmentation: the original's, exactly ---------------------------------------------------

def to_uint8(tensor: torch.Tensor) -> np.ndarray:
    """Undo Normalize and ToTensorV2 with the shared constants."""
    return to_uint8_images(tensor[None])[0]


def test_augmentation_is_pad_crop_flip_one_hole_normalise():
    transform = train_transform(DataConfig(), seed=0)
    source = coordinate_image()
    offsets, flips = np.zeros((9, 9), int), 0
    samples = 1500
    for _ in range(samples):
        out = to_uint8(transform(image=source)["image"])
        found = explain(out, source)
        assert found is not None, "output is not a padded crop of the input"
        dy, dx, flipped, hole = found
        offsets[dy, dx] += 1
        flips += flipped
        # Exactly one 8x8 hole, inside the image: its visible part fits one 8x8 box, and it
        # is whole wherever the crop shows no padding under it.
        rows, cols = np.nonzero(hole)
        assert len(rows) > 0
        assert rows.max() - rows.min() < 8 and cols.max() - cols.min() < 8
        if dy == 4 and dx == 4:
            assert len(rows) == 64
    assert abs(flips / samples - 0.5) < 0.05
    assert offsets.min() > 0  # every one of the 9x9 crop positions occurs
    expected = samples / 81
    chi2 = ((offsets - expected) ** 2 / expected).sum()
    assert chi2 < 130  # 80 degrees of freedom: p ~ 0.0005 at 130


def test_padding_and_hole_use_the_mean_colour_not_black():
    transform = train_transform(DataConfig(pad=4, cutout=8), seed=1)
    white = np.full((32, 32, 3), 255, np.uint8)
    for _ in range(20):
        out = to_uint8(transform(image=white)["image"])
        filled = (out != 255).any(-1)
        assert filled.sum() >= 64
        assert (np.abs(out[filled].astype(int) - MEAN_UINT8) <= 1).all()


def test_normalisation_maps_the_mean_to_zero():
    mean_image = np.zeros((32, 32, 3), np.uint8) + np.asarray(MEAN_UINT8, np.uint8)
    tensor = eval_transform()(image=mean_image)["image"]
    assert tensor.shape == (3, 32, 32) and tensor.dtype == torch.float32
    assert tensor.abs().max() < 0.01


def identical_images(count: int) -> ImageSet:
    images = np.repeat(coordinate_image()[None], count, axis=0)
    return ImageSet(images, np.zeros(count, np.int64), np.arange(count))


def batches(loader) -> list[torch.Tensor]:
    return [images[0] for images, _ in loader]


def test_dataloader_workers_do_not_repeat_each_other():
    images = identical_images(8)
    loader = make_loader(images, train_transform(DataConfig(), seed=0), batch_size=1,
                         num_workers=2, shuffle=False)
    seed_epoch(loader, seed=0, epoch=1)
    outs = batches(loader)
    # Worker 0 makes items 0, 2, ...; worker 1 items 1, 3, ...: their first items must differ.
    distinct = {o.numpy().tobytes() for o in outs}
    assert len(distinct) == len(outs)

    # The same loader without the reseeding repeats: the check above can fail.
    unseeded = torch.utils.data.DataLoader(loader.dataset, batch_size=1, num_workers=2)
    repeated = batches(unseeded)
    assert torch.equal(repeated[0], repeated[1])


def test_an_epochs_augmentations_replay_from_its_seed():
    loader = make_loader(identical_images(6), train_transform(DataConfig()), batch_size=2,
                         num_workers=0, shuffle=True)
    seed_epoch(loader, seed=3, epoch=2)
    first = [b for b, _ in loader]
    seed_epoch(loader, seed=3, epoch=3)
    other = [b for b, _ in loader]
    seed_epoch(loader, seed=3, epoch=2)
    again = [b for b, _ in loader]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))
