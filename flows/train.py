"""Prefect flow: train one model (on one process or several DDP ranks) and publish its metrics.

The flow only orchestrates a :class:`lcm.training.TrainRequest`, which it passes on
unchanged: the training task retries once on an unexpected failure and then resumes from its
last checkpoint, and the run gets a metrics table and a markdown report as artifacts.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import task_run

from flows.common import retry_unless_user_error
from lcm.training import TrainRequest, check_request, launch_ranks, run_training


@task(retries=1, retry_delay_seconds=2, retry_condition_fn=retry_unless_user_error)
def train_model(request: TrainRequest) -> list[dict[str, float]]:
    if task_run.run_count > 1 and (request.out_dir / "state.pt").exists():
        get_run_logger().warning(
            "retrying: resuming from the last checkpoint in %s", request.out_dir
        )
        request = dataclasses.replace(request, resume=True)
    if request.nproc > 1:
        return launch_ranks(request)
    return run_training(request).history


@flow(name="lcm-train", log_prints=False, validate_parameters=False)
def train_flow(
    request: TrainRequest | dict[str, Any] | None = None,
    params_file: str = "params.yaml",
    train_shards: str | None = None,
    out_dir: str | None = None,
    val_shards: str | None = None,
    overrides: list[str] | None = None,
    masks: str | None = None,
) -> list[dict[str, float]]:
    """``request`` as built by the CLI, or its JSON form; or, for a deployment, the params
    file (read when the run starts, so params.yaml stays the one source), the shards and the
    model directory, as ``lcm train`` takes them."""
    if request is None:
        request = TrainRequest.from_files(params_file, train_shards, out_dir, val_shards,
                                          overrides, masks)  # fmt: skip
        check_request(request)
    elif isinstance(request, dict):
        request = TrainRequest.from_json(request, "flow parameter request")
        check_request(request)
    history = train_model(request)
    if history:
        out_dir = request.out_dir
        create_table_artifact(
            key="train-history", table=history, description=f"per-epoch metrics of {out_dir}"
        )
        last = history[-1]
        lines = [f"# Training run `{out_dir}`", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in last.items()]
        create_markdown_artifact(key="train-report", markdown="\n".join(lines))
    return history
