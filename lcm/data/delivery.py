"""The receiving side of the loaders: batches normalised and delivered to a device.

:class:`BatchLoader` runs a batch stream in DataLoader workers and turns each raw batch into a
:class:`Batch`: normalised here, or copied (pinned) and normalised on the GPU, or decoded on
the GPU; on a GPU a prefetch thread does this on its own CUDA stream, overlapping the model.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from lcm.data.stream import BatchStream, EncodedBatch, RawBatch
from lcm.data.transforms import (
    MEAN,
    STD,
    decode_image,
    decode_images,
    eval_transform,
    normalize,
)
from lcm.errors import DataError


class Batch(NamedTuple):
    images: Tensor  # (B, 3, S, S) float32, normalised
    targets: Tensor  # (B, C) float32 in {1 positive, 0 negative, -1 unknown}
    keys: list[str]
    # eval loaders with ``skip_bad``: (key, reason) of this batch's undecodable samples
    skipped: tuple[tuple[str, str], ...] = ()
    # eval loaders with ``align_shards``: index (into the loader's shard list) of the one
    # shard every sample of this batch comes from
    shard: int | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return self._replace(
            images=self.images.to(device, non_blocking=non_blocking),
            targets=self.targets.to(device, non_blocking=non_blocking),
        )


class BatchLoader:
    """Runs a batch stream in DataLoader workers and normalises each batch in this process.

    ``device``: where the images of each batch are delivered (targets stay on the CPU). With
    a CUDA device and ``pin_memory``, the uint8 pixels travel through pinned memory and are
    normalised on the GPU (a quarter of the bytes of float32 cross the bus). When the stream
    does not decode (``decode_on_device``), the workers only read JPEG bytes and this process
    decodes and resizes each batch on ``device`` (nvJPEG on a GPU; on the CPU the same ops as
    the workers, so the results are identical: the tested fallback).
    """

    def __init__(
        self,
        stream: BatchStream,
        num_workers: int,
        pin_memory: bool,
        mean: Sequence[float] = MEAN,
        std: Sequence[float] = STD,
        device: torch.device | None = None,
    ) -> None:
        self.stream, self.num_workers, self.pin_memory = stream, num_workers, pin_memory
        self.mean, self.std = tuple(mean), tuple(std)
        self.device = device

    def __iter__(self) -> Iterator[Batch]:
        loader = DataLoader(
            self.stream, batch_size=None, num_workers=self.num_workers, collate_fn=_as_is
        )
        batches = (self._finish(raw) for raw in loader)
        if self.device is None or not (self.device.type == "cuda" or not self.stream.decode):
            yield from batches  # plain CPU batches: nothing to overlap
            return
        yield from _prefetched(batches, self.device)

    def _finish(self, raw: RawBatch | EncodedBatch) -> Batch:
        return self._encoded(raw) if isinstance(raw, EncodedBatch) else self._decoded(raw)

    def _decoded(self, raw: RawBatch) -> Batch:
        pixels, targets, keys, skipped, shard = raw
        pixels_t, targets_t = torch.from_numpy(pixels), torch.from_numpy(targets)
        on_gpu = self.device is not None and self.device.type == "cuda"
        if on_gpu and self.pin_memory:
            gpu = pixels_t.pin_memory().to(self.device, non_blocking=True)
            images = normalize(gpu, mean=self.mean, std=self.std)  # (B, 3, S, S) on the GPU
        else:
            pin = self.pin_memory and torch.cuda.is_available()
            images = torch.empty(pixels_t.shape, dtype=torch.float32, pin_memory=pin)
            normalize(pixels_t, out=images, mean=self.mean, std=self.std)  # (B, 3, S, S)
            if self.device is not None:
                images = images.to(self.device, non_blocking=pin)
        return Batch(images, targets_t, keys, tuple(skipped), None if shard < 0 else shard)

    def _encoded(self, raw: EncodedBatch) -> Batch:
        device = self.device or torch.device("cpu")
        imgs, skipped = self._decode_all(raw, device)
        kept = [i for i, img in enumerate(imgs) if img is not None]
        size = self.stream.image_size
        preset = eval_transform(size)
        pixels = torch.empty((len(kept), 3, size, size), dtype=torch.uint8, device=device)
        for out, i in enumerate(kept):
            pixels[out] = preset.place(imgs[i], raw.flips[i])
        images = normalize(pixels, mean=self.mean, std=self.std)  # (B, 3, S, S) on device
        targets = torch.from_numpy(raw.targets[kept] if skipped else raw.targets)
        keys = [raw.keys[i] for i in kept]
        return Batch(images, targets, keys, tuple(skipped), None if raw.shard < 0 else raw.shard)

    def _decode_all(
        self, raw: EncodedBatch, device: torch.device
    ) -> tuple[list[Tensor | None], list[tuple[str, str]]]:
        try:
            return list(decode_images(raw.jpegs, device)), []
        except RuntimeError as e:
            _raise_device_failure(e)  # find the culprit one image at a time
        imgs: list[Tensor | None] = []
        skipped: list[tuple[str, str]] = []
        for jpg, key, where in zip(raw.jpegs, raw.keys, raw.wheres, strict=True):
            try:
                imgs.append(decode_images([jpg], device)[0])
                continue
            except RuntimeError as e:
                _raise_device_failure(e)
            try:  # what the GPU decoder cannot do (CMYK, say) the CPU decoder may
                imgs.append(decode_image(jpg).to(device))
            except RuntimeError as e:
                if not self.stream.skip_bad:
                    raise DataError(f"{where}: cannot decode its JPEG ({e})") from e
                skipped.append((key, f"undecodable JPEG ({str(e).splitlines()[0]})"))
                imgs.append(None)
        return imgs, skipped


def _raise_device_failure(e: RuntimeError) -> None:
    """Out of memory or a broken CUDA context is not a bad JPEG: let it through."""
    if isinstance(e, torch.OutOfMemoryError) or str(e).startswith("CUDA error"):
        raise e


def _prefetched(batches: Iterator[Batch], device: torch.device, depth: int = 2) -> Iterator[Batch]:
    """``batches``, made ready by a background thread up to ``depth`` ahead.

    On a GPU the thread decodes, copies and normalises on its own CUDA stream, so that work
    overlaps the consumer's kernels instead of queueing behind them; each batch carries an
    event the consumer's stream waits on before touching the images. Order, contents and
    errors are those of ``batches`` (an error is raised where its batch would have been).
    """
    cuda = device.type == "cuda"
    side = torch.cuda.Stream(device) if cuda else None
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            with torch.cuda.stream(side) if cuda else contextlib.nullcontext():
                for batch in batches:
                    event = None
                    if cuda:
                        event = torch.cuda.Event()
                        event.record(side)
                    if not put((batch, event)):
                        return
            put(done)
        except BaseException as e:  # handed to the consumer, raised there
            put(e)

    thread = threading.Thread(target=work, name="batch-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            batch, event = item
            if event is not None:
                current = torch.cuda.current_stream(device)
                current.wait_event(event)
                batch.images.record_stream(current)  # the allocator must not reuse it early
            yield batch
    finally:
        stop.set()
        thread.join()


def _as_is(batch: RawBatch | EncodedBatch) -> RawBatch | EncodedBatch:
    """Collate that leaves numpy as numpy (the default would make shared-memory tensors)."""
    return batch


class TrainLoader(BatchLoader):
    """One epoch of one rank. ``len()`` is the batches per epoch (the same on every rank),
    also when ``skip_batches`` makes the iterator start later; ``remaining`` is what it yields."""

    def __len__(self) -> int:
        return self.stream.plan.num_batches

    @property
    def remaining(self) -> int:
        return self.stream.plan.num_batches - self.stream.first


class EvalLoader(BatchLoader):
    """Every sample once, in shard order; the last batch (with ``align_shards``, each shard's
    last batch) may be smaller."""

    def __len__(self) -> int:
        return self.stream.plan.num_batches
