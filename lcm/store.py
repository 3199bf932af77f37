"""The prediction store: Parquet files of per-image label scores, and a small DuckDB catalog.

Layout (schema version 2)::

    <db>.duckdb                       the catalog: runs, labels, run_shards, skipped_images,
                                      label_summaries, and the views users query
    <data root>/run_id=<id>/run=<n>/part-<shard>.parquet   one file per shard (zstd)

The data root defaults to ``<db dir>/parts/<db stem>`` and is recorded in the catalog. Every
run gets an integer *ordinal* when it is created (and a new one when it is replaced or
compacted). Both are hive partitions of the path, so a query that names its runs
(``WHERE run_id = 'scheduled-2026-12-01'``, or ``IN (...)``) opens those runs' files only:
DuckDB prunes on constant filters of partition columns at plan time (measured: 41 of 4,101
files read; it does not prune through a join or a subquery, which is why the run id itself,
not only the ordinal, is in the path). A run's rows are never copied into the catalog, so the
catalog stays small and a night's append costs the same at night 1 and night 365.

Write protocol (what makes a run exact and resumable):

1. a scoring task writes one shard's scores to ``run=<n>/part-<shard>.parquet`` under a
   temporary name and renames it (:mod:`lcm.predict`), so a file on disk is always whole;
2. ONE writer *registers* the files (a ``run_shards`` row and the skipped images of each) in
   one short transaction; registering a shard twice is a no-op;
3. when every shard is registered, the run's files are consolidated into one file under a new
   ordinal and its per-label summaries computed from it (with the catalog closed); one
   transaction then points the run at that file, inserts the summaries and marks it
   ``complete``; the shard files are deleted after (:func:`lcm.predict.run.complete_run`).

The views read ``run_id=*/run=*/part-*.parquet`` joined to ``runs`` on (run id, ordinal): a
file of a run the catalog does not know (a replaced or pruned run whose directory is being
removed, or one orphaned by a crash) is never visible, and a shard is visible as a whole file
or not at all. ``--replace`` gives the run a new ordinal (a new directory) in the transaction
that removes the old rows; the old directory is deleted afterwards.

DuckDB lets one process open a file at a time (a reader blocks a writer too), so writers
connect only for the instant they register or finish, and retry on the lock error for up to
``lock_timeout`` seconds; ``lcm query`` copies the catalog's small tables into memory and lets
go of the file before it runs a query (:mod:`lcm.query`).

Version-1 files (every row inside the DuckDB file) are still read as they are; writing to one
needs ``lcm store migrate`` first (:mod:`lcm.store_admin`).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from lcm.errors import DataError, LcmError, first_line

SCHEMA_VERSION = 2
LABELS_FILE = "labels.parquet"  # a run's labels, beside its Parquet files
# keeps the views valid before the first run (no run id starts with '_', no ordinal is 0)
SENTINEL = "run_id=_/run=0/part-empty.parquet"
MEMORY_LIMIT = "2GB"
HISTOGRAM_BINS = 20

_TABLES = """
CREATE TABLE IF NOT EXISTS lcm_schema (version INTEGER NOT NULL, created_at TIMESTAMP NOT NULL);
CREATE TABLE IF NOT EXISTS store_meta (key VARCHAR PRIMARY KEY, value VARCHAR NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id VARCHAR PRIMARY KEY,
    run_ordinal INTEGER NOT NULL UNIQUE,
    run_date DATE NOT NULL,
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
    n_reused BIGINT,
    image_size INTEGER NOT NULL,
    params JSON,
    lcm_version VARCHAR NOT NULL,
    flow_run_id VARCHAR,
    deployment VARCHAR
);
CREATE TABLE IF NOT EXISTS labels (
    run_id VARCHAR NOT NULL,
    label_id SMALLINT NOT NULL,
    name VARCHAR NOT NULL,
    threshold DOUBLE NOT NULL,
    threshold_source VARCHAR NOT NULL,
    PRIMARY KEY (run_id, label_id)
);
CREATE TABLE IF NOT EXISTS run_shards (
    run_id VARCHAR NOT NULL,
    shard VARCHAR NOT NULL,
    n_images INTEGER NOT NULL,
    n_skipped INTEGER NOT NULL,
    n_rows BIGINT NOT NULL,
    part VARCHAR NOT NULL,  -- relative to the data root
    bytes BIGINT NOT NULL,
    worker VARCHAR NOT NULL,
    seconds DOUBLE NOT NULL,
    committed_at TIMESTAMP NOT NULL,
    PRIMARY KEY (run_id, shard)
);
CREATE TABLE IF NOT EXISTS skipped_images (
    run_id VARCHAR NOT NULL,
    shard VARCHAR,  -- NULL: skipped while listing the source, before any shard
    image_key VARCHAR NOT NULL,
    reason VARCHAR NOT NULL
);
CREATE TABLE IF NOT EXISTS label_summaries (
    run_id VARCHAR NOT NULL,
    label_id SMALLINT NOT NULL,
    images BIGINT NOT NULL,
    predicted BIGINT NOT NULL,  -- score >= the run's threshold
    mean_score DOUBLE,
    histogram INTEGER[] NOT NULL,  -- images per score bin, 20 bins over [0, 1]
    positives BIGINT,  -- where the source carries labels (target 1) ...
    negatives BIGINT,
    true_positives BIGINT,
    ap DOUBLE,  -- ... exact AP over the known targets (NULL without a positive)
    PRIMARY KEY (run_id, label_id)
);
"""

# The user-facing views, over the data files (in the catalog and in `lcm query`'s memory).
_VIEWS = """
CREATE OR REPLACE VIEW predictions AS
SELECT p.run_id, p.shard, p.image_key, p.label_id, p.score
FROM {files} p JOIN runs r ON r.run_id = p.run_id AND r.run_ordinal = p.run;
CREATE OR REPLACE VIEW targets AS
SELECT p.run_id, p.image_key, p.label_id, p.target
FROM {files} p JOIN runs r ON r.run_id = p.run_id AND r.run_ordinal = p.run
WHERE p.target IS NOT NULL;
"""
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
# Each complete run against the previous complete run of the same source and model: the change
# of each label's predicted rate and the population stability index of its score histogram
# (bins smoothed by 1e-4; PSI < 0.1 is read as stable, > 0.25 as shifted).
DRIFT_VIEW = """
CREATE OR REPLACE VIEW label_drift AS
WITH s AS (
    SELECT r.run_id, r.run_date, r.created_at, r.source, r.model_sha256, m.label_id, l.name,
           m.images, m.predicted::DOUBLE / nullif(m.images, 0) AS rate, m.histogram,
           lag(r.run_id) OVER w AS previous_run_id,
           lag(m.predicted::DOUBLE / nullif(m.images, 0)) OVER w AS previous_rate,
           lag(m.histogram) OVER w AS previous_histogram,
           lag(m.images) OVER w AS previous_images
    FROM label_summaries m JOIN runs r USING (run_id) JOIN labels l USING (run_id, label_id)
    WHERE r.status = 'complete'
    WINDOW w AS (PARTITION BY r.source, r.model_sha256, m.label_id
                 ORDER BY r.run_date, r.created_at)
)
SELECT run_id, run_date, previous_run_id, label_id, name, rate, previous_rate,
       rate - previous_rate AS rate_change,
       list_sum(list_transform(range(1, len(histogram) + 1), lambda i:
           (histogram[i] / images + 1e-4 - previous_histogram[i] / previous_images - 1e-4)
           * ln((histogram[i] / images + 1e-4)
                / (previous_histogram[i] / previous_images + 1e-4)))) AS psi
