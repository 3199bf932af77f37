"""Looking after a prediction store: migrate a version-1 file, prune old runs, compact a run.

Every operation is safe to kill at any point and never touches a run that is being written:

- :func:`migrate` writes the version-2 data files and a new catalog under temporary names,
  then swaps the catalog in with one rename (the version-1 file stays beside it, hard-linked,
  as ``<db>.v1``). Killed before the rename, the store is still version 1 and a rerun starts
  over; after it, the store is version 2.
- :func:`prune` removes whole complete runs: one transaction forgets a run (its rows vanish
  from every view at once), then its directory is deleted. Killed in between, the directory
  is an orphan no view reads; the next prune deletes it.
- :func:`compact` rewrites a complete run's files into a new run directory and points the run
  at it in one transaction; killed before, the new directory is an orphan, after, the old one.

Orphans are directories ``run_id=<id>/run=<n>`` that no run holds (and that no run can ever
get: ordinals only grow).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lcm import store
from lcm.errors import ConfigError, DataError
from lcm.summaries import summarize

log = logging.getLogger(__name__)

V1_BACKUP_SUFFIX = ".v1"
COMPACT_ROWS_PER_GROUP = 100_000  # a compacted file's row groups (a few per label at COCO scale)


def _write(path: Path, table: pa.Table) -> None:
    from lcm.predict.parts import write_part

    path.parent.mkdir(parents=True, exist_ok=True)
    write_part(path, table)


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# ---------------------------------------------------------------------------------- migrate
@dataclass
class Migrated:
    runs: int = 0
    rows: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    backup: Path | None = None
    data_root: Path | None = None


def migrate(db: Path, data_root: Path | None = None, lock_timeout: float = 60.0) -> Migrated:
    """Turn a version-1 store into version 2 (every run, its rows, skips and labels)."""
    db = Path(db)
    if not db.is_file():
        raise DataError(f"{db}: no such database")
    root = Path(data_root or store.default_parts_root(db)).resolve()
    tmp = db.with_name(db.name + ".migrating")
    backup = db.with_name(db.name + V1_BACKUP_SUFFIX)
    tmp.unlink(missing_ok=True)
    src = store.open_db(db, timeout=lock_timeout)  # exclusive: no writer meanwhile
    done = Migrated(backup=backup, data_root=root)
    written: list[Path] = []
    try:
        version = store.schema_version(src)
        if version is None:
            raise DataError(f"{db}: not a prediction store (no lcm_schema table)")
        store.check_version(version, db, writing=False)
        if version == store.SCHEMA_VERSION:
            raise ConfigError(f"{db}: already schema version {version}; nothing to migrate")
        src.execute("CHECKPOINT")  # every committed row in the file itself, not the WAL
        done.bytes_before = db.stat().st_size
        dst = store.open_db(tmp)
        try:
            store.ensure_schema(dst, tmp, root)
            for ordinal, run in enumerate(_v1_runs(src), 1):
                written.append(store.run_dir(root, run["run_id"], ordinal))
                done.rows += _migrate_run(src, dst, run, ordinal, root)
                done.runs += 1
            dst.execute("INSERT OR REPLACE INTO store_meta VALUES ('next_ordinal', ?)",
                        [str(done.runs + 1)])  # fmt: skip
            dst.execute("UPDATE store_meta SET value = ? WHERE key = 'data_root'", [str(root)])
            dst.execute("CHECKPOINT")
        finally:
            dst.close()
    except BaseException:
        src.close()
        tmp.unlink(missing_ok=True)
        for path in written:
            shutil.rmtree(path, ignore_errors=True)
        raise
    src.close()
    backup.unlink(missing_ok=True)
    os.link(db, backup)  # the version-1 bytes stay reachable under the backup name
    os.replace(tmp, db)  # the swap: one rename
    done.bytes_after = db.stat().st_size + _dir_bytes(root)
    return done


def _v1_runs(con: Any) -> list[dict[str, Any]]:
    cur = con.execute("SELECT * FROM runs ORDER BY created_at, run_id")
    names = [d[0] for d in cur.description]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def _migrate_run(src: Any, dst: Any, run: dict[str, Any], ordinal: int, root: Path) -> int:
    run_id = run["run_id"]
    run_dir = store.run_dir(root, run_id, ordinal)
    shards = src.execute("SELECT * FROM run_shards WHERE run_id = ? ORDER BY shard",
                         [run_id]).fetchall()  # fmt: skip
    cols = [d[0] for d in src.description]
    rows = 0
    registered = []
    for values in shards:
        shard = dict(zip(cols, values, strict=True))
        table = (
            src.sql(
                "SELECT p.run_id, p.shard, p.image_key, p.label_id, p.score, t.target "
                "FROM predictions p LEFT JOIN targets t USING (run_id, image_key, label_id) "
                f"WHERE p.run_id = {_lit(run_id)} AND p.shard = {_lit(shard['shard'])} "
                "ORDER BY p.image_key, p.label_id"
            )
            .to_arrow_table()
            .cast(store.PART_SCHEMA)
        )
        path = run_dir / f"part-{shard['shard']}.parquet"
        _write(path, table)
        rows += table.num_rows
        registered.append((shard, path))
    thresholds = np.array([t for (t,) in src.execute(
        "SELECT threshold FROM labels WHERE run_id = ? ORDER BY label_id", [run_id]
    ).fetchall()])  # fmt: skip
    with store.transaction(dst):
        dst.execute(
            "INSERT INTO runs BY NAME SELECT ?::VARCHAR AS run_id, ?::INTEGER AS run_ordinal, "
            "?::DATE AS run_date, ?::VARCHAR AS status, ?::TIMESTAMP AS created_at, "
            "?::TIMESTAMP AS finished_at, ?::VARCHAR AS model_dir, ?::VARCHAR AS model_sha256, "
            "?::VARCHAR AS weights, ?::VARCHAR AS source_kind, ?::VARCHAR AS source, "
            "?::VARCHAR AS source_sha256, ?::INTEGER AS n_shards, ?::BIGINT AS n_images, "
            "?::BIGINT AS n_skipped, 0::BIGINT AS n_reused, ?::INTEGER AS image_size, "
            "?::JSON AS params, ?::VARCHAR AS lcm_version, ?::VARCHAR AS flow_run_id",
            [run_id, ordinal, run["created_at"].date(), run["status"], run["created_at"],
             run["finished_at"], run["model_dir"], run["model_sha256"], run["weights"],
             run["source_kind"], run["source"], run["source_sha256"], run["n_shards"],
             run["n_images"], run["n_skipped"], run["image_size"], run["params"],
             run["lcm_version"], run["flow_run_id"]],
        )  # fmt: skip
        for table in ("labels", "skipped_images"):
            rel = src.sql(f"SELECT * FROM {table} WHERE run_id = {_lit(run_id)}")
            dst.register("v1_rows", rel.to_arrow_table())
            dst.execute(f"INSERT INTO {table} BY NAME SELECT * FROM v1_rows")
            dst.unregister("v1_rows")
        for shard, path in registered:
            dst.execute(
                "INSERT INTO run_shards VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [run_id, shard["shard"], shard["n_images"], shard["n_skipped"], shard["n_rows"],
                 str(path.relative_to(root)), path.stat().st_size, shard["worker"],
                 shard["seconds"], shard["committed_at"]],
            )  # fmt: skip
        if run["status"] == "complete":
            sums = summarize(run_id, [p for _, p in registered], thresholds)
            dst.from_arrow(sums).insert_into("label_summaries")
    return rows


def _lit(text: str) -> str:
    return "'" + str(text).replace("'", "''") + "'"


# ------------------------------------------------------------------------------------ prune
@dataclass
class Pruned:
    runs: list[str] = field(default_factory=list)
    bytes_freed: int = 0
    orphans: list[str] = field(default_factory=list)


def prune(
    db: Path,
    *,
    keep_days: int | None = None,
    keep_runs: int | None = None,
    dry_run: bool = False,
    today: date | None = None,
    lock_timeout: float = 60.0,
) -> Pruned:
    """Remove complete runs older than ``keep_days`` (by run date) or beyond the newest
    ``keep_runs``, and orphaned directories; ``dry_run`` only says what would go."""
    if (keep_days is None) == (keep_runs is None):
        raise ConfigError("give exactly one of --keep-days or --keep-runs")
    if (keep_days or 0) < 0 or (keep_runs or 0) < 0:
        raise ConfigError("--keep-days and --keep-runs must not be negative")
    with _catalog(db, lock_timeout) as con:
        root = store.data_root_of(con, db)
        runs = con.execute(
            "SELECT run_id, run_ordinal, run_date FROM runs WHERE status = 'complete' "
            "ORDER BY run_date DESC, created_at DESC"
        ).fetchall()
        held = set(con.execute("SELECT run_id, run_ordinal FROM runs").fetchall())
        next_free = store.one(con, "SELECT value FROM store_meta WHERE key = 'next_ordinal'")
    if keep_runs is not None:
        doomed = runs[keep_runs:]
    else:
        cutoff = (today or store._now().date()) - timedelta(days=keep_days)
        doomed = [r for r in runs if r[2] < cutoff]
    limit = int(next_free[0]) if next_free else 1
    orphans = [(key, path) for key, path in _run_dirs(root)
               if key not in held and 0 < key[1] < limit]  # fmt: skip
    out = Pruned()
    for run_id, ordinal, _ in doomed:
        out.runs.append(run_id)
        out.bytes_freed += _dir_bytes(store.run_dir(root, run_id, ordinal))
    out.orphans = [str(p.relative_to(root)) for _, p in orphans]
    out.bytes_freed += sum(_dir_bytes(p) for _, p in orphans)
    if dry_run:
        return out
    for _, path in orphans:
        _remove_run_dir(path)
    for run_id, ordinal, _ in doomed:
        with _catalog(db, lock_timeout) as con:
            row = store.get_run(con, run_id)
            if row is None or row["run_ordinal"] != ordinal or row["status"] != "complete":
                continue  # replaced or resumed meanwhile: not this prune's to remove
            store.delete_run(con, run_id)
        _remove_run_dir(store.run_dir(root, run_id, ordinal))
    return out


def _run_dirs(root: Path) -> list[tuple[tuple[str, int], Path]]:
    """((run id, ordinal), path) of every run directory under the data root."""
    out = []
    for path in Path(root).glob("run_id=*/run=*"):
        try:
            key = (path.parent.name.split("=", 1)[1], int(path.name.split("=", 1)[1]))
        except ValueError:
            continue
        out.append((key, path))
    return sorted(out)


def _remove_run_dir(path: Path) -> None:
    """A run directory, then its run id's directory if nothing else is left in it."""
    shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(OSError):  # another ordinal of the run id lives on
        path.parent.rmdir()


