"""Frozen configuration dataclasses, loaded from YAML and checked before any work starts.

Units and the reason for each default are in the YAML files under configs/; the bounds a
value must respect live here, next to the field, as `metadata`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trainable.constants import MODEL_NAMES, RESNET18


class ConfigError(ValueError):
    """A configuration value (or the YAML holding it) that cannot be used; one line."""


def _bounded(default: Any, lo: float | None = None, hi: float | None = None,
             choices: tuple[str, ...] | None = None) -> Any:
    return field(default=default, metadata={"lo": lo, "hi": hi, "choices": choices})


AUGMENT_ON = ("auto", "cpu", "gpu")
SCHEDULERS = ("fifo", "asha")


@dataclass(frozen=True)
class DataConfig:
    dir: str = "data/cifar10"
    val_size: int = _bounded(5000, lo=0)
    split_seed: int = _bounded(0, lo=0)
    limit_train: int = _bounded(0, lo=0)
    limit_test: int = _bounded(0, lo=0)
    num_workers: int | None = _bounded(None, lo=0)
    augment_on: str = _bounded("auto", choices=AUGMENT_ON)
    pad: int = _bounded(4, lo=0, hi=16)
    cutout: int = _bounded(8, lo=0, hi=32)


@dataclass(frozen=True)
class ModelConfig:
    name: str = _bounded(RESNET18, choices=MODEL_NAMES)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = _bounded(20, lo=1)
    batch_size: int = _bounded(512, lo=1)
    max_lr: float = _bounded(0.1, lo=1e-8)
    peak_epoch: int = _bounded(5, lo=1)
    div_factor: float = _bounded(25.0, lo=1.0)
    final_div_factor: float = _bounded(1e4, lo=1.0)
    momentum: float = _bounded(0.9, lo=0.0, hi=0.999)
    nesterov: bool = True
    weight_decay: float = _bounded(5e-4, lo=0.0, hi=1.0)
    label_smoothing: float = _bounded(0.0, lo=0.0, hi=0.5)
    eval_flip_tta: bool = False
    compile: bool = False
    seed: int = _bounded(0, lo=0)


@dataclass(frozen=True)
class LrFinderConfig:
    start_lr: float = _bounded(1e-5, lo=1e-10)
    end_lr: float = _bounded(10.0, lo=1e-8)
    # torch-lr-finder needs 17 points for its smoothing to mean anything.
    num_iter: int = _bounded(100, lo=17)


@dataclass(frozen=True)
class SearchConfig:
    num_samples: int = _bounded(8, lo=1)
    max_lr_range: tuple[float, float] = (0.5, 2.0)
    peak_epoch_range: tuple[int, int] | None = None
    scheduler: str = _bounded("fifo", choices=SCHEDULERS)
    grace_period: int = _bounded(2, lo=1)
    max_concurrent: int = _bounded(2, lo=1)
    max_failures: int = _bounded(1, lo=0)
    num_to_keep: int = _bounded(2, lo=1)


@dataclass(frozen=True)
class ReportConfig:
    num_misclassified: int = _bounded(20, lo=1, hi=100)


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lr_finder: LrFinderConfig = field(default_factory=LrFinderConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    def __post_init__(self) -> None:
        train = self.train
        if train.peak_epoch > train.epochs:
            raise ConfigError(f"train.peak_epoch={train.peak_epoch} must be <= "
                              f"train.epochs={train.epochs}")
        if self.lr_finder.start_lr >= self.lr_finder.end_lr:
            raise ConfigError("lr_finder.start_lr must be below lr_finder.end_lr")
        lo, hi = self.search.max_lr_range
        if not 0 < lo < hi:
            raise ConfigError(f"search.max_lr_range={[lo, hi]} needs 0 < lo < hi")
        if self.search.peak_epoch_range is None:
            return
        lo, hi = self.search.peak_epoch_range
        if not 1 <= lo < hi <= train.epochs:
            raise ConfigError(f"search.peak_epoch_range={[lo, hi]} needs "
                              f"1 <= lo < hi <= train.epochs={train.epochs}")

    @property
    def peak_epoch_range(self) -> tuple[int, int]:
        """The searched peak epochs; by default the first half of training, as the original
        peaked at epoch 5 of 20 (at least [1, 2] so that there is something to search)."""
        if self.search.peak_epoch_range is not None:
            return self.search.peak_epoch_range
        return 1, max(2, self.train.epochs // 2)

    def replace(self, section: str, **values: Any) -> Config:
        """A copy with some fields of one section changed, validated again."""
        return from_dict(set_dotted(to_dict(self),
                                    {f"{section}.{k}": v for k, v in values.items()}))


def to_dict(config: Config) -> dict[str, Any]:
    """Plain dict (lists, not tuples) that YAML and JSON can hold and `from_dict` reads back."""
    return yaml.safe_load(yaml.safe_dump(_plain(dataclasses.asdict(config))))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def _check_value(where: str, hint: Any, value: Any, meta: typing.Mapping[str, Any]) -> Any:
    """Return `value` converted to the field's type, or raise ConfigError naming `where`."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [h for h in typing.get_args(hint) if h is not type(None)]
        return None if value is None else _check_value(where, inner[0], value, meta)
    if origin is tuple:
        item_types = typing.get_args(hint)
        if not isinstance(value, list | tuple) or len(value) != len(item_types):
            raise ConfigError(f"{where}: expected a list of {len(item_types)} numbers, "
                              f"got {value!r}")
        return tuple(_check_value(f"{where}[{i}]", t, v, {})
                     for i, (t, v) in enumerate(zip(item_types, value, strict=True)))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
    elif hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e6 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        value = float(value)
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    elif hint is str:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: expected a non-empty string, got {value!r}")
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(meta['choices'])}")
    if meta.get("lo") is not None and value < meta["lo"]:
        raise ConfigError(f"{where}: {value!r} is below the minimum {meta['lo']}")
    if meta.get("hi") is not None and value > meta["hi"]:
        raise ConfigError(f"{where}: {value!r} is above the maximum {meta['hi']}")
    return value


