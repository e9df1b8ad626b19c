"""The loop under data parallelism and the GPU-only switches, run on CPU: the global batch
split over workers, validation sharded across them, DDP over two gloo processes with bf16
autocast, channels_last and on-device augmentation forced on, and torch.compile."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import trainable.loop as loop
from trainable.checkpoint import load_checkpoint
from trainable.constants import CHECKPOINT_FILE, TrialStatus
from trainable.data import DataError, ImageSet, load_splits, make_loader, train_transform
from trainable.device import Runtime
from trainable.device_data import DeviceBatches
from trainable.loop import make_scheduler, steps_per_epoch, train
from trainable.model import build_model

from .helpers import free_port


def images(count: int) -> ImageSet:
    """Random images, each labelled with its own number, so a batch tells which images it holds."""
    pixels = np.random.default_rng(0).integers(0, 256, (count, 32, 32, 3), np.uint8)
    return ImageSet(pixels, np.arange(count), np.arange(count))


@pytest.mark.parametrize("count", [64, 100, 127, 301])
def test_two_workers_take_the_steps_of_one_at_the_same_global_batch(tiny_config, count):
    config = tiny_config.replace("train", batch_size=32)
    steps = steps_per_epoch(config, count)
    assert steps == count // 32
    one = make_loader(images(count), train_transform(config.data), 32, 0, shuffle=True)
    halves = [make_loader(images(count), train_transform(config.data), 16, 0, shuffle=True,
                          rank=rank, world=2) for rank in (0, 1)]
    assert len(one) == len(halves[0]) == len(halves[1]) == steps
    taken = []
    for rank, half in enumerate(halves):
        half.sampler.set_epoch(0)
        batches = [labels for _, labels in half]
        assert {len(labels) for labels in batches} == {16}, f"rank {rank}: a partial batch"
        taken.append(set(torch.cat(batches).tolist()))
    assert not taken[0] & taken[1] and len(taken[0] | taken[1]) == steps * 32
    device = torch.device("cpu")
    on_device = [DeviceBatches(images(count), config.data, 32 // world, device, True, rank,
                               world) for world in (1, 2) for rank in range(world)]
    assert [len(b) for b in on_device] == [steps] * 3
    seen = []
    for batches in on_device[1:]:  # the two workers: disjoint shards, full batches
        batches.seed(3)
        labels = [lbl for _, lbl in batches]
        assert {len(lbl) for lbl in labels} == {16}
        seen.append(set(torch.cat(labels).tolist()))
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == steps * 32
    # The same schedule for both: its length comes from the steps alone.
    model = build_model("resnet18")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert make_scheduler(optimizer, config, steps).total_steps == config.train.epochs * steps


def test_fewer_images_than_one_batch_are_refused(tiny_config):
    with pytest.raises(DataError, match="15 training images make no full batch of "
                                        "train.batch_size=16"):
        steps_per_epoch(tiny_config, 15)


# --- two processes, gloo --------------------------------------------------------------------

def _worker(rank: int, world: int, port: int, config, out: str) -> None:
    """One DDP worker: the loop with the GPU switches forced on, its reports kept in a file."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    evaluated = []
    predict = loop.predict

    def counting_predict(*args, **kwargs):
        logits, labels = predict(*args, **kwargs)
        evaluated.append(len(labels))
        return logits, labels

    loop.predict = counting_predict
    reports = []

    def report(metrics, checkpoint_dir):
        reports.append({**metrics, "checkpoint": checkpoint_dir is not None})
        if checkpoint_dir is not None:
            Path(out, CHECKPOINT_FILE).write_bytes(Path(checkpoint_dir, CHECKPOINT_FILE)
                                                   .read_bytes())

    runtime = Runtime(torch.device("cpu"), torch.bfloat16, channels_last=True, cpus=1)
    outcome = train(config, load_splits(config.data), report, runtime=runtime,
                    prepare_model=DistributedDataParallel)
    Path(out, f"rank{rank}.json").write_text(json.dumps(
        {"status": outcome.status, "reports": reports, "evaluated": evaluated}))
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ddp_over_two_processes_with_bf16_channels_last_and_device_augmentation(tiny_config,
                                                                               tmp_path):
    config = tiny_config.replace("data", augment_on="gpu", limit_train=32, val_size=17) \
        .replace("train", epochs=2, batch_size=16)
    mp.spawn(_worker, args=(2, free_port(), config, str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    steps = steps_per_epoch(config, 32)
    for rank, found in enumerate(ranks):
        assert found["status"] == TrialStatus.COMPLETED
        assert [r["epoch"] for r in found["reports"]] == [1, 2]
        assert all(r["steps"] == steps == 2 and r["workers"] == 2 for r in found["reports"])
        assert all(r["checkpoint"] == (rank == 0) for r in found["reports"]), \
            "only rank 0 writes checkpoints"
    # Every val image evaluated once across the workers (9 + 8 of 17), each epoch; both
    # workers report the whole set's figures.
    assert [a + b for a, b in zip(ranks[0]["evaluated"], ranks[1]["evaluated"],
                                  strict=True)] == [17, 17]
    for key in ("val_acc", "val_loss"):
        assert [r[key] for r in ranks[0]["reports"]] == [r[key] for r in ranks[1]["reports"]]
    # They are the figures of rank 0's model, the one saved, on the whole val set at once.
    state = load_checkpoint(tmp_path)
    model = build_model(config.model.name)
    model.load_state_dict(state["model"])
    runtime = Runtime(torch.device("cpu"), torch.bfloat16, channels_last=True, cpus=1)
    splits = load_splits(config.data)
    whole = loop.evaluate(runtime.prepare(model),
                          loop.make_batches(splits.val, config, runtime, train=False), runtime)
    last = ranks[0]["reports"][-1]
    assert whole["acc"] == pytest.approx(last["val_acc"], abs=1 / 17)
    assert whole["loss"] == pytest.approx(last["val_loss"], rel=0.02)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_compiled_training_compiles_once_and_saves_the_plain_module(tiny_config, monkeypatch):
    """40 images in batches of 16: without dropping the partial batch of 8, its new shape
    would recompile the model in every epoch."""
    import torch._dynamo

    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    torch._dynamo.reset()
    config = tiny_config.replace("data", limit_train=40).replace(
        "train", epochs=2, batch_size=16, compile=True)
    saved = []

    def report(metrics, checkpoint_dir):
        saved.append(load_checkpoint(checkpoint_dir))

    outcome = train(config, load_splits(config.data), report)
    assert outcome.status == TrialStatus.COMPLETED
    assert [m["steps"] for m in outcome.history] == [2, 2]
    assert not any(key.startswith("_orig_mod") for key in saved[-1]["model"])
    assert set(saved[-1]["model"]) == set(build_model(config.model.name).state_dict())
    torch._dynamo.reset()

