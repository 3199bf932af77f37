"""Losses: unknown targets ignored exactly, BCE/ASL values, term weighting and masking."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lcm.config import LossConfig
from lcm.models.losses import asl_elementwise, compute_loss, masked_loss
from lcm.models.registry import ModelOutput

pytestmark = pytest.mark.usefixtures("one_thread")


KINDS = ["bce", "asl"]


def make(seed: int = 0, shape: tuple[int, int] = (6, 7)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(shape, generator=g) * 3).requires_grad_()
    targets = torch.randint(-1, 2, shape, generator=g).float()
    return logits, targets


def reference_asl(x: torch.Tensor, y: torch.Tensor, gn: float, gp: float, clip: float):
    """The published ASL formulation (probability shifting + asymmetric focusing), per entry."""
    p = torch.sigmoid(x)
    p_neg = (1 - p + clip).clamp(max=1)
    loss = y * torch.log(p.clamp(min=1e-8)) + (1 - y) * torch.log(p_neg.clamp(min=1e-8))
    pt = p * y + p_neg * (1 - y)
    gamma = gp * y + gn * (1 - y)
    return -loss * torch.pow(1 - pt, gamma)


@pytest.mark.parametrize("kind", KINDS)
def test_unknown_targets_get_exactly_zero_gradient(kind: str) -> None:
    logits, targets = make()
    logits.data[targets < 0] = 1e4  # extreme values must not leak through either
    out = ModelOutput(logits=logits)
    loss, _ = compute_loss(out, targets, LossConfig(kind=kind))
    loss.backward()
    unknown = targets < 0
    assert unknown.any() and (~unknown).any()
    assert torch.isfinite(loss)
    assert torch.equal(logits.grad[unknown], torch.zeros_like(logits.grad[unknown]))
    # ASL gives easy negatives (p < clip) no gradient by design; everything else learns.
    easy = (targets == 0) & (torch.sigmoid(logits.detach()) < 0.05) & (kind == "asl")
    assert (logits.grad[~unknown & ~easy] != 0).all()


@pytest.mark.parametrize("kind", KINDS)
def test_loss_ignores_values_at_unknown_entries(kind: str) -> None:
    logits, targets = make(1)
    cfg = LossConfig(kind=kind)
    a, _ = compute_loss(ModelOutput(logits=logits), targets, cfg)
    shifted = torch.where(targets < 0, -50.0, logits.detach())
    b, _ = compute_loss(ModelOutput(logits=shifted), targets, cfg)
    assert a.item() == pytest.approx(b.item())


def test_bce_is_mean_over_known_entries() -> None:
    logits, targets = make(2)
    known = targets >= 0
    expected = F.binary_cross_entropy_with_logits(logits[known], targets[known])
    loss, parts = compute_loss(ModelOutput(logits=logits), targets, LossConfig())
    torch.testing.assert_close(loss, expected)
    assert parts == {"main": pytest.approx(expected.item()), "loss": pytest.approx(loss.item())}


def test_scale_does_not_depend_on_missing_share() -> None:
    # Appending all-unknown images leaves the loss unchanged (mean over known entries).
    logits, targets = make(3)
    cfg = LossConfig()
    a, _ = compute_loss(ModelOutput(logits=logits), targets, cfg)
    padded_logits = torch.cat([logits, torch.randn(10, 7)])
    padded_targets = torch.cat([targets, -torch.ones(10, 7)])
    b, _ = compute_loss(ModelOutput(logits=padded_logits), padded_targets, cfg)
    assert a.item() == pytest.approx(b.item())


def test_all_unknown_gives_zero_loss_with_a_graph() -> None:
    logits = torch.randn(3, 4, requires_grad=True)
    loss, _ = compute_loss(ModelOutput(logits=logits), -torch.ones(3, 4), LossConfig())
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits.grad))


def test_asl_matches_reference() -> None:
    logits, targets = make(4)
    x = logits.detach()
    y = targets.clamp(min=0)
    cfg = LossConfig(kind="asl", gamma_neg=4.0, gamma_pos=0.0, clip=0.05)
    torch.testing.assert_close(asl_elementwise(x, y, cfg), reference_asl(x, y, 4.0, 0.0, 0.05))
    cfg = LossConfig(kind="asl", gamma_neg=2.0, gamma_pos=1.0, clip=0.1)
    torch.testing.assert_close(asl_elementwise(x, y, cfg), reference_asl(x, y, 2.0, 1.0, 0.1))


def test_asl_without_focusing_or_clip_is_bce() -> None:
    logits, targets = make(5)
    y = targets.clamp(min=0)
    cfg = LossConfig(kind="asl", gamma_neg=0.0, gamma_pos=0.0, clip=0.0)
    expected = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
    torch.testing.assert_close(asl_elementwise(logits, y, cfg), expected)


def test_asl_drops_easy_negatives_and_stays_finite() -> None:
    cfg = LossConfig(kind="asl")
    x = torch.tensor([[-100.0, -5.0, 100.0, 30.0]], requires_grad=True)
    y = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    per_entry = asl_elementwise(x, y, cfg)
    assert per_entry[0, 0].item() == 0.0 and per_entry[0, 1].item() == 0.0  # p < clip
    assert per_entry[0, 3].item() > 0  # a confident false positive still costs
    per_entry.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_terms_are_weighted_and_mask_counts_hidden_only() -> None:
    main, targets = make(6)
    aux, _ = make(7)
    mask, _ = make(8)
    hidden = torch.zeros_like(targets, dtype=torch.bool)
    hidden[:, :3] = True
    out = ModelOutput(logits=main, aux_logits=aux, mask_logits=mask, hidden=hidden)
    cfg = LossConfig(alpha=0.5, beta=0.3)
    loss, parts = compute_loss(out, targets, cfg)
    known = targets >= 0
    expected = (
        masked_loss(main, targets, known, cfg)
        + 0.5 * masked_loss(aux, targets, known, cfg)
        + 0.3 * masked_loss(mask, targets, hidden & known, cfg)
    )
    torch.testing.assert_close(loss, expected)
    assert set(parts) == {"loss", "main", "aux", "mask"}
    assert parts["loss"] == pytest.approx(
        parts["main"] + 0.5 * parts["aux"] + 0.3 * parts["mask"], rel=1e-5
    )
    loss.backward()
    assert torch.equal(mask.grad[~hidden], torch.zeros_like(mask.grad[~hidden]))
    assert (mask.grad[hidden & known] != 0).all()


def test_absent_or_zero_weighted_terms_contribute_nothing() -> None:
    main, targets = make(9)
    aux, _ = make(10)
    mask, _ = make(11)
    hidden = targets >= 0
    only_main, parts = compute_loss(ModelOutput(logits=main), targets, LossConfig())
    assert set(parts) == {"loss", "main"}
    out = ModelOutput(logits=main, aux_logits=aux, mask_logits=mask, hidden=hidden)
    zero_weights, parts = compute_loss(out, targets, LossConfig(alpha=0.0, beta=0.0))
    assert set(parts) == {"loss", "main"}
    torch.testing.assert_close(zero_weights, only_main)


def test_mask_logits_without_hidden_is_a_bug() -> None:
    main, targets = make(12)
    with pytest.raises(ValueError, match="hidden"):
        compute_loss(ModelOutput(logits=main, mask_logits=main), targets, LossConfig())
