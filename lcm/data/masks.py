"""Partial-label masks (SPEC section 4): which training targets the learner may see.

For a missing ratio ``m`` every (image, class) target of the training split is independently
hidden with probability ``m``, positives and negatives alike, from a fixed seed. The mask is a
separate file joined to the shards by key, so the shards stay untouched when only ``m``
changes.

File format (Parquet): column ``key`` (string) and column ``known`` (binary: the per-class
known bits of one image, ``np.packbits(row, bitorder="little")``, ``ceil(C / 8)`` bytes);
schema metadata ``num_classes``, ``missing``, ``seed`` (and the realised counts).

A target the manifest already marks unknown (``ignore``) stays unknown: its known bit is 0.
The draw for an entry does not depend on whether it was known, so the mask is a function of
(number of images, number of classes, seed, m) alone. The realised missing share counts only
what the mask itself took away::

    realised = (entries known in the manifest and hidden by the mask)
               / (entries known in the manifest)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lcm.data.manifest import read_manifest, targets_from_lists
from lcm.errors import ConfigError, DataError
from lcm.io import atomic_path, read_parquet

log = logging.getLogger(__name__)

MASK_SCHEMA = pa.schema([("key", pa.string()), ("known", pa.binary())])
_CHUNK = 4096  # rows drawn at a time: the float draws stay small whatever the split size


@dataclass(frozen=True)
class MaskReport:
    path: Path
    num_images: int
    num_classes: int
    missing: float
    seed: int
    known_entries: int  # targets known in the manifest
    hidden_entries: int  # of those, the ones this mask hides

    @property
    def realised(self) -> float:
        """Share of the manifest's known targets that the mask hides (0 when none are known)."""
        return self.hidden_entries / self.known_entries if self.known_entries else 0.0

    def summary(self) -> str:
        return (
            f"{self.path}: hid {self.hidden_entries} of {self.known_entries} known targets "
            f"({100 * self.realised:.2f}% realised, {100 * self.missing:g}% requested) "
            f"over {self.num_images} images x {self.num_classes} classes, seed {self.seed}"
        )


class LabelMask(Mapping[str, np.ndarray]):
    """A read mask: ``mask[key]`` is the bool ``(C,)`` known row of that image.

    Rows live in one ``(N, C)`` bool matrix with a key -> row index, far smaller than a dict
    of arrays for COCO-sized splits.
    """

    def __init__(
        self, path: Path, keys: list[str], known: np.ndarray, missing: float, seed: int
    ) -> None:
        self.path = path
        self.known = known  # (N, C) bool
        self.missing = missing
        self.seed = seed
        self._rows = {k: i for i, k in enumerate(keys)}

    @property
    def num_classes(self) -> int:
        return self.known.shape[1]

    def __getitem__(self, key: str) -> np.ndarray:
        return self.known[self._rows[key]]

    def __iter__(self) -> Iterator[str]:
        return iter(self._rows)

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, key: object) -> bool:
        return key in self._rows


def apply_mask(targets: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Targets ``(..., C)`` in {1, 0, -1} with every entry the mask does not know set to -1."""
    out = np.array(targets, dtype=np.float32, copy=True)
    out[~np.asarray(known, dtype=bool)] = -1.0
    return out


def mask_file(masks_dir: Path, missing: float) -> Path:
    """Where a mask directory keeps ratio ``missing``: ``missing-0.5.parquet`` for 0.5.

    The one naming rule for mask files: ``lcm data mask`` writes by it and training with
    ``train.missing`` reads by it."""
    return Path(masks_dir) / f"missing-{float(missing)}.parquet"


def _check_mask_args(missing: float, seed: int) -> None:
    if not (isinstance(missing, int | float) and 0.0 <= missing < 1.0):
        raise ConfigError(f"mask missing ratio must be in [0, 1), got {missing!r}")
    if seed < 0:
        raise ConfigError(f"mask seed must be a non-negative integer, got {seed!r}")


def make_masks(
    prepared: Path, missing: Sequence[float], seed: int, out_dir: Path
) -> list[MaskReport]:
    """One mask per ratio, each written to ``mask_file(out_dir, ratio)``; every ratio is
    checked before the first file is written."""
    if not missing:
        raise ConfigError("give at least one missing ratio")
    for m in missing:
        _check_mask_args(m, seed)
    return [make_mask(prepared, m, seed, mask_file(out_dir, m)) for m in missing]


def make_mask(prepared: Path, missing: float, seed: int, out: Path) -> MaskReport:
    """Draw the mask for a prepared training split and write it atomically to ``out``."""
    _check_mask_args(missing, seed)
    manifest = read_manifest(prepared)
    num_classes = manifest.num_classes
    rng = np.random.default_rng(seed)
    packed_rows: list[bytes] = []
    known_total = hidden_total = 0
    table = manifest.table
    for start in range(0, table.num_rows, _CHUNK):
        part = table.slice(start, _CHUNK)
        targets = targets_from_lists(
            part.column("labels").to_pylist(), part.column("ignore").to_pylist(), num_classes
        )  # (n, C)
        hide = rng.random(targets.shape) < missing  # (n, C); missing=0 hides nothing
        known_in = targets != -1.0
        known_total += int(known_in.sum())
        hidden_total += int((known_in & hide).sum())
        packed = np.packbits(known_in & ~hide, axis=1, bitorder="little")  # (n, ceil(C/8))
        packed_rows.extend(row.tobytes() for row in packed)
    report = MaskReport(
        path=out,
        num_images=table.num_rows,
        num_classes=num_classes,
        missing=float(missing),
        seed=seed,
        known_entries=known_total,
        hidden_entries=hidden_total,
    )
    metadata = {
        "num_classes": str(num_classes),
        "missing": repr(float(missing)),
        "seed": str(seed),
        "known_entries": str(known_total),
        "hidden_entries": str(hidden_total),
    }
    mask_table = pa.table(
        {"key": table.column("key"), "known": pa.array(packed_rows, type=pa.binary())},
        schema=MASK_SCHEMA.with_metadata(metadata),
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        pq.write_table(mask_table, tmp)
    log.info("%s", report.summary())
    return report


def read_mask(path: Path) -> LabelMask:
    """Read and validate a mask file; every problem is a ``DataError`` naming ``path``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: mask file not found; run `lcm data mask` first")
    table = read_parquet(path, MASK_SCHEMA, "mask file")
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    try:
        num_classes, missing, seed = (
            int(meta["num_classes"]),
            float(meta["missing"]),
            int(meta["seed"]),
        )
    except (KeyError, ValueError) as e:
        raise DataError(f"{path}: missing or invalid mask metadata ({e!r})") from e
    width = math.ceil(num_classes / 8)
    rows = table.column("known").to_pylist()
    bad = next((i for i, r in enumerate(rows) if r is None or len(r) != width), None)
    if bad is not None:
        raise DataError(
            f"{path}: row {bad} has a known field of the wrong size "
            f"(expected {width} bytes for {num_classes} classes)"
        )
    keys = table.column("key").to_pylist()
    if len(set(keys)) != len(keys) or any(k is None for k in keys):
        raise DataError(f"{path}: keys must be present and unique")
    packed = np.frombuffer(b"".join(rows), dtype=np.uint8).reshape(len(rows), width)
    known = np.unpackbits(packed, axis=1, count=num_classes, bitorder="little").astype(bool)
    return LabelMask(path, keys, known, missing, seed)  # known: (N, C)
