"""The loop, adapted to Ray: a Tune function trainable per trial, either running the loop itself
(`--local`) or driving a Ray Train TorchTrainer whose workers run it (Train V2's pattern)."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow.fs
import ray
import ray.train
import ray.train.torch
from ray import tune
from ray.train.v2.api.callback import UserCallback

from study.plan import Resources
from trainable.config import Config
from trainable.constants import CHECKPOINT_FILE
from trainable.device import select_runtime
from trainable.experiment import (
    DIVERGED,
    EPOCH,
    METRIC,
    MODE,
    SEARCHED,
    TRAIN_RUNS,
    Folder,
    download,
    train_run_name,
)
from trainable.logs import log_to_stderr
from trainable.loop import train


def trial_config(base: Config, params: dict[str, Any]) -> Config:
    """The base config with this trial's searched values (checked like any config); for a
    confirmation run, its point's values and seed."""
    point = params.get("confirm", params)
    values = {k: point[k] for k in SEARCHED}
    if "seed" in point:
        values["seed"] = point["seed"]
    return base.replace("train", **values)


def _report_to(report_fn, checkpoint_cls):
    def report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        checkpoint = checkpoint_cls.from_directory(checkpoint_dir) if checkpoint_dir else None
        report_fn(metrics, checkpoint=checkpoint)
    return report


def restore_candidates(latest: str | Path,
                       filesystem: pyarrow.fs.FileSystem | None = None) -> list[str]:
    """The checkpoints to continue a trial from, newest first, as paths in `filesystem` (local
    by default): `latest`, the one Tune or Train hands back, then the older ones beside it,
    should it be unreadable (both keep a trial's checkpoints side by side, named so that they
    sort by time)."""
    filesystem = filesystem or pyarrow.fs.LocalFileSystem()
    latest = str(latest).rstrip("/")
    folder, name = latest.rsplit("/", 1)
    older = [info.path for info in filesystem.get_file_info(pyarrow.fs.FileSelector(folder))
             if info.type == pyarrow.fs.FileType.Directory and info.base_name < name
             and filesystem.get_file_info(f"{info.path}/{CHECKPOINT_FILE}").type
             == pyarrow.fs.FileType.File]
    return [latest] + sorted(older, key=lambda p: p.rsplit("/", 1)[-1], reverse=True)


@contextlib.contextmanager
def _resume_from(checkpoint) -> Iterator[list[str]]:
    """`restore_candidates` of a Ray checkpoint as local folders (from a bucket, downloaded
    for the block); none when there is nothing to continue."""
    if checkpoint is None:
        yield []
        return
    candidates = restore_candidates(checkpoint.path, checkpoint.filesystem)
    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        yield candidates
        return
    with tempfile.TemporaryDirectory(prefix="onecycle-resume-") as scratch:
        copies = [Path(scratch) / candidate.rsplit("/", 1)[-1] for candidate in candidates]
        for candidate, copy in zip(candidates, copies, strict=True):
            download(checkpoint.filesystem, candidate, copy)
        yield [str(copy) for copy in copies]


def _newest_in_trial_folder() -> tune.Checkpoint | None:
    """The newest checkpoint the trial persisted. Not `tune.get_checkpoint()`: that is the one
    named by Tune's last saved state, and a driver killed after a report but before the next
    save would make the trial run that report's epoch again. Tune names them
    `checkpoint_<index>`, so that they sort by time."""
    storage = tune.get_context().get_storage()
    folder, filesystem = storage.trial_fs_path, storage.storage_filesystem
    found = filesystem.get_file_info(pyarrow.fs.FileSelector(folder, allow_not_found=True))
    saved = sorted(info.base_name for info in found if info.type == pyarrow.fs.FileType.Directory
                   and info.base_name.startswith("checkpoint_"))
    return tune.Checkpoint(f"{folder}/{saved[-1]}", filesystem=filesystem) if saved else None


def local_trial(params: dict[str, Any], *, base: Config, splits_ref: list) -> None:
    """One trial run by the loop inside the Tune trainable: one process, no TorchTrainer."""
    started_at = time.time()
    log_to_stderr()
    config = trial_config(base, params)
    splits = ray.get(splits_ref[0])
    with _resume_from(_newest_in_trial_folder()) as resume_from:
        train(config, splits, _report_to(tune.report, tune.Checkpoint), resume_from=resume_from,
              started_at=started_at)


