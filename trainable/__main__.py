"""Train once, without Ray, then test the final model.

    python -m trainable --config configs/smoke.yaml --data-dir DIR [--set section.key=value ...]

Prints one line per epoch (a progress bar while it trains), and as its last line one JSON object:
the outcome, the final metrics with `test_acc`, and the resolved config. Exit codes: 0 trained,
2 bad input (nothing was done), 3 diverged (a loss went non-finite).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from trainable.config import ConfigError, dump_config, load_config
from trainable.constants import DEFAULT_CONFIG, EXIT_BAD_INPUT, EXIT_DIVERGED, TrialStatus
from trainable.errors import DataError
from trainable.experiment import DIVERGED


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m trainable", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config file")
    parser.add_argument("--data-dir", help="CIFAR-10 directory (overrides data.dir)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="override one config value")
    parser.add_argument("--save", type=Path,
                        help="write the final model's weights here (a new file)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.data_dir is not None:
        overrides.append(f"data.dir={json.dumps(args.data_dir)}")
    try:
        if args.save is not None and args.save.exists():
            raise ConfigError(f"{args.save}: exists; refusing to overwrite it")
        if args.save is not None and not args.save.parent.is_dir():
            raise ConfigError(f"{args.save.parent}: directory for --save does not exist")
        config = load_config(args.config, overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    # Only now torch and the data stack (seconds to import): a typo is refused at once.
    import torch

    from trainable.data import load_splits
    from trainable.device import select_runtime
    from trainable.loop import evaluate, make_batches, steps_per_epoch, train

    try:
        splits = load_splits(config.data)
        steps_per_epoch(config, len(splits.train.labels))  # at least one full batch
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT

    runtime = select_runtime()
    val_name = "test (data.val_size=0: selecting on the test set)" if splits.val_is_test \
        else "val"
    print(f"training {config.model.name} on {len(splits.train.labels)} images, validating on "
          f"{len(splits.val.labels)} {val_name}, device {runtime.device}", flush=True)

    def print_epoch(metrics: dict, _checkpoint_dir: str | None) -> None:
        if metrics[DIVERGED]:
            print(f"epoch {metrics['epoch']:3d}  loss went non-finite: diverged", flush=True)
            return
        print(f"epoch {metrics['epoch']:3d}  train loss {metrics['train_loss']:.4f} "
              f"acc {metrics['train_acc']:.4f}  val loss {metrics['val_loss']:.4f} "
              f"acc {metrics['val_acc']:.4f}  lr {metrics['lr']:.5f}  "
              f"{metrics['epoch_s']:.1f}s {metrics['images_per_s']:.0f} img/s", flush=True)

    outcome = train(config, splits, print_epoch, runtime=runtime, progress=True)
    result = {"status": outcome.status, **(outcome.history[-1] if outcome.history else {})}
    if outcome.status != TrialStatus.DIVERGED:
        test_batches = make_batches(splits.test, config, runtime, train=False)
        test = evaluate(outcome.model, test_batches, runtime, config.train.eval_flip_tta)
        result.update(test_loss=test["loss"], test_acc=test["acc"],
                      test_images=len(splits.test.labels))
        if args.save is not None:
            torch.save(outcome.model.state_dict(), args.save)
    result.update(selected_on="test" if splits.val_is_test else "val",
                  config=dump_config(config))
    print(json.dumps(result))
    return EXIT_DIVERGED if outcome.status == TrialStatus.DIVERGED else 0


if __name__ == "__main__":
    sys.exit(main())
