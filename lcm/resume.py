"""The resume state: what ``state.pt`` holds, and the one place that writes and reads it.

A :class:`ResumeState` is everything a run needs to continue exactly where a checkpoint was
taken: the trainer's state (weights, optimiser, schedule, scaler, EMA), where in the run it
was (epoch, batch within the epoch, step, the epoch's loss so far), the history of finished
epochs, and every RNG state. ``state.pt`` is loaded with ``weights_only=True``: tensors and
plain containers only (the NumPy and Python RNG states travel as JSON bytes).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lcm.errors import CheckpointError
from lcm.io import atomic_path

STATE_FILE = "state.pt"


@dataclass(frozen=True)
class ResumeState:
    trainer: dict[str, Any]  # TrainState.state_dict(): model, optimizer, scheduler, scaler, ema
    epoch: int  # the epoch to continue (all before it are done)
    batch: int  # batches of that epoch already done
    step: int  # optimisation steps so far
    loss_sum: float = 0.0  # the epoch's loss so far, for its mean
    loss_count: int = 0
    history: list[dict[str, float]] = field(default_factory=list)  # one row per done epoch
    rng: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def capture(
        cls,
        trainer: Any,
        *,
        epoch: int,
        batch: int,
        step: int,
        loss_sum: float = 0.0,
        loss_count: int = 0,
        history: list[dict[str, float]] | None = None,
    ) -> ResumeState:
        """The state of ``trainer`` (a TrainState) and of every RNG, now."""
        return cls(
            trainer=trainer.state_dict(),
            epoch=epoch,
            batch=batch,
            step=step,
            loss_sum=loss_sum,
            loss_count=loss_count,
            history=[dict(row) for row in history or []],
            rng=rng_state(),
        )

    def to_cpu(self) -> ResumeState:
        """A copy on the CPU that training can go on mutating the originals of."""
        return replace(self, trainer=to_cpu(self.trainer), rng=to_cpu(self.rng))

    def restore(self, trainer: Any) -> None:
        """Put the trainer's state and every RNG back as they were when captured."""
        trainer.load_state_dict(self.trainer)
        set_rng_state(self.rng)

    def save(self, out_dir: Path) -> None:
        keys = sorted({k for row in self.history for k in row})
        doc = {
            **self.trainer,
            "epoch": self.epoch,
            "batch": self.batch,
            "step": self.step,
            "loss_sum": self.loss_sum,
            "loss_count": self.loss_count,
            "history_keys": keys,
            "history": [[float(row.get(k, math.nan)) for k in keys] for row in self.history],
            "rng": self.rng,
        }
        with atomic_path(Path(out_dir) / STATE_FILE) as tmp:
            torch.save(doc, tmp)

    @classmethod
    def load(cls, model_dir: Path) -> ResumeState:
        doc = load_state(model_dir)
        try:
            return cls(
                trainer={k: doc[k] for k in ("model", "optimizer", "scheduler", "scaler", "ema")},
                epoch=int(doc["epoch"]),
                batch=int(doc["batch"]),
                step=int(doc["step"]),
                loss_sum=float(doc["loss_sum"]),
                loss_count=int(doc["loss_count"]),
                history=[
                    dict(zip(doc["history_keys"], row, strict=True)) for row in doc["history"]
                ],
                rng=doc["rng"],
            )
        except (KeyError, TypeError, ValueError) as e:
            path = Path(model_dir) / STATE_FILE
            raise CheckpointError(f"{path}: not a training state ({e!r})") from e


def load_state(model_dir: Path) -> dict[str, Any]:
    """``state.pt`` as stored (a dict of tensors and plain values)."""
    path = Path(model_dir) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; nothing to resume from")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises a zoo of types for corrupt or unsafe pickles
        raise CheckpointError(f"{path}: cannot load training state ({e})") from e


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(
            np.frombuffer(json.dumps(_np_state_jsonable()).encode(), dtype=np.uint8).copy()
        ),
        "python": torch.from_numpy(
            np.frombuffer(json.dumps(_py_state_jsonable()).encode(), dtype=np.uint8).copy()
        ),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _np_state_jsonable() -> list[Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _py_state_jsonable() -> list[Any]:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = json.loads(bytes(state["numpy"].numpy()).decode())
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = json.loads(bytes(state["python"].numpy()).decode())
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def to_cpu(obj: Any) -> Any:
    """A deep copy of a (nested dict / list / tuple) state with every tensor cloned to the
    CPU: a snapshot that training can go on mutating the originals of."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj
