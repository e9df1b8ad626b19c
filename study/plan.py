"""A study's plan: what the command line asked for, checked and resolved into the config, the
experiment folder and how trials run, before Ray starts or anything is written; then bound to
a cluster's resources. Bad input raises `BadInput`, printed as one line.

No Ray Tune, Ray Train or Optuna here, and torch only for the last checks (the disk's, this
machine's GPUs): a typo is refused at once."""

from __future__ import annotations

import datetime
import importlib.util
import json
import math
import os
import re
import shutil
import tempfile
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs
import pydantic

from study.space import choose_sampler, default_confirm_seeds, search_space
from trainable.config import Config, dump_config, load_config
from trainable.constants import DEFAULT_CONFIG
from trainable.errors import first_line
from trainable.experiment import STUDY_JSON, Folder, StorageError
from trainable.record import StudyRecord

# CPUs the Tune trainable that drives a TorchTrainer holds; {"CPU": 0} is refused.
DRIVER_CPU = 0.01
MLFLOW_URI_ENV = "MLFLOW_TRACKING_URI"  # mlflow's own variable
TRACKING_TIMEOUT_S = 5  # for the tracking server's first answer


class BadInput(ValueError):
    """Input refused before any work: printed as one line, exit code 2."""


@dataclass(frozen=True)
class Request:
    """The command line as the user gave it (study/run.py's flags; None: not given)."""

    config: str | None = None
    overrides: tuple[str, ...] = ()  # --set section.key=value
    data_dir: str | None = None
    num_samples: int | None = None
    scheduler: str | None = None
    confirm_seeds: int | None = None
    storage: str = "runs"
    name: str | None = None
    resume: bool = False
    overwrite: bool = False
    local: bool = False
    workers_per_trial: int | None = None
    cpus_per_worker: float | None = None
    gpus_per_trial: float | None = None
    address: str | None = None
    dashboard_host: str = "127.0.0.1"
    dry_run: bool = False
    no_report: bool = False
    mlflow: str | None = None  # a tracking server; else MLFLOW_TRACKING_URI, if set


@dataclass(frozen=True)
class Launch:
    """Where and how the trials run: what `bind` needs, and a resume must repeat."""

    local: bool  # each trial's loop in its Tune trainable, no TorchTrainer
    workers: int  # Ray Train workers per trial
    cpus_per_worker: float | None  # None: 1 less the trial driver's share
    gpus_per_trial: float | None  # None: 1 when the cluster has GPUs and not local
    address: str | None  # a running cluster; None: a Ray of the study's own
    dashboard_host: str


@dataclass(frozen=True)
class Plan:
    config: Config
    experiment: Folder  # <storage>/<name>, on local disk or in a bucket
    resume: bool
    launch: Launch
    dry_run: bool
    report: bool  # the report at the end
    tracking: Tracking | None  # an MLflow tracking server the study is sent to


@dataclass(frozen=True)
class Tracking:
    uri: str  # as given: it may carry credentials, so it is never written down
    flag: bool  # given by --mlflow (else by MLFLOW_TRACKING_URI)

    @property
    def shown(self) -> str:
        """The URI without user and password: what may be printed."""
        parts = urllib.parse.urlsplit(self.uri)
        netloc = parts.hostname or ""
        if parts.port is not None:
            netloc += f":{parts.port}"
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


@dataclass(frozen=True)
class Resources:
    """What one trial asks of the cluster."""

    workers: int  # Ray Train workers (DDP processes); 1 and no TorchTrainer with --local
    cpus_per_worker: float
    gpus_per_worker: float
    local: bool

    def worker_bundle(self) -> dict[str, float]:
        bundle = {"CPU": self.cpus_per_worker}
        if self.gpus_per_worker:
            bundle["GPU"] = self.gpus_per_worker
        return bundle

    def trial_bundle(self) -> dict[str, float]:
        """The Tune trainable's own request: the whole trial with --local, else only the
        driver, whose workers Ray Train places."""
        return self.worker_bundle() if self.local else {"CPU": DRIVER_CPU}

    def per_trial(self) -> dict[str, float]:
        total = {k: v * self.workers for k, v in self.worker_bundle().items()}
        if not self.local:
            total["CPU"] += DRIVER_CPU
        return total


