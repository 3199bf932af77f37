"""Read-only SQL over the prediction store, or over its Parquet parts.

Read-only in fact, not just in name. DuckDB's ``read_only`` still lets SQL write files
(``COPY ... TO``) and read any file (``read_csv('/etc/passwd')``), so a query connection also
has external access disabled and its configuration locked, and the statement is parsed first:
exactly one SELECT or EXPLAIN, or nothing runs.

A query never holds the catalog while it runs: the connection copies the catalog's small
tables it needs into memory, lets go of the file (waiting, if need be, for the instant a
writer holds it to register a shard) and builds the views it needs in memory, over exactly the
files registered when it started (no directory listing; a writer can register more
meanwhile). A registered file the disk lacks is one error line, never silently missing rows.
A version-1 store (every row inside the DuckDB file) is read as it is.

``--parts`` queries a data directory without its catalog (each file complete, written
atomically) through the same views.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any, Literal

import duckdb
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from lcm import store
from lcm.errors import LcmError, first_line

Format = Literal["table", "csv", "json", "parquet"]
MEMORY_LIMIT = "1GB"
LOCK_WAIT = 60.0  # seconds to wait while a writer registers (it holds the file briefly)


class QueryError(LcmError):
    """A refused or failed query."""


_LEADING_COMMENTS = re.compile(r"^(\s+|--[^\n]*(\n|$)|/\*.*?\*/)*", re.DOTALL)
# EXPLAIN [ANALYZE] [(options)] <statement>; ANALYZE runs the statement, so it is checked too
_EXPLAIN = re.compile(
    r"EXPLAIN\s+(?:\([^)]*\)\s*)?(?:ANALY[SZ]E\b\s*)?(?:\([^)]*\)\s*)?(?P<inner>.*)",
    re.DOTALL | re.IGNORECASE,
)


def check_sql(sql: str) -> None:
    """Exactly one statement: a SELECT, or an EXPLAIN of a SELECT."""
    statement = _one_statement(sql)
    if statement.type == duckdb.StatementType.SELECT:
        return
    if statement.type != duckdb.StatementType.EXPLAIN:
        raise QueryError(f"only SELECT and EXPLAIN queries run here, not {statement.type.name}")
    m = _EXPLAIN.fullmatch(_LEADING_COMMENTS.sub("", statement.query, count=1))
    inner = _one_statement(m.group("inner")) if m else None
    if inner is None or inner.type != duckdb.StatementType.SELECT:
        raise QueryError("EXPLAIN runs here only on a SELECT statement")


def _one_statement(sql: str) -> Any:
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as e:
        raise QueryError(f"cannot parse the query: {first_line(e)}") from e
    if len(statements) != 1:
        raise QueryError(f"expected one statement, got {len(statements)}; run them one by one")
    return statements[0]


def connect(
    db: Path | None = None,
    parts: Path | None = None,
    lock_timeout: float = LOCK_WAIT,
    sql: str | None = None,
) -> duckdb.DuckDBPyConnection:
    """A locked-down connection to ``db``'s store or to views over ``parts``. Given the
    ``sql`` it will run, views over the data files are built only if it reads them."""
    if (db is None) == (parts is None):
        raise QueryError("give a database (--db) or a parts directory (--parts)")
    if db is not None:
        if not Path(db).is_file():
            raise QueryError(f"{db}: no such database (run `lcm batch-predict` first)")
        return _catalog_connection(Path(db), lock_timeout, _needs(sql))
    return _parts_connection(Path(parts))


# What each name a query can use needs built first. A query builds only what it names (a word
# match: duckdb.get_table_names binds JOIN ... USING and fails on it; a false match only costs
# time): the views over the files glob every file of the store, and copying the catalog's
# tables costs a few milliseconds each.
_NEEDS: dict[str, set[str]] = {
    "runs": {"runs"}, "labels": {"labels"}, "run_shards": {"run_shards"},
    "skipped_images": {"skipped_images"}, "label_summaries": {"label_summaries"},
    "label_drift": {"label_drift", "label_summaries", "runs", "labels"},
    # the views over the files are built together (predictions_named needs labels)
    "predictions": {"files", "runs", "labels"}, "targets": {"files", "runs", "labels"},
    "predictions_named": {"files", "runs", "labels"}, "scored": {"files", "runs", "labels"},
    "image_labels": {"files", "runs", "labels"},
}  # fmt: skip
_NAMES = re.compile(r"\b(" + "|".join(_NEEDS) + r")\b", re.IGNORECASE)


def _needs(sql: str | None) -> set[str]:
    """The catalog tables (and ``files``, ``label_drift``) a query needs; all when unsure."""
    names = {m.lower() for m in _NAMES.findall(sql or "")}
    if not names:
        return set().union(*_NEEDS.values())
    return set().union(*(_NEEDS[n] for n in names))


def _catalog_connection(
    db: Path, lock_timeout: float, needs: set[str]
) -> duckdb.DuckDBPyConnection:
    base = {"enable_external_access": False, "memory_limit": MEMORY_LIMIT}
    hint = f"; or query its data files: --parts {store.default_parts_root(db)}"
    src = store.open_db(db, read_only=True, timeout=lock_timeout, config=base, hint=hint)
    try:
        version = store.schema_version(src)
        if version is None:
            raise QueryError(f"{db}: not a prediction store (no lcm_schema table)")
        store.check_version(version, db, writing=False)
        if version == 1:  # every row is in the file: query it as it is, locked down
            src.execute("SET lock_configuration = true")
            src, con = None, src
            return con
        root = store.data_root_of(src, db)
        files = "files" in needs
        copied = [t for t in store.CATALOG_TABLES if t in needs or (files and t == "run_shards")]
        tables = {t: src.sql(f"SELECT * FROM {t}").to_arrow_table() for t in copied}
    finally:
        if src is not None:
            src.close()
    registered = _registered_files(db, root, tables["run_shards"]) if files else []
    if files and "run_shards" not in needs:
        del tables["run_shards"]
    con = duckdb.connect(":memory:", config={"memory_limit": MEMORY_LIMIT})
    try:
        for name, table in tables.items():
            con.register("catalog_rows", table)
            con.execute(f"CREATE TABLE {name} AS SELECT * FROM catalog_rows")
            con.unregister("catalog_rows")
        # Only the data directory stays readable; set in this order, then locked.
        con.execute("SET allowed_directories = ?", [[f"{root.resolve()}/"]])
        con.execute("SET enable_external_access = false")
        if files:
            con.execute(store.views_sql(root, registered, drift="label_drift" in needs))
        elif "label_drift" in needs:
            con.execute(store.DRIFT_VIEW)
    except duckdb.Error as e:
        con.close()
        raise QueryError(f"{db}: cannot read the store's files under {root} "
                         f"({first_line(e)})") from e  # fmt: skip
    con.execute("SET lock_configuration = true")
    return con


def _registered_files(db: Path, root: Path, shards: pa.Table) -> list[str]:
    """The distinct files the catalog registers (a complete run: one), each checked to be on
    disk: a missing one is one error line, never rows silently left out."""
    files = sorted(set(shards.column("part").to_pylist()))
    missing = [f for f in files if not (root / f).is_file()]
    if missing:
        raise QueryError(f"{root / missing[0]}: registered in {db} but missing on disk "
                         f"({len(missing)} files); restore it, or remove its run with "
                         "`lcm store prune`")  # fmt: skip
    if not files:  # no run yet: the empty sentinel keeps the views' schema
        if not (root / store.SENTINEL).is_file():
            raise QueryError(f"{root}: the store's data directory is missing or empty")
        files = [store.SENTINEL]
    return files


def _parts_connection(parts: Path) -> duckdb.DuckDBPyConnection:
    if not parts.is_dir():
        raise QueryError(f"{parts}: not a directory of Parquet parts")
    root = parts.resolve()
    if set(str(root)) & set("'*?[]{}\\"):
        raise QueryError(f"{parts}: quotes and wildcards in the path are not supported here")
    # a run's own directory, a schema-1 parts root (one directory per run) or a schema-2
    # data root (run_id=<id>/run=<n>/)
    pattern = next((p for p in ("", "*/", "*/*/") if any(root.glob(f"{p}part-*.parquet"))), None)
    if pattern is None:
        raise QueryError(f"{parts}: holds no part-*.parquet files")
    con = duckdb.connect(":memory:", config={"memory_limit": MEMORY_LIMIT})
    # Only the parts directory stays readable; set in this order, then locked below.
    con.execute("SET allowed_directories = ?", [[f"{root}/"]])
    con.execute("SET enable_external_access = false")
    glob = f"{root}/{pattern}part-*.parquet"
    labels = f"{root}/{pattern}{store.LABELS_FILE}"
    try:
        con.execute(
            f"""
            CREATE VIEW predictions AS
                SELECT run_id, shard, image_key, label_id, score FROM read_parquet('{glob}');
            CREATE VIEW targets AS
                SELECT run_id, image_key, label_id, target FROM read_parquet('{glob}')
                WHERE target IS NOT NULL;
            CREATE VIEW labels AS SELECT * FROM read_parquet('{labels}');
            """
        )
        con.execute(store.VIEWS)
    except duckdb.Error as e:
        con.close()
        raise QueryError(f"{parts}: not readable as prediction parts ({first_line(e)})") from e
    con.execute("SET lock_configuration = true")
    return con


def run_query(
    sql: str,
    db: Path | None = None,
    parts: Path | None = None,
    limit: int | None = None,
    lock_timeout: float = LOCK_WAIT,
) -> tuple[pa.Table, bool]:
    """The result (at most ``limit`` rows) and whether rows were left out by the limit."""
    check_sql(sql)
    con = connect(db, parts, lock_timeout, sql)
    try:
        try:
            reader = con.sql(sql).to_arrow_reader()
        except duckdb.Error as e:
            raise QueryError(f"query failed: {first_line(e)}") from e
        batches, n, more = [], 0, False
        try:  # errors can also surface while rows stream (a failed cast in row 50,000)
            for batch in reader:
                if limit is not None and n + batch.num_rows > limit:
                    batches.append(batch.slice(0, limit - n))
                    more = True
                    break
                batches.append(batch)
                n += batch.num_rows
        except (OSError, pa.ArrowException, duckdb.Error) as e:
            raise QueryError(f"query failed: {first_line(e)}") from e
        return pa.Table.from_batches(batches, schema=reader.schema), more
    finally:
        con.close()


def encode(table: pa.Table, fmt: Format) -> bytes:
    """csv, json (one JSON object per row) or parquet bytes of a result."""
    if fmt == "csv":
        sink = io.BytesIO()
        pcsv.write_csv(table, sink)
        return sink.getvalue()
    if fmt == "json":
        import json

        rows = table.to_pylist()
        return "".join(json.dumps(r, default=str) + "\n" for r in rows).encode()
    if fmt == "parquet":
        sink = io.BytesIO()
        pq.write_table(table, sink)
        return sink.getvalue()
    raise QueryError(f"unknown format {fmt!r}; expected table, csv, json or parquet")
