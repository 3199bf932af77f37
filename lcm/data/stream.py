"""The worker side of the loaders: a plan's batches read, decoded and labelled.

:class:`BatchStream` runs inside DataLoader worker processes: worker ``w`` of ``W`` builds
batches ``w, w + W, ...`` of its plan. It yields uint8 pixels (or, when the receiving process
decodes on its device, the JPEG bytes and the flips drawn for them) with the targets.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from lcm.data.masks import LabelMask
from lcm.data.plans import Plan
from lcm.data.shard_format import ShardInfo
from lcm.data.tar_index import ShardReader
from lcm.data.transforms import (
    Preset,
    decode_image,
    eval_transform,
    train_transform,
)
from lcm.errors import DataError

Sample = tuple[str, bytes, dict]  # key, JPEG bytes, metadata (labels, ignore)
# uint8 (B, 3, S, S), float (B, C), keys, skipped (key, reason), the batch's one shard or -1
RawBatch = tuple[np.ndarray, np.ndarray, list[str], list[tuple[str, str]], int]


class EncodedBatch(NamedTuple):
    """A batch whose JPEGs are decoded by the receiving process, on its device."""

    jpegs: list[bytes]
    flips: list[bool]  # drawn in the worker, in the order the CPU path draws them
    targets: np.ndarray  # (B, C)
    keys: list[str]
    wheres: list[str]  # "shard: sample 'key'", for error messages
    shard: int


class BatchStream(IterableDataset):
    """Yields batches ``first + w, first + w + W, ...`` in worker ``w`` of ``W``, read from
    local tars by seeking (:meth:`batches`; streaming from URLs overrides it).

    Images leave the workers as uint8 numpy arrays and are normalised by the receiving
    process: a quarter of the bytes of float32, and numpy arrays are pickled through the
    worker's pipe, which measured cheaper than a new shared-memory segment per batch (what
    torch tensors get).
    """

    def __init__(
        self,
        paths: Sequence[Path],
        info: ShardInfo,
        plan: Plan,
        image_size: int,
        augment: bool,
        mask: LabelMask | None,
        first: int,
        skip_bad: bool = False,
        decode: bool = True,
    ) -> None:
        self.paths, self.counts = list(paths), [e.count for e in info.shards]
        self.num_classes = info.num_classes
        self.plan, self.mask, self.first = plan, mask, first
        self.augment, self.image_size, self.skip_bad = augment, image_size, skip_bad
        self.decode = decode  # False: workers only read; the loader decodes on its device
        if augment and skip_bad:  # a skipped image would shift the flips drawn after it
            raise ValueError("a training stream never skips images")

    def __iter__(self) -> Iterator[RawBatch | EncodedBatch]:
        worker = get_worker_info()
        wid, nw = (0, 1) if worker is None else (worker.id, worker.num_workers)
        if worker is not None:
            torch.set_num_threads(1)  # the workers already fill the cores
        size = self.image_size
        preset = train_transform(size) if self.augment else eval_transform(size)
        for b, samples, shards in self.batches(wid, nw):
            yield self.assemble(b, samples, shards, preset)

    def batches(self, wid: int, nw: int) -> Iterator[tuple[int, list[Sample], np.ndarray]]:
        """``(batch index, samples, shard of each sample)`` of worker ``wid`` of ``nw``:
        batches ``first + wid, first + wid + nw, ...``, each read by seeking in the tars."""
        reader = ShardReader(self.paths, self.counts, self.plan.window)
        for b in range(self.first + wid, self.plan.num_batches, nw):
            shards, ordinals = self.plan.locate(self.plan.positions(b))
            yield b, reader.read(shards, ordinals), shards

    def assemble(
        self, b: int, samples: list[Sample], shards: np.ndarray, preset: Preset
    ) -> RawBatch | EncodedBatch:
        """Batch ``b`` from its samples: decoded, transformed and labelled (or, when the
        receiving process decodes, the JPEG bytes with the flips drawn for them)."""
        gen = self.plan.generator(b) if self.augment else None
        one_shard = int(shards[0]) if len(shards) and (shards == shards[0]).all() else -1
        if not self.decode:
            return self._encoded(samples, shards, preset, gen, one_shard)
        n, size = len(samples), self.image_size
        pixels = torch.empty((n, 3, size, size), dtype=torch.uint8)  # (B, 3, S, S)
        targets = np.zeros((n, self.num_classes), np.float32)  # (B, C)
        keys: list[str] = []
        skipped: list[tuple[str, str]] = []
        for (key, jpg, meta), shard in zip(samples, shards.tolist(), strict=True):
            where = f"{self.paths[shard]}: sample {key!r}"
            try:
                img = decode_image(jpg)  # (3, H, W) uint8
            except RuntimeError as e:
                if not self.skip_bad:
                    raise DataError(f"{where}: cannot decode its JPEG ({e})") from e
                skipped.append((key, f"undecodable JPEG ({str(e).splitlines()[0]})"))
                continue
            i = len(keys)
            pixels[i] = preset.pixels(img, gen)
            self._fill_targets(targets[i], key, meta, where)
            keys.append(key)
        n = len(keys)
        return pixels[:n].numpy(), targets[:n], keys, skipped, one_shard

    def _encoded(
        self,
        samples: list[Sample],
        shards: np.ndarray,
        preset: Preset,
        gen: torch.Generator | None,
        one_shard: int,
    ) -> EncodedBatch:
        targets = np.zeros((len(samples), self.num_classes), np.float32)  # (B, C)
        wheres = [
            f"{self.paths[s]}: sample {key!r}"
            for (key, _, _), s in zip(samples, shards.tolist(), strict=True)
        ]
        for i, ((key, _, meta), where) in enumerate(zip(samples, wheres, strict=True)):
            self._fill_targets(targets[i], key, meta, where)
        flips = [preset.draw_flip(gen) for _ in samples]
        jpegs = [jpg for _, jpg, _ in samples]
        return EncodedBatch(jpegs, flips, targets, [k for k, _, _ in samples], wheres, one_shard)

    def _fill_targets(self, row: np.ndarray, key: str, meta: dict, where: str) -> None:
        try:
            row[meta.get("ignore", [])] = -1.0
            row[meta["labels"]] = 1.0
        except (KeyError, IndexError, TypeError) as e:
            raise DataError(f"{where}: bad labels in its metadata ({e!r})") from e
        if self.mask is not None:
            if key not in self.mask:
                raise DataError(f"{self.mask.path}: has no row for {where}")
            row[~self.mask[key]] = -1.0
