"""The report on a study: its best trial, tested once, explained in figures and one HTML page.

Everything is built in `<experiment>/report.partial/` and renamed to `report/` only when
complete, so a report that exists is never half-written. For an experiment in a bucket it is
built in a temporary folder and uploaded when complete, and a copy is kept on this machine to
open in a browser."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
import pydantic
import torch
from torch import nn

from analysis import figures
from analysis.explain import TestEvaluation, evaluate_test, gradcam_maps, misclassified
from analysis.export import (
    CARD_FILE,
    CONFIG_YAML,
    MODEL_DIR,
    export_model,
    model_card,
    write_config,
)
from analysis.html import write_index
from analysis.pick import Pick
from analysis.results import Trial, load_trials, trial_table, winner
from analysis.trust import edge_check, seed_spread
from trainable.checkpoint import load_checkpoint
from trainable.config import Config, from_dict
from trainable.constants import CHECKPOINT_FILE
from trainable.data import Splits, load_splits, to_uint8_images, train_transform
from trainable.device import Runtime, select_runtime
from trainable.errors import first_line
from trainable.experiment import (
    EPOCH,
    LR_FINDER_JSON,
    METRIC,
    OPTUNA_DB,
    RACE_ATTRS,
    REPORT_DIR,
    SEARCH_ROLES,
    STUDY_JSON,
    TUNE_STATE,
    Folder,
    Role,
    StorageError,
    one_per_epoch,
    without_diverged,
)
from trainable.loop import make_optimizer, make_scheduler, steps_per_epoch
from trainable.model import build_model
from trainable.record import MODEL_FREE, Draws, Sampler, StudyRecord

# Figure files and their one-line captions, in the order the page shows them.
FIGURES = {
    "augmentations": ("augmentations.png", "Training images after the original's augmentation "
                      "(pad 4 with the mean, random crop, flip, one 8x8 hole), with labels."),
    "lr_finder": ("lr_finder.png", "LR range test: smoothed loss per LR, the estimate "
                  "(steepest descent) marked; the search centred on it."),
    "lr_schedule": ("lr_schedule.png", "The best trial's one-cycle LR per step, peaking at its "
                    "chosen epoch."),
    "curves": ("curves.png", "The best trial's loss and accuracy per epoch, training beside "
               "selection set."),
    "misclassified": ("misclassified.png", "Test images the best model gets wrong, the most "
                      "confident mistakes first: true class, predicted class, confidence."),
    "gradcam": ("gradcam.png", "GradCAM on layer4 for the predicted class of the same images, "
                "over the upsampled image, beside the image."),
    "confusion_matrix": ("confusion_matrix.png", "Confusion matrix of the best model on the "
                         "test set."),
    "trials": ("trials.png", "Accuracy per epoch of every trial, the best highlighted; stopped, "
               "diverged and failed trials marked where they ended."),
    "search_space": ("search_space.png", "Every search trial's best accuracy against its "
                     "max_lr and its peak_epoch, within the ranges searched (shaded); the LR "
                     "range test's estimate marked; confirmed configs as mean and standard "
                     "deviation over their seeds."),
    "importance": ("importance.png", "Optuna's parameter importances over the finished trials."),
}
SUMMARY_JSON = "summary.json"
MISCLASSIFIED_JSON = "misclassified.json"
MIN_TRIALS_FOR_IMPORTANCE = 4  # fANOVA over fewer points says nothing


class ReportError(ValueError):
    """An experiment that cannot be reported on; one line."""


def _check_experiment(experiment: Folder) -> StudyRecord:
    try:
        if not experiment.is_dir():
            raise ReportError(f"{experiment}: no such directory")
        if not experiment.is_file(STUDY_JSON) or not experiment.names(TUNE_STATE):
            raise ReportError(f"{experiment}: not an experiment directory (no {STUDY_JSON} "
                              "or no Tune experiment state)")
        return StudyRecord.read(experiment)
    except OSError as err:  # a bucket that cannot be reached or read
        raise ReportError(f"{experiment}: cannot read it ({first_line(err)})") from None
    except pydantic.ValidationError as err:
        raise ReportError(f"{experiment}: {STUDY_JSON} is not a study's record "
                          f"({first_line(err)})") from None


def _all_epochs(trial: Trial, checkpoint_state: dict[str, Any]) -> pd.DataFrame:
    """Every epoch of the trial: the checkpoint's own history (kept across resumes) joined
    with what Tune recorded (which restarts after a resume on the TorchTrainer path)."""
    frames = [pd.DataFrame(checkpoint_state["history"]), trial.history]
    return one_per_epoch(without_diverged(pd.concat([f for f in frames if len(f)],
                                                    ignore_index=True)))


def _lr_per_step(config: Config, steps_per_epoch: int) -> list[float]:
    optimizer = make_optimizer(nn.Linear(1, 1), config)
    scheduler = make_scheduler(optimizer, config, steps_per_epoch)
    lrs = []
    for _ in range(config.train.epochs * steps_per_epoch):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return lrs


def _from_optuna(experiment: Folder,
                 sampler: Sampler) -> tuple[dict[str, float] | str, Sampler | None]:
    """Optuna's importances (or why there are none), and how the sampler chose the trials."""
    with _optuna_study(experiment) as study:
        if isinstance(study, str):
            return study, None
        return _ranked(study), _draws(study, sampler)


