"""Incremental nightly runs (``--only-new``): a growing image folder scored once per image.

Every run over an image folder records each image's content hash beside its scores
(``images-<unit>.parquet`` in the run's directory, one ``images.parquet`` once complete). With
``only_new``, a run first hashes the folder's files and looks them up in the newest complete
run made with the same model digest and image size: an image whose bytes that run already
scored is not scored again; its rows are copied from that run's file (under the image's key
tonight, which may be another path), so the new run holds a row for every image, as a full
run would. Only the images with no score are scored; ``runs.n_reused`` says how many were
copied. The scores are the same up to the last bits a different batch composition can move
(measured: at most 1e-6 on this CPU).
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lcm import store
from lcm.errors import ConfigError
from lcm.predict.request import Source, Unit

IMAGES_FILE = "images.parquet"  # a complete run's image keys and content hashes
IMAGES_SCHEMA = pa.schema([("image_key", pa.string()), ("image_sha256", pa.binary(32))])


def images_path(run_dir: Path, unit: Unit) -> Path:
    return Path(run_dir) / f"images-{unit.name}.parquet"


def file_hash(path: Path) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.digest()


def hash_units(source: Source) -> Source:
    """The source with each image unit's content hashes (in file order) attached."""
    if source.kind != "images":
        return source
    units = tuple(
        dataclasses.replace(u, hashes=tuple(file_hash(Path(u.root or ".") / f) for f in u.files))
        for u in source.units
    )
    return dataclasses.replace(source, units=units)


def previous_run(con: Any, model_sha256: str, image_size: int, run_id: str) -> dict | None:
    """The newest complete run of the same model and image size (another run id)."""
    cur = con.execute(
        "SELECT run_id, run_ordinal FROM runs WHERE status = 'complete' AND model_sha256 = ? "
        "AND image_size = ? AND run_id <> ? ORDER BY run_date DESC, created_at DESC LIMIT 1",
        [model_sha256, image_size, run_id],
    )
    rows = cur.fetchall()
    return {"run_id": rows[0][0], "run_ordinal": rows[0][1]} if rows else None


def plan_reuse(source: Source, previous: dict | None, root: Path) -> tuple[Source, int]:
    """Units whose files already have scores in ``previous`` keep only the files to score and
    name the rows to copy (``reuse``: (file tonight, key in that run)); returns the source
    and how many images are reused."""
    if source.kind != "images":
        raise ConfigError("--only-new needs --images: shards carry no per-image content hash")
    if previous is None:
        return source, 0
    run_dir = store.run_dir(root, previous["run_id"], previous["run_ordinal"])
    known_file = run_dir / IMAGES_FILE
    if not known_file.is_file():  # a run made before hashes were recorded
        return source, 0
    known = pq.read_table(known_file)
    by_hash = dict(zip(known.column("image_sha256").to_pylist(),
                       known.column("image_key").to_pylist(), strict=True))  # fmt: skip
    units, reused = [], 0
    for u in source.units:
        pairs = list(zip(u.files, u.hashes, strict=True))
        keep = [(f, h) for f, h in pairs if h not in by_hash]
        copy = tuple((f, by_hash[h], h) for f, h in pairs if h in by_hash)
        reused += len(copy)
        units.append(dataclasses.replace(
            u, files=tuple(f for f, _ in keep), hashes=tuple(h for _, h in keep), reuse=copy,
            reuse_from=str(run_dir / "part-run.parquet") if copy else None,
        ))  # fmt: skip
    return dataclasses.replace(source, units=tuple(units)), reused


def copied_rows(unit: Unit, run_id: str) -> pa.Table | None:
    """The reused images' rows, from the earlier run's file, under tonight's keys, run id and
    unit; in the unit's order of those images."""
    if not unit.reuse:
        return None
    old = pq.read_table(unit.reuse_from)
    old_keys = [k for _, k, _ in unit.reuse]
    rows = old.filter(pc.is_in(old.column("image_key"), pa.array(old_keys)))
    rename = {k: f for f, k, _ in unit.reuse}
    new_keys = pa.array([rename[k] for k in rows.column("image_key").to_pylist()], pa.string())
    order = {f: i for i, (f, _, _) in enumerate(unit.reuse)}
    n = rows.num_rows
    rows = rows.set_column(rows.schema.get_field_index("image_key"), "image_key", new_keys)
    rows = rows.set_column(0, "run_id", pa.array([run_id] * n, pa.string()))
    rows = rows.set_column(1, "shard", pa.array([unit.name] * n, pa.string()))
    rank = pa.array([order[k] for k in new_keys.to_pylist()])
    sort = pc.sort_indices(pa.table({"r": rank, "l": rows.column("label_id")}),
                           [("r", "ascending"), ("l", "ascending")])  # fmt: skip
    return rows.take(sort).cast(store.PART_SCHEMA)


def write_images(path: Path, keys: list[str], hashes: list[bytes]) -> None:
    table = pa.table({"image_key": pa.array(keys, pa.string()),
                      "image_sha256": pa.array(hashes, pa.binary(32))})  # fmt: skip
    write_images_table(path, table)


def write_images_table(path: Path, table: pa.Table) -> None:
    from lcm.io import atomic_path

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        pq.write_table(table.cast(IMAGES_SCHEMA), tmp, compression="zstd")
