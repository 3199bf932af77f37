"""Sampling plans: which stream positions form batch ``b`` (see :mod:`lcm.data.shards`).

A plan is a pure function of its arguments: batch ``b`` of a training plan depends only on
(seed, epoch, rank, world size, b), which is what makes mid-epoch resume exact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

# Distinct first words keep the random streams of the different draws apart.
_ORDER, _WINDOW, _FLIP = 1, 2, 3


class Plan:
    """Which stream positions form batch ``b``, and where each position lives."""

    window = 1  # stream positions a batch's samples may be drawn from

    def __init__(self, order: Sequence[int], counts: Sequence[int], num_batches: int) -> None:
        self.order = np.asarray(order, dtype=np.int64)  # shard index of each stream slot
        self.starts = np.concatenate([[0], np.cumsum(np.asarray(counts)[self.order])])
        self.num_batches = num_batches

    def positions(self, b: int) -> np.ndarray:
        raise NotImplementedError

    def generator(self, b: int) -> torch.Generator | None:
        return None

    def locate(self, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        slot = np.searchsorted(self.starts, pos, side="right") - 1
        return self.order[slot], pos - self.starts[slot]  # (shard, ordinal in shard)


class EvalPlan(Plan):
    """Consecutive stream positions; with ``align`` a batch never spans two shards (each
    shard's last batch may be smaller), so a shard's batches are the same whichever other
    shards are in the stream, and so are its scores, bit for bit."""

    def __init__(self, counts: Sequence[int], batch_size: int, align: bool = False) -> None:
        total = int(sum(counts))
        if align:
            ends = np.cumsum(counts)
            bounds = [
                (lo, min(lo + batch_size, int(end)))
                for start, end in zip(np.concatenate([[0], ends[:-1]]), ends, strict=True)
                for lo in range(int(start), int(end), batch_size)
            ]
        else:
            bounds = [(lo, min(lo + batch_size, total)) for lo in range(0, total, batch_size)]
        super().__init__(range(len(counts)), counts, len(bounds))
        self.bounds = np.asarray(bounds, dtype=np.int64).reshape(-1, 2)
        self.window = batch_size

    def positions(self, b: int) -> np.ndarray:
        lo, hi = self.bounds[b]
        return np.arange(lo, hi)


class TrainPlan(Plan):
    def __init__(
        self,
        counts: Sequence[int],
        batch_size: int,
        seed: int,
        epoch: int,
        rank: int,
        world_size: int,
        resample: bool,
        window: int,
    ) -> None:
        num_batches = int(sum(counts)) // (world_size * batch_size)
        self.per_rank = num_batches * batch_size
        rng = np.random.default_rng([_ORDER, seed, epoch])  # the same on every rank
        if resample:
            order: list[int] = []
            covered, need = 0, self.per_rank * world_size
            while covered < need:
                order.append(int(rng.integers(len(counts))))
                covered += counts[order[-1]]
        else:
            order = rng.permutation(len(counts)).tolist()
        super().__init__(order, counts, num_batches)
        self.batch_size, self.seed, self.epoch, self.rank = batch_size, seed, epoch, rank
        self.base = rank * self.per_rank
        self.window = math.ceil(window / batch_size) * batch_size
        self._perm: tuple[int, np.ndarray] | None = None

    def positions(self, b: int) -> np.ndarray:
        start = b * self.batch_size
        w = start // self.window
        lo = w * self.window
        if self._perm is None or self._perm[0] != w:
            rng = np.random.default_rng([_WINDOW, self.seed, self.epoch, self.rank, w])
            self._perm = (w, rng.permutation(min(self.window, self.per_rank - lo)))
        return self.base + lo + self._perm[1][start - lo : start - lo + self.batch_size]

    def generator(self, b: int) -> torch.Generator:
        seq = np.random.SeedSequence([_FLIP, self.seed, self.epoch, self.rank, b])
        return torch.Generator().manual_seed(int(seq.generate_state(1, dtype=np.uint64)[0] >> 1))
