"""An experiment directory `<storage>/<name>/` as the study writes it and the analysis reads
it: its file names, what the study maximises, and how a file is written whole."""

import contextlib
import os
import shutil
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path

LR_FINDER_JSON = "lr_finder.json"  # the range test: suggested_lr, lrs, losses, settings
LR_FINDER_PNG = "lr_finder.png"  # its curve, the estimate marked
STUDY_JSON = "study.json"  # resolved config, search space, estimate, seeds, versions, commit
RESULTS_CSV = "results.csv"  # one row per trial
OPTUNA_DB = "optuna.db"  # the Optuna study (SQLite): optuna-dashboard sqlite:///.../optuna.db
TRAIN_RUNS = "train"  # Ray Train runs of the TorchTrainer path: train/train-<trial id>/
CONFIRM_DIR = "confirm"  # the confirmation runs' own Tune experiment (--confirm-seeds)
REPORT_DIR = "report"  # what `python -m analysis` writes

METRIC, MODE = "val_acc", "max"  # what the study maximises, and which checkpoints it keeps
SEARCHED = ("max_lr", "peak_epoch")  # TrainConfig fields the search sets per trial


class Role(StrEnum):
    """What a trial was for, in results.csv."""

    SEARCH = "search"  # suggested by the search
    CONFIRM = "confirm"  # a search trial's config again, with another seed


def optuna_url(experiment_dir) -> str:
    """The SQLAlchemy URL of an experiment's Optuna study."""
    return f"sqlite:///{experiment_dir}/{OPTUNA_DB}"


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
