"""A study's plan: the config, the experiment folder and the trial's resources, all checked
before Ray starts or anything is written. Bad input raises `BadInput`, printed as one line."""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs
import torch

from analysis.experiment import STUDY_JSON, Folder, StorageError, first_line
from study.search import choose_sampler, describe_space
from study.trial import DRIVER_CPU, Resources
from trainable.config import Config, from_dict, load_config, to_dict
from trainable.constants import DEFAULT_CONFIG
from trainable.model import build_model


class BadInput(ValueError):
    """Input refused before any work: printed as one line, exit code 2."""


@dataclass(frozen=True)
class Plan:
    config: Config
    experiment: Folder  # <storage>/<name>, on local disk or in a bucket
    resume: bool


def workers_per_trial(args: argparse.Namespace) -> int:
    return 1 if args.workers_per_trial is None else args.workers_per_trial


def resolve(args: argparse.Namespace) -> Plan:
    """The config and the experiment directory, all checked; nothing written."""
    if args.local and args.workers_per_trial is not None:
        raise BadInput("--local runs each trial in one process: drop --workers-per-trial")
    workers = workers_per_trial(args)
    if workers < 1:
        raise BadInput(f"--workers-per-trial={workers}: must be at least 1")
    if args.cpus_per_worker is not None and not 0 < args.cpus_per_worker < math.inf:
        raise BadInput(f"--cpus-per-worker={args.cpus_per_worker}: must be positive")
    if args.gpus_per_trial is not None and not 0 <= args.gpus_per_trial < math.inf:
        raise BadInput(f"--gpus-per-trial={args.gpus_per_trial}: must be 0 or more")
    if args.resume and args.overwrite:
        raise BadInput("--resume and --overwrite exclude each other")
    if args.resume and not args.name:
        raise BadInput("--resume needs --name of the experiment to continue")

    name = args.name or datetime.datetime.now(datetime.UTC).strftime("study-%Y%m%dT%H%M%SZ")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise BadInput(f"--name {name!r}: must be a plain folder name "
                       "(letters, digits, '.', '_', '-'; not starting with '.' or '-')")
    try:
        storage = Folder.at(args.storage)
    except StorageError as err:
        raise BadInput(str(err)) from None
    if not storage.is_local:
        check_bucket(storage)
    experiment = storage / name

    overrides = list(args.overrides)
    for flag, key in ((args.data_dir, "data.dir"), (args.num_samples, "search.num_samples"),
                      (args.scheduler, "search.scheduler"),
                      (args.confirm_seeds, "search.confirm_seeds")):
        if flag is not None:
            overrides.append(f"{key}={json.dumps(flag)}")
    if args.resume:
        if not experiment.is_file(STUDY_JSON):
            raise BadInput(f"{experiment}: no experiment to resume ({STUDY_JSON} missing)")
        if overrides or args.config is not None:
            raise BadInput("--resume continues with the experiment's own config: "
                           "drop --config, --set and the flags that change it")
        config = from_dict(json.loads(experiment.read_text(STUDY_JSON))["config"])
    else:
        if experiment.exists() and not args.overwrite:
            raise BadInput(f"{experiment}: experiment exists; use --resume to continue it "
                           "or --overwrite to replace it")
        config = load_config(args.config or DEFAULT_CONFIG, overrides)
        if config.peak_epoch_range[1] > config.train.epochs:
            raise BadInput(f"train.epochs={config.train.epochs}: a study needs at least 2 "
                           "epochs to search the peak epoch")
        # Absolute, so that trials on other processes and the report find the data.
        config = config.replace("data", dir=str(Path(config.data.dir).resolve()))
    if config.train.batch_size % workers:
        raise BadInput(f"train.batch_size={config.train.batch_size} (the global batch) does not "
                       f"split evenly over --workers-per-trial={workers}")
    if storage.is_local:
        check_disk(Path(experiment.path), config)
    return Plan(config, experiment, args.resume)


def checkpoint_bytes(config: Config) -> int:
    """Bytes of one trial checkpoint: the model's state and SGD's momentum, one per weight."""
    model = build_model(config.model.name)
    tensors = list(model.state_dict().values()) + list(model.parameters())
    return sum(t.numel() * t.element_size() for t in tensors)


