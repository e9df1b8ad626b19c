"""CIFAR-10 from disk, the seeded splits, the original's augmentations and the loaders.

Sources, told apart by what the data directory holds:
  - the official python release (`cifar-10-batches-py/`, or its files directly in the directory);
  - an image-folder layout `train/<class>/*` and `test/<class>/*`;
  - an empty or missing directory: torchvision downloads the official release into it (needs a
    network; without one, one line says how to point at a copy).
"""

from __future__ import annotations

import os
import pickle
import random
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from PIL import Image, UnidentifiedImageError

from trainable.config import DataConfig
from trainable.constants import (
    CLASSES,
    IMAGE_SIZE,
    MEAN,
    MEAN_UINT8,
    META_FILE,
    PICKLE_FOLDER,
    STD,
    TEST_BATCH,
    TRAIN_BATCHES,
)
from trainable.errors import DataError, first_line

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp"}


@dataclass(frozen=True)
class ImageSet:
    images: np.ndarray  # (N, 32, 32, 3) uint8, RGB
    labels: np.ndarray  # (N,) int64 class indices
    indices: np.ndarray  # (N,) int64 positions in the source split, to trace an image back


@dataclass(frozen=True)
class Splits:
    train: ImageSet
    val: ImageSet
    test: ImageSet
    classes: tuple[str, ...]
    val_is_test: bool  # val_size 0: the study selects on the test set, and reports must say so


# --- the official python format --------------------------------------------------------------

class _CifarUnpickler(pickle.Unpickler):
    """Admits what the official pickles hold (dicts, lists, bytes, str, numbers, numpy arrays)
    and nothing else: any other global, such as a function a payload would call, is refused."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol 2 spells bytes under Python 3
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        return super().find_class(module, name)


def _read_pickle(path: Path) -> dict:
    try:
        with path.open("rb") as f:
            payload = _CifarUnpickler(f, encoding="bytes").load()
    except FileNotFoundError:
        raise DataError(f"{path}: missing file of the CIFAR-10 python release") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, OverflowError, MemoryError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not an official CIFAR-10 pickle ({err})") from None
    if not isinstance(payload, dict):
        raise DataError(f"{path}: not an official CIFAR-10 pickle (holds "
                        f"{type(payload).__name__}, not a dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in payload.items()}


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = _read_pickle(path)
    data, labels = batch.get("data"), batch.get("labels")
    pixels = 3 * IMAGE_SIZE * IMAGE_SIZE
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != pixels:
        shape = getattr(data, "shape", None)
        raise DataError(f"{path}: 'data' must be a uint8 array of shape (N, {pixels}), "
                        f"got {type(data).__name__} of shape {shape}")
    if not isinstance(labels, list) or len(labels) != len(data) or \
            not all(isinstance(y, int) and 0 <= y < len(CLASSES) for y in labels):
        raise DataError(f"{path}: 'labels' must be {len(data)} integers in [0, {len(CLASSES)})")
    images = data.reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), np.asarray(labels, dtype=np.int64)


def _pickle_root(directory: Path) -> Path | None:
    for root in (directory / PICKLE_FOLDER, directory):
        if (root / TRAIN_BATCHES[0]).exists() or (root / TEST_BATCH).exists():
            return root
    return None


def _load_pickles(root: Path):
    meta = _read_pickle(root / META_FILE)
    names = tuple(n.decode() if isinstance(n, bytes) else n for n in meta.get("label_names", []))
    if names != CLASSES:
        raise DataError(f"{root / META_FILE}: label_names {list(names)} are not CIFAR-10's")
    parts = [_read_batch(root / name) for name in TRAIN_BATCHES]
    train = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    return train, _read_batch(root / TEST_BATCH)


# --- the image-folder format -----------------------------------------------------------------

def _list_folder(split_dir: Path) -> tuple[tuple[str, ...], list[Path], np.ndarray]:
    if not split_dir.is_dir():
        raise DataError(f"{split_dir}: missing directory (expected <class>/ folders of images)")
    classes = tuple(sorted(p.name for p in split_dir.iterdir() if p.is_dir()))
    if not classes:
        raise DataError(f"{split_dir}: no class folders")
    files, labels = [], []
    for label, name in enumerate(classes):
        found = sorted(p for p in (split_dir / name).iterdir()
                       if p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise DataError(f"{split_dir / name}: class folder holds no images")
        files += found
        labels += [label] * len(found)
    return classes, files, np.asarray(labels, dtype=np.int64)


def _decode(files: list[Path]) -> np.ndarray:
    images = np.empty((len(files), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for i, path in enumerate(files):
        try:
            with Image.open(path) as img:
                rgb = img.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError) as err:
            raise DataError(f"{path}: unreadable image ({err})") from None
        if rgb.size != (IMAGE_SIZE, IMAGE_SIZE):
            raise DataError(f"{path}: image is {rgb.size[0]}x{rgb.size[1]}, "
                            f"expected {IMAGE_SIZE}x{IMAGE_SIZE}")
        images[i] = np.asarray(rgb)
    return images


# --- splits ----------------------------------------------------------------------------------

def stratified_take(labels: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of `count` items drawn at random with each class in its share of `labels`
    (largest remainder for the rounding), in increasing order."""
    classes, per_class = np.unique(labels, return_counts=True)
    exact = per_class * count / len(labels)
    take = np.floor(exact).astype(int)
    take[np.argsort(-(exact - take), kind="stable")[: count - take.sum()]] += 1
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take,
                                                                               strict=True)]
    return np.sort(np.concatenate(chosen))


