"""The original's augmentation, batched on the training device (`data.augment_on: gpu`).

The whole split is held on the device as uint8; each batch is padded with the mean, cropped at a
random offset, flipped with probability 1/2, given one mean-coloured square hole fully inside
the image, and normalised, all in a few tensor operations. Statistically it is the albumentations
pipeline of `trainable.data` (tests compare them); it spares the CPU, which on a GPU machine
cannot decode and augment 20,000+ images/s for one ResNet18.
"""

from __future__ import annotations

import math

import torch

from trainable.config import DataConfig
from trainable.constants import IMAGE_SIZE, MEAN, STD
from trainable.data import ImageSet, epoch_seed


class DeviceBatches:
    """Batches of (images, labels) on `device`, like `trainable.data.make_loader`'s: in order
    and only normalised for evaluation; shuffled and augmented for training, in full batches
    only, each worker of a torch.distributed group taking its shard of every epoch's order,
    so that `world` workers at `batch_size` take the steps of one worker at world x batch."""

    def __init__(self, images: ImageSet, cfg: DataConfig, batch_size: int,
                 device: torch.device, train: bool, rank: int = 0, world: int = 1,
                 run_seed: int = 0):
        self.images = torch.from_numpy(images.images).to(device).permute(0, 3, 1, 2)
        self.images = self.images.contiguous()  # (N, 3, 32, 32) uint8
        self.labels = torch.from_numpy(images.labels).to(device)
        self.batch_size = batch_size
        self.pad, self.cutout = cfg.pad, cfg.cutout
        self.train = train
        self.device = device
        self.generator = torch.Generator(device=device)
        self.mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(STD, device=device).view(1, 3, 1, 1) * 255
        self.rank, self.world = rank, world
        self.run_seed = run_seed

    def seed(self, epoch: int) -> None:
        self.generator.manual_seed(epoch_seed(self.run_seed, epoch))

    def __len__(self) -> int:
        if self.train:
            return len(self.labels) // (self.batch_size * self.world)
        return math.ceil(len(self.labels) / self.batch_size)

    def normalise(self, batch: torch.Tensor) -> torch.Tensor:
        return (batch.float() - self.mean) / self.std

    def augment(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, 32, 32) -> augmented, normalised float (B, 3, 32, 32)."""
        count, size, gen = len(batch), IMAGE_SIZE, self.generator
        # Normalised, the mean colour is 0: padding and the hole are zeros.
        x = torch.nn.functional.pad(self.normalise(batch), [self.pad] * 4, value=0.0)
        offsets = torch.randint(0, 2 * self.pad + 1, (2, count), device=self.device,
                                generator=gen)
        steps = torch.arange(size, device=self.device)
        rows = (offsets[0, :, None] + steps)[:, None, :, None].expand(count, 3, size, x.shape[3])
        x = x.gather(2, rows)
        cols = (offsets[1, :, None] + steps)[:, None, None, :].expand(count, 3, size, size)
        x = x.gather(3, cols)
        flip = torch.rand(count, device=self.device, generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
        if self.cutout:
            corner = torch.randint(0, size - self.cutout + 1, (2, count), device=self.device,
                                   generator=gen)
            inside_rows = (steps >= corner[0, :, None]) & (steps < corner[0, :, None]
                                                           + self.cutout)
            inside_cols = (steps >= corner[1, :, None]) & (steps < corner[1, :, None]
                                                           + self.cutout)
            hole = inside_rows[:, :, None] & inside_cols[:, None, :]
            x = x.masked_fill(hole[:, None], 0.0)
        return x

    def __iter__(self):
        count = len(self.labels)
        if self.train:
            order = torch.randperm(count, device=self.device, generator=self.generator)
            order = order[: len(self) * self.batch_size * self.world][self.rank::self.world]
        else:
            order = torch.arange(count, device=self.device)
        for start in range(0, len(order), self.batch_size):
            index = order[start:start + self.batch_size]
            batch = self.images[index]
            yield (self.augment(batch) if self.train else self.normalise(batch)), \
                self.labels[index]
