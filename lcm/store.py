"""The prediction store: DuckDB tables of per-image label scores, written one shard at a time.

Write protocol (what makes a run exact and resumable):

1. a scoring task writes one shard's scores to a Parquet *part* under a temporary name and
   renames it (:mod:`lcm.predict`), so a part on disk is always complete;
2. ONE writer merges each part in its own transaction: delete that shard's rows, insert the
   part through ``read_parquet``, add its ``run_shards`` row. A shard is in the database
   wholly or not at all, and a merge repeated after a crash replaces instead of duplicating;
3. when every shard is merged the run is marked ``complete``.

``predictions`` and ``targets`` have no primary key on purpose: measured here a key made
loading 3-5x slower, the file 5x bigger and replacing a shard ~20x slower. Uniqueness comes
from step 2 and is tested.

The module is longer than most because the schema, the write protocol and the read-side
checks are one contract: each step above relies on the others, and reading them apart would
hide that.

DuckDB lets one process open a file at a time (a reader blocks a writer too), so the writer
connects only while it writes and retries on the lock error for up to ``lock_timeout``
seconds, then fails with one line that names the process holding the file.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from lcm.errors import DataError, LcmError, first_line

SCHEMA_VERSION = 1
LABELS_FILE = "labels.parquet"  # a run's labels, beside its Parquet parts
MEMORY_LIMIT = "2GB"  # the merge streams from Parquet; DuckDB spills past this

_TABLES = """
CREATE TABLE IF NOT EXISTS lcm_schema (version INTEGER NOT NULL, created_at TIMESTAMP NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id VARCHAR PRIMARY KEY,
    status VARCHAR NOT NULL CHECK (status IN ('running', 'complete')),
    created_at TIMESTAMP NOT NULL,
    finished_at TIMESTAMP,
    model_dir VARCHAR NOT NULL,
    model_sha256 VARCHAR NOT NULL,
    weights VARCHAR NOT NULL,
    source_kind VARCHAR NOT NULL,
    source VARCHAR NOT NULL,
    source_sha256 VARCHAR NOT NULL,
    n_shards INTEGER NOT NULL,
    n_images BIGINT,
    n_skipped BIGINT,
    image_size INTEGER NOT NULL,
    params JSON,
    lcm_version VARCHAR NOT NULL,
    flow_run_id VARCHAR
);
CREATE TABLE IF NOT EXISTS labels (
    run_id VARCHAR NOT NULL,
    label_id SMALLINT NOT NULL,
    name VARCHAR NOT NULL,
    threshold DOUBLE NOT NULL,
    threshold_source VARCHAR NOT NULL,
    PRIMARY KEY (run_id, label_id)
);
CREATE TABLE IF NOT EXISTS predictions (
    run_id VARCHAR NOT NULL,
    shard VARCHAR NOT NULL,
    image_key VARCHAR NOT NULL,
    label_id SMALLINT NOT NULL,
    score REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS targets (
    run_id VARCHAR NOT NULL,
    image_key VARCHAR NOT NULL,
    label_id SMALLINT NOT NULL,
    target TINYINT NOT NULL  -- 1 positive, 0 negative, -1 unknown
);
CREATE TABLE IF NOT EXISTS run_shards (
    run_id VARCHAR NOT NULL,
    shard VARCHAR NOT NULL,
    n_images INTEGER NOT NULL,
    n_skipped INTEGER NOT NULL,
    n_rows BIGINT NOT NULL,
    part VARCHAR NOT NULL,
    worker VARCHAR NOT NULL,
    seconds DOUBLE NOT NULL,
    committed_at TIMESTAMP NOT NULL
);
CREATE TABLE IF NOT EXISTS skipped_images (
    run_id VARCHAR NOT NULL,
    shard VARCHAR,  -- NULL: skipped while listing the source, before any shard
    image_key VARCHAR NOT NULL,
    reason VARCHAR NOT NULL
);
"""

# Shared with `lcm query --parts`, which builds the same views over the Parquet parts.
VIEWS = """
CREATE OR REPLACE VIEW predictions_named AS
SELECT p.run_id, p.shard, p.image_key, p.label_id, l.name, p.score, l.threshold,
       p.score >= l.threshold AS predicted
FROM predictions p JOIN labels l USING (run_id, label_id);
CREATE OR REPLACE VIEW scored AS
SELECT p.*, t.target
FROM predictions_named p JOIN targets t USING (run_id, image_key, label_id);
CREATE OR REPLACE VIEW image_labels AS
SELECT run_id, image_key,
       coalesce(list(name ORDER BY score DESC) FILTER (WHERE predicted), []) AS labels,
       count(*) FILTER (WHERE predicted) AS n_labels
FROM predictions_named GROUP BY run_id, image_key;
"""

_LOCK_HOLDER = re.compile(r"Conflicting lock is held in (.*?) \(PID (\d+)\)")
_RUN_TABLES = ("predictions", "targets", "run_shards", "skipped_images", "labels", "runs")


def default_parts_root(db: Path) -> Path:
    """Where a database's Parquet parts live unless told otherwise: <db dir>/parts/<db stem>,
    one directory per run inside."""
    return Path(db).parent / "parts" / Path(db).stem


class StoreLockedError(LcmError):
    """Another process holds the database file."""

    def __init__(self, message: str, pid: int | None) -> None:
        super().__init__(message)
        self.pid = pid


def lock_holder(error: Exception) -> tuple[str, int] | None:
    """``(program, pid)`` from DuckDB's lock error, or None for any other error."""
    m = _LOCK_HOLDER.search(str(error))
    return (m.group(1), int(m.group(2))) if m else None


def open_db(
    db: Path,
    *,
    read_only: bool = False,
    timeout: float = 0.0,
    config: dict[str, Any] | None = None,
    hint: str = "",
) -> duckdb.DuckDBPyConnection:
    """Connect, retrying with backoff while another process holds the file (up to
    ``timeout`` seconds); then fail with one line naming the holder's PID."""
    deadline, delay = time.monotonic() + timeout, 0.05
    while True:
        try:
            return duckdb.connect(str(db), read_only=read_only, config=config or {})
        except duckdb.Error as e:
            holder = lock_holder(e)
            if holder is None:
                raise DataError(f"{db}: cannot open as a DuckDB database ({first_line(e)})") from e
            left = deadline - time.monotonic()
            if left <= 0:
                program, pid = holder
                waited = f" after waiting {timeout:g} s" if timeout else ""
                raise StoreLockedError(
                    f"{db}: in use by PID {pid} ({program}){waited}; DuckDB allows one "
                    f"process per file{hint}",
                    pid,
                ) from e
            time.sleep(min(delay, left))
            delay = min(delay * 2, 1.0)


@contextmanager
def writer(db: Path, timeout: float) -> Iterator[duckdb.DuckDBPyConnection]:
    """A write connection with the schema in place, closed (and the file freed) on exit."""
    db.parent.mkdir(parents=True, exist_ok=True)
    con = open_db(db, timeout=timeout, config={"memory_limit": MEMORY_LIMIT})
    try:
        ensure_schema(con, db)
        yield con
    finally:
        con.close()


def ensure_schema(con: duckdb.DuckDBPyConnection, db: Path) -> None:
    con.execute(_TABLES)
    row = con.execute("SELECT max(version) FROM lcm_schema").fetchone()
    if row[0] is None:
        con.execute("INSERT INTO lcm_schema VALUES (?, ?)", [SCHEMA_VERSION, _now()])
    elif row[0] != SCHEMA_VERSION:
        raise DataError(
            f"{db}: prediction store has schema version {row[0]}; this lcm writes "
            f"version {SCHEMA_VERSION} (use another --db)"
        )
    con.execute(VIEWS)


# ------------------------------------------------------------------------------------- runs
@dataclass(frozen=True)
class RunRecord:
    """What identifies a run (model, weights, source) and describes it."""

    run_id: str
    model_dir: str
    model_sha256: str
    weights: str
    source_kind: str  # shards | images
    source: str
    source_sha256: str
    n_shards: int
    image_size: int
    params: dict[str, Any]
    lcm_version: str
    flow_run_id: str | None

    def same_work(self, row: dict[str, Any]) -> bool:
        return (row["model_sha256"], row["weights"], row["source_sha256"]) == (
            self.model_sha256,
            self.weights,
            self.source_sha256,
        )


def get_run(con: duckdb.DuckDBPyConnection, run_id: str) -> dict[str, Any] | None:
    cur = con.execute("SELECT * FROM runs WHERE run_id = ?", [run_id])
    row = cur.fetchone()
    if row is None:
        return None
    return dict(zip([d[0] for d in cur.description], row, strict=True))


def committed_shards(con: duckdb.DuckDBPyConnection, run_id: str) -> set[str]:
    rows = con.execute("SELECT shard FROM run_shards WHERE run_id = ?", [run_id]).fetchall()
    return {r[0] for r in rows}


def create_run(
    con: duckdb.DuckDBPyConnection,
    run: RunRecord,
    labels: Sequence[tuple[str, float]],
    threshold_source: str,
    listing_skips: Sequence[tuple[str, str]] = (),
) -> None:
    """Insert the run (status ``running``), its labels and the inputs skipped while listing
    the source, in one transaction; any earlier rows of the run id are removed first."""
    with transaction(con):
        _delete_run(con, run.run_id)
        con.execute(
            "INSERT INTO runs VALUES (?, 'running', ?, NULL, ?, ?, ?, ?, ?, ?, ?, NULL, NULL, "
            "?, ?, ?, ?)",
            [
                run.run_id,
                _now(),
                run.model_dir,
                run.model_sha256,
                run.weights,
                run.source_kind,
                run.source,
                run.source_sha256,
                run.n_shards,
                run.image_size,
                json.dumps(run.params, sort_keys=True),
                run.lcm_version,
                run.flow_run_id,
            ],
        )
        label_rows = pa.table(
            {
                "run_id": pa.array([run.run_id] * len(labels), pa.string()),
                "label_id": pa.array(range(len(labels)), pa.int16()),
                "name": pa.array([n for n, _ in labels], pa.string()),
                "threshold": pa.array([t for _, t in labels], pa.float64()),
                "threshold_source": pa.array([threshold_source] * len(labels), pa.string()),
            }
        )
        con.from_arrow(label_rows).insert_into("labels")
        if listing_skips:
            skip_rows = pa.table(
                {
                    "run_id": pa.array([run.run_id] * len(listing_skips), pa.string()),
                    "shard": pa.nulls(len(listing_skips), pa.string()),
                    "image_key": pa.array([k for k, _ in listing_skips], pa.string()),
                    "reason": pa.array([r for _, r in listing_skips], pa.string()),
                }
            )
            con.from_arrow(skip_rows).insert_into("skipped_images")


def mark_flow_run(con: duckdb.DuckDBPyConnection, run_id: str, flow_run_id: str | None) -> None:
    if flow_run_id:
        con.execute("UPDATE runs SET flow_run_id = ? WHERE run_id = ?", [flow_run_id, run_id])


def delete_run(con: duckdb.DuckDBPyConnection, run_id: str) -> None:
    """Remove every row of a run, in one transaction."""
    with transaction(con):
        _delete_run(con, run_id)


def _delete_run(con: duckdb.DuckDBPyConnection, run_id: str) -> None:
    for table in _RUN_TABLES:
        con.execute(f"DELETE FROM {table} WHERE run_id = ?", [run_id])


@dataclass(frozen=True)
class PartRecord:
    """One shard's part file and what the scoring task measured."""

    run_id: str
    shard: str
    path: str
    n_images: int
    skipped: tuple[tuple[str, str], ...]
    n_rows: int
    worker: str
    seconds: float


def merge_part(con: duckdb.DuckDBPyConnection, part: PartRecord) -> None:
    """Put the part's rows in place of the shard's, in one transaction (idempotent).

    A shard has rows exactly when it has a ``run_shards`` row (both commit together), so a
    first merge skips the deletes, which would otherwise scan the growing tables each time.
    """
    args = [part.run_id, part.shard]
    try:  # read here, not by DuckDB: a path is data, never a glob pattern
        rows = pq.read_table(part.path)
    except (OSError, pa.ArrowInvalid) as e:
        raise DataError(f"{part.path}: cannot read this part ({e})") from e
    con.register("part_rows", rows)
    try:
        _merge(con, part, args)
    finally:
        con.unregister("part_rows")


def _merge(con: duckdb.DuckDBPyConnection, part: PartRecord, args: list[str]) -> None:
    with transaction(con):
        merged = con.execute(
            "SELECT count(*) FROM run_shards WHERE run_id = ? AND shard = ?", args
        ).fetchone()[0]
        if merged:
            con.execute("DELETE FROM predictions WHERE run_id = ? AND shard = ?", args)
            con.execute(
                "DELETE FROM targets WHERE run_id = ? AND image_key IN "
                "(SELECT image_key FROM part_rows)",
                [part.run_id],
            )
            con.execute("DELETE FROM skipped_images WHERE run_id = ? AND shard = ?", args)
            con.execute("DELETE FROM run_shards WHERE run_id = ? AND shard = ?", args)
        con.execute(
            "INSERT INTO predictions SELECT run_id, shard, image_key, label_id, score "
            "FROM part_rows"
        )
        con.execute(
            "INSERT INTO targets SELECT run_id, image_key, label_id, target "
            "FROM part_rows WHERE target IS NOT NULL"
        )
        if part.skipped:
            skipped = pa.table(
                {
                    "run_id": [part.run_id] * len(part.skipped),
                    "shard": [part.shard] * len(part.skipped),
                    "image_key": [k for k, _ in part.skipped],
                    "reason": [r for _, r in part.skipped],
                }
            )
            con.from_arrow(skipped).insert_into("skipped_images")
        con.execute(
            "INSERT INTO run_shards VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                *args,
                part.n_images,
                len(part.skipped),
                part.n_rows,
                part.path,
                part.worker,
                part.seconds,
                _now(),
            ],
        )


def finish_run(con: duckdb.DuckDBPyConnection, run_id: str) -> dict[str, Any]:
    """Mark the run complete with its totals; returns the run's row."""
    con.execute(
        """
        UPDATE runs SET status = 'complete', finished_at = ?,
            n_images = (SELECT coalesce(sum(n_images), 0) FROM run_shards WHERE run_id = ?),
            n_skipped = (SELECT count(*) FROM skipped_images WHERE run_id = ?)
        WHERE run_id = ?
        """,
        [_now(), run_id, run_id, run_id],
    )
    run = get_run(con, run_id)
    assert run is not None
    return run


@contextmanager
def transaction(con: duckdb.DuckDBPyConnection) -> Iterator[None]:
    con.execute("BEGIN TRANSACTION")
    try:
        yield
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)
