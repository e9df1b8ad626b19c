"""Figures, written to files with matplotlib's Agg backend; never shown."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
from matplotlib.ticker import MaxNLocator  # noqa: E402
from pytorch_grad_cam.utils.image import show_cam_on_image  # noqa: E402

from trainable.constants import TrialStatus  # noqa: E402
from trainable.experiment import (  # noqa: E402
    EPOCH,
    METRIC,
    SEARCH_ROLES,
    SEARCHED,
    without_diverged,
)
from trainable.record import SearchSpace  # noqa: E402

DPI = 110
BEST_COLOUR, OTHER_COLOUR = "tab:red", "tab:gray"


def _save(fig: plt.Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, format="png")  # also to a ".partial" name
    plt.close(fig)


def plot_lr_finder(lrs: list[float], losses: list[float], suggested_lr: float,
                   path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(lrs, losses, color="tab:blue", label="smoothed training loss")
    ax.axvline(suggested_lr, color=BEST_COLOUR, linestyle="--",
               label=f"steepest descent: {suggested_lr:.3g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss")
    ax.set_title("LR range test")
    ax.legend()
    ax.grid(alpha=0.3)
    _save(fig, path)


def image_grid(images: np.ndarray, titles: Sequence[str], path: Path, columns: int = 5,
               suptitle: str | None = None) -> None:
    """uint8 RGB images (N x H x W x 3) in a grid, each with a title."""
    rows = max(1, int(np.ceil(len(images) / columns)))
    fig, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, title in zip(axes.flat, images, titles, strict=False):
        ax.imshow(image, interpolation="nearest")
        ax.set_title(title, fontsize=8)
    if suptitle:
        fig.suptitle(suptitle)
    _save(fig, path)


def plot_lr_schedule(lrs: Sequence[float], steps_per_epoch: int, peak_epoch: int,
                     path: Path) -> None:
    epochs = np.arange(1, len(lrs) + 1) / steps_per_epoch
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(epochs, lrs, color="tab:blue")
    ax.axvline(peak_epoch, color=BEST_COLOUR, linestyle="--",
               label=f"peak at the end of epoch {peak_epoch}: {max(lrs):.3g}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("learning rate")
    ax.set_title("One-cycle LR schedule of the best trial (per step)")
    ax.legend()
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_curves(history: pd.DataFrame, val_name: str, path: Path) -> None:
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in ((loss_ax, "loss"), (acc_ax, "acc")):
        ax.plot(history[EPOCH], history[f"train_{metric}"], marker="o", label="train")
        ax.plot(history[EPOCH], history[f"val_{metric}"], marker="o", label=val_name)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("accuracy" if metric == "acc" else "cross-entropy loss")
        ax.set_title("accuracy" if metric == "acc" else "loss")
        ax.grid(alpha=0.3)
        ax.legend()
    _save(fig, path)


def plot_gradcam(images: np.ndarray, maps: np.ndarray, titles: Sequence[str],
                 path: Path, pairs_per_row: int = 4, upsample: int = 4) -> None:
    """Each image beside its GradCAM map overlaid on it, both upsampled `upsample` times."""
    rows = max(1, int(np.ceil(len(images) / pairs_per_row)))
    fig, axes = plt.subplots(rows, 2 * pairs_per_row, figsize=(2 * 2 * pairs_per_row,
                                                               2.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, (image, cam, title) in enumerate(zip(images, maps, titles, strict=True)):
        left, right = axes[i // pairs_per_row, 2 * (i % pairs_per_row):][:2]
        big = np.kron(image, np.ones((upsample, upsample, 1), dtype=np.uint8))
        big_cam = np.kron(cam, np.ones((upsample, upsample)))
        left.imshow(big)
        right.imshow(show_cam_on_image(big.astype(np.float32) / 255, big_cam, use_rgb=True))
        left.set_title(title, fontsize=8)
        right.set_title("GradCAM, predicted", fontsize=8)
    fig.suptitle("GradCAM on layer4 for the predicted class")
    _save(fig, path)


def plot_confusion(confusion: np.ndarray, classes: Sequence[str], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    shown = ax.imshow(confusion, cmap="Blues")
    fig.colorbar(shown, ax=ax, label="test images")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    threshold = confusion.max() / 2
    for (row, col), count in np.ndenumerate(confusion):
        ax.text(col, row, str(count), ha="center", va="center", fontsize=7,
                color="white" if count > threshold else "black")
    ax.set_title("Confusion matrix of the best model on the test set")
    _save(fig, path)


def plot_trials(histories: dict[str, pd.DataFrame], statuses: dict[str, str], best: str,
                val_name: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 5))
    markers = {TrialStatus.STOPPED: "s", TrialStatus.DIVERGED: "X", TrialStatus.ERROR: "x"}
    for trial_id, history in histories.items():
        good = without_diverged(history)
        is_best = trial_id == best
        ax.plot(good[EPOCH], good[METRIC], color=BEST_COLOUR if is_best else OTHER_COLOUR,
                linewidth=2.5 if is_best else 1, alpha=1 if is_best else 0.6, zorder=3 if
                is_best else 2, label=f"best: {trial_id}" if is_best else None)
        status = statuses.get(trial_id)
        if status in markers and len(good):
            ax.scatter(good[EPOCH].iloc[-1], good[METRIC].iloc[-1], marker=markers[status],
                       s=70, color="black", zorder=4)
    for status, marker in markers.items():
        if status in statuses.values():
            ax.scatter([], [], marker=marker, color="black", label=status.lower())
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{val_name} accuracy")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("Every trial's accuracy per epoch")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def plot_search_space(table: pd.DataFrame, estimate: float, best: str, space: SearchSpace,
                      confirmation: dict[str, Any] | None, path: Path) -> None:
    """Best accuracy against each searched setting: the range searched shaded, every search
    trial a dot, the best ringed; confirmed configs as mean +- standard deviation."""
    search = table[table["role"].isin(SEARCH_ROLES)]
    peak_lo, peak_hi = space.peak_epoch.range  # integers: shade whole epochs
    ranges = {"max_lr": space.max_lr.range, "peak_epoch": (peak_lo - 0.5, peak_hi + 0.5)}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, setting in zip(axes, SEARCHED, strict=True):
        ax.axvspan(*ranges[setting], color="tab:blue", alpha=0.08, label="range searched")
        ax.scatter(search[setting], search["best_val_acc"], color=OTHER_COLOUR, s=40,
                   edgecolors="black", zorder=3, label="search trial")
        best_row = search[search["trial_id"] == best]
        ax.scatter(best_row[setting], best_row["best_val_acc"], s=200, facecolors="none",
                   edgecolors=BEST_COLOUR, linewidths=2, zorder=4, label=f"best: {best}")
        for i, config in enumerate((confirmation or {}).get("configs", [])):
            ax.errorbar(config[setting], config["mean"], yerr=config["std"], fmt="D",
                        color="tab:orange", capsize=5, zorder=5,
                        label="confirmed: mean +- sd over seeds" if i == 0 else None)
        ax.set_xlabel(setting)
        ax.grid(alpha=0.3)
    axes[0].axvline(estimate, color=BEST_COLOUR, linestyle="--",
                    label=f"LR range test estimate: {estimate:.3g}")
    axes[0].set_xscale("log")
    axes[1].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_ylabel("best val_acc")
    axes[0].legend(fontsize=8)
    fig.suptitle("The searched space: every trial, and the confirmed configs' seed spread")
    _save(fig, path)


def plot_importance(importances: dict[str, float], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 3))
    names = list(importances)
    ax.barh(names, [importances[n] for n in names], color="tab:blue")
    ax.set_xlabel("importance (Optuna, fANOVA)")
    ax.set_title("What mattered for val_acc")
    ax.invert_yaxis()
    _save(fig, path)
