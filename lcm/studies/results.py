"""The studies' results: one append-only log, and the table built from it after every run.

``<out>/runs.jsonl`` gets one line per finished run (its key, full params, metrics, per-epoch
curve, per-class AP, device, seconds) the moment the run ends, so a cut-off call keeps every
finished run and a rerun skips it. A run's key hashes its full configuration, seed included,
device excluded: the base configuration shared by several studies trains once.

From the log, :func:`write_tables` rebuilds after every run, each written to a temporary name
and renamed into place (a reader never sees half a file):

- ``<out>/results.csv``: one row per study point (study, swept value, missing ratio, seed)
  with the run's metrics and full params;
- ``<out>/studies.duckdb``: the same rows as table ``ablation_results``, inserted through
  Arrow, with ``ablation_runs`` (one row per run) behind them. Query it read-only:
  ``lcm query --db studies/studies.duckdb "SELECT ..."``.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.csv as pacsv

from lcm.errors import DataError
from lcm.io import atomic_path
from lcm.studies.grids import memberships

RUNS_FILE = "runs.jsonl"
CSV_FILE = "results.csv"
DB_FILE = "studies.duckdb"
# train_*: the final weights scored on the train split, beside the val figures
METRICS = ("mAP", "aux_mAP", "CP", "CR", "CF1", "OP", "OR", "OF1", "lookalike_AP",
           "train_mAP", "train_lookalike_AP")  # fmt: skip


def run_key(settings: dict[str, Any], params: dict[str, Any]) -> str:
    """Hash of a run's full configuration (the device left out)."""
    train = {k: v for k, v in params["train"].items() if k != "device"}
    doc = {"settings": settings, **params, "train": train}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def read_runs(out: Path) -> dict[str, dict[str, Any]]:
    """The finished runs by key. A torn last line (a call killed mid-write) is ignored; any
    other bad line is an error naming the file and line."""
    path = Path(out) / RUNS_FILE
    if not path.exists():
        return {}
    runs: dict[str, dict[str, Any]] = {}
    lines = path.read_text().splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            runs[row["key"]] = row
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            if n == len(lines):
                continue  # the half-written last line of an interrupted call
            raise DataError(f"{path}:{n}: not a run record ({e})") from e
    return runs


def append_run(out: Path, row: dict[str, Any]) -> dict[str, Any]:
    """Append a finished run to the log (flushed to disk); returns it as logged."""
    path = Path(out) / RUNS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    _drop_torn_tail(path)
    row = {**row, "finished_at": datetime.now(UTC).isoformat(timespec="seconds")}
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return row


def _drop_torn_tail(path: Path) -> None:
    """Cut a half-written last line (a call killed mid-write) so the next record starts on a
    line of its own; its run was never counted as finished and trains again."""
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        with path.open("r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def result_rows(runs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per study point of every finished run (a run of the base configuration
    is a point of several studies), ordered by study, missing ratio, value and seed."""
    rows = []
    for key, run in runs.items():
        p = run["params"]
        for point in memberships(run["settings"], p):
            rows.append({
                "study": point.study, "value": point.value, "missing": point.missing,
                "seed": point.seed, "run_key": key, "profile": run["settings"]["profile"],
                "tier": run["settings"]["tier"],
                **{m: run.get(m) for m in METRICS},
                "depth": p["model"]["depth"], "mask_ratio": p["model"]["mask_ratio"],
                "alpha": p["loss"]["alpha"], "beta": p["loss"]["beta"],
                "device": run["device"], "seconds": run["seconds"],
                "finished_at": run.get("finished_at"),
                "settings": json.dumps(run["settings"], sort_keys=True),
                "params": json.dumps(p, sort_keys=True),
            })  # fmt: skip
    return sorted(rows, key=lambda r: (r["study"], r["profile"], r["missing"] or 0, r["value"],
                                       r["seed"]))  # fmt: skip


_SCHEMA = pa.schema([
    ("study", pa.string()), ("value", pa.float64()), ("missing", pa.float64()),
    ("seed", pa.int32()), ("run_key", pa.string()), ("profile", pa.string()),
    ("tier", pa.string()), *((m, pa.float64()) for m in METRICS), ("depth", pa.int32()),
    ("mask_ratio", pa.float64()), ("alpha", pa.float64()), ("beta", pa.float64()),
    ("device", pa.string()), ("seconds", pa.float64()), ("finished_at", pa.string()),
    ("settings", pa.string()), ("params", pa.string()),
])  # fmt: skip


def write_tables(out: Path, rows: list[dict], runs: dict[str, dict]) -> None:
    """``results.csv`` and ``studies.duckdb`` from the rows, each replaced atomically."""
    out = Path(out)
    table = pa.Table.from_pylist(rows, schema=_SCHEMA)
    with atomic_path(out / CSV_FILE) as tmp:
        pacsv.write_csv(table, tmp)
    run_table = pa.Table.from_pylist([
        {"run_key": k, "settings": json.dumps(r["settings"], sort_keys=True),
         "params": json.dumps(r["params"], sort_keys=True), "device": r["device"],
         "seconds": r["seconds"], "curve": r["curve"], "aux_curve": r.get("aux_curve"),
         "per_class": json.dumps(r["per_class"]), "finished_at": r.get("finished_at"),
         **{m: r.get(m) for m in METRICS}}
        for k, r in sorted(runs.items())
    ], schema=pa.schema([
        ("run_key", pa.string()), ("settings", pa.string()), ("params", pa.string()),
        ("device", pa.string()), ("seconds", pa.float64()), ("curve", pa.list_(pa.float64())),
        ("aux_curve", pa.list_(pa.float64())), ("per_class", pa.string()),
        ("finished_at", pa.string()), *((m, pa.float64()) for m in METRICS),
    ]))  # fmt: skip
    with atomic_path(out / DB_FILE) as tmp:
        tmp.unlink()  # DuckDB creates the file itself
        con = duckdb.connect(str(tmp))
        try:
            con.register("results_arrow", table)
            con.register("runs_arrow", run_table)
            con.execute("CREATE TABLE ablation_results AS SELECT * FROM results_arrow")
            con.execute("CREATE TABLE ablation_runs AS SELECT * FROM runs_arrow")
        finally:
            con.close()
