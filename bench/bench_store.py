"""A year of nightly batch predictions, in the schema-1 layout and in today's, side by side.

    python bench/bench_store.py --nights 365 --images-per-night 40504 --labels 80
    python bench/bench_store.py --nights 20 --images-per-night 4000     # a quick look

Each night gets synthetic scores (no model: the store is what is measured) for the same image
keys, cut into shards of ``--shard-size`` images, and goes through both write paths:

- schema 1 (the layout before schema 2, reproduced here from its code): one DuckDB file;
  each shard's Parquet part merged by one writer in its own transaction (insert from the
  part, then its ``run_shards`` row); the parts stay beside the file, as they did;
- schema 2 (``lcm.store``): the parts written by the real part writer into the run's
  directory, then :func:`lcm.predict.run.complete_run`, as batch prediction calls it: each
  part registered, the run's files consolidated into one, its summaries, the run completed.

"Append" is the time from a night's parts on disk to its run complete (both layouts write the
same parts first, as scoring tasks do). At the checkpoint nights it is reported for both, with
the bytes per prediction row. After the last night the five questions of the store issue are
asked of both through ``lcm.query.run_query`` (the path `lcm query` takes), each three times
(the median is reported, the first call beside it), then the oldest run is deleted from both,
then the newest 30 runs of the new layout are compacted (sorted by label) and the top-100
question asked again.
Everything lives in a temporary directory (``--workdir``) that is removed at the end; results
go to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.timing import progress  # noqa: E402
from lcm import store  # noqa: E402
from lcm.predict.parts import part_table, write_part  # noqa: E402
from lcm.predict.run import complete_run  # noqa: E402
from lcm.query import run_query  # noqa: E402
from lcm.store_admin import compact, prune  # noqa: E402

# Schema 1, as lcm.store wrote it before schema 2 (tables and the merge of one part).
V1_TABLES = """
CREATE TABLE lcm_schema (version INTEGER NOT NULL, created_at TIMESTAMP NOT NULL);
CREATE TABLE runs (run_id VARCHAR PRIMARY KEY, status VARCHAR NOT NULL, created_at TIMESTAMP,
    finished_at TIMESTAMP, n_images BIGINT);
CREATE TABLE labels (run_id VARCHAR NOT NULL, label_id SMALLINT NOT NULL, name VARCHAR NOT NULL,
    threshold DOUBLE NOT NULL, threshold_source VARCHAR NOT NULL, PRIMARY KEY (run_id, label_id));
CREATE TABLE predictions (run_id VARCHAR NOT NULL, shard VARCHAR NOT NULL,
    image_key VARCHAR NOT NULL, label_id SMALLINT NOT NULL, score REAL NOT NULL);
CREATE TABLE targets (run_id VARCHAR NOT NULL, image_key VARCHAR NOT NULL,
    label_id SMALLINT NOT NULL, target TINYINT NOT NULL);
CREATE TABLE run_shards (run_id VARCHAR NOT NULL, shard VARCHAR NOT NULL, n_rows BIGINT,
    part VARCHAR, committed_at TIMESTAMP);
