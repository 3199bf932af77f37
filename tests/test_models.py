"""Models: registry entries forward/backward, the partial-label branch, weights loading, size."""

from __future__ import annotations

import dataclasses
import gzip
import re
import shutil
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import load_file, save_file
from torch import nn

from lcm.checkpoint import load_for_inference
from lcm.config import (
    FIRST_RECONSTRUCTION,
    LCM_V1S,
    LossConfig,
    ModelConfig,
    model_overrides,
)
from lcm.errors import CheckpointError, ConfigError
from lcm.models import MODELS, build_model
from lcm.models.backbones import BACKBONES, create_backbone, hub_weights_path
from lcm.models.complexity import format_report, model_report
from lcm.models.lcm import LCM
from lcm.models.losses import compute_loss

pytestmark = pytest.mark.usefixtures("one_thread")


C = 5  # classes
SIZE = 64  # input side: a 2 x 2 feature map
TINY = ModelConfig(backbone="resnet18", dim=32, heads=4, ffn=64, depth=2, dropout=0.0)


def tiny(**overrides: object) -> ModelConfig:
    return dataclasses.replace(TINY, **overrides)


# The latent-context designs (lcm.models.context): the first reconstruction and the redesign's
# reads, each with the hygiene switches that go with it.
HYGIENE = {"token_norm": True, "embed_init": 1.0, "prototype_score": "cosine"}
DESIGNS = {
    "first": FIRST_RECONSTRUCTION,
    "attend": {"context_read": "attend", "readout": "context", **HYGIENE},
    "direct": {"context_read": "direct", "readout": "context", **HYGIENE},
    "reread": {"context_read": "attend_map", "readout": "context", "reread": True, **HYGIENE},
}


def random_batch(n: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, SIZE, SIZE, generator=g)
    targets = torch.randint(-1, 2, (n, C), generator=g).float()  # {-1, 0, 1}
    targets[:, 0] = 1.0  # at least one known label per image
    return images, targets


