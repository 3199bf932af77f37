"""Where and how the model runs: device choice, mixed precision, seeding, DDP rank info.

Shared by training, evaluation and batch prediction, so that each picks devices and AMP the
same way and none of them imports the training loop to do it.
"""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from lcm.errors import ConfigError


def select_device(pref: str) -> torch.device:
    """``auto`` (CUDA when present), ``cuda`` (an error without one) or ``cpu``."""
    if pref not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"unknown device {pref!r}; expected auto, cpu or cuda")
    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("device is 'cuda' but no CUDA device is available here")
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def amp_dtype(pref: str, device: torch.device) -> torch.dtype | None:
    """Mixed precision only on CUDA: bf16 where supported (no scaler needed), else fp16."""
    if device.type != "cuda" or pref == "off":
        return None
    if pref == "fp16" or (pref == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def dist_from_env() -> Dist:
    return Dist(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model under DistributedDataParallel and ``torch.compile`` wrappers."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    return getattr(model, "_orig_mod", model)  # torch.compile
