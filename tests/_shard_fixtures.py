"""Tiny prepared splits with real JPEGs on disk, for the shard and mask tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from lcm.data.manifest import ImageRecord, make_key, write_manifest

CLASSES = ("cat", "dog", "car", "tree", "boat")


@dataclass(frozen=True)
class TinySplit:
    prepared: Path
    images: Path
    records: list[ImageRecord]  # every manifest row, in manifest order
    good_keys: list[str]  # the rows whose image is a readable JPEG, in manifest order


def save_jpeg(path: Path, size: tuple[int, int], seed: int) -> None:
    """A smooth random RGB image (noise compresses badly and would make files big)."""
    rng = np.random.default_rng(seed)
    w, h = size
    coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((w, h), Image.Resampling.BILINEAR)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="JPEG", quality=85)


def tiny_split(root: Path, n: int = 20, bad: bool = False, seed: int = 0) -> TinySplit:
    """``n`` JPEGs of 32-48 px with random labels; ``bad`` adds a truncated JPEG, a text file
    named ``.jpg`` and a missing file, interleaved with the good ones."""
    rng = np.random.default_rng(seed)
    images, prepared = root / "images", root / "prepared"
    records: list[ImageRecord] = []
    good: list[str] = []
    for i in range(n):
        rel = f"sub{i % 2}/img{i:03d}.jpg"
        w, h = (int(v) for v in rng.integers(32, 49, size=2))
        save_jpeg(images / rel, (w, h), seed=seed * 1000 + i)
        labels = tuple(int(c) for c in np.flatnonzero(rng.random(len(CLASSES)) < 0.4))
        ignore = (int(rng.integers(len(CLASSES))),) if i % 5 == 0 else ()
        records.append(ImageRecord(make_key(rel), rel, labels, ignore, w, h))
        good.append(records[-1].key)
        if bad and i == 3:
            full = (images / rel).read_bytes()
            (images / "truncated.jpg").write_bytes(full[: len(full) // 2])
            records.append(ImageRecord("truncated", "truncated.jpg", (0,), (), w, h))
        if bad and i == 7:
            (images / "notes.jpg").write_text("this is not an image\n")
            records.append(ImageRecord("notes", "notes.jpg", (1,), (), 0, 0))
        if bad and i == 11:
            records.append(ImageRecord("gone", "gone.jpg", (2,), (), 0, 0))
    write_manifest(prepared, CLASSES, records)
    return TinySplit(prepared, images, records, good)