INSERT INTO lcm_schema VALUES (1, now());
"""


def v1_append(db: Path, run_id: str, parts: list[tuple[str, Path]], labels: pa.Table) -> None:
    con = duckdb.connect(str(db), config={"memory_limit": store.MEMORY_LIMIT})
    try:
        con.execute("INSERT INTO runs VALUES (?, 'running', now(), NULL, NULL)", [run_id])
        con.register("label_rows", labels)
        con.execute("INSERT INTO labels SELECT * FROM label_rows")
        con.unregister("label_rows")
        for shard, path in parts:
            con.register("part_rows", pq.read_table(path))
            con.execute("BEGIN TRANSACTION")
            merged = con.execute("SELECT count(*) FROM run_shards WHERE run_id = ? AND shard = ?",
                                 [run_id, shard]).fetchall()[0][0]  # fmt: skip
            if merged:  # never on a fresh night; the check costs what it cost then
                con.execute("DELETE FROM predictions WHERE run_id = ? AND shard = ?",
                            [run_id, shard])  # fmt: skip
            con.execute("INSERT INTO predictions SELECT run_id, shard, image_key, label_id, score "
                        "FROM part_rows")  # fmt: skip
            con.execute("INSERT INTO targets SELECT run_id, image_key, label_id, target "
                        "FROM part_rows WHERE target IS NOT NULL")  # fmt: skip
            con.execute("INSERT INTO run_shards VALUES (?, ?, ?, ?, now())",
                        [run_id, shard, 0, str(path)])  # fmt: skip
            con.execute("COMMIT")
            con.unregister("part_rows")
        con.execute("UPDATE runs SET status = 'complete', finished_at = now() WHERE run_id = ?",
                    [run_id])  # fmt: skip
    finally:
        con.close()


def v2_append(db: Path, run_id: str, parts: list[store.PartRecord]) -> None:
    complete_run(db, run_id, parts, "sha256:m")  # registration, one file, summaries


def night_scores(rng: np.random.Generator, n: int, c: int) -> np.ndarray:
    """Scores as a trained multi-label model gives them: mostly near 0, a few near 1."""
    return rng.beta(0.25, 4.0, size=(n, c)).astype(np.float32)


def timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def ask(db: Path, sql: str, repeats: int = 3) -> dict[str, Any]:
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result, _ = run_query(sql, db=db)
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "first_s": times[0], "rows": result.num_rows}


def size_of(paths: list[Path]) -> int:
    total = 0
    for p in paths:
        if p.is_file():
            total += p.stat().st_size
        elif p.is_dir():
            total += sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--nights", type=int, default=365)
    ap.add_argument("--images-per-night", type=int, default=40504)
    ap.add_argument("--labels", type=int, default=80)
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--checkpoints", default="1,30,90,180,365", help="nights to report")
    ap.add_argument("--workdir", type=Path, default=None, help="[default: a temporary dir]")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "store.json")
    ap.add_argument("--schema2-only", action="store_true", help="skip schema 1 (no ratios)")
    args = ap.parse_args()
    v1 = not args.schema2_only
    work = Path(tempfile.mkdtemp(prefix="bench-store-", dir=args.workdir))
    checkpoints = {int(x) for x in args.checkpoints.split(",") if int(x) <= args.nights}
    checkpoints.add(args.nights)
    n, c = args.images_per_night, args.labels
    keys = [f"COCO_val2014_{i:012d}" for i in range(n)]
    names = [f"label{j:02d}" for j in range(c)]
    thresholds = np.linspace(0.3, 0.7, c)
    v1_db, v2_db = work / "v1" / "store.duckdb", work / "v2" / "store.duckdb"
    v1_db.parent.mkdir(parents=True)
    con = duckdb.connect(str(v1_db))
    con.execute(V1_TABLES)
    con.execute(store.VIEWS)  # the same views over the tables
    con.close()
    with store.writer(v2_db, 0):
        pass
    report: dict[str, Any] = {"settings": vars(args) | {"out": str(args.out), "workdir": str(work)},
                              "nights": []}  # fmt: skip
    rng = np.random.default_rng(0)
    start = date(2026, 1, 1)
    rows_total = 0
    try:
        for night in range(1, args.nights + 1):
            run_id = f"scheduled-{start + timedelta(days=night - 1):%Y-%m-%d}"
            scores = night_scores(rng, n, c)
            v1_parts, v2_parts = [], []
            record = store.RunRecord(run_id, "model", "sha256:m", "raw", "images", "/data/coco",
                                     f"sha256:{night}", -(-n // args.shard_size), 448, {}, "bench",
                                     None, start + timedelta(days=night - 1))  # fmt: skip
            label_list = list(zip(names, thresholds.tolist(), strict=True))
            with store.writer(v2_db, 60) as con:
                ordinal, _ = store.create_run(con, record, label_list, "bench")
                root = store.data_root_of(con, v2_db)
            for s, lo in enumerate(range(0, n, args.shard_size)):
                shard = f"shard-{s:06d}"
                cut = slice(lo, lo + args.shard_size)
                table = part_table(run_id, shard, keys[cut], [scores[cut]], [np.zeros((0, 0))], c)
                p1 = v1_db.parent / "parts" / run_id / f"part-{shard}.parquet"
                p1.parent.mkdir(parents=True, exist_ok=True)
                if v1:
                    pq.write_table(table, p1, compression="zstd")  # schema 1's part writer
                    v1_parts.append((shard, p1))
                p2 = store.run_dir(root, run_id, ordinal) / f"part-{shard}.parquet"
                p2.parent.mkdir(parents=True, exist_ok=True)
                write_part(p2, table)
                v2_parts.append(store.PartRecord(run_id, shard, str(p2), table.num_rows // c, (),
                                                 table.num_rows, "bench", 0.0))  # fmt: skip
            labels = pa.table({"run_id": [run_id] * c, "label_id": pa.array(range(c), pa.int16()),
                               "name": names, "threshold": thresholds,
                               "threshold_source": ["bench"] * c})  # fmt: skip
            t1 = timed(lambda: v1_append(v1_db, run_id, v1_parts, labels)) if v1 else None  # noqa: B023
            t2 = timed(lambda: v2_append(v2_db, run_id, v2_parts))  # noqa: B023
            rows_total += n * c
            if night in checkpoints:
                v1_bytes = size_of([v1_db, v1_db.with_name(v1_db.name + ".wal")])
                v1_parts_bytes = size_of([v1_db.parent / "parts"])
                v2_bytes = size_of([v2_db, v2_db.with_name(v2_db.name + ".wal"), root])
                row = {"night": night, "rows": rows_total, "append_v1_s": t1, "append_v2_s": t2,
                       "bytes_per_row_v1_db": v1_bytes / rows_total if v1 else None,
                       "bytes_per_row_v1_db_and_parts":
                           (v1_bytes + v1_parts_bytes) / rows_total if v1 else None,
                       "bytes_per_row_v2": v2_bytes / rows_total,
                       "load_average_1min": os.getloadavg()[0]}  # fmt: skip
                report["nights"].append(row)
                progress(json.dumps(row))
                _save(args.out, report)
            elif night % 10 == 0:
                first = f"{t1:.2f} s (schema 1), " if v1 else ""
                progress(f"night {night}: append {first}{t2:.2f} s (schema 2)")
        latest = f"scheduled-{start + timedelta(days=args.nights - 1):%Y-%m-%d}"
        last30 = ", ".join(f"'scheduled-{start + timedelta(days=d):%Y-%m-%d}'"
                           for d in range(max(0, args.nights - 30), args.nights))  # fmt: skip
        key = keys[n // 2]
        questions = {
            "one_image_latest_run": (
                f"SELECT label_id, score FROM predictions WHERE run_id = '{latest}' "
                f"AND image_key = '{key}'",) * 2,
            "per_label_counts_latest_run": (
                f"SELECT label_id, count(*) FILTER (WHERE predicted) AS n FROM predictions_named "
                f"WHERE run_id = '{latest}' GROUP BY label_id",
                f"SELECT label_id, predicted AS n FROM label_summaries WHERE run_id = '{latest}'"),
            "top100_label_last30": (
                f"SELECT run_id, image_key, score FROM predictions WHERE label_id = 7 AND run_id "
                f"IN ({last30}) ORDER BY score DESC LIMIT 100",) * 2,
            "daily_rate_year": (
                "SELECT run_id, label_id, avg(predicted::INT) AS rate FROM predictions_named "
                "GROUP BY run_id, label_id",
                "SELECT r.run_date, m.label_id, m.predicted / m.images AS rate "
                "FROM label_summaries m JOIN runs r USING (run_id)"),
        }  # fmt: skip
        report["questions"] = {}
        for name, (sql1, sql2) in questions.items():
            q = {"v1": ask(v1_db, sql1) if v1 else None, "v2": ask(v2_db, sql2), "sql_v1": sql1,
                 "sql_v2": sql2}  # fmt: skip
            report["questions"][name] = q
            progress(f"{name}: {q['v1']['median_s'] if v1 else float('nan'):.3f} s (schema 1), "
                     f"{q['v2']['median_s']:.3f} s (schema 2)")  # fmt: skip
            _save(args.out, report)
        oldest = f"scheduled-{start:%Y-%m-%d}"
        before1 = size_of([v1_db, v1_db.with_name(v1_db.name + ".wal")])

        def v1_delete() -> None:
            con = duckdb.connect(str(v1_db))
            for table in ("predictions", "targets", "run_shards", "labels", "runs"):
                con.execute(f"DELETE FROM {table} WHERE run_id = ?", [oldest])
            con.close()

        t1 = timed(v1_delete) if v1 else None
        after1 = size_of([v1_db, v1_db.with_name(v1_db.name + ".wal")])
        run_bytes = size_of([store.run_dir(root, oldest, 0).parent])  # every ordinal's files
        before2 = size_of([root])
        t2 = timed(lambda: prune(v2_db, keep_runs=args.nights - 1))
        report["delete_oldest"] = {
            "v1_s": t1, "v1_bytes_returned": before1 - after1 if v1 else None, "v2_s": t2,
            "v2_bytes_returned": before2 - size_of([root]), "v2_run_bytes": run_bytes,
        }  # fmt: skip
        progress(json.dumps(report["delete_oldest"]))
        # compaction: the newest 30 runs rewritten sorted by label, then top-100 again
        t0 = time.perf_counter()
        for d in range(max(1, args.nights - 30), args.nights):
            compact(v2_db, f"scheduled-{start + timedelta(days=d):%Y-%m-%d}")
        report["compact_30_s"] = time.perf_counter() - t0
        report["questions"]["top100_label_last30"]["v2_compacted"] = ask(
            v2_db, questions["top100_label_last30"][1]
        )
        progress(f"compacted: top-100 {report['questions']['top100_label_last30']['v2_compacted']}")
        report["reader_beside_writer"] = _reader_beside_writer(v1_db, v2_db, v1)
        progress(json.dumps(report["reader_beside_writer"]))
        _save(args.out, report)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=2))


def _reader_beside_writer(v1_db: Path, v2_db: Path, v1: bool = True) -> dict[str, str]:
    """Can `lcm query` answer while another process holds a write connection? Schema 1's
    writer holds the file for a night's whole merge; schema 2's only to register a shard,
    modelled here by a holder that lets go after 0.5 s."""
    import subprocess

    out = {}
    for name, db, hold in (("v1", v1_db, 30), ("v2", v2_db, 0.5))[0 if v1 else 1 :]:
        code = ("import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); print('ready', "
                "flush=True); time.sleep(float(sys.argv[2]))")  # fmt: skip
        holder = subprocess.Popen([sys.executable, "-c", code, str(db), str(hold)],
                                  stdout=subprocess.PIPE, text=True)  # fmt: skip
        holder.stdout.readline()
        try:
            t0 = time.perf_counter()
            run_query("SELECT count(*) FROM runs", db=db, lock_timeout=5)
            out[name] = f"answered in {time.perf_counter() - t0:.2f} s"
        except Exception as e:  # noqa: BLE001 - the refusal is the measurement
            out[name] = f"refused: {str(e).splitlines()[0][:120]}"
        finally:
            holder.kill()
            holder.wait()
    return out


def _save(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
