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
# Set by Ray's job supervisor for a submitted entrypoint: its runtime env and its metadata
# (ray.dashboard.modules.job.job_supervisor); Ray itself is not imported to read it.
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
JOB_ID_KEY = "job_submission_id"
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
    resume_if_exists: bool = False  # start the experiment, or resume it if it exists
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
class Job:
    """The Ray job this driver is the entrypoint of (`ray job submit`, a KubeRay RayJob)."""

    submission_id: str
    working_dir: Path | None  # Ray's unpacked copy of --working-dir (its cache), if uploaded


def ray_job(environ: dict[str, str] | None = None) -> Job | None:
    """The job this process runs in, from what the job supervisor set; None outside a job."""
    raw = (os.environ if environ is None else environ).get(JOB_CONFIG_ENV)
    if not raw:
        return None
    try:
        job = json.loads(raw)
    except ValueError:
        return None
    uploaded = bool((job.get("runtime_env") or {}).get("working_dir"))
    # The supervisor starts the entrypoint in the unpacked copy.
    return Job(str((job.get("metadata") or {}).get(JOB_ID_KEY, "unknown")),
               Path.cwd() if uploaded else None)


@dataclass(frozen=True)
class Launch:
    """Where and how the trials run: what `bind` needs, and a resume must repeat."""

    local: bool  # each trial's loop in its Tune trainable, no TorchTrainer
    workers: int  # Ray Train workers per trial
    cpus_per_worker: float | None  # None: 1 less the trial driver's share
    gpus_per_trial: float | None  # None: 1 when the cluster has GPUs and not local
    address: str | None  # --address: a running cluster; None: see `join`
    dashboard_host: str
    job: Job | None = None  # the Ray job this driver runs in

    @property
    def join(self) -> str | None:
        """The cluster to join: --address; in a job, the job's own ('auto' reads the
        RAY_ADDRESS its supervisor set); else None, a Ray of the study's own."""
        return self.address or ("auto" if self.job else None)


@dataclass(frozen=True)
class Plan:
    config: Config
    experiment: Folder  # <storage>/<name>, on local disk or in a bucket
    resume: bool
    launch: Launch
    dry_run: bool
    report: bool  # the report at the end
    tracking: Tracking | None  # an MLflow tracking server the study is sent to
    finished: bool = False  # a resumed study whose every trial had ended


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


def resolve(request: Request, job: Job | None = None) -> Plan:
    """The config, the experiment folder and the launch, all checked; nothing written.
    `job`: the Ray job this driver runs in (default: read from the environment)."""
    job = job if job is not None else ray_job()
    if request.resume and request.resume_if_exists:
        raise BadInput("--resume and --resume-if-exists exclude each other: "
                       "--resume-if-exists already resumes an existing experiment")
    for flag, given in (("--resume", request.resume),
                        ("--resume-if-exists", request.resume_if_exists)):
        if given and request.overwrite:
            raise BadInput(f"{flag} and --overwrite exclude each other")
        if given and not request.name:
            raise BadInput(f"{flag} needs --name of the experiment to continue")
    name = request.name or datetime.datetime.now(datetime.UTC).strftime("study-%Y%m%dT%H%M%SZ")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise BadInput(f"--name {name!r}: must be a plain folder name "
                       "(letters, digits, '.', '_', '-'; not starting with '.' or '-')")
    if job is not None:
        check_outside_copy(job, "--storage", request.storage)
    try:
        storage = Folder.at(request.storage)
    except StorageError as err:
        raise BadInput(str(err)) from None
    if not storage.is_local:
        check_bucket(storage)
    experiment = storage / name
    record = None
    if request.resume or (request.resume_if_exists and experiment.is_file(STUDY_JSON)):
        if not experiment.is_file(STUDY_JSON):
            raise BadInput(f"{experiment}: no experiment to resume ({STUDY_JSON} missing)")
        record = read_record(experiment)
    launch = _launch(request, job, record)
    config = _config(request, experiment, record)
    if job is not None:
        check_outside_copy(job, "--data-dir (data.dir)", config.data.dir)
    if config.train.batch_size % launch.workers:
        raise BadInput(f"train.batch_size={config.train.batch_size} (the global batch) does not "
                       f"split evenly over --workers-per-trial={launch.workers}")
    if storage.is_local:
        check_disk(Path(experiment.path), config)
    tracking = check_tracking(request)
    return Plan(config, experiment, record is not None, launch, request.dry_run,
                report=not request.no_report, tracking=tracking,
                finished=bool(record and record.finished))


def check_outside_copy(job: Job, flag: str, location: str) -> None:
    """Refuse, in a job, a folder inside Ray's copy of the working dir: a cache on the head
    node, shared by the jobs with the same files, evicted when full and gone with the
    session."""
    if job.working_dir is None or "://" in location:
        return
    path = Path(location).resolve()
    if path.is_relative_to(job.working_dir.resolve()):
        raise BadInput(f"{flag} {location}: inside this Ray job's copy of its working dir "
                       f"({job.working_dir}), Ray's cache, which loses it; give an absolute "
                       "path on storage every node shares, or a bucket URI (s3://...)")


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