def _build_section(cls: type, where: str, raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(f"unknown config key {where}.{unknown[0]} "
                          f"(known: {', '.join(sorted(known))})")
    values = {name: _check_value(f"{where}.{name}", hints[name], raw[name], known[name].metadata)
              for name in raw}
    return cls(**values)


def from_dict(raw: Any) -> Config:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(raw).__name__}")
    hints = typing.get_type_hints(Config)
    unknown = sorted(set(raw) - set(hints))
    if unknown:
        raise ConfigError(f"unknown config section {unknown[0]!r} "
                          f"(known: {', '.join(sorted(hints))})")
    return Config(**{name: _build_section(hints[name], name, section)
                     for name, section in raw.items()})


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error in one line: parser errors carry `problem`, reader errors only text."""
    return getattr(err, "problem", None) or str(err).splitlines()[0]


def parse_override(text: str) -> tuple[str, Any]:
    """`train.epochs=5` -> ("train.epochs", 5); the value is read as YAML."""
    key, sep, value = text.partition("=")
    if not sep or key.count(".") != 1 or not all(key.split(".")):
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. train.epochs=5")
    try:
        return key, yaml.safe_load(value)
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {text!r}: value is not valid YAML ({_yaml_problem(err)})"
                          ) from None


def set_dotted(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for key, value in overrides.items():
        section, name = key.split(".")
        if not isinstance(merged.setdefault(section, {}), dict):
            raise ConfigError(f"{section}: expected a mapping")
        merged[section][name] = value
    return merged


def load_config(path: str | Path | None = None, overrides: typing.Iterable[str] = ()) -> Config:
    """The config in YAML file `path` (defaults when None) with `section.key=value` overrides."""
    raw: Any = {}
    if path is not None:
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: cannot read config ({err})") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(err)})") from None
        if raw is not None and not isinstance(raw, dict):
            raise ConfigError(f"{path}: a config must be a mapping of sections")
    parsed = dict(parse_override(text) for text in overrides)
    return from_dict(set_dotted(raw or {}, parsed))
