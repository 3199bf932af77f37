"""A training request: what one run needs, checked and resolved once.

:class:`TrainRequest` is built once (by ``lcm train``, a Prefect deployment or a test) and
checked once by :func:`check_request`, which returns a :class:`ResolvedTrain` (the request
with its shards resolved). That object travels unchanged to :func:`lcm.engine.fit`:

    cli.py train -> check_request -> flows.train.train_flow(resolved) -> run_training -> fit

This module sits below the training loop (``engine``) and its orchestration (``training``),
so both can import it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lcm.checkpoint import check_compatible
from lcm.config import Params, params_from_dict, to_dict
from lcm.data.shards import ShardInfo, check_mask_matches, resolve_shards
from lcm.errors import ConfigError
from lcm.runtime import select_device


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


@dataclass(frozen=True)
class ResolvedTrain:
    """A checked :class:`TrainRequest` with its inputs resolved once: the train and val
    shard locations with their ``_info.json``. Handed down from the CLI or the flow to
    :func:`lcm.engine.fit`, which resolves nothing again."""

    request: TrainRequest
    train: tuple[list[Any], ShardInfo]
    val: tuple[list[Any], ShardInfo] | None


def check_request(req: TrainRequest | ResolvedTrain) -> ResolvedTrain:
    """Every input of a run, checked before anything starts (raises an LcmError naming it);
    returns the request with its shards resolved. A resolved request is returned as it is."""
    if isinstance(req, ResolvedTrain):
        return req
    paths, info = resolve_shards(req.train_shards)
    val = None
    if req.val_shards is not None:
        val = resolve_shards(req.val_shards)
        val_info = val[1]
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
    return ResolvedTrain(request=req, train=(paths, info), val=val)


__all__ = ["ResolvedTrain", "TrainRequest", "check_request", "mask_for"]
