"""The errors the entry points refuse input with, and how an error is said in one line. Light
to import: a refusal needs neither torch nor Ray."""

from __future__ import annotations

FIRST_LINE_CHARS = 300  # enough for a path and its reason; a traceback's tail is noise


def first_line(error: BaseException) -> str:
    """The error's first line (its type's name when it says nothing), for a one-line refusal."""
    text = str(error).strip()
    return text.splitlines()[0][:FIRST_LINE_CHARS] if text else type(error).__name__


class DataError(ValueError):
    """Data that cannot be used; the message names the path and what is wrong."""


class ConfigError(ValueError):
    """A configuration value (or the YAML holding it) that cannot be used; one line."""
