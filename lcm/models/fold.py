"""Inference-only rewrite: BatchNorm folded into the convolution before it.

In eval mode a BatchNorm is a fixed per-channel affine map, so ``bn(conv(x))`` equals one
convolution with rescaled weights and a bias. Folding removes a full read and write of every
activation map per BatchNorm (a ResNet-101 has 104 of them), the same result up to float
rounding. Training never folds: there the statistics are computed per batch.
"""

from __future__ import annotations

import re

from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

_CONV = re.compile(r"conv(\d+)")


def fold_batchnorm(model: nn.Module) -> int:
    """Fold, in place, every BatchNorm2d that directly follows a Conv2d; return how many.

    "Directly follows" means: two neighbours in an ``nn.Sequential`` (a ResNet's downsample
    path), or a ``convN`` / ``bnN`` attribute pair. The second rule is a naming convention,
    true of torchvision's ResNets and lcm's backbone (``bnN(convN(x))``) but not of every
    model (a pre-activation block computes ``convN(bnN(x))``): use it on those only.
    The folded BatchNorm becomes ``nn.Identity``. ``model`` must be in eval mode.
    """
    if model.training:
        raise ValueError("fold_batchnorm needs a model in eval mode")
    folded = 0
    for parent in list(model.modules()):
        pairs: list[tuple[str, str]] = []
        if isinstance(parent, nn.Sequential):
            names = list(parent._modules)
            pairs += list(zip(names, names[1:], strict=False))
        for name in parent._modules:
            m = _CONV.fullmatch(name)
            if m and f"bn{m.group(1)}" in parent._modules:
                pairs.append((name, f"bn{m.group(1)}"))
        for conv_name, bn_name in pairs:
            conv, bn = parent._modules[conv_name], parent._modules[bn_name]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                setattr(parent, conv_name, fuse_conv_bn_eval(conv, bn))
                setattr(parent, bn_name, nn.Identity())
                folded += 1
    return folded