FROM s WHERE previous_run_id IS NOT NULL;
"""

_LOCK_HOLDER = re.compile(r"Conflicting lock is held in (.*?) \(PID (\d+)\)")
_RUN_TABLES = ("run_shards", "skipped_images", "label_summaries", "labels", "runs")
CATALOG_TABLES = ("runs", "labels", "run_shards", "skipped_images", "label_summaries")

PART_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("shard", pa.string()),
        ("image_key", pa.string()),
        ("label_id", pa.int16()),
        ("score", pa.float32()),
        ("target", pa.int8()),  # null when the source carries no labels
    ]
)


def default_parts_root(db: Path) -> Path:
    """Where a store's data files live unless told otherwise: <db dir>/parts/<db stem>."""
    return Path(db).parent / "parts" / Path(db).stem


def run_dir(data_root: Path, run_id: str, ordinal: int) -> Path:
    return Path(data_root) / f"run_id={run_id}" / f"run={ordinal}"


def files_sql(data_root: Path, files: Sequence[str] | None = None) -> str:
    """The ``read_parquet`` of the data files under ``data_root`` (hive columns ``run_id``
    and ``run``): every file (a glob, for views kept in the catalog), or the ``files`` given
    (relative paths; `lcm query` passes the registered ones and lists no directory)."""
    root = str(Path(data_root).resolve())
    bad = set("'*?[]{}\\")
    if set(root) & bad:
        raise DataError(f"{root}: quotes and wildcards in the store's path are not supported")
    if files is None:
        where = f"'{root}/run_id=*/run=*/part-*.parquet'"
    else:
        if any(set(f) & bad for f in files):
            raise DataError(f"{root}: a registered file name holds a quote or a wildcard")
        where = "[" + ", ".join(f"'{root}/{f}'" for f in files) + "]"
    return (f"read_parquet({where}, hive_partitioning = true, "
            "hive_types = {'run_id': VARCHAR, 'run': INTEGER})")  # fmt: skip


