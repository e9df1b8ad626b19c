"""A run's checkpoint: what the loop saves after each epoch (weights, optimizer, schedule, RNG
state, config, history), and how a run continues from the newest readable one."""

from __future__ import annotations

import contextlib
import logging
import pickle
import random
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from trainable.config import Config, dump_config
from trainable.constants import CHECKPOINT_FILE
from trainable.errors import first_line

log = logging.getLogger(__name__)

# What a damaged checkpoint raises on load: a truncated zip, a bad pickle, a missing file.
UNREADABLE = (RuntimeError, OSError, EOFError, pickle.UnpicklingError, ValueError)
STATE_KEYS = ("model", "optimizer", "scheduler", "epoch", "rng", "config", "history")


class CheckpointMismatch(ValueError):
    """A checkpoint made by a run with another config, which cannot continue this one."""


def rng_state() -> dict[str, Any]:
    """torch's, Python's and NumPy's global RNG states, as `weights_only` loading accepts."""
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [np.random.get_state()[1].tolist(), *np.random.get_state()[2:]]}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    keys, *rest = state["numpy"]
    np.random.set_state(("MT19937", np.asarray(keys, dtype=np.uint32), *rest))


def load_checkpoint(checkpoint_dir: str | Path) -> dict[str, Any]:
    """A checkpoint's contents, read with `weights_only=True` (tensors and plain data only)."""
    return torch.load(Path(checkpoint_dir) / CHECKPOINT_FILE, map_location="cpu",
                      weights_only=True)


@contextlib.contextmanager
def saved_checkpoint(module: nn.Module, optimizer: torch.optim.Optimizer,
                     scheduler: torch.optim.lr_scheduler.LRScheduler, epoch: int,
                     config: Config, history: list[dict[str, Any]]) -> Iterator[str]:
    """A temporary checkpoint directory of the run after `epoch`, removed after the block
    (the caller's `report` copies what it keeps)."""
    with tempfile.TemporaryDirectory(prefix="onecycle-ckpt-") as checkpoint_dir:
        torch.save({
            "model": module.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "epoch": epoch, "rng": rng_state(),
            "config": dump_config(config), "history": history,
        }, Path(checkpoint_dir) / CHECKPOINT_FILE)
        yield checkpoint_dir


def _fits(state: Any, module: nn.Module) -> str | None:
    """Why `state` cannot continue a run of `module`, or None when it can."""
    if (not isinstance(state, dict) or any(key not in state for key in STATE_KEYS)
            or not isinstance(state["model"], dict)):
        return "not a checkpoint of this loop"
    expected = {k: v.shape for k, v in module.state_dict().items()}
    found = {k: getattr(v, "shape", None) for k, v in state["model"].items()}
    return None if found == expected else "weights of another model"


def readable_checkpoint(candidates: Sequence[str | Path], config: Config,
                        module: nn.Module) -> dict[str, Any] | None:
    """The first readable checkpoint of `candidates` (checkpoint directories, newest first),
    or None (start at epoch 1) when none is; each one skipped is logged as a warning. The
    first candidate made with another config is an error."""
    candidates = [Path(c) for c in candidates]
    for candidate in candidates:
        try:
            state = load_checkpoint(candidate)
            problem = _fits(state, module)
        except UNREADABLE as error:
            problem = f"{type(error).__name__}: {first_line(error)}"
        if problem is not None:
            log.warning("checkpoint %s is unreadable (%s); skipped", candidate, problem)
            continue
        if state["config"] != dump_config(config):
            if candidate == candidates[0]:
                raise CheckpointMismatch(f"{candidate}: checkpoint was made with another config")
            # Beside a copy in a temporary folder may lie other runs' checkpoints.
            log.warning("checkpoint %s is another run's; skipped", candidate)
            continue
        if candidate != candidates[0]:
            log.warning("continuing from the older checkpoint %s (epoch %d)", candidate,
                        state["epoch"])
        return state
    if candidates:
        log.warning("no readable checkpoint from %s back; the run restarts at epoch 1",
                    candidates[0])
    return None


def restore(state: dict[str, Any], module: nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: torch.optim.lr_scheduler.LRScheduler) -> list[dict[str, Any]]:
    """The run as `state` saved it, RNG included; returns the history of its epochs."""
    module.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    log.info("resumed after epoch %d of %d", state["epoch"], state["config"]["train"]["epochs"])
    return list(state["history"])
