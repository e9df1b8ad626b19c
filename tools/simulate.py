"""Replay a study's search on a measured table of learning curves, in seconds, with no training:
how close does each sampler's, pick rule's and racing's winner come to the table's best config?

    python tools/simulate.py --table docs/tables/cpu-1500x4.csv --budget 8 16 32 \
        --repeats 200 [--samplers default random tpe:10 tpe gp qmc] [--pick RULE ...] \
        [--race on|off ...] [--seeding common|per-run ...] [--json OUT] [--config C] \
        [--set k=v ...]

The table is what `tools/lr_grid.py` writes (TABLE_COLUMNS: one row per run and epoch), with
any number of seeds per point and of epochs. Each simulated study is the study's own search:
its space around the estimate (the table's max_lr / multiple), its first point, its sampler
(`make_sampler`) asked through Optuna's ask/tell, `search.max_concurrent` trials in flight, and
with racing on, the study's races (`analysis.pick.next_race`: the incumbent's values enqueued
and asked, so the sampler sees the repeat). A suggestion is mapped to the nearest grid point
(log2 max_lr multiple, peak epoch) and gets the curve of one of that point's seeds: with
`common` seeding, as the study runs them, one seed per study (drawn) for every first run and the
next ones of the list for its races; with `per-run`, a seed drawn per run. Its epochs are
reported as intermediate values, then its last is told. Each pick rule (`analysis.pick.pick`,
the study's own) then names the winner after each budget's trials.

`default` is the study's own sampler, pick rule and racing, as the config sets them; `--pick`
and `--race` set them for the other samplers (default: the config's). A sampler is named
`name[:startup]`: random, qmc (scrambled Sobol), tpe or gp, the latter two with that many random
startup trials (without: the study's rule for the budget). For each cell, over the repeats:
- regret: the best point's mean final val_acc (over its seeds) minus the pick's; mean (with
  its standard error) and 90th percentile;
- within spread: how often the regret is at most the table's seed spread (the mean over
  points of the range of their seeds' final val_acc).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import sys
import typing
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search.optuna import OptunaSearch

from analysis.pick import Run, next_race, pick
from study.search import make_sampler, tune_space
from study.space import choose_sampler, first_point, fitted_startup_trials, search_space
from tools.lr_grid import TABLE_COLUMNS
from trainable.config import PICKS, SAMPLERS, Config, ConfigError, load_config
from trainable.constants import DEFAULT_CONFIG, EXIT_BAD_INPUT
from trainable.experiment import EPOCH, METRIC, MODE
from trainable.record import MODEL_FREE, Sampler

SAMPLER_NAMES = tuple(n for n in typing.get_args(SAMPLERS) if n != "auto")
PICK_NAMES = typing.get_args(PICKS)
DEFAULT = "default"  # the study's own sampler, pick rule and racing, as the config sets them
Point = tuple[float, int]  # a grid point: (multiple, peak epoch)
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

    @property
    def seeds(self) -> int:
        """The most seeds any point has (a run's seed index wraps round a point's own)."""
        return max(len(c) for c in self.curves.values())

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


@dataclass(frozen=True)
class Rules:
    """How a simulated study picks its winner and races, as `search.*` sets them."""

    picks: tuple[str, ...]  # each scored on the same studies; one when racing
    race: bool
    max_config_calls: int = 3
    race_every: int = 3
    common_seed: bool = True  # every first run on the study's seed, as the study runs them

    @classmethod
    def of(cls, config: Config, picks: tuple[str, ...] | None = None, race: bool | None = None,
           common_seed: bool = True) -> Rules:
        search = config.search
        return cls(picks or (search.pick,), search.race if race is None else race,
                   search.max_config_calls, search.race_every, common_seed)


def simulate(table: Table, config: Config, choice: Sampler, budgets: list[int], seed: int,
             rules: Rules = Rules(("observed",), race=False)) -> dict[str, list[Point]]:
    """One study of max(`budgets`) trials on the table; for each pick rule, the grid point it
    would pick after each budget's trials had run. A run's seed is an index into its point's
    seeds: with `common_seed`, one per study (drawn) for every first run, and the next ones
    of the list for its races (as the study's `train.seed` + 1, + 2, ...); without, a seed
    drawn per run."""
    if rules.race and len(rules.picks) != 1:
        raise ValueError("a racing study races under one pick rule")
    space = search_space(config, table.estimate)
    bounds = (space.max_lr.range, space.peak_epoch.range)
    distributions = OptunaSearch.convert_search_space(tune_space(space))
    study = optuna.create_study(direction="maximize", sampler=make_sampler(choice, seed))
    study.enqueue_trial(first_point(config, space))
    draws = np.random.default_rng(seed)
    # per run: the draws as the simulator made them before seeds were common
    base_seed = int(draws.integers(table.seeds)) if rules.common_seed else 0
    runs: list[Run] = []  # in the order asked, each with its whole curve
    finished: list[Run] = []  # as the searcher sees them
    in_flight: list[tuple[optuna.Trial, np.ndarray, Run]] = []
    since_race = 0
    while len(runs) < max(budgets) or in_flight:
        while len(runs) < max(budgets) and len(in_flight) < config.search.max_concurrent:
            raced = next_race(finished, [(r.params, r.seed) for *_, r in in_flight],
                              since_race, rules.picks[0], bounds, rules.max_config_calls,
                              rules.race_every, base_seed) if rules.race else None
            if raced is not None:
                (max_lr, peak_epoch), run_seed = raced
                study.enqueue_trial({"max_lr": max_lr, "peak_epoch": peak_epoch})
                since_race = 0
            else:
                run_seed = base_seed
                since_race += 1
            trial = study.ask(fixed_distributions=distributions)
            max_lr, peak_epoch = trial.params["max_lr"], trial.params["peak_epoch"]
            point = table.nearest(max_lr, peak_epoch)
            point_runs = table.curves[point]
            index = run_seed if rules.common_seed else int(draws.integers(table.seeds))
            curve = point_runs[index % len(point_runs)]
            run = Run(max_lr, peak_epoch, run_seed, float(curve.max()), float(curve[-1]),
                      label=f"{len(runs)}")
            runs.append(run)
            in_flight.append((trial, curve, run))
        trial, curve, run = in_flight.pop(0)  # the oldest ends first: every trial runs all epochs
        for epoch, val_acc in enumerate(curve, start=1):
            trial.report(float(val_acc), epoch)
        study.tell(trial, float(curve[-1]))
        finished.append(run)
    return {rule: [table.nearest(*pick(runs[:budget], rule, bounds).params)
                   for budget in budgets] for rule in rules.picks}


def quiet() -> None:
    """Optuna's warnings only: a line per study is noise among a thousand studies."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def _regrets(table: Table, config: Config, spec: str, budgets: list[int], rules: Rules,
             seed: int) -> dict[str, list[float]]:
    """One repeat: each pick rule's regret at each budget."""
    best = table.best_mean_final()
    if budget_free(spec):
        picks = simulate(table, config, sampler_choice(spec, max(budgets)), budgets, seed, rules)
    else:
        each = [simulate(table, config, sampler_choice(spec, b), [b], seed, rules)
                for b in budgets]
        picks = {rule: [e[rule][0] for e in each] for rule in rules.picks}
    return {rule: [best - table.mean_final(point) for point in points]
            for rule, points in picks.items()}


