"""The benchmarks' one timing harness: synchronised wall-clock timing, contenders measured
side by side, a training step's cost, and peak GPU memory.

Machines here are noisy, so a comparison is only made between contenders timed in the same
run, alternating call by call (:func:`interleaved`), and reported as medians with their
spread.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable

import torch

from lcm.config import LossConfig, ModelConfig, TrainConfig
from lcm.trainer import TensorBatch, build_trainer, train_step

START = time.perf_counter()  # when the benchmark script imported this module


def progress(msg: str) -> None:
    """A progress line on stdout, flushed at once so a run cut off by its time limit still
    shows it, stamped with the seconds since the script started."""
    print(f"[{time.perf_counter() - START:7.1f}s] {msg}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device = torch.device("cpu")) -> float:
    """Seconds of one call, the device's queued work included."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def interleaved(
    contenders: dict[str, Callable[[], object]], warmup: int, repeats: int, device: torch.device
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Median seconds per call of each contender (and every repeat), calls alternating
    between contenders so that a load spike hits all of them alike."""
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            times[name].append(timed(fn, device))
    return {name: statistics.median(ts) for name, ts in times.items()}, times


def spread(raw: dict[str, list[float]]) -> str:
    """Max/min of the repeats per contender: how noisy the machine was."""
    return " ".join(f"{k}:{max(v) / min(v):.2f}" for k, v in raw.items())


def step_time(
    model: ModelConfig,
    loss: LossConfig,
    train: TrainConfig,
    num_classes: int,
    steps: int,
    device: torch.device,
) -> float:
    """Median seconds of a training step (lcm.trainer) on random tensors already on the
    device: the cost of the model alone, for equal-compute comparisons."""
    torch.manual_seed(0)
    state = build_trainer(model, loss, train, num_classes, steps + 2, device)
    size = train.image_size
    images = torch.randn(train.batch_size, 3, size, size, device=device)
    targets = (torch.rand(train.batch_size, num_classes, device=device) < 0.2).float()
    batch = TensorBatch(images, targets)
    medians, _ = interleaved({"step": lambda: train_step(state, batch)}, 2, steps, device)
    return medians["step"]


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float:
    sync(device)
    if device.type != "cuda":
        return 0.0
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
