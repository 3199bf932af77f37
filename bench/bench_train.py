"""Training throughput: the real shard stream against random tensors already in memory.

Both contenders run the same training state (`lcm.trainer`) with the same batch size and
threads; the only difference is where the batches come from. The shard stream's extra cost
is the data pipeline's share of a training step (target: <= 10%). Contenders alternate for
``--repeats`` rounds and each figure is the median round. The stream is measured for each
loader worker count of ``--workers`` (the workers compete with the training threads for the
cores), and the best count on this machine is reported.

    .venv/bin/dvc repro shard       # the demo's shards, or pass --shards
    .venv/bin/python bench/bench_train.py --steps 20 --workers 0 1 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lcm.config import load_params  # noqa: E402
from lcm.data.shards import resolve_shards, train_loader  # noqa: E402
from lcm.engine import batch_delivery  # noqa: E402
from lcm.runtime import select_device  # noqa: E402
from lcm.trainer import TensorBatch, build_trainer, train_step  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shards", default="data/shards/synth/train")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--steps", type=int, default=20, help="timed steps per round")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--workers", type=int, nargs="+", default=None, help="default: train.num_workers"
    )
    ap.add_argument("--arch", default=None, help="override model.arch")
    args = ap.parse_args()

    params = load_params(args.params)
    if args.arch:
        params = replace(params, model=replace(params.model, arch=args.arch))
    cfg = params.train
    counts = args.workers if args.workers is not None else [cfg.num_workers]
    device = select_device(cfg.device)
    shards = resolve_shards(args.shards)
    num_classes = len(shards[1].classes)

    torch.manual_seed(0)
    state = build_trainer(params.model, params.loss, cfg, num_classes, 10**6, device)
    images = torch.randn(cfg.batch_size, 3, cfg.image_size, cfg.image_size)
    targets = (torch.rand(cfg.batch_size, num_classes) < 0.2).float()
    in_memory_batch = TensorBatch(images, targets)

    def in_memory() -> float:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            train_step(state, in_memory_batch)
        return time.perf_counter() - t0

    def streamed(epoch: int, workers: int) -> float:
        loader = train_loader(
            shards,
            batch_size=cfg.batch_size,
            image_size=cfg.image_size,
            seed=0,
            epoch=epoch,
            num_workers=workers,
            **batch_delivery(cfg, device),
        )
        if len(loader) < args.steps:
            raise SystemExit(f"{args.shards}: only {len(loader)} batches; lower --steps")
        t0 = time.perf_counter()  # includes starting the workers, as every epoch does
        for i, batch in enumerate(loader):
            if i == args.steps:
                break
            train_step(state, batch)
        return time.perf_counter() - t0

    in_memory()  # warm-up
    mem: list[float] = []
    real: dict[int, list[float]] = {w: [] for w in counts}
    for r in range(args.repeats):
        mem.append(in_memory())
        for w in counts:
            real[w].append(streamed(r, w))
    t_mem = statistics.median(mem)
    n = args.steps * cfg.batch_size
    print(
        f"{params.model.arch} / {params.model.backbone} at {cfg.image_size} px, batch "
        f"{cfg.batch_size}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, "
        f"{args.steps} steps x {args.repeats} rounds on {device.type}"
    )
    print(f"random tensors in memory:        {n / t_mem:8.1f} images/s")
    for w in counts:
        t_real = statistics.median(real[w])
        print(
            f"shard stream, {w} loader workers: {n / t_real:8.1f} images/s, data pipeline "
            f"{100 * (t_real / t_mem - 1):5.1f} % of a step (time ratio {t_real / t_mem:.3f})"
        )
    best = min(counts, key=lambda w: statistics.median(real[w]))
    print(f"best worker count here: {best} (train.num_workers is {cfg.num_workers})")


if __name__ == "__main__":
    main()
