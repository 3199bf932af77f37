"""The shard stage: a prepared split -> WebDataset tars plus ``_info.json``.

Layout of ``out``::

    shard-000000.tar, shard-000001.tar, ...   per sample <key>.jpg and <key>.json
    _info.json                                 ShardInfo: classes, per-shard counts, skips, checksum

Bytes are a pure function of the manifest, the images, ``max_side`` and ``shard_size`` (for a
given Pillow/libjpeg): samples follow manifest order, tar headers carry fixed metadata (mtime 0,
uid/gid 0, no user names, mode 0644) and JPEG encoding uses a fixed quality, so a rerun gives
byte-identical shards and checksum.

Crash safety: the old ``_info.json`` is removed before anything else is touched, each shard is
written under a hidden temporary name and renamed when complete, and the new ``_info.json`` is
written last. An interrupted run therefore leaves only complete shards and no ``_info.json``,
which every reader refuses.

Determinism and crash safety span the encoding, the tar writing and the parallel workers, so
the whole writer stays in this one module (longer than most).
"""

from __future__ import annotations

import functools
import gc
import hashlib
import io
import json
import logging
import multiprocessing
import os
import tarfile
import threading
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from PIL import Image, UnidentifiedImageError

from lcm.data.manifest import MANIFEST_FILE, read_manifest, resolve_image
from lcm.data.shard_format import (
    INFO_FILE,
    ShardEntry,
    ShardInfo,
    SkippedInput,
    shard_name,
)
from lcm.errors import ConfigError, DataError
from lcm.io import atomic_write_bytes
from lcm.progress import ProgressCallback

log = logging.getLogger(__name__)

JPEG_QUALITY = 90
_CHUNKSIZE = 16  # records per Pool task: amortises IPC without holding many images
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


@dataclass(frozen=True)
class _Encoded:
    key: str
    path: str
    jpg: bytes | None
    meta: bytes | None
    reason: str | None  # why the input was skipped; None when encoded


def write_shards(
    prepared: Path,
    images: Path,
    out: Path,
    *,
    max_side: int | None = 128,
    shard_size: int = 1000,
    workers: int | None = None,
    progress: ProgressCallback | None = None,
) -> ShardInfo:
    """Write the shards of ``prepared`` (images under ``images``) into ``out``.

    ``max_side``: images with a longer side are shrunk to it and re-encoded (``None`` keeps
    sizes). ``workers``: decode/encode processes (default: the usable CPUs; 0 or 1 runs
    in-process). ``progress(done, total)`` is called after every input.
    """
    if max_side is not None and max_side < 1:
        raise ConfigError(f"shard max_side must be positive or null, got {max_side}")
    if shard_size < 1:
        raise ConfigError(f"shard_size must be positive, got {shard_size}")
    if workers is not None and workers < 0:
        raise ConfigError(f"shard workers must be >= 0, got {workers}")
    prepared, images, out = Path(prepared), Path(images), Path(out)
    manifest = read_manifest(prepared)
    if not images.is_dir():
        raise DataError(f"{images}: image directory not found")
    total_in = len(manifest)
    out.mkdir(parents=True, exist_ok=True)
    _clear_previous(out)

    jobs = _jobs(manifest.table.to_batches(max_chunksize=1024), manifest.num_classes, prepared)
    encode = functools.partial(_encode_sample, root=images.resolve(), max_side=max_side)
    sink = _ShardSink(out, shard_size)
    skipped: list[SkippedInput] = []
    results = _run(encode, jobs, workers)
    try:
        for done, res in enumerate(results, start=1):
            if res.reason is not None:
                log.warning("skipping %s (%s): %s", res.key, res.path, res.reason)
                skipped.append(SkippedInput(res.key, res.path, res.reason))
            else:
                assert res.jpg is not None and res.meta is not None
                sink.add(res.key, res.jpg, res.meta)
            if progress is not None:
                progress(done, total_in)
        entries, checksum = sink.finish()
    finally:
        results.close()  # stops the Pool now, also when a write failed
        sink.abort()
    info = ShardInfo(
        classes=manifest.classes,
        shards=tuple(entries),
        total=sum(e.count for e in entries),
        skipped=tuple(skipped),
        checksum=checksum,
        max_side=max_side,
        shard_size=shard_size,
    )
    if info.total == 0:
        raise DataError(f"{prepared / MANIFEST_FILE}: no readable image; {info.summary()}")
    atomic_write_bytes(out / INFO_FILE, (json.dumps(info.to_json(), indent=1) + "\n").encode())
    log.info("%s: %s", out, info.summary())
    return info


def _clear_previous(out: Path) -> None:
    # _info.json goes first: from here until the new one is written the directory is unusable.
    (out / INFO_FILE).unlink(missing_ok=True)
    for stale in [*out.glob("shard-*.tar"), *out.glob(".shard-*.tar.tmp-*")]:
        stale.unlink()


def _jobs(
    batches: Iterable[Any], num_classes: int, prepared: Path
) -> Iterator[tuple[str, str, list[int], list[int]]]:
    """Manifest rows as small picklable tuples, streamed; class indices checked on the way."""
    for batch in batches:
        rows = batch.to_pydict()
        for key, path, labels, ignore in zip(
            rows["key"], rows["path"], rows["labels"], rows["ignore"], strict=True
        ):
            bad = [c for c in (*labels, *ignore) if not 0 <= c < num_classes]
            if bad:
                raise DataError(
                    f"{prepared / MANIFEST_FILE}: image {key!r} has class index {bad[0]} "
                    f"outside 0..{num_classes - 1}"
                )
            yield key, path, labels, ignore


