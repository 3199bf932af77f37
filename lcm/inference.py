"""Scoring: a model and a stream of batches -> sigmoid scores, one batch at a time.

:func:`score_batches` is the one place a model is run for inference. Batch prediction writes
each scored batch away as it comes (memory stays flat however many images there are);
evaluation and training's validation gather a whole split through :func:`predict`, a thin
collector over the same generator.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from lcm.data.delivery import Batch
from lcm.progress import ProgressCallback
from lcm.runtime import autocast


@dataclass(frozen=True)
class ScoredBatch:
    keys: list[str]
    scores: np.ndarray  # (B, C) float32 in [0, 1]
    targets: np.ndarray  # (B, C) float32 in {1, 0, -1 unknown}; (B, 0) when there are none
    skipped: tuple[tuple[str, str], ...]  # (key, reason) of the batch's undecodable images
    shard: int | None  # the loader's shard index, for shard-aligned loaders


@torch.no_grad()
def score_batches(
    model: nn.Module,
    batches: Iterable[Batch],
    device: torch.device,
    dtype: torch.dtype | None = None,
    progress: ProgressCallback | None = None,
) -> Iterator[ScoredBatch]:
    """Yield the scores of each batch, in stream order. ``model`` must be in eval mode."""
    model.eval()
    total = len(batches) if hasattr(batches, "__len__") else 0
    for i, batch in enumerate(batches):
        if batch.keys:
            images = batch.images.to(device, non_blocking=True)
            with autocast(device, dtype):
                logits = model(images).logits  # (B, C)
            scores = torch.sigmoid(logits.float()).cpu().numpy()
        else:  # every image of the batch was undecodable
            scores = np.zeros((0, 0), np.float32)
        yield ScoredBatch(batch.keys, scores, batch.targets.numpy(), batch.skipped, batch.shard)
        if progress:
            progress(i + 1, total)


def predict(
    model: nn.Module,
    loader: Iterable[Batch],
    device: torch.device,
    dtype: torch.dtype | None = None,
    progress: ProgressCallback | None = None,
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Keys, scores ``(N, C)`` and targets ``(N, C)`` of a whole loader, in stream order."""
    keys: list[str] = []
    scores: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    for scored in score_batches(model, loader, device, dtype, progress):
        if scored.keys:
            keys.extend(scored.keys)
            scores.append(scored.scores)
            targets.append(scored.targets)
    if not keys:
        return keys, np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32)
    return keys, np.concatenate(scores), np.concatenate(targets)
