"""The report's figures and page from made-up inputs, with no study: each figure is a real PNG
of a readable size, and the page shows every figure, the trials and the trust section.
(The report of a real study: tests/test_analysis.py.)"""

from __future__ import annotations

import html
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from analysis import figures
from analysis.html import write_index
from analysis.pick import Pick
from analysis.report import FIGURES
from analysis.results import COLUMNS
from analysis.trust import edge_check, seed_spread
from trainable.experiment import Role
from trainable.record import SearchSpace

PICKED = Pick((0.01, 1), "pessimistic", 0.61, 0.595, 0.006, (0, 1, 2))

EPOCHS = 3
SPACE = SearchSpace.model_validate(  # as study.json holds it
    {"max_lr": {"distribution": "log-uniform", "estimate_times": [0.5, 2.0],
                "range": [0.005, 0.02]},
     "peak_epoch": {"distribution": "integer uniform", "range": [1, 2]}})


def _table() -> pd.DataFrame:
    rows = [("t1", Role.SEARCH, None, 0, "COMPLETED", 0.01, 1, 0.61),
            ("t2", Role.SEARCH, None, 0, "COMPLETED", 0.015, 2, 0.55),
            ("t3", Role.SEARCH, None, 0, "DIVERGED", 0.019, 2, float("nan")),
            ("c1", Role.CONFIRM, "t1", 1, "COMPLETED", 0.01, 1, 0.60),
            ("c2", Role.CONFIRM, "t2", 1, "COMPLETED", 0.015, 2, 0.54)]
    return pd.DataFrame([{"trial_id": t, "role": r, "confirms": c, "seed": s, "status": st,
                          "max_lr": lr, "peak_epoch": p, "epochs_run": EPOCHS,
                          "best_val_acc": acc, "final_val_acc": acc, "val_loss": 1.2,
                          "train_loss": 1.1, "wall_s": 9.0, "checkpoint": f"/runs/{t}/c"}
                         for t, r, c, s, st, lr, p, acc in rows], columns=COLUMNS)


def _history(scale: float = 1.0) -> pd.DataFrame:
    return pd.DataFrame({"epoch": [1, 2, 3], "train_loss": [2.0, 1.5, 1.1],
                         "val_loss": [2.1, 1.6, 1.2], "train_acc": [0.2, 0.4, 0.6],
                         "val_acc": [scale * 0.3, scale * 0.5, scale * 0.6],
                         "diverged": [False, False, False]})


@pytest.fixture(scope="module")
def drawn(tmp_path_factory) -> dict:
    """Every figure the report draws, each to its fixed file name."""
    out = tmp_path_factory.mktemp("report")
    path = {key: out / name for key, (name, _) in FIGURES.items()}
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    table = _table()
    lrs = list(np.geomspace(1e-5, 1, 30))
    figures.plot_lr_finder(lrs, list(np.linspace(2.3, 1.0, 30)), 1e-2, path["lr_finder"])
    figures.image_grid(images, [f"class {i}" for i in range(8)], path["augmentations"])
    figures.image_grid(images, ["cat / dog 0.91"] * 8, path["misclassified"])
    figures.plot_lr_schedule(list(np.linspace(1e-4, 1e-2, 12)), 4, 1, path["lr_schedule"])
    figures.plot_curves(_history(), "val", path["curves"])
    figures.plot_gradcam(images, rng.random((8, 32, 32)), ["dog"] * 8, path["gradcam"])
    figures.plot_confusion(rng.integers(0, 20, (10, 10)), [f"c{i}" for i in range(10)],
                           path["confusion_matrix"])
    figures.plot_trials({"t1": _history(), "t2": _history(0.9), "t3": _history(0.2)},
                        {"t1": "COMPLETED", "t2": "COMPLETED", "t3": "DIVERGED"}, "t1", "val",
                        path["trials"])
    spread = seed_spread(table, "t1")
    figures.plot_search_space(table, 0.01, "t1", SPACE, spread, path["search_space"])
    figures.plot_importance({"max_lr": 0.7, "peak_epoch": 0.3}, path["importance"])
    return {"out": out, "table": table, "spread": spread}


def test_every_figure_is_a_png_of_a_readable_size(drawn):
    for key, (name, _) in FIGURES.items():
        with Image.open(drawn["out"] / name) as image:
            image.verify()
        with Image.open(drawn["out"] / name) as image:
            assert image.format == "PNG" and image.width >= 400 and image.height >= 250, key
            # Not a blank canvas: a figure has ink on it.
            assert np.asarray(image.convert("L")).std() > 5, key


def test_the_page_shows_every_figure_the_trials_and_how_far_to_trust_the_winner(drawn):
    table, out = drawn["table"], drawn["out"]
    best = table.iloc[0]
    summary = {
        "experiment": "demo", "selected_on": "val",
        "selection_note": "trials were selected on a validation split carved from train",
        "best_trial": {"trial_id": "t1", "best_epoch": 3, "val_acc": 0.61, "checkpoint": "c",
                       "config": {"train": {"max_lr": 0.01, "peak_epoch": 1, "epochs": EPOCHS,
                                            "batch_size": 16},
                                  "model": {"name": "resnet18"}},
                       "pick": {"rule": PICKED.rule, "configured": "pessimistic",
                                "observed_val_acc": PICKED.observed,
                                "estimated_val_acc": PICKED.estimate,
                                "estimated_val_acc_se": PICKED.estimate_se,
                                "seeds": list(PICKED.seeds), "note": None,
                                "said": PICKED.sentence()},
                       "races": 2},
        "test": {"accuracy": 0.58, "loss": 1.25, "images": 200},
        "per_class_accuracy": {f"c{i}": 0.5 for i in range(10)},
        "lr_range_test": {"suggested_lr": 0.01},
        "wall_time": {"estimated_s": 100.0, "actual_s": 120.0},
        "trials_by_status": {"COMPLETED": 2, "DIVERGED": 1},
        "trust": {"edge_check": edge_check(best, SPACE, EPOCHS),
                  "confirmation": drawn["spread"]},
        "importances": "importances need at least 4 completed trials",
        "sampler": {"name": "tpe", "startup_trials": 2,
                    "trials": {"first_point": 1, "startup": 3, "model": 4, "races": 2}},
    }
    shown = {k: v for k, v in FIGURES.items() if k != "importance"}
    write_index(out, summary, table, shown)
    page = (out / "index.html").read_text()
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert sorted(sources) == sorted(name for name, _ in shown.values())
    assert "http" not in " ".join(sources)  # nothing fetched from the network
    assert len(re.findall(r"<figcaption>", page)) == len(sources)
    for trial_id in table["trial_id"]:
        assert f"<td>{trial_id}</td>" in page
    assert '<tr class="best"><td>t1</td>' in page
    assert "How far to trust the winner" in page
    # the winner's observed val_acc and its estimate on a new seed, both
    assert "best val accuracy, observed</th><td>0.6100 (epoch 3)" in page
    assert "val accuracy on a new seed, estimated</th><td>0.5950 +- 0.0060 (seeds 0, 1, 2)" \
        in page
    assert "the winner&#x27;s curse takes 1.50 points off" in page
    assert html.escape(drawn["spread"]["verdict"][1:]) in page
    assert "search wall time" in page and "estimated before it started" in page
    assert "Parameter importances: not shown (importances need" in page
    assert ("Optuna TPE: 1 first point, 3 random startup draws, 4 from its model "
            "(startup: the first 2 finished)") in page
