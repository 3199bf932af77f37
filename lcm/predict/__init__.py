"""Batch prediction: score shards or image folders into Parquet parts, merged into DuckDB.

The steps a flow composes (each takes paths and small records, never live objects, so they
run as well in a Dask worker as in this process):

1. :func:`check_request` (``request.py``): every input checked before anything starts;
2. :func:`start_run` (``run.py``): record the run (or find it: resume, no-op, or refuse),
   list what is still to do, and reuse parts that an interrupted run already wrote;
3. :func:`score_unit` (``score.py``): one shard (or group of image files) -> one Parquet
   part, written atomically (``parts.py``); the model is loaded once per process;
4. :func:`merge_parts` (``run.py``): one writer merges the parts into DuckDB, one
   transaction per part (:mod:`lcm.store`), then marks the run complete.

Re-running a command after a crash at any point therefore ends with every image scored once:
committed shards are skipped, complete parts are merged without scoring them again, and the
scores are bit-identical to an uninterrupted run because a shard's batches never depend on
which other shards are pending (shard-aligned batches).
"""

from lcm.predict.parts import part_table, read_part_meta, write_part
from lcm.predict.request import (
    PredictRequest,
    Source,
    Unit,
    check_request,
    check_run_conflict,
    checked_request,
    resolve_source,
)
from lcm.predict.run import RunPlan, merge_parts, run_report, start_run
from lcm.predict.score import load_model_once, score_files, score_unit

__all__ = [
    "PredictRequest",
    "RunPlan",
    "Source",
    "Unit",
    "check_request",
    "check_run_conflict",
    "checked_request",
    "load_model_once",
    "merge_parts",
    "part_table",
    "read_part_meta",
    "resolve_source",
    "run_report",
    "score_files",
    "score_unit",
    "start_run",
    "write_part",
]
