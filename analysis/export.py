"""The winner, to take away: `report/model/` holds its weights alone, a `torch.export` program
that runs with no code of this project, its classes, the study's config and a model card that
says what the model is, how it was trained and how far to trust its figure."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from trainable.config import Config, dump_config
from trainable.constants import IMAGE_SIZE, MEAN, STD
from trainable.model import build_model
from trainable.record import StudyRecord

MODEL_DIR = "model"  # under report/
WEIGHTS_FILE = "weights.pt"  # the state dict alone: torch.load(..., weights_only=True)
PROGRAM_FILE = "model.pt2"  # torch.export.save of `UInt8Classifier`
CLASSES_JSON = "classes.json"  # class names in label order
CONFIG_YAML = "config.yaml"  # the study's resolved config, to run it again
CARD_FILE = "model_card.md"
EXAMPLE_BATCH = 2  # the traced batch; the program takes any batch from 1 up


class UInt8Classifier(nn.Module):
    """The model as a user holds images: uint8 RGB (N, 32, 32, 3) in, logits (N, classes)
    out; the training set's normalisation is inside."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        # In uint8 units, as the images come.
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1) * 255)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float()
        return self.model((x - self.mean) / self.std)


def export_model(model_state: dict[str, torch.Tensor], model_name: str, classes: tuple[str, ...],
                 out: Path) -> None:
    """Weights, the exported program and the classes of one model into the folder `out`."""
    model = build_model(model_name, len(classes))
    model.load_state_dict(model_state)
    model.eval()
    torch.save(model.state_dict(), out / WEIGHTS_FILE)
    example = torch.zeros(EXAMPLE_BATCH, IMAGE_SIZE, IMAGE_SIZE, 3, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        program = torch.export.export(UInt8Classifier(model).eval(), (example,),
                                      dynamic_shapes={"images": {0: batch}})
    torch.export.save(program, out / PROGRAM_FILE)
    (out / CLASSES_JSON).write_text(json.dumps(list(classes), indent=2))


def write_config(config: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(dump_config(config), sort_keys=False))


def model_card(record: StudyRecord, summary: dict[str, Any], experiment_name: str,
               sizes: dict[str, int]) -> str:
    """The model card: the recipe, the data, the winner against the estimate, its figures and
    how far to trust them, what it ran on, and how to run the study again."""
    best, test, trust = summary["best_trial"], summary["test"], summary["trust"]
    winner, pick = best["config"]["train"], best["pick"]
    data = record.config.data
    spread = trust["confirmation"]
    edge = trust["edge_check"]
    seeds = (f"{spread['verdict']}" if spread else
             "not measured: the study ran no confirmation seeds (`--confirm-seeds K`)")
    edges = "; ".join(edge["warnings"]) or "inside the searched ranges"
    selected = ("the test set (data.val_size=0), so the test accuracy is optimistic"
                if record.selected_on == "test" else
                f"a validation split of {sizes['val']:,} images carved from train "
                f"(stratified, data.split_seed={data.split_seed})")
    versions = ", ".join(f"{k} {v}" for k, v in record.versions.items())
    times_lo, times_hi = record.search_space.max_lr.estimate_times
    peak_lo, peak_hi = record.search_space.peak_epoch.range
    return f"""# Model card: {experiment_name}, trial {best['trial_id']}

## What it is
{record.config.model.name} for CIFAR-10's 10 classes (`{CLASSES_JSON}`), trained with SGD and the
one-cycle learning-rate policy. `{PROGRAM_FILE}` takes uint8 RGB images shaped (N, 32, 32, 3)
and returns logits (N, 10); the training set's normalisation is inside it. `{WEIGHTS_FILE}` is
the state dict alone.

```python
import torch
program = torch.export.load("{PROGRAM_FILE}")
logits = program.module()(images)  # images: torch.uint8, (N, 32, 32, 3)
```

## How it was trained
- Recipe: {winner['epochs']} epochs at a global batch of {winner['batch_size']}, max_lr
  {winner['max_lr']:.4g} peaking at the end of epoch {winner['peak_epoch']}, momentum
  {winner['momentum']}, weight decay {winner['weight_decay']}, seed {winner['seed']}; pad,
  crop, flip and cutout augmentation. The whole config: `{CONFIG_YAML}` (the study's) and the
  report's `summary.json` (this trial's).
- Data: {sizes['train']:,} training images from `{data.dir}`; selected on {selected}; tested
  once on {test['images']:,} test images.
- Search: the LR range test estimated {record.estimate:.4g}; the study searched max_lr in
  {times_lo:g}-{times_hi:g} times that and peak epochs {peak_lo}-{peak_hi} with Optuna's
  {record.sampler.name} sampler. The winner's max_lr is {winner['max_lr'] / record.estimate:.2f}
  times the estimate.

## Its figures, and how far to trust them
- Validation accuracy {best['val_acc']:.4f} at epoch {best['best_epoch']}, observed; on a new
  seed, estimated {pick['estimated_val_acc']:.4f} +- {pick['estimated_val_acc_se']:.4f}
  (`search.pick`: {pick['rule']}; {pick['said']});
  test accuracy {test['accuracy']:.4f}, measured once.
- Where it lies in the searched space: {edges}.
- Seeds: {seeds}.

## What it ran on
{versions}; git commit {record.git_commit or 'unknown'}.

## Run the study again
With `{CONFIG_YAML}`, the one beside this card (`--data-dir` where CIFAR-10 is now):
```bash
python study/run.py --config {CONFIG_YAML} --name {experiment_name}-again
```
"""
