"""The training speed-ups change nothing beyond float tolerance (README: GPU table).

Each switch is tested on the CPU against the path it replaces: the foreach EMA against the
per-tensor loop, the fused optimiser against the default one, the device-decode loader (run
on the CPU: its fallback) against the worker-decode loader, and background checkpoints
against a resume from them.
"""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest
import torch

from lcm import checkpoint as ckpt
from lcm.config import LossConfig, ModelConfig, TrainConfig, load_params
from lcm.data.shards import eval_loader, train_loader
from lcm.engine import fit
from lcm.errors import DataError
from lcm.train_request import TrainRequest
from lcm.trainer import Ema, TensorBatch, build_trainer, train_step
from tests._engine_fixtures import write_params
from tests._predict_fixtures import corrupt_one_jpeg

CPU = torch.device("cpu")
TINY_MODEL = ModelConfig(backbone="resnet18", dim=32, heads=2, ffn=64, depth=1)


def _batches(n: int, classes: int = 4) -> list[TensorBatch]:
    g = torch.Generator().manual_seed(0)
    return [
        TensorBatch(
            torch.randn(4, 3, 32, 32, generator=g),
            (torch.rand(4, classes, generator=g) < 0.4).float(),
        )
        for _ in range(n)
    ]


def _trained_state(train: TrainConfig, steps: int = 4):
    torch.manual_seed(0)
    state = build_trainer(TINY_MODEL, LossConfig(beta=0.1), train, 4, steps, CPU)
    for batch in _batches(steps):
        train_step(state, batch)
    return state


def test_foreach_ema_equals_the_per_tensor_loop():
    torch.manual_seed(0)
    state = build_trainer(TINY_MODEL, LossConfig(beta=0.1), TrainConfig(ema_decay=None), 4, 6, CPU)
    loop, multi = Ema(state.model, 0.9, foreach=False), Ema(state.model, 0.9, foreach=True)
    for i, batch in enumerate(_batches(6)):
        train_step(state, batch)  # moves the weights and the BatchNorm buffers
        loop.update(state.model)
        multi.update(state.model)
        if i == 2:  # new storage for every conv weight: the foreach lists must follow it
            state.model.to(memory_format=torch.channels_last)
    a, b = loop.module.state_dict(), multi.module.state_dict()
    assert list(a) == list(b)
    assert any(not v.dtype.is_floating_point for v in a.values())  # integer buffers covered
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # and the average really moved away from both the init and the live weights
    live = state.model.state_dict()
    assert any(not torch.equal(b[n], live[n]) for n in b if b[n].dtype.is_floating_point)


def test_ema_foreach_survives_load_state_dict():
    state = _trained_state(TrainConfig(ema_decay=0.9), steps=2)
    saved = {k: v.clone() if torch.is_tensor(v) else v for k, v in state.ema.state_dict().items()}
    saved["module"] = {k: v.clone() for k, v in saved["module"].items()}
    fresh = Ema(state.model, 0.9, foreach=True)
    fresh.update(state.model)  # caches its tensor lists
    fresh.load_state_dict(saved)
    reference = Ema(state.model, 0.9, foreach=False)
    reference.load_state_dict(saved)
    fresh.update(state.model)
    reference.update(state.model)
    for name, value in reference.module.state_dict().items():
        assert torch.equal(value, fresh.module.state_dict()[name]), name


def test_resume_takes_the_optimizer_kernels_from_this_runs_config():
    fused = _trained_state(TrainConfig(ema_decay=None, fused_optimizer=True), steps=1)
    saved = fused.state_dict()
    torch.manual_seed(0)
    plain = build_trainer(
        TINY_MODEL,
        LossConfig(beta=0.1),
        TrainConfig(ema_decay=None, fused_optimizer=False),
        4,
        1,
        CPU,
    )
    plain.load_state_dict(saved)
    assert not any(g.get("fused") for g in plain.opt.param_groups)
    assert plain.opt.state_dict()["state"].keys() == saved["optimizer"]["state"].keys()


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_fused_optimizer_matches_the_default_within_float_tolerance(optimizer):
    # One step: training amplifies float rounding differences step after step (after four
    # steps of this tiny net they reach ~2e-5 whichever two float paths are compared).
    base = TrainConfig(optimizer=optimizer, ema_decay=None, grad_clip=1.0)
    fused = _trained_state(replace(base, fused_optimizer=True), steps=1)
    plain = _trained_state(replace(base, fused_optimizer=False), steps=1)
    assert any(g.get("fused") for g in fused.opt.param_groups)
    assert not any(g.get("fused") for g in plain.opt.param_groups)
    for (name, a), b in zip(
        fused.model.state_dict().items(), plain.model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)


def _same_batches(a, b) -> None:
    got_a, got_b = list(a), list(b)
    assert len(got_a) == len(got_b) > 0
    for x, y in zip(got_a, got_b, strict=True):
        assert x.keys == y.keys
        assert torch.equal(x.images, y.images)
        assert torch.equal(x.targets, y.targets)
        assert x.skipped == y.skipped and x.shard == y.shard


