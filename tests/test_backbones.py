"""Backbones through timm and the packaged EfficientNet-Lite0 weights (mulcon.backbones).

The ImageNet check classifies scikit-image's bundled photos with the renamed weights, so a wrong
key mapping (which would still load: every shape matches in order) cannot pass.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from mulcon.backbones import build_backbone, load_weights, lite0_to_timm, read_weights
from mulcon.config import load_config
from mulcon.errors import ConfigError
from mulcon.model import Baseline, MulCon, build_model
from tests.conftest import ROOT

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {967, 968}  # espresso, cup


def _imagenet_top5(network, photo: np.ndarray) -> set[int]:
    images = torch.tensor(photo).permute(2, 0, 1).float()[None] / 255
    images = F.interpolate(images, size=(224, 224), mode="bilinear", antialias=True)
    images = (images - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    with torch.no_grad():
        return set(network(images)[0].topk(5).indices.tolist())


def test_packaged_lite0_weights_classify_scikit_image_photos():
    from skimage import data

    network = timm.create_model("tf_efficientnet_lite0").eval()
    load_weights(network, read_weights("package:efficientnet_lite0", "timm:tf_efficientnet_lite0"), "package")
    assert _imagenet_top5(network, data.chelsea()) & CAT_CLASSES
    assert _imagenet_top5(network, data.coffee()) & COFFEE_CLASSES
    # The backbone built from the config is that network without its classifier.
    backbone, channels = build_backbone("timm:tf_efficientnet_lite0", False, "package:efficientnet_lite0")
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(backbone.eval()(images), network.forward_features(images))
    assert channels == 1280


def test_lite0_mapping_is_by_name_not_order():
    state = read_weights("package:efficientnet_lite0", "timm:efficientnet_lite0")
    assert len(state) == 296
    assert "blocks.0.0.conv_dw.weight" in state and "blocks.6.0.conv_pwl.weight" in state
    with pytest.raises(ConfigError, match="unexpected key '_blocks.99._bn0.weight'"):
        lite0_to_timm({"_blocks.99._bn0.weight": torch.zeros(1)})


def test_timm_backbones_give_a_feature_map_and_their_channels():
    for name, channels in (("timm:resnet18", 512), ("timm:efficientnet_lite0", 1280)):
        model = MulCon(3, backbone=name, pretrained=False, embed_dim=16, num_heads=2).eval()
        assert model.label_attention.label_queries.shape == (3, channels)
        assert model(torch.randn(2, 3, 64, 64)).logits.shape == (2, 3)
    assert Baseline(3, backbone="timm:resnet18", pretrained=False).classifier.in_features == 512


def test_weights_file_loads_into_the_backbone(tmp_path):
    reference = timm.create_model("resnet18")
    torch.save({"state_dict": reference.state_dict()}, tmp_path / "weights.pt")
    backbone, _ = build_backbone("timm:resnet18", False, str(tmp_path / "weights.pt"))
    assert torch.equal(backbone.network.conv1.weight, reference.conv1.weight)
    import torchvision

    resnet = torchvision.models.resnet18()
    torch.save(resnet.state_dict(), tmp_path / "resnet.pt")
    backbone, _ = build_backbone("resnet18", False, str(tmp_path / "resnet.pt"))
    assert torch.equal(backbone[7][1].conv2.weight, resnet.layer4[1].conv2.weight)


@pytest.mark.parametrize("backbone, weights_file, message", [
    ("timm:not_a_model", "", "model.backbone: timm:not_a_model is not a timm model"),
    ("timm:resnet18", "missing.pt", "model.weights_file: missing.pt does not exist"),
    ("timm:resnet18", "package:efficientnet_lite0", "fits model.backbone timm:efficientnet_lite0 or "
                                                    "timm:tf_efficientnet_lite0, not 'resnet18'"),
    ("timm:efficientnet_lite0", "package:mobilenet", "package:mobilenet is not one of package:efficientnet_lite0"),
    ("timm:vit_tiny_patch16_224", "", "not a feature map"),
])
def test_bad_backbone_settings_name_the_key(backbone, weights_file, message):
    with pytest.raises(ConfigError, match=message):
        MulCon(3, backbone=backbone, pretrained=False, weights_file=weights_file, embed_dim=16, num_heads=2)(
            torch.randn(1, 3, 224, 224))


def test_weights_of_another_network_are_refused(tmp_path):
    torch.save(timm.create_model("resnet18").state_dict(), tmp_path / "resnet.pt")
    with pytest.raises(ConfigError, match=r"resnet.pt: conv1.weight has shape \(64, 3, 7, 7\)|lacks"):
        build_backbone("timm:resnet34", False, str(tmp_path / "resnet.pt"))


def test_timm_pretrained_without_weights_is_one_clear_error(tmp_path):
    # The real timm loader, offline with an empty cache: our error, not a hub traceback.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "TORCH_HOME": str(tmp_path)}
    code = ("from mulcon.backbones import build_backbone\nfrom mulcon.errors import ConfigError\n"
            "try:\n    build_backbone('timm:resnet18', True)\nexcept ConfigError as error:\n    print(error)\n")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    assert line.startswith("model.pretrained: cannot load ImageNet weights for timm:resnet18 (")
    assert line.endswith("set model.pretrained=false") and "\n" not in line


def test_params_demo_builds_the_packaged_backbone():
    config = load_config(ROOT / "params.yaml", ["model.embed_dim=16", "model.num_heads=2"])
    assert config.model.backbone.startswith("timm:") and config.model.weights_file == "package:efficientnet_lite0"
    model = build_model(config.model, 12, label_level=True)
    assert model.label_attention.label_queries.shape[1] == 1280
    with pytest.raises(ConfigError, match="model.backbone: 'vgg16' is not one of resnet18, resnet50, resnet101 "
                                          "or timm:<name>"):
        load_config(ROOT / "params.yaml", ["model.backbone=vgg16"])


def test_tresnet_preset_builds_its_backbone():
    config = load_config(ROOT / "configs" / "authors-coco2014-tresnet.yaml", ["model.pretrained=false"])
    assert config.model.backbone == "timm:tresnet_l" and config.data.image_size == 448
    _, channels = build_backbone(config.model.backbone, False, config.model.weights_file)
    assert channels == 2432