def _plan(labels: np.ndarray, count: int, rng: np.random.Generator, what: str) -> np.ndarray:
    if count > len(labels):
        raise DataError(f"{what}={count} exceeds the {len(labels)} images available")
    return stratified_take(labels, count, rng)


def load_splits(cfg: DataConfig) -> Splits:
    """Train, validation and test sets from `cfg.dir`, with the seeded stratified validation
    split carved from train, then the optional limits applied (both by `cfg.split_seed`)."""
    directory = Path(cfg.dir)
    if directory.exists() and not directory.is_dir():
        raise DataError(f"{directory}: a file, not a data folder")
    if not directory.exists() or not any(directory.iterdir()):
        download(directory)

    rng = np.random.default_rng(cfg.split_seed)
    pickles = _pickle_root(directory)
    if pickles is not None:
        (train_x, train_y), (test_x, test_y) = _load_pickles(pickles)
        classes = CLASSES
        train_files = test_files = None
    elif (directory / "train").is_dir() or (directory / "test").is_dir():
        classes, train_files, train_y = _list_folder(directory / "train")
        test_classes, test_files, test_y = _list_folder(directory / "test")
        if test_classes != classes:
            raise DataError(f"{directory}: class folders differ between train/ {list(classes)} "
                            f"and test/ {list(test_classes)}")
    else:
        raise DataError(f"{directory}: neither the CIFAR-10 python release "
                        f"({PICKLE_FOLDER}/) nor train/ and test/ image folders")

    n_train = len(train_y)
    val_idx = _plan(train_y, cfg.val_size, rng, "data.val_size")
    rest = np.setdiff1d(np.arange(n_train), val_idx)
    if len(rest) == 0:
        raise DataError(f"data.val_size={cfg.val_size} leaves no training images")
    train_idx = rest
    if cfg.limit_train:
        train_idx = rest[_plan(train_y[rest], min(cfg.limit_train, len(rest)), rng,
                               "data.limit_train")]
    test_idx = np.arange(len(test_y))
    if cfg.limit_test:
        test_idx = _plan(test_y, min(cfg.limit_test, len(test_y)), rng, "data.limit_test")

    def subset(files, images, labels, idx) -> ImageSet:
        pixels = _decode([files[i] for i in idx]) if files is not None else images[idx]
        return ImageSet(pixels, labels[idx], idx.astype(np.int64))

    train_images = None if train_files is not None else train_x
    test_images = None if test_files is not None else test_x
    test = subset(test_files, test_images, test_y, test_idx)
    val = test if cfg.val_size == 0 else subset(train_files, train_images, train_y, val_idx)
    return Splits(
        train=subset(train_files, train_images, train_y, train_idx),
        val=val, test=test, classes=tuple(classes), val_is_test=cfg.val_size == 0,
    )


def _not_downloaded(directory: Path, reason: str) -> DataError:
    return DataError(f"{directory}: CIFAR-10 could not be downloaded ({reason}); point "
                     f"--data-dir at a copy instead: the python release ({PICKLE_FOLDER}/) or "
                     "train/<class>/ and test/<class>/ image folders")