@dataclass(frozen=True)
class Bound:
    """A plan bound to a cluster: its config (the confirm-seeds default decided by the
    trials' device), a trial's resources, and how many trials fit at once."""

    config: Config
    resources: Resources
    at_once: int


def resolve(request: Request) -> Plan:
    """The config, the experiment folder and the launch, all checked; nothing written."""
    launch = _launch(request)
    if request.resume and request.overwrite:
        raise BadInput("--resume and --overwrite exclude each other")
    if request.resume and not request.name:
        raise BadInput("--resume needs --name of the experiment to continue")
    name = request.name or datetime.datetime.now(datetime.UTC).strftime("study-%Y%m%dT%H%M%SZ")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise BadInput(f"--name {name!r}: must be a plain folder name "
                       "(letters, digits, '.', '_', '-'; not starting with '.' or '-')")
    try:
        storage = Folder.at(request.storage)
    except StorageError as err:
        raise BadInput(str(err)) from None
    if not storage.is_local:
        check_bucket(storage)
    experiment = storage / name
    config = _config(request, experiment)
    if config.train.batch_size % launch.workers:
        raise BadInput(f"train.batch_size={config.train.batch_size} (the global batch) does not "
                       f"split evenly over --workers-per-trial={launch.workers}")
    if storage.is_local:
        check_disk(Path(experiment.path), config)
    tracking = check_tracking(request)
    return Plan(config, experiment, request.resume, launch, request.dry_run,
                report=not request.no_report, tracking=tracking)


def check_tracking(request: Request) -> Tracking | None:
    """The MLflow tracking server the study goes to, refused unless mlflow is installed and
    the server answers (its /health) now, before Ray starts."""
    uri = request.mlflow or os.environ.get(MLFLOW_URI_ENV) or None
    if uri is None:
        return None
    tracking = Tracking(uri, flag=request.mlflow is not None)
    said = "--mlflow" if tracking.flag else MLFLOW_URI_ENV
    try:
        parts = urllib.parse.urlsplit(uri)
        parts.port  # noqa: B018 - raises for a port that is not a number
    except ValueError as err:
        raise BadInput(f"{said}: not a URI ({first_line(err)})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadInput(f"{said} {tracking.shown!r}: expected a tracking server's URI, "
                       "http://host:port")
    if importlib.util.find_spec("mlflow") is None:
        raise BadInput(f"{said}: mlflow is not installed (pip install "
                       "'onecycle-study[mlflow]')")
    health = urllib.parse.urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/health",
                                                    query="", fragment=""))
    try:
        # An opener of its own: urlopen's global one keeps the proxies of its first use.
        opener = urllib.request.build_opener()
        with opener.open(health, timeout=TRACKING_TIMEOUT_S) as answer:
            answered = answer.status == 200
    except (OSError, ValueError) as err:
        raise BadInput(f"{said} {tracking.shown}: the tracking server does not answer "
                       f"({first_line(err)}); start it (mlflow server) or check the URI"
                       ) from None
    if not answered:
        raise BadInput(f"{said} {tracking.shown}: not a healthy MLflow server")
    return tracking


def _launch(request: Request) -> Launch:
    if request.local and request.workers_per_trial is not None:
        raise BadInput("--local runs each trial in one process: drop --workers-per-trial")
    workers = 1 if request.workers_per_trial is None else request.workers_per_trial
    if workers < 1:
        raise BadInput(f"--workers-per-trial={workers}: must be at least 1")
    cpus, gpus = request.cpus_per_worker, request.gpus_per_trial
    if cpus is not None and not 0 < cpus < math.inf:
        raise BadInput(f"--cpus-per-worker={cpus}: must be positive")
    if gpus is not None and not 0 <= gpus < math.inf:
        raise BadInput(f"--gpus-per-trial={gpus}: must be 0 or more")
    return Launch(request.local, workers, cpus, gpus, request.address, request.dashboard_host)


