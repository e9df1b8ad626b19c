"""The report on the session's finished 3-trial study (tests/conftest.py: `finished`)."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

from analysis.__main__ import main as analysis_main
from analysis.explain import gradcam_maps
from analysis.export import CARD_FILE, CLASSES_JSON, MODEL_DIR, PROGRAM_FILE, WEIGHTS_FILE
from analysis.report import FIGURES, MISCLASSIFIED_JSON, SUMMARY_JSON
from trainable.checkpoint import load_checkpoint
from trainable.config import from_dict
from trainable.data import eval_transform, load_splits, make_loader
from trainable.device import select_runtime
from trainable.loop import predict
from trainable.model import build_model

from .helpers import FINISHED_DEADLINE, REPO, results


@pytest.fixture(scope="module")
def report(finished):
    experiment, _ = finished
    assert analysis_main([str(experiment)]) == 0
    return experiment / "report"


@pytest.fixture(scope="module")
def best(report):
    """The best checkpoint's model and the data it was trained on, loaded independently."""
    summary = json.loads((report / SUMMARY_JSON).read_text())
    state = load_checkpoint(summary["best_trial"]["checkpoint"])
    config = from_dict(state["config"])
    model = build_model(config.model.name)
    model.load_state_dict(state["model"])
    return summary, model.eval(), load_splits(config.data)


@pytest.mark.slow
@pytest.mark.timeout(FINISHED_DEADLINE)
def test_every_figure_is_a_real_png(report):
    summary = json.loads((report / SUMMARY_JSON).read_text())
    # 3 trials: too few for Optuna's importances, which the summary says.
    expected = {k for k in FIGURES if k != "importance"}
    assert set(summary["figures"]) == expected
    assert "importances need" in summary["importances"]
    for key in expected:
        with Image.open(report / FIGURES[key][0]) as image:
            image.verify()
        with Image.open(report / FIGURES[key][0]) as image:
            assert image.format == "PNG" and image.width >= 400 and image.height >= 250, key


