"""Shared fixtures: a tiny demo dataset, prepared once per session, and tiny training params."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

# The real params.yaml, shrunk: the smallest backbone at 32 px, a few images, one epoch per step.
TINY = [
    "data.image_size=32", "data.num_workers=0", "data.val_fraction=0.2", "model.embed_dim=32",
    "model.projection_dim=16", "pretrain.batch_size=8", "finetune.batch_size=4",
    "train.pretrain_epochs=1", "train.finetune_epochs=1", "train.device=cpu", "evaluate.batch_size=16",
    "tracking.enabled=false",
]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A prepared tiny demo set: <root>/data/demo (raw) and <root>/prepared/demo."""
    from mulcon.data import make_demo, prepare

    root = tmp_path_factory.mktemp("tiny")
    make_demo(root / "data" / "demo", num_train=24, num_val=12, image_size=48, seed=1)
    prepare("demo", root / "data" / "demo", root / "prepared" / "demo", val_fraction=0.2, seed=0)
    return root


@pytest.fixture
def tiny_params(tiny_data, tmp_path) -> Path:
    """A params.yaml: the repo's, with the tiny settings and paths into `tiny_data` and `tmp_path`."""
    values = yaml.safe_load((ROOT / "params.yaml").read_text())
    for override in TINY:
        key, value = override.split("=")
        section, name = key.split(".")
        values[section][name] = yaml.safe_load(value)
    values["data"]["root"] = str(tiny_data / "data")
    values["data"]["prepared_root"] = str(tiny_data / "prepared")
    values["train"]["out_root"] = str(tmp_path / "runs")
    values["train"]["checkpoint_root"] = str(tmp_path / "checkpoints")
    values["evaluate"]["out_root"] = str(tmp_path / "reports")
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(values))
    return path
