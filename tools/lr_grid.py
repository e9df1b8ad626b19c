"""A table of this problem: learning curves (val_acc after every epoch) over a grid of max_lr
multiples of the LR range test's estimate x peak epochs x seeds. No Ray: the plain loop, one
run at a time. `tools/simulate.py` replays a study's search on the table.

    python tools/lr_grid.py --data-dir DIR --out table.csv [--config C] [--set k=v ...] \
        [--multiples 0.25 0.5 1 2 4 8 16] [--peak-epochs 1 2] [--seeds 0 1]

The range test runs first, on the training split at `train.batch_size`. Then one run per
(multiple, peak epoch, seed), with `train.max_lr = multiple x estimate`. Peak epochs default to
every one the study's search could pick at this config (`search.peak_epoch_range`). Each run's
epochs are appended to --out as they end, one row per run and epoch (TABLE_COLUMNS); a
diverged run's later epochs score 0.0, as a study ranks it last. Then a table of the final
val_acc's means over seeds. It measures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from pathlib import Path

from trainable.config import ConfigError, load_config
from trainable.constants import DEFAULT_CONFIG, EXIT_BAD_INPUT, TrialStatus
from trainable.data import load_splits
from trainable.device import select_runtime
from trainable.experiment import EPOCH, METRIC
from trainable.loop import train
from trainable.lr_range import range_test

TABLE_COLUMNS = ("multiple", "max_lr", "peak_epoch", "seed", EPOCH, METRIC)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python tools/lr_grid.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--data-dir", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE")
    p.add_argument("--multiples", type=float, nargs="+",
                   default=[0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0])
    p.add_argument("--peak-epochs", type=int, nargs="+", default=None,
                   help="default: every epoch of search.peak_epoch_range")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--out", type=Path, required=True, help="the table (CSV); must not exist")
    p.add_argument("--estimate", type=float, metavar="LR",
                   help="the range test's estimate, instead of running it: to add seeds to a "
                        "table, give its own (its max_lr / multiple)")
    return p.parse_args(argv)


def curve(history: list[dict], epochs: int) -> list[float]:
    """val_acc after each of `epochs` epochs; 0.0 for any epoch after a run diverged."""
    scores = [0.0 if not (m[METRIC] == m[METRIC]) else float(m[METRIC])
              for m in history]  # NaN != NaN
    return scores + [0.0] * (epochs - len(scores))


def summary(rows: list[dict]) -> str:
    """Markdown: final val_acc's mean over seeds, one row per multiple, one column per peak
    epoch; the best cell in bold."""
    last = max(r[EPOCH] for r in rows)
    finals: dict[tuple[float, int], list[float]] = {}
    for r in rows:
        if r[EPOCH] == last:
            finals.setdefault((r["multiple"], r["peak_epoch"]), []).append(r[METRIC])
    means = {k: statistics.mean(v) for k, v in finals.items()}
    best = max(means, key=means.get)
    peaks = sorted({p for _, p in means})
    lines = ["| multiple | " + " | ".join(f"peak {p}" for p in peaks) + " |",
             "|---|" + "---|" * len(peaks)]
    for multiple in sorted({m for m, _ in means}):
        cells = []
        for peak in peaks:
            text = f"{means[(multiple, peak)]:.3f}" if (multiple, peak) in means else "-"
            cells.append(f"**{text}**" if (multiple, peak) == best else text)
        lines.append(f"| {multiple:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.out.exists():
        print(f"error: {args.out} exists; the grid writes a new table", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.estimate is not None and not args.estimate > 0:
        print(f"error: --estimate {args.estimate}: a learning rate above 0", file=sys.stderr)
        return EXIT_BAD_INPUT
    overrides = [*args.overrides, f"data.dir={json.dumps(args.data_dir)}"]
    try:
        base = load_config(args.config, overrides)
        peaks = args.peak_epochs or list(range(base.peak_epoch_range[0],
                                               base.peak_epoch_range[1] + 1))
        for peak in peaks:
            base.replace("train", peak_epoch=peak)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    splits = load_splits(base.data)
    runtime = select_runtime()
    print(f"{len(splits.train.labels)} training images, {len(splits.val.labels)} val; "
          f"device {runtime.device}", flush=True)
    if args.estimate is None:
        estimate = range_test(base, splits)["suggested_lr"]
        print(f"range-test estimate {estimate:.5f} at batch {base.train.batch_size}", flush=True)
    else:
        estimate = args.estimate
        print(f"estimate {estimate:.6g} (given)", flush=True)
    rows: list[dict] = []
    with args.out.open("x", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=TABLE_COLUMNS)
        writer.writeheader()
        for multiple in args.multiples:
            for peak in peaks:
                for seed in args.seeds:
                    run = base.replace("train", max_lr=estimate * multiple, peak_epoch=peak,
                                       seed=seed)
                    started = time.perf_counter()
                    outcome = train(run, splits, runtime=runtime)
                    scores = curve(outcome.history, run.train.epochs)
                    for epoch, val_acc in enumerate(scores, start=1):
                        row = {"multiple": multiple, "max_lr": round(run.train.max_lr, 6),
                               "peak_epoch": peak, "seed": seed, EPOCH: epoch,
                               METRIC: round(val_acc, 4)}
                        writer.writerow(row)
                        rows.append(row)
                    out.flush()
                    diverged = " (diverged)" if outcome.status == TrialStatus.DIVERGED else ""
                    print(f"{multiple:g}x peak {peak} seed {seed}: "
                          f"{' '.join(f'{s:.3f}' for s in scores)}{diverged} "
                          f"in {time.perf_counter() - started:.0f} s", flush=True)
    print(summary(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
