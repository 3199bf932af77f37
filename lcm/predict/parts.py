"""Data files: one shard's scores in long format, written atomically into its run's directory,
with what registration needs in the file's metadata; and the run's labels beside them (for
`lcm query --parts` and engines that read the files without the catalog)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lcm import checkpoint as ckpt
from lcm import store
from lcm.io import atomic_path
from lcm.predict.request import PredictRequest, Unit

PART_META = b"lcm.part"
PART_SCHEMA = store.PART_SCHEMA
RUN_FILE = "part-run.parquet"  # a complete run's one file (its shards, consolidated)


def part_path(run_dir: Path, unit: Unit) -> Path:
    return Path(run_dir) / f"part-{unit.name}.parquet"


# zstd; the scores byte-stream-split and without a dictionary (measured: 3.8 bytes a row
# instead of 5.8), every other column dictionary-encoded (constant or repeated).
WRITE_OPTIONS: dict = {
    "compression": "zstd",
    "use_dictionary": ["run_id", "shard", "image_key", "label_id", "target"],
    "use_byte_stream_split": ["score"],
}
_DICTIONARY = ["run_id", "shard", "image_key"]  # read back as dictionaries by consolidate


def write_part(path: Path, table: pa.Table, row_group_size: int | None = None) -> None:
    with atomic_path(path) as tmp:
        if not _same_columns(table.schema):
            table = table.cast(PART_SCHEMA.with_metadata(table.schema.metadata))
        pq.write_table(table, tmp, row_group_size=row_group_size, **WRITE_OPTIONS)


def _same_columns(schema: pa.Schema) -> bool:
    """The part schema's columns, a string column possibly dictionary-encoded."""
    if schema.names != PART_SCHEMA.names:
        return False
    for field, want in zip(schema, PART_SCHEMA, strict=True):
        got = field.type.value_type if pa.types.is_dictionary(field.type) else field.type
        if got != want.type:
            return False
    return True


def part_table(
    run_id: str,
    shard: str,
    keys: list[str],
    scores: list[np.ndarray],
    targets: list[np.ndarray],
    n_classes: int,
) -> pa.Table:
    """Long format, one row per (image, class), in stream order then class order."""
    n = len(keys)
    score = np.concatenate(scores).reshape(-1) if n else np.zeros(0, np.float32)
    target_arr = np.concatenate(targets) if n else np.zeros((0, 0), np.float32)
    if target_arr.shape[1] == n_classes:
        target = pa.array(target_arr.reshape(-1).astype(np.int8), pa.int8())
    else:  # image folders carry no labels
        target = pa.nulls(n * n_classes, pa.int8())
    zeros = pa.array(np.zeros(n * n_classes, np.int32))
    key_index = pa.array(np.repeat(np.arange(n, dtype=np.int32), n_classes))
    columns = [
        pa.DictionaryArray.from_arrays(zeros, pa.array([run_id])).cast(pa.string()),
        pa.DictionaryArray.from_arrays(zeros, pa.array([shard])).cast(pa.string()),
        pa.DictionaryArray.from_arrays(key_index, pa.array(keys, pa.string())).cast(pa.string()),
        pa.array(np.tile(np.arange(n_classes, dtype=np.int16), n)),
        pa.array(score.astype(np.float32, copy=False)),
        target,
    ]
    return pa.Table.from_arrays(columns, schema=PART_SCHEMA)


def consolidate(files: list[Path], dest: Path) -> pa.Table:
    """The rows of ``files`` in their order as one file at ``dest`` (one row group per file,
    so a shard's rows stay together); returns them. A run of 41 shards then costs a query
    that names it one file to open, and the store's glob one entry, not 41."""
    # read with the strings kept as dictionaries: half the time of decoding 3 million keys
    tables = [pq.read_table(f, read_dictionary=_DICTIONARY) for f in files]
    table = pa.concat_tables(tables) if tables else PART_SCHEMA.empty_table()
    dest.parent.mkdir(parents=True, exist_ok=True)
    write_part(dest, table, row_group_size=max((t.num_rows for t in tables), default=1))
    return table


def read_part_meta(path: Path) -> dict[str, Any] | None:
    try:
        metadata = pq.read_schema(path).metadata or {}
        return json.loads(metadata[PART_META])
    except (OSError, pa.ArrowInvalid, KeyError, json.JSONDecodeError):
        return None


_REUSE_KEYS = ("run_id", "model_sha256", "unit_digest", "scoring")


def reusable_part(
    req: PredictRequest, run_dir: Path, unit: Unit, digest: str, settings: str
) -> store.PartRecord | None:
    """A part an interrupted run already wrote for exactly this unit and model, scored the
    same way (device, precision, batch size: any of them can change the last bits)."""
    path = part_path(run_dir, unit)
    meta = read_part_meta(path) if path.is_file() else None
    wanted = (req.run_id, digest, unit.digest, settings)
    if not meta or tuple(meta.get(k) for k in _REUSE_KEYS) != wanted:
        return None
    fields = {f.name for f in dataclasses.fields(store.PartRecord)}
    kept = {k: v for k, v in meta.items() if k in fields}
    kept["skipped"] = tuple(tuple(s) for s in kept["skipped"])
    return store.PartRecord(**kept)


def write_labels(
    req: PredictRequest,
    run_dir: Path,
    meta: ckpt.ModelMeta,
    thresholds: np.ndarray,
    sources: str | list[str],
) -> None:
    """The run's labels beside its files, so `lcm query --parts` can name them."""
    n = len(meta.classes)
    table = pa.table(
        {
            "run_id": pa.array([req.run_id] * n, pa.string()),
            "label_id": pa.array(range(n), pa.int16()),
            "name": pa.array(meta.classes, pa.string()),
            "threshold": pa.array(thresholds, pa.float64()),
            "threshold_source": pa.array(
                [sources] * n if isinstance(sources, str) else sources, pa.string()
            ),
        }
    )
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    with atomic_path(Path(run_dir) / store.LABELS_FILE) as tmp:
        pq.write_table(table, tmp)
