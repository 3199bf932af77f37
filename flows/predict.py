"""Prefect flow: batch prediction of shards or image files into DuckDB.

The flow only orchestrates :mod:`lcm.predict`: start (or resume) the run, map one scoring
task per pending shard (each writes a Parquet part), then one merge task. Tasks get paths and
small records, never models or tensors, so they run unchanged on threads in this process or
on Dask workers (``task_runner="dask"``: a 2-worker LocalCluster, or ``dask_address`` for an
existing cluster); each process loads the model once.
"""

from __future__ import annotations

import os
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE
from prefect.futures import as_completed
from prefect.runtime import deployment, flow_run
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import unmapped

from flows.common import retry_unless_user_error
from lcm import predict as lp
from lcm.progress import ProgressCallback
from lcm.store import PartRecord

DASK_LOCAL_WORKERS = 2


@task(cache_policy=NONE)
def start_run(
    request: lp.PredictRequest,
    flow_run_id: str | None,
    deployment: str | None,
    checked: str | None = None,
) -> lp.RunPlan:
    return lp.start_run(request, flow_run_id, deployment, checked)


@task(
    cache_policy=NONE,
    retries=1,
    retry_delay_seconds=2,
    retry_condition_fn=retry_unless_user_error,
)
def score_shard(
    request: lp.PredictRequest, unit: lp.Unit, model_sha256: str, run_dir: str
) -> PartRecord:
    return lp.score_unit(request, unit, model_sha256, run_dir)


@task(cache_policy=NONE)
def merge_parts(
    request: lp.PredictRequest, parts: list[PartRecord], model_sha256: str, n_reused: int = 0
) -> dict[str, Any]:
    return lp.merge_parts(request, parts, model_sha256, n_reused)


def task_runner(kind: Literal["thread", "dask"], dask_address: str | None = None) -> Any:
    """One thread runs the shards one at a time in this process: the model already uses every
    core, and a shard's DataLoader forks its decoding workers, which must not happen while
    another thread is inside a torch op (the child can inherit a held lock and hang in its
    first ``torch.set_num_threads``). Dask spreads them over worker processes, here or on a
    cluster."""
    if kind == "thread" and dask_address is None:
        return ThreadPoolTaskRunner(max_workers=1)
    from prefect_dask import DaskTaskRunner

    if dask_address:
        return DaskTaskRunner(address=dask_address)
    threads = max(1, (os.cpu_count() or 1) // DASK_LOCAL_WORKERS)
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={
            "n_workers": DASK_LOCAL_WORKERS,
            "threads_per_worker": 1,
            "processes": True,
            "dashboard_address": None,
            # each worker's torch gets its share of the cores, not all of them
            "env": {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)},
        },
    )


def scheduled_date() -> date:
    """The night a run stands for: the flow run's scheduled time (UTC), or now."""
    when = flow_run.scheduled_start_time or datetime.now(UTC)
    return when.astimezone(UTC).date() if when.tzinfo else when.date()


def scheduled_run_id() -> str:
    """``scheduled-<date>`` from the flow run's scheduled time: each night keeps its run."""
    return f"scheduled-{scheduled_date():%Y-%m-%d}"


@flow(name="lcm-batch-predict", task_runner=task_runner("thread"))  # deployments run it too
def batch_predict_flow(
    checkpoint: str,
    db: str,
    run_id: str | None = None,
    shards: str | None = None,
    images: str | None = None,
    weights: Literal["raw", "ema"] = "raw",
    batch_size: int = 64,
    num_workers: int | None = None,
    device: str = "auto",
    parts: str | None = None,
    replace: bool = False,
    lock_timeout: float = 60.0,
    run_date: str | None = None,
    only_new: bool = False,
    progress: ProgressCallback | None = None,
    checked: str | None = None,
) -> dict[str, Any]:
    """Score every image of ``shards`` or ``images`` into ``db`` under ``run_id`` (default,
    for scheduled runs: ``scheduled-<date>``) and ``run_date`` (ISO; default: the scheduled
    date). Resumes an interrupted run. ``only_new`` (image folders): score only the images
    whose content no earlier run of this model and image size scored; copy the others.
    ``checked``: the token of the inputs ``lcm batch-predict`` checked in this process
    (:func:`lcm.handoff.hand_over`), so they are not read again."""
    logger = get_run_logger()
    request = lp.PredictRequest(
        checkpoint=Path(checkpoint),
        db=Path(db),
        run_id=run_id or scheduled_run_id(),
        shards=shards,
        images=images,
        weights=weights,
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        parts=Path(parts) if parts else None,
        replace=replace,
        lock_timeout=lock_timeout,
        run_date=date.fromisoformat(run_date) if run_date else scheduled_date(),
        only_new=only_new,
    )
    plan = start_run(request, str(flow_run.id) if flow_run.id else None,
                     deployment.name or None, checked)  # fmt: skip
    if plan.complete:
        logger.info("run %s is already complete in %s: nothing to do", request.run_id, db)
        return {"run_id": request.run_id, "status": "complete", "already_complete": True}
    if plan.reused:
        logger.info("reusing %d parts an interrupted run wrote", len(plan.reused))
    parts_done: list[PartRecord] = list(plan.reused)
    images_total, images_done = plan.n_images, 0
    if progress:
        progress(0, images_total)
    futures = score_shard.map(
        unmapped(request), plan.pending, unmapped(plan.model_sha256), unmapped(plan.run_dir)
    )
    for future in as_completed(futures):
        part = future.result()
        parts_done.append(part)
        images_done += part.n_images + len(part.skipped)
        if progress:
            progress(images_done, images_total)
    order = {u.name: i for i, u in enumerate(plan.pending)}
    parts_done.sort(key=lambda p: (order.get(p.shard, -1), p.shard))
    if plan.n_reused:
        logger.info("reusing the scores of %d images an earlier run scored", plan.n_reused)
    run = merge_parts(request, parts_done, plan.model_sha256, plan.n_reused)
    report = lp.run_report(request.db, run, request.lock_timeout)
    create_markdown_artifact(key="batch-predict-report", markdown=report)
    create_table_artifact(
        key="batch-predict-shards",
        table=[
            {
                "shard": p.shard,
                "images": p.n_images,
                "skipped": len(p.skipped),
                "rows": p.n_rows,
                "worker": p.worker,
                "seconds": round(p.seconds, 2),
            }
            for p in parts_done
        ],
        description=f"run {request.run_id} into {db}",
    )
    return {k: (str(v) if isinstance(v, datetime) else v) for k, v in run.items()}


def batch_predict(
    runner: Literal["thread", "dask"] = "thread",
    dask_address: str | None = None,
    **params: Any,
) -> dict[str, Any]:
    """Run :func:`batch_predict_flow` on the chosen task runner (Dask: a LocalCluster of
    ``DASK_LOCAL_WORKERS`` processes started and stopped around the run, or the cluster at
    ``dask_address``)."""
    flow_fn = batch_predict_flow
    if runner == "dask" or dask_address:
        flow_fn = batch_predict_flow.with_options(task_runner=task_runner("dask", dask_address))
    return flow_fn(**params)
