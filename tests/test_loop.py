from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from study.trial import restore_candidates
from trainable.__main__ import main as trainable_main
from trainable.checkpoint import load_checkpoint
from trainable.constants import CHECKPOINT_FILE, TrialStatus
from trainable.data import load_splits
from trainable.loop import make_optimizer, make_scheduler, train
from trainable.model import build_model

from .helpers import REPO


def test_lr_peaks_at_the_end_of_the_peak_epoch(tiny_config):
    config = tiny_config.replace("train", epochs=6, peak_epoch=2, max_lr=0.4)
    steps = 7
    optimizer = make_optimizer(build_model("resnet18"), config)
    scheduler = make_scheduler(optimizer, config, steps)
    lrs = []
    for _ in range(6 * steps):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    peak = int(np.argmax(lrs))
    assert peak == 2 * steps - 1  # the last step of epoch 2
    assert lrs[peak] == pytest.approx(0.4)
    assert lrs[0] == pytest.approx(0.4 / 25)
    assert lrs[-1] == pytest.approx(0.4 / 25 / 1e4, rel=0.05)
    assert all(a <= b for a, b in zip(lrs[:peak], lrs[1:peak + 1], strict=True))
    assert all(a >= b for a, b in zip(lrs[peak:-1], lrs[peak + 1:], strict=True))


@pytest.mark.parametrize(("epochs", "peak_epoch", "steps"),
                         [(1, 1, 1), (1, 1, 2), (2, 1, 1), (2, 2, 1), (3, 1, 1), (1, 1, 3)])
def test_a_schedule_of_a_few_steps_runs_its_whole_length(tiny_config, epochs, peak_epoch, steps):
    # A tiny data set gives one or two batches per epoch; the schedule must still step.
    config = tiny_config.replace("search", peak_epoch_range=None)
    config = config.replace("train", epochs=epochs, peak_epoch=peak_epoch, max_lr=0.4)
    optimizer = make_optimizer(build_model("resnet18"), config)
    scheduler = make_scheduler(optimizer, config, steps)
    lrs = []
    for _ in range(epochs * steps):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert all(0 < lr <= 0.4 for lr in lrs)
    if epochs * steps >= 3:
        assert max(lrs) > lrs[0] and max(lrs) > lrs[-1]


def test_a_run_reports_every_epoch_with_a_checkpoint(tiny_config, tmp_path):
    config = tiny_config.replace("train", max_lr=0.05, peak_epoch=2)
    reports = []

    def report(metrics, checkpoint_dir):
        kept = tmp_path / f"epoch{metrics['epoch']}"
        shutil.copytree(checkpoint_dir, kept)
        reports.append((metrics, kept))

    started_at = time.time() - 5.0  # as a trial that started 5 s before the loop
    outcome = train(config, load_splits(config.data), report, started_at=started_at)
    assert outcome.status == TrialStatus.COMPLETED
    assert [m["epoch"] for m, _ in reports] == [1, 2, 3]
    keys = {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "best_val_acc", "lr",
            "epoch_s", "val_s", "images_per_s", "steps", "workers", "diverged", "startup_s"}
    for metrics, kept in reports:
        assert set(metrics) == keys
        assert 5.0 < metrics["startup_s"] < 5.0 + 60  # to the first step of this run
        assert metrics["val_s"] > 0
        assert all(math.isfinite(v) for v in metrics.values())
        assert (kept / CHECKPOINT_FILE).is_file()
    # The schedule spans the 3 epochs trained and peaks at the end of epoch 2.
    lrs = [m["lr"] for m, _ in reports]
    assert lrs[1] == pytest.approx(0.05) and lrs[0] < lrs[1] and lrs[2] < 0.05 / 25
    state = load_checkpoint(reports[-1][1])
    assert state["epoch"] == 3 and len(state["history"]) == 3
    assert set(state["model"]) == set(build_model("resnet18").state_dict())


def test_resuming_reaches_the_same_weights_as_an_uninterrupted_run(tiny_config, tmp_path):
    splits = load_splits(tiny_config.data)
    kept = {}

    def keep(metrics, checkpoint_dir):
        kept[metrics["epoch"]] = shutil.copytree(checkpoint_dir, tmp_path / str(metrics["epoch"]))

    whole = train(tiny_config, splits, keep)
    resumed = train(tiny_config, splits, resume_from=[kept[1]])
    assert [m["epoch"] for m in resumed.history] == [1, 2, 3]
    # From its last epoch's checkpoint (it ended after its driver stopped listening): that
    # epoch reported once more, with a checkpoint, and nothing trained.
    again = []
    ended = train(tiny_config, splits,
                  lambda m, c: again.append((m, (Path(c) / CHECKPOINT_FILE).is_file())),
                  resume_from=[kept[3]])
    assert again == [(whole.history[-1], True)]
    assert torch.equal(ended.model.head.weight, whole.model.head.weight)
    for name, tensor in whole.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name
    assert whole.history[-1]["val_loss"] == resumed.history[-1]["val_loss"]
    # Without the checkpoint the run is a different one: the equality above is not trivial.
    fresh = train(tiny_config.replace("train", seed=1), splits)
    assert not torch.equal(fresh.model.head.weight, whole.model.head.weight)


