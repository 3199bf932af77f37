"""Starting (or resuming, or refusing) a run, and merging its parts into DuckDB."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lcm import checkpoint as ckpt
from lcm import store
from lcm.errors import ConfigError, DataError
from lcm.predict import parts
from lcm.predict.request import (
    PredictRequest,
    Unit,
    check_request,
    refuse_other_work,
    run_record,
)
from lcm.predict.score import scoring_settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunPlan:
    run_id: str
    model_sha256: str
    complete: bool  # the run was already complete: nothing to do
    pending: tuple[Unit, ...]  # units to score
    reused: tuple[store.PartRecord, ...]  # complete parts from an interrupted run
    n_units: int
    n_images: int


def start_run(req: PredictRequest, flow_run_id: str | None = None) -> RunPlan:
    """Create, resume or refuse the run; list its pending units and reusable parts."""
    meta, source = check_request(req)
    digest = ckpt.model_digest(req.checkpoint, req.weights)
    record = run_record(req, meta, source, digest, flow_run_id)
    thresholds, th_source = ckpt.thresholds_or_default(req.checkpoint, meta.classes)
    with store.writer(req.db, req.lock_timeout) as con:
        row = store.get_run(con, req.run_id)
        if row is not None and not req.replace:
            refuse_other_work(req, record, row)
            if row["status"] == "complete":
                return RunPlan(req.run_id, digest, True, (), (), len(source.units), 0)
            committed = store.committed_shards(con, req.run_id)
            store.mark_flow_run(con, req.run_id, flow_run_id)
            log.info(
                "resuming run %s: %d of %d shards committed",
                req.run_id,
                len(committed),
                len(source.units),
            )
        else:
            if req.replace:  # its parts first, then its rows (one transaction)
                shutil.rmtree(req.run_parts, ignore_errors=True)
            labels = list(zip(meta.classes, thresholds.tolist(), strict=True))
            store.create_run(con, record, labels, th_source, source.listing_skips)
            committed = set()
    parts.write_labels(req, meta, thresholds, th_source)
    pending, reused = [], []
    settings = scoring_settings(req)
    for unit in source.units:
        if unit.name in committed:
            continue
        part = parts.reusable_part(req, unit, digest, settings)
        (reused if part else pending).append(part or unit)
    return RunPlan(
        req.run_id,
        digest,
        False,
        tuple(pending),
        tuple(reused),
        len(source.units),
        sum(u.count for u in pending),
    )


def merge_parts(
    req: PredictRequest, done: list[store.PartRecord], model_sha256: str
) -> dict[str, Any]:
    """Merge each part in its own transaction, then mark the run complete.

    Only into the run this process started: if another process replaced the run meanwhile
    (``--replace`` with another model), nothing is merged.
    """
    with store.writer(req.db, req.lock_timeout) as con:
        run = store.get_run(con, req.run_id)
        if run is None or run["model_sha256"] != model_sha256:
            raise ConfigError(
                f"{req.db}: run {req.run_id!r} was removed or replaced by another process "
                "while this one scored it; nothing merged"
            )
        committed = store.committed_shards(con, req.run_id)
        for part in done:
            meta = parts.read_part_meta(Path(part.path))
            if not meta or (meta["run_id"], meta["model_sha256"]) != (req.run_id, model_sha256):
                raise DataError(
                    f"{part.path}: this part is missing or was written for another run or "
                    "model; rerun the same command to score its shard again"
                )
            if part.shard not in committed:
                store.merge_part(con, part)
        done = len(store.committed_shards(con, req.run_id))
        if done != run["n_shards"]:
            raise DataError(
                f"{req.db}: run {req.run_id!r} has {done} of {run['n_shards']} shards "
                "committed; rerun the same command to finish it"
            )
        return store.finish_run(con, req.run_id)
