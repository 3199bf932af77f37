"""Batch prediction: end-to-end throughput, the catalog's completion rate, and memory.

Three measurements, each a ratio or rate taken side by side in this one run:

1. ``e2e``: images/s of the whole batch-prediction path (decode, model, Parquet files, their
   registration and consolidation; the library steps the flow runs, without Prefect's
   start-up) against the
   model's forward pass alone on the same decoded batches already in memory. Target >= 0.9.
   Contenders alternate for ``--repeats`` rounds; each figure is the median round.
2. ``merge``: rows/s completing a run of ``--parts`` parts of ``--part-rows`` rows each
   (registration, consolidation into one file, summaries with AP; :func:`complete_run`).
   Target >= 1M rows/s over >= 10M rows in >= 10 parts.
3. ``memory``: peak RSS of a batch-prediction process over N and 10N images. Target: the
   ratio 10N / N <= 1.2 (memory does not grow with the number of images).

    .venv/bin/python bench/bench_predict.py            # ~5 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lcm import store  # noqa: E402
from lcm.checkpoint import ModelMeta, load_for_inference, save_model  # noqa: E402
from lcm.config import ModelConfig  # noqa: E402
from lcm.data.manifest import ImageRecord, write_manifest  # noqa: E402
from lcm.data.shard_writer import write_shards  # noqa: E402
from lcm.data.transforms import MEAN, STD  # noqa: E402
from lcm.models import build_model  # noqa: E402
from lcm.predict import PredictRequest, merge_parts, part_table, score_unit, start_run  # noqa: E402
from lcm.runtime import select_device  # noqa: E402

CLASSES = tuple(f"class{i:02d}" for i in range(27))  # the synthetic benchmark's label count


def make_shards(root: Path, n: int, side: int, shard_size: int) -> Path:
    """``n`` smooth random JPEGs with random labels, sharded."""
    rng = np.random.default_rng(0)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        coarse = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((side, side), Image.Resampling.BILINEAR)
        img.save(images / f"{i:06d}.jpg", quality=90)
        labels = tuple(int(c) for c in np.flatnonzero(rng.random(len(CLASSES)) < 0.1))
        records.append(ImageRecord(f"{i:06d}", f"{i:06d}.jpg", labels, (), side, side))
    write_manifest(root / "prepared", CLASSES, records)
    write_shards(
        root / "prepared", images, root / "shards", max_side=None, shard_size=shard_size, workers=1
    )
    return root / "shards"


def make_model(root: Path, image_size: int) -> Path:
    cfg = ModelConfig(arch="lcm", backbone="resnet18", dim=128, heads=8, ffn=256, depth=3)
    torch.manual_seed(0)
    model = build_model(cfg, len(CLASSES), branch=False)
    meta = ModelMeta(cfg, CLASSES, image_size, MEAN, STD, {})
    save_model(root / "model", model, meta, None)
    return root / "model"


def run_library_path(req: PredictRequest) -> float:
    """The flow's steps in order, in this process: seconds for the whole run."""
    t0 = time.perf_counter()
    plan = start_run(req)
    parts = [score_unit(req, unit, plan.model_sha256, plan.run_dir) for unit in plan.pending]
    merge_parts(req, parts, plan.model_sha256)
    return time.perf_counter() - t0


def bench_e2e(work: Path, args: argparse.Namespace) -> dict:
    shards = make_shards(work / "e2e", args.images, args.side, args.shard_size)
    model_dir = make_model(work, args.image_size)
    device = select_device("cpu")
    loaded = load_for_inference(model_dir, "raw", device)

    from lcm.data.shards import eval_loader, resolve_shards

    loader = eval_loader(
        resolve_shards(shards),
        batch_size=args.batch_size,
        image_size=args.image_size,
        num_workers=0,
        align_shards=True,
    )
    batches = [b.images for b in loader]  # decoded once, kept in memory

    def forward_only() -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            for images in batches:
                torch.sigmoid(loaded.model(images).logits.float()).numpy()
        return time.perf_counter() - t0

    e2e, fwd = [], []
    for r in range(args.repeats):
        db = work / f"e2e-{r}.duckdb"
        req = PredictRequest(
            checkpoint=model_dir,
            db=db,
            run_id="bench",
            shards=str(shards),
            batch_size=args.batch_size,
            num_workers=args.workers,
            device="cpu",
        )
        e2e.append(args.images / run_library_path(req))
        fwd.append(args.images / forward_only())
        print(f"  round {r}: e2e {e2e[-1]:.1f} images/s, forward {fwd[-1]:.1f}", flush=True)
    ratio = statistics.median(e / f for e, f in zip(e2e, fwd, strict=True))
    return {
        "images": args.images,
        "e2e_images_s": statistics.median(e2e),
        "forward_images_s": statistics.median(fwd),
        "ratio": ratio,
    }