def views_sql(data_root: Path, files: Sequence[str] | None = None, drift: bool = True) -> str:
    """Every view of the store, over ``data_root``'s files (``drift``: label_drift too)."""
    return (_VIEWS.format(files=files_sql(data_root, files)) + VIEWS
            + (DRIFT_VIEW if drift else ""))  # fmt: skip


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
    ``timeout`` seconds); then fail with one line naming the holder's PID.

    DuckDB's lock is taken or refused at once, with no queue: a process that retries seldom
    loses to one that reconnects often (a reader querying in a loop). Retries are hence at
    most 0.1 s apart (a refused attempt took ~9 ms here, under load)."""
    deadline, delay = time.monotonic() + timeout, 0.02
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
            delay = min(delay * 2, 0.1)


def schema_version(con: duckdb.DuckDBPyConnection) -> int | None:
    """The store's schema version, or None for a file that is not a prediction store."""
    has = one(con, "SELECT count(*) FROM information_schema.tables WHERE table_name = 'lcm_schema'")
    if not has[0]:
        return None
    return one(con, "SELECT max(version) FROM lcm_schema")[0]


def check_version(version: int | None, db: Path, *, writing: bool) -> None:
    """One-line errors for a store this code cannot read (newer) or write (older)."""
    if version is None:
        return
    if version > SCHEMA_VERSION:
        raise DataError(
            f"{db}: prediction store schema version {version} is newer than this lcm "
            f"understands ({SCHEMA_VERSION}); upgrade lcm"
        )
    if writing and version < SCHEMA_VERSION:
        raise DataError(
            f"{db}: prediction store schema version {version}; this lcm writes version "
            f"{SCHEMA_VERSION}: run `lcm store migrate --db {db}` first (queries read it as it is)"
        )


def data_root_of(con: duckdb.DuckDBPyConnection, db: Path) -> Path:
    """The data root recorded in a version-2 catalog."""
    row = one(con, "SELECT value FROM store_meta WHERE key = 'data_root'")
    if row is None:
        raise DataError(f"{db}: the catalog records no data root; not a complete store")
    return Path(row[0])