def measure(table: Table, config: Config, spec: str, budgets: list[int], repeats: int,
            seed: int, jobs: int = 1, rules: Rules | None = None) -> list[dict[str, Any]]:
    """Each pick rule's and budget's figures over `repeats` studies, seeded `seed`, `seed + 1`,
    ... (in `jobs` processes: the same figures, sooner)."""
    rules = rules or Rules.of(config, ("observed",), race=False, common_seed=False)
    run = partial(_regrets, table, config, spec, budgets, rules)
    seeds = range(seed, seed + repeats)
    if jobs > 1:  # spawned, not forked: a fork of a process with threads (Ray's) can hang
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=quiet) as pool:
            repeated = list(pool.map(run, seeds))
    else:
        repeated = [run(s) for s in seeds]
    rows = []
    for rule in rules.picks:
        regrets = np.array([r[rule] for r in repeated])
        for column, budget in enumerate(budgets):
            values = regrets[:, column]
            rows.append({
                "sampler": spec, "startup_trials": sampler_choice(spec, budget).startup_trials,
                "pick": rule, "race": rules.race,
                "seeding": "common" if rules.common_seed else "per run",
                "budget": budget, "regret_mean": float(values.mean()),
                "regret_se": float(values.std(ddof=1) / math.sqrt(repeats))
                if repeats > 1 else 0.0,
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


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| sampler | pick | race | seeding | budget | startup | regret mean (se) | "
             "regret p90 | within spread |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['sampler']} | {r['pick']} | {'on' if r['race'] else 'off'} | "
                     f"{r['seeding']} | {r['budget']} | {r['startup_trials']} | "
                     f"{r['regret_mean']:.4f} ({r['regret_se']:.4f}) | {r['regret_p90']:.4f} | "
                     f"{r['within_spread']:.0%} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python tools/simulate.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", type=Path, required=True)
    p.add_argument("--budget", type=int, nargs="+", default=[8, 16, 32], help="trials")
    p.add_argument("--repeats", type=int, default=200, help="simulated studies per cell")
    p.add_argument("--samplers", nargs="+", default=DEFAULT_SAMPLERS, metavar="NAME[:STARTUP]",
                   help="`default`: the study's own sampler, pick rule and racing")
    p.add_argument("--pick", nargs="+", metavar="RULE",
                   help=f"for the samplers but `default`: {', '.join(PICK_NAMES)} (default: the "
                        "config's search.pick)")
    p.add_argument("--race", nargs="+", metavar="on|off",
                   help="for the samplers but `default` (default: the config's search.race)")
    p.add_argument("--seeding", nargs="+", default=["common"], metavar="common|per-run",
                   help="common: every first run of a study on its one seed, as the study "
                        "runs them; per-run: a seed drawn per run")
    p.add_argument("--json", type=Path, metavar="OUT", help="one row per cell")
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
        if spec != DEFAULT and (name not in SAMPLER_NAMES or (
                startup and (not startup.isdigit() or name in MODEL_FREE))):
            raise TableError(f"--samplers {spec}: expected default, random, qmc, tpe[:N] or "
                             "gp[:N]")


def cells(args: argparse.Namespace, config: Config, table: Table) -> list[tuple[str, Rules]]:
    """(sampler, rules) to measure, from the flags; one Rules per racing setting and seeding
    (without racing, every pick rule is scored on the same studies)."""
    for rule in args.pick or []:
        if rule not in PICK_NAMES:
            raise TableError(f"--pick {rule}: expected one of {', '.join(PICK_NAMES)}")
    for race in args.race or []:
        if race not in ("on", "off"):
            raise TableError(f"--race {race}: expected on or off")
    for seeding in args.seeding:
        if seeding not in ("common", "per-run"):
            raise TableError(f"--seeding {seeding}: expected common or per-run")
    picks = tuple(args.pick or (config.search.pick,))
    races = [r == "on" for r in args.race] if args.race else [config.search.race]
    found = []
    for spec in args.samplers:
        for seeding in args.seeding:
            common = seeding == "common"
            if spec == DEFAULT:
                found.append((choice_spec(config), Rules.of(config, common_seed=common)))
                continue
            for race in races:
                found += [(spec, Rules.of(config, (rule,), race, common)) for rule in picks] \
                    if race else [(spec, Rules.of(config, picks, race, common))]
    if any(rules.race for _, rules in found) and table.seeds < 2:
        raise TableError("racing needs a table with 2 or more seeds per point; this one has 1 "
                         "(nothing to race with): add seeds, or --race off")
    return found


def choice_spec(config: Config) -> str:
    """The study's own sampler, as the simulator names it."""
    choice = choose_sampler(config)
    return choice.name if choice.name in MODEL_FREE else f"{choice.name}:{choice.startup_trials}"


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
        measured_cells = cells(args, config, table)
    except (TableError, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.json is not None and args.json.exists():
        print(f"error: {args.json} exists; refusing to overwrite it", file=sys.stderr)
        return EXIT_BAD_INPUT
    quiet()
    best = max(table.curves, key=table.mean_final)
    lo, hi = config.search.max_lr_range
    print(f"{len(table.curves)} grid points, {table.epochs} epochs, up to {table.seeds} seeds "
          f"a point; the best: {best[0]:g}x peak {best[1]}, mean final val_acc "
          f"{table.mean_final(best):.4f}; seed spread {table.seed_spread():.4f}; searched "
          f"{lo:g}-{hi:g}x, peak {list(config.peak_epoch_range)}, "
          f"{config.search.max_concurrent} in flight", flush=True)
    if any(rules.race and rules.max_config_calls > table.seeds for _, rules in measured_cells):
        print(f"note: {table.seeds} seeds a point; races beyond them repeat a seed", flush=True)
    rows = []
    for spec, rules in measured_cells:
        measured = measure(table, config, spec, args.budget, args.repeats, args.seed, args.jobs,
                           rules)
        print("\n".join(markdown(measured).splitlines()[2:]), flush=True)
        rows.extend(measured)
    print(markdown(rows))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))
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