def bench_merge(work: Path, args: argparse.Namespace) -> dict:
    """The catalog's side of a run: register ``--parts`` files, consolidate them into one,
    summarise, complete (:func:`lcm.predict.run.complete_run`)."""
    from lcm.predict.parts import write_part
    from lcm.predict.run import complete_run

    n_classes = 80
    per_part = args.part_rows // n_classes
    rng = np.random.default_rng(0)
    db = work / "merge.duckdb"
    run = store.RunRecord("bench", "m", "sha256:x", "raw", "shards", "s", "sha256:y", args.parts,
                          64, {}, "bench", None)  # fmt: skip
    labels = [(f"c{i}", 0.5) for i in range(n_classes)]
    with store.writer(db, 0) as con:
        ordinal, _ = store.create_run(con, run, labels, "default 0.5")
        root = store.data_root_of(con, db)
    parts = []
    for p in range(args.parts):
        keys = [f"img{p:03d}-{i:07d}" for i in range(per_part)]
        scores = [rng.random((per_part, n_classes), dtype=np.float32)]
        targets = [rng.integers(-1, 2, (per_part, n_classes)).astype(np.float32)]
        table = part_table("bench", f"shard-{p:06d}", keys, scores, targets, n_classes)
        path = store.run_dir(root, "bench", ordinal) / f"part-shard-{p:06d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_part(path, table)
        parts.append(store.PartRecord("bench", f"shard-{p:06d}", str(path), per_part, (),
                                      table.num_rows, "bench", 0.0))  # fmt: skip
    t0 = time.perf_counter()
    done = complete_run(db, "bench", parts, "sha256:x")
    seconds = time.perf_counter() - t0
    rows = done["n_images"] * n_classes
    return {"rows": rows, "parts": args.parts, "seconds": seconds, "rows_s": rows / seconds}


MEMORY_CHILD = """
import json, resource, sys, threading, time
sys.path.insert(0, {root!r})
from pathlib import Path
import psutil
from lcm.predict import PredictRequest, load_model_once, merge_parts, score_unit, start_run
from lcm.runtime import select_device
req = PredictRequest(checkpoint=Path({model!r}), db=Path({db!r}), run_id="m",
                     shards={shards!r}, batch_size={batch}, num_workers=0, device="cpu")
load_model_once(req.checkpoint, "raw", select_device("cpu"))  # imports and model: before
me, peak, done = psutil.Process(), [0], threading.Event()
before = me.memory_info().rss
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], me.memory_info().rss)
        time.sleep(0.005)
watcher = threading.Thread(target=sample)
watcher.start()
plan = start_run(req)
merge_parts(req, [score_unit(req, u, plan.model_sha256, plan.run_dir) for u in plan.pending],
            plan.model_sha256)
done.set()
watcher.join()
print(json.dumps({{"loaded": before / 2**20, "run_peak": peak[0] / 2**20,
                  "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def bench_memory(work: Path, args: argparse.Namespace) -> dict:
    """Peak RSS while the run runs (sampled every 5 ms), after imports and the model load."""
    model_dir = work / "model"
    peaks = {}
    for n in (args.memory_n, 10 * args.memory_n):
        shards = make_shards(work / f"mem{n}", n, args.side, args.shard_size)
        code = MEMORY_CHILD.format(
            root=str(ROOT),
            model=str(model_dir),
            shards=str(shards),
            db=str(work / f"mem{n}.duckdb"),
            batch=args.batch_size,
        )
        env = {"OMP_NUM_THREADS": "2", "PATH": "/usr/bin"}
        out = subprocess.run(
            [sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env
        )
        peaks[n] = json.loads(out.stdout.strip().splitlines()[-1])
        p = peaks[n]
        print(
            f"  {n} images: RSS {p['loaded']:.0f} MiB with the model loaded, "
            f"{p['run_peak']:.0f} MiB peak during the run",
            flush=True,
        )
    small, large = sorted(peaks)
    grow = {n: peaks[n]["run_peak"] - peaks[n]["loaded"] for n in peaks}
    return {
        "rss_mib": peaks,
        "ratio": peaks[large]["run_peak"] / peaks[small]["run_peak"],
        "growth_mib": grow,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--side", type=int, default=128, help="stored image side (as the demo)")
    ap.add_argument("--image-size", type=int, default=64, help="model input (as the demo)")
    ap.add_argument("--shard-size", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument(
        "--workers", type=int, default=None, help="decoding processes (default: as lcm)"
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--parts", type=int, default=10)
    ap.add_argument("--part-rows", type=int, default=1_000_000)
    ap.add_argument("--memory-n", type=int, default=500)
    ap.add_argument("--only", choices=["e2e", "merge", "memory"], default=None)
    ap.add_argument("--out", type=Path, default=None, help="also write the results as JSON")
    args = ap.parse_args()
    torch.set_num_threads(2)

    work = Path(tempfile.mkdtemp(prefix="bench-predict-"))
    results = {"threads": torch.get_num_threads()}
    try:
        if args.only in (None, "e2e", "memory"):
            print("end to end against forward only:", flush=True)
            if args.only != "memory":
                results["e2e"] = bench_e2e(work, args)
                print(f"  ratio {results['e2e']['ratio']:.3f} (target >= 0.9)", flush=True)
            else:
                make_model(work, args.image_size)
        if args.only in (None, "merge"):
            results["merge"] = bench_merge(work, args)
            m = results["merge"]
            print(
                f"merge: {m['rows']:,} rows in {m['parts']} parts, {m['seconds']:.2f} s, "
                f"{m['rows_s'] / 1e6:.2f}M rows/s (target >= 1M)",
                flush=True,
            )
        if args.only in (None, "memory"):
            print("peak memory:", flush=True)
            results["memory"] = bench_memory(work, args)
            mem = results["memory"]
            growth = ", ".join(f"{n}: {g:.0f} MiB" for n, g in mem["growth_mib"].items())
            print(
                f"  ratio 10N/N {mem['ratio']:.3f} (target <= 1.2); growth over the loaded "
                f"model during the run: {growth}",
                flush=True,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=2, default=str))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
