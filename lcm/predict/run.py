"""Starting (or resuming, or refusing) a run, and registering its data files in the catalog."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lcm import checkpoint as ckpt
from lcm import store
from lcm.errors import ConfigError, DataError
from lcm.predict import parts, reuse
from lcm.predict.request import (
    PredictRequest,
    Unit,
    checked_request,
    refuse_other_work,
    run_record,
)
from lcm.predict.score import scoring_settings
from lcm.summaries import summarize_table

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunPlan:
    run_id: str
    model_sha256: str
    complete: bool  # the run was already complete: nothing to do
    pending: tuple[Unit, ...]  # units to score
    reused: tuple[store.PartRecord, ...]  # complete parts from an interrupted run
    n_units: int
    n_images: int  # images to score
    run_dir: str = ""  # where this run's data files go: <data root>/run_id=<id>/run=<ordinal>
    n_reused: int = 0  # images whose rows are copied from an earlier run (--only-new)


def start_run(
    req: PredictRequest,
    flow_run_id: str | None = None,
    deployment: str | None = None,
    checked: str | None = None,
) -> RunPlan:
    """Create, resume or refuse the run; list its pending units and reusable parts.
    ``checked``: the token of inputs the caller already checked (:func:`hand_over`)."""
    meta, source = checked_request(req, checked)
    source = reuse.hash_units(source)  # image folders: content hashes, for --only-new later
    digest = ckpt.model_digest(req.checkpoint, req.weights)
    record = run_record(req, meta, source, digest, flow_run_id, deployment)
    thresholds, _ = ckpt.thresholds_or_default(req.checkpoint, meta.classes)
    th_sources = ckpt.threshold_sources(req.checkpoint, meta.classes)
    replaced = None
    with store.writer(req.db, req.lock_timeout, req.parts_root) as con:
        root = store.data_root_of(con, req.db)
        row = store.get_run(con, req.run_id)
        if row is not None and not req.replace:
            refuse_other_work(req, record, row)
            if row["status"] == "complete":
                return RunPlan(req.run_id, digest, True, (), (), len(source.units), 0)
            ordinal = row["run_ordinal"]
            committed = store.committed_shards(con, req.run_id)
            store.mark_flow_run(con, req.run_id, flow_run_id, deployment)
            log.info("resuming run %s: %d of %d shards registered", req.run_id,
                     len(committed), len(source.units))  # fmt: skip
        else:
            labels = list(zip(meta.classes, thresholds.tolist(), strict=True))
            ordinal, replaced = store.create_run(con, record, labels, th_sources,
                                                 source.listing_skips)  # fmt: skip
            committed = set()
        n_reused = 0
        if req.only_new:
            previous = reuse.previous_run(con, digest, meta.image_size, req.run_id)
            source, n_reused = reuse.plan_reuse(source, previous, root)
    if replaced is not None:  # the catalog forgot it in the swap: its files go now
        shutil.rmtree(store.run_dir(root, req.run_id, replaced), ignore_errors=True)
    run_dir = store.run_dir(root, req.run_id, ordinal)
    parts.write_labels(req, run_dir, meta, thresholds, th_sources)
    pending, reused = [], []
    settings = scoring_settings(req)
    for unit in source.units:
        if unit.name in committed:
            continue
        part = parts.reusable_part(req, run_dir, unit, digest, settings)
        (reused if part else pending).append(part or unit)
    return RunPlan(
        req.run_id,
        digest,
        False,
        tuple(pending),
        tuple(reused),
        len(source.units),
        sum(len(u.files) if u.root is not None else u.count for u in pending),
        str(run_dir),
        n_reused,
    )


def merge_parts(
    req: PredictRequest, done: list[store.PartRecord], model_sha256: str, n_reused: int = 0
) -> dict[str, Any]:
    """Check each part was written for this run and model, then :func:`complete_run`.

    Only into the run this process started: if another process replaced the run meanwhile
    (``--replace`` with another model), nothing is registered.
    """
    for part in done:
        meta = parts.read_part_meta(Path(part.path))
        if not meta or (meta["run_id"], meta["model_sha256"]) != (req.run_id, model_sha256):
            with store.writer(req.db, req.lock_timeout, req.parts_root) as con:
                _own_run(con, req.db, req.run_id, model_sha256)  # replaced: say that first
            raise DataError(
                f"{part.path}: this part is missing or was written for another run or "
                "model; rerun the same command to score its shard again"
            )
    return complete_run(req.db, req.run_id, done, model_sha256, n_reused=n_reused,
                        data_root=req.parts_root, lock_timeout=req.lock_timeout)  # fmt: skip


def complete_run(
    db: Path,
    run_id: str,
    done: list[store.PartRecord],
    model_sha256: str,
    *,
    n_reused: int = 0,
    data_root: Path | None = None,
    lock_timeout: float = 60.0,
) -> dict[str, Any]:
    """Register each part in a short transaction, then consolidate the run's files into one
    (:func:`lcm.predict.parts.consolidate`), summarise it, and complete the run: the write
    protocol's steps 2 and 3 (:mod:`lcm.store`)."""
    with store.writer(db, lock_timeout, data_root) as con:
        run = _own_run(con, db, run_id, model_sha256)
        root = store.data_root_of(con, db)
        store.register_parts(con, done, root)
        registered = [p for (p,) in con.execute(
            "SELECT part FROM run_shards WHERE run_id = ? ORDER BY shard", [run_id]
        ).fetchall()]  # fmt: skip
        thresholds = [t for (t,) in con.execute(
            "SELECT threshold FROM labels WHERE run_id = ? ORDER BY label_id", [run_id]
        ).fetchall()]  # fmt: skip
        if len(registered) != run["n_shards"]:
            raise DataError(
                f"{db}: run {run_id!r} has {len(registered)} of {run['n_shards']} "
                "shards registered; rerun the same command to finish it"
            )
        ordinal = store.next_ordinal(con)  # reserved for the consolidated file
    # With the catalog closed (readers and other writers wait only for the instants above and
    # below): one file for the run, and its summaries from the same rows.
    new_dir = store.run_dir(root, run_id, ordinal)
    table = parts.consolidate([root / p for p in registered], new_dir / parts.RUN_FILE)
    summaries = summarize_table(run_id, table, np.array(thresholds))
    shard_dir = store.run_dir(root, run_id, run["run_ordinal"])
    if (shard_dir / store.LABELS_FILE).is_file():
        shutil.copy2(shard_dir / store.LABELS_FILE, new_dir / store.LABELS_FILE)
    images = sorted(shard_dir.glob("images-*.parquet"))  # image folders: keys and hashes
    if images:
        reuse.write_images_table(new_dir / reuse.IMAGES_FILE,
                                 pa.concat_tables([pq.read_table(f) for f in images]))  # fmt: skip
    with store.writer(db, lock_timeout, data_root) as con:
        _own_run(con, db, run_id, model_sha256)
        finished = store.finish_run(con, run_id, summaries, n_reused,
                                    moved=(ordinal, new_dir / parts.RUN_FILE, root))  # fmt: skip
    shutil.rmtree(shard_dir, ignore_errors=True)  # the shard files, now consolidated
    return finished


