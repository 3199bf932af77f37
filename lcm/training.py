"""One training request, from the command line to the training loop.

A :class:`~lcm.train_request.TrainRequest` is checked and resolved once
(:func:`~lcm.train_request.check_request`, before a server or a process group starts) and the
resolved request is carried unchanged to :func:`lcm.engine.fit`:

    cli.py train -> check_request -> flows.train.train_flow(resolved) -> run_training -> fit
                                                  \\-> launch_ranks(request) -> torchrun
                                                       -m lcm.train_rank request.json (each rank)

:func:`run_training` adds what a person watching needs (a progress bar, per-epoch metrics in
dvclive) on the main rank; ``lcm.train_rank`` is the DDP ranks' entry point.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

from lcm.engine import FitResult, fit
from lcm.io import atomic_write_json, read_json
from lcm.progress import ProgressCallback, progress_bar
from lcm.runtime import Dist
from lcm.train_request import ResolvedTrain, TrainRequest, check_request, mask_for

REQUEST_FILE = "train_request.json"  # what the ranks of a DDP run read, in the model dir


def run_training(
    req: TrainRequest | ResolvedTrain,
    dist: Dist | None = None,
    progress: ProgressCallback | None = None,
) -> FitResult:
    """``engine.fit`` with a progress bar and per-epoch metrics logged through dvclive
    (both on the main rank only). A plain request is checked first."""
    resolved = check_request(req)
    req = resolved.request
    dist = dist or Dist()
    with contextlib.ExitStack() as stack:
        on_epoch = None
        if progress is None and dist.main:
            progress = stack.enter_context(progress_bar("training"))
        if req.live_dir is not None and dist.main:
            from dvclive import Live

            live = stack.enter_context(
                Live(
                    dir=str(req.live_dir),
                    resume=req.resume,
                    save_dvc_exp=False,
                    dvcyaml=None,
                    report=None,
                )
            )

            def on_epoch(_epoch: int, row: dict[str, float]) -> None:
                for key, value in row.items():
                    if key not in ("epoch", "step"):
                        live.log_metric(key, value)
                live.next_step()

        return fit(resolved, on_epoch=on_epoch, progress=progress, dist=dist)


def launch_ranks(req: TrainRequest) -> list[dict[str, float]]:
    """Run ``req`` on ``req.nproc`` DDP ranks: torchrun starts ``python -m lcm.train_rank``
    on the request, written to the model directory. Returns the run's history."""
    req.out_dir.mkdir(parents=True, exist_ok=True)
    request_file = req.out_dir / REQUEST_FILE
    atomic_write_json(request_file, req.to_json())
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={req.nproc}",
        "-m",
        "lcm.train_rank",
        str(request_file),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    subprocess.run(cmd, check=True, env=env)
    history = req.out_dir / "history.json"
    return read_json(history) if history.exists() else []


def read_request(path: Path) -> TrainRequest:
    return TrainRequest.from_json(read_json(path), str(path))


__all__ = [
    "REQUEST_FILE",
    "ResolvedTrain",
    "TrainRequest",
    "check_request",
    "launch_ranks",
    "mask_for",
    "read_request",
    "run_training",
]
