"""Backbone registry: torchvision ResNets without their pooling and classifier.

``create_backbone("resnet101")`` returns a module mapping images ``(B, 3, H, W)`` to the last
feature map ``(B, C_b, H/32, W/32)`` and exposing ``out_channels`` (C_b). Its submodules keep
torchvision's names (``conv1``, ``bn1``, ``layer1`` ... ``layer4``), so a torchvision ResNet
state dict loads into it once the ``fc.*`` entries are dropped.

Pretrained weights are never downloaded: ``pretrained=True`` reads torchvision's
IMAGENET1K_V1 file from the torch hub cache, and a string names a local file.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from lcm.errors import CheckpointError, ConfigError
from lcm.vision import torchvision

WeightsEnum = torchvision.models.WeightsEnum

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one registry entry: the torchvision constructor and its ImageNet weights."""

    factory: Callable[..., torchvision.models.ResNet]
    weights: WeightsEnum
    out_channels: int


BACKBONES: dict[str, BackboneSpec] = {
    "resnet18": BackboneSpec(
        torchvision.models.resnet18, torchvision.models.ResNet18_Weights.IMAGENET1K_V1, 512
    ),
    "resnet34": BackboneSpec(
        torchvision.models.resnet34, torchvision.models.ResNet34_Weights.IMAGENET1K_V1, 512
    ),
    "resnet50": BackboneSpec(
        torchvision.models.resnet50, torchvision.models.ResNet50_Weights.IMAGENET1K_V1, 2048
    ),
    "resnet101": BackboneSpec(
        torchvision.models.resnet101, torchvision.models.ResNet101_Weights.IMAGENET1K_V1, 2048
    ),
}


class ResNetBackbone(nn.Module):
    """A torchvision ResNet truncated before global pooling (stride 32)."""

    def __init__(self, resnet: torchvision.models.ResNet, out_channels: int) -> None:
        super().__init__()
        # Same attribute names as torchvision so its state dicts load without renaming.
        self.conv1 = resnet.conv1
        self.bn1 = resnet.bn1
        self.relu = resnet.relu
        self.maxpool = resnet.maxpool
        self.layer1 = resnet.layer1
        self.layer2 = resnet.layer2
        self.layer3 = resnet.layer3
        self.layer4 = resnet.layer4
        self.out_channels = out_channels

    def forward(self, images: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))  # (B, 64, H/4, W/4)
        x = self.layer2(self.layer1(x))  # (B, ., H/8, W/8)
        return self.layer4(self.layer3(x))  # (B, C_b, H/32, W/32)


def hub_weights_path(name: str) -> Path:
    """Where torchvision would cache the ImageNet weights of backbone ``name``."""
    spec = _spec(name)
    filename = spec.weights.url.rsplit("/", 1)[-1]
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def create_backbone(name: str, pretrained: bool | str = False) -> ResNetBackbone:
    """Build backbone ``name``: random init, cached ImageNet weights (True) or a local file."""
    spec = _spec(name)
    backbone = ResNetBackbone(spec.factory(weights=None), spec.out_channels)
    if pretrained is True:
        path = hub_weights_path(name)
        if not path.is_file():
            raise CheckpointError(
                f"{path}: ImageNet weights for {name} not found in the torch hub cache "
                "(nothing is downloaded; place torchvision's file there, or set "
                "model.pretrained to a local weights file, or to false)"
            )
        load_backbone_weights(backbone, path)
    elif isinstance(pretrained, str):
        load_backbone_weights(backbone, Path(pretrained))
    return backbone


def load_backbone_weights(backbone: ResNetBackbone, path: Path) -> None:
    """Load a torchvision ResNet state dict (``fc.*`` ignored) from ``path`` into ``backbone``.

    Accepts ``.safetensors`` or a plain ``torch.save`` state dict (read with
    ``weights_only=True``). A state dict whose keys all sit under ``backbone.`` (a saved
    project model) is unwrapped, so a trained model's backbone can seed a new one.
    """
    state = _read_state_dict(path)
    if not any(k.split(".", 1)[0] in _RESNET_PARTS for k in state):
        prefixed = {
            k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")
        }
        state = prefixed or state
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit this backbone ({e})") from e
    log.info("loaded backbone weights from %s", path)


_RESNET_PARTS = frozenset({"conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"})


def _read_state_dict(path: Path) -> Mapping[str, Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: backbone weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unreadable file is the user's file, so report it as such
        raise CheckpointError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from e
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors")
    return state


def _spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise ConfigError(
            f"unknown backbone {name!r} (known: {', '.join(sorted(BACKBONES))})"
        ) from None
