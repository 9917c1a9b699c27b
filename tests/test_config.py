"""load_config: the real params.yaml loads; unknown keys, wrong types and bad values name the key."""

import pytest

from mulcon.config import Config, load_config, to_flat_dict
from mulcon.errors import ConfigError
from tests.conftest import ROOT


def test_repo_params_and_presets_load():
    config = load_config(ROOT / "params.yaml")
    assert isinstance(config, Config)
    assert config.data.dataset == "demo"
    for preset in sorted((ROOT / "configs").glob("*.yaml")):
        paper = load_config(preset)
        backbone = "timm:tresnet_l" if "tresnet" in preset.name else "resnet101"
        assert paper.model.backbone == backbone and paper.data.image_size == 448


def test_overrides_are_typed():
    config = load_config(ROOT / "params.yaml", ["train.pretrain_epochs=3", "loss.temperature=1", "model.pretrained=true"])
    assert config.train.pretrain_epochs == 3
    assert config.loss.temperature == 1.0 and isinstance(config.loss.temperature, float)
    assert config.model.pretrained is True
    assert to_flat_dict(config)["train.pretrain_epochs"] == 3


@pytest.mark.parametrize("override, message", [
    ("train.epochz=3", "unknown key train.epochz"),
    ("trian.seed=3", "unknown key trian"),
    ("train.pretrain_epochs=three", "train.pretrain_epochs: expected int, got str"),
    ("train.pretrain_epochs=2.5", "train.pretrain_epochs: expected int, got float"),
    ("model.pretrained=1", "model.pretrained: expected bool, got int"),
    ("train.variant=mulcon_plus", "train.variant: 'mulcon_plus' is not one of"),
    ("model.backbone=vgg16", "model.backbone: 'vgg16' is not one of"),
    ("data.dataset=imagenet", "data.dataset: 'imagenet' is not one of"),
    ("model.num_heads=5", "not divisible by model.num_heads"),
    ("data.val_fraction=1.5", "data.val_fraction: must be in [0, 1)"),
    ("pretrain.lr=0", "pretrain.lr: must be positive"),
    ("train.seed", "expected key=value"),
])
def test_bad_override_names_the_key(override, message):
    with pytest.raises(ConfigError, match=None) as error:
        load_config(ROOT / "params.yaml", [override])
    assert message in str(error.value)
    assert "params.yaml" in str(error.value)


def test_bad_params_file_names_file_and_key(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  pretrain_epochs: 2\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"params.yaml: unknown key train.learning_rate"):
        load_config(path)
    path.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match=r"params.yaml: not valid YAML, line 2 column 1"):
        load_config(path)
    path.write_text("train: 3\n")
    with pytest.raises(ConfigError, match=r"train: expected a mapping"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"missing.yaml: cannot read params file"):
        load_config(tmp_path / "missing.yaml")


def test_select_on_val_needs_a_validation_split():
    with pytest.raises(ConfigError, match="train.select_on_val: needs a validation split, but data.val_fraction is 0"):
        load_config(ROOT / "params.yaml", ["train.select_on_val=true", "data.val_fraction=0"])


def test_every_key_is_in_params_yaml_every_preset_and_the_readme():
    import yaml

    keys = set(to_flat_dict(Config()))
    for path in [ROOT / "params.yaml", *sorted((ROOT / "configs").glob("*.yaml"))]:
        values = yaml.safe_load(path.read_text())
        written = {f"{section}.{name}" for section, items in values.items() for name in items}
        assert written == keys, f"{path.name}: missing {sorted(keys - written)}"
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Configuration"):readme.index("## The method as implemented")]
    missing = [key for key in keys if f"`{key.split('.')[1]}`" not in table]
    assert not missing, f"README's configuration table lacks {missing}"
