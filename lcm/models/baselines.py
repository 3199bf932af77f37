"""Baselines behind the same interface as LCM (SPEC section 3).

- ``gap``: backbone + global average pooling + linear (the paper's "ResNet-101" row).
- ``gap_mlp``: the same pooled features through a two-hidden-layer MLP (a control for
  heads that can combine features non-linearly).
- ``q2l``: a Query2Label-style head: the feature map projected to D tokens (plus a fixed 2-D
  sine position code), C learned label queries, a post-norm Transformer decoder of
  ``model.depth`` layers and a per-class linear. Our simplification of Query2Label: the
  position code is added to the memory (keys and values), not to the keys only, so the stock
  ``nn.TransformerDecoder`` can be used.

None of them has an auxiliary head or a partial-label branch: those output fields stay ``None``
and ``targets`` is accepted and ignored.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lcm.config import ModelConfig
from lcm.errors import ConfigError
from lcm.models.backbones import create_backbone
from lcm.models.context import sine_position_code
from lcm.models.lcm import PerClassLinear, reinit_layers
from lcm.models.registry import ModelOutput, register_model


class GapClassifier(nn.Module):
    """Backbone, global average pooling, one linear layer."""

    def __init__(self, cfg: ModelConfig, num_classes: int) -> None:
        super().__init__()
        self.backbone = create_backbone(cfg.backbone, cfg.pretrained)
        self.fc = nn.Linear(self.backbone.out_channels, num_classes)

    def forward(self, images: Tensor, targets: Tensor | None = None) -> ModelOutput:
        pooled = self.backbone(images).mean(dim=(2, 3))  # (B, C_b)
        return ModelOutput(logits=self.fc(pooled))  # (B, C)

    def output_biases(self) -> list[Tensor]:
        return [self.fc.bias]

    def forward_features(self, images: Tensor) -> dict[str, Tensor]:
        """``feature_map`` (B, C_b, h, w), class activation maps ``cam`` (B, C, h, w), ``logits``.

        Pooling commutes with the linear layer, so each CAM's spatial mean plus the bias is
        exactly that class's logit.
        """
        fmap = self.backbone(images)  # (B, C_b, h, w)
        cam = torch.einsum("bkhw,ck->bchw", fmap, self.fc.weight)  # (B, C, h, w)
        return {"feature_map": fmap, "cam": cam, "logits": cam.mean(dim=(2, 3)) + self.fc.bias}


class GapMLP(nn.Module):
    """A control: ``gap`` with a two-hidden-layer MLP head (``model.mlp_hidden`` wide), which
    can compute interactions between pooled features as a Transformer head can."""

    def __init__(self, cfg: ModelConfig, num_classes: int) -> None:
        super().__init__()
        self.backbone = create_backbone(cfg.backbone, cfg.pretrained)
        h = cfg.mlp_hidden
        self.mlp = nn.Sequential(
            nn.Linear(self.backbone.out_channels, h), nn.GELU(), nn.Dropout(cfg.dropout),
            nn.Linear(h, h), nn.GELU(), nn.Dropout(cfg.dropout),
            nn.Linear(h, num_classes),
        )  # fmt: skip

    def forward(self, images: Tensor, targets: Tensor | None = None) -> ModelOutput:
        pooled = self.backbone(images).mean(dim=(2, 3))  # (B, C_b)
        return ModelOutput(logits=self.mlp(pooled))  # (B, C)

    def output_biases(self) -> list[Tensor]:
        return [self.mlp[-1].bias]


class Query2Label(nn.Module):
    """Learned label queries cross-attending to the projected feature map."""

    def __init__(self, cfg: ModelConfig, num_classes: int) -> None:
        super().__init__()
        if cfg.dim % cfg.heads:
            raise ConfigError(
                f"model.dim ({cfg.dim}) must be divisible by model.heads ({cfg.heads})"
            )
        if cfg.dim % 4:
            raise ConfigError(f"model.dim ({cfg.dim}) must be divisible by 4 for q2l")
        self.backbone = create_backbone(cfg.backbone, cfg.pretrained)
        self.proj = nn.Conv2d(self.backbone.out_channels, cfg.dim, kernel_size=1)
        self.queries = nn.Parameter(torch.randn(num_classes, cfg.dim) * 0.02)  # (C, D)
        layer = nn.TransformerDecoderLayer(
            cfg.dim, cfg.heads, cfg.ffn, cfg.dropout, batch_first=True, norm_first=False
        )
        self.decoder = nn.TransformerDecoder(layer, cfg.depth)
        if cfg.reinit_layers:
            reinit_layers(self.decoder.layers)
        self.head = PerClassLinear(num_classes, cfg.dim)

    def output_biases(self) -> list[Tensor]:
        return [self.head.bias]

    def forward(self, images: Tensor, targets: Tensor | None = None) -> ModelOutput:
        fmap = self.proj(self.backbone(images))  # (B, D, h, w)
        b, d, h, w = fmap.shape
        pos = sine_position_code(h, w, d, fmap.device, fmap.dtype)  # (HW, D)
        memory = fmap.flatten(2).transpose(1, 2) + pos  # (B, HW, D)
        queries = self.queries.unsqueeze(0).expand(b, -1, -1)  # (B, C, D)
        z = self.decoder(queries, memory)  # (B, C, D)
        return ModelOutput(logits=self.head(z))


@register_model("gap")
def build_gap(cfg: ModelConfig, num_classes: int, branch: bool = True) -> GapClassifier:
    return GapClassifier(cfg, num_classes)


@register_model("q2l")
def build_q2l(cfg: ModelConfig, num_classes: int, branch: bool = True) -> Query2Label:
    return Query2Label(cfg, num_classes)


@register_model("gap_mlp")
def build_gap_mlp(cfg: ModelConfig, num_classes: int, branch: bool = True) -> GapMLP:
    return GapMLP(cfg, num_classes)
