"""Plain image files as a prediction source: listing a folder safely, and a batch loader.

``list_images`` walks a directory (or matches a glob) for JPEG and PNG files, sorted by their
path relative to the root, which is also their key. Nothing outside the root is ever read: a
symlink whose target leaves the root is skipped with a reason, and so is a symlinked
directory (never followed). The files are then cut into groups of ``GROUP_SIZE`` that act as
shards: each is scored, written and committed as a unit.
"""

from __future__ import annotations

import glob
import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from lcm.data.delivery import BatchLoader
from lcm.data.transforms import MEAN, STD, decode_image_file, eval_transform
from lcm.errors import DataError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})
GROUP_SIZE = 1000
_GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True)
class ImageGroup:
    name: str  # images-000000, ...
    files: tuple[str, ...]  # paths relative to the root, POSIX separators
    digest: str  # sha256 over (path, size, mtime) of each file


@dataclass(frozen=True)
class ImageListing:
    root: Path
    groups: tuple[ImageGroup, ...]
    skipped: tuple[tuple[str, str], ...]  # (path relative to the root, reason)

    @property
    def total(self) -> int:
        return sum(len(g.files) for g in self.groups)


def list_images(spec: str | Path, group_size: int = GROUP_SIZE) -> ImageListing:
    """Image files under a directory, or matching a glob (its root: the part before the
    first wildcard). Raises DataError when nothing is found."""
    spec = str(spec)
    if Path(spec).is_dir():
        root = Path(spec)
        candidates = _walk(root)
    else:
        parts = Path(spec).parts
        fixed = next((i for i, p in enumerate(parts) if _GLOB_CHARS & set(p)), len(parts))
        root = Path(*parts[:fixed]) if fixed else Path(".")
        if fixed == len(parts) or not root.is_dir():
            raise DataError(f"{spec}: neither an image directory nor a glob under one")
        candidates = (Path(m) for m in glob.iglob(spec, recursive=True))
    real_root = root.resolve()
    files: list[str] = []
    skipped: list[tuple[str, str]] = []
    for path in candidates:
        rel = path.relative_to(root).as_posix()
        if path.is_symlink() and path.is_dir():
            skipped.append((rel, "symlinked directory, not followed"))
            continue
        if path.suffix.lower() not in IMAGE_SUFFIXES or path.is_dir():
            continue
        folders = [root / d for d in path.relative_to(root).parents if d != Path(".")]
        if any(d.is_symlink() for d in folders):  # a glob's ** walks into symlinked folders
            skipped.append((rel, "inside a symlinked directory, not followed"))
            continue
        if not path.resolve().is_relative_to(real_root):
            skipped.append((rel, "leaves the image root (symlink or ..), not followed"))
            continue
        if not path.is_file():
            skipped.append((rel, "not a regular file"))
            continue
        files.append(rel)
    if not files:
        raise DataError(f"{spec}: no JPEG or PNG files found")
    files.sort()
    groups = tuple(
        _group(root, i // group_size, files[i : i + group_size])
        for i in range(0, len(files), group_size)
    )
    return ImageListing(root, groups, tuple(sorted(skipped)))


def _walk(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        base = Path(dirpath)
        dirnames.sort()
        for name in dirnames:
            if (base / name).is_symlink():
                yield base / name  # reported as skipped by the caller
        for name in filenames:
            yield base / name


def _group(root: Path, index: int, files: Sequence[str]) -> ImageGroup:
    h = hashlib.sha256()
    for rel in files:
        st = (root / rel).stat()
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return ImageGroup(f"images-{index:06d}", tuple(files), "sha256:" + h.hexdigest())


class _FileStream(IterableDataset):
    """Batches ``w, w + W, ...`` of a file list in worker ``w`` of ``W`` (the DataLoader
    collects them round-robin, so they arrive in file order)."""

    def __init__(
        self, root: Path, files: Sequence[str], batch_size: int, size: int, confine: bool
    ) -> None:
        self.root, self.files, self.batch_size, self.size = root, list(files), batch_size, size
        self.real_root = root.resolve() if confine else None
        self.num_batches = -(-len(self.files) // batch_size)

    def __iter__(self) -> Iterator[tuple]:
        worker = get_worker_info()
        wid, nw = (0, 1) if worker is None else (worker.id, worker.num_workers)
        if worker is not None:
            torch.set_num_threads(1)
        preset = eval_transform(self.size)
        for b in range(wid, self.num_batches, nw):
            chunk = self.files[b * self.batch_size : (b + 1) * self.batch_size]
            pixels = torch.empty((len(chunk), 3, self.size, self.size), dtype=torch.uint8)
            keys: list[str] = []
            skipped: list[tuple[str, str]] = []
            for rel in chunk:
                path = self.root / rel
                if self.real_root and not path.resolve().is_relative_to(self.real_root):
                    skipped.append((rel, "leaves the image root (symlink or ..), not followed"))
                    continue
                try:
                    img = decode_image_file(path.read_bytes())  # (3, H, W)
                except (OSError, RuntimeError) as e:
                    skipped.append((rel, f"cannot read or decode ({str(e).splitlines()[0]})"))
                    continue
                pixels[len(keys)] = preset.pixels(img)
                keys.append(rel)
            n = len(keys)
            yield pixels[:n].numpy(), np.zeros((n, 0), np.float32), keys, skipped, 0


class ImageLoader(BatchLoader):
    """The files of one group in batches; undecodable files are skipped and reported."""

    def __len__(self) -> int:
        return self.stream.num_batches


def image_loader(
    root: Path,
    files: Sequence[str],
    *,
    batch_size: int,
    image_size: int,
    num_workers: int,
    mean: Sequence[float] = MEAN,
    std: Sequence[float] = STD,
    confine: bool = True,
) -> ImageLoader:
    """``confine``: skip a file whose real path has left ``root`` since it was listed (a file
    swapped for a symlink); off for files a user names one by one (`lcm predict`)."""
    stream = _FileStream(root, files, batch_size, image_size, confine)
    return ImageLoader(stream, num_workers, False, mean, std)
