"""Reading shards: locating them, and the train / eval loaders.

Both loaders see the data as one stream of samples: the shards of an epoch in some order,
each in file order. A loader is a list of batches, each batch a list of stream positions;
worker ``w`` of ``W`` (PyTorch DataLoader processes) builds batches ``w, w + W, ...``. Because
the DataLoader collects from its workers round-robin when ``batch_size=None``, batches arrive
in exactly this order, whatever ``W``. A worker reads only the bytes of its own samples: it
indexes a shard's tar headers once, then seeks to the members it needs.

Training (:func:`train_loader`), per epoch:

1. the shard order is a permutation drawn from ``(seed, epoch)``, identical on every rank;
   with ``resample=True`` shards are drawn with replacement until the epoch is covered (ranks
   still take disjoint positions of that stream, but a shard drawn twice repeats samples);
2. each rank takes a contiguous run of ``n * batch_size`` positions of that stream, with
   ``n = total // (world_size * batch_size)`` (the tail is dropped), so every rank has the
   same number of batches and ranks see disjoint samples. Ranks split *samples*, not shards,
   so any number of shards works for any number of ranks and workers;
3. a rank's run is cut into windows of ``shuffle_window`` samples (whole batches) and each
   window is permuted from ``(seed, epoch, rank, window)``; batch ``b`` is the ``b``-th
   ``batch_size`` slice of the permuted run, and its flips come from ``(seed, epoch, rank, b)``.

So batch ``b`` is a pure function of (seed, epoch, rank, world_size, b), independent of the
number of workers, and ``skip_batches=k`` starts at batch ``k`` without touching earlier ones.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import json
import math
import queue
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lcm.data.masks import LabelMask, read_mask
from lcm.data.shard_format import INFO_FILE, ShardInfo
from lcm.data.transforms import (
    MEAN,
    STD,
    Preset,
    decode_image,
    decode_images,
    eval_transform,
    normalize,
    train_transform,
)
from lcm.errors import ConfigError, DataError
from lcm.io import read_json

ShardSource = str | Path | tuple[Sequence[Path], ShardInfo]

# Distinct first words keep the random streams of the different draws apart.
_ORDER, _WINDOW, _FLIP = 1, 2, 3
_INDEX_CACHE = 8  # shard indexes a worker keeps at least
_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)


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


def load_info(shard_dir: Path) -> ShardInfo:
    path = Path(shard_dir) / INFO_FILE
    doc = read_json(path, "not found; run the shard stage (an interrupted run leaves none)")
    return ShardInfo.from_json(doc, path)


def resolve_shards(spec: str | Path) -> tuple[list[Path], ShardInfo]:
    """Shard files and their info from a shard directory or a glob of tars in one directory.

    For a glob, the returned info's ``shards`` and ``total`` describe the matched subset.
    """
    root = Path(spec)
    if root.is_dir():
        info = load_info(root)
        paths = [root / e.name for e in info.shards]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise DataError(f"{missing[0]}: listed in {root / INFO_FILE} but missing")
        return paths, info
    matches = sorted(
        Path(m) for m in glob.glob(str(spec)) if Path(m).is_file() and Path(m).name != INFO_FILE
    )
    if not matches:
        raise DataError(f"{spec}: no shard file matches this pattern")
    folders = {m.parent.resolve() for m in matches}
    if len(folders) > 1:
        raise DataError(f"{spec}: matches shards in {len(folders)} directories; use one")
    folder = matches[0].parent
    info = load_info(folder)
    listed = {e.name for e in info.shards}
    unlisted = [m for m in matches if m.name not in listed]
    if unlisted:
        raise DataError(
            f"{folder / INFO_FILE}: does not list {unlisted[0].name}, matched by {spec}"
        )
    names = {m.name for m in matches}
    entries = tuple(e for e in info.shards if e.name in names)
    subset = dataclasses.replace(info, shards=entries, total=sum(e.count for e in entries))
    return [folder / e.name for e in entries], subset


@dataclass(frozen=True)
class _Member:
    key: str
    jpg: tuple[int, int]  # (offset, size) of the data in the tar file
    meta: tuple[int, int]


def _index_shard(path: Path, expected: int) -> list[_Member]:
    """Per-sample member offsets, from the tar headers alone (the data is seeked over)."""
    parts: dict[str, dict[str, tuple[int, int]]] = {}
    for name, offset, size in _scan_tar(path):
        key, _, ext = name.partition(".")
        parts.setdefault(key, {})[ext] = (offset, size)
    members = []
    for key, found in parts.items():  # dicts keep insertion order: the file order
        if "jpg" not in found or "json" not in found:
            raise DataError(f"{path}: sample {key!r} lacks its .jpg or .json member")
        members.append(_Member(key, found["jpg"], found["json"]))
    if len(members) != expected:
        raise DataError(
            f"{path}: holds {len(members)} samples but {INFO_FILE} lists {expected}; "
            "rerun the shard stage"
        )
    return members


def _scan_tar(path: Path) -> Iterator[tuple[str, int, int]]:
    """``(name, data offset, size)`` of each regular file in an uncompressed tar.

    Reads only the 512-byte headers, several times faster than ``tarfile``, whose per-member
    overhead would otherwise rival decoding the images. Understands ustar, pax (``path``)
    and GNU long names, which covers tars written by ``tarfile`` and WebDataset.
    """
    try:
        file_size = path.stat().st_size
        f = open(path, "rb")  # noqa: SIM115 (closed below)
    except OSError as e:
        raise DataError(f"{path}: cannot open shard ({e.strerror or e})") from e
    with f:
        try:
            yield from _scan_open_tar(f, file_size, path)
        except (ValueError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: corrupt tar header ({e})") from e


def _scan_open_tar(f: IO[bytes], file_size: int, path: Path) -> Iterator[tuple[str, int, int]]:
    offset, long_name = 0, None
    while True:
        f.seek(offset)
        hdr = f.read(_BLOCK)
        if not hdr or hdr == _ZERO_BLOCK:  # end of archive
            return
        if len(hdr) < _BLOCK or _tar_int(hdr[148:156]) != _tar_checksum(hdr):
            raise DataError(f"{path}: corrupt or truncated tar header at byte {offset}")
        size, kind, data = _tar_int(hdr[124:136]), hdr[156:157], offset + _BLOCK
        if data + size > file_size:
            raise DataError(f"{path}: truncated (member at byte {offset} runs past the end)")
        if kind in (b"x", b"L"):  # pax extended header / GNU long name for the next member
            ext = f.read(size)
            long_name = _pax_path(ext) if kind == b"x" else ext.rstrip(b"\0").decode()
        elif kind in (b"0", b"\0"):
            name = hdr[:100].rstrip(b"\0").decode()
            prefix = hdr[345:500].rstrip(b"\0").decode() if hdr[257:262] == b"ustar" else ""
            yield long_name or (f"{prefix}/{name}" if prefix else name), data, size
            long_name = None
        offset = data + -(-size // _BLOCK) * _BLOCK


def _tar_int(field: bytes) -> int:
    if field[0] & 0x80:  # GNU base-256 for values beyond the octal range
        return int.from_bytes(field[1:], "big")
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def _tar_checksum(hdr: bytes) -> int:
    return sum(hdr[:148]) + 8 * 32 + sum(hdr[156:])  # the checksum field counts as spaces


def _pax_path(records: bytes) -> str | None:
    """The ``path`` value of pax records (``"<len> key=value\\n"`` each), if any."""
    pos, found = 0, None
    while pos < len(records):
        length = int(records[pos : records.index(b" ", pos)])
        key, _, value = records[records.index(b" ", pos) + 1 : pos + length - 1].partition(b"=")
        if key == b"path":
            found = value.decode()
        pos += length
    return found


class _ShardReader:
    """Reads chosen samples of chosen shards, keeping the few most recent shard indexes."""

    def __init__(self, paths: Sequence[Path], counts: Sequence[int], window: int) -> None:
        self.paths, self.counts = paths, counts
        # enough for every shard one shuffle window can touch, so a window never re-indexes
        self.capacity = max(_INDEX_CACHE, math.ceil(window / max(1, min(counts, default=1))) + 2)
        self._index: OrderedDict[int, list[_Member]] = OrderedDict()

    def members(self, shard: int) -> list[_Member]:
        if shard in self._index:
            self._index.move_to_end(shard)
        else:
            self._index[shard] = _index_shard(self.paths[shard], self.counts[shard])
            if len(self._index) > self.capacity:
                self._index.popitem(last=False)
        return self._index[shard]

    def read(self, shards: np.ndarray, ordinals: np.ndarray) -> list[tuple[str, bytes, dict]]:
        """``(key, jpg bytes, metadata)`` for each (shard, ordinal) pair, in the given order."""
        got: dict[tuple[int, int], tuple[str, bytes, dict]] = {}
        for shard in np.unique(shards).tolist():
            path, members = self.paths[shard], self.members(shard)
            with open(path, "rb") as f:
                for o in sorted(set(ordinals[shards == shard].tolist())):
                    m = members[o]
                    f.seek(m.jpg[0])
                    jpg = f.read(m.jpg[1])
                    f.seek(m.meta[0])
                    try:
                        meta = json.loads(f.read(m.meta[1]))
                    except (json.JSONDecodeError, UnicodeDecodeError) as e:
                        raise DataError(f"{path}: sample {m.key!r} has bad metadata ({e})") from e
                    got[(shard, o)] = (m.key, jpg, meta)
        return [got[(s, o)] for s, o in zip(shards.tolist(), ordinals.tolist(), strict=True)]


def check_mask_matches(mask: Path, shards: Sequence[Path], info: ShardInfo) -> LabelMask:
    """Read ``mask`` and check it covers every key of ``shards`` with the same class count.

    The result is remembered while the files are unchanged, so building a loader every epoch
    reads the mask and the shard headers once.
    """
    stamps = tuple(_stamp(p) for p in (Path(mask), *shards))
    return _checked_mask(Path(mask), tuple(shards), info, stamps)


def _stamp(path: Path) -> tuple[str, int, int]:
    try:
        st = path.stat()
    except OSError:
        return (str(path), -1, -1)  # read_mask / the shard index report the missing file
    return (str(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=2)
def _checked_mask(
    mask: Path, shards: tuple[Path, ...], info: ShardInfo, stamps: tuple[tuple[str, int, int], ...]
) -> LabelMask:
    labels = read_mask(mask)
    if labels.num_classes != info.num_classes:
        raise DataError(
            f"{mask}: has {labels.num_classes} classes but the shards have {info.num_classes}"
        )
    for path, entry in zip(shards, info.shards, strict=True):
        absent = [m.key for m in _index_shard(path, entry.count) if m.key not in labels]
        if absent:
            raise DataError(
                f"{mask}: has no row for {len(absent)} keys of {path} (first {absent[0]!r}); "
                "was it made from the prepared split these shards came from?"
            )
    return labels


class _Plan:
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


class _EvalPlan(_Plan):
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


class _TrainPlan(_Plan):
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


# uint8 (B, 3, S, S), float (B, C), keys, skipped (key, reason), the batch's one shard or -1
_RawBatch = tuple[np.ndarray, np.ndarray, list[str], list[tuple[str, str]], int]


class _Encoded(NamedTuple):
    """A batch whose JPEGs are decoded by the receiving process, on its device."""

    jpegs: list[bytes]
    flips: list[bool]  # drawn in the worker, in the order the CPU path draws them
    targets: np.ndarray  # (B, C)
    keys: list[str]
    wheres: list[str]  # "shard: sample 'key'", for error messages
    shard: int


class _BatchStream(IterableDataset):
    """Yields batches ``first + w, first + w + W, ...`` in worker ``w`` of ``W``.

    Images leave the workers as uint8 numpy arrays and are normalised by the receiving
    process: a quarter of the bytes of float32, and numpy arrays are pickled through the
    worker's pipe, which measured cheaper than a new shared-memory segment per batch (what
    torch tensors get).
    """

    def __init__(
        self,
        paths: Sequence[Path],
        info: ShardInfo,
        plan: _Plan,
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

    def __iter__(self) -> Iterator[_RawBatch]:
        worker = get_worker_info()
        wid, nw = (0, 1) if worker is None else (worker.id, worker.num_workers)
        if worker is not None:
            torch.set_num_threads(1)  # the workers already fill the cores
        reader = _ShardReader(self.paths, self.counts, self.plan.window)
        size = self.image_size
        preset = train_transform(size) if self.augment else eval_transform(size)
        for b in range(self.first + wid, self.plan.num_batches, nw):
            yield self._batch(b, reader, preset)

    def _batch(self, b: int, reader: _ShardReader, preset: Preset) -> _RawBatch | _Encoded:
        shards, ordinals = self.plan.locate(self.plan.positions(b))
        samples = reader.read(shards, ordinals)
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
        samples: list[tuple[str, bytes, dict]],
        shards: np.ndarray,
        preset: Preset,
        gen: torch.Generator | None,
        one_shard: int,
    ) -> _Encoded:
        targets = np.zeros((len(samples), self.num_classes), np.float32)  # (B, C)
        wheres = [
            f"{self.paths[s]}: sample {key!r}"
            for (key, _, _), s in zip(samples, shards.tolist(), strict=True)
        ]
        for i, ((key, _, meta), where) in enumerate(zip(samples, wheres, strict=True)):
            self._fill_targets(targets[i], key, meta, where)
        flips = [preset.draw_flip(gen) for _ in samples]
        jpegs = [jpg for _, jpg, _ in samples]
        return _Encoded(jpegs, flips, targets, [k for k, _, _ in samples], wheres, one_shard)

    def _fill_targets(self, row: np.ndarray, key: str, meta: dict, where: str) -> None:
        try:
            row[meta["ignore"]] = -1.0
            row[meta["labels"]] = 1.0
        except (KeyError, IndexError, TypeError) as e:
            raise DataError(f"{where}: bad labels in its metadata ({e!r})") from e
        if self.mask is not None:
            if key not in self.mask:
                raise DataError(f"{self.mask.path}: has no row for {where}")
            row[~self.mask[key]] = -1.0


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
        stream: _BatchStream,
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

    def _finish(self, raw: _RawBatch | _Encoded) -> Batch:
        return self._encoded(raw) if isinstance(raw, _Encoded) else self._decoded(raw)

    def _decoded(self, raw: _RawBatch) -> Batch:
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

    def _encoded(self, raw: _Encoded) -> Batch:
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
        self, raw: _Encoded, device: torch.device
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


def _as_is(batch: _RawBatch | _Encoded) -> _RawBatch | _Encoded:
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


def train_loader(
    shards: ShardSource,
    *,
    batch_size: int,
    image_size: int,
    seed: int,
    epoch: int,
    num_workers: int,
    rank: int = 0,
    world_size: int = 1,
    mask: Path | None = None,
    augment: bool = True,
    resample: bool = False,
    skip_batches: int = 0,
    shuffle_window: int = 2048,
    pin_memory: bool = False,
    device: torch.device | None = None,
    decode_on_device: bool = False,
) -> TrainLoader:
    """The training batches of ``rank`` for ``epoch`` (see the module docstring).

    ``mask``: a partial-label mask file; its unknown targets become -1. It is checked against
    the shards' keys and class count here, before any training starts.
    ``device``: where the images are delivered; ``decode_on_device``: decode the JPEGs there
    instead of in the workers (same batches; see :class:`BatchLoader`).
    """
    paths, info = _resolve(shards)
    _check_positive(
        batch_size=batch_size,
        image_size=image_size,
        world_size=world_size,
        shuffle_window=shuffle_window,
    )
    _check_non_negative(seed=seed, epoch=epoch, num_workers=num_workers)
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is outside 0..{world_size - 1}")
    counts = [e.count for e in info.shards]
    plan = _TrainPlan(counts, batch_size, seed, epoch, rank, world_size, resample, shuffle_window)
    if plan.num_batches == 0:
        where = paths[0].parent if paths else shards
        raise ConfigError(
            f"{where}: {info.total} samples cannot fill one batch of {batch_size} "
            f"on each of {world_size} ranks"
        )
    if not 0 <= skip_batches <= plan.num_batches:
        raise ConfigError(f"skip_batches {skip_batches} is outside 0..{plan.num_batches}")
    labels = check_mask_matches(mask, paths, info) if mask is not None else None
    stream = _BatchStream(
        paths, info, plan, image_size, augment, labels, skip_batches, decode=not decode_on_device
    )
    return TrainLoader(stream, num_workers, pin_memory, device=device)


def eval_loader(
    shards: ShardSource,
    *,
    batch_size: int,
    image_size: int,
    num_workers: int,
    pin_memory: bool = False,
    align_shards: bool = False,
    skip_bad: bool = False,
    mean: Sequence[float] = MEAN,
    std: Sequence[float] = STD,
    device: torch.device | None = None,
    decode_on_device: bool = False,
) -> EvalLoader:
    """Every sample exactly once, in shard order, in batches of ``batch_size``.

    ``align_shards``: no batch spans two shards, and each batch says which shard it is from.
    ``skip_bad``: an undecodable image is left out of its batch and reported in
    ``Batch.skipped`` instead of failing the stream. Evaluation and training never skip: a
    broken evaluation set must not be scored silently on fewer images.
    ``mean`` / ``std``: the normalisation the model was trained with (its model.json).
    ``device`` / ``decode_on_device``: as for :func:`train_loader`.
    """
    paths, info = _resolve(shards)
    _check_positive(batch_size=batch_size, image_size=image_size)
    _check_non_negative(num_workers=num_workers)
    plan = _EvalPlan([e.count for e in info.shards], batch_size, align=align_shards)
    stream = _BatchStream(
        paths, info, plan, image_size, False, None, 0, skip_bad, decode=not decode_on_device
    )
    return EvalLoader(stream, num_workers, pin_memory, mean, std, device=device)


def _resolve(shards: ShardSource) -> tuple[list[Path], ShardInfo]:
    if isinstance(shards, tuple):
        paths, info = shards
        return list(paths), info
    return resolve_shards(shards)


def _check_positive(**values: int) -> None:
    for name, v in values.items():
        if v < 1:
            raise ConfigError(f"{name} must be positive, got {v}")


def _check_non_negative(**values: int) -> None:
    for name, v in values.items():
        if v < 0:
            raise ConfigError(f"{name} must be >= 0, got {v}")
