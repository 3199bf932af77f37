"""The store at scale: schema-1 files read and migrated, summaries against the rows, readers
beside a writer, prune and compact under SIGKILL, and bad input."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from datetime import date

import numpy as np
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import average_precision_score

from lcm import store
from lcm.errors import ConfigError, DataError
from lcm.query import QueryError, run_query
from lcm.store_admin import compact, migrate, prune
from tests._engine_fixtures import ROOT, cli_env, lcm_cmd
from tests._store_fixtures import LABELS, add_run, nightly_store, v1_store, worked_queries


def rows(db, sql):
    return run_query(sql, db=db)[0].to_pylist()


def fingerprint(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


# ----------------------------------------------------------------------------------- schema 1
def test_a_schema_1_store_is_read_as_it_is_then_migrated_with_the_same_answers(tmp_path):
    db = v1_store(tmp_path / "s.duckdb")
    queries = worked_queries(ROOT)
    before = {title: rows(db, sql) for title, sql in queries}
    assert all(before.values()) and len(before) == 5  # every worked query answers
    with pytest.raises(DataError, match="version 1.*lcm store migrate"), store.writer(db, 0):
        pass
    done = migrate(db)
    assert (done.runs, done.rows) == (2, 2 * 16 * 27)
    assert (tmp_path / "s.duckdb.v1").is_file()  # the schema-1 bytes stay reachable
    after = {title: rows(db, sql) for title, sql in queries}
    assert after == before
    assert rows(db, "SELECT run_id, run_ordinal, status FROM runs ORDER BY 2") == [
        {"run_id": "raw", "run_ordinal": 1, "status": "complete"},
        {"run_id": "ema", "run_ordinal": 2, "status": "complete"}]  # fmt: skip
    assert rows(db, "SELECT count(*) AS n FROM label_summaries") == [{"n": 2 * 27}]
    with pytest.raises(ConfigError, match="already schema version 2"):
        migrate(db)


# -------------------------------------------------------------------------------- summaries
def test_summaries_equal_the_aggregates_of_the_rows(tmp_path):
    db = tmp_path / "s.duckdb"
    add_run(db, "r", n_shards=4, per_shard=25, seed=3)
    sums = rows(db, "SELECT * FROM label_summaries ORDER BY label_id")
    scored = rows(db, "SELECT label_id, score, threshold, target FROM scored")
    for c, (_, threshold) in enumerate(LABELS):
        mine = [r for r in scored if r["label_id"] == c]
        s = np.array([r["score"] for r in mine])
        t = np.array([r["target"] for r in mine])
        row = sums[c]
        assert row["images"] == len(mine) and row["predicted"] == int((s >= threshold).sum())
        assert row["mean_score"] == pytest.approx(s.astype(np.float64).mean(), abs=1e-9)
        bins = np.minimum((s.astype(np.float64) * 20).astype(int), 19)
        assert row["histogram"] == np.bincount(bins, minlength=20).tolist()
        assert row["positives"] == int((t == 1).sum()) and row["negatives"] == int((t == 0).sum())
        assert row["true_positives"] == int(((t == 1) & (s >= threshold)).sum())
        known = t >= 0
        assert row["ap"] == pytest.approx(average_precision_score(t[known], s[known]), abs=1e-12)


def test_label_drift_compares_each_run_with_the_previous_of_its_source_and_model(tmp_path):
    db = tmp_path / "s.duckdb"
    nightly_store(db, 3)
    add_run(db, "other", source="elsewhere", seed=9, run_date=date(2026, 1, 5))
    drift = rows(db, "SELECT run_id, previous_run_id, label_id, rate, previous_rate, "
                     "rate_change, psi FROM label_drift ORDER BY run_id, label_id")  # fmt: skip
    assert [(r["run_id"], r["previous_run_id"]) for r in drift[::3]] == [
        ("night-001", "night-000"), ("night-002", "night-001")]  # fmt: skip
    sums = {(r["run_id"], r["label_id"]): r for r in rows(db, "SELECT * FROM label_summaries")}
    for r in drift:
        now, then = sums[(r["run_id"], r["label_id"])], sums[(r["previous_run_id"], r["label_id"])]
        assert r["rate"] == pytest.approx(now["predicted"] / now["images"])
        assert r["rate_change"] == pytest.approx(r["rate"] - then["predicted"] / then["images"])
        p = np.array(now["histogram"]) / now["images"] + 1e-4
        q = np.array(then["histogram"]) / then["images"] + 1e-4
        assert r["psi"] == pytest.approx(float(((p - q) * np.log(p / q)).sum()))


# ---------------------------------------------------------------------------------- readers
WRITER = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {root!r})
    from pathlib import Path
    from tests._store_fixtures import add_run
    import lcm.store as store

    opened = store.writer
    def writer(*args):  # each registration in its own short connection, a beat apart
        time.sleep(0.3)
        return opened(*args)
    store.writer = writer
    print("start", flush=True)
    add_run(Path(sys.argv[1]), "new", n_shards=12, per_shard=5, seed=1)
    print("done", flush=True)
    """
)


