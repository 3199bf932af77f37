"""Prefect flow: train one model (optionally with torchrun/DDP) and publish its metrics.

The flow only orchestrates: inputs are checked before any training starts, the training task
retries once on an unexpected failure and then resumes from its last checkpoint, and the run
gets a metrics table and a markdown report as artifacts.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import task_run

from flows.common import retry_unless_user_error
from lcm.config import Params, params_from_dict, to_dict
from lcm.engine import Dist, FitResult, fit
from lcm.progress import progress_bar

CLI = Path(__file__).resolve().parent.parent / "cli.py"


def run_fit(
    params: Params,
    train_shards: str,
    val_shards: str | None,
    out_dir: Path,
    *,
    mask: Path | None,
    resume: bool,
    live_dir: Path | None,
    progress: Any = None,
    dist: Dist | None = None,
    record_keys: bool = False,
) -> FitResult:
    """``engine.fit`` with a progress bar and per-epoch metrics logged through dvclive
    (both on the main rank only)."""
    dist = dist or Dist()
    with contextlib.ExitStack() as stack:
        on_epoch = None
        if progress is None and dist.main:
            progress = stack.enter_context(progress_bar("training"))
        if live_dir is not None and dist.main:
            from dvclive import Live

            live = stack.enter_context(
                Live(
                    dir=str(live_dir), resume=resume, save_dvc_exp=False, dvcyaml=None, report=None
                )
            )

            def on_epoch(_epoch: int, row: dict[str, float]) -> None:
                for key, value in row.items():
                    if key not in ("epoch", "step"):
                        live.log_metric(key, value)
                live.next_step()

        return fit(
            params,
            train_shards,
            val_shards,
            out_dir,
            mask=mask,
            resume=resume,
            on_epoch=on_epoch,
            progress=progress,
            dist=dist,
            record_keys=record_keys,
        )


@task(retries=1, retry_delay_seconds=2, retry_condition_fn=retry_unless_user_error)
def train_model(
    params: dict[str, Any],
    train_shards: str,
    val_shards: str | None,
    out_dir: str,
    mask: str | None,
    resume: bool,
    live_dir: str | None,
    nproc: int,
) -> list[dict[str, float]]:
    logger = get_run_logger()
    out = Path(out_dir)
    if task_run.run_count > 1 and (out / "state.pt").exists():
        logger.warning("retrying: resuming from the last checkpoint in %s", out)
        resume = True
    cfg = params_from_dict(params)
    if nproc > 1:
        return _launch_torchrun(cfg, train_shards, val_shards, out, mask, resume, live_dir, nproc)
    result = run_fit(
        cfg,
        train_shards,
        val_shards,
        out,
        mask=Path(mask) if mask else None,
        resume=resume,
        live_dir=Path(live_dir) if live_dir else None,
    )
    return result.history


def _launch_torchrun(
    cfg: Params,
    train_shards: str,
    val_shards: str | None,
    out: Path,
    mask: str | None,
    resume: bool,
    live_dir: str | None,
    nproc: int,
) -> list[dict[str, float]]:
    """Start ``nproc`` DDP ranks with torchrun, each running `lcm train` on its share."""
    import json

    import yaml

    out.mkdir(parents=True, exist_ok=True)
    params_file = out / "params.resolved.yaml"
    params_file.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        str(CLI),
        "train",
        "--params",
        str(params_file),
        "--shards",
        train_shards,
        "--out",
        str(out),
    ]
    cmd += ["--val-shards", val_shards] if val_shards else ["--no-val"]
    cmd += ["--mask", mask] if mask else []
    cmd += ["--live-dir", live_dir] if live_dir else ["--no-live"]
    cmd += ["--resume"] if resume else []
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    subprocess.run(cmd, check=True, env=env)
    history_file = out / "history.json"
    return json.loads(history_file.read_text()) if history_file.exists() else []


@flow(name="lcm-train", log_prints=False)
def train_flow(
    params: dict[str, Any],
    train_shards: str,
    val_shards: str | None,
    out_dir: str,
    mask: str | None = None,
    resume: bool = False,
    live_dir: str | None = "dvclive",
    nproc: int = 1,
) -> list[dict[str, float]]:
    history = train_model(params, train_shards, val_shards, out_dir, mask, resume, live_dir, nproc)
    if history:
        create_table_artifact(
            key="train-history", table=history, description=f"per-epoch metrics of {out_dir}"
        )
        last = history[-1]
        lines = [f"# Training run `{out_dir}`", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in last.items()]
        create_markdown_artifact(key="train-report", markdown="\n".join(lines))
    return history
