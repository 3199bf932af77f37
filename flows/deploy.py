"""Prefect deployments: scheduled batch prediction, on-demand training and evaluation.

``serve_deployments`` registers three deployments with the Prefect server in
``PREFECT_API_URL`` and runs them from this process (``prefect.serve``: no work pool or
worker needed) until interrupted, which pauses them:

- ``lcm-batch-predict``: on a cron schedule, at most one run at a time; each run writes its
  own run id, ``scheduled-<date>`` from its scheduled time;
- ``lcm-train`` and ``lcm-evaluate``: on demand (``prefect deployment run``) with their
  parameters, defaulting to this project's params and the served model.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from lcm.errors import ConfigError

PREDICT, TRAIN, EVALUATE = "lcm-batch-predict", "lcm-train", "lcm-evaluate"


def check_schedule(cron: str, timezone: str) -> Any:
    """A Prefect cron schedule, or a one-line ConfigError."""
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.schedules import Cron
    from pydantic import ValidationError

    try:
        CronSchedule(cron=cron, timezone=timezone)  # validates both
    except ValidationError as e:
        detail = "; ".join(err["msg"].removeprefix("Value error, ") for err in e.errors())
        raise ConfigError(f"invalid schedule: {detail}") from e
    return Cron(cron, timezone=timezone)


def api_url() -> str:
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if not url:
        raise ConfigError(
            "PREFECT_API_URL is not set: start a server (`prefect server start`) and "
            "export PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    return str(url)


def build_deployments(
    checkpoint: Path,
    shards: str | None,
    db: Path,
    cron: str,
    timezone: str,
    params_file: Path,
    images: str | None = None,
    only_new: bool = False,
) -> list[Any]:
    from flows.evaluate import evaluate_flow
    from flows.predict import batch_predict_flow
    from flows.train import train_flow
    from lcm.config import load_params
    from lcm.predict import PredictRequest, check_request

    schedule = check_schedule(cron, timezone)
    # The served inputs must be right now, not at 3 a.m.; the run id is a placeholder.
    check_request(PredictRequest(checkpoint=checkpoint, db=db, run_id="check", shards=shards,
                                 images=images, only_new=only_new))  # fmt: skip
    source = {"shards": shards} if shards else {"images": images, "only_new": only_new}
    params = load_params(params_file)  # checked now; each training run reads it again
    val_shards = shards or f"data/shards/{params.data.name}/val"
    train_parameters = {"params_file": str(params_file),
                        "train_shards": f"data/shards/{params.data.name}/train",
                        "out_dir": str(checkpoint), "val_shards": val_shards}  # fmt: skip
    return [
        batch_predict_flow.to_deployment(
            name=PREDICT,
            schedule=schedule,
            concurrency_limit=1,
            parameters={"checkpoint": str(checkpoint), "db": str(db), **source},
            description="Nightly batch prediction; run id scheduled-<date>.",
        ),
        train_flow.to_deployment(
            name=TRAIN,
            parameters=train_parameters,
            description="Train on demand: the params file (read when the run starts) on the "
            "train shards into the served checkpoint, validated on the served shards.",
        ),
        evaluate_flow.to_deployment(
            name=EVALUATE,
            parameters={"checkpoint": str(checkpoint), "shards": val_shards},
            description="Evaluate on demand: pass out_dir.",
        ),
    ]


def serve_deployments(
    checkpoint: Path,
    shards: str | None,
    db: Path,
    cron: str,
    timezone: str,
    params_file: Path,
    on_ready: Callable[[list[str]], None] | None = None,
    images: str | None = None,
    only_new: bool = False,
) -> None:
    """Check everything, register the deployments and serve them until interrupted."""
    from prefect import serve

    api_url()
    deployments = build_deployments(checkpoint, shards, db, cron, timezone, params_file,
                                    images, only_new)  # fmt: skip
    if on_ready:
        on_ready([d.name for d in deployments])
    serve(*deployments, print_starting_message=False)