@pytest.mark.slow
def test_queries_answer_while_another_process_registers_shards(tmp_path):
    db = tmp_path / "s.duckdb"
    add_run(db, "old", n_shards=2, per_shard=5)
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(root=str(ROOT)))
    writer = subprocess.Popen([sys.executable, str(script), str(db)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert writer.stdout.readline().strip() == "start"
        seen = []
        while True:  # one more query after the writer has exited, then stop
            ended = writer.poll() is not None
            n = rows(db, "SELECT count(*) AS n FROM predictions WHERE run_id = 'new'")[0]["n"]
            assert n % (5 * 3) == 0, n  # whole shards only
            seen.append(n)
            if ended:
                break
            time.sleep(0.02)  # a reader that queries, not one that holds the file without end
        assert writer.wait(timeout=60) == 0, writer.stderr.read()[-2000:]
    finally:
        writer.kill()
    assert seen == sorted(seen) and seen[-1] == 12 * 5 * 3
    assert len(set(seen)) > 2, seen  # the queries saw the run grow shard by shard


# ------------------------------------------------------------------------------------- prune
def test_prune_removes_whole_complete_runs_and_gives_the_space_back(tmp_path):
    db = tmp_path / "s.duckdb"
    runs = nightly_store(db, 4)
    add_run(db, "writing", finish=False, run_date=date(2025, 1, 1))  # oldest, but running
    root = store.default_parts_root(db)
    before = fingerprint(root)
    plan = prune(db, keep_runs=1, dry_run=True)
    assert plan.runs == ["night-002", "night-001", "night-000"]
    assert fingerprint(root) == before  # a dry run changes nothing
    sizes = {r["run_id"]: sum(f.stat().st_size for f in store.run_dir(
        root, r["run_id"], r["run_ordinal"]).rglob("*")) for r in runs}  # fmt: skip
    done = prune(db, keep_runs=1)
    assert done.bytes_freed >= 0.9 * sum(sizes[r] for r in done.runs)
    for r in runs[:3]:
        assert not store.run_dir(root, r["run_id"], r["run_ordinal"]).exists()
    left = rows(db, "SELECT run_id, status FROM runs ORDER BY run_id")
    assert left == [{"run_id": "night-003", "status": "complete"},
                    {"run_id": "writing", "status": "running"}]  # fmt: skip
    assert rows(db, "SELECT DISTINCT run_id FROM predictions ORDER BY 1") == [
        {"run_id": "night-003"}, {"run_id": "writing"}]  # fmt: skip
    by_days = prune(db, keep_days=0, today=date(2026, 1, 4))  # night-003 is 2026-01-04
    assert by_days.runs == []
    assert prune(db, keep_days=0, today=date(2026, 1, 5)).runs == ["night-003"]


KILL_PRUNE = textwrap.dedent(
    """
    import os, shutil, signal, sys
    sys.path.insert(0, {root!r})
    import lcm.store, lcm.store_admin

    point = sys.argv[1]
    if point == "forgotten":  # the catalog forgot a run, its directory is still there
        real = lcm.store.delete_run
        def delete(*a):
            real(*a)
            os.kill(os.getpid(), signal.SIGKILL)
        lcm.store.delete_run = delete
    elif point == "half-deleted":  # the directory half gone
        real_rm = shutil.rmtree
        def rmtree(path, ignore_errors=False):
            files = sorted(p for p in __import__("pathlib").Path(path).rglob("*.parquet"))
            files[0].unlink()
            os.kill(os.getpid(), signal.SIGKILL)
        lcm.store_admin.shutil.rmtree = rmtree
    from cli import app
    app(sys.argv[2:], prog_name="lcm")
    """
)


def check_whole_or_gone(db):
    """Every run in the catalog has all its files and rows; no run's rows without it."""
    runs = rows(db, "SELECT run_id, n_shards, n_images FROM runs")
    counts = {r["run_id"]: r["n"] for r in rows(
        db, "SELECT run_id, count(*) AS n FROM predictions GROUP BY run_id")}  # fmt: skip
    assert set(counts) <= {r["run_id"] for r in runs}
    for r in runs:
        assert counts.get(r["run_id"]) == r["n_images"] * len(LABELS), r


@pytest.mark.slow
def test_prune_killed_at_any_point_leaves_runs_whole_or_gone(tmp_path):
    db = tmp_path / "s.duckdb"
    nightly_store(db, 8)
    root = store.default_parts_root(db)
    env = cli_env(tmp_path)
    script = tmp_path / "kill.py"
    script.write_text(KILL_PRUNE.format(root=str(ROOT)))
    for point, keep in (("forgotten", 6), ("half-deleted", 5)):
        cmd = [sys.executable, str(script), point, "store", "prune", "--db", str(db),
               "--keep-runs", str(keep)]  # fmt: skip
        assert subprocess.run(cmd, env=env, capture_output=True).returncode == -9
        check_whole_or_gone(db)
    rng = random.Random(0)
    for keep in (4, 3, 2):  # and at random moments of a plain prune
        proc = subprocess.Popen(lcm_cmd("store", "prune", "--db", str(db), "--keep-runs",
                                        str(keep)), env=env)  # fmt: skip
        time.sleep(rng.uniform(0.5, 2.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        check_whole_or_gone(db)
    done = subprocess.run(lcm_cmd("store", "prune", "--db", str(db), "--keep-runs", "2"),
                          env=env, capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    check_whole_or_gone(db)
    ordinals = {r["run_ordinal"] for r in rows(db, "SELECT run_ordinal FROM runs")}
    on_disk = {int(p.name.split("=")[1]) for p in root.glob("run_id=*/run=*")} - {0}
    assert on_disk == ordinals  # no orphaned directory left
    assert len(ordinals) == 2


# ----------------------------------------------------------------------------------- compact
KILL_COMPACT = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {root!r})
    import lcm.store_admin as admin

    if sys.argv[1] == "written":  # the new files written, the run not yet pointed at them
        real = admin._catalog
        calls = []
        class Once(real):
            def __enter__(self):
                calls.append(1)
                if len(calls) == 2:
                    os.kill(os.getpid(), signal.SIGKILL)
                return super().__enter__()
        admin._catalog = Once
    else:  # swapped, the old directory not yet removed
        admin.shutil.rmtree = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    from cli import app
    app(sys.argv[2:], prog_name="lcm")
    """
)


@pytest.mark.slow
def test_compact_keeps_every_row_and_is_safe_to_kill(tmp_path):
    db = tmp_path / "s.duckdb"
    add_run(db, "r", n_shards=6, per_shard=7, seed=4)
    add_run(db, "writing", finish=False)
    everything = "SELECT run_id, shard, image_key, label_id, score FROM predictions ORDER BY ALL"
    before = rows(db, everything)
    scored_before = rows(db, "SELECT * FROM scored ORDER BY ALL")
    script = tmp_path / "kill.py"
    script.write_text(KILL_COMPACT.format(root=str(ROOT)))
    for point in ("written", "swapped"):
        cmd = [sys.executable, str(script), point, "store", "compact", "--db", str(db),
               "--run-id", "r"]  # fmt: skip
        assert subprocess.run(cmd, env=cli_env(tmp_path), capture_output=True).returncode == -9
        assert rows(db, everything) == before
    # the kill after the swap left the run compacted; compact it again, in small row groups
    done = compact(db, "r", rows_per_group=20)
    assert (done.files_before, done.files_after) == (1, 1)
    ordinal = rows(db, "SELECT run_ordinal FROM runs WHERE run_id = 'r'")[0]["run_ordinal"]
    file = store.run_dir(store.default_parts_root(db), "r", ordinal) / "part-run.parquet"
    meta = pq.ParquetFile(file).metadata
    assert meta.num_row_groups == 7  # 126 rows by label then score
    assert pq.read_table(file).column("label_id").to_pylist() == sorted(
        pq.read_table(file).column("label_id").to_pylist()
    )
    assert rows(db, everything) == before
    assert rows(db, "SELECT * FROM scored ORDER BY ALL") == scored_before
    with pytest.raises(ConfigError, match="still being written"):
        compact(db, "writing")
    prune(db, keep_runs=10)  # clears the orphans the kills left
    root = store.default_parts_root(db)
    ordinals = {r["run_ordinal"] for r in rows(db, "SELECT run_ordinal FROM runs")}
    assert {int(p.name.split("=")[1]) for p in root.glob("run_id=*/run=*")} - {0} == ordinals


# --------------------------------------------------------------------------------- bad input
def test_bad_stores_are_one_line_errors_and_change_nothing(tmp_path):
    env = cli_env(tmp_path)

    def lcm_query(db, sql="SELECT count(*) FROM predictions"):
        return subprocess.run(lcm_cmd("query", "--db", str(db), sql), env=env,
                              capture_output=True, text=True)  # fmt: skip

    folder = tmp_path / "folder.duckdb"
    folder.mkdir()
    done = lcm_query(folder)
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1
    assert "no such database" in done.stderr

    db = tmp_path / "s.duckdb"
    add_run(db, "r")
    root = store.default_parts_root(db)
    victim = next(root.glob("run_id=r/run=1/part-shard-1.parquet"))
    data = victim.read_bytes()
    victim.unlink()
    snapshot = fingerprint(tmp_path)
    done = lcm_query(db)
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1
    assert "part-shard-1.parquet: registered in" in done.stderr and "missing" in done.stderr
    with pytest.raises(QueryError, match="missing on disk"):
        run_query("SELECT * FROM scored", db=db)
    assert lcm_query(db, "SELECT count(*) FROM runs").returncode == 0  # the catalog alone
    assert fingerprint(tmp_path) == snapshot
    victim.write_bytes(data)

    with store.writer(db, 0) as con:
        con.execute("UPDATE lcm_schema SET version = 3")
    snapshot = fingerprint(tmp_path)
    for cmd in (lcm_cmd("query", "--db", str(db), "SELECT 1"),
                lcm_cmd("store", "prune", "--db", str(db), "--keep-runs", "0"),
                lcm_cmd("store", "migrate", "--db", str(db))):  # fmt: skip
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert "schema version 3 is newer" in done.stderr
    assert fingerprint(tmp_path) == snapshot
    assert os.path.getsize(db) > 0
