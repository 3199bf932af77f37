"""Tiny train/val shards and params for the training and evaluation tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from lcm.data.manifest import ImageRecord, write_manifest
from lcm.data.shard_writer import write_shards

ROOT = Path(__file__).resolve().parent.parent
CLI = str(ROOT / "cli.py")
CLASSES = ("red", "green", "blue", "square")

# Small enough for 2 CPU cores: resnet18 on 32 px images, a 1-layer head of width 32.
TINY_PARAMS = {
    "model": {
        "arch": "lcm",
        "backbone": "resnet18",
        "dim": 32,
        "heads": 2,
        "ffn": 64,
        "depth": 1,
        "dropout": 0.1,
        "mask_ratio": 0.3,
    },
    "loss": {"alpha": 1.0, "beta": 0.1},
    "train": {
        "epochs": 2,
        "batch_size": 8,
        "image_size": 32,
        "lr": 0.002,
        "ema_decay": 0.9,
        "seed": 3,
        "device": "cpu",
        "num_workers": 0,
        "checkpoint_every": 0,
    },
    "evaluate": {"batch_size": 16},
}


@dataclass(frozen=True)
class TinyData:
    train: Path
    val: Path
    prepared_train: Path


def _image(rng: np.random.Generator, labels: list[int]) -> Image.Image:
    """Colour blobs whose presence is the label: learnable in a few steps."""
    arr = np.full((40, 40, 3), 30, np.uint8) + rng.integers(0, 20, (40, 40, 3), dtype=np.uint8)
    for c in labels:
        y, x = rng.integers(0, 24, 2)
        if c < 3:
            arr[y : y + 14, x : x + 14, c] = 230
        else:
            arr[y : y + 10, x : x + 10] = 255
    return Image.fromarray(arr)


def make_split(root: Path, n: int, seed: int, shard_size: int) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    images, prepared, shards = root / "images", root / "prepared", root / "shards"
    images.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        labels = [int(c) for c in np.flatnonzero(rng.random(len(CLASSES)) < 0.4)]
        _image(rng, labels).save(images / f"im{i:04d}.jpg", quality=90)
        records.append(ImageRecord(f"im{i:04d}", f"im{i:04d}.jpg", tuple(labels), (), 40, 40))
    write_manifest(prepared, CLASSES, records)
    write_shards(prepared, images, shards, max_side=None, shard_size=shard_size, workers=1)
    return prepared, shards


def make_tiny_data(root: Path) -> TinyData:
    prepared, train = make_split(root / "train", 48, seed=1, shard_size=16)
    _, val = make_split(root / "val", 24, seed=2, shard_size=24)
    return TinyData(train=train, val=val, prepared_train=prepared)


def write_params(path: Path, base: dict | None = None, **sections: dict) -> Path:
    """TINY_PARAMS over ``base`` (default: nothing), then ``sections`` over that."""
    params = {k: dict(v) for k, v in (base or {}).items()}
    for section, values in TINY_PARAMS.items():
        params[section] = {**params.get(section, {}), **values}
    for section, values in sections.items():
        params[section] = {**params.get(section, {}), **values}
    path.write_text(yaml.safe_dump(params))
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for test servers)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def cli_env(tmp: Path, api: str | None = None) -> dict[str, str]:
    """Environment for `lcm` subprocesses: a private Prefect home, no analytics, as many
    intra-op threads as this process uses (2; 1 under xdist), so a run in a subprocess
    computes bit for bit as one in the test process; ``api``: a running Prefect server's API
    URL to use instead of a temporary one."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(tmp / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
        PREFECT_LOGGING_LEVEL="WARNING",
        OMP_NUM_THREADS=str(_threads()),
        PYTHONPATH=str(ROOT),
    )
    if api is not None:
        env["PREFECT_API_URL"] = api
    return env


def lcm_cmd(*args: str) -> list[str]:
    return [sys.executable, CLI, *args]


def run_cli(env: dict[str, str], *args: str, timeout: float = 300) -> str:
    """Run ``lcm *args`` to a zero exit and return what it printed. It runs in a process group
    of its own: past ``timeout`` seconds every process of the group (DataLoader workers, curl)
    gets SIGABRT and prints its threads' stacks (``PYTHONFAULTHANDLER``), then SIGKILL, and the
    test fails with those stacks instead of waiting for pytest's per-test timeout."""
    proc = subprocess.Popen(
        lcm_cmd(*args), env={**env, "PYTHONFAULTHANDLER": "1"}, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for sig, wait in ((signal.SIGABRT, 30), (signal.SIGKILL, None)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                out, _ = proc.communicate(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        raise AssertionError(f"lcm {args[0]} ran past {timeout} s; its stacks:\n{out}") from None
    assert proc.returncode == 0, f"lcm {args[0]} exited {proc.returncode}:\n{out}"
    return out
