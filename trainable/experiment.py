"""The experiment's contract: the folder `<storage>/<name>/` as the study writes it and the
analysis reads it. Its file and folder names (a trial's and a Train run's built and parsed by
one pair of functions each), the metric the study maximises, a trial's role, and `Folder`, on
local disk or in a bucket, with how a file is written there whole.

It sits at the bottom of the import order, beside the loop that names the metric: `study`
(which writes) and `analysis` (which reads) both import it, and it imports neither.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow
import pyarrow.fs

from trainable.errors import first_line

if TYPE_CHECKING:
    import pandas as pd

LR_FINDER_JSON = "lr_finder.json"  # the range test: suggested_lr, lrs, losses, settings
LR_FINDER_PNG = "lr_finder.png"  # its curve, the estimate marked
STUDY_JSON = "study.json"  # resolved config, search space, estimate, seeds, versions, commit
RESULTS_CSV = "results.csv"  # one row per trial
OPTUNA_DB = "optuna.db"  # the Optuna study (SQLite): optuna-dashboard sqlite:///.../optuna.db
TRAIN_RUNS = "train"  # Ray Train runs of the TorchTrainer path: train/train-<trial id>/
CONFIRM_DIR = "confirm"  # the confirmation runs' own Tune experiment (--confirm-seeds)
REPORT_DIR = "report"  # what `python -m analysis` writes
TUNE_STATE = "experiment_state-*.json"  # Tune's saved state, in each Tune experiment's folder

METRIC, MODE = "val_acc", "max"  # what the study maximises, and which checkpoints it keeps
EPOCH = "epoch"  # the metric that counts epochs: ASHA's time, every figure's x axis
DIVERGED = "diverged"  # the flag of the report where a loss went non-finite
STARTUP_S = "startup_s"  # a run's seconds from the trial's start to its first step
SEARCHED = ("max_lr", "peak_epoch")  # TrainConfig fields the search sets per trial
TRIAL_PREFIX = "trial_"  # a Tune trial's folder: trial_<trial id>
TRAIN_RUN_PREFIX = "train-"  # a trial's Ray Train run, under TRAIN_RUNS: train-<trial id>


def trial_folder(trial_id: str) -> str:
    return f"{TRIAL_PREFIX}{trial_id}"


def trial_id_of_folder(path: str) -> str:
    """The trial id of a trial folder's path or name (`trial_folder`'s inverse)."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    if not name.startswith(TRIAL_PREFIX):
        raise ValueError(f"{path}: not a trial folder ({TRIAL_PREFIX}<id>)")
    return name.removeprefix(TRIAL_PREFIX)


def train_run_name(trial_id: str) -> str:
    return f"{TRAIN_RUN_PREFIX}{trial_id}"


def one_per_epoch(frame: pd.DataFrame) -> pd.DataFrame:
    """Per-epoch reports in epoch order, one per epoch: of an epoch reported twice (a resumed
    trial runs it again) the later report."""
    return frame.drop_duplicates(EPOCH, keep="last").sort_values(EPOCH).reset_index(drop=True)


def without_diverged(frame: pd.DataFrame) -> pd.DataFrame:
    """The reports of epochs that trained: the one flagged diverged dropped."""
    if DIVERGED not in frame:
        return frame
    return frame[~frame[DIVERGED].fillna(False).astype(bool)]


class Role(StrEnum):
    """What a trial was for, in results.csv."""

    SEARCH = "search"  # suggested by the search
    RACE = "race"  # the incumbent's config again, on the next seed, within the search
    CONFIRM = "confirm"  # a search trial's config again, with another seed, after the search


RACES = "races"  # a race's Tune param: the trial whose config it runs again
SEARCH_ROLES = (Role.SEARCH, Role.RACE)  # the search experiment's trials
RACE_ATTRS = ("role", "seed")  # a race's Optuna user attributes: Role.RACE, its train.seed


def role_of(params: dict[str, Any], role: Role) -> Role:
    """A trial's role, from its Tune params, in an experiment of `role`'s."""
    return Role.RACE if RACES in params else role


@contextlib.contextmanager
def written_whole(path: Path) -> Iterator[Path]:
    """A path beside `path` to write a file or a folder to, renamed to `path` (replacing it)
    once the block ends without error: a crash never leaves half of one, and readers see
    either the old one or the new one."""
    partial = path.with_name(path.name + ".partial")
    if partial.is_dir():  # left by a crash
        shutil.rmtree(partial)
    yield partial
    if partial.is_dir() and path.exists():  # os.replace renames over empty folders only
        shutil.rmtree(path)
    os.replace(partial, path)


class StorageError(ValueError):
    """A storage location that cannot be used, said in one line."""


