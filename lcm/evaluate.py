"""Evaluate a trained model directory on shards and write its reports.

The one evaluation path used by ``lcm evaluate`` and the DVC ``evaluate`` stage; training
validates through the same ``inference.predict`` and ``metrics.evaluate_scores``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lcm import checkpoint as ckpt
from lcm.data.shard_format import ShardInfo
from lcm.data.shards import eval_loader, resolve_shards
from lcm.errors import CheckpointError, ConfigError, DataError
from lcm.inference import predict
from lcm.metrics import EvalResult, calibrate, evaluate_scores
from lcm.progress import ProgressCallback
from lcm.reports import write_evaluation
from lcm.runtime import amp_dtype, select_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluateRequest:
    checkpoint: Path
    shards: str
    out_dir: Path
    weights: str = "raw"  # raw | ema: chosen up front, never the better of the two
    batch_size: int = 64
    num_workers: int = 2
    device: str = "auto"
    calibrate: bool = True


@dataclass(frozen=True)
class ResolvedEvaluate:
    """A checked :class:`EvaluateRequest` with its shards and the model's metadata read."""

    request: EvaluateRequest
    shards: tuple[list[Any], ShardInfo]
    meta: ckpt.ModelMeta


def check_evaluate(req: EvaluateRequest | ResolvedEvaluate) -> ResolvedEvaluate:
    """Every input checked (one LcmError line each), the shards and ``model.json`` read once."""
    if isinstance(req, ResolvedEvaluate):
        return req
    if req.weights not in ("raw", "ema"):
        raise ConfigError(f"--weights {req.weights!r}: expected raw or ema")
    select_device(req.device)
    meta = ckpt.load_meta(req.checkpoint)
    paths, info = resolve_shards(req.shards)
    if tuple(info.classes) != meta.classes:
        raise CheckpointError(
            f"{req.checkpoint}: the model's {len(meta.classes)} classes differ from the "
            f"{len(info.classes)} classes of {req.shards}"
        )
    return ResolvedEvaluate(request=req, shards=(paths, info), meta=meta)


def evaluate_checkpoint(
    request: EvaluateRequest | ResolvedEvaluate, progress: ProgressCallback | None = None
) -> EvalResult:
    resolved = check_evaluate(request)
    req = resolved.request
    device = select_device(req.device)
    paths, info = resolved.shards
    loaded = ckpt.load_for_inference(
        req.checkpoint, req.weights, device, thresholds=False, meta=resolved.meta
    )
    meta = loaded.meta
    loader = eval_loader(
        (paths, info),
        batch_size=req.batch_size,
        image_size=meta.image_size,
        num_workers=req.num_workers,
        mean=meta.mean,
        std=meta.std,
    )
    keys, scores, targets = predict(
        loaded.model, loader, device, amp_dtype("auto", device), progress=progress
    )
    if not keys:
        raise DataError(f"{req.shards}: the shards hold no samples")
    result = evaluate_scores(scores, targets, meta.classes)
    calibration = calibrate(scores, targets) if req.calibrate else None
    thresholds = calibration.thresholds if calibration is not None else None
    write_evaluation(
        result,
        scores,
        targets,
        meta.classes,
        req.out_dir,
        extra={
            "checkpoint": str(req.checkpoint),
            "weights": req.weights,
            "shards": str(req.shards),
            "thresholds": thresholds.tolist() if thresholds is not None else None,
        },
    )
    if thresholds is not None:
        # Calibrated on this split: prediction uses them; say so in the file name's owner.
        ckpt.save_thresholds(req.checkpoint / ckpt.THRESHOLDS_FILE, meta.classes, thresholds,
                             calibration.reasons)  # fmt: skip
        skipped = [c for c, r in zip(meta.classes, calibration.reasons, strict=True)
                   if r.startswith("no skill")]  # fmt: skip
        note = f" (no skill, default 0.5 kept: {', '.join(skipped)})" if skipped else ""
        log.info("saved per-class thresholds to %s%s", req.checkpoint / ckpt.THRESHOLDS_FILE, note)
    return result
