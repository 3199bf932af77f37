"""Side-by-side timings (CPU by default): LCM vs the gap baseline, and the branch's cost.

Run by hand (not part of the test suite):

    .venv/bin/python bench/bench_model.py            # full run, a few minutes on 2 cores
    .venv/bin/python bench/bench_model.py --quick    # resnet18 rows only
    .venv/bin/python bench/bench_model.py --variant default lcm_v5s --inference-only

Inference: LCM vs ``gap`` at ResNet-101 / 448 px / batch 4 and ResNet-18 / 224 px / batch 32;
the measured time ratio is printed beside the MAC ratio from ``model_report`` for the same
setting (the paper's, ResNet-101 at 448, is 35.8 / 31.5 = 1.14).
Training: one optimizer step of LCM with the branch (beta > 0) against without (beta = 0);
SPEC expects the ratio to stay at or below 1.3.

Each contender gets warm-up calls, then the contenders alternate call by call and the median
of the repeats is reported, so a load spike from another process hits both sides alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.timing import interleaved, spread  # noqa: E402
from lcm.config import FIRST_RECONSTRUCTION, LCM_V1S, LossConfig, ModelConfig, TrainConfig  # noqa: E402
from lcm.models import build_model  # noqa: E402
from lcm.models.complexity import model_report  # noqa: E402
from lcm.trainer import TensorBatch, build_trainer, train_step  # noqa: E402

PAPER_MAC_RATIO = 35.8 / 31.5


def _v1s(base: ModelConfig) -> ModelConfig:
    return dataclasses.replace(base, **LCM_V1S, ffn=base.ffn * 3 // 4)


VARIANTS: dict[str, Callable[[ModelConfig], ModelConfig]] = {
    "default": lambda base: base,
    "first": lambda base: dataclasses.replace(base, **FIRST_RECONSTRUCTION),
    "lcm_v1s": _v1s,
    "lcm_v5s": lambda base: dataclasses.replace(_v1s(base), context_read="attend_map"),
}


def _setting(cfg: ModelConfig, size: int, batch: int, name: str) -> str:
    """A row's label: backbone, input, batch, width, and the variant unless the default."""
    tag = "" if name == "default" else f" {name}"
    return f"{cfg.backbone} {size}px b{batch} D{cfg.dim}{tag}"


def bench_inference(
    cfgs: dict[str, ModelConfig], classes: int, size: int, batch: int, args
) -> list[dict]:
    """One row per LCM configuration in ``cfgs`` (name -> config), every one timed in the same
    interleaved run as one ``gap`` model on the same backbone."""
    torch.manual_seed(0)
    device = torch.device(args.device)
    first = next(iter(cfgs.values()))
    models = {name: build_model(cfg, classes).eval().to(device) for name, cfg in cfgs.items()}
    models["gap"] = build_model(dataclasses.replace(first, arch="gap"), classes).eval().to(device)
    images = torch.randn(batch, 3, size, size, device=device)

    def run(model: torch.nn.Module) -> Callable[[], None]:
        def call() -> None:
            with torch.inference_mode():
                model(images)

        return call

    medians, raw = interleaved(
        {name: run(m) for name, m in models.items()}, args.warmup, args.repeats, device
    )
    rows = []
    for name, cfg in cfgs.items():
        fields = dataclasses.asdict(cfg)
        del fields["backbone"], fields["depth"]
        report = model_report(cfg.backbone, classes, size, cfg.depth, **fields)
        rows.append({
            "setting": _setting(cfg, size, batch, name),
            "a": medians[name],
            "b": medians["gap"],
            "ratio": medians[name] / medians["gap"],
            "mac_ratio": report["gmacs"] / report["baseline"]["gmacs"],
            "spread": spread({k: raw[k] for k in (name, "gap")}),
        })  # fmt: skip
    return rows


