"""The study: an LR range test, then a Ray Tune search of max_lr and peak_epoch around its
estimate (an Optuna sampler), every trial a Ray Train run of the one-cycle loop; then the report.

    python study/run.py --num-samples 8                    # a study on this machine
    python study/run.py --config configs/smoke.yaml --local --num-samples 3
    python study/run.py --resume --name study-20261124T130000Z   # continue an interrupted one
    python study/run.py --resume-if-exists --name N ...   # start it, or continue it: a job's
    ray job submit --working-dir . -- python study/run.py --storage /shared/runs ...

Bad input is refused in one line with exit code 2 before Ray starts or anything is written.
"""

from __future__ import annotations

import argparse
import sys
import typing

from study.plan import BadInput, Request, bind, resolve, this_machine
from trainable.constants import EXIT_BAD_INPUT, EXIT_INTERRUPTED
from trainable.errors import ConfigError, DataError
from trainable.experiment import STUDY_JSON
from trainable.logs import log_to_stderr


class OneLineParser(argparse.ArgumentParser):
    """argparse, refusing bad flags as every other bad input is: one line, exit code 2."""

    def error(self, message: str) -> typing.NoReturn:
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def parse_args(argv: list[str] | None) -> Request:
    """The flags as a `Request`: the one place the command line becomes the plan's input."""
    p = OneLineParser(prog="python study/run.py", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (default: configs/default.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE", help="override one config value")
    p.add_argument("--data-dir", help="CIFAR-10 directory (sets data.dir)")
    p.add_argument("--num-samples", type=int, help="trials (sets search.num_samples)")
    p.add_argument("--scheduler", help="fifo or asha (sets search.scheduler)")
    p.add_argument("--confirm-seeds", type=int,
                   help="after the search, rerun its top configs with K more seeds each (sets "
                        "search.confirm_seeds; default 2 when trials get a GPU, else 0)")
    p.add_argument("--storage", default="runs", help="folder holding experiments")
    p.add_argument("--name", help="experiment name (default study-<UTC timestamp>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the experiment --name, launched as it was (study.json)")
    p.add_argument("--resume-if-exists", action="store_true",
                   help="start the experiment --name, or continue it if it exists and was "
                        "started with the same config (one entrypoint for a job's retries)")
    p.add_argument("--overwrite", action="store_true", help="replace the experiment --name")
    p.add_argument("--local", action="store_true",
                   help="run each trial's loop in its Tune trainable: one process, no "
                        "TorchTrainer (what the tests use)")
    p.add_argument("--workers-per-trial", type=int,
                   help="Ray Train workers (DDP) per trial, default 1; train.batch_size is the "
                        "global batch, each worker takes batch_size / workers")
    p.add_argument("--cpus-per-worker", type=float,
                   help="default: 1 less the trial driver's 0.01, so that a trial holds "
                        "whole CPUs and N CPUs fit N one-worker trials")
    p.add_argument("--gpus-per-trial", type=float,
                   help="GPUs per trial, fractions allowed (default: 1 if the cluster has "
                        "GPUs, else 0)")
    p.add_argument("--address",
                   help="join a running cluster ('auto' or host:port); default: the job's "
                        "cluster under `ray job submit`, else a Ray of the study's own")
    p.add_argument("--dashboard-host", default="127.0.0.1",
                   help="interface the dashboard listens on (only when starting Ray)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    p.add_argument("--no-report", action="store_true", help="skip the analysis at the end")
    p.add_argument("--mlflow", metavar="URI",
                   help="send the study to this MLflow tracking server (default: "
                        "MLFLOW_TRACKING_URI, if set; else none)")
    flags = vars(p.parse_args(argv))
    return Request(**{**flags, "overrides": tuple(flags["overrides"])})


def main(argv: list[str] | None = None) -> int:
    request = parse_args(argv)
    log_to_stderr()
    plan = None
    try:
        plan = resolve(request)
        if plan.launch.join is None:
            bind(plan, this_machine())  # a trial too big for it, before Ray starts
        # Only now torch, Ray and Optuna (seconds to import): bad input is refused at once.
        from study import driver

        if plan.finished and not plan.dry_run and driver.said_result(plan):
            return 0
        return driver.run(plan, driver.load_data(plan))
    except (BadInput, ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:  # before the search, or before Tune took over Ctrl-C
        if plan is not None and plan.experiment.is_file(STUDY_JSON):
            from study.driver import interrupted

            return interrupted(plan, 0, plan.config.search.num_samples)
        print("interrupted before the study started; nothing was written", flush=True)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
