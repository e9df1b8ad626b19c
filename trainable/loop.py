"""One training run: ResNet18, SGD and the one-cycle policy, from a config to a model.

`train` knows nothing of Ray. Once per epoch it calls `report(metrics, checkpoint_dir)`;
the caller decides what to do with both (print them, hand them to Ray Tune, keep the files).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from trainable.checkpoint import readable_checkpoint, restore, saved_checkpoint
from trainable.config import Config
from trainable.constants import TrialStatus
from trainable.data import (
    Batches,
    DataError,
    ImageSet,
    LoaderBatches,
    Splits,
    eval_transform,
    make_loader,
    train_transform,
)
from trainable.device import Runtime, select_runtime
from trainable.device_data import DeviceBatches
from trainable.experiment import DIVERGED, EPOCH, METRIC, STARTUP_S
from trainable.model import build_model

Report = Callable[[dict[str, Any], str | None], None]
Wrap = Callable[[Any], Any]


@dataclass
class Outcome:
    status: TrialStatus  # COMPLETED, or DIVERGED when a loss went non-finite
    model: nn.Module  # the trained (uncompiled) model
    history: list[dict[str, Any]] = field(default_factory=list)  # one metrics dict per epoch
    diverged_epoch: int | None = None


def make_optimizer(model: nn.Module, config: Config) -> torch.optim.SGD:
    t = config.train
    return torch.optim.SGD(model.parameters(), lr=t.max_lr / t.div_factor, momentum=t.momentum,
                           nesterov=t.nesterov, weight_decay=t.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, config: Config,
                   steps_per_epoch: int) -> torch.optim.lr_scheduler.OneCycleLR:
    """One cycle over exactly `epochs` epochs, peaking at the end of epoch `peak_epoch`.

    OneCycleLR divides by each phase's length in steps, so the warm-up is kept longer than
    one step and the descent at least one step (with peak_epoch == epochs the peak comes one
    step early); only a schedule of one or two steps in all moves the peak further.
    """
    t = config.train
    total_steps = t.epochs * steps_per_epoch
    warmup_steps = t.peak_epoch * steps_per_epoch
    warmup_steps = min(max(min(warmup_steps, total_steps - 1), 1.5), total_steps - 0.5)
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=t.max_lr, epochs=t.epochs, steps_per_epoch=steps_per_epoch,
        pct_start=warmup_steps / total_steps,
        div_factor=t.div_factor,
        final_div_factor=t.final_div_factor, anneal_strategy="cos",
        # SGD's momentum stays fixed at train.momentum, as in the original recipe.
        cycle_momentum=False,
    )


def rank_and_world() -> tuple[int, int]:
    """This worker's rank and the number of workers (0 and 1 outside torch.distributed)."""
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def steps_per_epoch(config: Config, train_images: int) -> int:
    """Optimizer steps in one epoch at the global batch `train.batch_size`, for any number of
    workers: full batches only (the loaders drop the last partial one)."""
    steps = train_images // config.train.batch_size
    if steps == 0:
        raise DataError(f"{train_images} training images make no full batch of "
                        f"train.batch_size={config.train.batch_size}: lower the batch size "
                        "or train on more images")
    return steps


def make_batches(images: ImageSet, config: Config, runtime: Runtime, train: bool) -> Batches:
    """Training batches (shuffled, augmented; this worker's shard, at its share of the global
    batch) or evaluation batches (in order, normalised): from DataLoader processes running
    albumentations, or made on the device (`data.augment_on`, see
    `Runtime.augments_on_device`)."""
    cfg = config.data
    rank, world = rank_and_world() if train else (0, 1)
    if config.train.batch_size % world:
        raise ValueError(f"train.batch_size={config.train.batch_size} does not split evenly "
                         f"over {world} workers")
    batch_size = config.train.batch_size // world
    if runtime.augments_on_device(cfg.augment_on):
        return DeviceBatches(images, cfg, batch_size, runtime.device, train, rank, world,
                             run_seed=config.train.seed)
    transform = train_transform(cfg) if train else eval_transform()
    loader = make_loader(images, transform, batch_size, runtime.loader_workers(cfg.num_workers),
                         shuffle=train, rank=rank, world=world)
    return LoaderBatches(loader, run_seed=config.train.seed)


