"""GPU check: AMP training steps and batch prediction at the paper's size (run by hand).

ResNet-101 at 448 px, 80 classes, SPEC head (D=1024, 8 heads, FFN 2048, depth 3): images/s
and peak GPU memory for LCM (with and without the partial-label branch) and the `gap`
baseline, training (bf16 autocast, channels-last, AdamW) and inference. Contenders are
interleaved and each figure is the median of several timed repeats after a warm-up.

    python bench/gpu_check.py --out gpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lcm.config import LossConfig, ModelConfig, Params, TrainConfig  # noqa: E402
from lcm.engine import Ema, build_optimizer, train_step  # noqa: E402
from lcm.models import build_model  # noqa: E402
from lcm.runtime import amp_dtype  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float:
    sync(device)
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


def timed(fn, repeats: int, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("gpu.json"))
    ap.add_argument("--train-batch", type=int, default=32)
    ap.add_argument("--infer-batch", type=int, default=128)
    ap.add_argument("--image-size", type=int, default=448)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--device", default="cuda", help="cpu only for a smoke test")
    ap.add_argument("--backbone", default="resnet101")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    C, S = 80, args.image_size
    base = Params(
        model=ModelConfig(arch="lcm", backbone=args.backbone),
        loss=LossConfig(beta=0.1),
        train=TrainConfig(
            batch_size=args.train_batch,
            image_size=S,
            device=device.type,
            amp="bf16",
            channels_last=True,
            ema_decay=0.9997,
        ),
    )
    contenders = {
        "lcm (branch on, beta=0.1)": base,
        "lcm (branch off, beta=0)": replace(base, loss=replace(base.loss, beta=0.0)),
        "gap baseline": replace(base, model=replace(base.model, arch="gap")),
    }
    dtype = amp_dtype("bf16", device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report: dict = {
        "device": name,
        "torch": torch.__version__,
        "image_size": S,
        "train": {},
        "predict": {},
    }

    # ---- training steps
    setups = {}
    for name, p in contenders.items():
        torch.manual_seed(0)
        model = build_model(p.model, C, branch=p.loss.beta > 0).to(device)
        model = model.to(memory_format=torch.channels_last).train()
        opt = build_optimizer(model, p)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        scaler = torch.amp.GradScaler(device.type, enabled=False)
        ema = Ema(model, p.train.ema_decay)
        x = torch.randn(args.train_batch, 3, S, S, device=device)
        y = (torch.rand(args.train_batch, C, device=device) < 0.05).float()
        y[torch.rand_like(y) < 0.1] = -1

        def step(model=model, opt=opt, sched=sched, scaler=scaler, ema=ema, x=x, y=y, p=p):
            train_step(model, model, x, y, opt, sched, scaler, ema, p, device, dtype)

        setups[name] = (step, model)
    times: dict[str, list[float]] = {n: [] for n in contenders}
    peaks: dict[str, float] = {}
    for name, (step, _) in setups.items():  # warm-up (cudnn autotune) and peak memory
        reset_peak(device)
        for _ in range(3):
            step()
        peaks[name] = peak_gib(device)
    for _ in range(args.repeats):
        for name, (step, _) in setups.items():
            times[name].append(timed(step, args.steps, device))
    for name in contenders:
        t = statistics.median(times[name])
        report["train"][name] = {
            "batch": args.train_batch,
            "s_per_step": t,
            "images_per_s": args.train_batch / t,
            "peak_gib_incl_other_models": peaks[name],
        }
    del setups
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # ---- batch prediction
    preds = {}
    for name in ("lcm (branch on, beta=0.1)", "gap baseline"):
        p = contenders[name]
        torch.manual_seed(0)
        model = build_model(p.model, C, branch=False).to(device)
        model = model.to(memory_format=torch.channels_last).eval()
        x = torch.randn(args.infer_batch, 3, S, S, device=device).contiguous(
            memory_format=torch.channels_last
        )

        @torch.inference_mode()
        def infer(model=model, x=x):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype is not None):
                torch.sigmoid(model(x).logits.float())

        preds[name.split(" ")[0]] = infer
    ptimes: dict[str, list[float]] = {n: [] for n in preds}
    ppeaks = {}
    for name, fn in preds.items():
        reset_peak(device)
        for _ in range(3):
            fn()
        ppeaks[name] = peak_gib(device)
    for _ in range(args.repeats):
        for name, fn in preds.items():
            ptimes[name].append(timed(fn, args.steps, device))
    for name in preds:
        t = statistics.median(ptimes[name])
        report["predict"][name] = {
            "batch": args.infer_batch,
            "s_per_batch": t,
            "images_per_s": args.infer_batch / t,
            "peak_gib_incl_other_models": ppeaks[name],
        }
    tr = report["train"]
    report["ratios"] = {
        "train_lcm_over_gap_time": tr["lcm (branch on, beta=0.1)"]["s_per_step"]
        / tr["gap baseline"]["s_per_step"],
        "train_branch_on_over_off_time": tr["lcm (branch on, beta=0.1)"]["s_per_step"]
        / tr["lcm (branch off, beta=0)"]["s_per_step"],
        "predict_lcm_over_gap_time": report["predict"]["lcm"]["s_per_batch"]
        / report["predict"]["gap"]["s_per_batch"],
        "paper_mac_ratio": 35.8 / 31.5,
    }
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
