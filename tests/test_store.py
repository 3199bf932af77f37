"""The prediction store's writer: schema, idempotent merges, and waiting for another process."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lcm import store
from lcm.errors import DataError
from lcm.predict import part_table, write_part
from lcm.summaries import summarize
from tests._predict_fixtures import fetch

RUN = store.RunRecord(
    "r", "model", "sha256:m", "raw", "shards", "s", "sha256:s", 2, 32, {}, "test", None
)
LABELS = [("a", 0.5), ("b", 0.25), ("c", 0.75)]


def make_part(run_dir, shard, keys, seed):
    rng = np.random.default_rng(seed)
    scores = [rng.random((len(keys), 3), dtype=np.float32)]
    targets = [rng.integers(-1, 2, (len(keys), 3)).astype(np.float32)]
    table = part_table("r", shard, keys, scores, targets, 3)
    path = run_dir / f"part-{shard}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_part(path, table)
    n_rows = 3 * len(keys)
    record = store.PartRecord("r", shard, str(path), len(keys), (("bad", "why"),), n_rows, "w", 0.1)
    return record, scores[0], targets[0]


def test_registering_a_part_twice_is_a_noop_and_replace_swaps_at_once(tmp_path):
    db = tmp_path / "p.duckdb"
    with store.writer(db, 0) as con:
        ordinal, replaced = store.create_run(con, RUN, LABELS, "default 0.5")
        root = store.data_root_of(con, db)
    assert (ordinal, replaced) == (1, None) and root == store.default_parts_root(db).resolve()
    run_dir = store.run_dir(root, "r", ordinal)
    p0, s0, t0 = make_part(run_dir, "s0", ["k0", "k1"], 0)
    p1, s1, t1 = make_part(run_dir, "s1", ["k2"], 1)
    with store.writer(db, 0) as con:
        # s0 again, as after a crash between registration and finish
        assert store.register_parts(con, [p0], root) == 1
        assert store.register_parts(con, [p1, p0, p1], root) == 1
        files = [root / r[0] for r in con.execute("SELECT part FROM run_shards").fetchall()]
        sums = summarize("r", files, np.array([t for _, t in LABELS]))
        run = store.finish_run(con, "r", sums)
    assert (run["status"], run["n_images"], run["n_skipped"]) == ("complete", 3, 2)
    assert fetch(db, "SELECT count(*) FROM predictions")[0][0] == 9
    assert fetch(db, "SELECT count(*) FROM targets")[0][0] == 9
    assert fetch(db, "SELECT count(*) FROM run_shards")[0][0] == 2
    rows = fetch(db, "SELECT label_id, score FROM predictions WHERE image_key = 'k1'")
    assert sorted(rows) == [(c, pytest.approx(float(s0[1, c]))) for c in range(3)]
    assert fetch(
        db, "SELECT name, predicted FROM predictions_named WHERE image_key = 'k0' ORDER BY label_id"
    ) == [(n, bool(s0[0, c] >= t)) for c, (n, t) in enumerate(LABELS)]
    # a file under a run the catalog does not know is never visible
    make_part(store.run_dir(root, "r", 7), "stray", ["x"], 2)
    assert fetch(db, "SELECT count(*) FROM predictions")[0][0] == 9
    with store.writer(db, 0) as con:  # the run again from scratch: old rows gone at once
        assert store.create_run(con, RUN, LABELS, "default 0.5") == (2, 1)
    assert fetch(db, "SELECT count(*) FROM predictions")[0][0] == 0
    assert fetch(db, "SELECT run_ordinal, status FROM runs") == [(2, "running")]


def test_register_refuses_a_file_that_is_not_what_the_task_wrote(tmp_path):
    db = tmp_path / "p.duckdb"
    with store.writer(db, 0) as con:
        store.create_run(con, RUN, LABELS, "default 0.5")
        root = store.data_root_of(con, db)
        part, *_ = make_part(store.run_dir(root, "r", 1), "s0", ["k0", "k1"], 0)
        with pytest.raises(DataError, match="6 rows, the scoring task wrote 7"):
            store.register_parts(con, [dataclasses.replace(part, n_rows=7)], root)
        outside, *_ = make_part(tmp_path / "elsewhere", "s0", ["k0", "k1"], 0)
        with pytest.raises(DataError, match="outside the store's data root"):
            store.register_parts(con, [part, outside], root)
        Path(part.path).write_bytes(b"torn")
        with pytest.raises(DataError, match="cannot read this data file"):
            store.register_parts(con, [part], root)
        assert con.execute("SELECT count(*) FROM run_shards").fetchone() == (0,)


def test_writer_waits_for_a_lock_then_names_the_holder(tmp_path):
    db = tmp_path / "p.duckdb"
    with store.writer(db, 0):
        pass
    code = (
        "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); print('ready', flush=True);"
        "time.sleep(float(sys.argv[2]))"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(db), "60"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        t0 = time.monotonic()
        with (
            pytest.raises(store.StoreLockedError, match=f"PID {holder.pid}") as err,
            store.writer(db, 1.0),
        ):
            pass
        assert err.value.pid == holder.pid and time.monotonic() - t0 >= 1.0
    finally:
        holder.kill()
        holder.wait()
    brief = subprocess.Popen(
        [sys.executable, "-c", code, str(db), "1.5"], stdout=subprocess.PIPE, text=True
    )
    assert brief.stdout.readline().strip() == "ready"
    with store.writer(db, 30) as con:  # waits for the holder to finish, then writes
        assert con.execute("SELECT count(*) FROM runs").fetchone() == (0,)
    brief.wait()


def test_not_a_database_and_another_schema_are_one_line_errors(tmp_path):
    junk = tmp_path / "junk.duckdb"
    junk.write_text("not a database")
    with (
        pytest.raises(DataError, match="junk.duckdb: cannot open as a DuckDB database"),
        store.writer(junk, 0),
    ):
        pass
    db = tmp_path / "p.duckdb"
    with store.writer(db, 0) as con:
        con.execute("UPDATE lcm_schema SET version = 99")
    with pytest.raises(DataError, match="schema version 99 is newer"), store.writer(db, 0):
        pass
    with store.writer(tmp_path / "q.duckdb", 0) as con:
        con.execute("UPDATE lcm_schema SET version = 1")
    with (
        pytest.raises(DataError, match="version 1.*lcm store migrate"),
        store.writer(tmp_path / "q.duckdb", 0),
    ):
        pass
    with store.writer(tmp_path / "r.duckdb", 0):
        pass
    with (
        pytest.raises(DataError, match="files live in .* not .*--parts"),
        store.writer(tmp_path / "r.duckdb", 0, tmp_path / "other"),
    ):
        pass