def count_passes(model: LCM) -> list[int]:
    """Passes through the label-correlation Transformer: each ends in the main head."""
    calls = [0]
    model.head.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def assert_trains(
    model: nn.Module, unused: set[str] = frozenset(), loss_cfg: LossConfig = LossConfig()
) -> None:
    """One forward/backward: shapes, finiteness, a gradient for every parameter but
    ``unused``."""
    images, targets = random_batch()
    model.train()
    out = model(images, targets)
    assert out.logits.shape == (2, C)
    assert torch.isfinite(out.logits).all()
    loss, parts = compute_loss(out, targets, loss_cfg)
    assert torch.isfinite(loss) and loss.item() > 0
    assert parts["loss"] == pytest.approx(loss.item())
    loss.backward()
    for name, p in model.named_parameters():
        if name in unused:
            continue
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize(
    "overrides",
    [
        {"arch": "lcm"},  # the default design
        {"arch": "lcm", **FIRST_RECONSTRUCTION},
        {"arch": "lcm", **FIRST_RECONSTRUCTION, "fusion": "sum"},
        {"arch": "lcm", "prototypes": 3},
        {"arch": "lcm", "label_embed": True, "reinit_layers": True},
        {"arch": "lcm", **FIRST_RECONSTRUCTION, "context_tokens": False},
        {"arch": "lcm", **FIRST_RECONSTRUCTION, **HYGIENE},
        {"arch": "lcm", "context_read": "attend", "readout": "context", **HYGIENE},
        {"arch": "lcm", "context_read": "attend", "prototypes": 3},
        {"arch": "lcm", "context_read": "direct", "readout": "context", **HYGIENE},
        {"arch": "lcm", "context_read": "direct", "label_embed": True, "token_norm": True},
        {"arch": "lcm", "context_read": "direct", "fusion": "sum", "readout": "sum"},
        {"arch": "lcm", "context_read": "attend_map", "readout": "context", **HYGIENE},
        {"arch": "lcm", **DESIGNS["reread"]},
        {"arch": "lcm", "context_read": "attend", "reread": True, "prototypes": 3},
        {"arch": "lcm", "context_read": "direct", "reread": True, "readout": "sum"},
        {"arch": "gap"},
        {"arch": "gap_mlp", "mlp_hidden": 16},
        {"arch": "q2l", "reinit_layers": True},
    ],
    ids=lambda o: "-".join(str(v) for v in o.values()),
)
def test_arch_registry_forward_backward(overrides: dict) -> None:
    torch.manual_seed(0)
    model = build_model(tiny(**overrides), C)
    # the control without context tokens keeps the context machinery, unused
    unused = {"prototypes", "type_embed"} if overrides.get("context_tokens") is False else set()
    assert_trains(model, unused)
    if overrides.get("context_read") in ("direct", "attend_map"):  # no prototypes to learn
        assert not any("prototypes" in name for name, _ in model.named_parameters())
    assert set(MODELS) == {"lcm", "gap", "gap_mlp", "q2l"}


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_backbone_registry_forward_backward(name: str) -> None:
    torch.manual_seed(0)
    backbone = create_backbone(name)
    fmap = backbone(torch.randn(1, 3, SIZE, SIZE))
    assert fmap.shape == (1, backbone.out_channels, SIZE // 32, SIZE // 32)
    assert_trains(build_model(tiny(backbone=name), C))


def test_lcm_outputs_by_mode() -> None:
    torch.manual_seed(0)
    model = build_model(tiny(mask_ratio=0.5), C)
    images, targets = random_batch()
    model.train()
    out = model(images, targets)
    assert out.aux_logits.shape == out.mask_logits.shape == (2, C)
    assert out.hidden.dtype == torch.bool and out.hidden.shape == (2, C)
    assert not out.hidden[targets < 0].any()  # already-unknown labels are never "hidden"
    assert model(images).mask_logits is None  # no targets, no branch


@pytest.mark.parametrize("design", DESIGNS)
def test_eval_ignores_targets(design: str) -> None:
    torch.manual_seed(0)
    model = build_model(tiny(dropout=0.1, mask_ratio=0.5, **DESIGNS[design]), C).eval()
    calls = count_passes(model)
    images, targets = random_batch()
    with torch.no_grad():
        plain = model(images)
        with_targets = model(images, targets)
    assert calls[0] == 2  # one pass each: the branch never ran
    assert with_targets.mask_logits is None and with_targets.hidden is None
    assert torch.equal(plain.logits, with_targets.logits)
    assert torch.equal(plain.aux_logits, with_targets.aux_logits)


@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize(("branch", "passes"), [(True, 2), (False, 1)])
def test_branch_flag_controls_second_pass(branch: bool, passes: int, design: str) -> None:
    torch.manual_seed(0)
    model = build_model(tiny(**DESIGNS[design]), C, branch=branch).train()
    calls = count_passes(model)
    images, targets = random_batch()
    out = model(images, targets)
    assert calls[0] == passes
    assert (out.mask_logits is not None) == branch
    assert (out.hidden is not None) == branch
    # Every trainable parameter gets a gradient (what DistributedDataParallel needs): without
    # the branch the state embeddings are frozen rather than left dangling.
    assert model.state_embed.weight.requires_grad == branch
    loss, _ = compute_loss(out, targets, LossConfig(beta=0.1 if branch else 0.0))
    loss.backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name


@pytest.mark.parametrize("design", DESIGNS)
def test_all_unknown_states_reproduce_main_pass(design: str) -> None:
    # State 0 embeds to zero, so a branch pass that hides everything is the main pass:
    # this is why inference needs no branch.
    torch.manual_seed(0)
    model = build_model(tiny(mask_ratio=1.0, **DESIGNS[design]), C).train()
    images, targets = random_batch()
    out = model(images, targets)
    assert torch.equal(out.hidden, targets >= 0)
    torch.testing.assert_close(out.mask_logits, out.logits)
    # Revealing the labels must change the branch's output.
    model.mask_ratio = 0.0
    out = model(images, targets)
    assert not out.hidden.any()
    assert not torch.allclose(out.mask_logits, out.logits)


def test_sample_label_states() -> None:
    model = build_model(tiny(mask_ratio=0.3), C)
    torch.manual_seed(0)
    targets = torch.randint(-1, 2, (4000, C)).float()
    states, hidden = model.sample_label_states(targets)
    known = targets >= 0
    assert torch.equal(states[~known], torch.zeros_like(states[~known]))
    assert torch.equal(states[hidden], torch.zeros_like(states[hidden]))
    revealed = known & ~hidden
    assert torch.equal(states[revealed], targets[revealed].long() + 1)
    share = hidden.sum().item() / known.sum().item()
    assert 0.28 < share < 0.32


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: torch.optim.AdamW(ps, lr=0.1, weight_decay=0.1),
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1),
    ],
    ids=["adamw", "sgd"],
)
def test_unknown_state_embedding_stays_zero(make_opt) -> None:
    torch.manual_seed(0)
    model = build_model(tiny(mask_ratio=0.5), C).train()
    table = model.state_embed.weight
    assert torch.equal(table[0], torch.zeros_like(table[0]))
    before = table.detach().clone()
    opt = make_opt(model.parameters())
    for step in range(2):
        images, targets = random_batch(seed=step)
        out = model(images, targets)
        assert (out.hidden & (targets >= 0)).any() and (~out.hidden & (targets >= 0)).any()
        loss, _ = compute_loss(out, targets, LossConfig(beta=1.0))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.equal(table[0], torch.zeros_like(table[0]))
    assert not torch.equal(table[1:], before[1:])  # the known states did train