@contextmanager
def writer(db: Path, timeout: float, data_root: Path | None = None) -> Iterator[Any]:
    """A write connection with the schema in place, closed (and the file freed) on exit.

    ``data_root`` (default: :func:`default_parts_root`) is recorded when the store is
    created; a store whose files live elsewhere refuses another root with one line."""
    db = Path(db)
    db.parent.mkdir(parents=True, exist_ok=True)
    con = open_db(db, timeout=timeout, config={"memory_limit": MEMORY_LIMIT})
    try:
        ensure_schema(con, db, Path(data_root) if data_root else default_parts_root(db))
        yield con
    finally:
        con.close()


def ensure_schema(con: duckdb.DuckDBPyConnection, db: Path, data_root: Path) -> Path:
    """Create the catalog (or check it); returns its data root."""
    version = schema_version(con)
    check_version(version, db, writing=True)
    root = Path(data_root).resolve()
    if version is None:
        if one(con, "SELECT count(*) FROM information_schema.tables")[0]:
            raise DataError(f"{db}: a DuckDB file with other tables, not a prediction store")
        write_sentinel(root)
        with transaction(con):
            con.execute(_TABLES)
            con.execute("INSERT INTO lcm_schema VALUES (?, ?)", [SCHEMA_VERSION, _now()])
            con.execute("INSERT INTO store_meta VALUES ('data_root', ?)", [str(root)])
            con.execute(views_sql(root))
        return root
    recorded = data_root_of(con, db)
    if recorded != root:
        raise DataError(f"{db}: this store's files live in {recorded}, not {root}; pass "
                        f"--parts {recorded}")  # fmt: skip
    write_sentinel(root)
    return root


def write_sentinel(root: Path) -> None:
    """An empty data file under ``run=0`` (no run has ordinal 0): a glob needs one match."""
    path = Path(root) / SENTINEL
    if not path.is_file():
        from lcm.io import atomic_path

        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            pq.write_table(PART_SCHEMA.empty_table(), tmp)


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
    run_date: date | None = None  # None: today (UTC)
    deployment: str | None = None

    def same_work(self, row: dict[str, Any]) -> bool:
        return (row["model_sha256"], row["weights"], row["source_sha256"]) == (
            self.model_sha256,
            self.weights,
            self.source_sha256,
        )


def get_run(con: duckdb.DuckDBPyConnection, run_id: str) -> dict[str, Any] | None:
    cur = con.execute("SELECT * FROM runs WHERE run_id = ?", [run_id])
    rows = cur.fetchall()  # all: DuckDB 2 refuses other work while a result is unfinished
    if not rows:
        return None
    return dict(zip([d[0] for d in cur.description], rows[0], strict=True))


def committed_shards(con: duckdb.DuckDBPyConnection, run_id: str) -> set[str]:
    rows = con.execute("SELECT shard FROM run_shards WHERE run_id = ?", [run_id]).fetchall()
    return {r[0] for r in rows}


def next_ordinal(con: duckdb.DuckDBPyConnection) -> int:
    """Ordinals only grow (kept in store_meta): a directory is never reused by another run."""
    row = one(con, "SELECT value FROM store_meta WHERE key = 'next_ordinal'")
    used = one(con, "SELECT coalesce(max(run_ordinal), 0) FROM runs")[0]
    ordinal = max(int(row[0]) if row else 1, used + 1)
    con.execute("INSERT OR REPLACE INTO store_meta VALUES ('next_ordinal', ?)", [str(ordinal + 1)])
    return ordinal