def bench_train_step(
    cfg: ModelConfig, classes: int, size: int, batch: int, args, name: str = "default"
) -> dict:
    device = torch.device(args.device)
    train = TrainConfig(
        lr=1e-4, ema_decay=None, grad_clip=None, scheduler="constant", amp="off", device=device.type
    )
    images = torch.randn(batch, 3, size, size, device=device)
    targets = torch.randint(0, 2, (batch, classes), device=device).float()
    data = TensorBatch(images, targets)

    def step(beta: float) -> Callable[[], None]:
        torch.manual_seed(0)  # the same initial weights for both contenders
        state = build_trainer(cfg, LossConfig(beta=beta), train, classes, 10**6, device)
        return lambda: train_step(state, data)

    medians, raw = interleaved(
        {"branch": step(0.1), "plain": step(0.0)}, args.warmup, args.train_repeats, device
    )
    return {
        "setting": _setting(cfg, size, batch, name),
        "a": medians["branch"],
        "b": medians["plain"],
        "ratio": medians["branch"] / medians["plain"],
        "spread": spread(raw),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--classes", type=int, default=80)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="inference repeats")
    parser.add_argument("--train-repeats", type=int, default=3, help="training-step repeats")
    parser.add_argument("--r101-repeats", type=int, default=2, help="repeats for ResNet-101")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help="skip the ResNet-101 rows")
    parser.add_argument("--device", default="cpu", help="cpu (the reference) or cuda")
    parser.add_argument(
        "--variant",
        nargs="+",
        choices=list(VARIANTS),
        default=["default"],
        help="the LCM configurations timed against gap, all in the same interleaved run: the "
        "default (ModelConfig's), the first reconstruction, lcm.config.LCM_V1S or lcm_v5s "
        "(LCM_V1S reading the feature map: context_read attend_map); the last two with the "
        "FFN narrowed x0.75, as in bench/compare_models.py",
    )
    parser.add_argument("--inference-only", action="store_true", help="skip the training rows")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(
        f"torch {torch.__version__}, {where}, {torch.get_num_threads()} CPU threads, "
        f"{args.classes} classes"
    )

    base = ModelConfig(arch="lcm", depth=3, dropout=0.1)
    variants = {name: VARIANTS[name](base) for name in dict.fromkeys(args.variant)}
    r101_args = argparse.Namespace(
        **{**vars(args), "repeats": args.r101_repeats, "train_repeats": args.r101_repeats}
    )

    def on(backbone: str) -> dict[str, ModelConfig]:
        return {n: dataclasses.replace(c, backbone=backbone) for n, c in variants.items()}

    infer = bench_inference(on("resnet18"), args.classes, 224, 32, args)
    train = []
    if not args.inference_only:
        for name, cfg in on("resnet18").items():
            train += [
                bench_train_step(cfg, args.classes, 224, 4, args, name),
                bench_train_step(
                    dataclasses.replace(cfg, dim=256, ffn=512), args.classes, 224, 4, args, name
                ),
            ]
    if not args.quick:
        infer = bench_inference(on("resnet101"), args.classes, 448, 4, r101_args) + infer
        if not args.inference_only:
            train = [
                bench_train_step(cfg, args.classes, 448, 1, r101_args, name)
                for name, cfg in on("resnet101").items()
            ] + train

    print(f"\nInference, median s/batch (paper MAC ratio {PAPER_MAC_RATIO:.2f})")
    print(f"{'setting':<34} {'lcm':>8} {'gap':>8} {'ratio':>6} {'MACs':>6}  max/min")
    for r in infer:
        print(
            f"{r['setting']:<34} {r['a']:8.3f} {r['b']:8.3f} {r['ratio']:6.3f} "
            f"{r['mac_ratio']:6.3f}  {r['spread']}"
        )
    if not train:
        return
    print(
        "\nTraining step (AdamW), median s/step: branch (beta 0.1) vs none (beta 0); target <= 1.3"
    )
    print(f"{'setting':<34} {'branch':>8} {'none':>8} {'ratio':>6}  max/min")
    for r in train:
        print(f"{r['setting']:<34} {r['a']:8.3f} {r['b']:8.3f} {r['ratio']:6.3f}  {r['spread']}")


if __name__ == "__main__":
    main()
