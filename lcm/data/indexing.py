"""``lcm data index``: the ``_info.json`` for shards written by other tools.

Every shard is read once, front to back (local files or URLs alike, through webdataset):
each sample must hold ``<key>.jpg`` and ``<key>.json`` with ``labels`` (class indices) and
optionally ``ignore``, as lcm's own shards do. The info file lists the shards in the order
given, their sample counts and a checksum over their bytes; the classes come from a
``classes.json`` (a list of names, class index = position).
"""

from __future__ import annotations

import glob
import hashlib
from collections.abc import Callable
from pathlib import Path

from lcm.data.locations import expand, has_braces, is_url, iter_samples, shard_file_name
from lcm.data.shard_format import INFO_FILE, ShardEntry, ShardInfo
from lcm.data.streaming import parse_sample
from lcm.errors import DataError
from lcm.io import atomic_write_json, read_json


def shard_locations(spec: str) -> list[str]:
    """The tars a specification names, without needing an info file: a directory's
    ``*.tar`` (sorted), a glob, a brace list, or URLs."""
    if has_braces(spec):
        members = expand(spec)
    elif is_url(spec):
        members = [spec]
    elif Path(spec).is_dir():
        members = sorted(str(p) for p in Path(spec).glob("*.tar"))
    else:
        members = sorted(glob.glob(spec))
    if not members:
        raise DataError(f"{spec}: names no shard")
    for m in members:
        if not is_url(m) and not Path(m).is_file():
            raise DataError(f"{m}: shard file not found")
    return members


def read_classes(path: Path) -> tuple[str, ...]:
    doc = read_json(path, "not found; give a JSON list of class names")
    if not isinstance(doc, list) or not doc or not all(isinstance(c, str) for c in doc):
        raise DataError(f"{path}: expected a non-empty JSON list of class names")
    if len(set(doc)) != len(doc):
        raise DataError(f"{path}: a class name is listed twice")
    return tuple(doc)


def _check_labels(where: str, key: str, meta: object, num_classes: int) -> None:
    if not isinstance(meta, dict):
        raise DataError(f"{where}: sample {key!r}: its .json is not an object")
    for field in ("labels", "ignore"):
        value = meta.get(field, [])
        if field == "labels" and field not in meta:
            raise DataError(f"{where}: sample {key!r}: its .json has no 'labels' list")
        if not isinstance(value, list) or not all(
            isinstance(c, int) and not isinstance(c, bool) and 0 <= c < num_classes for c in value
        ):
            raise DataError(
                f"{where}: sample {key!r}: '{field}' must be a list of class indices in "
                f"[0, {num_classes})"
            )


def index_shards(
    spec: str,
    classes_file: Path,
    out: Path,
    progress: Callable[[int, int], None] | None = None,
) -> ShardInfo:
    """Scan the shards of ``spec`` and write their info file to ``out`` (atomically)."""
    if Path(out).name != INFO_FILE:
        raise DataError(f"{out}: the info file must be named {INFO_FILE} to be found")
    classes = read_classes(classes_file)
    locations = shard_locations(spec)
    names = [shard_file_name(m) if is_url(m) else Path(m).name for m in locations]
    if len(set(names)) != len(names):
        raise DataError(f"{spec}: two shards share the file name {names[0]!r}")
    digest = hashlib.sha256()
    entries: list[ShardEntry] = []
    for i, (where, name) in enumerate(zip(locations, names, strict=True)):
        count = 0
        seen: set[str] = set()
        for key, parts in iter_samples(where if is_url(where) else Path(where), digest):
            _, _, meta = parse_sample(where, key, parts)
            _check_labels(where, key, meta, len(classes))
            if key in seen:
                raise DataError(f"{where}: sample {key!r} appears twice")
            seen.add(key)
            count += 1
        if count == 0:
            raise DataError(f"{where}: holds no samples")
        entries.append(ShardEntry(name, count))
        if progress:
            progress(i + 1, len(locations))
    info = ShardInfo(
        classes=classes,
        shards=tuple(entries),
        total=sum(e.count for e in entries),
        skipped=(),
        checksum=f"sha256:{digest.hexdigest()}",
        max_side=None,
        shard_size=max(e.count for e in entries),
    )
    atomic_write_json(Path(out), info.to_json())
    return info
