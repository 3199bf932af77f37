"""Parameter and multiply-accumulate counts (SPEC section 2, size check; paper Table 1).

Models are built and run on the ``meta`` device: no memory is allocated and nothing is
computed, so even ResNet-101 at 448 px is counted in well under a second. MACs are
``FlopCounterMode`` FLOPs / 2 for one image in eval mode. The meta device also keeps
``nn.TransformerEncoderLayer`` off its fused CPU/CUDA inference kernel, which
``FlopCounterMode`` does not see, so the Transformer is counted in full.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lcm.config import ModelConfig
from lcm.models.registry import build_model


def count_params(module: nn.Module) -> int:
    """Number of parameters (trainable or not) of ``module``."""
    return sum(p.numel() for p in module.parameters())


def count_macs(model: nn.Module, image_size: int) -> tuple[int, dict[str, int]]:
    """MACs of one eval-mode forward pass on a ``(1, 3, S, S)`` input, total and per child.

    ``model`` must live on the meta device (see the module docstring).
    """
    images = torch.empty(1, 3, image_size, image_size, device="meta")
    counter = FlopCounterMode(display=False)
    was_training = model.training
    model.eval()
    # Grad mode stays on: on the meta device it costs nothing, and FlopCounterMode's module
    # tracker rejects views of parameters taken under no_grad (q2l's expanded queries).
    with counter:
        model(images)
    model.train(was_training)
    per_module = counter.get_flop_counts()
    root = type(model).__name__
    children = {
        name: sum(per_module.get(f"{root}.{name}", {}).values()) // 2
        for name, _ in model.named_children()
    }
    return counter.get_total_flops() // 2, children


def model_report(
    backbone: str = "resnet101",
    num_classes: int = 80,
    image_size: int = 448,
    depth: int = 3,
    **model_overrides: Any,
) -> dict[str, Any]:
    """Parameters and GMACs of the model, of the ``gap`` baseline and of the head alone.

    ``model_overrides`` are further ``ModelConfig`` fields (``arch``, ``dim``, ``heads``,
    ``ffn``, ``fusion``, ``prototypes`` ...); the default arch is ``lcm`` with SPEC's dims.
    The result: ``params``, ``gmacs``, ``breakdown`` (per top-level submodule: params, gmacs),
    and ``baseline`` / ``head`` sub-dicts with ``params`` and ``gmacs``, plus the settings.
    The auxiliary head and the label-state embedding count as parameters (they appear in the
    breakdown as ``aux_head`` and ``state_embed``) though only the main path costs MACs.
    """
    overrides = {"pretrained": False, **model_overrides}
    cfg = ModelConfig(backbone=backbone, depth=depth, **overrides)
    base_cfg = dataclasses.replace(cfg, arch="gap")
    with torch.device("meta"):
        model = build_model(cfg, num_classes)
        baseline = build_model(base_cfg, num_classes)
    macs, per_child = count_macs(model, image_size)
    base_macs, _ = count_macs(baseline, image_size)
    breakdown = {
        name: {"params": count_params(child), "gmacs": per_child[name] / 1e9}
        for name, child in model.named_children()
    }
    own = count_params(model) - sum(count_params(c) for c in model.children())
    if own:  # parameters held directly by the model (prototypes, type embeddings, queries)
        breakdown["(own parameters)"] = {"params": own, "gmacs": 0.0}
    # MACs of ops run outside any child's forward: the model's own code (the dot read, the
    # context pooling) and modules called through other methods (the label-query reads'
    # memory() / attend(), reused across passes), which the counter cannot attribute
    outside = macs - sum(per_child.values())
    if outside:
        breakdown["(ops outside a child's forward)"] = {"params": 0, "gmacs": outside / 1e9}
    backbone_params = count_params(model.backbone)
    backbone_macs = per_child["backbone"]
    return {
        "arch": cfg.arch,
        "backbone": backbone,
        "num_classes": num_classes,
        "image_size": image_size,
        "depth": depth,
        "params": count_params(model),
        "gmacs": macs / 1e9,
        "breakdown": breakdown,
        "baseline": {"params": count_params(baseline), "gmacs": base_macs / 1e9},
        "head": {
            "params": count_params(model) - backbone_params,
            "gmacs": (macs - backbone_macs) / 1e9,
        },
    }


def format_report(d: dict[str, Any]) -> str:
    """A small plain-text table of a ``model_report`` result."""
    title = (
        f"{d['arch']} / {d['backbone']}, {d['num_classes']} classes, "
        f"{d['image_size']} px, depth {d['depth']}"
    )
    rows = [
        ("model", d["params"], d["gmacs"]),
        ("  head (model - backbone)", d["head"]["params"], d["head"]["gmacs"]),
        *((f"    {name}", v["params"], v["gmacs"]) for name, v in d["breakdown"].items()),
        ("gap baseline", d["baseline"]["params"], d["baseline"]["gmacs"]),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [title, f"{'':{width}}  {'params (M)':>10}  {'GMACs':>8}"]
    lines += [f"{name:{width}}  {p / 1e6:10.3f}  {g:8.2f}" for name, p, g in rows]
    ratio = d["gmacs"] / d["baseline"]["gmacs"]
    lines.append(f"MAC ratio model / gap baseline: {ratio:.3f}")
    return "\n".join(lines)
