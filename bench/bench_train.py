"""Training throughput: the real shard stream against random tensors already in memory.

Both contenders run the same model and `engine.train_step` with the same batch size and
threads; the only difference is where the batches come from. The shard stream's extra cost
is the data pipeline's share of a training step (target: <= 10%). Contenders alternate for
``--repeats`` rounds and each figure is the median round.

    .venv/bin/dvc repro shard       # the demo's shards, or pass --shards
    .venv/bin/python bench/bench_train.py --steps 20
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lcm.config import load_params  # noqa: E402
from lcm.data.shards import resolve_shards, train_loader  # noqa: E402
from lcm.engine import Ema, build_optimizer, train_step  # noqa: E402
from lcm.models import build_model  # noqa: E402
from lcm.runtime import amp_dtype, select_device  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shards", default="data/shards/synth/train")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--steps", type=int, default=20, help="timed steps per round")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=None, help="default: train.num_workers")
    ap.add_argument("--arch", default=None, help="override model.arch")
    args = ap.parse_args()

    params = load_params(args.params)
    if args.arch:
        params = replace(params, model=replace(params.model, arch=args.arch))
    cfg = params.train
    workers = cfg.num_workers if args.workers is None else args.workers
    device = select_device(cfg.device)
    dtype = amp_dtype(cfg.amp, device)
    shards = resolve_shards(args.shards)
    num_classes = len(shards[1].classes)

    torch.manual_seed(0)
    model = build_model(params.model, num_classes, branch=params.loss.beta > 0).to(device).train()
    opt = build_optimizer(model, params)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    ema = Ema(model, cfg.ema_decay) if cfg.ema_decay else None

    def step(images: torch.Tensor, targets: torch.Tensor) -> None:
        train_step(model, model, images, targets, opt, sched, scaler, ema, params, device, dtype)

    images = torch.randn(cfg.batch_size, 3, cfg.image_size, cfg.image_size)
    targets = (torch.rand(cfg.batch_size, num_classes) < 0.2).float()

    def in_memory() -> float:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step(images, targets)
        return time.perf_counter() - t0

    def streamed(epoch: int) -> float:
        loader = train_loader(
            shards,
            batch_size=cfg.batch_size,
            image_size=cfg.image_size,
            seed=0,
            epoch=epoch,
            num_workers=workers,
        )
        if len(loader) < args.steps:
            raise SystemExit(f"{args.shards}: only {len(loader)} batches; lower --steps")
        t0 = time.perf_counter()  # includes starting the workers, as every epoch does
        for i, batch in enumerate(loader):
            if i == args.steps:
                break
            step(batch.images, batch.targets)
        return time.perf_counter() - t0

    in_memory()  # warm-up
    mem, real = [], []
    for r in range(args.repeats):
        mem.append(in_memory())
        real.append(streamed(r))
    t_mem, t_real = statistics.median(mem), statistics.median(real)
    n = args.steps * cfg.batch_size
    print(
        f"{params.model.arch} / {params.model.backbone} at {cfg.image_size} px, batch "
        f"{cfg.batch_size}, {torch.get_num_threads()} threads, {workers} loader workers, "
        f"{args.steps} steps x {args.repeats} rounds on {device.type}"
    )
    print(f"random tensors in memory: {n / t_mem:8.1f} images/s")
    print(f"shard stream:             {n / t_real:8.1f} images/s")
    print(
        f"data pipeline cost:       {100 * (t_real / t_mem - 1):8.1f} % of a step "
        f"(stream/memory time ratio {t_real / t_mem:.3f})"
    )


if __name__ == "__main__":
    main()
