"""Helpers that more than one test module uses (fixtures are in conftest.py)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import numpy as np
import optuna
import pandas as pd
import pytest

from study.search import TUNE_TRIAL_ID
from trainable.constants import MEAN_UINT8, REPO
from trainable.experiment import RESULTS_CSV, Folder, optuna_url

SHARED_DATA = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def offline_env() -> dict[str, str]:
    """Proxy settings that send every URL fetch to a closed local port: no network."""
    closed = f"http://127.0.0.1:{free_port()}"
    return {"NO_PROXY": "", "no_proxy": "",
            **{name: closed for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy",
                                         "https_proxy")}}


# --- augmentation: what the original's does to an image -------------------------------------

def coordinate_image() -> np.ndarray:
    """Every pixel tells where it came from (R: column, G: row); blue marks 'image, not fill'."""
    rows, cols = np.mgrid[0:32, 0:32]
    return np.stack([4 * cols + 2, 4 * rows + 2, np.full_like(rows, 250)], -1).astype(np.uint8)


def explain(out: np.ndarray, source: np.ndarray):
    """The (row offset, column offset, flipped, hole mask) under which `out` is `source` padded
    by 4 with the mean, cropped at the offset, maybe flipped, with mean-coloured pixels covering
    the hole; None if no crop explains it."""
    padded = np.empty((40, 40, 3), np.uint8)
    padded[:] = MEAN_UINT8
    padded[4:36, 4:36] = source
    for dy in range(9):
        for dx in range(9):
            for flipped in (False, True):
                expected = padded[dy:dy + 32, dx:dx + 32]
                expected = expected[:, ::-1] if flipped else expected
                differs = (out != expected).any(-1)
                if (out[differs] == MEAN_UINT8).all() and differs.sum() <= 64:
                    return dy, dx, flipped, differs
    return None


# --- studies: python study/run.py on tiny synthetic data ---------------------------------

RUN = [sys.executable, str(REPO / "study" / "run.py")]
EPOCHS = 2
# s: a test reading the session's 3-trial study (conftest.py: `finished`), which the first such
# test builds (and its report, in tests/test_analysis.py); 35-45 s here.
FINISHED_DEADLINE = 400


def tiny(data_dir, *extra: str) -> list[str]:
    """Seconds per trial: 32 training images in 2 batches, 16 validation images."""
    return ["--config", str(REPO / "configs" / "smoke.yaml"), "--data-dir", str(data_dir),
            "--set", "data.limit_train=32", "--set", "data.val_size=16",
            "--set", "train.batch_size=16", "--set", f"train.epochs={EPOCHS}",
            "--set", "lr_finder.num_iter=17", *extra]


def study(ray_address, storage, name, data_dir, *extra, timeout=300):
    """A --local study joined to the session's Ray, without its report."""
    run = subprocess.run([*RUN, *tiny(data_dir, "--address", ray_address, "--local",
                                      "--storage", str(storage), "--name", name,
                                      "--no-report", *extra)],
                         capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def results(experiment) -> pd.DataFrame:
    return read_results(experiment / RESULTS_CSV)


def read_results(source) -> pd.DataFrame:
    """results.csv with its ids as text: an id such as 15534e13 is no number."""
    return pd.read_csv(source, dtype={"trial_id": str, "confirms": str})


def reports(trial_dir) -> list[dict]:
    """Every result Tune recorded for a trial, in order (result.json is appended to)."""
    return [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines()
            if line.strip()]


def trial_epochs(experiment) -> dict[str, list[int]]:
    """Every epoch each trial reported, in order (an epoch run twice appears twice)."""
    found = {}
    for trial_dir in experiment.glob("trial_*"):
        if (trial_dir / "result.json").exists():
            found[trial_dir.name] = [r["epoch"] for r in reports(trial_dir)]
    return found


def assert_optuna_told_what_tune_saw(experiment, table: pd.DataFrame) -> None:
    """Each trial in optuna.db as it ended in Tune: a STOPPED one (ASHA cut it off) PRUNED
    and a COMPLETED one COMPLETE with its last val_acc, each with a value for every epoch it
    ran; a DIVERGED one COMPLETE with 0.0."""
    storage = optuna_url(Folder.at(experiment))
    (summary,) = optuna.get_all_study_summaries(storage)
    told = {t.user_attrs[TUNE_TRIAL_ID]: t for t in
            optuna.load_study(study_name=summary.study_name, storage=storage).trials}
    states = optuna.trial.TrialState
    for trial_id, row in table.iterrows():
        trial = told[trial_id]
        if row["status"] in ("STOPPED", "COMPLETED"):
            epochs = list(range(1, int(row["epochs_run"]) + 1))
            assert sorted(trial.intermediate_values) == epochs, trial_id
        if row["status"] == "STOPPED":
            assert trial.state == states.PRUNED, trial_id
        elif row["status"] == "COMPLETED":
            assert trial.state == states.COMPLETE, trial_id
            assert trial.value == pytest.approx(row["final_val_acc"]), trial_id
        else:
            assert (trial.state, trial.value) == (states.COMPLETE, 0.0), trial_id