def sampler_draws(experiment: Folder, sampler: Sampler) -> Sampler | None:
    """The sampler (as study.json names it) with how its trials came (`_draws`)."""
    with _optuna_study(experiment) as study:
        return None if isinstance(study, str) else _draws(study, sampler)


@contextlib.contextmanager
def _optuna_study(experiment: Folder) -> Iterator[optuna.Study | str]:
    """The experiment's Optuna study, or why there is none."""
    if not experiment.is_file(OPTUNA_DB):
        yield f"no {OPTUNA_DB}"
        return
    with experiment.local_copy(OPTUNA_DB) as database:
        storage = optuna.storages.RDBStorage(f"sqlite:///{database}")
        try:
            try:
                study = optuna.load_study(study_name=experiment.name, storage=storage)
            except KeyError:
                yield f"no Optuna study in {OPTUNA_DB}"
                return
            yield study
        finally:
            storage.engine.dispose()  # before a downloaded copy is removed


def _ranked(study: optuna.Study) -> dict[str, float] | str:
    finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(finished) < MIN_TRIALS_FOR_IMPORTANCE:
        return f"{len(finished)} finished trials; importances need {MIN_TRIALS_FOR_IMPORTANCE}"
    try:
        return {k: float(v) for k, v in optuna.importance.get_param_importances(study).items()}
    except (ValueError, RuntimeError) as err:
        return f"Optuna could not rank the parameters ({err})"


def _draws(study: optuna.Study, sampler: Sampler) -> Sampler:
    """The sampler (study.json's) and how its trials came: the first point (enqueued), random
    startup draws (asked while fewer than `startup_trials` had finished, counted as the
    sampler counts), or its model."""
    states = optuna.trial.TrialState
    counted = (states.COMPLETE,) if sampler.name == "gp" else (states.COMPLETE, states.PRUNED)
    model_free = sampler.name in MODEL_FREE
    draws = {"first_point": 0, "startup": 0, "model": 0, "races": 0}
    trials = study.get_trials(deepcopy=False)
    for trial in trials:
        if trial.user_attrs.get(RACE_ATTRS[0]) == Role.RACE:
            draws["races"] += 1
            continue
        if "fixed_params" in trial.system_attrs:
            draws["first_point"] += 1
            continue
        finished = sum(t.state in counted and t.datetime_complete is not None
                       and t.datetime_complete <= trial.datetime_start for t in trials)
        draws["startup" if model_free or finished < sampler.startup_trials else "model"] += 1
    return sampler.model_copy(update={"trials": Draws(**draws)})


@dataclass(frozen=True)
class Study:
    """A study as the report sees it: every trial, and its best one loaded and tested."""

    experiment: Folder
    trials: list[Trial]
    table: pd.DataFrame  # results.csv's rows
    best: Trial
    best_row: pd.Series
    pick: Pick  # how search.pick chose its config, and its estimate on a new seed
    state: dict[str, Any]  # the best trial's best checkpoint
    config: Config  # the best trial's, with the data folder given to the report
    splits: Splits
    model: nn.Module
    runtime: Runtime
    evaluation: TestEvaluation  # the best model on the test set, once
    lr_finder: dict[str, Any]  # the range test's results
    record: StudyRecord  # study.json: how the study ran, its cost estimate and wall time

    @property
    def val_name(self) -> str:
        return "test (selection set)" if self.splits.val_is_test else "validation"