def test_forward_features() -> None:
    torch.manual_seed(0)
    model = build_model(tiny(prototypes=3), C).eval()
    images, _ = random_batch()
    with torch.no_grad():
        feats = model.forward_features(images)
        logits = model(images).logits
    h = w = SIZE // 32
    assert feats["class_attention"].shape == (2, C, h, w)
    assert feats["context_assign"].shape == (2, 3, h, w)
    assert feats["context_map"].shape == (2, C, h, w)
    assert feats["context_attention"].shape == (2, C, 3)
    for key in ("f_cls", "f_ctx", "z"):
        assert feats[key].shape == (2, C, 32)
    ones = torch.ones(2, C)
    torch.testing.assert_close(feats["class_attention"].sum(dim=(2, 3)), ones)
    torch.testing.assert_close(feats["context_map"].sum(dim=(2, 3)), ones)
    torch.testing.assert_close(feats["logits"], logits)


@pytest.mark.parametrize("read", ["attend", "direct", "attend_map"])
def test_forward_features_of_the_label_query_reads(read: str) -> None:
    torch.manual_seed(0)
    model = build_model(tiny(context_read=read, readout="context", **HYGIENE), C).eval()
    images, _ = random_batch()
    with torch.no_grad():
        feats = model.forward_features(images)
        logits = model(images).logits
    h = w = SIZE // 32
    assert feats["context_map"].shape == (2, C, h, w)
    torch.testing.assert_close(feats["context_map"].sum(dim=(2, 3)), torch.ones(2, C))
    assert ("context_assign" in feats) == (read == "attend")  # direct: no prototypes
    torch.testing.assert_close(feats["logits"], logits)
    # the context readout: the logits read the context half of the Transformer's output
    tokens = torch.cat([feats["f_cls"] + model.type_embed[0], feats["f_ctx"] + model.type_embed[1]],
                       dim=1)  # fmt: skip
    with torch.no_grad():
        z = model.transformer(tokens)
    torch.testing.assert_close(feats["z"], z[:, C:])


@pytest.mark.parametrize("read", ["attend", "attend_map"])
def test_reread_reads_inside_every_layer(read: str) -> None:
    """``model.reread``: one read before the Transformer and one inside each layer, queried by
    the tokens' state; the same weights without the switch give other logits."""
    torch.manual_seed(0)
    cfg = tiny(context_read=read, readout="context", reread=True, depth=3, **HYGIENE)
    model = build_model(cfg, C).eval()
    images, _ = random_batch()
    queried: list[bool] = []
    attend = model.read.attend
    model.read.attend = lambda memory, queries=None: (queried.append(queries is not None),
                                                      attend(memory, queries))[1]  # fmt: skip
    with torch.no_grad():
        feats = model.forward_features(images)
        logits = model(images).logits
    assert queried == [False, True, True, True] * 2  # forward_features, then forward
    h = w = SIZE // 32
    assert feats["context_map"].shape == (2, C, h, w)
    torch.testing.assert_close(feats["context_map"].sum(dim=(2, 3)), torch.ones(2, C))
    torch.testing.assert_close(feats["logits"], logits)
    once = build_model(dataclasses.replace(cfg, reread=False), C).eval()
    missing, unexpected = once.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(k.startswith("reread_norms") for k in unexpected)
    with torch.no_grad():
        assert not torch.allclose(once(images).logits, logits, atol=1e-3)
        # each image's tokens read its own feature map: the first image twice scores as before
        other = model(torch.cat([images[:1], images[:1]])).logits
    torch.testing.assert_close(other[0], logits[0])


def test_redesign_switches_checked() -> None:
    with pytest.raises(ConfigError, match="readout: context needs"):
        build_model(tiny(readout="context", fusion="sum"), C)
    with pytest.raises(ConfigError, match="readout: context needs"):
        build_model(tiny(readout="context", context_tokens=False), C)
    with pytest.raises(ConfigError, match="divisible by 4"):
        build_model(tiny(context_read="direct", dim=34, heads=2), C)
    with pytest.raises(ConfigError, match="model.reread needs"):
        build_model(tiny(reread=True), C)  # the parameter-free read has no queries
    with pytest.raises(ConfigError, match="model.reread needs"):
        build_model(tiny(context_read="attend", reread=True, fusion="sum"), C)