def _config(request: Request, experiment: Folder) -> Config:
    """A new study's config (file, flags, --set), or the resumed one's own."""
    overrides = list(request.overrides)
    for flag, key in ((request.data_dir, "data.dir"), (request.num_samples, "search.num_samples"),
                      (request.scheduler, "search.scheduler"),
                      (request.confirm_seeds, "search.confirm_seeds")):
        if flag is not None:
            overrides.append(f"{key}={json.dumps(flag)}")
    if request.resume:
        if not experiment.is_file(STUDY_JSON):
            raise BadInput(f"{experiment}: no experiment to resume ({STUDY_JSON} missing)")
        if overrides or request.config is not None:
            raise BadInput("--resume continues with the experiment's own config: "
                           "drop --config, --set and the flags that change it")
        return read_record(experiment).config
    if experiment.exists() and not request.overwrite:
        raise BadInput(f"{experiment}: experiment exists; use --resume to continue it "
                       "or --overwrite to replace it")
    config = load_config(request.config or DEFAULT_CONFIG, overrides)
    if config.peak_epoch_range[1] > config.train.epochs:
        raise BadInput(f"train.epochs={config.train.epochs}: a study needs at least 2 "
                       "epochs to search the peak epoch")
    # Absolute, so that trials on other processes and the report find the data.
    return config.replace("data", dir=str(Path(config.data.dir).resolve()))


def read_record(experiment: Folder) -> StudyRecord:
    try:
        return StudyRecord.read(experiment)
    except pydantic.ValidationError as err:
        raise BadInput(f"{experiment}: {STUDY_JSON} is not a study's record "
                       f"({first_line(err)})") from None


def checkpoint_bytes(config: Config) -> int:
    """Bytes of one trial checkpoint: the model's state and SGD's momentum, one per weight."""
    from trainable.model import build_model  # torch: only once the cheap checks have passed

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
    import torch

    return {"CPU": float(len(os.sched_getaffinity(0))),
            "GPU": float(torch.cuda.device_count())}


def bind(plan: Plan, cluster: dict[str, float]) -> Bound:
    """The plan against a cluster's resources (this machine's before Ray starts,
    `ray.cluster_resources()` after): a trial's resources, refused when they could never be
    met, how many trials fit at once, and the confirm-seeds default."""
    launch = plan.launch
    gpus = launch.gpus_per_trial
    if gpus is None:
        gpus = 1.0 if cluster.get("GPU", 0) and not launch.local else 0.0
    if gpus and not cluster.get("GPU", 0):
        raise BadInput(f"--gpus-per-trial={gpus}: the cluster has no GPU")
    if gpus > cluster.get("GPU", 0):
        raise BadInput(f"--gpus-per-trial={gpus}: the cluster has only {cluster['GPU']:g} "
                       "GPUs; the trial would wait forever")
    if launch.local:
        cpus = 1.0
    elif launch.cpus_per_worker is None:
        cpus = 1.0 - DRIVER_CPU / launch.workers
    else:
        cpus = launch.cpus_per_worker
    resources = Resources(launch.workers, cpus, gpus / launch.workers, launch.local)
    for kind, need in resources.per_trial().items():
        if need > cluster.get(kind, 0):
            raise BadInput(f"one trial needs {need:g} {kind} ({resources.workers} workers) but "
                           f"the cluster has {cluster.get(kind, 0):g}; the trial would wait "
                           "forever")
    fits = min(math.floor(cluster.get(kind, 0) / need + 1e-9)
               for kind, need in resources.per_trial().items() if need)
    config = plan.config
    if config.search.confirm_seeds is None:
        config = config.replace("search",
                                confirm_seeds=default_confirm_seeds(resources.gpus_per_worker))
    return Bound(config, resources, min(fits, config.search.max_concurrent))


def print_plan(plan: Plan, bound: Bound, cost: dict[str, Any]) -> None:
    """The plan as JSON, with the cost estimate (`said`: as a study prints it)."""
    config, resources = bound.config, bound.resources
    print(json.dumps({
        "experiment": str(plan.experiment),
        "config": dump_config(config),
        "search_space": search_space(config, None).model_dump(mode="json"),
        "sampler": choose_sampler(config).model_dump(exclude_none=True),
        "trials": config.search.num_samples,
        "confirmation_runs": config.search.confirm_top * config.search.confirm_seeds,
        "resources_per_trial": resources.per_trial(),
        "workers_per_trial": resources.workers,
        "batch_size_per_worker": config.train.batch_size // resources.workers,
        "path": "local (loop in the Tune trainable)" if resources.local else "TorchTrainer",
        "max_concurrent": config.search.max_concurrent,
        "trials_fitting_at_once": bound.at_once,
        "mlflow": plan.tracking.shown if plan.tracking else None,
        "cost_estimate": cost,
    }, indent=2))