def _load_study(experiment: Folder, data_dir: str | None) -> Study:
    record = _check_experiment(experiment)
    base = record.config
    trials = load_trials(experiment, base)
    table = trial_table(trials)
    found = winner(table, base.search, record.search_space)
    if found is None:
        raise ReportError(f"{experiment}: no completed trial with a checkpoint to report on")
    best_row, chosen = found
    best = next(t for t in trials if t.trial_id == best_row["trial_id"])
    checkpoint = Folder.at(best.checkpoint)
    if not checkpoint.is_file(CHECKPOINT_FILE):
        raise ReportError(f"{best.checkpoint}: the best trial's checkpoint is missing")
    with checkpoint.local_copy(CHECKPOINT_FILE) as copy:
        state = load_checkpoint(copy.parent)
    config = from_dict(state["config"])
    if data_dir is not None:
        config = config.replace("data", dir=data_dir)
    splits = load_splits(config.data)
    runtime = select_runtime()
    model = build_model(config.model.name, len(splits.classes))
    model.load_state_dict(state["model"])
    model = runtime.prepare(model)
    evaluation = evaluate_test(model, splits.test, len(splits.classes), runtime,
                               config.train.batch_size)
    lr_finder = json.loads(experiment.read_text(LR_FINDER_JSON))
    return Study(experiment, trials, table, best, best_row, chosen, state, config, splits,
                 model, runtime, evaluation, lr_finder, record)


def _original_figures(study: Study, path: dict[str, Path]) -> list[int]:
    """The original assignment's figures; returns the test indices of the gallery."""
    config, splits, classes = study.config, study.splits, study.splits.classes
    # A seeded sample: the training split may be ordered by class.
    shown = np.random.default_rng(config.train.seed).choice(
        len(splits.train.labels), size=min(20, len(splits.train.labels)), replace=False)
    transform = train_transform(config.data, seed=config.train.seed)
    augmented = to_uint8_images(torch.stack(
        [transform(image=splits.train.images[i])["image"] for i in shown]))
    figures.image_grid(augmented, [classes[splits.train.labels[i]] for i in shown],
                       path["augmentations"])
    finder = study.lr_finder
    figures.plot_lr_finder(finder["lrs"], finder["losses"], finder["suggested_lr"],
                           path["lr_finder"])
    steps = steps_per_epoch(config, len(splits.train.labels))  # for any number of workers
    figures.plot_lr_schedule(_lr_per_step(config, steps), steps, config.train.peak_epoch,
                             path["lr_schedule"])
    figures.plot_curves(_all_epochs(study.best, study.state), study.val_name, path["curves"])

    evaluation = study.evaluation
    wrong = misclassified(evaluation, splits.test.labels, config.report.num_misclassified)
    titles = [f"true {classes[splits.test.labels[i]]}\npred {classes[evaluation.predicted[i]]}"
              f" ({evaluation.confidence[i]:.0%})" for i in wrong]
    figures.image_grid(splits.test.images[wrong], titles, path["misclassified"])
    maps = gradcam_maps(study.model, splits.test.images[wrong], evaluation.predicted[wrong],
                        study.runtime)
    figures.plot_gradcam(splits.test.images[wrong], maps, titles, path["gradcam"])
    figures.plot_confusion(evaluation.confusion, classes, path["confusion_matrix"])
    return list(wrong)


def _study_figures(study: Study, path: dict[str, Path],
                   trust: dict[str, Any]) -> tuple[dict[str, float] | str, Sampler | None]:
    """Beyond the original: the study as a whole. Returns Optuna's importances (or why there
    are none) and how the sampler chose the trials."""
    table = study.table
    figures.plot_trials({t.trial_id: t.history for t in study.trials},
                        dict(zip(table["trial_id"], table["status"], strict=True)),
                        study.best.trial_id, study.val_name, path["trials"])
    figures.plot_search_space(table, study.lr_finder["suggested_lr"], study.best.trial_id,
                              study.record.search_space, trust["confirmation"],
                              path["search_space"])
    importances, draws = _from_optuna(study.experiment, study.record.sampler)
    if isinstance(importances, dict):
        figures.plot_importance(importances, path["importance"])
    return importances, draws


def _trust(study: Study) -> dict[str, Any]:
    """Whether the winner lies at an edge of the space, and what its seeds' spread says."""
    return {"edge_check": edge_check(study.best_row, study.record.search_space,
                                     study.config.train.epochs),
            "confirmation": seed_spread(study.table, study.best.trial_id)}


