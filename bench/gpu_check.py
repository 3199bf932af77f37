"""GPU check: training and prediction throughput at the paper's size, and the speed-up table.

One script, one call (under 8 minutes on one H100 / H200), run by hand:

    PYTHONUNBUFFERED=1 python bench/gpu_check.py --out gpu.json

It writes JPEG shards of photo-sized images (640 x 480, noisy enough to cost what photos cost
to decode), then measures with the real shard stream feeding the model (nothing held in
memory between steps):

1. training images/s of LCM (partial-label branch on) and the `gap` baseline at ResNet-101,
   448 px, bf16, channels-last, every speed-up on, and their time ratio;
2. batch prediction images/s end to end from the shards (decode included), plus the model
   alone on tensors already on the GPU;
3. the speed-up ablation: LCM with each speed-up switched off in turn, everything off (the
   old configuration), `torch.compile` (compile time and steady rate), and the time a
   checkpoint blocks training, written in the foreground or handed to the background writer;
4. how far GPU decoding moves pixels and scores from the CPU decoder;
5. a `torch.profiler` table of one training step, before and after the speed-ups.

Peak GPU memory comes with every figure. Every step logs as it goes and rewrites the JSON, so
a run cut off by its time limit still returns what finished; ``--budget`` skips what would
not fit. ``--device cpu --smoke`` runs the whole script at toy size on a CPU (the test suite
does, so it cannot rot between GPU sessions).

It is one long file on purpose: the whole check must travel to a lent GPU machine and run in
one call, so every step and its reporting live here, on top of bench/timing.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.timing import START, peak_gib, progress, reset_peak, sync  # noqa: E402
from lcm import checkpoint as ckpt  # noqa: E402
from lcm.config import LossConfig, ModelConfig, TrainConfig  # noqa: E402
from lcm.data.manifest import ImageRecord, write_manifest  # noqa: E402
from lcm.data.shard_writer import write_shards  # noqa: E402
from lcm.data.shards import eval_loader, resolve_shards, train_loader  # noqa: E402
from lcm.engine import batch_delivery  # noqa: E402
from lcm.inference import score_batches  # noqa: E402
from lcm.io import atomic_write_json  # noqa: E402
from lcm.models import build_model  # noqa: E402
from lcm.models.fold import fold_batchnorm  # noqa: E402
from lcm.resume import ResumeState  # noqa: E402
from lcm.runtime import amp_dtype  # noqa: E402
from lcm.trainer import TensorBatch, build_trainer, train_step  # noqa: E402

NUM_CLASSES = 80
SPEEDUPS = (
    "ema_foreach",
    "fused_optimizer",
    "cudnn_benchmark",
    "pin_memory",
    "gpu_decode",
    "checkpoint_async",
)


@dataclass(frozen=True)
class Size:
    backbone: str
    image_size: int
    train_batch: int
    predict_batch: int
    images: int  # written to the shards
    photo: tuple[int, int]  # (width, height) of the JPEGs
    warm_steps: int
    timed_steps: int
    dim: int
    ffn: int


FULL = Size("resnet101", 448, 64, 128, 6144, (640, 480), 8, 30, 1024, 2048)
SMOKE = Size("resnet18", 32, 4, 16, 96, (40, 30), 1, 2, 32, 64)


class Report:
    """The results JSON, rewritten after every step."""

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path, self.data = path, data

    def put(self, section: str, name: str, value: Any) -> None:
        self.data.setdefault(section, {})[name] = value
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path, self.data)


# ------------------------------------------------------------------------------------- data
def _photo(args: tuple[int, tuple[int, int], str]) -> int:
    """A JPEG with a photo's decode cost: smooth colour fields, edges and sensor-like noise."""
    i, (w, h), path = args
    rng = np.random.default_rng(i)
    coarse = rng.integers(0, 256, (h // 40 + 2, w // 40 + 2, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC), np.int16)
    for _ in range(6):
        x, y = rng.integers(0, w - 20), rng.integers(0, h - 20)
        img[y : y + rng.integers(10, h // 2), x : x + rng.integers(10, w // 2)] = rng.integers(
            0, 256, 3
        )
    img = img + rng.normal(0, 8, img.shape).astype(np.int16)
    buf = BytesIO()
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    Path(path).write_bytes(buf.getvalue())
    return len(buf.getvalue())


def make_shards(root: Path, size: Size, workers: int) -> tuple[Path, dict[str, Any]]:
    images, prepared, shards = root / "images", root / "prepared", root / "shards"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    records, jobs = [], []
    for i in range(size.images):
        rel = f"img{i:06d}.jpg"
        labels = tuple(int(c) for c in np.flatnonzero(rng.random(NUM_CLASSES) < 0.04))
        records.append(ImageRecord(f"img{i:06d}", rel, labels, (), *size.photo))
        jobs.append((i, size.photo, str(images / rel)))
    with ProcessPoolExecutor(workers) as pool:
        sizes = list(pool.map(_photo, jobs, chunksize=32))
    write_manifest(prepared, [f"class{c:02d}" for c in range(NUM_CLASSES)], records)
    write_shards(prepared, images, shards, max_side=None, shard_size=512, workers=workers)
    return shards, {
        "images": size.images,
        "photo": size.photo,
        "mean_jpeg_kb": round(float(np.mean(sizes)) / 1e3, 1),
    }


# ------------------------------------------------------------------------------- measuring
def train_config(size: Size, device: torch.device, **switches: Any) -> TrainConfig:
    return TrainConfig(
        batch_size=switches.pop("batch_size", size.train_batch),
        image_size=size.image_size,
        device=device.type,
        amp="bf16",
        channels_last=True,
        ema_decay=0.9997,
        lr=1e-4,  # from a random init at a constant rate (no warm-up): 1e-3 can diverge
        scheduler="constant",
        **switches,
    )


def model_config(size: Size, arch: str) -> ModelConfig:
    return ModelConfig(arch=arch, backbone=size.backbone, dim=size.dim, ffn=size.ffn)


def _train_stream(
    shards: Any, size: Size, cfg: TrainConfig, device: torch.device, workers: int, epoch: int
) -> Any:
    """The training shard stream as `lcm train` builds it for this config and device."""
    return train_loader(
        shards,
        batch_size=cfg.batch_size,
        image_size=size.image_size,
        seed=0,
        epoch=epoch,
        num_workers=workers,
        **batch_delivery(cfg, device),
    )


def measure_train(
    shards: Any,
    size: Size,
    arch: str,
    cfg: TrainConfig,
    device: torch.device,
    workers: int,
    beta: float = 0.1,
    compiled: bool = False,
) -> dict[str, Any]:
    """Images/s of real training steps fed by the shard stream (after warm-up steps)."""
    reset_peak(device)
    torch.manual_seed(0)
    total = size.warm_steps + size.timed_steps
    state = build_trainer(
        model_config(size, arch), LossConfig(beta=beta), cfg, NUM_CLASSES, total, device
    )
    loader = _train_stream(shards, size, cfg, device, workers, epoch=0)
    if len(loader) < total:
        raise SystemExit(f"{len(loader)} batches per epoch; need {total}")
    it = iter(loader)
    t_first = time.perf_counter()
    for i in range(size.warm_steps):
        train_step(state, next(it))
        if i == 0:
            sync(device)
            first_step = time.perf_counter() - t_first  # compile time when compiled
    sync(device)
    t0 = time.perf_counter()
    for _ in range(size.timed_steps):
        loss = train_step(state, next(it))
    sync(device)
    dt = time.perf_counter() - t0
    del it, loader
    out = {
        "batch": cfg.batch_size,
        "images_per_s": round(size.timed_steps * cfg.batch_size / dt, 1),
        "ms_per_step": round(1000 * dt / size.timed_steps, 2),
        "peak_gib": peak_gib(device),
        "loss": round(float(loss), 4),
        "loss_finite": bool(torch.isfinite(loss)),
        "workers": workers,
    }
    if compiled:
        out["first_step_s"] = round(first_step, 1)
    return out, state


def measure_stream(
    shards: Any, size: Size, cfg: TrainConfig, device: torch.device, workers: int
) -> float:
    """Images/s of the training shard stream alone (no model)."""
    loader = _train_stream(shards, size, cfg, device, workers, epoch=1)
    it = iter(loader)
    for _ in range(size.warm_steps):
        next(it)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(size.timed_steps):
        next(it)
    sync(device)
    return round(size.timed_steps * cfg.batch_size / (time.perf_counter() - t0), 1)


def inference_model(
    size: Size, arch: str, device: torch.device, fold: bool = False
) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(model_config(size, arch), NUM_CLASSES, branch=False).to(device).eval()
    if fold:
        fold_batchnorm(model)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def measure_predict(
    shards: Any,
    size: Size,
    arch: str,
    device: torch.device,
    workers: int,
    gpu_decode: bool,
    fold: bool = False,
    batch: int | None = None,
) -> dict[str, Any]:
    """Images/s of batch prediction from the shards, decode included (sigmoid scores back on
    the host, as `lcm batch-predict` gets them)."""
    reset_peak(device)
    size = replace(size, predict_batch=batch or size.predict_batch)
    model = inference_model(size, arch, device, fold)
    dtype = amp_dtype("bf16", device)
    cfg = train_config(size, device, gpu_decode=gpu_decode)
    loader = eval_loader(
        shards,
        batch_size=size.predict_batch,
        image_size=size.image_size,
        num_workers=workers,
        **batch_delivery(cfg, device),
    )
    warm = min(3, size.images // size.predict_batch - 2)  # at least one timed batch
    n, t0 = 0, 0.0
    for i, scored in enumerate(score_batches(model, loader, device, dtype)):
        if i == warm:
            t0 = time.perf_counter()
        elif i > warm:
            n += len(scored.keys)
    dt = time.perf_counter() - t0
    return {
        "batch": size.predict_batch,
        "images_per_s": round(n / dt, 1),
        "images_timed": n,
        "peak_gib": peak_gib(device),
        "workers": workers,
        "decode": "gpu" if gpu_decode and device.type == "cuda" else "cpu workers",
    }


@torch.inference_mode()
def measure_model_only(
    size: Size, arch: str, device: torch.device, fold: bool = False, batch: int | None = None
) -> dict[str, Any]:
    reset_peak(device)
    size = replace(size, predict_batch=batch or size.predict_batch)
    model = inference_model(size, arch, device, fold)
    x = torch.randn(size.predict_batch, 3, size.image_size, size.image_size, device=device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    dtype = amp_dtype("bf16", device)

    def run() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype is not None):
            torch.sigmoid(model(x).logits.float())

    for _ in range(3):
        run()
    sync(device)
    reps = max(4, size.timed_steps // 4)
    t0 = time.perf_counter()
    for _ in range(reps):
        run()
    sync(device)
    dt = time.perf_counter() - t0
    return {"images_per_s": round(reps * size.predict_batch / dt, 1), "peak_gib": peak_gib(device)}


def checkpoint_timing(state: Any, root: Path) -> dict[str, Any]:
    """Seconds a checkpoint blocks training: written in the foreground, or snapshotted to
    host memory and handed to the background writer (what `train.checkpoint_async` does)."""
    out = root / "ckpt"
    meta = ckpt.ModelMeta(ModelConfig(), ("x",), 0, (0.0,) * 3, (1.0,) * 3, {})

    def snapshot() -> tuple[Any, Any, ResumeState]:
        raw = ckpt.plain_state(state.model)
        ema = ckpt.plain_state(state.ema.module) if state.ema else None
        return raw, ema, ResumeState.capture(state, epoch=1, batch=0, step=1)

    t0 = time.perf_counter()
    raw, ema, full = snapshot()
    ckpt.save_weights(out, raw, meta, ema)
    full.save(out)
    foreground = time.perf_counter() - t0
    t0 = time.perf_counter()
    raw, ema, full = snapshot()
    full = full.to_cpu()
    blocking = time.perf_counter() - t0
    t0 = time.perf_counter()
    ckpt.save_weights(out, raw, meta, ema)
    full.save(out)
    background = time.perf_counter() - t0
    mb = sum(f.stat().st_size for f in out.iterdir()) / 1e6
    return {
        "written_mb": round(mb, 1),
        "foreground_blocks_s": round(foreground, 3),
        "background_blocks_s": round(blocking, 3),
        "background_write_s": round(background, 3),
    }


def decode_difference(shards: Any, size: Size, device: torch.device) -> dict[str, Any]:
    """Max |GPU - CPU| of the decoded, resized uint8 pixels (one batch) and of LCM's scores."""
    common = dict(batch_size=size.predict_batch, image_size=size.image_size, num_workers=2)
    cpu = next(iter(eval_loader(shards, **common)))
    gpu = next(iter(eval_loader(shards, **common, device=device, decode_on_device=True)))
    assert cpu.keys == gpu.keys
    scale = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1) * 255
    pix = ((gpu.images - cpu.images.to(device)) * scale).abs()
    model = inference_model(size, "lcm", device)
    dtype = amp_dtype("bf16", device)
    with (
        torch.inference_mode(),
        torch.autocast(device.type, torch.bfloat16, enabled=dtype is not None),
    ):
        a = torch.sigmoid(model(cpu.images.to(device)).logits.float())
        b = torch.sigmoid(model(gpu.images).logits.float())
    return {
        "max_abs_pixel_levels": round(float(pix.max()), 2),
        "mean_abs_pixel_levels": round(float(pix.mean()), 4),
        "max_abs_score": float((a - b).abs().max()),
    }


def profile_step(
    shards: Any, size: Size, cfg: TrainConfig, device: torch.device, path: Path
) -> None:
    torch.manual_seed(0)
    state = build_trainer(
        model_config(size, "lcm"), LossConfig(beta=0.1), cfg, NUM_CLASSES, 10, device
    )
    x = torch.randn(cfg.batch_size, 3, size.image_size, size.image_size, device=device)
    y = (torch.rand(cfg.batch_size, NUM_CLASSES, device=device) < 0.04).float()
    batch = TensorBatch(x, y)
    for _ in range(3):
        train_step(state, batch)
    sync(device)
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        train_step(state, batch)
        sync(device)
    keys = ("device_time_total", "cuda_time_total") if device.type == "cuda" else ()
    for key in (*keys, "cpu_time_total"):
        try:
            path.write_text(prof.key_averages().table(sort_by=key, row_limit=25))
            return
        except (KeyError, AttributeError, RuntimeError):
            continue


# ------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("gpu.json"))
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--smoke", action="store_true", help="toy sizes (CPU smoke run)")
    ap.add_argument("--budget", type=float, default=330, help="seconds; later steps are skipped")
    ap.add_argument("--workers", type=int, default=None, help="CPU-decode loader workers")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile run")
    ap.add_argument("--only", choices=["predict"], default=None, help="run one section")
    args = ap.parse_args()
    device = torch.device(args.device)
    size = SMOKE if args.smoke else FULL
    cores = len(os.sched_getaffinity(0))
    cpu_workers = args.workers if args.workers is not None else max(1, cores - 2)
    read_workers = min(4, cpu_workers)  # GPU decode: the workers only read bytes
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    report = Report(
        args.out,
        {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "cpu_cores": cores,
            "size": asdict(size),
            "errors": {},
            "complete": False,
        },
    )
    progress(f"{report.data['device']}, torch {torch.__version__}, {cores} cores")

    def left() -> float:
        return args.budget - (time.perf_counter() - START)

    def attempt(section: str, name: str, fn: Any, need: float = 20) -> Any:
        """Run one measurement; record and log its result, or its error, and go on."""
        if left() < need:
            progress(f"skipped {section} / {name}: out of budget")
            report.data.setdefault("skipped", []).append(f"{section} / {name}")
            report.save()
            return None
        try:
            res = fn()
        except Exception as e:  # one failed measurement must not lose the others
            report.data["errors"][f"{section} / {name}"] = traceback.format_exc(limit=6)
            report.save()
            progress(f"FAILED {section} / {name}: {e!r}")
            return None
        report.put(section, name, res)
        progress(f"{section} / {name}: {res}")
        return res

    def workers_for(cfg: TrainConfig) -> int:
        return read_workers if cfg.gpu_decode and device.type == "cuda" else cpu_workers

    def train(name: str, arch: str, cfg: TrainConfig, **kw: Any) -> dict[str, Any] | None:
        def run() -> dict[str, Any]:
            res, _ = measure_train(shards, size, arch, cfg, device, workers_for(cfg), **kw)
            return res

        return attempt("train", name, run)

    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        root = Path(tmp)
        shards_dir, data = make_shards(root, size, workers=cores)
        shards = resolve_shards(shards_dir)
        report.put("data", "shards", data)
        progress(f"shards: {data}")

        on = train_config(size, device, **{k: True for k in SPEEDUPS})
        off = train_config(size, device, **{k: False for k in SPEEDUPS})

        def gpu_decode_check() -> dict[str, Any]:
            loader = eval_loader(
                shards,
                batch_size=4,
                image_size=size.image_size,
                num_workers=0,
                device=device,
                decode_on_device=True,
            )
            return {"images_on": str(next(iter(loader)).images.device)}

        if device.type == "cuda" and attempt("decode", "check", gpu_decode_check) is None:
            on = replace(on, gpu_decode=False)  # measure the rest with CPU decoding

        # 2. prediction end to end from the shards (BatchNorm folded, as `lcm batch-predict`
        # runs it), and the model alone on tensors already on the GPU
        def predictions() -> None:
            big = 2 * size.predict_batch
            for arch in ("lcm", "gap"):
                attempt(
                    "predict",
                    f"{arch}, gpu decode, folded",
                    lambda a=arch: measure_predict(
                        shards, size, a, device, read_workers, True, True
                    ),
                )
                attempt(
                    "predict",
                    f"{arch}, model only, folded",
                    lambda a=arch: measure_model_only(size, a, device, fold=True),
                )
                attempt(
                    "predict",
                    f"{arch}, model only",
                    lambda a=arch: measure_model_only(size, a, device),
                )
            attempt(
                "predict",
                f"lcm, gpu decode, folded, batch {big}",
                lambda: measure_predict(shards, size, "lcm", device, read_workers, True, True, big),
            )
            attempt(
                "predict",
                f"lcm, model only, folded, batch {big}",
                lambda: measure_model_only(size, "lcm", device, fold=True, batch=big),
            )
            attempt(
                "predict",
                "lcm, gpu decode (not folded)",
                lambda: measure_predict(shards, size, "lcm", device, read_workers, True),
            )
            attempt(
                "predict",
                "lcm, cpu decode, folded",
                lambda: measure_predict(shards, size, "lcm", device, cpu_workers, False, True),
            )

        if args.only == "predict":
            predictions()
            report.data["complete"] = True
            report.save()
            progress(f"done (predict only) -> {args.out}")
            return

        # 1. the headline: every speed-up on, real shard stream; and the checkpoint cost
        def headline() -> dict[str, Any]:
            res, state = measure_train(shards, size, "lcm", on, device, workers_for(on))
            report.put("checkpoint", "lcm", checkpoint_timing(state, root))
            progress(f"checkpoint: {report.data['checkpoint']['lcm']}")
            return res

        lcm = attempt("train", "lcm, all speed-ups", headline)
        gap = train("gap, all speed-ups", "gap", on)
        if lcm and gap:
            ratio = round(gap["images_per_s"] / lcm["images_per_s"], 3)
            report.put("ratios", "train_lcm_over_gap_time", ratio)
            report.put("ratios", "paper_mac_ratio", round(35.8 / 31.5, 3))
        for name, cfg in (("gpu decode", on), ("cpu workers", replace(on, gpu_decode=False))):
            w = workers_for(cfg)
            attempt(
                "stream",
                name,
                lambda cfg=cfg, w=w: {
                    "images_per_s": measure_stream(shards, size, cfg, device, w),
                    "workers": w,
                },
            )

        predictions()

        # 3. ablation: from everything off (the old configuration), speed-ups added one at
        # a time in this order; the last step, GPU decode, is the headline run above
        cumulative, prev = off, ""
        for switch in SPEEDUPS:
            if switch in ("gpu_decode", "checkpoint_async"):
                continue  # gpu_decode completes the headline; checkpoints: timed above
            name = f"lcm, + {prev}" if prev else "lcm, all off"
            train(name, "lcm", cumulative)
            cumulative, prev = replace(cumulative, **{switch: True}), switch
        train(f"lcm, + {prev}", "lcm", cumulative)
        train(
            "lcm, all speed-ups, NCHW (channels-last off)", "lcm", replace(on, channels_last=False)
        )
        half, double = size.train_batch // 2, 2 * size.train_batch
        train(f"lcm, all off, batch {half}", "lcm", replace(off, batch_size=half))
        train(f"lcm, all speed-ups, batch {double}", "lcm", replace(on, batch_size=double))

        # 4. GPU decode against the CPU decoder
        if device.type == "cuda":
            attempt("decode", "gpu_vs_cpu", lambda: decode_difference(shards, size, device))

        # 5. where one step's time goes, before and after
        def profiles() -> list[str]:
            names = ["profile-all-off.txt", "profile-all-on.txt"]
            for cfg, name in zip((off, on), names, strict=True):
                profile_step(shards, size, cfg, device, args.out.parent / name)
            return names

        attempt("profile", "files", profiles, need=40)

        # 6. torch.compile last: its compile time is the largest single cost
        if not args.no_compile:
            attempt(
                "train",
                "lcm, all speed-ups + compile",
                lambda: measure_train(
                    shards,
                    size,
                    "lcm",
                    replace(on, compile=True),
                    device,
                    workers_for(on),
                    compiled=True,
                )[0],
                need=120,
            )
    report.data["complete"] = True
    report.data["wall_s"] = round(time.perf_counter() - START, 1)
    report.save()
    progress(f"done -> {args.out}")


if __name__ == "__main__":
    main()
