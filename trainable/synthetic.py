"""A small, learnable stand-in for CIFAR-10, written in the official python format.

    python -m trainable.synthetic OUT --train N --test M [--seed S]

Each class has its own colour and its own horizontal stripe frequency (stripes survive the
horizontal flip and most of a crop), under per-image noise, brightness jitter and shift, so a
short run beats chance clearly but does not reach 100% at once.
"""

from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path

import numpy as np

from trainable.constants import (
    CLASSES,
    IMAGE_SIZE,
    META_FILE,
    PICKLE_FOLDER,
    TEST_BATCH,
    TRAIN_BATCHES,
)


def make_images(count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`count` images (N, 32, 32, 3) uint8 with balanced labels (N,) int64."""
    labels = rng.permutation(np.arange(count) % len(CLASSES))
    palette = np.random.default_rng(1234).uniform(40, 215, size=(len(CLASSES), 3))
    rows = np.arange(IMAGE_SIZE, dtype=np.float64)[None, :, None, None]
    frequency = (1 + labels)[:, None, None, None] * np.pi / IMAGE_SIZE
    phase = rng.uniform(0, 2 * np.pi, size=(count, 1, 1, 1))
    stripes = 45 * np.sin(frequency * rows + phase)
    brightness = rng.uniform(0.8, 1.2, size=(count, 1, 1, 1))
    noise = rng.normal(0, 25, size=(count, IMAGE_SIZE, IMAGE_SIZE, 3))
    images = palette[labels][:, None, None, :] * brightness + stripes + noise
    return np.clip(images, 0, 255).astype(np.uint8), labels.astype(np.int64)


def _batch(images: np.ndarray, labels: np.ndarray, name: str) -> dict:
    data = images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # official: rows of CHW bytes
    return {b"batch_label": name.encode(), b"labels": [int(y) for y in labels],
            b"data": np.ascontiguousarray(data),
            b"filenames": [f"synthetic_{i:05d}.png".encode() for i in range(len(images))]}


def write_dataset(out: Path, train: int, test: int, seed: int = 0) -> Path:
    """Write the release under `out/cifar-10-batches-py/`; return that folder."""
    rng = np.random.default_rng(seed)
    root = out / PICKLE_FOLDER
    root.mkdir(parents=True)
    train_x, train_y = make_images(train, rng)
    test_x, test_y = make_images(test, rng)
    parts = np.array_split(np.arange(train), len(TRAIN_BATCHES))
    files = {name: _batch(train_x[idx], train_y[idx], name)
             for name, idx in zip(TRAIN_BATCHES, parts, strict=True)}
    files[TEST_BATCH] = _batch(test_x, test_y, TEST_BATCH)
    files[META_FILE] = {b"label_names": [c.encode() for c in CLASSES],
                        b"num_cases_per_batch": int(len(parts[0])),
                        b"num_vis": 3 * IMAGE_SIZE * IMAGE_SIZE}
    for name, payload in files.items():
        with (root / name).open("wb") as f:
            pickle.dump(payload, f, protocol=2)
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainable.synthetic", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="directory to create (must not hold anything)")
    parser.add_argument("--train", type=int, default=500, help="training images")
    parser.add_argument("--test", type=int, default=200, help="test images")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.train < len(TRAIN_BATCHES) or args.test < 1:
        parser.exit(2, f"error: need --train >= {len(TRAIN_BATCHES)} and --test >= 1\n")
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        parser.exit(2, f"error: {args.out}: exists and is not an empty directory\n")
    root = write_dataset(args.out, args.train, args.test, args.seed)
    print(f"wrote {args.train} training and {args.test} test images to {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
