"""The LR range test (torch-lr-finder): an exponential LR sweep over the training split, with
the trials' model, global batch size and optimizer settings; the estimate is the LR where the
smoothed loss falls fastest before its minimum."""

from __future__ import annotations

import contextlib
import io
from typing import Any

import numpy as np
import torch
from torch import nn
from torch_lr_finder import LRFinder

from trainable.config import Config
from trainable.data import Splits, make_loader, seed_epoch, train_transform
from trainable.device import select_runtime
from trainable.loop import make_optimizer
from trainable.model import build_model

# torch-lr-finder's own plot skips these many points at each end of the curve: the first
# are noise at tiny LRs, the last the blow-up.
SKIP_START, SKIP_END = 10, 5


def steepest_descent(lrs: list[float], losses: list[float]) -> float:
    """The LR at which the smoothed loss falls fastest (most negative slope per step; the steps
    are evenly spaced in log LR), looking only up to the loss's minimum: past it the loss has
    blown up, and its fall from a blow-up is no learning. The first and last points are
    skipped, as torch-lr-finder's plot skips them, while enough points remain."""
    start, end = (SKIP_START, SKIP_END) if len(lrs) >= SKIP_START + SKIP_END + 2 else (0, 0)
    curve = np.asarray(losses, dtype=float)
    lowest = start + int(np.argmin(curve[start:len(curve) - end]))
    slope = np.gradient(curve)
    return float(lrs[start + int(np.argmin(slope[start:lowest + 1]))])


def range_test(config: Config, splits: Splits) -> dict[str, Any]:
    """Run the sweep; return `suggested_lr`, the `lrs` and smoothed `losses`, and `settings`."""
    finder_cfg, t = config.lr_finder, config.train
    runtime = select_runtime(cudnn_benchmark=config.train.cudnn_benchmark)
    torch.manual_seed(t.seed)
    model = runtime.prepare(build_model(config.model.name, len(splits.classes)))
    optimizer = make_optimizer(model, config)
    # A DataLoader with the CPU augmentation whatever data.augment_on says: torch-lr-finder
    # iterates DataLoaders only.
    loader = make_loader(splits.train, train_transform(config.data), t.batch_size,
                         runtime.loader_workers(config.data.num_workers), shuffle=True)
    seed_epoch(loader, t.seed, epoch=0)
    finder = LRFinder(model, optimizer, nn.CrossEntropyLoss(), device=runtime.device)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its own suggestions
        finder.range_test(loader, start_lr=finder_cfg.start_lr, end_lr=finder_cfg.end_lr,
                          num_iter=finder_cfg.num_iter, step_mode="exp")
        finder.reset()
    lrs, losses = list(finder.history["lr"]), list(finder.history["loss"])
    return {
        "suggested_lr": steepest_descent(lrs, losses),
        "lrs": lrs,
        "losses": losses,
        "settings": {"start_lr": finder_cfg.start_lr, "end_lr": finder_cfg.end_lr,
                     "num_iter": finder_cfg.num_iter, "step_mode": "exp",
                     "batch_size": t.batch_size, "momentum": t.momentum,
                     "nesterov": t.nesterov, "weight_decay": t.weight_decay,
                     "model": config.model.name, "device": str(runtime.device),
                     "train_images": len(splits.train.labels)},
    }