def check_bucket(storage: Folder) -> None:
    """Refuse a bucket URI the study could not write to: unreachable, no such bucket, or
    writing refused. A probe file is written under `storage` and removed, with the empty
    folders its removal would leave (object stores keep a marker for them). A bucket's free
    space is not checked: it has no such figure."""
    bucket = storage.path.split("/", 1)[0]
    filesystem = storage.filesystem
    try:
        if filesystem.get_file_info(bucket).type == pyarrow.fs.FileType.NotFound:
            raise BadInput(f"{storage}: there is no bucket {bucket!r}; create it first")
        folders = storage.path.split("/")
        absent = [p for p in ("/".join(folders[:i]) for i in range(2, len(folders) + 1))
                  if filesystem.get_file_info(p).type == pyarrow.fs.FileType.NotFound]
        probe = f"{storage.path}/.onecycle-write-check-{uuid.uuid4().hex}"
        with filesystem.open_output_stream(probe):
            pass
        filesystem.delete_file(probe)
        for folder in reversed(absent):  # deepest first: each removal marks its parent
            if not filesystem.get_file_info(pyarrow.fs.FileSelector(folder)):
                filesystem.delete_dir(folder)
    except OSError as err:
        raise BadInput(f"{storage}: cannot use it ({first_line(err)})") from None


def check_disk(experiment_dir: Path, config: Config) -> None:
    """Refuse a local folder the study could not finish in: not a writable folder, or with
    less free space than every trial's kept checkpoints (a full disk mid-study loses trials)."""
    existing = next(p for p in (experiment_dir, *experiment_dir.parents) if p.exists())
    if not existing.is_dir():
        raise BadInput(f"{existing}: not a folder, so it cannot hold the experiment")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise BadInput(f"{existing}: cannot write there ({err.strerror})") from None
    search = config.search
    each = checkpoint_bytes(config)
    need = search.num_samples * search.num_to_keep * each
    free = shutil.disk_usage(existing).free
    if free < need:
        raise BadInput(f"{existing}: {free / 1e9:.2f} GB free, the study's checkpoints need "
                       f"{need / 1e9:.2f} GB ({search.num_samples} trials x "
                       f"{search.num_to_keep} kept x {each / 1e6:.0f} MB); free space or "
                       "lower search.num_samples or search.num_to_keep")


def this_machine() -> dict[str, float]:
    """The resources the Ray this study starts will have (it is told them), known before it
    starts, so that a trial too big for them is refused first."""
    return {"CPU": float(len(os.sched_getaffinity(0))),
            "GPU": float(torch.cuda.device_count())}


def trial_resources(args: argparse.Namespace, cluster: dict[str, float]) -> Resources:
    gpus = args.gpus_per_trial
    if gpus is None:
        gpus = 1.0 if cluster.get("GPU", 0) and not args.local else 0.0
    if gpus and not cluster.get("GPU", 0):
        raise BadInput(f"--gpus-per-trial={gpus}: the cluster has no GPU")
    if gpus > cluster.get("GPU", 0):
        raise BadInput(f"--gpus-per-trial={gpus}: the cluster has only {cluster['GPU']:g} "
                       "GPUs; the trial would wait forever")
    workers = workers_per_trial(args)
    if args.local:
        cpus = 1.0
    elif args.cpus_per_worker is None:
        cpus = 1.0 - DRIVER_CPU / workers
    else:
        cpus = args.cpus_per_worker
    resources = Resources(workers, cpus, gpus / workers, args.local)
    for kind, need in resources.per_trial().items():
        if need > cluster.get(kind, 0):
            raise BadInput(f"one trial needs {need:g} {kind} ({resources.workers} workers) but "
                           f"the cluster has {cluster.get(kind, 0):g}; the trial would wait "
                           "forever")
    return resources


def trials_at_once(resources: Resources, cluster: dict[str, float], max_concurrent: int) -> int:
    fits = min(math.floor(cluster.get(kind, 0) / need + 1e-9)
               for kind, need in resources.per_trial().items() if need)
    return min(fits, max_concurrent)


def print_plan(plan: Plan, resources: Resources, at_once: int, cost: dict[str, Any]) -> None:
    """The plan as JSON, with the cost estimate (`said`: as a study prints it)."""
    config = plan.config
    print(json.dumps({
        "experiment": str(plan.experiment),
        "config": to_dict(config),
        "search_space": describe_space(config, None),
        "sampler": choose_sampler(config).describe(),
        "trials": config.search.num_samples,
        "confirmation_runs": config.search.confirm_top * (config.search.confirm_seeds or 0),
        "resources_per_trial": resources.per_trial(),
        "workers_per_trial": resources.workers,
        "batch_size_per_worker": config.train.batch_size // resources.workers,
        "path": "local (loop in the Tune trainable)" if resources.local else "TorchTrainer",
        "max_concurrent": config.search.max_concurrent,
        "trials_fitting_at_once": at_once,
        "cost_estimate": cost,
    }, indent=2))