def test_a_damaged_checkpoint_falls_back_to_the_previous_one(tiny_config, tmp_path, caplog):
    splits = load_splits(tiny_config.data)
    kept = {}

    def keep(metrics, checkpoint_dir):
        kept[metrics["epoch"]] = shutil.copytree(
            checkpoint_dir, tmp_path / f"checkpoint_{metrics['epoch']:06d}")

    whole = train(tiny_config, splits, keep)
    shutil.rmtree(kept[3])  # interrupted after epoch 2, whose checkpoint is then cut short
    damaged = kept[2] / CHECKPOINT_FILE
    damaged.write_bytes(damaged.read_bytes()[:4096])
    epochs = []
    resumed = train(tiny_config, splits, lambda m, _: epochs.append(m["epoch"]),
                    resume_from=restore_candidates(kept[2]))
    err = caplog.text
    assert f"checkpoint {kept[2]} is unreadable" in err
    assert f"continuing from the older checkpoint {kept[1]} (epoch 1)" in err
    assert epochs == [2, 3]
    assert torch.equal(resumed.model.head.weight, whole.model.head.weight)
    # A readable file that is not this loop's checkpoint is refused too, and so is another
    # run's checkpoint lying beside it (a temporary folder holds any run's); nothing is left.
    foreign = load_checkpoint(kept[1])
    foreign["config"]["train"]["seed"] = 1
    (tmp_path / "checkpoint_000000").mkdir()
    torch.save(foreign, tmp_path / "checkpoint_000000" / CHECKPOINT_FILE)
    torch.save({"model": {"head.weight": torch.zeros(3)}}, kept[1] / CHECKPOINT_FILE)
    epochs.clear()
    caplog.clear()
    train(tiny_config, splits, lambda m, _: epochs.append(m["epoch"]),
          resume_from=restore_candidates(kept[2]))
    err = caplog.text
    assert "not a checkpoint of this loop" in err and "restarts at epoch 1" in err
    assert f"checkpoint {tmp_path / 'checkpoint_000000'} is another run's" in err
    assert epochs == [1, 2, 3]


def test_a_non_finite_loss_ends_the_run_as_diverged(tiny_config):
    config = tiny_config.replace("train", max_lr=100, div_factor=1.0)
    reports = []
    outcome = train(config, load_splits(config.data), lambda m, c: reports.append((m, c)))
    assert outcome.status == TrialStatus.DIVERGED
    last, checkpoint = reports[-1]
    assert last == {"epoch": outcome.diverged_epoch, "diverged": True, "val_acc": 0.0,
                    "lr": last["lr"]}
    assert checkpoint is None and math.isfinite(last["lr"])
    # Stopped in the epoch it happened: nothing reported after it, nothing diverged before it.
    assert [m["epoch"] for m, _ in reports] == list(range(1, outcome.diverged_epoch + 1))
    assert not any(m["diverged"] for m, _ in reports[:-1])


def smoke_args(data_dir, *extra):
    return ["--config", str(REPO / "configs" / "smoke.yaml"), "--data-dir", str(data_dir), *extra]


@pytest.mark.parametrize("extra, message", [
    (["--set", "train.epochs=0"], "train.epochs: 0 is below the minimum 1"),
    (["--set", "train.lr=0.1"], "unknown config key train.lr"),
    (["--set", "data.val_size=10000"], "data.val_size=10000 exceeds the 500 images available"),
    (["--config", "nope.yaml"], "nope.yaml: config file not found"),
])
def test_cli_refuses_bad_input_with_one_line_and_exit_2(synthetic_dir, capsys, extra, message):
    assert trainable_main(smoke_args(synthetic_dir, *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_cli_offline_with_a_missing_data_directory_says_so_in_one_line(tmp_path, capsys,
                                                                      offline):
    assert trainable_main(smoke_args(tmp_path / "missing")) == 2
    err = capsys.readouterr().err
    assert "missing: CIFAR-10 could not be downloaded" in err and err.count("\n") == 1
    assert not (tmp_path / "missing").exists()


def test_cli_will_not_overwrite_saved_weights(synthetic_dir, tmp_path, capsys):
    existing = tmp_path / "model.pt"
    existing.write_bytes(b"precious")
    assert trainable_main(smoke_args(synthetic_dir, "--save", str(existing))) == 2
    assert existing.read_bytes() == b"precious"


def test_cli_diverged_run_exits_3(synthetic_dir, capsys):
    code = trainable_main(smoke_args(synthetic_dir, "--set", "train.max_lr=100",
                                     "--set", "train.div_factor=1"))
    assert code == 3
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["status"] == TrialStatus.DIVERGED and "test_acc" not in result


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_cli_smoke_run_learns_and_ends_with_json(synthetic_dir, tmp_path):
    saved = tmp_path / "model.pt"
    run = subprocess.run([sys.executable, "-m", "trainable", *smoke_args(synthetic_dir),
                          "--save", str(saved)],
                         capture_output=True, text=True, cwd=REPO, timeout=300, check=True)
    lines = run.stdout.strip().splitlines()
    assert [line.split()[:2] for line in lines[1:3]] == [["epoch", "1"], ["epoch", "2"]]
    result = json.loads(lines[-1])
    assert result["status"] == TrialStatus.COMPLETED and result["test_images"] == 200
    assert result["test_acc"] > 0.5  # 10 classes: chance is 0.1
    assert result["config"]["data"]["dir"] == str(synthetic_dir)
    model = build_model("resnet18")
    model.load_state_dict(torch.load(saved, weights_only=True))
