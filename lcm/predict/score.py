"""Scoring one unit (a shard, or a group of image files) into its Parquet part; the model is
loaded once per process."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from lcm import checkpoint as ckpt
from lcm import store
from lcm.errors import CheckpointError, DataError
from lcm.predict import parts, reuse
from lcm.predict.request import PredictRequest, Unit


def scoring_settings(req: PredictRequest) -> str:
    """What besides the model and the images decides a score's bits."""
    from lcm.runtime import amp_dtype, select_device

    device = select_device(req.device)
    return f"{device.type}/{amp_dtype('auto', device)}/batch {req.batch_size}"


def decoding_workers(asked: int | None, device: Any) -> int:
    """DataLoader processes for decoding. By default 2 on CUDA (the CPU decodes while the GPU
    runs the model) and 0 on CPU, where they would compete with the model for the same cores
    (measured on 2 cores: 0.84 of the forward-only rate with 2 workers, 0.94 with none). Dask
    workers are daemonic and may not start any."""
    if multiprocessing.current_process().daemon:
        return 0
    if asked is not None:
        return asked
    return 2 if device.type == "cuda" else 0


def score_unit(
    req: PredictRequest, unit: Unit, model_sha256: str, run_dir: str
) -> store.PartRecord:
    """Score one unit and write its data file atomically into ``run_dir``; returns what
    registration needs."""
    from lcm.inference import score_batches
    from lcm.runtime import amp_dtype, select_device

    t0 = time.perf_counter()
    device = select_device(req.device)
    loaded = load_model_once(req.checkpoint, req.weights, device)
    if loaded.digest != model_sha256:
        raise CheckpointError(
            f"{req.checkpoint}: the model changed while run {req.run_id!r} was running; "
            "pass --replace to score everything with the new one"
        )
    # Dask workers are daemonic and may not start DataLoader worker processes.
    workers = decoding_workers(req.num_workers, device)
    keys: list[str] = []
    scores: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    skipped: list[tuple[str, str]] = []
    if unit.shard is not None or unit.files:  # an image unit may be all reused
        loader = _loader(unit, loaded.meta, req.batch_size, workers)
        for batch in score_batches(loaded.model, loader, device, amp_dtype("auto", device)):
            skipped.extend(batch.skipped)
            if batch.keys:
                keys.extend(batch.keys)
                scores.append(batch.scores)
                targets.append(batch.targets)
    n_classes = len(loaded.meta.classes)
    table = parts.part_table(req.run_id, unit.name, keys, scores, targets, n_classes)
    n_images = len(keys)
    if unit.root is not None:  # image folders: each image's content hash beside its scores
        hashes = dict(zip(unit.files, unit.hashes, strict=True))
        copied = reuse.copied_rows(unit, req.run_id)
        if copied is not None:  # --only-new: rows an earlier run scored, in file order
            table = pa.concat_tables([table, copied]).sort_by(
                [("image_key", "ascending"), ("label_id", "ascending")]
            )
            hashes |= {f: h for f, _, h in unit.reuse}
            n_images += len(unit.reuse)
        have = set(keys) | {f for f, _, _ in unit.reuse}  # scored (not skipped) or copied
        done = [k for k in sorted(hashes) if k in have]
        reuse.write_images(reuse.images_path(Path(run_dir), unit), done,
                           [hashes[k] for k in done])  # fmt: skip
    record = store.PartRecord(
        run_id=req.run_id,
        shard=unit.name,
        path=str(parts.part_path(Path(run_dir), unit)),
        n_images=n_images,
        skipped=tuple(skipped),
        n_rows=table.num_rows,
        worker=f"{socket.gethostname()}:{os.getpid()}",
        seconds=time.perf_counter() - t0,
    )
    meta = {
        "model_sha256": model_sha256,
        "unit_digest": unit.digest,
        "scoring": scoring_settings(req),
        **dataclasses.asdict(record),
    }
    table = table.replace_schema_metadata({parts.PART_META: json.dumps(meta)})
    Path(record.path).parent.mkdir(parents=True, exist_ok=True)
    parts.write_part(Path(record.path), table)
    return record


def _loader(unit: Unit, meta: ckpt.ModelMeta, batch_size: int, workers: int) -> Any:
    common = dict(
        batch_size=batch_size,
        image_size=meta.image_size,
        num_workers=workers,
        mean=meta.mean,
        std=meta.std,
    )
    if unit.shard is not None:
        from lcm.data.locations import is_url
        from lcm.data.shards import eval_loader

        path, info = unit.shard
        where: Any = path if is_url(path) else Path(path)  # a URL is streamed
        return eval_loader(([where], info), align_shards=True, skip_bad=True, **common)
    from lcm.data.images import image_loader

    return image_loader(Path(unit.root or "."), unit.files, **common)


_MODELS: dict[tuple, ckpt.LoadedModel] = {}
_MODELS_LOCK = threading.Lock()


def load_model_once(model_dir: Path, weights: str, device: Any) -> ckpt.LoadedModel:
    """One loaded model per process (and model files, weights, device): tasks of a run
    that land in the same process or Dask worker share it."""
    files = (Path(model_dir) / ckpt.MODEL_JSON, ckpt.weights_path(model_dir, weights))
    stamps = tuple((str(p.resolve()), p.stat().st_mtime_ns, p.stat().st_size) for p in files)
    key = (weights, str(device), stamps)
    with _MODELS_LOCK:
        if key not in _MODELS:
            _MODELS.clear()  # one model at a time: a new one replaces the last
            _MODELS[key] = ckpt.load_for_inference(Path(model_dir), weights, device)
        return _MODELS[key]


def score_files(
    files: list[Path], loaded: ckpt.LoadedModel, device: Any, batch_size: int = 64
) -> tuple[list[str], np.ndarray, list[tuple[str, str]]]:
    """Scores ``(N, C)`` of image files, preprocessed exactly as batch prediction does."""
    from lcm.data.images import image_loader
    from lcm.inference import predict
    from lcm.runtime import amp_dtype

    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise DataError(f"{missing[0]}: no such image file")
    loader = image_loader(
        Path("."),
        [str(f) for f in files],
        batch_size=batch_size,
        image_size=loaded.meta.image_size,
        num_workers=0,
        mean=loaded.meta.mean,
        std=loaded.meta.std,
        confine=False,
    )
    skipped: list[tuple[str, str]] = []
    batches = list(loader)
    for b in batches:
        skipped.extend(b.skipped)
    keys, scores, _ = predict(loaded.model, batches, device, amp_dtype("auto", device))
    return keys, scores, skipped
