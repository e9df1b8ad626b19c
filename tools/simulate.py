"""Replay a study's search on a measured table of learning curves, in seconds, with no training:
how close does each sampler's pick come to the table's best config, at each budget?

    python tools/simulate.py --table docs/tables/cpu-1500x4.csv --budget 8 16 32 \
        --repeats 200 [--samplers random tpe:10 tpe gp qmc] [--config C] [--set k=v ...]

The table is what `tools/lr_grid.py` writes (TABLE_COLUMNS: one row per run and epoch). Each
simulated study is the study's own search: its space around the estimate (the table's
max_lr / multiple), its first point, its sampler (`make_sampler`) asked through Optuna's
ask/tell, `search.max_concurrent` trials in flight. A suggestion is mapped to the nearest grid
point (log2 max_lr multiple, peak epoch) and gets the curve of one of that point's seeds, chosen
at random (seeded). Its epochs are reported as intermediate values, then its last is told.
The pick is the study's: the trial with the highest val_acc at any epoch.

A sampler is named `name[:startup]`: random, qmc (scrambled Sobol), tpe or gp, the latter two
with that many random startup trials (without: the study's rule for the budget). For each
sampler and budget, over the repeats:
- regret: the best point's mean final val_acc (over its seeds) minus the pick's; mean (with
  its standard error) and 90th percentile;
- within spread: how often the regret is at most the table's seed spread (the mean over
  points of the range of their seeds' final val_acc).
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import sys
import typing
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search.optuna import OptunaSearch

from study.search import make_sampler, tune_space
from study.space import first_point, fitted_startup_trials, search_space
from tools.lr_grid import TABLE_COLUMNS
from trainable.config import SAMPLERS, Config, ConfigError, load_config
from trainable.constants import DEFAULT_CONFIG, EXIT_BAD_INPUT
from trainable.experiment import EPOCH, METRIC, MODE
from trainable.record import MODEL_FREE, Sampler

SAMPLER_NAMES = tuple(n for n in typing.get_args(SAMPLERS) if n != "auto")
DEFAULT_SAMPLERS = ["random", "tpe:10", "tpe", "gp", "qmc"]  # tpe:10 is Ray's default TPE


class TableError(ValueError):
    """A table the simulator cannot replay; its message is the one line the user sees."""


@dataclass(frozen=True)
class Table:
    """Learning curves on a grid: per point (multiple, peak epoch), an array seeds x epochs."""

    curves: dict[tuple[float, int], np.ndarray]
    estimate: float  # the range test's LR: max_lr / multiple

    @property
    def epochs(self) -> int:
        return next(iter(self.curves.values())).shape[1]

    def mean_final(self, point: tuple[float, int]) -> float:
        return float(self.curves[point][:, -1].mean())

    def best_mean_final(self) -> float:
        return max(self.mean_final(p) for p in self.curves)

    def seed_spread(self) -> float:
        return float(np.mean([np.ptp(c[:, -1]) for c in self.curves.values()]))

    def nearest(self, max_lr: float, peak_epoch: int) -> tuple[float, int]:
        """The grid point nearest in (log2 multiple, peak epoch); ties go to the smaller."""
        log_multiple = math.log2(max_lr / self.estimate)
        # rounded: the log middle of a range of grid points is a tie, and must stay one
        return min(self.curves, key=lambda p: (round((math.log2(p[0]) - log_multiple) ** 2
                                                     + (p[1] - peak_epoch) ** 2, 9), p))


def read_table(path: Path) -> Table:
    try:
        frame = pd.read_csv(path)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise TableError(f"cannot read the table {path}: {e}") from e
    missing = [c for c in TABLE_COLUMNS if c not in frame.columns]
    if missing:
        raise TableError(f"the table {path} lacks the columns {', '.join(missing)} "
                         f"(it needs {', '.join(TABLE_COLUMNS)})")
    if frame.empty or frame[list(TABLE_COLUMNS)].isna().any().any():
        raise TableError(f"the table {path} has no rows or empty cells")
    if (frame["multiple"] <= 0).any() or (frame["max_lr"] <= 0).any():
        raise TableError(f"the table {path} has a multiple or max_lr that is not positive")
    epochs = list(range(1, int(frame[EPOCH].max()) + 1))
    curves: dict[tuple[float, int], np.ndarray] = {}
    for (multiple, peak), point in frame.groupby(["multiple", "peak_epoch"]):
        runs = []
        for seed, run in point.groupby("seed"):
            if sorted(run[EPOCH]) != epochs:
                raise TableError(f"the table {path}: multiple {multiple:g}, peak epoch {peak}, "
                                 f"seed {seed} lacks some of epochs 1-{epochs[-1]}")
            runs.append(run.sort_values(EPOCH)[METRIC].to_numpy(float))
        curves[(float(multiple), int(peak))] = np.stack(runs)
    estimate = float((frame["max_lr"] / frame["multiple"]).median())
    return Table(curves, estimate)


def sampler_choice(spec: str, budget: int) -> Sampler:
    name, _, startup = spec.partition(":")
    if name in MODEL_FREE:
        return Sampler(name=name, startup_trials=budget)
    return Sampler(name=name, startup_trials=int(startup) if startup
                   else fitted_startup_trials(name, budget))


def budget_free(spec: str) -> bool:
    """Whether the sampler behaves the same whatever the budget: then a study of 8 trials is
    the first 8 of a study of 32 (asked in the same order after the same tells), and one run
    gives every budget's pick."""
    name = spec.partition(":")[0]
    return name in MODEL_FREE or len({sampler_choice(spec, b).startup_trials
                                      for b in (1, 8, 1000)}) == 1


