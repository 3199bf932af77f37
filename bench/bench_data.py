"""Data pipeline benchmark (run by hand; not part of the tests).

1. Eval stream vs a plain loop: decoded and resized samples/s of ``eval_loader`` (DataLoader
   with ``--workers`` processes) against a loop that only reads the same JPEG files from disk
   and decodes/resizes them the same way. Target: ratio >= 0.8.
2. The shard stage on N and 10N synthetic JPEGs: images/s (all cores) and the peak resident
   memory of the whole process tree (parent + Pool workers, polled). Target: peak(10N) /
   peak(N) <= 1.2, i.e. memory does not grow with the dataset.
3. Streaming: the eval and train loaders on the same shards read from local files (seeking)
   and streamed from a local HTTP server (``http://127.0.0.1:PORT/shard-{...}.tar``, through
   webdataset and curl). Target: images/s ratio streamed / local >= 0.9.

    .venv/bin/python bench/bench_data.py --n 1000
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.timing import timed  # noqa: E402
from lcm.data.manifest import ImageRecord, write_manifest  # noqa: E402

NUM_CLASSES = 20


def make_split(root: Path, n: int, seed: int = 0) -> tuple[Path, Path]:
    """``n`` random JPEGs of 96-128 px (smooth colour fields plus a little noise) + manifest."""
    rng = np.random.default_rng(seed)
    images, prepared = root / "images", root / "prepared"
    records = []
    for i in range(n):
        w, h = (int(v) for v in rng.integers(96, 129, size=2))
        coarse = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC))
        noisy = np.clip(field + rng.normal(0, 8, field.shape), 0, 255).astype(np.uint8)
        rel = f"{i // 1000:03d}/img{i:06d}.jpg"
        (images / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(noisy).save(images / rel, format="JPEG", quality=90)
        labels = tuple(int(c) for c in np.flatnonzero(rng.random(NUM_CLASSES) < 0.1))
        records.append(ImageRecord(f"img{i:06d}", rel, labels, (), w, h))
    write_manifest(prepared, [f"class{c}" for c in range(NUM_CLASSES)], records)
    return prepared, images


def bench_eval(root: Path, args: argparse.Namespace) -> dict[str, float]:
    import torch

    from lcm.data.manifest import read_manifest, resolve_image
    from lcm.data.shard_writer import write_shards
    from lcm.data.shards import eval_loader
    from lcm.data.transforms import decode_image, eval_transform

    prepared, images = make_split(root / "eval", args.eval_n)
    shards = root / "eval" / "shards"
    write_shards(prepared, images, shards, max_side=None, shard_size=1000, workers=2)
    paths = [resolve_image(images, p) for p in read_manifest(prepared).table["path"].to_pylist()]
    tf = eval_transform(args.image_size)

    def plain() -> int:
        for p in paths:
            tf(decode_image(p.read_bytes()))
        return len(paths)

    def stream(num_workers: int = args.workers) -> int:
        loader = eval_loader(
            shards, batch_size=args.batch_size, image_size=args.image_size, num_workers=num_workers
        )
        return sum(len(b.keys) for b in loader)

    def stream0() -> int:
        return stream(0)

    torch.set_num_threads(1)  # the plain loop gets one core; the stream's workers get one each
    plain(), stream(), stream0()  # warm the page cache and the code paths
    times: dict[str, list[float]] = {"plain": [], "stream": [], "stream0": []}
    for _ in range(args.repeats):  # interleaved, so a burst of load on the machine hits both
        for name, fn in (("plain", plain), ("stream", stream), ("stream0", stream0)):
            times[name].append(timed(fn))
    out = {name: args.eval_n / min(t) for name, t in times.items()}
    first = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        it = iter(
            eval_loader(
                shards, batch_size=args.batch_size, image_size=args.image_size,
                num_workers=args.workers,
            )
        )  # fmt: skip
        next(it)
        first.append(time.perf_counter() - t0)
        del it
    out["first_batch_ms"] = 1e3 * float(np.median(first))
    ratios = [p / s for p, s in zip(times["plain"], times["stream"], strict=True)]
    out["ratio_median"] = float(np.median(ratios))
    return out


def bench_stream(root: Path, args: argparse.Namespace) -> dict[str, float]:
    """Local files against the same shards behind a local HTTP server, interleaved."""
    import socket

    import torch

    from lcm.data.shard_writer import write_shards
    from lcm.data.shards import eval_loader, train_loader

    prepared, images = make_split(root / "stream", args.eval_n, seed=3)
    shards = root / "stream" / "shards"
    info = write_shards(prepared, images, shards, max_side=None, shard_size=500, workers=2)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        cwd=shards, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        time.sleep(1.0)
        url = f"http://127.0.0.1:{port}/shard-{{000000..{len(info.shards) - 1:06d}}}.tar"
        common = dict(batch_size=args.batch_size, image_size=args.image_size,
                      num_workers=args.workers)  # fmt: skip

        def run(kind: str, spec: str) -> int:
            if kind == "eval":
                loader = eval_loader(spec, **common)
            else:
                loader = train_loader(spec, seed=0, epoch=0, **common)
            return sum(len(b.keys) for b in loader)

        torch.set_num_threads(1)
        contenders = {
            f"{kind} {where}": (lambda k=kind, s=spec: run(k, s))
            for kind in ("eval", "train")
            for where, spec in (("local", str(shards)), ("http", url))
        }
        for fn in contenders.values():
            fn()  # warm the page cache and the code paths
        times: dict[str, list[float]] = {name: [] for name in contenders}
        for _ in range(args.repeats):
            for name, fn in contenders.items():
                times[name].append(timed(fn))
    finally:
        server.terminate()
        server.wait(timeout=10)
    out = {name: args.eval_n / float(np.median(t)) for name, t in times.items()}
    for kind in ("eval", "train"):
        pairs = zip(times[f"{kind} local"], times[f"{kind} http"], strict=True)
        out[f"{kind} ratio"] = float(np.median([lo / hi for lo, hi in pairs]))
    return out


def bench_shard_stage(root: Path, n: int, args: argparse.Namespace) -> dict[str, float]:
    """Run the shard stage in a child process; poll the tree's summed RSS."""
    import psutil

    prepared, images = make_split(root / f"shard{n}", n, seed=n)
    out = root / f"shard{n}" / "shards"
    cmd = [sys.executable, __file__, "_shard", str(prepared), str(images), str(out)]
    cmd += ["--max-side", str(args.max_side)]
    t0 = time.perf_counter()
    env = dict(os.environ)
    if args.arrow_pool:
        env["ARROW_DEFAULT_MEMORY_POOL"] = args.arrow_pool
    child = subprocess.Popen(cmd, env=env)
    proc = psutil.Process(child.pid)
    peak = dict.fromkeys(_ROLLUP, 0)
    while child.poll() is None:
        try:
            tree = [proc, *proc.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        mems = [_rollup(p.pid) for p in tree]
        for field in _ROLLUP:
            peak[field] = max(peak[field], sum(m[field] for m in mems))
        time.sleep(0.02)
    wall = time.perf_counter() - t0
    if child.returncode != 0:
        raise SystemExit(f"shard stage failed with exit code {child.returncode}")
    return {"n": n, "images_per_s": n / wall, **{k: v / 1024 for k, v in peak.items()}}


# Summed over the process tree from /proc/<pid>/smaps_rollup (kB). Pss counts pages shared by
# the forked workers once; Pss_Anon leaves out library code pages, whose residency follows
# the page cache rather than the work (they come and go with other load on the machine).
_ROLLUP = ("Rss", "Pss", "Pss_Anon")


def _rollup(pid: int) -> dict[str, int]:
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return dict.fromkeys(_ROLLUP, 0)  # exited since it was listed: holds no memory now
    fields = dict(line.split(":", 1) for line in text.splitlines()[1:])
    return {k: int(fields[k].split()[0]) for k in _ROLLUP}


def _shard_main(argv: list[str]) -> None:
    from lcm.data.shard_writer import write_shards

    p = argparse.ArgumentParser()
    p.add_argument("prepared", type=Path)
    p.add_argument("images", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--max-side", type=int, default=96)
    a = p.parse_args(argv)
    info = write_shards(a.prepared, a.images, a.out, max_side=a.max_side, shard_size=1000)
    assert info.total > 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1000, help="N of the shard stage bench")
    p.add_argument("--eval-n", type=int, default=5000, help="images of the eval stream bench")
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the stream")
    p.add_argument("--max-side", type=int, default=96, help="shard max side (re-encodes most)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--arrow-pool",
        choices=["mimalloc", "jemalloc", "system"],
        default=None,
        help="Arrow allocator of the shard stage (default: Arrow's own choice); mimalloc keeps "
        "the scratch of the manifest read, 13 MB at 1k rows and 29 MB at 10k",
    )
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--skip-eval", action="store_true")
    p.add_argument("--skip-shard", action="store_true")
    p.add_argument("--skip-stream", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        if not args.skip_eval:
            r = bench_eval(root, args)
            print(
                f"\n(1) eval stream, {args.eval_n} images -> {args.image_size}px, "
                f"best of {args.repeats}"
            )
            print(f"{'loop':<36}{'samples/s':>10}")
            print(f"{'plain: read + decode + resize':<36}{r['plain']:>10.0f}")
            print(f"{f'eval_loader, {args.workers} workers':<36}{r['stream']:>10.0f}")
            print(f"{'eval_loader, in-process':<36}{r['stream0']:>10.0f}")
            print(
                f"time to the first batch with {args.workers} workers: {r['first_batch_ms']:.0f} ms"
            )
            print(
                f"ratio stream / plain: best {r['stream'] / r['plain']:.2f}, "
                f"median of pairs {r['ratio_median']:.2f}  (target >= 0.8)"
            )
        if not args.skip_stream:
            r = bench_stream(root, args)
            print(
                f"\n(3) local files vs streamed from a local HTTP server, {args.eval_n} images, "
                f"{args.workers} workers, median of {args.repeats}"
            )
            for name in ("eval local", "eval http", "train local", "train http"):
                print(f"{name:<14}{r[name]:>10.0f} images/s")
            print(
                f"ratio http / local (median of pairs): eval {r['eval ratio']:.2f}, "
                f"train {r['train ratio']:.2f}  (target >= 0.9)"
            )
        if not args.skip_shard:
            rows = [bench_shard_stage(root, n, args) for n in (args.n, 10 * args.n)]
            pool = args.arrow_pool or "Arrow default"
            print(f"\n(2) shard stage (max_side {args.max_side}, Pool on all cores, {pool} pool)")
            print(
                f"{'images':>8}{'images/s':>10}" + "".join(f"{f'peak {k} MB':>17}" for k in _ROLLUP)
            )
            for row in rows:
                mems = "".join(f"{row[k]:>17.1f}" for k in _ROLLUP)
                print(f"{row['n']:>8}{row['images_per_s']:>10.0f}{mems}")
            ratios = ", ".join(f"{k} {rows[1][k] / rows[0][k]:.2f}" for k in _ROLLUP)
            print(f"peak ratio 10N / N: {ratios}  (target <= 1.2)")
        print(f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_shard":
        _shard_main(sys.argv[2:])
    else:
        main()