def _summary(study: Study, importances: dict[str, float] | str, sampler: Sampler | None,
             trust: dict[str, Any], figure_files: list[str]) -> dict[str, Any]:
    splits, evaluation, classes = study.splits, study.evaluation, study.splits.classes
    history = _all_epochs(study.best, study.state)
    pick = study.pick
    return {
        "experiment": study.experiment.name,
        "selected_on": "test" if splits.val_is_test else "val",
        "selection_note": ("data.val_size is 0: trials were selected on the test set, so the "
                           "test accuracy below is optimistic" if splits.val_is_test else
                           "trials were selected on a validation split carved from train"),
        "best_trial": {"trial_id": study.best.trial_id,
                       "best_epoch": int(history.loc[history[METRIC].idxmax(), EPOCH]),
                       "val_acc": float(study.best_row["best_val_acc"]),
                       "checkpoint": study.best.checkpoint, "config": study.state["config"],
                       "pick": {"rule": pick.rule, "configured": study.record.config.search.pick,
                                "observed_val_acc": pick.observed,
                                "estimated_val_acc": pick.estimate,
                                "estimated_val_acc_se": pick.estimate_se,
                                "seeds": list(pick.seeds), "note": pick.note,
                                "said": pick.sentence()},
                       "races": int((study.table["role"] == Role.RACE).sum())},
        "test": {"accuracy": evaluation.accuracy, "loss": evaluation.loss,
                 "images": int(len(splits.test.labels))},
        "per_class_accuracy": {c: float(a) for c, a in
                               zip(classes, evaluation.per_class_accuracy, strict=True)},
        "lr_range_test": {"suggested_lr": study.lr_finder["suggested_lr"]},
        # The search (range test and trials): as estimated before it, and as it took.
        "wall_time": {"estimated_s": study.record.cost_estimate.study_s,
                      "actual_s": study.record.wall_s if study.record.finished else None},
        "trials_by_status": {k: int(v) for k, v in
                             study.table.loc[study.table["role"].isin(SEARCH_ROLES), "status"]
                             .value_counts().items()},
        "sampler": None if sampler is None else sampler.model_dump(mode="json"),
        "trust": trust,
        "importances": importances,
        "figures": {key: name for key, (name, _) in FIGURES.items() if name in figure_files},
    }


def _export(study: Study, summary: dict[str, Any], out: Path) -> None:
    """The winner to take away (analysis/export.py)."""
    out.mkdir()
    splits = study.splits
    export_model(study.state["model"], study.config.model.name, splits.classes, out)
    write_config(study.record.config, out / CONFIG_YAML)
    sizes = {"train": len(splits.train.labels), "val": len(splits.val.labels)}
    (out / CARD_FILE).write_text(model_card(study.record, summary, study.experiment.name, sizes))


def build_report(experiment: Folder | str | os.PathLike, data_dir: str | None = None) -> Folder:
    """Write `<experiment>/report/`; return it."""
    if not isinstance(experiment, Folder):
        try:
            experiment = Folder.at(experiment)
        except StorageError as err:
            raise ReportError(str(err)) from None
    study = _load_study(experiment, data_dir)
    with experiment.written(REPORT_DIR) as out:
        out.mkdir()
        path = {key: out / name for key, (name, _) in FIGURES.items()}
        wrong = _original_figures(study, path)
        trust = _trust(study)
        importances, sampler = _study_figures(study, path, trust)
        classes, test, evaluation = study.splits.classes, study.splits.test, study.evaluation
        gallery = [{"test_index": int(test.indices[i]), "true": classes[test.labels[i]],
                    "predicted": classes[evaluation.predicted[i]],
                    "confidence": round(float(evaluation.confidence[i]), 6)} for i in wrong]
        (out / MISCLASSIFIED_JSON).write_text(json.dumps(gallery, indent=2))
        summary = _summary(study, importances, sampler, trust,
                           [p.name for p in out.iterdir()])
        (out / SUMMARY_JSON).write_text(json.dumps(summary, indent=2))
        _export(study, summary, out / MODEL_DIR)
        write_index(out, summary, study.table,
                    {k: v for k, v in FIGURES.items() if k in summary["figures"]})
        if not experiment.is_local:
            shutil.rmtree(local_report(experiment), ignore_errors=True)
            shutil.copytree(out, local_report(experiment))
    return experiment / REPORT_DIR


def local_report(experiment: Folder) -> Path:
    """Where the report on an experiment in a bucket is also kept, to open here."""
    return experiment.cache() / REPORT_DIR


def where(report: Folder) -> list[str]:
    """The lines that say where a report is (and its copy here, for one in a bucket)."""
    lines = [f"report: {report / 'index.html'}"]
    if not report.is_local:
        lines.append(f"a copy to open here: {local_report(report.parent) / 'index.html'}")
    return lines