def shard(images: ImageSet, rank: int, world: int) -> ImageSet:
    """Every `world`-th image from `rank` on: the workers' shards cover the set once."""
    return ImageSet(images.images[rank::world], images.labels[rank::world],
                    images.indices[rank::world])


@torch.no_grad()
def predict(model: nn.Module, loader, runtime: Runtime,
            flip_tta: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 logits (N, classes) and labels (N,) on the CPU, in the loader's order; with
    `flip_tta`, the mean of the logits of each image and of its mirror image."""
    model.eval()
    logits, labels = [], []
    for images, targets in loader:
        images = runtime.to_input(images)
        with runtime.autocast():
            out = model(images)
            if flip_tta:
                out = (out + model(images.flip(3))) / 2
        logits.append(out.float().cpu())
        labels.append(targets.cpu())
    return torch.cat(logits), torch.cat(labels)


def evaluate(model: nn.Module, loader, runtime: Runtime,
             flip_tta: bool = False) -> dict[str, float]:
    """Mean loss and accuracy. Under torch.distributed each worker passes its own shard and
    every worker gets the figures of the whole set (the sums are all-reduced)."""
    logits, labels = predict(model, loader, runtime, flip_tta)
    totals = torch.tensor([F.cross_entropy(logits, labels, reduction="sum").item(),
                           (logits.argmax(1) == labels).sum().item(), len(labels)],
                          dtype=torch.float64, device=runtime.device)
    if dist.is_initialized():
        dist.all_reduce(totals)
    loss_sum, correct, count = totals.tolist()
    return {"loss": loss_sum / count, "acc": correct / count}


def _any_worker(flag: bool, device: torch.device) -> bool:
    """True on every worker when `flag` is true on any: all must stop in the same epoch."""
    if not dist.is_initialized():
        return flag
    tensor = torch.tensor(float(flag), device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def _seed(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


@dataclass(frozen=True)
class EpochTraining:
    """What one epoch of training measured on this worker."""

    loss: float  # mean training loss; non-finite when a step's loss was
    acc: float
    images: int  # this worker's images this epoch
    seconds: float  # wall time of training, without validation
    lr: float  # the LR of the epoch's last step


def train_epoch(model: nn.Module, batches: Batches, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, runtime: Runtime,
                 config: Config, epoch: int, progress: bool) -> EpochTraining:
    """One pass over this worker's training batches, an optimizer and a scheduler step each."""
    t = config.train
    batches.seed(epoch)
    model.train()
    loss_sum = torch.zeros((), device=runtime.device)
    correct = torch.zeros((), device=runtime.device, dtype=torch.long)
    seen = 0
    started = time.perf_counter()
    for images, labels in tqdm(batches, desc=f"epoch {epoch}/{t.epochs}", leave=False,
                               disable=not progress, unit="batch"):
        images, labels = runtime.to_input(images), labels.to(runtime.device)
        with runtime.autocast():
            logits = model(images)
            loss = F.cross_entropy(logits, labels, label_smoothing=t.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr = scheduler.get_last_lr()[0]  # the LR this step used
        scheduler.step()
        loss_sum += loss.detach() * len(labels)
        correct += (logits.argmax(1) == labels).sum()
        seen += len(labels)
    # Read once an epoch, not per step: reading the loss every step would make the host wait
    # for the GPU every step. A non-finite step loss leaves the sum non-finite.
    return EpochTraining(loss_sum.item() / seen, correct.item() / seen, seen,
                         time.perf_counter() - started, lr)


def _share_rank0_buffers(module: nn.Module) -> None:
    """DDP gives every worker rank 0's buffers before each forward, but each then updates them
    from its own batch: validate (and save) rank 0's, on every worker."""
    for buffer in module.buffers():
        dist.broadcast(buffer, src=0)


def train(config: Config, splits: Splits, report: Report | None = None, *,
          resume_from: Sequence[str | Path] = (), runtime: Runtime | None = None,
          progress: bool = False, prepare_model: Wrap | None = None,
          started_at: float | None = None) -> Outcome:
    """Train `config.model.name` on `splits.train` for `config.train.epochs` epochs,
    validating on `splits.val` after each; continue from the first readable checkpoint of
    `resume_from` (checkpoint directories written by this function, newest first) when given.
    A non-finite loss ends the run as DIVERGED.

    Under torch.distributed (callers pass `prepare_model`, e.g. a DDP wrapper), each worker
    trains on its shard at `train.batch_size / workers` images a step, validates its shard of
    the val set (the figures reported are the whole set's), reports its own shard's training
    metrics, and only rank 0 writes checkpoints. BatchNorm statistics stay per worker
    (no SyncBatchNorm); rank 0's are the ones validated and saved.

    `started_at` (time.time() when the trial started): each report then says `startup_s`,
    the seconds from then to this run's first training step."""
    runtime = runtime or select_runtime(cudnn_benchmark=config.train.cudnn_benchmark)
    t = config.train
    _seed(t.seed)
    rank, world = rank_and_world()
    steps_per_epoch(config, len(splits.train.labels))  # at least one step, or a clear error
    module = runtime.prepare(build_model(config.model.name, len(splits.classes)))
    train_batches = make_batches(splits.train, config, runtime, train=True)
    val_batches = make_batches(shard(splits.val, rank, world), config, runtime, train=False)
    optimizer = make_optimizer(module, config)
    scheduler = make_scheduler(optimizer, config, len(train_batches))
    history: list[dict[str, Any]] = []
    first_epoch = 1

    state = readable_checkpoint(resume_from, config, module)
    if state is not None:
        history = restore(state, module, optimizer, scheduler)
        first_epoch = state["epoch"] + 1
    model = module if prepare_model is None else prepare_model(module)
    if t.compile:
        model = torch.compile(model)  # checkpoints keep saving the uncompiled `module`

    def diverge(epoch: int) -> Outcome:
        # A finite val_acc, never NaN: searchers and schedulers must still rank the trial.
        metrics = {EPOCH: epoch, DIVERGED: True, METRIC: 0.0,
                   "lr": scheduler.get_last_lr()[0]}
        if report is not None:
            report(metrics, None)
        return Outcome(TrialStatus.DIVERGED, module, history + [metrics], diverged_epoch=epoch)

    def publish(metrics: dict[str, Any]) -> None:
        """The epoch's report, with its checkpoint from rank 0."""
        if report is None:
            return
        if rank != 0:
            report(metrics, None)
            return
        with saved_checkpoint(module, optimizer, scheduler, metrics[EPOCH], config,
                               history) as checkpoint_dir:
            report(metrics, checkpoint_dir)

    if state is not None and first_epoch > t.epochs and not history[-1].get(DIVERGED):
        # Its last epoch checkpointed after the study's driver stopped listening (a stop lets
        # a trial run on for a moment): that report again, or the trial would end at the
        # epoch the driver saw last.
        publish(history[-1])
    startup = {} if started_at is None else {STARTUP_S: time.time() - started_at}
    for epoch in range(first_epoch, t.epochs + 1):
        trained = train_epoch(model, train_batches, optimizer, scheduler, runtime, config,
                               epoch, progress)
        if _any_worker(not math.isfinite(trained.loss), runtime.device):
            return diverge(epoch)
        if world > 1:
            _share_rank0_buffers(module)
        validating = time.perf_counter()
        val = evaluate(module, val_batches, runtime, flip_tta=t.eval_flip_tta)
        val_s = time.perf_counter() - validating
        if not math.isfinite(val["loss"]):  # the weights overflowed in the last steps
            return diverge(epoch)
        metrics = {
            EPOCH: epoch,
            "train_loss": trained.loss,
            "train_acc": trained.acc,
            "val_loss": val["loss"],
            METRIC: val["acc"],
            "best_val_acc": max([val["acc"]] + [m[METRIC] for m in history]),
            "lr": trained.lr,  # of this epoch's last step: max_lr at the end of peak_epoch
            "epoch_s": trained.seconds,  # seconds of training, without validation
            "val_s": val_s,  # seconds of validation
            "images_per_s": world * trained.images / trained.seconds,  # all workers, equal shards
            "steps": len(train_batches),  # optimizer steps this epoch, for any number of workers
            "workers": world,
            DIVERGED: False,
            **startup,
        }
        history.append(metrics)
        publish(metrics)
    return Outcome(TrialStatus.COMPLETED, module, history)