def simulate(table: Table, config: Config, choice: Sampler, budgets: list[int],
             seed: int) -> list[tuple[float, int]]:
    """One study of max(`budgets`) trials on the table; the grid point it would pick after
    each budget's trials had been asked (and run)."""
    space = search_space(config, table.estimate)
    first = first_point(config, space)
    distributions = OptunaSearch.convert_search_space(tune_space(space))
    study = optuna.create_study(direction="maximize", sampler=make_sampler(choice, seed))
    study.enqueue_trial(first)
    seeds = np.random.default_rng(seed)
    in_flight: list[tuple[optuna.Trial, np.ndarray]] = []
    best: tuple[float, tuple[float, int]] | None = None
    picks: dict[int, tuple[float, int]] = {}
    asked = 0
    while asked < max(budgets) or in_flight:
        while asked < max(budgets) and len(in_flight) < config.search.max_concurrent:
            trial = study.ask(fixed_distributions=distributions)
            point = table.nearest(trial.params["max_lr"], trial.params["peak_epoch"])
            runs = table.curves[point]
            curve = runs[seeds.integers(len(runs))]
            in_flight.append((trial, curve))
            asked += 1
            if best is None or curve.max() > best[0]:  # ties: the earlier trial
                best = (float(curve.max()), point)
            picks[asked] = best[1]
        trial, curve = in_flight.pop(0)  # the oldest ends first: every trial runs all epochs
        for epoch, val_acc in enumerate(curve, start=1):
            trial.report(float(val_acc), epoch)
        study.tell(trial, float(curve[-1]))
    return [picks[budget] for budget in budgets]


def _regrets(table: Table, config: Config, spec: str, budgets: list[int],
             seed: int) -> list[float]:
    """One repeat: each budget's regret."""
    best = table.best_mean_final()
    if budget_free(spec):
        picks = simulate(table, config, sampler_choice(spec, max(budgets)), budgets, seed)
    else:
        picks = [simulate(table, config, sampler_choice(spec, b), [b], seed)[0]
                 for b in budgets]
    return [best - table.mean_final(pick) for pick in picks]


