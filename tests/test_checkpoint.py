"""lcm/checkpoint.py and lcm/resume.py: model directories and the resume state."""

from __future__ import annotations

import logging
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from lcm import checkpoint as ckpt
from lcm.config import LossConfig, ModelConfig, TrainConfig
from lcm.errors import CheckpointError
from lcm.resume import STATE_FILE, ResumeState
from lcm.trainer import TensorBatch, build_trainer, train_step

CPU = torch.device("cpu")
TINY = ModelConfig(backbone="resnet18", dim=32, heads=2, ffn=64, depth=1)
CLASSES = ("a", "b", "c")


def _meta(model: ModelConfig = TINY) -> ckpt.ModelMeta:
    return ckpt.ModelMeta(model, CLASSES, 32, (0.4, 0.4, 0.4), (0.2, 0.2, 0.2), {"note": "x"})


def _trainer(seed: int = 0, ema: float | None = 0.9):
    torch.manual_seed(seed)
    return build_trainer(TINY, LossConfig(), TrainConfig(ema_decay=ema), len(CLASSES), 10, CPU)


def test_model_directory_round_trip_and_digests(tmp_path):
    state = _trainer()
    ckpt.save_model(tmp_path, state.model, _meta(), state.ema.module)
    loaded = ckpt.load_for_inference(tmp_path, "raw", CPU)
    assert loaded.meta == _meta() and not loaded.model.training
    for name, value in state.model.state_dict().items():
        assert torch.equal(value, loaded.model.state_dict()[name]), name
    assert loaded.digest == ckpt.model_digest(tmp_path, "raw") != ckpt.model_digest(tmp_path, "ema")
    assert loaded.threshold_source == ckpt.DEFAULT_THRESHOLD_SOURCE
    ckpt.save_model(tmp_path, _trainer(seed=1).model, _meta(), None)
    assert ckpt.model_digest(tmp_path, "raw") != loaded.digest  # other weights, other digest


def test_weights_that_do_not_fit_or_do_not_parse_are_refused(tmp_path):
    state = _trainer()
    ckpt.save_model(tmp_path, state.model, _meta(replace(TINY, dim=64, ffn=128)), None)
    with pytest.raises(CheckpointError, match="do not fit the architecture"):
        ckpt.load_for_inference(tmp_path, "raw", CPU)
    ckpt.save_model(tmp_path, state.model, _meta(), None)
    (tmp_path / ckpt.RAW_WEIGHTS).write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        ckpt.load_for_inference(tmp_path, "raw", CPU)
    with pytest.raises(CheckpointError, match="model.json: not found"):
        ckpt.load_meta(tmp_path / "elsewhere")


def test_thresholds_round_trip_and_mismatches(tmp_path):
    path = tmp_path / ckpt.THRESHOLDS_FILE
    ckpt.save_thresholds(path, CLASSES, np.array([0.1, 0.5, 0.9]))
    assert ckpt.load_thresholds(path, CLASSES).tolist() == [0.1, 0.5, 0.9]
    assert ckpt.load_thresholds(path, CLASSES[::-1]).tolist() == [0.9, 0.5, 0.1]
    with pytest.raises(CheckpointError, match="missing 'd'"):
        ckpt.load_thresholds(path, (*CLASSES, "d"))
    path.write_text('{"a": 0.1, "b": true, "c": 0.2}')
    with pytest.raises(CheckpointError, match="'b' is not a finite number"):
        ckpt.load_thresholds(path, CLASSES)


def test_resume_state_round_trip_restores_the_run_exactly(tmp_path):
    state = _trainer()
    batch = TensorBatch(torch.randn(2, 3, 32, 32), torch.tensor([[1.0, 0, -1], [0, 1, 1]]))
    train_step(state, batch)
    history = [{"epoch": 1.0, "val_mAP": 0.5}, {"epoch": 2.0}]
    saved = ResumeState.capture(
        state, epoch=2, batch=3, step=7, loss_sum=1.5, loss_count=3, history=history
    )
    saved.to_cpu().save(tmp_path)
    after_save = torch.rand(3)  # the RNG stream the resumed run must reproduce

    other = _trainer(seed=5)
    back = ResumeState.load(tmp_path)
    back.restore(other)
    assert (back.epoch, back.batch, back.step, back.loss_sum, back.loss_count) == (2, 3, 7, 1.5, 3)
    assert back.history[0] == history[0] and math.isnan(back.history[1]["val_mAP"])
    assert torch.equal(torch.rand(3), after_save)
    for name, value in state.model.state_dict().items():
        assert torch.equal(value, other.model.state_dict()[name]), name
    for trainer in (state, other):  # the next step moves both alike: Adam's moments came back
        torch.manual_seed(0)
        train_step(trainer, batch)
    for name, value in state.model.state_dict().items():
        assert torch.equal(value, other.model.state_dict()[name]), name

    (tmp_path / STATE_FILE).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot load training state"):
        ResumeState.load(tmp_path)
    with pytest.raises(CheckpointError, match="nothing to resume from"):
        ResumeState.load(tmp_path / "none")


def test_checkpoint_writer_keeps_order_and_reports_errors(caplog):
    done: list[int] = []
    writer = ckpt.CheckpointWriter(background=True)
    for i in range(5):
        writer.submit(lambda i=i: done.append(i))
    writer.wait()
    assert done == [0, 1, 2, 3, 4]

    def fail() -> None:
        raise OSError("disk full")

    writer.submit(fail)
    with pytest.raises(OSError, match="disk full"):
        writer.close()
    quiet = ckpt.CheckpointWriter(background=True)
    quiet.submit(fail)
    with caplog.at_level(logging.ERROR, logger="lcm.checkpoint"):
        quiet.close(quiet=True)
    assert "background checkpoint write failed" in caplog.text
