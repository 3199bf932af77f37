"""One training request, from the command line to the training loop.

:class:`TrainRequest` is built once (by ``lcm train``, a Prefect deployment or a test),
checked once (:func:`check_request`, before a server or a process group starts) and carried
unchanged to :func:`lcm.engine.fit`:

    cli.py train -> flows.train.train_flow(request) -> run_training(request) -> fit(request)
                                                  \\-> launch_ranks(request) -> torchrun
                                                       -m lcm.train_rank request.json (each rank)

:func:`run_training` adds what a person watching needs (a progress bar, per-epoch metrics in
dvclive) on the main rank; ``lcm.train_rank`` is the DDP ranks' entry point.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lcm.config import Params, params_from_dict, to_dict
from lcm.errors import ConfigError
from lcm.io import atomic_write_json, read_json
from lcm.progress import ProgressCallback, progress_bar
from lcm.runtime import Dist

REQUEST_FILE = "train_request.json"  # what the ranks of a DDP run read, in the model dir


@dataclass(frozen=True)
class TrainRequest:
    """Everything one training run needs besides the data itself."""

    params: Params
    train_shards: str  # a shard directory or a glob of tars in one
    out_dir: Path  # the model directory
    val_shards: str | None = None  # per-epoch validation; None: none
    mask: Path | None = None  # partial-label mask; None: full labels
    resume: bool = False  # continue from out_dir's last checkpoint
    live_dir: Path | None = None  # dvclive directory for per-epoch metrics; None: none
    nproc: int = 1  # DDP processes (torchrun)
    record_keys: bool = False  # write each rank's sample keys (tests of the rank split)

    def to_json(self) -> dict[str, Any]:
        doc = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        doc["params"] = to_dict(self.params)
        return {k: str(v) if isinstance(v, Path) else v for k, v in doc.items()}

    @classmethod
    def from_files(
        cls,
        params_file: str | Path,
        train_shards: str | None,
        out_dir: str | Path | None,
        val_shards: str | None = None,
        overrides: list[str] | None = None,
        masks: str | Path | None = None,
    ) -> TrainRequest:
        """A request as ``lcm train`` builds it from its options (a deployment's form)."""
        from lcm.config import load_params_with

        if not train_shards or not out_dir:
            raise ConfigError("a training run needs train_shards and out_dir")
        params = load_params_with(Path(params_file), overrides)
        return cls(params=params, train_shards=train_shards, out_dir=Path(out_dir),
                   val_shards=val_shards,
                   mask=mask_for(params, None, Path(masks) if masks else None))  # fmt: skip

    @classmethod
    def from_json(cls, doc: dict[str, Any], where: str = "request") -> TrainRequest:
        try:
            return cls(
                params=params_from_dict(doc["params"], f"{where}:params"),
                train_shards=str(doc["train_shards"]),
                out_dir=Path(doc["out_dir"]),
                val_shards=doc.get("val_shards"),
                mask=Path(doc["mask"]) if doc.get("mask") else None,
                resume=bool(doc.get("resume", False)),
                live_dir=Path(doc["live_dir"]) if doc.get("live_dir") else None,
                nproc=int(doc.get("nproc", 1)),
                record_keys=bool(doc.get("record_keys", False)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{where}: not a training request ({e!r})") from e


def mask_for(params: Params, mask: Path | None, masks_dir: Path | None) -> Path | None:
    """The mask to train with: the given file, else ``train.missing``'s file in the mask
    directory (``lcm data mask --out DIR``), else none (full labels)."""
    from lcm.data.masks import mask_file

    if mask is not None or params.train.missing is None:
        return mask
    if masks_dir is None:
        raise ConfigError(
            f"train.missing={params.train.missing} needs the masks: pass --masks DIR (the "
            "directory `lcm data mask` wrote) or --mask FILE"
        )
    return mask_file(masks_dir, params.train.missing)


def check_request(req: TrainRequest) -> None:
    """Every input of a run, checked before anything starts; raises an LcmError naming it."""
    from lcm.checkpoint import check_compatible
    from lcm.data.shards import check_mask_matches, resolve_shards
    from lcm.runtime import select_device

    paths, info = resolve_shards(req.train_shards)
    if req.val_shards is not None:
        _, val_info = resolve_shards(req.val_shards)
        if tuple(val_info.classes) != tuple(info.classes):
            raise ConfigError(
                f"{req.val_shards}: the validation shards have other classes than "
                f"{req.train_shards}"
            )
    if req.mask is not None:
        check_mask_matches(req.mask, paths, info)
    if req.resume:
        check_compatible(req.out_dir, req.params.model, tuple(info.classes))
    if req.nproc < 1:
        raise ConfigError(f"nproc must be at least 1, got {req.nproc}")
    select_device(req.params.train.device)


def run_training(
    req: TrainRequest, dist: Dist | None = None, progress: ProgressCallback | None = None
) -> Any:
    """``engine.fit`` with a progress bar and per-epoch metrics logged through dvclive
    (both on the main rank only). Returns the FitResult."""
    from lcm.engine import fit

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

        return fit(req, on_epoch=on_epoch, progress=progress, dist=dist)


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
    "TrainRequest",
    "check_request",
    "launch_ranks",
    "mask_for",
    "read_request",
    "run_training",
]