def measure(table: Table, config: Config, spec: str, budgets: list[int], repeats: int,
            seed: int, jobs: int = 1) -> list[dict[str, float]]:
    """Each budget's figures over `repeats` studies, seeded `seed`, `seed + 1`, ... (in `jobs`
    processes: the same figures, sooner)."""
    run = partial(_regrets, table, config, spec, budgets)
    seeds = range(seed, seed + repeats)
    if jobs > 1:  # spawned, not forked: a fork of a process with threads (Ray's) can hang
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            regrets = np.array(list(pool.map(run, seeds)))
    else:
        regrets = np.array([run(s) for s in seeds])
    rows = []
    for column, budget in enumerate(budgets):
        values = regrets[:, column]
        rows.append({
            "sampler": spec, "startup_trials": sampler_choice(spec, budget).startup_trials,
            "budget": budget, "regret_mean": float(values.mean()),
            "regret_se": float(values.std(ddof=1) / math.sqrt(repeats)) if repeats > 1 else 0.0,
            "regret_p90": float(np.quantile(values, 0.9)),
            "within_spread": float((values <= table.seed_spread()).mean())})
    return rows


class _Run:
    """A trial as Tune's scheduler sees it."""

    def __init__(self, trial_id: str):
        self.trial_id = trial_id


def rung_correlations(table: Table, config: Config) -> dict[int, float]:
    """Spearman's rank correlation, over every run of the searched grid points, between
    val_acc after each epoch but the last and the final val_acc."""
    runs = np.concatenate([table.curves[p] for p in searched_points(table, config)])
    ranks = pd.DataFrame(runs).rank()
    return {epoch: float(np.corrcoef(ranks[epoch - 1], ranks[table.epochs - 1])[0, 1])
            for epoch in range(1, table.epochs)}


def searched_points(table: Table, config: Config) -> list[tuple[float, int]]:
    lo, hi = config.search.max_lr_range
    peak_lo, peak_hi = config.peak_epoch_range
    points = {table.nearest(table.estimate * m, p) for m in np.geomspace(lo, hi, 64)
              for p in range(peak_lo, peak_hi + 1)}
    return sorted(points)


def asha_study(table: Table, config: Config, grace_period: int, budget: int,
               seed: int) -> tuple[bool, float, float]:
    """A random search of `budget` trials over the searched points, run under Tune's own
    ASHAScheduler (reduction factor 4), `search.max_concurrent` trials in flight advancing an
    epoch each in turn. Returns whether a trial of the best point drawn (highest mean final
    val_acc) ran to the end, and the regrets of the picks (highest val_acc at any epoch) of
    FIFO, among all trials, and of ASHA, among those it let finish."""
    rng = np.random.default_rng(seed)
    points = searched_points(table, config)
    trials = []
    for index in range(budget):
        point = points[rng.integers(len(points))]
        runs = table.curves[point]
        trials.append((_Run(str(index)), point, runs[rng.integers(len(runs))]))
    scheduler = ASHAScheduler(time_attr=EPOCH, metric=METRIC, mode=MODE,
                              max_t=table.epochs, grace_period=grace_period)
    finished, waiting, in_flight = [], list(trials), []
    while waiting or in_flight:
        while waiting and len(in_flight) < config.search.max_concurrent:
            in_flight.append([*waiting.pop(0), 0])
            scheduler.on_trial_add(None, in_flight[-1][0])
        for entry in list(in_flight):
            run, point, curve, epoch = entry
            entry[3] = epoch = epoch + 1
            decision = scheduler.on_trial_result(None, run, {EPOCH: epoch,
                                                             METRIC: curve[epoch - 1]})
            if decision == TrialScheduler.STOP or epoch == table.epochs:
                in_flight.remove(entry)
                if epoch == table.epochs:
                    finished.append((run, point, curve))
    best = table.best_mean_final()
    best_drawn = max(table.mean_final(t[1]) for t in trials)
    fifo_pick = max(trials, key=lambda t: t[2].max())  # ties: the earlier trial
    asha_pick = max(finished, key=lambda t: t[2].max())
    return (any(table.mean_final(t[1]) == best_drawn for t in finished),
            best - table.mean_final(fifo_pick[1]), best - table.mean_final(asha_pick[1]))


def asha_figures(table: Table, config: Config, budget: int, repeats: int,
                 seed: int) -> list[dict[str, float]]:
    rows = []
    for grace_period in range(1, table.epochs):
        studies = np.array([asha_study(table, config, grace_period, budget, seed + repeat)
                            for repeat in range(repeats)])
        rows.append({"grace_period": grace_period, "budget": budget,
                     "best_point_survives": float(studies[:, 0].mean()),
                     "fifo_regret_mean": float(studies[:, 1].mean()),
                     "asha_regret_mean": float(studies[:, 2].mean())})
    return rows


