from __future__ import annotations

import pytest

from trainable.config import ConfigError, dump_config, load_config
from trainable.config import from_dict as config_from_dict

from .helpers import REPO

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_round_trips(path):
    config = load_config(path)
    assert config_from_dict(dump_config(config)) == config


def test_default_is_the_real_recipe():
    config = load_config(REPO / "configs" / "default.yaml")
    t = config.train
    assert (t.epochs, t.batch_size, t.momentum, t.nesterov, t.weight_decay) == \
        (20, 512, 0.9, True, 5e-4)
    assert (config.data.val_size, config.data.pad, config.data.cutout) == (5000, 4, 8)
    assert config.peak_epoch_range == (1, 10)


def test_era_recipe_is_the_originals():
    config = load_config(REPO / "configs" / "era_s11.yaml")
    assert config.model.name == "resnet18_era"
    assert (config.train.epochs, config.train.peak_epoch, config.data.val_size) == (20, 5, 0)


def test_dotted_overrides_are_typed_by_yaml():
    config = load_config(REPO / "configs" / "default.yaml",
                         ["train.epochs=5", "train.max_lr=0.3", "train.nesterov=false",
                          "search.max_lr_range=[0.25, 4]", "lr_finder.end_lr=1e2"])
    assert config.lr_finder.end_lr == 100.0  # YAML 1.1 reads 1e2 as a string
    assert config.train.epochs == 5 and config.train.max_lr == 0.3
    assert config.train.nesterov is False
    assert [load_config(REPO / "configs" / "smoke.yaml", [f"train.cudnn_benchmark={v}"])
            .train.cudnn_benchmark for v in ("true", "false", "auto")] == [True, False, "auto"]
    assert config.search.max_lr_range == (0.25, 4.0)
    assert config.peak_epoch_range == (1, 2)  # follows the epochs when not set
    default = load_config(REPO / "configs" / "default.yaml", [])
    assert default.grace_period == 10  # ASHA's rung: the end of the peak range, [1, 10]
    assert default.replace("search", grace_period=4).grace_period == 4
    single = load_config(REPO / "configs" / "smoke.yaml", ["train.epochs=1",
                                                           "search.peak_epoch_range=null"])
    assert single.train.epochs == 1  # one epoch trains; only a study needs a range


@pytest.mark.parametrize("override, message", [
    ("train.epochz=5", "unknown config key train.epochz"),
    ("trian.epochs=5", "unknown config section 'trian'"),
    ("train.epochs=five", "train.epochs: expected an integer"),
    ("train.epochs=2.5", "train.epochs: expected an integer"),
    ("train.epochs=0", "train.epochs: 0 is below the minimum 1"),
    ("train.batch_size=-4", "train.batch_size: -4 is below the minimum 1"),
    ("train.nesterov=1", "train.nesterov: expected true or false"),
    ("train.max_lr=.nan", "train.max_lr: expected a finite number"),
    ("model.name=resnet50", "model.name: 'resnet50' is not one of resnet18, resnet18_era"),
    ("search.scheduler=hyperband", "search.scheduler: 'hyperband' is not one of fifo, asha"),
    ("train.peak_epoch=21", "train.peak_epoch=21 must be <= train.epochs=20"),
    ("search.max_lr_range=[2, 1]", "search.max_lr_range=[2.0, 1.0] needs 0 < lo < hi"),
    ("search.max_lr_range=[1]", "search.max_lr_range: expected a list of 2 numbers"),
    ("search.peak_epoch_range=[0, 5]", "search.peak_epoch_range=[0, 5] needs 1 <= lo < hi"),
    ("search.peak_epoch_range=[5, 25]", "search.peak_epoch_range=[5, 25] needs 1 <= lo < hi"),
    ("lr_finder.num_iter=10", "lr_finder.num_iter: 10 is below the minimum 17"),
    ("search.grace_period=21", "search.grace_period=21 must be <= train.epochs=20"),
    ("search.sampler=cmaes", "search.sampler: 'cmaes' is not one of auto, tpe, gp, qmc, random"),
    ("search.startup_trials=-1", "search.startup_trials: -1 is below the minimum 0"),
    ("epochs=5", "expected section.key=value"),
    ("train.cudnn_benchmark=maybe", "train.cudnn_benchmark: expected true, false or auto, got "
                                    "'maybe'"),
    ("train.cudnn_benchmark=1", "train.cudnn_benchmark: expected true, false or auto, got 1"),
])
def test_bad_values_are_refused_by_name(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs" / "default.yaml", [override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_files_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(listing)


def test_config_is_frozen():
    config = load_config(REPO / "configs" / "default.yaml")
    with pytest.raises(AttributeError):
        config.train.epochs = 3  # type: ignore[misc]
    assert config.replace("train", epochs=8, peak_epoch=2).train.epochs == 8
    assert config.train.epochs == 20