@dataclass(frozen=True)
class Folder:
    """A folder on local disk or in a bucket: what `--storage` names (a path, or a URI that
    pyarrow's filesystems resolve: s3://, gs://, with an endpoint from AWS_ENDPOINT_URL), and
    every folder under it. Ray takes `uri`; reads and writes go through `filesystem`."""

    uri: str  # an absolute local path, or scheme://bucket/path[?options]
    filesystem: pyarrow.fs.FileSystem
    path: str  # the folder in `filesystem`

    @classmethod
    def at(cls, location: str | os.PathLike) -> Folder:
        location = str(location)
        if "://" not in location:
            local = str(Path(location).resolve())
            return cls(local, pyarrow.fs.LocalFileSystem(), local)
        try:
            filesystem, path = pyarrow.fs.FileSystem.from_uri(location)
        except (ValueError, OSError) as err:  # pyarrow's ArrowInvalid is a ValueError
            raise StorageError(f"{location}: not a storage URI pyarrow can open "
                               f"({first_line(err)})") from None
        if not path.strip("/"):
            raise StorageError(f"{location}: names no bucket (e.g. s3://bucket/runs)")
        base, sep, options = location.partition("?")
        return cls(base.rstrip("/") + sep + options, filesystem, path.rstrip("/"))

    @property
    def is_local(self) -> bool:
        return isinstance(self.filesystem, pyarrow.fs.LocalFileSystem)

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    def __str__(self) -> str:
        return self.uri

    def __truediv__(self, name: str) -> Folder:
        return Folder(self.uri_of(f"{self.path}/{name}"), self.filesystem,
                      f"{self.path}/{name}")

    @property
    def parent(self) -> Folder:
        path = self.path.rsplit("/", 1)[0] or "/"
        return Folder(self.uri_of(path), self.filesystem, path)

    def uri_of(self, path: str) -> str:
        """The URI of `path` in this folder's filesystem (options such as an endpoint kept)."""
        if self.is_local:
            return path
        scheme = self.uri.split("://", 1)[0]
        options = self.uri.partition("?")[2]
        return f"{scheme}://{path}" + (f"?{options}" if options else "")

    def _info(self, name: str = "") -> pyarrow.fs.FileInfo:
        return self.filesystem.get_file_info(f"{self.path}/{name}" if name else self.path)

    def exists(self, name: str = "") -> bool:
        return self._info(name).type != pyarrow.fs.FileType.NotFound

    def is_file(self, name: str) -> bool:
        return self._info(name).type == pyarrow.fs.FileType.File

    def is_dir(self, name: str = "") -> bool:
        return self._info(name).type == pyarrow.fs.FileType.Directory

    def names(self, pattern: str) -> list[str]:
        """The names in this folder that match `pattern`, sorted; none if it is absent."""
        found = self.filesystem.get_file_info(
            pyarrow.fs.FileSelector(self.path, allow_not_found=True))
        return sorted(info.base_name for info in found if fnmatch.fnmatch(info.base_name, pattern))

    def read_text(self, name: str) -> str:
        with self.filesystem.open_input_stream(f"{self.path}/{name}") as stream:
            return stream.read().decode()

    def write_text(self, name: str, text: str) -> None:
        with self.written(name) as partial:
            partial.write_text(text)

    @contextlib.contextmanager
    def written(self, name: str) -> Iterator[Path]:
        """A local path to write the file or folder `name` to, which then replaces `name` here.
        On local disk, renamed into place: a crash never leaves half of one. In a bucket, a
        file is one upload, which is as whole; a folder is its files uploaded after the old
        ones are removed, in no fixed order (object stores rename nothing)."""
        if self.is_local:
            with written_whole(Path(self.path) / name) as partial:
                yield partial
            return
        with tempfile.TemporaryDirectory(prefix="onecycle-upload-") as scratch:
            partial = Path(scratch) / name
            yield partial
            target = f"{self.path}/{name}"
            if partial.is_dir() and self.exists(name):
                self.filesystem.delete_dir(target)
            pyarrow.fs.copy_files(str(partial), target,
                                  source_filesystem=pyarrow.fs.LocalFileSystem(),
                                  destination_filesystem=self.filesystem)

    @contextlib.contextmanager
    def local_copy(self, name: str) -> Iterator[Path]:
        """The file or folder `name` as a local path: itself on local disk, else a temporary
        download, removed after the block."""
        if self.is_local:
            yield Path(self.path) / name
            return
        with tempfile.TemporaryDirectory(prefix="onecycle-download-") as scratch:
            copy = Path(scratch) / name
            download(self.filesystem, f"{self.path}/{name}", copy)
            yield copy

    def remove(self) -> None:
        self.filesystem.delete_dir(self.path)

    def make(self) -> None:
        self.filesystem.create_dir(self.path, recursive=True)

    def cache(self) -> Path:
        """A driver-side folder for what cannot live in a bucket (the Optuna database) or is
        read locally (a copy of the report): the same path on every machine for the same URI,
        since the searcher's saved state names the database's path."""
        digest = hashlib.sha256(self.uri.encode()).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / "onecycle-study" / f"{self.name}-{digest}"


def download(filesystem: pyarrow.fs.FileSystem, source: str, copy: Path) -> None:
    """The file or folder `source` of `filesystem` to the local path `copy`."""
    if filesystem.get_file_info(source).type == pyarrow.fs.FileType.Directory:
        copy.mkdir(parents=True)  # pyarrow makes the folders below, not this one
    pyarrow.fs.copy_files(source, str(copy), source_filesystem=filesystem,
                          destination_filesystem=pyarrow.fs.LocalFileSystem())


def optuna_db(experiment: Folder) -> Path:
    """The Optuna study's SQLite file: in the experiment's folder on local disk; for a bucket,
    on the driver (SQLite cannot live in a bucket), copied there by `study.search.OptunaCopy`."""
    return Path(experiment.path) / OPTUNA_DB if experiment.is_local \
        else experiment.cache() / OPTUNA_DB


def optuna_url(experiment: Folder) -> str:
    """The SQLAlchemy URL of an experiment's Optuna study."""
    return f"sqlite:///{optuna_db(experiment)}"