def download(directory: Path) -> None:
    """Fetch the official release into `directory`, empty or missing (then made, with its
    parents). On failure nothing it wrote is left: the folder is as empty as it was, or absent."""
    from torchvision.datasets import CIFAR10

    existing = next(p for p in (directory, *directory.parents) if p.exists())
    if not existing.is_dir():
        raise _not_downloaded(directory, f"{existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise _not_downloaded(directory, f"{existing} cannot be written")
    missing = [p for p in (directory, *directory.parents) if not p.exists()]
    made = missing[-1] if missing else None  # the topmost folder this makes
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _not_downloaded(directory, f"the folder cannot be made: {err.strerror}") from None
    print(f"downloading CIFAR-10 into {directory} ...", flush=True)
    try:
        CIFAR10(root=str(directory), train=True, download=True)
    except Exception as err:  # noqa: BLE001 - any failure means: no data, say why
        if made is not None:
            shutil.rmtree(made)
        else:
            for child in directory.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        raise _not_downloaded(directory, f"{type(err).__name__}: {first_line(err)}") from None


# --- augmentation and loaders ----------------------------------------------------------------

def train_transform(cfg: DataConfig, seed: int | None = None) -> A.Compose:
    """The original's augmentation: pad with the mean, random 32x32 crop, horizontal flip,
    one square hole of the mean colour, then CIFAR-10 normalisation."""
    size = IMAGE_SIZE + 2 * cfg.pad
    steps = [
        A.PadIfNeeded(min_height=size, min_width=size, border_mode=cv2.BORDER_CONSTANT,
                      fill=MEAN_UINT8),
        A.RandomCrop(height=IMAGE_SIZE, width=IMAGE_SIZE),
        A.HorizontalFlip(p=0.5),
    ]
    if cfg.cutout:
        steps.append(A.CoarseDropout(num_holes_range=(1, 1), hole_height_range=(cfg.cutout,) * 2,
                                     hole_width_range=(cfg.cutout,) * 2, fill=MEAN_UINT8, p=1.0))
    steps += [A.Normalize(mean=MEAN, std=STD), ToTensorV2()]
    return A.Compose(steps, strict=True, seed=seed)


def eval_transform() -> A.Compose:
    return A.Compose([A.Normalize(mean=MEAN, std=STD), ToTensorV2()], strict=True)


class CifarDataset(torch.utils.data.Dataset):
    def __init__(self, images: ImageSet, transform: A.Compose):
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(image=self.images.images[i])["image"], int(self.images.labels[i])


def reseed_worker(worker_id: int) -> None:
    """Give each DataLoader worker its own augmentation stream: without this, forked workers
    share the parent's Compose RNG state and repeat each other's crops, flips and holes."""
    seed = torch.initial_seed() % 2**32  # differs per worker and per epoch
    info = torch.utils.data.get_worker_info()
    info.dataset.transform.set_random_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's shuffling and augmentation, so a resumed run replays it."""
    return (seed * 1_000_003 + epoch) % 2**31


def make_loader(images: ImageSet, transform: A.Compose, batch_size: int, num_workers: int,
                shuffle: bool, rank: int = 0, world: int = 1) -> torch.utils.data.DataLoader:
    """Batches of `images`: in order for evaluation; shuffled for training, where the last
    partial batch is dropped (every step has one shape: torch.compile compiles once, and
    BatchNorm never sees a batch of one) and worker `rank` of `world` takes its shard of each
    epoch's order (DistributedSampler, dropping the remainder so every worker takes as many
    steps as one worker would at `world` times this batch size)."""
    dataset = CifarDataset(images, transform)
    sampler = None
    if shuffle and world > 1:
        sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world, rank=rank,
                                                      shuffle=True, drop_last=True)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle if sampler is None else None,
        sampler=sampler, drop_last=shuffle,
        num_workers=num_workers, worker_init_fn=reseed_worker if num_workers else None,
        generator=torch.Generator(), pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
    )


def seed_epoch(loader: torch.utils.data.DataLoader, seed: int, epoch: int) -> None:
    """Fix the order, the workers' seeds and (without workers) the augmentations of `epoch`."""
    seed = epoch_seed(seed, epoch)
    if isinstance(loader.sampler, torch.utils.data.DistributedSampler):
        loader.sampler.set_epoch(seed)  # shuffles by the sampler's seed + this "epoch"
    loader.generator.manual_seed(seed)
    loader.dataset.transform.set_random_seed(seed)


class Batches(Protocol):
    """A source of (images, labels) batches: `seed(epoch)` fixes that epoch's order and
    augmentations (so a resumed run replays them), then iterate it."""

    def seed(self, epoch: int) -> None: ...

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def __len__(self) -> int: ...


class LoaderBatches:
    """`make_loader`'s DataLoader as a batch source."""

    def __init__(self, loader: torch.utils.data.DataLoader, run_seed: int):
        self.loader, self.run_seed = loader, run_seed

    def seed(self, epoch: int) -> None:
        seed_epoch(self.loader, self.run_seed, epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)


def to_uint8_images(batch: torch.Tensor) -> np.ndarray:
    """Normalised tensors (N x 3 x H x W) back to uint8 RGB images (N x H x W x 3)."""
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    pixels = (batch.detach().cpu().float() * std + mean) * 255
    return pixels.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