def markdown(rows: list[dict[str, float]]) -> str:
    lines = ["| sampler | budget | startup | regret mean (se) | regret p90 | within spread |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['sampler']} | {r['budget']} | {r['startup_trials']} | "
                     f"{r['regret_mean']:.4f} ({r['regret_se']:.4f}) | {r['regret_p90']:.4f} | "
                     f"{r['within_spread']:.0%} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python tools/simulate.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", type=Path, required=True)
    p.add_argument("--budget", type=int, nargs="+", default=[8, 16, 32], help="trials")
    p.add_argument("--repeats", type=int, default=200, help="simulated studies per cell")
    p.add_argument("--samplers", nargs="+", default=DEFAULT_SAMPLERS, metavar="NAME[:STARTUP]")
    p.add_argument("--seed", type=int, default=0, help="of the first repeat; then +1 each")
    p.add_argument("--jobs", type=int, default=1, help="processes; the figures do not change")
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE")
    return p.parse_args(argv)


def check_counts(budgets: list[int], jobs: int, repeats: int, samplers: list[str]) -> None:
    if min(budgets) < 1:
        raise TableError(f"--budget {min(budgets)}: a study needs at least 1 trial")
    if jobs < 1:
        raise TableError(f"--jobs {jobs}: at least 1")
    if repeats < 1:
        raise TableError(f"--repeats {repeats}: at least 1")
    for spec in samplers:
        name, _, startup = spec.partition(":")
        if name not in SAMPLER_NAMES or (startup and (not startup.isdigit()
                                                      or name in MODEL_FREE)):
            raise TableError(f"--samplers {spec}: expected one of random, qmc, tpe[:N], gp[:N]")


def study_config(path: str, overrides: list[str], table: Table) -> Config:
    """The study's config (file `path`, `--set` overrides) at the table's budget: its epochs,
    and unless the config sets one, a peak epoch range spanning the table's."""
    peaks = sorted({p for _, p in table.curves})
    config = load_config(path, [*overrides, f"train.epochs={table.epochs}",
                                f"train.peak_epoch={peaks[0]}"])
    if config.search.peak_epoch_range is None and peaks[0] < peaks[-1]:
        config = config.replace("search", peak_epoch_range=(peaks[0], peaks[-1]))
    return config


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_counts(args.budget, args.jobs, args.repeats, args.samplers)
        table = read_table(args.table)
        config = study_config(args.config, args.overrides, table)
    except (TableError, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    best = max(table.curves, key=table.mean_final)
    lo, hi = config.search.max_lr_range
    print(f"{len(table.curves)} grid points, {table.epochs} epochs; the best: "
          f"{best[0]:g}x peak {best[1]}, mean final val_acc {table.mean_final(best):.4f}; "
          f"seed spread {table.seed_spread():.4f}; searched {lo:g}-{hi:g}x, peak "
          f"{list(config.peak_epoch_range)}, {config.search.max_concurrent} in flight",
          flush=True)
    rows = []
    for spec in args.samplers:
        measured = measure(table, config, spec, args.budget, args.repeats, args.seed, args.jobs)
        print("\n".join(markdown(measured).splitlines()[2:]), flush=True)
        rows.extend(measured)
    print(markdown(rows))
    print("ASHA: rank correlation of val_acc after each epoch with the final val_acc "
          "(Spearman, every run of the searched points):")
    for epoch, rho in rung_correlations(table, config).items():
        print(f"  epoch {epoch}: {rho:.3f}")
    print(f"ASHA (reduction factor 4) on random searches of {max(args.budget)} trials "
          f"({args.repeats} each): | grace period | best point survives | regret FIFO | "
          "regret ASHA |")
    for r in asha_figures(table, config, max(args.budget), args.repeats, args.seed):
        print(f"| {r['grace_period']} | {r['best_point_survives']:.0%} | "
              f"{r['fifo_regret_mean']:.4f} | {r['asha_regret_mean']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
