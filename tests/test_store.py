"""The prediction store's writer: schema, idempotent merges, and waiting for another process."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest

from lcm import store
from lcm.errors import DataError
from lcm.predict import part_table, write_part
from tests._predict_fixtures import fetch

RUN = store.RunRecord(
    "r", "model", "sha256:m", "raw", "shards", "s", "sha256:s", 2, 32, {}, "test", None
)
LABELS = [("a", 0.5), ("b", 0.25), ("c", 0.75)]


def make_part(tmp_path, shard, keys, seed):
    rng = np.random.default_rng(seed)
    scores = [rng.random((len(keys), 3), dtype=np.float32)]
    targets = [rng.integers(-1, 2, (len(keys), 3)).astype(np.float32)]
    table = part_table("r", shard, keys, scores, targets, 3)
    path = tmp_path / f"part-{shard}.parquet"
    write_part(path, table)
    record = store.PartRecord("r", shard, str(path), len(keys), (("bad", "why"),), 9, "w", 0.1)
    return record, scores[0]


def test_merging_a_part_twice_replaces_it(tmp_path):
    db = tmp_path / "p.duckdb"
    p0, s0 = make_part(tmp_path, "s0", ["k0", "k1"], 0)
    p1, _ = make_part(tmp_path, "s1", ["k2"], 1)
    with store.writer(db, 0) as con:
        store.create_run(con, RUN, LABELS, "default 0.5")
        for part in (p0, p1, p0):  # s0 again, as after a crash between merge and finish
            store.merge_part(con, part)
        run = store.finish_run(con, "r")
    assert (run["status"], run["n_images"], run["n_skipped"]) == ("complete", 3, 2)
    assert fetch(db, "SELECT count(*) FROM predictions")[0][0] == 9
    assert fetch(db, "SELECT count(*) FROM targets")[0][0] == 9
    assert fetch(db, "SELECT count(*) FROM run_shards")[0][0] == 2
    rows = fetch(db, "SELECT label_id, score FROM predictions WHERE image_key = 'k1'")
    assert sorted(rows) == [(c, pytest.approx(float(s0[1, c]))) for c in range(3)]
    assert fetch(
        db, "SELECT name, predicted FROM predictions_named WHERE image_key = 'k0' ORDER BY label_id"
    ) == [(n, bool(s0[0, c] >= t)) for c, (n, t) in enumerate(LABELS)]
    with store.writer(db, 0) as con:  # the run again from scratch: old rows gone at once
        store.create_run(con, RUN, LABELS, "default 0.5")
    assert fetch(db, "SELECT count(*) FROM predictions")[0][0] == 0


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
    with pytest.raises(DataError, match="schema version 99"), store.writer(db, 0):
        pass
