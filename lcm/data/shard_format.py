"""The shard format, shared by the writer and the readers.

A shard directory holds ``shard-000000.tar, shard-000001.tar, ...`` (WebDataset tars: per
sample ``<key>.jpg`` and ``<key>.json`` with ``labels`` and ``ignore``) and ``_info.json``,
the :class:`ShardInfo` that lists the classes, each shard's sample count, the inputs the
writer skipped, a checksum over the shard bytes and the writer's settings.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lcm.errors import DataError

INFO_FILE = "_info.json"
INFO_FORMAT = 1


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


@dataclass(frozen=True)
class ShardEntry:
    name: str  # file name inside the shard directory
    count: int  # samples in it


@dataclass(frozen=True)
class SkippedInput:
    key: str
    path: str
    reason: str


@dataclass(frozen=True)
class ShardInfo:
    """The content of ``_info.json``. A reader given a subset of the shards (a glob) gets a
    copy whose ``shards`` and ``total`` describe that subset."""

    classes: tuple[str, ...]
    shards: tuple[ShardEntry, ...]
    total: int
    skipped: tuple[SkippedInput, ...]
    checksum: str  # "sha256:<hex>" over the bytes of all shard files, in order
    max_side: int | None
    shard_size: int

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def summary(self) -> str:
        """One line: what was written and what was skipped, grouped by kind of reason."""
        line = f"{self.total} images in {len(self.shards)} shards (max side {self.max_side})"
        if not self.skipped:
            return line + ", nothing skipped"
        kinds = Counter(s.reason.split(":", 1)[0] for s in self.skipped)
        detail = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))
        return f"{line}; skipped {len(self.skipped)} inputs ({detail}), listed in {INFO_FILE}"

    def to_json(self) -> dict[str, Any]:
        return {
            "format": INFO_FORMAT,
            "classes": list(self.classes),
            "shards": [{"name": e.name, "count": e.count} for e in self.shards],
            "total": self.total,
            "skipped": [{"key": s.key, "path": s.path, "reason": s.reason} for s in self.skipped],
            "checksum": self.checksum,
            "max_side": self.max_side,
            "shard_size": self.shard_size,
        }

    @classmethod
    def from_json(cls, doc: Any, source: Path) -> ShardInfo:
        """Parse and check an ``_info.json`` document; ``source`` names it in errors."""
        try:
            if doc["format"] != INFO_FORMAT:
                raise ValueError(f"format {doc['format']!r}, expected {INFO_FORMAT}")
            info = cls(
                classes=tuple(str(c) for c in doc["classes"]),
                shards=tuple(ShardEntry(str(e["name"]), int(e["count"])) for e in doc["shards"]),
                total=int(doc["total"]),
                skipped=tuple(
                    SkippedInput(str(s["key"]), str(s["path"]), str(s["reason"]))
                    for s in doc["skipped"]
                ),
                checksum=str(doc["checksum"]),
                max_side=None if doc["max_side"] is None else int(doc["max_side"]),
                shard_size=int(doc["shard_size"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{source}: not a valid shard info file ({e!r})") from e
        if info.total != sum(e.count for e in info.shards):
            raise DataError(f"{source}: total {info.total} differs from the sum of shard counts")
        return info
