"""Prefect flow: evaluate a model directory on shards, with a metrics table and a report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from lcm.evaluate import EvaluateRequest, evaluate_checkpoint
from lcm.reports import markdown_summary


@task
def evaluate_model(request: EvaluateRequest) -> dict[str, Any]:
    result = evaluate_checkpoint(request)
    create_markdown_artifact(key="evaluation-report", markdown=markdown_summary(result))
    return result.to_dict()


@flow(name="lcm-evaluate")
def evaluate_flow(
    checkpoint: str,
    shards: str,
    out_dir: str,
    weights: str = "raw",
    batch_size: int = 64,
    num_workers: int = 2,
    device: str = "auto",
    calibrate: bool = True,
) -> dict[str, Any]:
    request = EvaluateRequest(
        checkpoint=Path(checkpoint),
        shards=shards,
        out_dir=Path(out_dir),
        weights=weights,
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        calibrate=calibrate,
    )
    metrics = evaluate_model(request)
    headline = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
    create_table_artifact(key="evaluation-metrics", table=[headline])
    return metrics
