"""How fast this process trains and evaluates the configured model: a few real steps, timed.

A study turns these rates into what it will cost before it starts (study/cost.py).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from trainable.config import Config
from trainable.data import ImageSet
from trainable.device import Runtime, select_runtime
from trainable.loop import evaluate, make_batches, make_optimizer, make_scheduler, train_epoch
from trainable.model import build_model

# Steps timed after the warm-up ones (the first steps allocate, and on CUDA autotune).
TIMED_STEPS = 3
# On a CPU a step's images/s barely depends on its size, and a step of the full batch can take
# many seconds there: the probe steps take at most this many images.
CPU_PROBE_IMAGES = 32


def measure_speed(config: Config, images: ImageSet, workers: int = 1,
                  runtime: Runtime | None = None, started_at: float | None = None
                  ) -> dict[str, float]:
    """Training and evaluation images/s of one worker at its share of the global batch
    (`train.batch_size / workers`; on a CPU at most CPU_PROBE_IMAGES a step), on `images`
    augmented as the trials augment them. Without torch.compile, whatever the config says.
    `startup_s`: the seconds from `started_at` (time.time(), when the probe was asked for)
    to its first step, as a trial's worker gets there; 0 without it."""
    runtime = runtime or select_runtime(cudnn_benchmark=config.train.cudnn_benchmark)
    batch = config.train.batch_size // workers
    if runtime.device.type != "cuda":
        batch = min(batch, CPU_PROBE_IMAGES)
    probe = config.replace("train", batch_size=batch, compile=False)
    count = min(len(images.labels), batch * TIMED_STEPS)
    chosen = np.random.default_rng(config.train.seed).choice(len(images.labels), count,
                                                             replace=False)
    subset = ImageSet(images.images[chosen], images.labels[chosen], images.indices[chosen])
    model = runtime.prepare(build_model(config.model.name))
    optimizer = make_optimizer(model, probe)
    batches = make_batches(subset, probe, runtime, train=True)
    scheduler = make_scheduler(optimizer, probe, len(batches))
    startup_s = 0.0 if started_at is None else time.time() - started_at
    train_epoch(model, batches, optimizer, scheduler, runtime, probe, 1, progress=False)
    timed = train_epoch(model, batches, optimizer, scheduler, runtime, probe, 2,
                         progress=False)
    if runtime.device.type == "cuda":
        torch.cuda.synchronize()
    evaluation = make_batches(subset, probe, runtime, train=False)
    evaluate(model, evaluation, runtime)  # warm-up
    started = time.perf_counter()
    evaluate(model, evaluation, runtime, flip_tta=config.train.eval_flip_tta)
    return {"train_images_per_s": timed.images / timed.seconds,
            "eval_images_per_s": count / (time.perf_counter() - started),
            "batch": batch, "device": str(runtime.device), "startup_s": startup_s}
