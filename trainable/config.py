"""Frozen configuration dataclasses, loaded from YAML and checked before any work starts.

Units and the reason for each default are in the YAML files under configs/; the type and the
bounds a value must respect live here, on the field, checked by pydantic: strict types (no 1
for true, no 2.5 for an integer; a float field reads text that is a number, as YAML 1.1 leaves
1e6), unknown keys refused, and every refusal reworded into one line naming the key.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
import pydantic_core
import yaml
from pydantic import BeforeValidator, Field, Strict
from pydantic.dataclasses import dataclass

from trainable.constants import MODEL_NAMES, RESNET18
from trainable.errors import ConfigError


def _number(value: Any) -> Any:
    """YAML 1.1 reads 1e6 (no dot) as a string: read it as the number it is."""
    try:
        return float(value) if isinstance(value, str) else value
    except ValueError:
        return value


def _bool_or_auto(value: Any) -> Any:
    if value is True or value is False or value == "auto":
        return value
    raise pydantic_core.PydanticCustomError("bool_or_auto", "expected true, false or auto")


Int = Annotated[int, Strict()]
Float = Annotated[float, BeforeValidator(_number), Strict(), Field(allow_inf_nan=False)]
Text = Annotated[str, Strict(), Field(min_length=1)]
Flag = Annotated[bool, Strict()]
FlagOrAuto = Annotated[bool | Literal["auto"], BeforeValidator(_bool_or_auto)]
SECTION = pydantic.ConfigDict(extra="forbid")

AUGMENT_ON = Literal["auto", "cpu", "gpu"]
SCHEDULERS = Literal["fifo", "asha"]
# Optuna samplers; auto: by the budget, the rule measured in docs/search-range.md
SAMPLERS = Literal["auto", "tpe", "gp", "qmc", "random"]
# How the winner is chosen among the evaluated configs (analysis/pick.py, docs/search-range.md)
PICKS = Literal["observed", "model", "pessimistic"]


@dataclass(frozen=True, config=SECTION)
class DataConfig:
    dir: Text = "data/cifar10"
    val_size: Annotated[Int, Field(ge=0)] = 5000
    split_seed: Annotated[Int, Field(ge=0)] = 0
    limit_train: Annotated[Int, Field(ge=0)] = 0
    limit_test: Annotated[Int, Field(ge=0)] = 0
    num_workers: Annotated[Int, Field(ge=0)] | None = None
    augment_on: AUGMENT_ON = "auto"
    pad: Annotated[Int, Field(ge=0, le=16)] = 4
    cutout: Annotated[Int, Field(ge=0, le=32)] = 8


@dataclass(frozen=True, config=SECTION)
class ModelConfig:
    name: Literal[MODEL_NAMES] = RESNET18


@dataclass(frozen=True, config=SECTION)
class TrainConfig:
    epochs: Annotated[Int, Field(ge=1)] = 20
    batch_size: Annotated[Int, Field(ge=1)] = 512
    max_lr: Annotated[Float, Field(ge=1e-8)] = 0.1
    peak_epoch: Annotated[Int, Field(ge=1)] = 5
    div_factor: Annotated[Float, Field(ge=1.0)] = 25.0
    final_div_factor: Annotated[Float, Field(ge=1.0)] = 1e4
    momentum: Annotated[Float, Field(ge=0.0, le=0.999)] = 0.9
    nesterov: Flag = True
    weight_decay: Annotated[Float, Field(ge=0.0, le=1.0)] = 5e-4
    label_smoothing: Annotated[Float, Field(ge=0.0, le=0.5)] = 0.0
    eval_flip_tta: Flag = False
    compile: Flag = False
    # cuDNN's search for the fastest convolutions in each new process, on CUDA: auto is on
    # (every batch has one shape); its cost per process is in docs/performance.md
    cudnn_benchmark: FlagOrAuto = "auto"
    seed: Annotated[Int, Field(ge=0)] = 0


@dataclass(frozen=True, config=SECTION)
class LrFinderConfig:
    start_lr: Annotated[Float, Field(ge=1e-10)] = 1e-5
    end_lr: Annotated[Float, Field(ge=1e-8)] = 10.0
    # torch-lr-finder needs 17 points for its smoothing to mean anything.
    num_iter: Annotated[Int, Field(ge=17)] = 100


@dataclass(frozen=True, config=SECTION)
class SearchConfig:
    num_samples: Annotated[Int, Field(ge=1)] = 8
    max_lr_range: tuple[Float, Float] = (1.0, 8.0)
    peak_epoch_range: tuple[Int, Int] | None = None
    scheduler: SCHEDULERS = "fifo"
    sampler: SAMPLERS = "auto"
    startup_trials: Annotated[Int, Field(ge=0)] | None = None  # None: the sampler's rule
    grace_period: Annotated[Int, Field(ge=1)] | None = None  # None: the peak range's end
    max_concurrent: Annotated[Int, Field(ge=1)] = 2
    max_failures: Annotated[Int, Field(ge=0)] = 1
    num_to_keep: Annotated[Int, Field(ge=1)] = 2
    confirm_seeds: Annotated[Int, Field(ge=0)] | None = None
    confirm_top: Annotated[Int, Field(ge=2)] = 2
    pick: PICKS = "pessimistic"
    # racing: every `race_every` new trials, the incumbent (under `pick`) runs again on the
    # next seed of the shared list, up to `max_config_calls` runs of it; reruns count toward
    # num_samples
    race: Flag = True
    max_config_calls: Annotated[Int, Field(ge=1)] = 3
    race_every: Annotated[Int, Field(ge=1)] = 3


@dataclass(frozen=True, config=SECTION)
class ReportConfig:
    num_misclassified: Annotated[Int, Field(ge=1, le=100)] = 20


@dataclass(frozen=True, config=SECTION)
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
        grace = self.search.grace_period
        if grace is not None and grace > train.epochs:
            raise ConfigError(f"search.grace_period={grace} must be <= "
                              f"train.epochs={train.epochs}")
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

    @property
    def grace_period(self) -> int:
        """Epochs ASHA lets every trial run: by default to the end of the peak range, as a
        trial still warming up ranks apart from how it ends (docs/search-range.md)."""
        if self.search.grace_period is not None:
            return self.search.grace_period
        return self.peak_epoch_range[1]

    def replace(self, section: str, **values: Any) -> Config:
        """A copy with some fields of one section changed, validated again."""
        return from_dict(set_dotted(dump_config(self),
                                    {f"{section}.{k}": v for k, v in values.items()}))


_SECTIONS = {f.name: f.default_factory for f in dataclasses.fields(Config)}
_VALIDATOR = pydantic.TypeAdapter(Config)


def dump_config(config: Config) -> dict[str, Any]:
    """The config as pydantic dumps it for JSON (lists, not tuples): what study.json and a
    checkpoint hold, and what `from_dict` reads back. Only where it is written down: a config
    travels as itself (Ray pickles it)."""
    return _VALIDATOR.dump_python(config, mode="json")


def _one_line(error: dict[str, Any]) -> str:
    """pydantic's first error as this project words it: the dotted key, then the problem."""
    loc, kind, value, ctx = error["loc"], error["type"], error["input"], error.get("ctx", {})
    if kind == "value_error":  # Config.__post_init__'s own check
        return str(ctx["error"])
    if kind == "unexpected_keyword_argument":
        if len(loc) == 1:
            return f"unknown config section {loc[0]!r} (known: {', '.join(_SECTIONS)})"
        known = [f.name for f in dataclasses.fields(_SECTIONS[loc[0]])]
        return f"unknown config key {loc[0]}.{loc[1]} (known: {', '.join(sorted(known))})"
    where = ".".join(map(str, loc[:2])) + "".join(f"[{i}]" for i in loc[2:])
    if kind in ("missing", "too_long", "tuple_type"):  # a pair of the wrong length or kind
        return f"{'.'.join(map(str, loc[:2]))}: expected a list of 2 numbers, got {value!r}"
    if kind == "literal_error":
        return f"{where}: {value!r} is not one of {_choices(*loc[:2])}"
    problems = {
        "dataclass_type": f"expected a mapping, got {value!r}",
        "int_type": f"expected an integer, got {value!r}",
        "bool_type": f"expected true or false, got {value!r}",
        "bool_or_auto": f"expected true, false or auto, got {value!r}",
        "float_type": f"expected a number, got {value!r}",
        "finite_number": f"expected a finite number, got {value!r}",
        "string_type": f"expected a non-empty string, got {value!r}",
        "string_too_short": f"expected a non-empty string, got {value!r}",
        "greater_than_equal": f"{value!r} is below the minimum {ctx.get('ge')}",
        "less_than_equal": f"{value!r} is above the maximum {ctx.get('le')}",
    }
    return f"{where}: {problems.get(kind, error['msg'])}"


def _choices(section: str, name: str) -> str:
    return ", ".join(typing.get_args(typing.get_type_hints(_SECTIONS[section])[name]))


def from_dict(raw: Any) -> Config:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(raw).__name__}")
    try:
        return _VALIDATOR.validate_python(raw)
    except pydantic.ValidationError as err:
        raise ConfigError(_one_line(err.errors()[0])) from None


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
