"""The model interface shared by LCM and the baselines, and the registry over ``cfg.arch``.

Every model is built as ``build_model(cfg, num_classes, branch=...)`` and called as
``model(images, targets=None) -> ModelOutput``. Architectures register themselves with
``@register_model("name")`` (timm-style), so adding one never touches this file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from lcm.config import ModelConfig
from lcm.errors import ConfigError


@dataclass
class ModelOutput:
    """What a forward pass returns. Fields a model or mode does not produce are ``None``."""

    logits: Tensor  # (B, C) main scores (pre-sigmoid)
    aux_logits: Tensor | None = None  # (B, C) auxiliary head on the class-aware features
    mask_logits: Tensor | None = None  # (B, C) partial-label branch, training only
    hidden: Tensor | None = None  # (B, C) bool: labels the branch hid (its loss counts these)


ModelFactory = Callable[[ModelConfig, int, bool], nn.Module]
MODELS: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator adding a factory ``(cfg, num_classes, branch) -> nn.Module`` under ``name``."""

    def add(factory: ModelFactory) -> ModelFactory:
        if name in MODELS:
            raise ValueError(f"model {name!r} registered twice")  # a programming error
        MODELS[name] = factory
        return factory

    return add


def build_model(cfg: ModelConfig, num_classes: int, *, branch: bool = True) -> nn.Module:
    """Build the architecture ``cfg.arch`` for ``num_classes`` labels.

    ``branch=False`` builds LCM without running its partial-label branch (the training loop
    passes ``loss.beta > 0``); models without such a branch ignore it.
    """
    if num_classes < 1:
        raise ConfigError(f"num_classes must be positive, got {num_classes}")
    try:
        factory = MODELS[cfg.arch]
    except KeyError:
        raise ConfigError(
            f"model.arch: unknown architecture {cfg.arch!r} (known: {', '.join(sorted(MODELS))})"
        ) from None
    return factory(cfg, num_classes, branch)