def test_gap_class_activation_maps() -> None:
    torch.manual_seed(0)
    model = build_model(tiny(arch="gap"), C).eval()
    images, _ = random_batch()
    with torch.no_grad():
        feats = model.forward_features(images)
        logits = model(images).logits
    assert feats["cam"].shape == (2, C, SIZE // 32, SIZE // 32)
    torch.testing.assert_close(feats["logits"], logits)


def test_overfits_one_batch() -> None:
    torch.manual_seed(0)
    model = build_model(tiny(), C).train()
    g = torch.Generator().manual_seed(1)
    images = torch.randn(8, 3, SIZE, SIZE, generator=g)
    targets = torch.randint(0, 2, (8, C), generator=g).float()
    targets[0, :2] = -1.0
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_cfg = LossConfig()
    losses = []
    for _ in range(60):
        loss, _ = compute_loss(model(images, targets), targets, loss_cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if loss.item() < losses[0] / 10:
            break
    assert losses[-1] < losses[0] / 10, losses[::10]


def test_unknown_names_rejected() -> None:
    with pytest.raises(ConfigError, match="nope"):
        build_model(tiny(arch="nope"), C)
    with pytest.raises(ConfigError, match="nope"):
        create_backbone("nope")
    with pytest.raises(ConfigError, match="heads"):
        build_model(tiny(dim=30), C)


def test_size_matches_paper() -> None:
    report = model_report("resnet101", num_classes=80, image_size=448, depth=3)
    # the default (lcm_v1s) inside the band: 69.7M +- 3%, at most Q2L's 36.6 GMACs
    assert report["params"] == pytest.approx(69.7e6, rel=0.03) and report["gmacs"] <= 36.6
    assert report["gmacs"] == pytest.approx(35.8, rel=0.03)
    first = model_report("resnet101", 80, 448, 3, **FIRST_RECONSTRUCTION, ffn=2048)
    assert first["params"] == pytest.approx(69.7e6, rel=0.01)  # the first reconstruction
    assert report["baseline"]["gmacs"] == pytest.approx(31.5, rel=0.03)
    backbone = report["breakdown"]["backbone"]
    assert report["head"]["params"] == report["params"] - backbone["params"]
    assert report["head"]["gmacs"] == pytest.approx(report["gmacs"] - backbone["gmacs"])
    assert "state_embed" in report["breakdown"] and "aux_head" in report["breakdown"]
    # every MAC is in some row (ops outside any child's forward in the last one)
    rows = report["breakdown"].values()
    assert sum(r["gmacs"] for r in rows) == pytest.approx(report["gmacs"])
    v5s = {**LCM_V1S, "context_read": "attend_map", "ffn": 1536}
    v5s = model_report("resnet101", 80, 448, 3, **v5s)
    # the label-query read runs through its memory() / attend() methods: 0.63 GMACs
    assert v5s["breakdown"]["(ops outside a child's forward)"]["gmacs"] > 0.4
    assert "GMACs" in format_report(report)


def test_the_redesign_variants_sizes_against_the_papers_band() -> None:
    """The decision rule's eligibility (69.7M +- 3%, <= 36.6 GMACs) for the screened reads."""
    hygiene = ["model.readout=context", "model.token_norm=true", "model.embed_init=1.0"]
    v1 = model_overrides(["model.context_read=attend", *hygiene])
    v1s = model_report(**LCM_V1S, ffn=1536)
    assert v1s == model_report(**v1, prototype_score="cosine", ffn=1536)
    v5s = model_report(**model_overrides(["model.context_read=attend_map", *hygiene]), ffn=1536)
    v6s = model_report(**model_overrides(["model.context_read=attend_map", "model.reread=true",
                                          *hygiene]), ffn=1536)  # fmt: skip
    assert v6s["params"] > v5s["params"] and v6s["gmacs"] > v5s["gmacs"]  # reads 3x more
    assert model_report(**v1, ffn=2048)["params"] > 69.7e6 * 1.03  # V1 itself is outside
    for rep in (v1s, v5s, v6s):
        assert abs(rep["params"] / 69.7e6 - 1) <= 0.03 and rep["gmacs"] <= 36.6
    makefile = (Path(__file__).parents[1] / "Makefile").read_text()  # make pictures-v1s
    flags = re.search(r"^V1S_SET := (.*?)\n(?!  )", makefile, re.M | re.S).group(1)
    pairs = re.findall(r"--set model\.(\w+)=(\S+)", flags)
    assert model_overrides([f"model.{k}={v}" for k, v in pairs]) == {**LCM_V1S, "ffn": 192}
    with pytest.raises(ConfigError, match="nope"):
        model_overrides(["model.nope=1"])
    with pytest.raises(ConfigError, match="only model"):
        model_overrides(["train.epochs=1"])


# --- pretrained weights: never downloaded, read from the hub cache or a local file ---------


def torchvision_state(name: str = "resnet18") -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return getattr(torchvision.models, name)(weights=None).state_dict()


def assert_loaded(backbone: nn.Module, state: dict[str, torch.Tensor]) -> None:
    loaded = backbone.state_dict()
    assert "fc.weight" not in loaded
    for key, value in loaded.items():
        assert torch.equal(value, state[key]), key


def test_pretrained_missing_from_hub_cache(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    expected = tmp_path / "checkpoints" / "resnet18-f37072fd.pth"
    assert hub_weights_path("resnet18") == expected
    with pytest.raises(CheckpointError, match=str(expected)):
        build_model(tiny(pretrained=True), C)


def test_pretrained_from_hub_cache(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    state = torchvision_state()
    path = hub_weights_path("resnet18")
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    assert_loaded(build_model(tiny(pretrained=True), C).backbone, state)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_pretrained_from_local_file(tmp_path, suffix: str) -> None:
    state = torchvision_state()
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    assert_loaded(create_backbone("resnet18", str(path)), state)


def test_backbone_from_saved_model(tmp_path) -> None:
    torch.manual_seed(2)
    trained = build_model(tiny(), C)
    path = tmp_path / "model.safetensors"
    save_file(trained.state_dict(), str(path))
    fresh = create_backbone("resnet18", str(path))
    assert_loaded(fresh, trained.backbone.state_dict())


def test_pretrained_bad_files(tmp_path) -> None:
    missing = tmp_path / "absent.pth"
    with pytest.raises(CheckpointError, match="absent.pth"):
        create_backbone("resnet18", str(missing))
    wrong = tmp_path / "resnet34.pth"
    torch.save(torchvision_state("resnet34"), wrong)
    with pytest.raises(CheckpointError, match="resnet34.pth.*do not fit"):
        create_backbone("resnet18", str(wrong))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a weights file")
    with pytest.raises(CheckpointError, match="garbage.safetensors"):
        create_backbone("resnet18", str(garbage))
    not_state = tmp_path / "list.pth"
    torch.save([1, 2, 3], not_state)
    with pytest.raises(CheckpointError, match="list.pth"):
        create_backbone("resnet18", str(not_state))


FIXTURES = Path(__file__).parent / "fixtures"


def test_model_dir_of_the_first_reconstruction_scores_unchanged(tmp_path) -> None:
    """A model directory written by the code before the redesign switches existed (commit
    b812aed; tests/fixtures/make_first_reconstruction.py) loads as that design and gives that
    code's logits: in float64 to 1e-9 (summation order moves float64 logits far less; 0.0 on
    the machine that checked it, with 1 and 2 threads), in float32 to 1e-3 (bit-identical on
    the CPU that wrote them; 3e-6 to ~1e-4 elsewhere). Any change to the design moves them by
    far more."""
    model_dir = tmp_path / "model"
    shutil.copytree(FIXTURES / "lcm-first-reconstruction", model_dir)
    packed = model_dir / "model.safetensors.gz"
    (model_dir / "model.safetensors").write_bytes(gzip.decompress(packed.read_bytes()))
    packed.unlink()
    loaded = load_for_inference(model_dir, "raw", torch.device("cpu"))
    cfg = loaded.meta.model
    assert {k: getattr(cfg, k) for k in FIRST_RECONSTRUCTION} == FIRST_RECONSTRUCTION
    ref = load_file(FIXTURES / "lcm-first-reconstruction.scores.safetensors")
    mean = torch.tensor(loaded.meta.mean)[:, None, None]
    std = torch.tensor(loaded.meta.std)[:, None, None]
    x = (ref["images"].float() / 255 - mean) / std  # the very ops of the script that wrote them
    with torch.no_grad():
        logits = loaded.model(x).logits
        logits64 = loaded.model.double()(x.double()).logits
    torch.testing.assert_close(logits64, ref["logits64"], rtol=0, atol=1e-9)
    torch.testing.assert_close(logits, ref["logits"], rtol=0, atol=1e-3)
