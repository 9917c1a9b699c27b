"""Parameter groups, schedules as pure functions of the epoch, the EMA of the whole state dict,
and the step-1 crop of the training transform."""

import math

import pytest
import torch
from PIL import Image
from torch import nn

from mulcon.config import load_config
from mulcon.data.transforms import train_transform
from mulcon.errors import ConfigError
from mulcon.model import MulCon
from mulcon.optim import ModelEma, build_optimizer, build_scheduler, warmup_cosine
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MulCon(5, backbone="resnet18", pretrained=False, embed_dim=16, num_heads=4, projection_dim=8)


def _names(model, group):
    ids = {id(parameter) for parameter in group["params"]}
    return {name.split(".")[0] for name, parameter in model.named_parameters() if id(parameter) in ids}


def test_step1_groups_slow_down_the_backbone_only(model):
    config = load_config(ROOT / "configs" / "authors-coco2014.yaml")
    optimizer = build_optimizer(config, "pretrain", model)
    assert isinstance(optimizer, torch.optim.AdamW)
    head, slow = optimizer.param_groups
    assert _names(model, head) == {"label_attention", "classifier_weight", "classifier_bias", "projector"}
    assert _names(model, slow) == {"backbone"}
    assert head["lr"] == 2e-4 and slow["lr"] == pytest.approx(2e-5) and head["weight_decay"] == 1e-4


def test_step2_groups_slow_down_backbone_and_attention(model):
    config = load_config(ROOT / "configs" / "authors-coco2014.yaml")
    head, slow = build_optimizer(config, "finetune", model).param_groups
    assert _names(model, head) == {"classifier_weight", "classifier_bias", "projector"}
    assert _names(model, slow) == {"backbone", "label_attention"}
    assert head["lr"] == 0.01 and slow["lr"] == pytest.approx(0.001)
    paper = load_config(ROOT / "params.yaml")
    assert isinstance(build_optimizer(paper, "pretrain", model), torch.optim.Adam)


def test_warmup_cosine_is_the_authors_shape():
    assert warmup_cosine(0.0, 30, 5) == pytest.approx(0.1)
    assert warmup_cosine(2.5, 30, 5) == pytest.approx(0.55)
    assert warmup_cosine(5.0, 30, 5) == pytest.approx(1.0)
    assert warmup_cosine(17.5, 30, 5) == pytest.approx(0.5)
    assert warmup_cosine(30.0, 30, 5) == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine(3.0, 3, 5) == pytest.approx(0.1 + 0.9 * 3 / 5)  # warm-up longer than the run


def test_cosine_schedule_steps_per_batch_and_scales_both_groups(model):
    config = load_config(ROOT / "configs" / "authors-coco2014.yaml")
    optimizer = build_optimizer(config, "pretrain", model)
    schedule, per_batch = build_scheduler(config, "pretrain", optimizer, epochs=30, steps_per_epoch=4)
    assert per_batch
    for _ in range(10):  # 2.5 epochs
        optimizer.step()
        schedule.step()
    head, slow = (group["lr"] for group in optimizer.param_groups)
    assert head == pytest.approx(2e-4 * 0.55) and slow == pytest.approx(2e-5 * 0.55)
    resumed = build_optimizer(config, "pretrain", model)  # a restored schedule continues exactly
    again, _ = build_scheduler(config, "pretrain", resumed, epochs=30, steps_per_epoch=4)
    again.load_state_dict(schedule.state_dict())
    again.step()
    schedule.step()
    assert resumed.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]


def test_onecycle_peaks_each_group_at_its_own_lr(model):
    config = load_config(ROOT / "params.yaml", ["pretrain.backbone_lr_scale=0.5"])
    optimizer = build_optimizer(config, "pretrain", model)
    schedule, _ = build_scheduler(config, "pretrain", optimizer, epochs=1, steps_per_epoch=10)
    peaks = [0.0, 0.0]
    for _ in range(9):
        optimizer.step()
        schedule.step()
        peaks = [max(p, group["lr"]) for p, group in zip(peaks, optimizer.param_groups)]
    assert peaks[0] == pytest.approx(config.pretrain.lr, rel=1e-3) and peaks[1] == pytest.approx(peaks[0] / 2)


def test_warmup_needs_the_cosine_schedule():
    with pytest.raises(ConfigError, match=r"pretrain.warmup_epochs: 5 needs pretrain.schedule=cosine"):
        load_config(ROOT / "params.yaml", ["pretrain.warmup_epochs=5"])


def test_ema_averages_weights_and_batchnorm_statistics():
    torch.manual_seed(0)
    network = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    ema = ModelEma(network, decay=0.75)
    before = {name: value.clone() for name, value in ema.module.state_dict().items()}
    network.train()
    network(torch.randn(8, 3, 6, 6))  # moves the running statistics
    with torch.no_grad():
        network[0].weight.add_(1.0)
    ema.update(network)
    after, current = ema.module.state_dict(), network.state_dict()
    for name in ("0.weight", "1.running_mean", "1.running_var"):
        expected = 0.75 * before[name] + 0.25 * current[name]
        assert torch.allclose(after[name], expected), name
        assert not torch.allclose(after[name], current[name]), name  # averaged, not copied
    assert after["1.num_batches_tracked"] == current["1.num_batches_tracked"] == 1  # counters copied


def test_crop_scale_one_is_todays_resize_and_a_range_crops():
    image = Image.fromarray((torch.rand(40, 60, 3) * 255).to(torch.uint8).numpy())
    plain, cropped = train_transform(32, randaugment=False), train_transform(32, False, (0.25, 0.5))
    torch.manual_seed(3)
    a = plain(image)
    torch.manual_seed(3)
    b = train_transform(32, False, (1.0, 1.0))(image)
    assert torch.equal(a, b) and a.shape == (3, 32, 32)
    assert "RandomResizedCrop" not in repr(plain) and "RandomResizedCrop" in repr(cropped)
    assert cropped(image).shape == (3, 32, 32)


@pytest.mark.parametrize("value, message", [
    ("[0.5]", r"data.crop_scale: expected a list of two numbers"),
    ("[0.9, 0.5]", r"data.crop_scale: expected 0 < low <= high <= 1"),
    ("[0, 1]", r"data.crop_scale: expected 0 < low <= high <= 1"),
])
def test_bad_crop_scale_is_named(value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "params.yaml", [f"data.crop_scale={value}"])


def test_crop_scale_reads_as_a_tuple_and_writes_as_a_list():
    from mulcon.config import config_from_dict, to_dict

    config = load_config(ROOT / "configs" / "authors-coco2014.yaml")
    assert config.data.crop_scale == (0.875, 1.0)
    assert to_dict(config)["data"]["crop_scale"] == [0.875, 1.0]
    assert config_from_dict(to_dict(config)) == config
    assert math.isclose(load_config(ROOT / "params.yaml").data.crop_scale[0], 1.0)
