"""Reading shards: locating them, and the train / eval loaders.

Local shards (a directory, a glob, a brace list of files) are read as below: exact, by
seeking. Shards at URLs are streamed (:mod:`lcm.data.streaming` says what holds there);
both modes share the decoding, transforms and labels (:class:`BatchStream`).

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

import dataclasses
import functools
import glob
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lcm.data.delivery import Batch, BatchLoader, EvalLoader, TrainLoader
from lcm.data.locations import (
    expand,
    has_braces,
    is_url,
    iter_samples,
    read_url,
    shard_file_name,
    sibling,
)
from lcm.data.masks import LabelMask, read_mask
from lcm.data.plans import EvalPlan, TrainPlan
from lcm.data.shard_format import INFO_FILE, ShardInfo
from lcm.data.stream import BatchStream
from lcm.data.streaming import StreamingEvalStream, StreamingTrainStream, parse_sample
from lcm.data.tar_index import index_shard
from lcm.data.transforms import MEAN, STD
from lcm.errors import ConfigError, DataError
from lcm.io import read_json

# a specification, or what resolve_shards made of one (Paths: local; str URLs: remote)
ShardSource = str | Path | tuple[Sequence[Any], ShardInfo]

__all__ = [  # the readers' public face; the pieces live in the modules imported above
    "Batch",
    "BatchLoader",
    "EvalLoader",
    "ShardSource",
    "TrainLoader",
    "check_mask_matches",
    "eval_loader",
    "is_remote",
    "label_priors",
    "load_info",
    "resolve_shards",
    "train_loader",
]


def load_info(shard_dir: Path) -> ShardInfo:
    path = Path(shard_dir) / INFO_FILE
    doc = read_json(path, "not found; run the shard stage (an interrupted run leaves none)")
    return ShardInfo.from_json(doc, path)


def resolve_shards(spec: str | Path) -> tuple[list[Any], ShardInfo]:
    """Shard locations and their info from a shard specification (:mod:`lcm.data.locations`):
    a directory, a glob or brace list of tars in one directory (local: ``Path`` each), or
    URLs (remote: ``str`` each, with the ``_info.json`` fetched from beside them).

    For a subset of a directory's shards, the returned info's ``shards`` and ``total``
    describe that subset, in the directory's order.
    """
    text = str(spec)
    if text.startswith("file://"):  # a local path in URL form
        text = text.removeprefix("file://")
        spec = text
    if is_url(text) or has_braces(text):
        members = expand(text) if has_braces(text) else [text]
        remote = [is_url(m) for m in members]
        if all(remote):
            return _remote(members, text)
        if any(remote):
            raise DataError(f"{spec}: mixes URLs and local paths; use one kind")
        missing = [m for m in members if not Path(m).is_file()]
        if missing:
            raise DataError(f"{missing[0]}: shard file not found (from {spec})")
        return _listed([Path(m) for m in members], text)
    root = Path(spec)
    if root.is_dir():
        info = load_info(root)
        paths = [root / e.name for e in info.shards]
        missing_paths = [p for p in paths if not p.is_file()]
        if missing_paths:
            raise DataError(f"{missing_paths[0]}: listed in {root / INFO_FILE} but missing")
        return paths, info
    matches = [
        Path(m) for m in glob.glob(str(spec)) if Path(m).is_file() and Path(m).name != INFO_FILE
    ]
    if not matches:
        raise DataError(f"{spec}: no shard file matches this pattern")
    return _listed(matches, text)


def _listed(files: list[Path], spec: str) -> tuple[list[Any], ShardInfo]:
    """Chosen tars of one shard directory, in the order its info file lists them."""
    folders = {m.parent.resolve() for m in files}
    if len(folders) > 1:
        raise DataError(f"{spec}: names shards in {len(folders)} directories; use one")
    folder = files[0].parent
    subset = _subset(load_info(folder), files, folder / INFO_FILE, spec)
    return [folder / e.name for e in subset.shards], subset


def _subset(info: ShardInfo, files: Sequence[Any], where: Any, spec: str) -> ShardInfo:
    names = [Path(str(f)).name if not is_url(str(f)) else shard_file_name(str(f)) for f in files]
    listed = {e.name for e in info.shards}
    unlisted = [n for n in names if n not in listed]
    if unlisted:
        raise DataError(f"{where}: does not list {unlisted[0]}, named by {spec}")
    wanted = set(names)
    entries = tuple(e for e in info.shards if e.name in wanted)
    return dataclasses.replace(info, shards=entries, total=sum(e.count for e in entries))


def _remote(urls: list[str], spec: str) -> tuple[list[Any], ShardInfo]:
    """URLs of shards in one remote directory and their info, fetched from beside them."""
    info_url = sibling(urls[0], INFO_FILE)
    others = {sibling(u, INFO_FILE) for u in urls[1:]} - {info_url}
    if others:
        raise DataError(f"{spec}: names shards beside {len(others) + 1} info files; use one")
    try:
        raw = read_url(info_url)
    except DataError as e:
        raise DataError(
            f"{e}; remote shards need their {INFO_FILE} beside them (for shards made "
            f"elsewhere: lcm data index SHARDS --classes classes.json --out {INFO_FILE})"
        ) from e
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{info_url}: not valid JSON ({e})") from e
    info = ShardInfo.from_json(doc, info_url)
    if len(urls) == 1 and urls[0].endswith("/") and not urls[0].startswith("pipe:"):
        bad = [e.name for e in info.shards if "/" in e.name or e.name.startswith(".")]
        if bad:
            raise DataError(f"{info_url}: shard name {bad[0]!r} is not a plain file name")
        return [urls[0] + e.name for e in info.shards], info
    by_name = {shard_file_name(u): u for u in urls}
    if len(by_name) != len(urls):
        raise DataError(f"{spec}: names a shard twice")
    subset = _subset(info, urls, info_url, spec)
    return [by_name[e.name] for e in subset.shards], subset


def is_remote(locations: Sequence[Any]) -> bool:
    """Whether resolved shard locations are URLs (streamed) rather than local files."""
    return bool(locations) and isinstance(locations[0], str)


def label_priors(shards: ShardSource, mask: Path | None = None) -> np.ndarray:
    """(C,) each class's share of positives among the targets training may see: the
    samples' labels (local shards: the .json members only; URLs: streamed), with what the
    manifest or the partial-label ``mask`` hides counted as unknown."""
    paths, info = _resolve(shards)
    labels = check_mask_matches(mask, paths, info) if mask is not None else None
    pos = np.zeros(info.num_classes)
    known = np.zeros(info.num_classes)
    for path, entry in zip(paths, info.shards, strict=True):
        for key, meta in _metadata(path, entry.count):
            row = np.zeros(info.num_classes)
            seen = np.ones(info.num_classes, dtype=bool)
            try:
                row[meta["labels"]] = 1.0
                seen[meta.get("ignore", [])] = False
            except (KeyError, IndexError, TypeError) as e:
                raise DataError(f"{path}: sample {key!r} has bad labels ({e!r})") from e
            if labels is not None:
                if key not in labels:
                    raise DataError(f"{labels.path}: has no row for {path}: sample {key!r}")
                seen &= labels[key]
            pos += row * seen
            known += seen
    return pos / np.maximum(known, 1)


def _metadata(path: Any, count: int) -> Iterator[tuple[str, dict]]:
    if isinstance(path, str):  # a URL: read through
        for key, parts in iter_samples(path):
            yield parse_sample(path, key, parts)[0::2]
        return
    with open(path, "rb") as f:
        for m in index_shard(path, count):
            f.seek(m.meta[0])
            try:
                yield m.key, json.loads(f.read(m.meta[1]))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DataError(f"{path}: sample {m.key!r} has bad metadata ({e})") from e


def check_mask_matches(mask: Path, shards: Sequence[Path], info: ShardInfo) -> LabelMask:
    """Read ``mask`` and check it covers every key of ``shards`` with the same class count.

    The result is remembered while the files are unchanged, so building a loader every epoch
    reads the mask and the shard headers once.
    """
    if is_remote(shards):  # no index without reading every shard: keys are checked as read
        labels = read_mask(Path(mask))
        _check_mask_classes(Path(mask), labels, info)
        return labels
    stamps = tuple(_stamp(p) for p in (Path(mask), *shards))
    return _checked_mask(Path(mask), tuple(shards), info, stamps)


def _check_mask_classes(mask: Path, labels: LabelMask, info: ShardInfo) -> None:
    if labels.num_classes != info.num_classes:
        raise DataError(
            f"{mask}: has {labels.num_classes} classes but the shards have {info.num_classes}"
        )


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
    _check_mask_classes(mask, labels, info)
    for path, entry in zip(shards, info.shards, strict=True):
        absent = [m.key for m in index_shard(path, entry.count) if m.key not in labels]
        if absent:
            raise DataError(
                f"{mask}: has no row for {len(absent)} keys of {path} (first {absent[0]!r}); "
                "was it made from the prepared split these shards came from?"
            )
    return labels


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
    plan = TrainPlan(counts, batch_size, seed, epoch, rank, world_size, resample, shuffle_window)
    if plan.num_batches == 0:
        where = shards if isinstance(shards, str | Path) else Path(str(paths[0])).parent
        raise ConfigError(
            f"{where}: {info.total} samples cannot fill one batch of {batch_size} "
            f"on each of {world_size} ranks"
        )
    if not 0 <= skip_batches <= plan.num_batches:
        raise ConfigError(f"skip_batches {skip_batches} is outside 0..{plan.num_batches}")
    labels = check_mask_matches(mask, paths, info) if mask is not None else None
    stream: BatchStream
    if is_remote(paths):
        if not augment or resample:
            raise ConfigError("streamed shards: training always augments and never resamples")
        stream = StreamingTrainStream(
            paths, info, plan, world_size, shuffle_window, image_size, labels, skip_batches,
            decode=not decode_on_device,
        )  # fmt: skip
    else:
        stream = BatchStream(
            paths, info, plan, image_size, augment, labels, skip_batches,
            decode=not decode_on_device,
        )  # fmt: skip
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
    plan = EvalPlan([e.count for e in info.shards], batch_size, align=align_shards)
    kind = StreamingEvalStream if is_remote(paths) else BatchStream
    stream = kind(
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
