"""Every preset in configs/ trains both steps and evaluates, shrunk (32 px, resnet18 without
ImageNet weights, one epoch of one or two batches per step, the tiny demo set, tracking off), so
no preset can rot."""

import pytest
import torch

from mulcon import checkpoint
from mulcon.config import load_config
from mulcon.evaluate import evaluate_model
from mulcon.train import run_training
from tests.conftest import ROOT, reference_map

PRESETS = sorted(path.name for path in (ROOT / "configs").glob("*.yaml"))
SHRUNK = ["data.dataset=demo", "data.image_size=32", "data.num_workers=0", "data.cache=false",
          "model.backbone=resnet18", "model.pretrained=false", "model.embed_dim=32", "model.projection_dim=16",
          "pretrain.batch_size=16", "finetune.batch_size=8", "train.pretrain_epochs=1", "train.finetune_epochs=1",
          "train.device=cpu", "evaluate.batch_size=16", "tracking.enabled=false"]


def test_every_preset_is_tested():
    assert PRESETS == ["authors-coco2014-tresnet.yaml", "authors-coco2014.yaml", "authors-nuswide.yaml", "paper-coco2014.yaml", "paper-nuswide.yaml",
                       "paper-voc2007.yaml"]


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_trains_both_steps_and_evaluates(preset, tiny_data, tmp_path):
    paths = [f"data.root={tiny_data / 'data'}", f"data.prepared_root={tiny_data / 'prepared'}",
             f"train.out_root={tmp_path / 'runs'}", f"train.checkpoint_root={tmp_path / 'checkpoints'}"]
    config = load_config(ROOT / "configs" / preset, [*SHRUNK, *paths])
    records = []
    final = run_training(config, callback=records.append)
    assert [(r["stage"], r["epoch"]) for r in records] == [("pretrain", 1), ("finetune", 1)]
    assert all(torch.isfinite(torch.tensor(r["total"])) for r in records) and "contrastive" in records[1]
    saved = checkpoint.load(final)
    assert saved["config"]["model"]["attention_block"] == config.model.attention_block
    authors = preset.startswith("authors")
    assert ("label_attention.cross.fc_q.weight" in saved["model"]) == authors
    if config.train.ema_decay > 0:  # step 1's saved model (step 2's start) is its EMA, not its live weights
        stage = checkpoint.load(tmp_path / "runs" / "mulcon" / "pretrain" / "model.pt")["model"]
        state = checkpoint.load(tmp_path / "checkpoints" / "mulcon" / "pretrain" / "checkpoint.pt")
        name = "label_attention.cross.fc_q.weight"
        assert torch.equal(stage[name], state["ema"][f"module.{name}"])
        assert not torch.equal(stage[name], state["model"][name])
    metrics = evaluate_model(config, final, tmp_path / "reports")
    assert metrics["mAP"] == pytest.approx(reference_map(config, final), abs=1e-3) and metrics["num_images"] == 12