def _launch(request: Request, job: Job | None, record: StudyRecord | None) -> Launch:
    """The launch the flags ask for; on resume, the recorded one, which a flag may repeat but
    not contradict."""
    if request.local and request.workers_per_trial is not None:
        raise BadInput("--local runs each trial in one process: drop --workers-per-trial")
    workers, cpus, gpus = request.workers_per_trial, request.cpus_per_worker, \
        request.gpus_per_trial
    if workers is not None and workers < 1:
        raise BadInput(f"--workers-per-trial={workers}: must be at least 1")
    if cpus is not None and not 0 < cpus < math.inf:
        raise BadInput(f"--cpus-per-worker={cpus}: must be positive")
    if gpus is not None and not 0 <= gpus < math.inf:
        raise BadInput(f"--gpus-per-trial={gpus}: must be 0 or more")
    if record is not None:
        return recorded_launch(request, job, record)
    return Launch(request.local, 1 if workers is None else workers, cpus, gpus,
                  request.address, request.dashboard_host, job)


def recorded_launch(request: Request, job: Job | None, record: StudyRecord) -> Launch:
    """How the experiment's trials ran (study.json), with each flag given checked against it."""
    local = record.path == "local"
    workers = record.workers_per_trial
    per_trial = record.resources_per_trial
    cpus = (per_trial["CPU"] - (0.0 if local else DRIVER_CPU)) / workers
    gpus = per_trial.get("GPU", 0.0)
    path = "the local path (--local)" if local else "the TorchTrainer path"
    said = {
        "--local": (request.local or None, local or None, path),
        "--workers-per-trial": (request.workers_per_trial, workers,
                                f"{workers} worker{'s' * (workers > 1)} per trial"),
        "--cpus-per-worker": (request.cpus_per_worker, cpus, f"{cpus:g} CPUs per worker"),
        "--gpus-per-trial": (request.gpus_per_trial, gpus, f"{gpus:g} GPUs per trial"),
    }
    for flag, (given, recorded, described) in said.items():
        if given is not None and (recorded is None or not math.isclose(given, recorded)):
            raise BadInput(f"{flag}: the experiment ran on {described} ({STUDY_JSON}); a "
                           "resume keeps how it was launched: drop the flag")
    return Launch(local, workers, None if local else cpus, gpus, request.address,
                  request.dashboard_host, job)


def _config(request: Request, experiment: Folder, record: StudyRecord | None) -> Config:
    """A new study's config (file, flags, --set), or the resumed one's own: with
    --resume-if-exists, the one the flags give must be the recorded one."""
    overrides = list(request.overrides)
    for flag, key in ((request.data_dir, "data.dir"), (request.num_samples, "search.num_samples"),
                      (request.scheduler, "search.scheduler"),
                      (request.confirm_seeds, "search.confirm_seeds")):
        if flag is not None:
            overrides.append(f"{key}={json.dumps(flag)}")
    if request.resume:
        if overrides or request.config is not None:
            raise BadInput("--resume continues with the experiment's own config: "
                           "drop --config, --set and the flags that change it")
        return record.config
    if experiment.exists() and not request.overwrite and record is None:
        raise BadInput(f"{experiment}: experiment exists; use --resume to continue it "
                       "or --overwrite to replace it")
    config = load_config(request.config or DEFAULT_CONFIG, overrides)
    if config.peak_epoch_range[1] > config.train.epochs:
        raise BadInput(f"train.epochs={config.train.epochs}: a study needs at least 2 "
                       "epochs to search the peak epoch")
    # Absolute, so that trials on other processes and the report find the data.
    config = config.replace("data", dir=str(Path(config.data.dir).resolve()))
    if record is None:
        return config
    if config.search.confirm_seeds is None:  # the default the study decided (`bind`)
        config = config.replace("search", confirm_seeds=record.config.search.confirm_seeds)
    difference = first_difference(dump_config(record.config), dump_config(config))
    if difference is not None:
        raise BadInput(f"--resume-if-exists: {experiment} was started with another config: "
                       f"{difference}; give its config and flags, or another --name")
    return record.config


def first_difference(recorded: dict[str, Any], given: dict[str, Any], prefix: str = ""
                     ) -> str | None:
    """The first key, in the config's order, whose value differs, said as `key is A in
    study.json, B now`; None when they are the same."""
    for key, there in recorded.items():
        here = given.get(key)
        if isinstance(there, dict) and isinstance(here, dict):
            found = first_difference(there, here, f"{prefix}{key}.")
            if found is not None:
                return found
        elif there != here:
            return f"{prefix}{key} is {json.dumps(there)} in {STUDY_JSON}, {json.dumps(here)} now"
    return None


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


def storage_note(plan: Plan, nodes: int) -> str | None:
    """What a cluster of `nodes` asks of a local --storage: every node writes checkpoints
    there, so Tune needs it shared (since Ray 2.7 it no longer syncs nodes' folders)."""
    if nodes < 2 or not plan.experiment.is_local:
        return None
    return (f"--storage {plan.experiment.parent} is a local path on a cluster of {nodes} "
            "nodes: it must be the same shared folder (NFS) on every node, or use a bucket")


def print_plan(plan: Plan, bound: Bound, cost: dict[str, Any], note: str | None) -> None:
    """The plan as JSON, with the cost estimate (`said`: as a study prints it) and what the
    cluster asks of the storage (`note`)."""
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
        "ray_job": plan.launch.job.submission_id if plan.launch.job else None,
        "storage_note": note,
        "cost_estimate": cost,
    }, indent=2))