def _run(
    encode: Callable[[Any], _Encoded], jobs: Iterator[Any], workers: int | None
) -> Generator[_Encoded, None, None]:
    """Encode in manifest order: in-process, or on a Pool with a bounded number in flight."""
    n = len(os.sched_getaffinity(0)) if workers is None else workers
    if n <= 1:
        yield from map(encode, jobs)
        return
    # Pool.imap pulls inputs as fast as it can and buffers results the parent has not taken
    # yet; the throttle caps inputs in flight so memory stays flat whatever the dataset size.
    throttle = _Throttle(jobs, limit=4 * n * _CHUNKSIZE)
    # fork, whatever the platform default: forkserver and spawn re-import the caller's main
    # module, which breaks scripts without a main guard. gc.freeze() keeps the children's and
    # the parent's collectors off the objects they share, so those pages stay shared instead of
    # being copied one by one as the run goes on.
    gc.freeze()
    try:
        with multiprocessing.get_context("fork").Pool(n) as pool:
            try:
                for res in pool.imap(encode, throttle, chunksize=_CHUNKSIZE):
                    throttle.release()
                    yield res
            finally:
                throttle.stop()  # unblock the Pool's feeder thread so terminate() can join it
    finally:
        gc.unfreeze()


class _Throttle:
    """An iterator that waits while ``limit`` items are handed out and not yet released."""

    def __init__(self, items: Iterator[Any], limit: int) -> None:
        self._items = items
        self._free = threading.Semaphore(limit)
        self._stopped = False

    def __iter__(self) -> Iterator[Any]:
        for item in self._items:
            self._free.acquire()
            if self._stopped:
                return
            yield item

    def release(self) -> None:
        self._free.release()

    def stop(self) -> None:
        self._stopped = True
        self._free.release()


def _encode_sample(
    job: tuple[str, str, list[int], list[int]], root: Path, max_side: int | None
) -> _Encoded:
    """One manifest row -> JPEG bytes + JSON metadata, or the reason it cannot be used."""
    key, rel, labels, ignore = job
    try:
        path = resolve_image(root, rel)
    except DataError:
        return _Encoded(key, rel, None, None, "resolves outside the image root")
    if not path.is_file():
        return _Encoded(key, rel, None, None, "missing file")
    try:
        data = path.read_bytes()
    except OSError as e:
        return _Encoded(key, rel, None, None, f"unreadable: {e.strerror or e}")
    try:
        jpg, (width, height) = _to_jpeg(data, max_side)
    except UnidentifiedImageError:
        # PIL's message names an in-memory object by address: not reproducible in _info.json
        return _Encoded(key, rel, None, None, "undecodable: not an image format PIL can read")
    except _DECODE_ERRORS as e:
        return _Encoded(key, rel, None, None, f"undecodable: {e}")
    meta = {"labels": labels, "ignore": ignore, "width": width, "height": height}
    return _Encoded(key, rel, jpg, json.dumps(meta, sort_keys=True).encode(), None)


def _to_jpeg(data: bytes, max_side: int | None) -> tuple[bytes, tuple[int, int]]:
    """JPEG bytes no larger than ``max_side`` and the original (width, height).

    A JPEG that already fits is fully decoded (to prove it is complete) and kept as is;
    anything else is re-encoded with a fixed quality.
    """
    with Image.open(io.BytesIO(data)) as img:
        size = img.size
        fits = max_side is None or max(size) <= max_side
        if fits and img.format == "JPEG" and img.mode in ("RGB", "L"):
            img.load()
            return data, size
        target = size if fits else _fit(size, max_side)  # type: ignore[arg-type]
        img.draft(None, target)  # JPEG: decode at a reduced DCT scale, still >= target
        img.load()
        rgb = img if img.mode in ("RGB", "L") else img.convert("RGB")
        if rgb.size != target:
            rgb = rgb.resize(target, Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        rgb.save(buf, format="JPEG", quality=JPEG_QUALITY)
        return buf.getvalue(), size


def _fit(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    w, h = size
    scale = max_side / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


class _ShardSink:
    """Writes samples into numbered shards; a shard gets its final name only when complete."""

    def __init__(self, out: Path, shard_size: int) -> None:
        self.out = out
        self.shard_size = shard_size
        self.entries: list[ShardEntry] = []
        self._digest = hashlib.sha256()
        self._file: IO[bytes] | None = None
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._count = 0

    def add(self, key: str, jpg: bytes, meta: bytes) -> None:
        if self._tar is None:
            self._tmp = self.out / f".{shard_name(len(self.entries))}.tmp-{os.getpid()}"
            self._file = open(self._tmp, "wb")  # noqa: SIM115 (closed in _close or abort)
            self._tar = tarfile.TarFile(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)
        _add_member(self._tar, f"{key}.jpg", jpg)
        _add_member(self._tar, f"{key}.json", meta)
        self._count += 1
        if self._count == self.shard_size:
            self._close()

    def finish(self) -> tuple[list[ShardEntry], str]:
        if self._tar is not None:
            self._close()
        return self.entries, f"sha256:{self._digest.hexdigest()}"

    def abort(self) -> None:
        """Drop an unfinished shard (no-op after ``finish``)."""
        if self._file is not None:
            self._file.close()
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
        self._file = self._tar = self._tmp = None

    def _close(self) -> None:
        assert self._tar is not None and self._file is not None and self._tmp is not None
        self._tar.close()  # writes the end-of-archive blocks
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        name = shard_name(len(self.entries))
        os.replace(self._tmp, self.out / name)
        with open(self.out / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                self._digest.update(block)
        self.entries.append(ShardEntry(name, self._count))
        self._file = self._tar = self._tmp = None
        self._count = 0


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))
