"""Constants every package shares; each lives here only."""

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
