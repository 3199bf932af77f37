"""`lcm query`: read-only in fact, the output formats, and a database held by a writer."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from lcm.query import QueryError, check_sql, run_query
from lcm.store import default_parts_root
from tests._engine_fixtures import cli_env, lcm_cmd
from tests._predict_fixtures import fetch

FIRST = "SELECT image_key, label_id, score FROM predictions ORDER BY image_key, label_id LIMIT 6"


@pytest.fixture(scope="module")
def db(tmp_path_factory, trained, prefect_harness):
    from flows.predict import batch_predict

    path = tmp_path_factory.mktemp("query") / "p.duckdb"
    batch_predict(
        checkpoint=str(trained.model),
        db=str(path),
        run_id="r",
        shards=str(trained.shards),
        num_workers=0,
        device="cpu",
    )
    return path


def lcm_query(tmp_path, *args):
    return subprocess.run(
        lcm_cmd("query", *args), env=cli_env(tmp_path), capture_output=True, text=True
    )


def fingerprint(path):
    files = sorted(p for p in path.parent.iterdir() if p.name.startswith(path.name))
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.mark.parametrize(
    "sql",
    [
        "DELETE FROM predictions",
        "CREATE TABLE x AS SELECT 1",
        "COPY predictions TO '{tmp}/out.csv'",
        "ATTACH '{tmp}/other.duckdb'",
        "SELECT * FROM read_csv('/etc/passwd')",
        "SELECT 1; DELETE FROM predictions",
        "EXPLAIN ANALYZE COPY predictions TO '{tmp}/out.csv'",
        "EXPLAIN (ANALYZE) DELETE FROM predictions",
        "SELECT * FROM read_parquet('{tmp}/../*.parquet')",
    ],
)
def test_refused_statements_exit_1_with_one_line_and_change_nothing(db, tmp_path, sql):
    sql = sql.format(tmp=tmp_path)
    before, rows = fingerprint(db), fetch(db, "SELECT count(*) FROM predictions")
    res = lcm_query(tmp_path, "--db", str(db), sql)
    assert res.returncode == 1
    assert len(res.stderr.strip().splitlines()) == 1 and "error:" in res.stderr, res.stderr
    assert fingerprint(db) == before and fetch(db, "SELECT count(*) FROM predictions") == rows
    assert not any(tmp_path.glob("out.csv")) and not any(tmp_path.glob("other.duckdb"))


def test_only_one_select_or_explain_passes_the_parser():
    check_sql("WITH t AS (SELECT 1 AS a) SELECT * FROM t")
    check_sql("EXPLAIN SELECT 1")
    for sql in ("PRAGMA version", "SET threads = 1", "CALL pragma_version()", "INSTALL httpfs"):
        with pytest.raises(QueryError):
            check_sql(sql)


def test_csv_json_parquet_hold_the_right_values(db, tmp_path):
    expected = fetch(db, FIRST)
    res = lcm_query(tmp_path, "--db", str(db), FIRST, "--format", "csv")
    assert res.returncode == 0, res.stderr
    rows = list(csv.DictReader(io.StringIO(res.stdout)))
    assert [(r["image_key"], int(r["label_id"]), float(r["score"])) for r in rows] == [
        (k, c, pytest.approx(s, abs=1e-6)) for k, c, s in expected
    ]
    res = lcm_query(tmp_path, "--db", str(db), FIRST, "--format", "json")
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert [(r["image_key"], r["label_id"]) for r in rows] == [(k, c) for k, c, _ in expected]
    assert [r["score"] for r in rows] == pytest.approx([s for *_, s in expected], abs=1e-6)
    out = tmp_path / "r.parquet"
    res = lcm_query(tmp_path, "--db", str(db), FIRST, "--format", "parquet", "--out", str(out))
    assert res.returncode == 0, res.stderr
    table = pq.read_table(out)
    assert list(zip(*table.to_pydict().values(), strict=True)) == expected  # float32 exact

    shown = lcm_query(tmp_path, "--db", str(db), FIRST)  # a table for people
    assert shown.returncode == 0 and expected[0][0] in shown.stdout
    assert "6 rows" in shown.stderr


def test_a_writer_holding_the_file_is_named_and_parts_still_answer(db, tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import duckdb, sys; c = duckdb.connect(sys.argv[1]); "
            "print('ready', flush=True); sys.stdin.read()",
            str(db),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        res = lcm_query(tmp_path, "--db", str(db), "SELECT count(*) FROM predictions",
                        "--lock-timeout", "1")  # fmt: skip
        assert res.returncode == 1
        assert f"PID {holder.pid}" in res.stderr and "--parts" in res.stderr, res.stderr
        parts = default_parts_root(db)
        sql = "SELECT count(*) AS n, count(DISTINCT image_key) AS k FROM predictions_named"
        table, _ = run_query(sql, parts=parts)
        assert table.to_pylist() == [{"n": 32 * 4, "k": 32}]
        res = lcm_query(tmp_path, "--parts", str(parts), sql, "--format", "csv")
        assert res.returncode == 0 and res.stdout.splitlines()[1] == "128,32", res.stderr
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    parts = default_parts_root(db)
    with pytest.raises(QueryError, match="disabled by configuration"):
        run_query("SELECT * FROM read_csv('/etc/passwd')", parts=parts)
    before = sorted(p.name for p in parts.rglob("*"))
    evil = parts / "r" / "part-evil.parquet"
    with pytest.raises(QueryError, match="only on a SELECT"):  # ANALYZE would run the COPY
        run_query(f"EXPLAIN ANALYZE COPY (SELECT 1) TO '{evil}'", parts=parts)
    assert sorted(p.name for p in parts.rglob("*")) == before
