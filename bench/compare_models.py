"""LCM against the `gap` baseline on the synthetic benchmark: the README's results table.

Trains both architectures with the same backbone, image size, data and optimiser, for several
seeds, and compares them three ways:
  1. equal epochs;
  2. equal training compute: the baseline gets as many more epochs as one LCM training step
     costs more than one baseline step on this machine (measured side by side, same batch);
  3. a small training set (the first N training images).
Reported per setting: mean +/- std val mAP of the raw weights (the fixed choice; EMA is listed
separately, never the better of the two) and mean AP of the look-alike and tiny classes.

    python bench/compare_models.py --out bench/results/compare        # full study (GPU: minutes)
    python bench/compare_models.py --quick --out /tmp/compare-quick   # smoke run on a CPU

One script (a little over 300 lines) because the settings, the job scheduling and the table
are read together when checking how a README figure was made.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.timing import progress, step_time  # noqa: E402
from lcm.config import LossConfig, ModelConfig, Params, TrainConfig  # noqa: E402
from lcm.data.coco import prepare_coco  # noqa: E402
from lcm.data.manifest import read_manifest, write_manifest  # noqa: E402
from lcm.data.shard_writer import write_shards  # noqa: E402
from lcm.data.shards import eval_loader, resolve_shards  # noqa: E402
from lcm.data.synthetic import generate_synthetic  # noqa: E402
from lcm.engine import fit  # noqa: E402
from lcm.inference import predict  # noqa: E402
from lcm.io import atomic_write_json  # noqa: E402
from lcm.metrics import evaluate_scores  # noqa: E402
from lcm.runtime import select_device  # noqa: E402
from lcm.training import TrainRequest  # noqa: E402

log = logging.getLogger("compare")


def build_data(root: Path, n_train: int, n_val: int, size: int, small: int, seed: int) -> dict:
    """Synthetic benchmark -> prepared -> shards, plus a small-train subset; cached in root."""
    raw = root / "raw"
    if not (raw / "annotations" / "instances_val.json").exists():
        generate_synthetic(
            raw,
            n_train=n_train,
            n_val=n_val,
            size=size,
            seed=seed,
            workers=min(8, multiprocessing.cpu_count()),
        )
    out = {}
    for split in ("train", "val"):
        prepared, shards = root / "prepared" / split, root / "shards" / split
        if not (shards / "_info.json").exists():
            prepare_coco(
                raw / "annotations" / f"instances_{split}.json", raw / "images" / split, prepared
            )
            write_shards(prepared, raw / "images" / split, shards, max_side=None, shard_size=500)
        out[split] = shards
    small_shards = root / "shards" / f"train-{small}"
    if not (small_shards / "_info.json").exists():
        manifest = read_manifest(root / "prepared" / "train")
        write_manifest(
            root / "prepared" / f"train-{small}", manifest.classes, manifest.records()[:small]
        )
        write_shards(
            root / "prepared" / f"train-{small}",
            raw / "images" / "train",
            small_shards,
            max_side=None,
            shard_size=500,
        )
    out["small"] = small_shards
    out["meta"] = json.loads((raw / "annotations" / "synth_meta.json").read_text())
    return out


def group_ap(per_class: dict[str, float], names: list[str]) -> float:
    vals = [per_class[n] for n in names if per_class.get(n) is not None]
    return float(np.mean(vals)) if vals else float("nan")


def run_one(params: Params, train: Path, val: Path, out: Path, meta: dict) -> dict:
    """Train one model (no per-epoch validation), then evaluate raw and EMA weights on val."""
    from lcm.checkpoint import load_for_inference

    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s [{out.name}] %(message)s", force=True
    )
    device = select_device(params.train.device)
    t0 = time.perf_counter()
    result = fit(TrainRequest(params, str(train), out))
    seconds = time.perf_counter() - t0

    row = {"seconds": seconds, "epochs": params.train.epochs, "history": result.history}
    loader = eval_loader(
        resolve_shards(val),
        batch_size=256,
        image_size=params.train.image_size,
        num_workers=params.train.num_workers,
    )
    for which in ("raw", "ema"):
        loaded = load_for_inference(out, which, device)
        model, m = loaded.model, loaded.meta
        _, scores, targets = predict(model, loader, device)
        res = evaluate_scores(scores, targets, m.classes)
        per_class = {c.name: c.ap for c in res.per_class}
        lookalikes = [n for pair in meta["lookalike_pairs"] for n in pair["classes"]]
        row[which] = {
            "mAP": res.mAP,
            "lookalike_AP": group_ap(per_class, lookalikes),
            "tiny_AP": group_ap(per_class, list(meta["tiny_classes"])),
            "per_class": per_class,
        }
    return row


def summarise(rows: list[dict], key: str, which: str = "raw") -> str:
    vals = np.array([100 * r[which][key] for r in rows], dtype=float)
    sd = float(np.nanstd(vals, ddof=1)) if len(vals) > 1 else 0.0
    return f"{float(np.nanmean(vals)):.1f} ± {sd:.1f}"


def write_table(args: argparse.Namespace, plan: list, runs: dict, ratio: float, device) -> str:
    order = [f"{setting}|{arch}" for arch, setting, _, _ in plan]
    runs = {k: sorted(runs[k], key=lambda r: r["seed"]) for k in order if k in runs}

    lines = [
        f"Synthetic benchmark, {args.n_train} train / {args.n_val} val images at {args.size} px, "
        f"{args.backbone} from scratch, batch {args.batch_size}, AdamW + OneCycle lr {args.lr}, "
        f"seeds {args.seeds}, {args.jobs} runs at a time on {_device_name(device)}; "
        f"mAP of the final weights on the {args.n_val} val images.",
        f"Equal compute: one LCM step costs {ratio:.2f}x a gap step here, so gap trains "
        f"{max(1, round(args.epochs * ratio))} epochs against LCM's {args.epochs}.",
        "",
        "| setting | model | epochs | mAP (raw) | mAP (EMA) | look-alike AP | tiny AP "
        "| train time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, rows in runs.items():
        setting, arch = key.split("|")
        secs = statistics.mean(r["seconds"] for r in rows)
        lines.append(
            f"| {setting} | {arch} | {rows[0]['epochs']} | {summarise(rows, 'mAP')} | "
            f"{summarise(rows, 'mAP', 'ema')} | {summarise(rows, 'lookalike_AP')} | "
            f"{summarise(rows, 'tiny_AP')} | {secs:.0f} |"
        )
    table = "\n".join(lines)
    (args.out / "table.md").write_text(table + "\n")
    return table


def _names(pending: list) -> list[str]:
    return [f"{s.replace(' ', '-')}-{a}-s{seed}" for _, (a, s, _, _, seed) in pending]


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "compare")
    ap.add_argument("--data", type=Path, default=None, help="data cache (default OUT/data)")
    ap.add_argument("--runs-dir", type=Path, default=None, help="model dirs (default OUT/runs)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--n-train", type=int, default=4000)
    ap.add_argument("--n-val", type=int, default=1000)
    ap.add_argument("--small", type=int, default=1000)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=None, help="default: 2 * dim")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument(
        "--small-epochs",
        type=int,
        default=None,
        help="epochs on the small set (default: as many steps as the full set)",
    )
    ap.add_argument("--jobs", type=int, default=1, help="runs at once (one GPU fits several)")
    ap.add_argument("--parts", nargs="+", default=["epochs", "compute", "small"])
    ap.add_argument("--quick", action="store_true", help="tiny smoke settings")
    ap.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds: runs whose estimate no longer fits are skipped (listed in runs.json)",
    )
    args = ap.parse_args()
    started = time.perf_counter()
    if args.quick:
        args.seeds, args.epochs, args.n_train, args.n_val, args.small = [0, 1], 1, 256, 128, 128
        args.batch_size, args.dim, args.size = 32, 64, 64
    if args.ffn is None:
        args.ffn = 2 * args.dim
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    data = build_data(
        args.data or args.out / "data", args.n_train, args.n_val, args.size, args.small, seed=0
    )
    device = select_device(args.device)
    base = Params(
        model=ModelConfig(
            arch="lcm", backbone=args.backbone, dim=args.dim, heads=8, ffn=2 * args.dim, depth=3
        ),
        loss=LossConfig(),
        train=TrainConfig(
            epochs=args.epochs,
            batch_size=args.batch_size,
            image_size=args.size,
            lr=args.lr,
            device=args.device,
            num_workers=args.workers,
            ema_decay=0.998,
        ),
    )

    def params_for(arch: str, seed: int, epochs: int) -> Params:
        return replace(
            base,
            model=replace(base.model, arch=arch),
            train=replace(base.train, seed=seed, epochs=epochs),
        )

    # One step of each architecture, side by side: the exchange rate for "equal compute".
    classes = len(data["meta"]["classes"])
    t_lcm, t_gap = (
        step_time(p.model, p.loss, p.train, classes, 6, device)
        for p in (params_for("lcm", 0, 1), params_for("gap", 0, 1))
    )
    ratio = t_lcm / t_gap
    log.info("training step: lcm %.4f s, gap %.4f s, ratio %.2f", t_lcm, t_gap, ratio)

    runs: dict[str, list[dict]] = {}
    plan = []
    if "epochs" in args.parts:
        plan += [
            ("lcm", "equal epochs", data["train"], args.epochs),
            ("gap", "equal epochs", data["train"], args.epochs),
        ]
    if "compute" in args.parts:
        plan += [("gap", "equal compute", data["train"], max(1, round(args.epochs * ratio)))]
    small_epochs = args.small_epochs or max(1, round(args.epochs * args.n_train / args.small))
    if "small" in args.parts:
        plan += [
            ("lcm", f"{args.small} train images", data["small"], small_epochs),
            ("gap", f"{args.small} train images", data["small"], small_epochs),
        ]
    jobs = [
        (arch, setting, train, epochs, seed)
        for arch, setting, train, epochs in plan
        for seed in args.seeds
    ]
    step_s = {"lcm": t_lcm, "gap": t_gap}
    sizes = {data["train"]: args.n_train, data["small"]: args.small}

    observed: list[float] = []  # wall seconds / estimate of the finished runs

    def estimate(arch: str, train: Path, epochs: int) -> float:
        """Seconds of one run: its steps at the measured step time, plus 30 % for loading
        and evaluation, corrected by how the finished runs compared with their estimates
        (process start, evaluation); a guide for --budget, printed beside every run."""
        return raw_estimate(arch, train, epochs) * (
            statistics.median(observed) if observed else 1.0
        )

    def raw_estimate(arch: str, train: Path, epochs: int) -> float:
        return 1.3 * epochs * (sizes[train] // args.batch_size) * step_s[arch]

    total = sum(estimate(a, t, e) for a, _, t, e, _ in jobs) / args.jobs
    progress(
        f"{len(jobs)} runs, about {total:.0f} s at {args.jobs} at a time on {_device_name(device)}"
    )
    results = args.out / "runs.json"
    skipped: list[str] = []
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool:
        futures: dict = {}
        pending = list(enumerate(jobs, start=1))

        def submit_next() -> None:
            while pending and len(futures) < args.jobs:
                i, (arch, setting, train, epochs, seed) = pending.pop(0)
                name = f"{setting.replace(' ', '-')}-{arch}-s{seed}"
                est = estimate(arch, train, epochs)
                left = args.budget - (time.perf_counter() - started) if args.budget else None
                if left is not None and est > left:
                    skipped.append(name)
                    progress(f"[{i}/{len(jobs)}] skip {name}: ~{est:.0f} s > {left:.0f} s left")
                    continue
                progress(f"[{i}/{len(jobs)}] start {name} ({epochs} epochs, ~{est:.0f} s)")
                fut = pool.submit(
                    run_one,
                    params_for(arch, seed, epochs),
                    train,
                    data["val"],
                    (args.runs_dir or args.out / "runs") / name,
                    data["meta"],
                )
                raw = raw_estimate(arch, train, epochs)
                futures[fut] = (arch, setting, seed, name, i, raw, time.perf_counter())

        submit_next()
        while futures:
            fut = next(as_completed(futures))
            arch, setting, seed, name, i, raw, t_submit = futures.pop(fut)
            row = fut.result()
            if args.jobs == 1:  # with several at once the wall time includes waiting
                observed.append((time.perf_counter() - t_submit) / max(raw, 1e-3))
            row.update(arch=arch, setting=setting, seed=seed)
            progress(
                f"[{i}/{len(jobs)}] done {name}: mAP {row['raw']['mAP']:.4f} "
                f"(EMA {row['ema']['mAP']:.4f}) in {row['seconds']:.0f} s"
            )
            runs.setdefault(f"{setting}|{arch}", []).append(row)
            atomic_write_json(
                results,
                {"runs": runs, "skipped": skipped, "not_started": _names(pending)},
                indent=1,
            )
            write_table(args, plan, runs, ratio, device)
            submit_next()
    atomic_write_json(results, {"runs": runs, "skipped": skipped}, indent=1)
    if skipped:
        progress(f"skipped for the budget: {', '.join(skipped)}")
    print(write_table(args, plan, runs, ratio, device))


if __name__ == "__main__":
    main()
