"""Property-based tests (hypothesis) over the config and the study's command line: every input
is accepted and valid, or refused in one line with exit code 2; never a traceback, and nothing
is written before the study starts."""

from __future__ import annotations

import dataclasses
import math
import tempfile
import typing
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import study.driver
import study.run
from trainable.config import Config, ConfigError, dump_config, from_dict, load_config

from .helpers import REPO

SMOKE = REPO / "configs" / "smoke.yaml"
KEYS = [f"{section.name}.{field.name}"
        for section in dataclasses.fields(Config)
        for field in dataclasses.fields(typing.get_type_hints(Config)[section.name])]

yaml_values = st.one_of(
    st.integers(-10**12, 10**12).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["true", "false", "null", "~", "[]", "{}", "[1, 2]", "[0.1, 10]", "[2, 1]",
                     "1e6", "-0", ".nan", ".inf", "'5'", "cpu", "gpu", "asha", "fifo",
                     "resnet18", "resnet18_era", "[1, 2, 3]", "{a: 1}", "'", "[", ": x"]),
    st.text(max_size=12),
)
plausible = st.one_of(st.integers(0, 6).map(str), st.floats(1e-4, 10).map(repr),
                      st.sampled_from(["true", "false", "[1, 2]", "cpu", "asha"]))
overrides = st.one_of(
    st.tuples(st.sampled_from(KEYS), plausible),  # most often a known key, a likely value
    st.tuples(st.sampled_from(KEYS), yaml_values),
    st.tuples(st.text(max_size=15), yaml_values),
).map(lambda kv: f"{kv[0]}={kv[1]}")
FAST = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@FAST
@given(st.lists(overrides, max_size=2))
def test_any_overrides_give_a_valid_config_or_one_line_error(changes):
    try:
        config = load_config(SMOKE, changes)
    except ConfigError as err:
        event("refused")
        assert str(err) and "\n" not in str(err)
        return
    event("accepted")
    assert from_dict(dump_config(config)) == config  # what is accepted is also saved faithfully
    t = config.train
    assert 1 <= t.peak_epoch <= t.epochs and t.batch_size >= 1
    assert math.isfinite(t.max_lr) and t.max_lr > 0
    lo, hi = config.peak_epoch_range
    assert 1 <= lo < hi <= t.epochs or config.search.peak_epoch_range is None


def _flag(name: str, values) -> st.SearchStrategy:
    return values.map(lambda v: [name, v])


numbers = st.one_of(st.integers(-3, 12).map(str), st.sampled_from(
    ["nan", "inf", "-inf", "0.5", "1e9", "x", "", "-0.0", "0.01"]))
flags = st.one_of(
    _flag("--num-samples", numbers),
    _flag("--scheduler", st.sampled_from(["fifo", "asha", "pbt", "", "ASHA"])),
    _flag("--workers-per-trial", numbers),
    _flag("--cpus-per-worker", numbers),
    _flag("--gpus-per-trial", numbers),
    _flag("--name", st.one_of(st.sampled_from(["ok", ".", "..", "a/b", "-x", " ", "x\x00y"]),
                              st.text(max_size=8))),
    _flag("--set", overrides),
    _flag("--data-dir", st.sampled_from(["/nonexistent", "", "."])),
    st.sampled_from([["--resume"], ["--overwrite"], ["--local"], ["--dry-run"],
                     ["--no-report"], ["--bogus"], ["--num-samples"]]),
)


@pytest.fixture(scope="module")
def storage_root():
    with tempfile.TemporaryDirectory() as root:
        yield Path(root)


@FAST
@given(argv=st.lists(flags, max_size=5).map(lambda parts: [a for part in parts for a in part]))
def test_any_command_line_starts_a_valid_study_or_is_refused_in_one_line(
        argv, synthetic_dir, storage_root, monkeypatch, capsys, offline):
    started = []
    monkeypatch.setattr(study.driver, "run", lambda plan, splits: started.append(plan) or 0)
    storage = storage_root / "runs"
    base = ["--config", str(SMOKE), "--data-dir", str(synthetic_dir), "--storage", str(storage)]
    try:
        code = study.run.main(base + argv)
    except SystemExit as exit_:  # argparse's own refusals
        code = exit_.code
    err = capsys.readouterr().err
    event(f"exit code {code}")
    assert code in (0, 2)
    if code == 2:
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert not started
    else:
        (plan,) = started
        assert plan.config == from_dict(dump_config(plan.config))
        assert plan.experiment.parent.path == str(storage)
    assert not storage.exists()  # nothing is written before the study starts
