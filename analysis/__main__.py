"""Report on a finished, interrupted or partly failed study.

    python -m analysis runs/study-20261124T130000Z [--data-dir DIR]
    python -m analysis s3://bucket/runs/study-20261124T130000Z

Writes <experiment>/report/ (index.html, summary.json, figures). Exit code 2, with one line,
for a path that is not an experiment, an experiment with no completed trial, or a missing
checkpoint; a report is written whole or not at all.
"""

from __future__ import annotations

import argparse
import sys

from trainable.constants import EXIT_BAD_INPUT


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", help="experiment directory of a study: a path, or a URI "
                        "such as s3://bucket/runs/NAME")
    parser.add_argument("--data-dir", help="where CIFAR-10 is now, if it moved since the study")
    args = parser.parse_args(argv)
    # Only now torch, Ray's results API and matplotlib (seconds to import): --help is at once.
    from analysis.report import ReportError, build_report, where
    from trainable.errors import DataError

    try:
        report = build_report(args.experiment, args.data_dir)
    except (ReportError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print("\n".join(where(report)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
