"""Where the best max_lr lies relative to the LR range test's estimate: the evidence for the
default `search.max_lr_range`. No Ray: the plain loop, one run at a time.

    python study/lr_grid.py --data-dir DIR [--config C] [--set section.key=value ...] \
        [--batch-sizes 128 512] [--multiples 0.25 0.5 1 2 4 8 16] [--seeds 0 1] [--out grid.json]

For each batch size (a budget): the range test's estimate on the training split, then one run
per multiple of it and seed, with `train.max_lr = multiple x estimate`. Each run's final
val_acc (what a study selects on) and test_acc are printed as they come and written to --out;
then a table of the means over seeds. It measures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from trainable.config import load_config, to_dict
from trainable.constants import DEFAULT_CONFIG, TrialStatus
from trainable.data import load_splits
from trainable.device import select_runtime
from trainable.loop import evaluate, make_batches, train
from trainable.lr_range import range_test


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python study/lr_grid.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--data-dir", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 512])
    p.add_argument("--multiples", type=float, nargs="+",
                   default=[0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--out", type=Path, default=Path("lr_grid.json"))
    return p.parse_args(argv)


def table(runs: list[dict[str, Any]]) -> str:
    """Markdown: one row per (batch size, multiple), means over seeds; the best row per batch
    size in bold."""
    lines = ["| batch | estimate | multiple | max_lr | val_acc (mean; per seed) | test_acc |",
             "|---|---|---|---|---|---|"]
    for batch in sorted({r["batch_size"] for r in runs}):
        rows = [r for r in runs if r["batch_size"] == batch]
        by_multiple = {m: [r for r in rows if r["multiple"] == m]
                       for m in sorted({r["multiple"] for r in rows})}
        means = {m: statistics.mean(r["val_acc"] for r in rs) for m, rs in by_multiple.items()}
        best = max(means, key=means.get)
        for multiple, rs in by_multiple.items():
            seeds = ", ".join(f"{r['val_acc']:.3f}" for r in rs)
            test = statistics.mean(r["test_acc"] for r in rs)
            row = (f"{batch} | {rs[0]['estimate']:.4f} | {multiple:g} | {rs[0]['max_lr']:.4f} | "
                   f"{means[multiple]:.3f}; {seeds} | {test:.3f}")
            lines.append(f"| **{row}** |" if multiple == best else f"| {row} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = [*args.overrides, f"data.dir={json.dumps(args.data_dir)}"]
    base = load_config(args.config, overrides)
    splits = load_splits(base.data)
    runtime = select_runtime()
    print(f"{len(splits.train.labels)} training images, {len(splits.val.labels)} val, "
          f"{len(splits.test.labels)} test; device {runtime.device}", flush=True)
    runs: list[dict[str, Any]] = []
    for batch in args.batch_sizes:
        config = base.replace("train", batch_size=batch)
        estimate = range_test(config, splits)["suggested_lr"]
        print(f"batch {batch}: range-test estimate {estimate:.5f}", flush=True)
        for multiple in args.multiples:
            for seed in args.seeds:
                run = config.replace("train", max_lr=estimate * multiple, seed=seed)
                started = time.perf_counter()
                outcome = train(run, splits, runtime=runtime)
                record = {"batch_size": batch, "estimate": estimate, "multiple": multiple,
                          "max_lr": run.train.max_lr, "seed": seed, "status": outcome.status,
                          "val_acc": 0.0, "test_acc": 0.0}  # a diverged run scores nothing
                if outcome.status != TrialStatus.DIVERGED:
                    test = evaluate(outcome.model, make_batches(splits.test, run, runtime,
                                                                train=False), runtime)
                    record.update(val_acc=outcome.history[-1]["val_acc"], test_acc=test["acc"])
                record["wall_s"] = round(time.perf_counter() - started, 1)
                runs.append(record)
                print(json.dumps(record), flush=True)
                args.out.write_text(json.dumps({"config": to_dict(base), "runs": runs},
                                               indent=1))
    print(table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