@ray.remote(num_cpus=0)
class EpochRelay:
    """A TorchTrainer trial's line between its Ray Train run and Tune. Train's controller
    `put`s each epoch's metrics; the Tune trial `take`s and reports them, and once Tune asks
    for more it `allow`s the next epoch, which the workers `wait_to_start` when held. A trial
    that Tune stops never asks: its workers start no other epoch before they are ended with
    the trial (ASHA's savings are real)."""

    def __init__(self):
        self.metrics: asyncio.Queue = asyncio.Queue()
        self.changed = asyncio.Condition()
        self.allowed = 1  # the highest epoch the workers may start

    async def put(self, metrics: dict[str, Any] | None) -> None:
        await self.metrics.put(metrics)

    async def take(self) -> dict[str, Any] | None:
        return await self.metrics.get()

    async def allow(self, epoch: int) -> None:
        async with self.changed:
            self.allowed = max(self.allowed, epoch)
            self.changed.notify_all()

    async def wait_to_start(self, epoch: int) -> None:
        async with self.changed:
            await self.changed.wait_for(lambda: self.allowed >= epoch)


class RelayCallback(UserCallback):
    """In Train's controller: each reported epoch (rank 0's metrics) to the trial's relay,
    with the path of the checkpoint Train kept for it."""

    def __init__(self, relay: ray.actor.ActorHandle):
        self.relay = relay

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        reported = dict(metrics[0])
        if checkpoint is not None:
            reported["checkpoint_path"] = checkpoint.path
        ray.get(self.relay.put.remote(reported))  # in order, before the run can end


def train_worker(loop_config: dict[str, Any]) -> None:
    """A Ray Train worker: the loop, with DDP from Train's helper. Given a relay (`hold`),
    it starts an epoch only once Tune has asked for it."""
    log_to_stderr()
    config = loop_config["config"]
    splits = ray.get(loop_config["splits_ref"])
    relay = loop_config["hold"]
    send = _report_to(ray.train.report, ray.train.Checkpoint)

    def report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        send(metrics, checkpoint_dir)
        if relay is not None and not metrics[DIVERGED] and metrics[EPOCH] < config.train.epochs:
            ray.get(relay.wait_to_start.remote(metrics[EPOCH] + 1))

    with _resume_from(ray.train.get_checkpoint()) as resume_from:
        train(config, splits, report, resume_from=resume_from,
              runtime=select_runtime(ray.train.torch.get_device(),
                                     config.train.cudnn_benchmark),
              prepare_model=partial(ray.train.torch.prepare_model, move_to_device=False),
              started_at=loop_config["started_at"])


def torch_trial(params: dict[str, Any], *, base: Config, splits_ref: list,
                resources: Resources, train_storage: str) -> None:
    """One trial as a Ray Train run, whose epochs reach Tune through an `EpochRelay`.
    Re-running it under the same run name resumes from the run's newest checkpoint.

    Under ASHA the workers wait for Tune's word after each epoch (a poll of Train's
    controller and a round trip to Tune); FIFO stops no trial early, so they do not wait."""
    started_at = time.time()
    config = trial_config(base, params)
    search = config.search
    relay = EpochRelay.remote()
    trainer = ray.train.torch.TorchTrainer(
        train_worker,
        train_loop_config={"config": config, "splits_ref": splits_ref[0],
                           "hold": relay if search.scheduler == "asha" else None,
                           "started_at": started_at},
        scaling_config=ray.train.ScalingConfig(
            num_workers=resources.workers, use_gpu=resources.gpus_per_worker > 0,
            resources_per_worker=resources.worker_bundle()),
        run_config=ray.train.RunConfig(
            name=train_run_name(tune.get_context().get_trial_id()), storage_path=train_storage,
            callbacks=[RelayCallback(relay)],
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=search.num_to_keep, checkpoint_score_attribute=METRIC,
                checkpoint_score_order=MODE),
            failure_config=ray.train.FailureConfig(max_failures=search.max_failures)),
    )
    failure: list[BaseException] = []

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as error:  # noqa: BLE001 - raised again in the trial below
            failure.append(error)
        finally:
            relay.put.remote(None)  # the end, after every epoch's metrics

    threading.Thread(target=fit, name="train-run", daemon=True).start()
    while (metrics := ray.get(relay.take.remote())) is not None:
        tune.report(metrics)  # returns when Tune asks for the next epoch; never if it stops
        relay.allow.remote(metrics[EPOCH] + 1)
    if failure:
        raise failure[0]


def make_trainable(base: Config, splits_ref: ray.ObjectRef, resources: Resources,
                   experiment: Folder):
    """The Tune trainable; constants reach it by parameter, never through the search space.
    The data goes once into the object store (a list keeps Tune from resolving the ref)."""
    if resources.local:
        fn = tune.with_parameters(local_trial, base=base, splits_ref=[splits_ref])
    else:
        fn = tune.with_parameters(torch_trial, base=base, splits_ref=[splits_ref],
                                  resources=resources,
                                  train_storage=(experiment / TRAIN_RUNS).uri)
    return tune.with_resources(fn, resources.trial_bundle())


class DivergenceStopper(tune.Stopper):
    """Ends a trial at the report flagged `diverged` (its val_acc is a finite 0.0, never NaN:
    Optuna would keep a NaN trial running forever)."""

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        return bool(result.get(DIVERGED))

    def stop_all(self) -> bool:
        return False