@pytest.mark.slow
@pytest.mark.timeout(FINISHED_DEADLINE)
def test_test_accuracy_is_a_recomputation(best):
    summary, model, splits = best
    loader = make_loader(splits.test, eval_transform(), 64, num_workers=0, shuffle=False)
    logits, labels = predict(model, loader, select_runtime("cpu"))
    accuracy = (logits.argmax(1) == labels).float().mean().item()
    assert summary["test"]["accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert summary["test"]["images"] == len(splits.test.labels) == 200
    per_class = [((logits.argmax(1) == labels) & (labels == c)).sum().item()
                 / (labels == c).sum().item() for c in range(10)]
    assert list(summary["per_class_accuracy"].values()) == pytest.approx(per_class, abs=1e-6)
    assert summary["selected_on"] == "val"
    assert summary["trials_by_status"] == {"COMPLETED": 3}


@pytest.mark.slow
@pytest.mark.timeout(FINISHED_DEADLINE)
def test_misclassified_gallery_is_really_misclassified(report, best):
    summary, model, splits = best
    gallery = json.loads((report / MISCLASSIFIED_JSON).read_text())
    assert 1 <= len(gallery) <= 20
    position = {int(index): i for i, index in enumerate(splits.test.indices)}
    for entry in gallery:
        i = position[entry["test_index"]]
        image = eval_transform()(image=splits.test.images[i])["image"][None]
        with torch.no_grad():
            probabilities = torch.softmax(model(image), 1)[0]
        predicted = splits.classes[int(probabilities.argmax())]
        assert entry["true"] == splits.classes[splits.test.labels[i]] != predicted
        assert entry["predicted"] == predicted
        assert entry["confidence"] == pytest.approx(probabilities.max().item(), abs=1e-4)


@pytest.mark.slow
@pytest.mark.timeout(FINISHED_DEADLINE)
def test_gradcam_maps_are_normalised_and_not_constant(best):
    _, model, splits = best
    images = splits.test.images[:6]
    # For the class the model predicts, as the report draws them: for another class every
    # gradient can be negative, and the map all zero.
    with torch.no_grad():
        predicted = model(torch.stack([eval_transform()(image=i)["image"] for i in images]))
    targets = predicted.argmax(1).numpy()
    maps = gradcam_maps(model, images, targets, select_runtime("cpu"))
    assert maps.shape == (6, 32, 32)
    assert maps.min() >= 0 and maps.max() <= 1 + 1e-6
    for cam in maps:
        assert cam.max() - cam.min() > 0.1


@pytest.mark.slow
@pytest.mark.timeout(FINISHED_DEADLINE)
def test_index_html_shows_every_figure_and_the_trial_table(finished, report):
    experiment, _ = finished
    page = (report / "index.html").read_text()
    summary = json.loads((report / SUMMARY_JSON).read_text())
    sources = set(re.findall(r'<img src="([^"]+)"', page))
    assert sources == set(summary["figures"].values())
    assert all((report / source).is_file() for source in sources)
    assert "http" not in " ".join(sources)  # nothing fetched from the network
    for trial_id in results(experiment)["trial_id"]:
        assert f"<td>{trial_id}</td>" in page
    assert "<th>startup_s</th>" in page and "<th>train_s</th>" in page
    assert "<th>config_seeds</th>" in page and "<th>config_mean_val_acc</th>" in page
    # the winner's val_acc as observed and as its rule expects it on a new seed, both
    pick = summary["best_trial"]["pick"]
    assert pick["observed_val_acc"] == summary["best_trial"]["val_acc"]
    assert f"{pick['estimated_val_acc']:.4f} +- {pick['estimated_val_acc_se']:.4f}" in page
    assert html.escape(pick["said"]) in page
    assert len(re.findall(r"<figcaption>", page)) == len(sources)
    # The search's cost: as estimated before it, beside what it took.
    wall = summary["wall_time"]
    assert wall["estimated_s"] > 0 and wall["actual_s"] > 0
    assert "search wall time" in page and "estimated before it started" in page


@pytest.mark.slow
@pytest.mark.timeout(FINISHED_DEADLINE)
def test_a_second_run_gives_the_same_summary(finished, report):
    experiment, _ = finished
    first = (report / SUMMARY_JSON).read_text()
    gallery = (report / MISCLASSIFIED_JSON).read_text()
    assert analysis_main([str(experiment)]) == 0
    assert (report / SUMMARY_JSON).read_text() == first
    assert (report / MISCLASSIFIED_JSON).read_text() == gallery


def test_not_an_experiment(tmp_path, capsys):
    assert analysis_main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "not an experiment directory" in err and err.count("\n") == 1


@pytest.mark.slow
@pytest.mark.timeout(FINISHED_DEADLINE)
def test_a_missing_checkpoint_leaves_no_report(finished, tmp_path, capsys):
    experiment, _ = finished
    copy = tmp_path / experiment.name
    shutil.copytree(experiment, copy, ignore=shutil.ignore_patterns("report"))
    for checkpoint in copy.glob("trial_*/checkpoint_*"):
        shutil.rmtree(checkpoint)
    assert analysis_main([str(copy)]) == 2
    assert "no completed trial with a checkpoint" in capsys.readouterr().err
    assert not (copy / "report").exists()


# Runs in a fresh interpreter (-I: no PYTHONPATH, no user site, not the current folder), outside
# the repo: the exported program alone, then which modules of this project came with it.
EXPORTED = """
import json, sys, torch
program = torch.export.load(sys.argv[1])
images = torch.load(sys.argv[2], weights_only=True)
logits = program.module()(images)
torch.save(logits, sys.argv[3])
ours = [m for m in sys.modules if m.split(".")[0] in ("trainable", "study", "analysis", "tools")]
on_path = [p for p in sys.path if p in ("", sys.argv[4])]
print(json.dumps({"ours": ours, "repo_on_path": on_path}))
"""


@pytest.mark.slow
@pytest.mark.timeout(FINISHED_DEADLINE)
def test_the_exported_model_runs_without_this_project_and_predicts_as_it_does(best, report,
                                                                              tmp_path):
    summary, model, splits = best
    model_dir = report / MODEL_DIR
    assert set(json.loads((model_dir / CLASSES_JSON).read_text())) == set(splits.classes)
    weights = torch.load(model_dir / WEIGHTS_FILE, weights_only=True)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    card = (model_dir / CARD_FILE).read_text()
    assert f"trial {summary['best_trial']['trial_id']}" in card
    assert f"test accuracy {summary['test']['accuracy']:.4f}, measured once" in card
    images = torch.from_numpy(splits.test.images)  # uint8 (N, 32, 32, 3), as a user has them
    torch.save(images, tmp_path / "images.pt")
    run = subprocess.run([sys.executable, "-I", "-c", EXPORTED, str(model_dir / PROGRAM_FILE),
                          str(tmp_path / "images.pt"), str(tmp_path / "logits.pt"), str(REPO)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout) == {"ours": [], "repo_on_path": []}
    exported = torch.load(tmp_path / "logits.pt", weights_only=True)
    loader = make_loader(splits.test, eval_transform(), 64, num_workers=0, shuffle=False)
    logits, _ = predict(model, loader, select_runtime("cpu"))
    assert torch.equal(exported.argmax(1), logits.argmax(1))
    assert torch.allclose(exported, logits, atol=1e-4)
