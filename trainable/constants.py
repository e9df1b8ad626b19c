"""Constants every package shares; each lives here only."""

from enum import StrEnum
from pathlib import Path

# The checkout: configs/ and the entry points live under it.
REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "default.yaml"

# Exit codes of every entry point (0: done).
EXIT_BAD_INPUT = 2  # refused in one line before any work; nothing written
EXIT_DIVERGED = 3  # `python -m trainable`: a loss went non-finite
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, as shells report it): the study can be resumed

# CIFAR-10's classes in label order (batches.meta of the official release).
CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
           "dog", "frog", "horse", "ship", "truck")

# Per-channel mean and std of the CIFAR-10 training images, in [0, 1] units (RGB).
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
# The same mean in uint8 units: what pad and cutout fill with (albumentations' `fill` is uint8).
MEAN_UINT8 = tuple(round(255 * m) for m in MEAN)

IMAGE_SIZE = 32  # pixels, height and width of a CIFAR-10 image

# Names of the official python release's files, under its `cifar-10-batches-py` folder.
PICKLE_FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META_FILE = "batches.meta"

# The file a checkpoint directory holds.
CHECKPOINT_FILE = "checkpoint.pt"

# The models `model.name` may name (trainable/model.py builds them).
RESNET18 = "resnet18"  # the standard CIFAR ResNet18
RESNET18_ERA = "resnet18_era"  # the original assignment's variant
MODEL_NAMES = (RESNET18, RESNET18_ERA)


class TrialStatus(StrEnum):
    """How a run or a study's trial ended, as the loop returns it and results.csv names it."""

    COMPLETED = "COMPLETED"  # ran every epoch
    STOPPED = "STOPPED"  # stopped early by the scheduler (ASHA)
    DIVERGED = "DIVERGED"  # a loss went non-finite
    ERROR = "ERROR"  # raised, after its retries


# A study's trial in none of these statuses was interrupted (Tune's PENDING, RUNNING, ...).
ENDED = frozenset(TrialStatus)
