"""Where this project's log records go: stderr, one line each. In a Ray trial, stderr reaches
the driver's output (the study starts Ray with `log_to_driver`), so a warning from a trial's
loop is seen where the study runs."""

from __future__ import annotations

import logging
import sys

LOGGERS = ("trainable", "study", "analysis")  # the packages, whose modules log by __name__
FORMAT = "onecycle %(levelname)s: %(message)s"


class _Stderr(logging.StreamHandler):
    """A handler on whatever sys.stderr is when a record comes (a test may replace it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def log_to_stderr(level: int = logging.INFO) -> None:
    """This project's records at `level` and above on stderr; once per process."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(level)
        if not any(isinstance(handler, _Stderr) for handler in logger.handlers):
            handler = _Stderr()
            handler.setFormatter(logging.Formatter(FORMAT))
            logger.addHandler(handler)
