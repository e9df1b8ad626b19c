"""Figures, written to files with matplotlib's Agg backend; never shown."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)


def plot_lr_finder(lrs: list[float], losses: list[float], suggested_lr: float,
                   path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(lrs, losses, color="tab:blue", label="smoothed training loss")
    ax.axvline(suggested_lr, color="tab:red", linestyle="--",
               label=f"steepest descent: {suggested_lr:.3g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss")
    ax.set_title("LR range test")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
