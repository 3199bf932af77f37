"""Prefect flow: evaluate a model directory on shards, with a metrics table and a report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from lcm.evaluate import EvaluateRequest, ResolvedEvaluate, evaluate_checkpoint
from lcm.handoff import take
from lcm.reports import markdown_summary


@task
def evaluate_model(request: EvaluateRequest | ResolvedEvaluate) -> dict[str, Any]:
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
    checked: str | None = None,
) -> dict[str, Any]:
    """Evaluate ``checkpoint`` on ``shards`` into ``out_dir``. ``checked``: the token of the
    inputs ``lcm evaluate`` checked in this process (:func:`lcm.handoff.hand_over`)."""
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
    resolved = take(checked)
    metrics = evaluate_model(resolved if resolved is not None else request)
    headline = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
    create_table_artifact(key="evaluation-metrics", table=[headline])
    return metrics
