"""Training loss (SPEC section 2.6): ``L = l(y_hat) + alpha * l(y_cls) + beta * l_masked(y_mask)``.

``l`` is BCE-with-logits or the asymmetric loss (ASL, Ridnik et al. 2021), chosen by
``loss.kind``. Targets are 1 (positive), 0 (negative) or -1 (unknown); unknown entries are
dropped with ``torch.where`` on finite values, so their gradient is exactly zero.

Normalisation: every term is the **mean over the entries it counts** (known entries for the
main and auxiliary terms, labels hidden by the branch for the masked term), with an empty
set giving zero. Summing and dividing by the batch size instead would shrink the loss, and
so the effective learning rate, in proportion to the share of missing labels (ten-fold at
90% missing); the mean keeps one scale whatever the missing ratio, so one learning rate and
one beta mean the same thing across the partial-label settings. Every batch still holds
many known entries (B x C x (1 - m)), so the mean is not noisy.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from lcm.config import LossConfig
from lcm.models.registry import ModelOutput

ElementwiseLoss = Callable[[Tensor, Tensor, LossConfig], Tensor]


def bce_elementwise(logits: Tensor, targets: Tensor, cfg: LossConfig) -> Tensor:
    """Per-entry binary cross-entropy on logits; ``targets`` in {0, 1}."""
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none")


def asl_elementwise(logits: Tensor, targets: Tensor, cfg: LossConfig) -> Tensor:
    """Per-entry asymmetric loss; ``targets`` in {0, 1}.

    Positives: ``-(1 - p)^gamma_pos * log(p)``. Negatives use the shifted probability
    ``p_m = max(p - clip, 0)``: ``-p_m^gamma_neg * log(1 - p_m)``, which discards easy
    negatives (p < clip) entirely and down-weights the rest.
    """
    logits = logits.float()  # the focusing powers underflow in half precision
    p = torch.sigmoid(logits)
    log_pos = F.logsigmoid(logits)
    if cfg.clip > 0:
        p_m = (p - cfg.clip).clamp(min=0)
        log_neg = torch.log1p(-p_m)  # 1 - p_m >= clip > 0: finite
    else:
        p_m = p
        log_neg = F.logsigmoid(-logits)
    loss_pos = (1 - p).pow(cfg.gamma_pos) * log_pos
    loss_neg = p_m.pow(cfg.gamma_neg) * log_neg
    return -(targets * loss_pos + (1 - targets) * loss_neg)


LOSSES: dict[str, ElementwiseLoss] = {"bce": bce_elementwise, "asl": asl_elementwise}


def masked_loss(logits: Tensor, targets: Tensor, counted: Tensor, cfg: LossConfig) -> Tensor:
    """Mean of ``loss.kind`` over the entries where ``counted`` (bool, like ``targets``) holds.

    Zero (still attached to ``logits``, so backward works) when nothing is counted.
    """
    # Unknown targets (-1) are clamped to 0 only so the per-entry loss stays finite; the
    # where() below then gives those entries exactly zero gradient (0 * finite = 0).
    per_entry = LOSSES[cfg.kind](logits, targets.clamp(min=0).to(logits.dtype), cfg)
    per_entry = torch.where(counted, per_entry, torch.zeros_like(per_entry))
    return per_entry.sum() / counted.sum().clamp(min=1)


def compute_loss(
    out: ModelOutput, targets: Tensor, cfg: LossConfig
) -> tuple[Tensor, dict[str, float]]:
    """Total training loss and its parts (as floats, for logging).

    Terms a model does not produce (no auxiliary head, branch skipped, eval mode) contribute
    nothing; so does a term whose weight is zero. Parts: ``loss``, ``main`` and, when
    present, ``aux`` and ``mask`` (each unweighted).
    """
    if cfg.kind not in LOSSES:
        raise ValueError(f"unknown loss kind {cfg.kind!r}")  # config validation prevents this
    known = targets >= 0  # (B, C)
    terms = {"main": masked_loss(out.logits, targets, known, cfg)}
    total = terms["main"]
    if out.aux_logits is not None and cfg.alpha != 0:
        terms["aux"] = masked_loss(out.aux_logits, targets, known, cfg)
        total = total + cfg.alpha * terms["aux"]
    if out.mask_logits is not None and cfg.beta != 0:
        if out.hidden is None:
            raise ValueError("mask_logits given without the hidden-label mask")  # a model bug
        terms["mask"] = masked_loss(out.mask_logits, targets, out.hidden & known, cfg)
        total = total + cfg.beta * terms["mask"]
    terms["loss"] = total
    # One device-to-host copy for all parts rather than one sync per .item().
    values = torch.stack([t.detach().float() for t in terms.values()]).tolist()
    return total, dict(zip(terms, values, strict=True))