def create_run(
    con: duckdb.DuckDBPyConnection,
    run: RunRecord,
    labels: Sequence[tuple[str, float]],
    threshold_source: str | Sequence[str],
    listing_skips: Sequence[tuple[str, str]] = (),
) -> tuple[int, int | None]:
    """Insert the run (status ``running``) under a new ordinal, its labels and the inputs
    skipped while listing the source, in one transaction; any earlier run of the same id is
    removed in the same transaction. Returns (new ordinal, the replaced run's ordinal)."""
    with transaction(con):
        old = get_run(con, run.run_id)
        _delete_run(con, run.run_id)
        ordinal = next_ordinal(con)
        con.execute(
            "INSERT INTO runs VALUES (?, ?, ?, 'running', ?, NULL, ?, ?, ?, ?, ?, ?, ?, NULL, "
            "NULL, NULL, ?, ?, ?, ?, ?)",
            [
                run.run_id,
                ordinal,
                run.run_date or _now().date(),
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
                run.deployment,
            ],
        )
        label_rows = pa.table(
            {
                "run_id": pa.array([run.run_id] * len(labels), pa.string()),
                "label_id": pa.array(range(len(labels)), pa.int16()),
                "name": pa.array([n for n, _ in labels], pa.string()),
                "threshold": pa.array([t for _, t in labels], pa.float64()),
                "threshold_source": pa.array(
                    [threshold_source] * len(labels)
                    if isinstance(threshold_source, str)
                    else list(threshold_source),
                    pa.string(),
                ),
            }
        )
        con.from_arrow(label_rows).insert_into("labels")
        if listing_skips:
            _insert_skips(con, run.run_id, None, listing_skips)
    return ordinal, (old["run_ordinal"] if old else None)


def mark_flow_run(
    con: duckdb.DuckDBPyConnection,
    run_id: str,
    flow_run_id: str | None,
    deployment: str | None = None,
) -> None:
    if flow_run_id:
        con.execute(
            "UPDATE runs SET flow_run_id = ?, deployment = coalesce(?, deployment) "
            "WHERE run_id = ?",
            [flow_run_id, deployment, run_id],
        )


def delete_run(con: duckdb.DuckDBPyConnection, run_id: str) -> None:
    """Remove every catalog row of a run, in one transaction (its files are the caller's)."""
    with transaction(con):
        _delete_run(con, run_id)


def _delete_run(con: duckdb.DuckDBPyConnection, run_id: str) -> None:
    for table in _RUN_TABLES:
        con.execute(f"DELETE FROM {table} WHERE run_id = ?", [run_id])


def _insert_skips(
    con: duckdb.DuckDBPyConnection, run_id: str, shard: str | None, skips: Sequence
) -> None:
    rows = pa.table(
        {
            "run_id": pa.array([run_id] * len(skips), pa.string()),
            "shard": pa.array([shard] * len(skips), pa.string()),
            "image_key": pa.array([k for k, _ in skips], pa.string()),
            "reason": pa.array([r for _, r in skips], pa.string()),
        }
    )
    con.from_arrow(rows).insert_into("skipped_images")


@dataclass(frozen=True)
class PartRecord:
    """One shard's data file and what the scoring task measured."""

    run_id: str
    shard: str
    path: str
    n_images: int
    skipped: tuple[tuple[str, str], ...]
    n_rows: int
    worker: str
    seconds: float


