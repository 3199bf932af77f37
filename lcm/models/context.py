"""The latent context read of LCM: how each class gets its context-aware feature F_ctx. [ours]

The paper names the module ("Latent Context Information Embedding") and its three feature
kinds; how a class reaches its context is our reconstruction, chosen by ``model.context_read``:

- ``dot``: K learned prototypes pool K context tokens from the projected feature map
  (:func:`pool_context`); class c reads them by ``softmax(F_cls_c Ctx^T / sqrt(D)) Ctx``.
  The read has no parameters, so a class can only fetch the token most like its own feature:
  in a trained model F_ctx came out a copy of F_cls (cos 0.992). Kept to load models trained
  before the other reads existed.
- ``attend``: the same context tokens, read by C learned label queries through H-head
  attention with query, key, value and output projections (:class:`LabelQueryRead`,
  ``project=True``). What a class looks for is learned, not its own appearance.
- ``direct``: the label queries, split into H heads, read the projected feature map plus a
  fixed 2-D position code directly (``project=False``): no projections and no prototypes;
  the position code lets a query look *where* a context sits, not only for what it looks like.
- ``attend_map``: the label queries read the feature map plus the position code through
  projected multi-head attention (``project=True``; keys and values both the normalised
  features plus the code, as Query2Label's memory), no prototypes.

``model.prototype_score`` sets how the prototypes score positions: ``dot`` (x . p / sqrt(D),
the first reconstruction; on features whose norm grows 6 -> 34 during training the
prototypes moved 2.4% of their norm) or ``cosine`` (cos(x, p) times a learned temperature,
so that a prototype's direction, not the features' scale, decides what it pools).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def pool_context(
    x: Tensor, prototypes: Tensor, log_temperature: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """K prototypes (K, D) each pool one context token from ``x`` (B, HW, D) by a softmax over
    the positions -> context tokens (B, K, D) and assignments (B, K, HW).

    Scores are ``x . p / sqrt(D)`` (``prototype_score: dot``) or, given ``log_temperature``,
    ``cos(x, p) * exp(log_temperature)`` (``cosine``).
    """
    if log_temperature is not None:
        logits = F.normalize(x, dim=-1) @ F.normalize(prototypes, dim=-1).t()
        logits = logits * log_temperature.exp()  # (B, HW, K)
    else:
        # times the reciprocal, not divided: the first reconstruction's rounding, bit for bit
        logits = x @ prototypes.t() * (1.0 / math.sqrt(x.shape[-1]))  # (B, HW, K)
    # Softmax over positions, not over prototypes: every prototype pools a full token.
    assign = logits.softmax(dim=1).transpose(1, 2)  # (B, K, HW)
    return assign @ x, assign


class LabelQueryRead(nn.Module):
    """C learned label queries read N tokens by H-head attention.

    ``project=True``: query, key, value and output projections, as ``nn.MultiheadAttention``
    (4 D^2 parameters). ``project=False``: the queries, keys and values split into H heads of
    D / H channels as they are; the only parameters are the queries (C x D).
    """

    def __init__(
        self, num_classes: int, dim: int, heads: int, project: bool, init_std: float
    ) -> None:
        super().__init__()
        self.heads = heads
        self.queries = nn.Parameter(torch.randn(num_classes, dim) * init_std)  # (C, D)
        self.proj = nn.ModuleDict(
            {k: nn.Linear(dim, dim) for k in ("q", "k", "v", "out")} if project else {}
        )

    def forward(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """``keys``, ``values`` (B, N, D) -> read features (B, C, D) and the head-averaged
        attention weights (B, C, N)."""
        return self.attend(self.memory(keys, values))

    def memory(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values (B, N, D), projected and split into heads -> two (B, H, N, D/H).

        Computed once per image and read by :meth:`attend` as often as needed
        (``model.reread``)."""
        if self.proj:
            keys, values = self.proj["k"](keys), self.proj["v"](values)
        b, n, d = keys.shape
        h = self.heads
        kh = keys.reshape(b, n, h, d // h).transpose(1, 2)  # (B, H, N, D/H)
        vh = values.reshape(b, n, h, d // h).transpose(1, 2)  # (B, H, N, D/H)
        return kh, vh

    def attend(
        self, memory: tuple[Tensor, Tensor], queries: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Read ``memory`` (from :meth:`memory`) with the learned label queries, or with
        ``queries`` (B, C, D) given -> read features (B, C, D), head-averaged weights
        (B, C, N)."""
        kh, vh = memory
        b, h, _, dh = kh.shape
        q = self.queries if queries is None else queries
        if self.proj:
            q = self.proj["q"](q)
        if queries is None:
            qh = q.reshape(-1, h, dh).transpose(0, 1)  # (H, C, D/H), shared by the batch
        else:
            qh = q.reshape(b, -1, h, dh).transpose(1, 2)  # (B, H, C, D/H)
        weights = (qh @ kh.transpose(-1, -2) / math.sqrt(dh)).softmax(dim=-1)  # (B, H, C, N)
        out = (weights @ vh).transpose(1, 2).reshape(b, -1, h * dh)  # (B, C, D)
        if self.proj:
            out = self.proj["out"](out)
        return out, weights.mean(dim=1)


def sine_position_code(
    h: int, w: int, dim: int, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """DETR-style fixed 2-D sine/cosine code ``(h*w, dim)``: half the channels for y, half x."""
    quarter = dim // 4
    freq = 1.0 / (10000.0 ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter))
    ys = torch.arange(h, device=device, dtype=torch.float32)[:, None] * freq  # (h, D/4)
    xs = torch.arange(w, device=device, dtype=torch.float32)[:, None] * freq  # (w, D/4)
    code_y = torch.cat([ys.sin(), ys.cos()], dim=-1)[:, None].expand(h, w, 2 * quarter)
    code_x = torch.cat([xs.sin(), xs.cos()], dim=-1)[None].expand(h, w, 2 * quarter)
    code = torch.cat([code_y, code_x], dim=-1).reshape(h * w, 4 * quarter)
    return code.to(dtype)
