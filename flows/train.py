"""Prefect flow: train one model (on one process or several DDP ranks) and publish its metrics.

The flow only orchestrates a :class:`lcm.train_request.TrainRequest`, checked and resolved
once (by the CLI, or here for a deployment's parameters) and passed on unchanged: the
training task retries once on an unexpected failure and then resumes from its last
checkpoint, and the run gets a metrics table and a markdown report as artifacts.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import task_run

from flows.common import retry_unless_user_error
from lcm.train_request import ResolvedTrain, TrainRequest, check_request
from lcm.training import launch_ranks, run_training


@task(retries=1, retry_delay_seconds=2, retry_condition_fn=retry_unless_user_error)
def train_model(resolved: ResolvedTrain) -> list[dict[str, float]]:
    request = resolved.request
    if task_run.run_count > 1 and (request.out_dir / "state.pt").exists():
        get_run_logger().warning(
            "retrying: resuming from the last checkpoint in %s", request.out_dir
        )
        resolved = check_request(dataclasses.replace(request, resume=True))
        request = resolved.request
    if request.nproc > 1:
        return launch_ranks(request)
    return run_training(resolved).history


@flow(name="lcm-train", log_prints=False, validate_parameters=False)
def train_flow(
    request: ResolvedTrain | TrainRequest | dict[str, Any] | None = None,
    params_file: str = "params.yaml",
    train_shards: str | None = None,
    out_dir: str | None = None,
    val_shards: str | None = None,
    overrides: list[str] | None = None,
    masks: str | None = None,
) -> list[dict[str, float]]:
    """``request`` as the CLI resolved it, or its JSON form; or, for a deployment, the params
    file (read when the run starts, so params.yaml stays the one source), the shards and the
    model directory, as ``lcm train`` takes them."""
    if request is None:
        request = TrainRequest.from_files(params_file, train_shards, out_dir, val_shards,
                                          overrides, masks)  # fmt: skip
    elif isinstance(request, dict):
        request = TrainRequest.from_json(request, "flow parameter request")
    resolved = check_request(request)  # as it is when the CLI resolved it
    history = train_model(resolved)
    if history:
        out_dir = resolved.request.out_dir
        create_table_artifact(
            key="train-history", table=history, description=f"per-epoch metrics of {out_dir}"
        )
        last = history[-1]
        lines = [f"# Training run `{out_dir}`", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in last.items()]
        create_markdown_artifact(key="train-report", markdown="\n".join(lines))
    return history
