"""The comparison's recipe switches: independent Transformer layers, per-group learning
rates, output biases from class priors, the label-identity embedding and the controls."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lcm.config import LossConfig, ModelConfig, TrainConfig
from lcm.data.shards import label_priors
from lcm.models import build_model
from lcm.trainer import build_trainer

TINY = dict(backbone="resnet18", dim=32, heads=2, ffn=64, depth=3, dropout=0.0)


def _layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    stack = model.transformer if hasattr(model, "transformer") else model.decoder
    return list(stack.layers)


@pytest.mark.parametrize("arch", ["lcm", "q2l"])
def test_transformer_layers_start_apart_only_when_reinitialised(arch):
    torch.manual_seed(0)
    cloned = _layers(build_model(ModelConfig(arch=arch, **TINY), 5))
    torch.manual_seed(0)
    fresh = _layers(build_model(ModelConfig(arch=arch, reinit_layers=True, **TINY), 5))

    def same(a, b):
        return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))

    assert same(cloned[0], cloned[1]) and same(cloned[1], cloned[2])  # nn.Transformer* clones
    assert not same(fresh[0], fresh[1]) and not same(fresh[1], fresh[2])
    weights = [lay.linear1.weight for lay in fresh]
    bound = 1 / math.sqrt(TINY["dim"])  # nn.Linear's own init range, per layer
    assert all(w.abs().max() <= bound for w in weights)


def test_head_lr_gives_backbone_and_head_their_own_groups_and_peaks():
    cfg = TrainConfig(lr=2e-3, head_lr=2e-4, warmup=0.3, device="cpu", ema_decay=None)
    state = build_trainer(
        ModelConfig(**TINY), LossConfig(), cfg, 5, total_steps=10, device=torch.device("cpu")
    )
    backbone = {id(p) for p in state.model.backbone.parameters()}
    peaks = {}
    for group in state.opt.param_groups:
        kinds = {id(p) in backbone for p in group["params"]}
        assert len(kinds) == 1  # a group is all backbone or all head
        peaks.setdefault(kinds.pop(), set()).add(group["max_lr"])
    assert peaks == {True: {2e-3}, False: {2e-4}}
    n_head = sum(p.numel() for g in state.opt.param_groups for p in g["params"]
                 if g["max_lr"] == 2e-4)  # fmt: skip
    n_all = sum(p.numel() for p in state.model.parameters() if p.requires_grad)
    assert n_head == n_all - sum(p.numel() for p in state.model.backbone.parameters())
    for _ in range(3):  # warming up: the head stays 10x below the backbone
        state.opt.step()
        state.sched.step()
    lrs = sorted({round(g["lr"] / g["max_lr"], 9) for g in state.opt.param_groups})
    assert len(lrs) == 1  # the same schedule shape for both


@pytest.mark.parametrize("arch", ["lcm", "gap", "gap_mlp", "q2l"])
def test_prior_bias_starts_every_output_at_the_class_log_odds(arch):
    priors = [0.5, 0.1, 0.9, 0.02, 0.3]
    cfg = ModelConfig(arch=arch, prior_bias=True, mlp_hidden=16, **TINY)
    state = build_trainer(cfg, LossConfig(), TrainConfig(device="cpu"), 5, 10,
                          torch.device("cpu"), priors=priors)  # fmt: skip
    want = torch.log(torch.tensor(priors) / (1 - torch.tensor(priors)))
    biases = state.model.output_biases()
    assert biases and all(torch.allclose(b, want) for b in biases)
    assert all(torch.allclose(b, want) for b in state.ema.module.output_biases())
    with pytest.raises(Exception, match="priors"):
        build_trainer(cfg, LossConfig(), TrainConfig(device="cpu"), 5, 10, torch.device("cpu"))


def test_label_embedding_and_context_free_control_change_the_head_only():
    x = torch.randn(2, 3, 64, 64)
    torch.manual_seed(1)
    base = build_model(ModelConfig(**TINY), 5).eval()
    torch.manual_seed(1)
    named = build_model(ModelConfig(label_embed=True, **TINY), 5).eval()
    with torch.no_grad():
        named.label_embed.normal_(0, 1.0)
        missing = named.load_state_dict(base.state_dict(), strict=False)
        assert missing.missing_keys == ["label_embed"]
        assert not torch.allclose(base(x).logits, named(x).logits)
        assert torch.equal(base(x).aux_logits, named(x).aux_logits)
        alone = build_model(ModelConfig(context_tokens=False, readout="sum", **TINY), 5).eval()
        assert alone(x).logits.shape == (2, 5)
        mlp = build_model(ModelConfig(arch="gap_mlp", mlp_hidden=16, **TINY), 5)
        assert mlp(x).logits.shape == (2, 5)


def test_resume_refuses_a_changed_head_lr():
    from lcm.errors import ConfigError

    def trainer(head_lr):
        cfg = TrainConfig(device="cpu", ema_decay=None, head_lr=head_lr)
        return build_trainer(ModelConfig(**TINY), LossConfig(), cfg, 5, 10, torch.device("cpu"))

    saved = trainer(None).state_dict()
    with pytest.raises(ConfigError, match="head_lr"):
        trainer(1e-4).load_state_dict(saved)


def test_label_priors_count_known_targets(tiny_data, tmp_path):
    from lcm.data.manifest import read_manifest, targets_from_lists

    manifest = read_manifest(tiny_data.prepared_train)
    t = manifest.table
    targets = targets_from_lists(
        t.column("labels").to_pylist(), t.column("ignore").to_pylist(), manifest.num_classes
    )
    want = (targets == 1).sum(0) / (targets != -1).sum(0)
    assert np.allclose(label_priors(tiny_data.train), want)
    from lcm.data.masks import make_mask, read_mask

    mask_file = make_mask(tiny_data.prepared_train, 0.5, 1, tmp_path / "m.parquet").path
    known = read_mask(mask_file)
    seen = np.stack([known[k] for k in t.column("key").to_pylist()]) & (targets != -1)
    want = ((targets == 1) & seen).sum(0) / seen.sum(0)  # hidden labels leak nothing
    assert np.allclose(label_priors(tiny_data.train, mask_file), want)
