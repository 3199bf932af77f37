"""The prepared-dataset format shared by every data source.

A prepared split is a directory with ``manifest.parquet`` (one row per image) and
``classes.json`` (ordered class names). Columns:

- ``key``: stable, unique, safe as a tar member stem (letters, digits, ``_`` and ``-``; no dots,
  because WebDataset splits sample keys at the first dot);
- ``path``: image path relative to the image root, never escaping it;
- ``labels``: positive class indices; ``ignore``: class indices whose target is unknown;
- ``width``, ``height``: original image size in pixels (0 when not known).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lcm.errors import DataError
from lcm.io import atomic_path, atomic_write_bytes, read_json, read_parquet

MANIFEST_FILE = "manifest.parquet"
CLASSES_FILE = "classes.json"

MANIFEST_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("path", pa.string()),
        ("labels", pa.list_(pa.int32())),
        ("ignore", pa.list_(pa.int32())),
        ("width", pa.int32()),
        ("height", pa.int32()),
    ]
)

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


@dataclass(frozen=True)
class ImageRecord:
    key: str
    path: str
    labels: tuple[int, ...]
    ignore: tuple[int, ...] = ()
    width: int = 0
    height: int = 0


@dataclass(frozen=True)
class Manifest:
    classes: tuple[str, ...]
    table: pa.Table

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def records(self) -> list[ImageRecord]:
        cols = self.table.to_pydict()
        return [
            ImageRecord(k, p, tuple(lab), tuple(ign), w, h)
            for k, p, lab, ign, w, h in zip(
                cols["key"],
                cols["path"],
                cols["labels"],
                cols["ignore"],
                cols["width"],
                cols["height"],
                strict=True,
            )
        ]

    def targets(self) -> np.ndarray:
        """Dense targets (N, C) in {1, 0, -1}: positive, negative, unknown."""
        return targets_from_lists(
            self.table.column("labels").to_pylist(),
            self.table.column("ignore").to_pylist(),
            self.num_classes,
        )


def targets_from_lists(
    labels: Sequence[Sequence[int]], ignore: Sequence[Sequence[int]], num_classes: int
) -> np.ndarray:
    out = np.zeros((len(labels), num_classes), dtype=np.float32)
    for i, (pos, unk) in enumerate(zip(labels, ignore, strict=True)):
        out[i, list(unk)] = -1.0
        out[i, list(pos)] = 1.0  # a known positive wins over an unknown mention
    return out


def make_key(relpath: str) -> str:
    """Tar-safe sample key from an image path: extension dropped, other characters -> ``_``."""
    stem = str(PurePosixPath(relpath).with_suffix(""))
    return _UNSAFE.sub("_", stem)


def safe_relpath(name: str, source: str | Path) -> str:
    """Normalise an image file name from an annotation file; refuse anything outside the root.

    ``source`` names the annotation file in the error message.
    """
    if not isinstance(name, str) or not name or "\x00" in name:
        raise DataError(f"{source}: invalid image file name {name!r}")
    posix = name.replace("\\", "/")
    p = PurePosixPath(posix)
    if p.is_absolute() or re.match(r"^[A-Za-z]:", posix) or ".." in p.parts:
        raise DataError(
            f"{source}: image file name {name!r} escapes the image root; "
            "only paths relative to the image directory are allowed"
        )
    clean = PurePosixPath(*[part for part in p.parts if part not in ("", ".")])
    if not clean.parts:
        raise DataError(f"{source}: invalid image file name {name!r}")
    return str(clean)


def resolve_image(root: Path, relpath: str) -> Path:
    """Absolute path of an image under ``root``; symlinks may not lead outside the root."""
    root = root.resolve()
    path = (root / relpath).resolve()
    if not path.is_relative_to(root):
        raise DataError(f"{root / relpath}: resolves outside the image root {root}")
    return path


def write_manifest(
    out_dir: Path, classes: Sequence[str], records: Iterable[ImageRecord]
) -> Manifest:
    """Write ``manifest.parquet`` and ``classes.json`` (each atomically); keys must be unique."""
    records = list(records)
    seen: dict[str, str] = {}
    for r in records:
        if r.key in seen:
            raise DataError(
                f"{out_dir}: images {seen[r.key]!r} and {r.path!r} map to the same key {r.key!r}"
            )
        seen[r.key] = r.path
    table = pa.table(
        {
            "key": [r.key for r in records],
            "path": [r.path for r in records],
            "labels": [sorted(set(r.labels)) for r in records],
            "ignore": [sorted(set(r.ignore) - set(r.labels)) for r in records],
            "width": [r.width for r in records],
            "height": [r.height for r in records],
        },
        schema=MANIFEST_SCHEMA,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / MANIFEST_FILE) as tmp:
        pq.write_table(table, tmp)
    atomic_write_bytes(out_dir / CLASSES_FILE, json.dumps(list(classes), indent=1).encode())
    return Manifest(tuple(classes), table)


def read_manifest(prepared_dir: Path) -> Manifest:
    prepared_dir = Path(prepared_dir)
    mpath, cpath = prepared_dir / MANIFEST_FILE, prepared_dir / CLASSES_FILE
    for p in (mpath, cpath):
        if not p.is_file():
            raise DataError(f"{p}: not found; run `lcm data prepare` first")
    classes = read_json(cpath)
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise DataError(f"{cpath}: expected a JSON list of class names")
    return Manifest(tuple(classes), read_parquet(mpath, MANIFEST_SCHEMA, "file"))