def test_device_decode_fallback_gives_the_worker_path_batches(tiny_data):
    common = dict(batch_size=8, image_size=24, seed=5, epoch=1, num_workers=0)
    _same_batches(
        train_loader(tiny_data.train, **common),
        train_loader(tiny_data.train, **common, device=CPU, decode_on_device=True),
    )
    _same_batches(  # through worker processes too, and resuming mid-epoch
        train_loader(tiny_data.train, **{**common, "num_workers": 2}, skip_batches=2),
        train_loader(
            tiny_data.train,
            **{**common, "num_workers": 2},
            skip_batches=2,
            device=CPU,
            decode_on_device=True,
        ),
    )
    evals = dict(batch_size=5, image_size=24, num_workers=0, align_shards=True)
    _same_batches(
        eval_loader(tiny_data.val, **evals),
        eval_loader(tiny_data.val, **evals, decode_on_device=True),
    )


def test_device_decode_skips_or_names_a_corrupt_jpeg_like_the_workers(tiny_data, tmp_path):
    shards = tmp_path / "shards"
    key = corrupt_one_jpeg(tiny_data.train, shards, shard="shard-000001.tar")
    evals = dict(batch_size=8, image_size=24, num_workers=0, skip_bad=True)
    _same_batches(
        eval_loader(shards, **evals),
        eval_loader(shards, **evals, decode_on_device=True),
    )
    skipped = [s for b in eval_loader(shards, **evals, decode_on_device=True) for s in b.skipped]
    assert [k for k, _ in skipped] == [key]
    strict = {**evals, "skip_bad": False}
    with pytest.raises(DataError, match=f"shard-000001.tar: sample '{key}': cannot decode"):
        list(eval_loader(shards, **strict, decode_on_device=True))


@pytest.mark.slow
@pytest.mark.parametrize("background", [True, False])
def test_checkpoint_policy_resumes_exactly(tiny_data, tmp_path, monkeypatch, background):
    """A run stopped right after a mid-epoch checkpoint was handed to the writer resumes to
    the uninterrupted run's history and weights, with background writes on or off."""
    params = load_params(
        write_params(
            tmp_path / "params.yaml",
            train={"checkpoint_every": 2, "checkpoint_async": background},
        )
    )
    reference = fit(
        TrainRequest(params, str(tiny_data.train), tmp_path / "reference", str(tiny_data.val))
    )

    # The background write of step 2's checkpoint waits until step 3 has changed the live
    # weights, so a snapshot that aliased them would be caught every time.
    step3_done = threading.Event()
    write_weights = ckpt.save_weights

    def late_write(*args, **kwargs):
        if background:
            assert step3_done.wait(60)
        write_weights(*args, **kwargs)

    monkeypatch.setattr(ckpt, "save_weights", late_write)

    class Stop(Exception):
        pass

    def stop_after(step: int, total: int) -> None:
        if step == 3:
            step3_done.set()
            raise Stop

    out = tmp_path / "stopped"
    with pytest.raises(Stop):
        fit(
            TrainRequest(params, str(tiny_data.train), out, str(tiny_data.val)), progress=stop_after
        )
    state = torch.load(out / "state.pt", weights_only=True)
    assert (state["epoch"], state["batch"], state["step"]) == (0, 2, 2)
    resumed = fit(TrainRequest(params, str(tiny_data.train), out, str(tiny_data.val), resume=True))
    assert resumed.history == reference.history
    ref = torch.load(tmp_path / "reference" / "state.pt", weights_only=True)
    got = torch.load(out / "state.pt", weights_only=True)
    for name, value in ref["model"].items():
        assert torch.equal(value, got["model"][name]), name
    reference_weights = (tmp_path / "reference" / "model.safetensors").read_bytes()
    assert (out / "model.safetensors").read_bytes() == reference_weights


@pytest.mark.parametrize("arch", ["lcm", "gap"])
def test_folded_batchnorm_scores_match_the_unfolded_model(arch):
    from lcm.models import build_model
    from lcm.models.fold import fold_batchnorm

    torch.manual_seed(0)
    model = build_model(replace(TINY_MODEL, arch=arch), 4, branch=False)
    for batch in _batches(3):  # give the BatchNorms real running statistics
        model.train()(batch.images)
    model.eval()
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        before = torch.sigmoid(model(x).logits)
        n = fold_batchnorm(model)
        after = torch.sigmoid(model(x).logits)
    assert n == 20  # resnet18: the stem, 16 in the blocks, 3 downsample paths
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(model.train())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_prefetched_batches_equal_the_cpu_batches(tiny_data):
    """The side-stream prefetch (pinned uint8 copies normalised on the GPU) delivers the CPU
    path's batches; stopping early shuts its thread down."""
    cuda = torch.device("cuda")
    common = dict(batch_size=8, image_size=24, seed=5, epoch=1, num_workers=2)
    cpu = list(train_loader(tiny_data.train, **common))
    gpu = train_loader(tiny_data.train, **common, device=cuda, pin_memory=True)
    got = list(gpu)
    assert [b.keys for b in got] == [b.keys for b in cpu]
    for a, b in zip(cpu, got, strict=True):
        assert b.images.device.type == "cuda"
        torch.testing.assert_close(b.images.cpu(), a.images, rtol=0, atol=1e-6)
    it = iter(gpu)
    next(it)
    it.close()
    assert not any(t.name == "batch-prefetch" for t in threading.enumerate())