class _catalog:
    """A short-lived write connection to a version-2 catalog."""

    def __init__(self, db: Path, lock_timeout: float) -> None:
        self.db, self.timeout = Path(db), lock_timeout

    def __enter__(self) -> Any:
        if not self.db.is_file():
            raise DataError(f"{self.db}: no such database")
        self.con = store.open_db(self.db, timeout=self.timeout)
        try:
            version = store.schema_version(self.con)
            if version is None:
                raise DataError(f"{self.db}: not a prediction store (no lcm_schema table)")
            store.check_version(version, self.db, writing=True)
        except BaseException:
            self.con.close()
            raise
        return self.con

    def __exit__(self, *exc: object) -> None:
        self.con.close()


# ---------------------------------------------------------------------------------- compact
@dataclass
class Compacted:
    run_id: str
    files_before: int
    files_after: int
    bytes_before: int
    bytes_after: int


def compact(db: Path, run_id: str, lock_timeout: float = 60.0,
            rows_per_group: int = COMPACT_ROWS_PER_GROUP) -> Compacted:  # fmt: skip
    """Rewrite a complete run's files into one sorted by label then score, in row groups of
    ``rows_per_group`` rows (a label's rows then sit in one or two row groups, which a
    per-label filter skips to), under a new ordinal; then point the run at it."""
    from lcm.predict.parts import RUN_FILE, write_part

    with _catalog(db, lock_timeout) as con:
        root = store.data_root_of(con, db)
        run = store.get_run(con, run_id)
        if run is None:
            raise ConfigError(f"{db}: no run {run_id!r}")
        if run["status"] != "complete":
            raise ConfigError(f"{db}: run {run_id!r} is still being written; compact it later")
        rows = con.execute("SELECT DISTINCT part FROM run_shards WHERE run_id = ?", [run_id])
        parts = [p for (p,) in rows.fetchall()]
        ordinal = store.next_ordinal(con)  # reserved: no other run gets this directory
    old_dir = store.run_dir(root, run_id, run["run_ordinal"])
    new_dir = store.run_dir(root, run_id, ordinal)
    before = _dir_bytes(old_dir)
    table = pa.concat_tables([pq.read_table(root / p) for p in parts])
    table = table.sort_by([("label_id", "ascending"), ("score", "descending")])
    new_dir.mkdir(parents=True, exist_ok=True)
    write_part(new_dir / RUN_FILE, table, row_group_size=rows_per_group)
    if (old_dir / store.LABELS_FILE).is_file():
        shutil.copy2(old_dir / store.LABELS_FILE, new_dir / store.LABELS_FILE)
    with _catalog(db, lock_timeout) as con:
        row = store.get_run(con, run_id)
        if row is None or row["run_ordinal"] != run["run_ordinal"]:
            raise ConfigError(f"{db}: run {run_id!r} was replaced or removed meanwhile")
        store.move_run(con, run_id, ordinal, new_dir / RUN_FILE, root)
    _remove_run_dir(old_dir)
    return Compacted(run_id, len(parts), 1, before, _dir_bytes(new_dir))