def register_parts(
    con: duckdb.DuckDBPyConnection, parts: Sequence[PartRecord], data_root: Path
) -> int:
    """Record the shards' files in the catalog, in one transaction (a few milliseconds for a
    night's 41 shards); a shard already registered is left as it is. Each file must be
    whole and hold the rows its scoring task counted. Returns how many were new."""
    rows = []
    for part in parts:
        path = Path(part.path)
        try:
            meta = pq.read_metadata(path)
        except (OSError, pa.ArrowInvalid) as e:
            raise DataError(f"{path}: cannot read this data file ({e})") from e
        if meta.num_rows != part.n_rows:
            raise DataError(f"{path}: {meta.num_rows} rows, the scoring task wrote {part.n_rows}")
        try:
            relative = str(path.resolve().relative_to(Path(data_root).resolve()))
        except ValueError:
            raise DataError(f"{path}: lies outside the store's data root {data_root}") from None
        rows.append((part, relative, path.stat().st_size))
    with transaction(con):
        done = set(con.execute(
            "SELECT run_id, shard FROM run_shards WHERE run_id IN (SELECT unnest(?))",
            [sorted({p.run_id for p in parts})],
        ).fetchall())  # fmt: skip
        new = [(p, rel, size) for p, rel, size in rows if (p.run_id, p.shard) not in done]
        new = list({(p.run_id, p.shard): (p, rel, size) for p, rel, size in new}.values())
        for part, _, _ in new:
            if part.skipped:
                _insert_skips(con, part.run_id, part.shard, part.skipped)
        if new:
            now = _now()
            table = pa.table({
                "run_id": [p.run_id for p, _, _ in new], "shard": [p.shard for p, _, _ in new],
                "n_images": pa.array([p.n_images for p, _, _ in new], pa.int32()),
                "n_skipped": pa.array([len(p.skipped) for p, _, _ in new], pa.int32()),
                "n_rows": pa.array([p.n_rows for p, _, _ in new], pa.int64()),
                "part": [rel for _, rel, _ in new],
                "bytes": pa.array([size for _, _, size in new], pa.int64()),
                "worker": [p.worker for p, _, _ in new],
                "seconds": pa.array([p.seconds for p, _, _ in new], pa.float64()),
                "committed_at": pa.array([now] * len(new), pa.timestamp("us")),
            })  # fmt: skip
            con.from_arrow(table).insert_into("run_shards")
    return len(new)


def finish_run(
    con: duckdb.DuckDBPyConnection,
    run_id: str,
    summaries: pa.Table,
    n_reused: int = 0,
    moved: tuple[int, Path, Path] | None = None,
) -> dict[str, Any]:
    """Insert the run's label summaries and mark it complete with its totals, in one
    transaction; returns the run's row. ``moved`` = (ordinal, file, data root): the run's
    rows now live in that one file under that ordinal (the views switch to it in the same
    transaction)."""
    with transaction(con):
        if moved is not None:
            _move_run(con, run_id, *moved)
        con.execute("DELETE FROM label_summaries WHERE run_id = ?", [run_id])
        con.from_arrow(summaries).insert_into("label_summaries")
        con.execute(
            """
            UPDATE runs SET status = 'complete', finished_at = ?, n_reused = ?,
                n_images = (SELECT coalesce(sum(n_images), 0) FROM run_shards WHERE run_id = ?),
                n_skipped = (SELECT count(*) FROM skipped_images WHERE run_id = ?)
            WHERE run_id = ?
            """,
            [_now(), n_reused, run_id, run_id, run_id],
        )
    run = get_run(con, run_id)
    assert run is not None
    return run


def one(con: duckdb.DuckDBPyConnection, sql: str, args: Sequence[Any] = ()) -> tuple | None:
    """The first row of a query, or None; the result is read to its end (DuckDB 2 refuses
    other work on a connection while a result is unfinished)."""
    rows = con.execute(sql, list(args)).fetchall()
    return rows[0] if rows else None


def move_run(
    con: duckdb.DuckDBPyConnection, run_id: str, ordinal: int, path: Path, root: Path
) -> None:
    """Point a run at one file under a new ordinal, in one transaction (the views switch from
    the old directory to the new one at once)."""
    with transaction(con):
        _move_run(con, run_id, ordinal, path, root)


def _move_run(
    con: duckdb.DuckDBPyConnection, run_id: str, ordinal: int, path: Path, root: Path
) -> None:
    con.execute("UPDATE runs SET run_ordinal = ? WHERE run_id = ?", [ordinal, run_id])
    # every shard's row names the one file; bytes are its share by rows
    con.execute(
        "UPDATE run_shards SET part = ?, bytes = round(? * n_rows / greatest(1, "
        "(SELECT sum(n_rows) FROM run_shards WHERE run_id = ?))) WHERE run_id = ?",
        [str(Path(path).relative_to(root)), Path(path).stat().st_size, run_id, run_id],
    )


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