def _own_run(con: Any, db: Path, run_id: str, model_sha256: str) -> dict[str, Any]:
    run = store.get_run(con, run_id)
    if run is None or run["model_sha256"] != model_sha256:
        raise ConfigError(
            f"{db}: run {run_id!r} was removed or replaced by another process "
            "while this one scored it; nothing registered"
        )
    return run


def run_report(db: Path, run: dict[str, Any], lock_timeout: float = 60.0) -> str:
    """A link-free Markdown summary of a complete run: its counts, and the three labels
    predicted most and least often (from its summaries)."""
    con = store.open_db(db, read_only=True, timeout=lock_timeout)
    try:
        rows = con.execute(
            "SELECT l.name, m.predicted, m.images FROM label_summaries m "
            "JOIN labels l USING (run_id, label_id) WHERE m.run_id = ? "
            "ORDER BY m.predicted DESC, l.name", [run["run_id"]]
        ).fetchall()  # fmt: skip
    finally:
        con.close()
    lines = [
        f"# Batch prediction run `{run['run_id']}`", "",
        f"- images: {run['n_images']} scored, {run['n_skipped']} skipped, "
        f"{run.get('n_reused') or 0} reused from an earlier run",
        f"- shards: {run['n_shards']}; model `{run['model_dir']}` ({run['weights']} weights)",
        f"- source: `{run['source']}`; store: `{db}`", "",
        "| labels predicted most often | images | | labels predicted least often | images |",
        "|---|---|---|---|---|",
    ]  # fmt: skip
    most, least = rows[:3], rows[::-1][:3]
    for (a, na, _), (b, nb, _) in zip(most, least, strict=False):
        lines.append(f"| {a} | {na} | | {b} | {nb} |")
    return "\n".join(lines) + "\n"
