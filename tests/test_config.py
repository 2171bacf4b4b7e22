import argparse

import pytest

from cnnlab.errors import ConfigError
from cnnlab.training.config import TrainConfig, add_config_flags, config_from_args, config_from_dict, load_config


def parse(*argv: str, base: TrainConfig | None = None) -> TrainConfig:
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    return config_from_args(parser.parse_args(list(argv)), base)


def test_defaults_then_yaml_then_flags(tmp_path):
    (tmp_path / "c.yaml").write_text("epochs: 3\nlr: 3e-3\nchannels_last: off\nmilestones: [2, 4]\n")
    base = load_config(tmp_path / "c.yaml")
    assert (base.epochs, base.lr, base.channels_last, base.milestones) == (3, 0.003, "off", [2, 4])
    cfg = parse("--lr", "0.2", "--deterministic", "--model-arg", "spec=c4,p", base=base)
    assert (cfg.epochs, cfg.lr, cfg.deterministic, cfg.model_args) == (3, 0.2, True, {"spec": "c4,p"})
    assert parse("--compile", "false").compile is False and parse().batch_size == TrainConfig().batch_size


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) 'learning_rate'.*valid keys: model,"):
        config_from_dict({"learning_rate": 0.1})
    with pytest.raises(ConfigError, match="'epoch' \\(did you mean 'epochs'\\?\\)"):
        config_from_dict({"epoch": 1})


@pytest.mark.parametrize(
    "values, message",
    [
        ({"epochs": "ten"}, "epochs: expected float, got str 'ten'"),
        ({"epochs": True}, "epochs: expected float, got bool True"),
        ({"batch_size": 12.5}, "batch_size: expected int, got float 12.5"),
        ({"lr": [0.1]}, "lr: expected float, got list"),
        ({"model_args": "spec"}, "model_args: expected dict"),
    ],
)
def test_wrong_types_are_named(values, message):
    with pytest.raises(ConfigError, match=message.replace("(", "\\(").replace("[", "\\[")):
        config_from_dict(values)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"optimizer": "adam"}, "optimizer = 'adam' is invalid; choices: sgd, adamw"),
        ({"momentum": 1.0}, "momentum = 1.0 is invalid: it must be in [0, 1)"),
        ({"schedule": "multistep"}, "needs milestones"),
        ({"augment": "crop"}, "bad augmentation 'crop'"),
        ({"model": "vgg"}, "unknown model 'vgg'"),
        ({"dataset": "imagenet"}, "unknown dataset 'imagenet'"),
    ],
)
def test_invalid_values_fail_validation(values, message):
    with pytest.raises(Exception, match=message.replace("[", "\\[").replace(")", "\\)").replace("(", "\\(")):
        config_from_dict(values).validate()


def test_yaml_errors_name_the_file(tmp_path):
    (tmp_path / "bad.yaml").write_text("epochs: [1\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="list.yaml: expected a mapping"):
        load_config(tmp_path / "list.yaml")
