"""DuckLake (DuckDB's lakehouse format) on the nightly benchmark of bench_store.py.

DuckLake's extension exists on PyPI only for DuckDB 1.4.x (``duckdb-ext-ducklake``, packaged
by a third party from DuckDB's builds) and must match DuckDB's version exactly, while lcm
runs DuckDB 2.0.1; so this script runs in a virtual environment of its own, with no lcm code:

    python3.11 -m venv /tmp/ducklake-venv
    /tmp/ducklake-venv/bin/pip install duckdb==1.4.4 duckdb-ext-ducklake numpy pyarrow pytz
    /tmp/ducklake-venv/bin/python bench/bench_ducklake.py --nights 365 --images-per-night 40504

Each night inserts the same synthetic scores as bench_store.py (same generator, same seed)
through Arrow into one DuckLake table partitioned by run date (a DuckDB catalog file and
Parquet files), then computes the per-label summaries into a second table (DuckLake has no
summaries of its own); the questions, retention (DELETE, then expire snapshots and clean up
old files) and a reader beside a writer are measured as in bench_store.py. Results: JSON.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import site
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parent.parent
BINS = 20


def extension() -> str:
    for base in site.getsitepackages():
        found = glob.glob(f"{base}/duckdb_ext/extensions/v{duckdb.__version__}/*/ducklake*")
        if found:
            return found[0]
    raise SystemExit(f"no ducklake extension for DuckDB {duckdb.__version__}: see the docstring")


def lake(meta: Path, data: Path, read_only: bool = False) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    con.execute(f"LOAD '{extension()}'")
    ro = ", READ_ONLY" if read_only else ""
    con.execute(f"ATTACH 'ducklake:{meta}' AS lake (DATA_PATH '{data}/'{ro})")
    return con


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def size_of(*paths: Path) -> int:
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
    ap.add_argument("--checkpoints", default="1,30,90,180,365")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ducklake.json")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-ducklake-", dir=args.workdir))
    meta, data = work / "meta.ducklake", work / "data"
    n, c = args.images_per_night, args.labels
    keys = pa.array([f"COCO_val2014_{i:012d}" for i in range(n)])
    thresholds = np.linspace(0.3, 0.7, c)
    checkpoints = {int(x) for x in args.checkpoints.split(",") if int(x) <= args.nights}
    checkpoints.add(args.nights)
    report: dict = {"duckdb": duckdb.__version__, "settings": vars(args) | {"out": str(args.out),
                    "workdir": str(work)}, "nights": []}  # fmt: skip
    con = lake(meta, data)
    con.execute("CREATE TABLE lake.predictions (run_id VARCHAR, run_date DATE, shard VARCHAR, "
                "image_key VARCHAR, label_id SMALLINT, score REAL)")  # fmt: skip
    con.execute("ALTER TABLE lake.predictions SET PARTITIONED BY (run_date)")
    con.execute("CREATE TABLE lake.label_summaries (run_id VARCHAR, run_date DATE, "
                "label_id SMALLINT, images BIGINT, predicted BIGINT, mean_score DOUBLE, "
                "histogram INTEGER[])")  # fmt: skip
    con.close()
    rng = np.random.default_rng(0)  # bench_store.py's generator and seed
    start = date(2026, 1, 1)
    rows = 0
    try:
        for night in range(1, args.nights + 1):
            day = start + timedelta(days=night - 1)
            run_id = f"scheduled-{day:%Y-%m-%d}"
            scores = rng.beta(0.25, 4.0, size=(n, c)).astype(np.float32)
            table = pa.table({
                "run_id": pa.array([run_id] * (n * c)), "run_date": pa.array([day] * (n * c)),
                "shard": pa.array([f"shard-{i // 1000:06d}" for i in range(n)]).take(
                    pa.array(np.repeat(np.arange(n), c))),
                "image_key": keys.take(pa.array(np.repeat(np.arange(n), c))),
                "label_id": pa.array(np.tile(np.arange(c, dtype=np.int16), n)),
                "score": pa.array(scores.reshape(-1)),
            })  # fmt: skip
            label = np.tile(np.arange(c), n)
            flat = scores.reshape(-1)
            hist = np.zeros((c, BINS), dtype=np.int64)
            np.add.at(hist, (label, np.minimum((flat * BINS).astype(int), BINS - 1)), 1)

            def append() -> None:
                con = lake(meta, data)  # noqa: B023 - the night's data
                con.register("night", table)  # noqa: B023
                con.execute("INSERT INTO lake.predictions SELECT * FROM night")
                sums = pa.table({
                    "run_id": [run_id] * c, "run_date": [day] * c,  # noqa: B023
                    "label_id": pa.array(np.arange(c, dtype=np.int16)),
                    "images": np.bincount(label, minlength=c),  # noqa: B023
                    "predicted": np.bincount(label, flat >= thresholds[label], c).astype(int),  # noqa: B023
                    "mean_score": np.bincount(label, flat.astype(float), c) / n,  # noqa: B023
                    "histogram": hist.tolist(),  # noqa: B023
                })  # fmt: skip
                con.register("sums", sums)
                con.execute("INSERT INTO lake.label_summaries SELECT * FROM sums")
                con.close()

            t = timed(append)
            rows += n * c
            if night in checkpoints:
                row = {"night": night, "rows": rows, "append_s": t,
                       "bytes_per_row": size_of(meta, data) / rows}  # fmt: skip
                report["nights"].append(row)
                print(json.dumps(row), flush=True)
                save(args.out, report)
        latest = f"{start + timedelta(days=args.nights - 1)}"
        last30 = [f"{start + timedelta(days=d)}" for d in range(max(0, args.nights - 30),
                                                                args.nights)]  # fmt: skip
        key = f"COCO_val2014_{n // 2:012d}"
        questions = {
            "one_image_latest_run": f"SELECT label_id, score FROM lake.predictions WHERE "
            f"run_date = DATE '{latest}' AND image_key = '{key}'",
            "per_label_counts_latest_run": "SELECT label_id, predicted FROM lake.label_summaries "
            f"WHERE run_date = DATE '{latest}'",
            "top100_label_last30": "SELECT run_id, image_key, score FROM lake.predictions WHERE "
            "label_id = 7 AND run_date IN (" + ", ".join(f"DATE '{d}'" for d in last30)
            + ") ORDER BY score DESC LIMIT 100",
            "daily_rate_year": "SELECT run_date, label_id, predicted / images FROM "
            "lake.label_summaries",
        }  # fmt: skip
        report["questions"] = {}
        for name, sql in questions.items():
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                con = lake(meta, data, read_only=True)  # a reader opens the lake per query
                got = con.execute(sql).fetchall()
                con.close()
                times.append(time.perf_counter() - t0)
            report["questions"][name] = {"median_s": statistics.median(times),
                                         "first_s": times[0], "rows": len(got)}  # fmt: skip
            print(name, report["questions"][name], flush=True)
        before = size_of(meta, data)
        oldest = f"{start}"

        def delete() -> None:
            con = lake(meta, data)
            con.execute(f"DELETE FROM lake.predictions WHERE run_date = DATE '{oldest}'")
            con.execute(f"DELETE FROM lake.label_summaries WHERE run_date = DATE '{oldest}'")
            con.execute("CALL ducklake_expire_snapshots('lake', older_than => now())")
            con.execute("CALL ducklake_cleanup_old_files('lake', cleanup_all => true)")
            con.close()

        t = timed(delete)
        report["delete_oldest"] = {"s": t, "bytes_returned": before - size_of(meta, data)}
        print(report["delete_oldest"], flush=True)
        report["reader_beside_writer"] = reader_beside_writer(meta, data)
        print(report["reader_beside_writer"], flush=True)
        save(args.out, report)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def reader_beside_writer(meta: Path, data: Path) -> str:
    """A DuckLake whose catalog is a DuckDB file is one process at a time, like any DuckDB
    file (DuckLake serves several processes with a PostgreSQL or SQLite catalog)."""
    code = ("import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); print('ready', "
            "flush=True); time.sleep(30)")  # fmt: skip
    holder = subprocess.Popen([sys.executable, "-c", code, str(meta)], stdout=subprocess.PIPE,
                              text=True)  # fmt: skip
    holder.stdout.readline()
    try:
        con = lake(meta, data, read_only=True)
        con.execute("SELECT count(*) FROM lake.label_summaries").fetchall()
        con.close()
        return "answered"
    except duckdb.Error as e:
        return f"refused: {str(e).splitlines()[0][:120]}"
    finally:
        holder.kill()
        holder.wait()


def save(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("TZ", "UTC")
    main()
