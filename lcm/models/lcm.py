"""The LCM model (SPEC section 2): latent context embedding + label-correlation Transformer.

Shapes below use B images, C classes, D token width, K latent context prototypes, C_b
backbone channels and HW feature-map positions (14 x 14 for 448 px input).

What comes from the paper and what is our reconstruction:
  - [paper] a ResNet backbone; a "Latent Context Information Embedding" producing class-aware,
    context-aware and fusion features; a Transformer modelling label correlations (best depth
    3); a partial-label branch with mask ratio r used in training only.
  - [ours] the module internals: class-aware features via a 1x1 conv + spatial softmax
    (ADD-GCN / TDRG style); K learned prototypes pooling K context tokens by soft assignment
    (``model.prototypes``, default K = C); fusion by concatenating the two token kinds with
    type embeddings (``model.fusion: cat``) or adding them (``sum``); a post-norm encoder
    whose two output halves are summed; per-class linear heads; the auxiliary head on F_cls;
    the branch mechanics after C-Tran (label-state embeddings added to the class-aware tokens,
    the same Transformer run a second time); the optional label-identity embedding
    (``model.label_embed``) and the control without context tokens
    (``model.context_tokens: false``).
  - [ours] the redesign switches (README "The model"; :mod:`lcm.models.context` for the reads):
    ``model.context_read`` (``dot``: the parameter-free read above; ``attend``: learned label
    queries read the context tokens with projected multi-head attention; ``direct``: the label
    queries read the feature map plus a position code, no projections, no prototypes;
    ``attend_map``: the same over the feature map, with projected multi-head attention);
    ``model.readout`` (``sum``: the two output halves summed; ``context``: logits from the
    context half only, so a class's own appearance reaches its logit only through attention);
    ``model.token_norm`` (LayerNorm on both token kinds, which puts them at the scale of the
    type, label and label-state embeddings); ``model.embed_init`` (those embeddings' init
    scale); ``model.prototype_score`` (``dot`` or ``cosine`` with a learned temperature);
    ``model.reread`` (the context-aware tokens read the latent context again inside every
    Transformer layer, between its self-attention and its feed-forward block, through the
    same read module queried by their current state, as Query2Label's queries read the
    feature map at every decoder layer; the memory's keys and values are projected once).
    A ``model.json`` without these keys is a model of the first reconstruction
    (:data:`lcm.config.FIRST_RECONSTRUCTION`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lcm.config import ModelConfig
from lcm.errors import ConfigError
from lcm.models.backbones import create_backbone
from lcm.models.context import LabelQueryRead, pool_context, sine_position_code
from lcm.models.registry import ModelOutput, register_model

# Label states fed to the partial-label branch. UNKNOWN must be 0: it is the embedding's
# padding index, so its vector is zero and stays zero, which makes an all-unknown pass
# identical to the main pass.
UNKNOWN, NEGATIVE, POSITIVE = 0, 1, 2
ON_MAP = ("direct", "attend_map")  # reads over the feature map's positions, no prototypes


class PerClassLinear(nn.Module):
    """One weight vector and bias per class: ``logits[b, c] = <z[b, c], w[c]> + bias[c]``.

    Unlike a shared ``nn.Linear(D, 1)`` each class has its own classifier, as in Query2Label's
    group-wise heads.
    """

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(dim)  # nn.Linear's default init range
        self.weight = nn.Parameter(torch.empty(num_classes, dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(num_classes))

    def forward(self, z: Tensor) -> Tensor:
        return torch.einsum("bcd,cd->bc", z, self.weight) + self.bias  # (B, C)


class LCM(nn.Module):
    """Backbone + latent context embedding + label-correlation Transformer (+ training branch).

    ``forward(images, targets)`` runs the partial-label branch only when the module is in
    training mode, ``targets`` are given and ``branch`` is true; otherwise ``mask_logits`` and
    ``hidden`` are ``None`` and nothing extra is computed.
    """

    def __init__(self, cfg: ModelConfig, num_classes: int, branch: bool = True) -> None:
        super().__init__()
        if cfg.dim % cfg.heads:
            raise ConfigError(
                f"model.dim ({cfg.dim}) must be divisible by model.heads ({cfg.heads})"
            )
        if not 0.0 <= cfg.mask_ratio <= 1.0:
            raise ConfigError(f"model.mask_ratio must lie in [0, 1], got {cfg.mask_ratio}")
        if cfg.fusion not in ("cat", "sum"):
            raise ConfigError(f"model.fusion: {cfg.fusion!r} is not one of ['cat', 'sum']")
        if cfg.prototypes is not None and cfg.prototypes < 1:
            raise ConfigError(f"model.prototypes must be positive or null, got {cfg.prototypes}")
        if cfg.readout == "context" and (cfg.fusion != "cat" or not cfg.context_tokens):
            raise ConfigError("model.readout: context needs model.fusion: cat and context tokens")
        if cfg.reread and (cfg.context_read == "dot" or cfg.fusion != "cat"
                           or not cfg.context_tokens):  # fmt: skip
            raise ConfigError("model.reread needs a label-query read (model.context_read: "
                              "attend, direct or attend_map), model.fusion: cat and context "
                              "tokens")  # fmt: skip
        on_map = cfg.context_read in ON_MAP
        if on_map and cfg.dim % 4:
            raise ConfigError(f"model.dim ({cfg.dim}) must be divisible by 4 for the direct "
                              "read's position code")  # fmt: skip
        num_prototypes = cfg.prototypes or num_classes
        dim = cfg.dim
        self.num_classes = num_classes
        self.dim = dim
        self.fusion = cfg.fusion
        self.mask_ratio = cfg.mask_ratio
        self.context_read = cfg.context_read
        self.readout = cfg.readout
        self.reread = cfg.reread

        self.backbone = create_backbone(cfg.backbone, cfg.pretrained)
        channels = self.backbone.out_channels
        self.proj = nn.Conv2d(channels, dim, kernel_size=1)
        self.class_conv = nn.Conv2d(channels, num_classes, kernel_size=1, bias=False)
        if not on_map:  # the reads over the feature map look at positions, not prototypes
            # Unit-variance prototypes (nn.Embedding's init) so that they assign positions
            # differently from the first step; near-identical prototypes pool near-identical
            # context tokens and receive near-identical gradients.
            self.prototypes = nn.Parameter(torch.randn(num_prototypes, dim))  # (K, D)
            self.log_temperature = (  # cosine scores: the temperature starts at 10, a softmax
                # over a few dozen positions neither uniform nor one-hot for cosines in [-1, 1]
                nn.Parameter(torch.tensor(math.log(10.0)))
                if cfg.prototype_score == "cosine"
                else None
            )
        if cfg.context_read != "dot":
            self.read = LabelQueryRead(num_classes, dim, cfg.heads,
                                       project=cfg.context_read in ("attend", "attend_map"),
                                       init_std=cfg.embed_init)  # fmt: skip
        # LayerNorm on the tokens (and on what the label queries read): without it the
        # features' norm grows during training (6 -> 34 measured) and dwarfs the embeddings.
        norm = (lambda: nn.LayerNorm(dim)) if cfg.token_norm else nn.Identity
        self.norm_cls, self.norm_ctx = norm(), norm()
        self.norm_read = norm() if cfg.context_read != "dot" else nn.Identity()
        if self.fusion == "cat":
            self.type_embed = nn.Parameter(torch.randn(2, dim) * cfg.embed_init)  # e_cls, e_ctx
        layer = nn.TransformerEncoderLayer(
            dim,
            cfg.heads,
            cfg.ffn,
            cfg.dropout,
            batch_first=True,
            norm_first=False,  # post-norm, as SPEC section 2.3
        )
        self.transformer = nn.TransformerEncoder(layer, cfg.depth, enable_nested_tensor=False)
        if cfg.reinit_layers:
            reinit_layers(self.transformer.layers)
        if cfg.reread:  # the residual read's own post-norm in each layer
            self.reread_norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(cfg.depth))
            self.reread_dropout = nn.Dropout(cfg.dropout)
        self.context_tokens = cfg.context_tokens
        # [ours] the paper describes no label-identity embedding: with near-identical tokens
        # (small feature maps) it tells the Transformer whose token it is looking at.
        self.label_embed = (
            nn.Parameter(torch.randn(num_classes, dim) * cfg.embed_init)
            if cfg.label_embed
            else None
        )
        self.head = PerClassLinear(num_classes, dim)
        self.aux_head = PerClassLinear(num_classes, dim)
        self.state_embed = nn.Embedding(3, dim, padding_idx=UNKNOWN)
        self.branch = branch

    @property
    def branch(self) -> bool:
        """Whether training passes run the partial-label branch (given targets)."""
        return self._branch

    @branch.setter
    def branch(self, enabled: bool) -> None:
        # Without the branch the state embeddings get no gradient; freezing them keeps them
        # out of DistributedDataParallel's reducer, which would otherwise wait for them.
        self._branch = enabled
        self.state_embed.weight.requires_grad_(enabled)

    def forward_features(self, images: Tensor) -> dict[str, Tensor]:
        """Intermediate features and attention maps of the main pass, for visualisation.

        Keys: ``feature_map`` (B, C_b, h, w); ``class_attention`` A (B, C, h, w), each class's
        spatial softmax; ``context_map`` (B, C, h, w), the spatial map a class reaches through
        its context read (sums to 1; with ``model.reread`` the last layer's read); ``f_cls``,
        ``f_ctx``, ``z`` (B, C, D) (the tokens as the Transformer gets them, and its output as
        the head reads it); ``logits`` (B, C). With prototypes also ``context_assign``
        (B, K, h, w), each prototype's spatial softmax, ``context_attention`` (B, C, K), each
        class's weights over the context tokens, and ``context`` (B, K, D).
        """
        feats = self._embed(images)
        z, reread_weights = self._correlate(feats["f_cls"], feats["f_ctx"], feats.get("memory"))
        h, w = feats["feature_map"].shape[-2:]
        b = images.shape[0]
        context_map = feats["context_map"]
        if reread_weights is not None:  # the last layer's read, the one nearest the logits
            on_map = "context_assign" not in feats
            context_map = reread_weights if on_map else reread_weights @ feats["context_assign"]
        out = {
            "feature_map": feats["feature_map"],
            "class_attention": feats["class_attention"].reshape(b, -1, h, w),
            "context_map": context_map.reshape(b, -1, h, w),
            "f_cls": feats["f_cls"],
            "f_ctx": feats["f_ctx"],
            "z": z,
            "logits": self.head(z),
        }
        if "context" in feats:
            out["context_assign"] = feats["context_assign"].reshape(b, -1, h, w)
            out["context_attention"] = feats["context_attention"]
            out["context"] = feats["context"]
        return out

    def forward(self, images: Tensor, targets: Tensor | None = None) -> ModelOutput:
        feats = self._embed(images)
        f_cls, f_ctx, memory = feats["f_cls"], feats["f_ctx"], feats.get("memory")  # (B, C, D)
        out = ModelOutput(
            logits=self.head(self._correlate(f_cls, f_ctx, memory)[0]),
            aux_logits=self.aux_head(f_cls),
        )
        if self.training and targets is not None and self.branch:
            states, hidden = self.sample_label_states(targets)
            z_mask, _ = self._correlate(f_cls + self.state_embed(states), f_ctx, memory)
            out.mask_logits = self.head(z_mask)
            out.hidden = hidden
        return out

    def sample_label_states(self, targets: Tensor) -> tuple[Tensor, Tensor]:
        """Label states for the branch and the mask of labels it hid, both (B, C).

        Each known target (0 or 1) is hidden with probability ``mask_ratio``; hidden and
        already-unknown (-1) labels get state UNKNOWN, the rest NEGATIVE or POSITIVE.
        """
        known = targets >= 0  # (B, C)
        draw = torch.rand(targets.shape, device=targets.device)
        hidden = known & (draw < self.mask_ratio)
        revealed = known & ~hidden
        states = torch.where(revealed, targets.long() + 1, torch.zeros_like(targets.long()))
        return states, hidden

    def _embed(self, images: Tensor) -> dict[str, Tensor]:
        """Latent Context Information Embedding: class-aware and context-aware tokens."""
        fmap = self.backbone(images)  # (B, C_b, h, w)
        x = self.proj(fmap).flatten(2).transpose(1, 2)  # (B, HW, D)
        # Class-aware: one spatial softmax per class pools the projected features.
        attn_cls = self.class_conv(fmap).flatten(2).softmax(dim=-1)  # (B, C, HW)
        f_cls = attn_cls @ x  # (B, C, D)
        feats: dict[str, Tensor] = {"feature_map": fmap, "class_attention": attn_cls}
        if self.context_read in ON_MAP:
            h, w = fmap.shape[-2:]
            pos = sine_position_code(h, w, self.dim, x.device, x.dtype)  # (HW, D)
            keys = self.norm_read(x) + pos  # (B, HW, D)
            # direct: the values are the features themselves; attend_map: the projected
            # keys, position included, as Query2Label's memory
            values = x if self.context_read == "direct" else keys
            memory = self.read.memory(keys, values)
            f_ctx, context_map = self.read.attend(memory)  # (B, C, D), (B, C, HW)
        else:
            context, assign = pool_context(x, self.prototypes, self.log_temperature)
            if self.context_read == "dot":
                scale = 1.0 / math.sqrt(self.dim)
                attn_ctx = (f_cls @ context.transpose(1, 2) * scale).softmax(dim=-1)  # (B, C, K)
                f_ctx = attn_ctx @ context  # (B, C, D)
            else:  # attend
                read = self.norm_read(context)
                memory = self.read.memory(read, read)
                f_ctx, attn_ctx = self.read.attend(memory)  # (B, C, D), (B, C, K)
            context_map = attn_ctx @ assign  # (B, C, HW)
            feats |= {"context_assign": assign, "context_attention": attn_ctx,
                      "context": context}  # fmt: skip
        feats |= {"f_cls": self.norm_cls(f_cls), "f_ctx": self.norm_ctx(f_ctx),
                  "context_map": context_map}  # fmt: skip
        if self.reread:
            feats["memory"] = memory
        return feats

    def output_biases(self) -> list[Tensor]:
        return [self.head.bias, self.aux_head.bias]

    def _correlate(
        self, f_cls: Tensor, f_ctx: Tensor, memory: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Fuse the two token kinds and run the label-correlation Transformer -> (B, C, D),
        and with ``model.reread`` the last layer's read weights (B, C, N), else ``None``."""
        if self.label_embed is not None:
            f_cls, f_ctx = f_cls + self.label_embed, f_ctx + self.label_embed
        if not self.context_tokens:  # control: the class-aware tokens alone
            return self.transformer(f_cls), None  # (B, C, D)
        if self.fusion == "sum":
            return self.transformer(f_cls + f_ctx), None  # (B, C, D)
        tokens = torch.cat([f_cls + self.type_embed[0], f_ctx + self.type_embed[1]], dim=1)
        weights = None
        if self.reread:
            z, weights = self._reread(tokens, memory)  # (B, 2C, D), (B, C, N)
        else:
            z = self.transformer(tokens)  # (B, 2C, D)
        c = self.num_classes
        if self.readout == "context":  # the class-aware half informs it through attention
            return z[:, c:], weights  # (B, C, D)
        return z[:, :c] + z[:, c:], weights  # (B, C, D): each class's two tokens summed back

    def _reread(self, tokens: Tensor, memory: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """The Transformer's layers with a read of the latent context inside each: post-norm
        self-attention over all 2C tokens, then the context-aware half reads ``memory``
        queried by its current state, then the feed-forward block -> tokens (B, 2C, D) and
        the last read's weights (B, C, N)."""
        c = self.num_classes
        weights = tokens.new_empty(0)
        for layer, norm in zip(self.transformer.layers, self.reread_norms, strict=True):
            attended = layer.self_attn(tokens, tokens, tokens, need_weights=False)[0]
            x = layer.norm1(tokens + layer.dropout1(attended))
            read, weights = self.read.attend(memory, x[:, c:])  # (B, C, D), (B, C, N)
            x = torch.cat([x[:, :c], norm(x[:, c:] + self.reread_dropout(read))], dim=1)
            ff = layer.linear2(layer.dropout(layer.activation(layer.linear1(x))))
            tokens = layer.norm2(x + layer.dropout2(ff))
        return tokens, weights


def reinit_layers(layers: nn.ModuleList) -> None:
    """Give each layer of an ``nn.TransformerEncoder`` / ``Decoder`` its own initial weights.

    Those classes deep-copy one layer, so every layer starts identical; DETR and Query2Label
    re-initialise after cloning. Here every submodule is reset with PyTorch's own init."""
    for layer in layers:
        inside_attention: set[int] = set()
        for m in layer.modules():
            if isinstance(m, nn.MultiheadAttention):
                m._reset_parameters()  # its own init, out_proj's zero bias included
                inside_attention.update(id(c) for c in m.modules() if c is not m)
            elif (
                m is not layer and id(m) not in inside_attention and hasattr(m, "reset_parameters")
            ):
                m.reset_parameters()


@register_model("lcm")
def build_lcm(cfg: ModelConfig, num_classes: int, branch: bool = True) -> LCM:
    return LCM(cfg, num_classes, branch)
