"""Batch prediction: score shards or image folders into Parquet parts, merged into DuckDB.

The steps a flow composes (each takes paths and small records, never live objects, so they
run as well in a Dask worker as in this process):

1. :func:`check_request`: every input checked before anything starts;
2. :func:`start_run`: record the run (or find it: resume, no-op, or refuse), list what is
   still to do, and reuse parts that an interrupted run already wrote;
3. :func:`score_unit`: one shard (or group of image files) -> one Parquet part, written
   atomically; the model is loaded once per process;
4. :func:`merge_parts`: one writer merges the parts into DuckDB, one transaction per part
   (:mod:`lcm.store`), then marks the run complete.

Re-running a command after a crash at any point therefore ends with every image scored once:
committed shards are skipped, complete parts are merged without scoring them again, and the
scores are bit-identical to an uninterrupted run because a shard's batches never depend on
which other shards are pending (shard-aligned batches).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import re
import shutil
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lcm import __version__, store
from lcm import checkpoint as ckpt
from lcm.data.shard_writer import ShardInfo
from lcm.errors import CheckpointError, ConfigError, DataError
from lcm.io import atomic_path

log = logging.getLogger(__name__)

RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
PART_META = b"lcm.part"
PART_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("shard", pa.string()),
        ("image_key", pa.string()),
        ("label_id", pa.int16()),
        ("score", pa.float32()),
        ("target", pa.int8()),  # null when the source carries no labels
    ]
)


@dataclass(frozen=True)
class PredictRequest:
    checkpoint: Path
    db: Path
    run_id: str
    shards: str | None = None  # a shard directory or glob ...
    images: str | None = None  # ... or an image directory or glob
    weights: Literal["raw", "ema"] = "raw"
    batch_size: int = 64
    num_workers: int = 2
    device: str = "auto"
    parts: Path | None = None  # parts root; default: <db dir>/parts/<db stem>
    replace: bool = False
    lock_timeout: float = 60.0

    @property
    def parts_root(self) -> Path:
        return self.parts if self.parts is not None else store.default_parts_root(self.db)

    @property
    def run_parts(self) -> Path:
        return self.parts_root / self.run_id

    def flow_params(self) -> dict[str, Any]:
        """The request as the batch-prediction flow's (JSON-friendly) parameters."""
        raw = dataclasses.asdict(self)
        return {k: str(v) if isinstance(v, Path) else v for k, v in raw.items()}

    def params(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "device": self.device,
            "weights": self.weights,
        }


@dataclass(frozen=True)
class Unit:
    """One shard, or one group of image files: scored, written and committed as a whole."""

    name: str
    count: int
    digest: str
    shard: tuple[str, ShardInfo] | None = None  # (tar path, info of this shard alone)
    root: str | None = None  # images: the source root ...
    files: tuple[str, ...] = ()  # ... and the files, relative to it


@dataclass(frozen=True)
class Source:
    kind: Literal["shards", "images"]
    spec: str
    units: tuple[Unit, ...]
    digest: str
    classes: tuple[str, ...] | None  # shards know their classes, image folders do not
    listing_skips: tuple[tuple[str, str], ...] = ()

    @property
    def total(self) -> int:
        return sum(u.count for u in self.units)


@dataclass(frozen=True)
class RunPlan:
    run_id: str
    model_sha256: str
    complete: bool  # the run was already complete: nothing to do
    pending: tuple[Unit, ...]  # units to score
    reused: tuple[store.PartRecord, ...]  # complete parts from an interrupted run
    n_units: int
    n_images: int


# ------------------------------------------------------------------------------- checking
def resolve_source(req: PredictRequest) -> Source:
    if (req.shards is None) == (req.images is None):
        raise ConfigError("give exactly one of --shards or --images")
    if req.shards is not None:
        from lcm.data.shards import resolve_shards

        paths, info = resolve_shards(req.shards)
        units = tuple(
            Unit(
                name=Path(entry.name).stem,
                count=entry.count,
                digest=_sha256(f"{info.checksum}\0{entry.name}\0{entry.count}"),
                shard=(str(path), dataclasses.replace(info, shards=(entry,), total=entry.count)),
            )
            for path, entry in zip(paths, info.shards, strict=True)
        )
        return Source("shards", req.shards, units, _digest(units), tuple(info.classes))
    from lcm.data.images import list_images

    listing = list_images(req.images)
    units = tuple(
        Unit(g.name, len(g.files), g.digest, root=str(listing.root), files=g.files)
        for g in listing.groups
    )
    return Source("images", req.images, units, _digest(units), None, listing.skipped)


def check_request(req: PredictRequest) -> tuple[ckpt.ModelMeta, Source]:
    """Check every input before a flow starts; each problem is one LcmError line."""
    from lcm.runtime import select_device

    if not RUN_ID.fullmatch(req.run_id):
        raise ConfigError(
            f"run id {req.run_id!r}: use 1-128 letters, digits, '.', '_', ':' or '-', "
            "starting with a letter or digit"
        )
    if req.batch_size < 1 or req.num_workers < 0 or req.lock_timeout < 0:
        raise ConfigError("--batch-size must be >= 1, --num-workers and --lock-timeout >= 0")
    if req.weights not in ("raw", "ema"):
        raise ConfigError(f"--weights {req.weights!r}: expected raw or ema")
    select_device(req.device)
    meta = ckpt.load_meta(req.checkpoint)
    weights = ckpt.weights_path(req.checkpoint, req.weights)
    if not weights.is_file():
        raise CheckpointError(f"{weights}: not found (this model has no {req.weights} weights)")
    thresholds = req.checkpoint / ckpt.THRESHOLDS_FILE
    if thresholds.is_file():
        ckpt.load_thresholds(thresholds, meta.classes)
    source = resolve_source(req)
    if source.classes is not None and source.classes != meta.classes:
        raise CheckpointError(
            f"{req.checkpoint}: the model's {len(meta.classes)} classes differ from the "
            f"{len(source.classes)} classes of {source.spec}"
        )
    if req.db.is_dir():
        raise ConfigError(f"{req.db}: is a directory, expected a database file path")
    _check_writable(req.db.parent)
    _check_writable(req.parts_root)
    return meta, source


def _check_writable(folder: Path) -> None:
    """``folder`` exists as a writable directory, or can be created inside one."""
    parent = folder
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{folder}: cannot write here ({parent} is not a writable directory)")


def check_run_conflict(req: PredictRequest, meta: ckpt.ModelMeta, source: Source) -> str | None:
    """Refuse early (before a flow starts) when the run id holds other work; returns the
    run's status when it exists with the same work."""
    if req.replace or not req.db.is_file():
        return None
    con = store.open_db(req.db, read_only=True, timeout=req.lock_timeout)
    try:
        has_runs = con.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = 'runs'"
        ).fetchone()[0]
        row = store.get_run(con, req.run_id) if has_runs else None
    finally:
        con.close()
    if row is None:
        return None
    _refuse_other_work(req, _record(req, meta, source, row["model_sha256"]), row)
    return str(row["status"])


def _refuse_other_work(req: PredictRequest, record: store.RunRecord, row: dict) -> None:
    if record.same_work(row):
        return
    what = [
        name
        for name, ours, theirs in (
            ("model", record.model_sha256, row["model_sha256"]),
            ("weights", record.weights, row["weights"]),
            ("source", record.source_sha256, row["source_sha256"]),
        )
        if ours != theirs
    ]
    if "weights" in what:  # the digest covers the weights file: it differs with them
        what.remove("model")
    raise ConfigError(
        f"{req.db}: run {req.run_id!r} was made with another {' and '.join(what)} "
        f"({row['model_dir']}, {row['weights']}, {row['source']}); pass --replace to "
        "recompute it, or choose another --run-id"
    )


# ---------------------------------------------------------------------------------- start
def start_run(req: PredictRequest, flow_run_id: str | None = None) -> RunPlan:
    """Create, resume or refuse the run; list its pending units and reusable parts."""
    meta, source = check_request(req)
    digest = ckpt.model_digest(req.checkpoint, req.weights)
    record = _record(req, meta, source, digest, flow_run_id)
    thresholds, th_source = _thresholds(req.checkpoint, meta)
    with store.writer(req.db, req.lock_timeout) as con:
        row = store.get_run(con, req.run_id)
        if row is not None and not req.replace:
            _refuse_other_work(req, record, row)
            if row["status"] == "complete":
                return RunPlan(req.run_id, digest, True, (), (), len(source.units), 0)
            committed = store.committed_shards(con, req.run_id)
            store.mark_flow_run(con, req.run_id, flow_run_id)
            log.info(
                "resuming run %s: %d of %d shards committed",
                req.run_id,
                len(committed),
                len(source.units),
            )
        else:
            if row is not None:  # --replace: its parts first, then its rows (one transaction)
                shutil.rmtree(req.run_parts, ignore_errors=True)
            labels = list(zip(meta.classes, thresholds.tolist(), strict=True))
            store.create_run(con, record, labels, th_source, source.listing_skips)
            committed = set()
    _write_labels(req, meta, thresholds, th_source)
    pending, reused = [], []
    for unit in source.units:
        if unit.name in committed:
            continue
        part = _reusable_part(req, unit, digest)
        (reused if part else pending).append(part or unit)
    return RunPlan(
        req.run_id,
        digest,
        False,
        tuple(pending),
        tuple(reused),
        len(source.units),
        sum(u.count for u in pending),
    )


def _record(
    req: PredictRequest,
    meta: ckpt.ModelMeta,
    source: Source,
    digest: str,
    flow_run_id: str | None = None,
) -> store.RunRecord:
    return store.RunRecord(
        run_id=req.run_id,
        model_dir=str(req.checkpoint),
        model_sha256=digest,
        weights=req.weights,
        source_kind=source.kind,
        source=source.spec,
        source_sha256=source.digest,
        n_shards=len(source.units),
        image_size=meta.image_size,
        params=req.params(),
        lcm_version=__version__,
        flow_run_id=flow_run_id,
    )


def _thresholds(model_dir: Path, meta: ckpt.ModelMeta) -> tuple[np.ndarray, str]:
    """The calibrated thresholds beside the model, else 0.5 (as ``load_for_inference``)."""
    path = Path(model_dir) / ckpt.THRESHOLDS_FILE
    if path.is_file():
        return ckpt.load_thresholds(path, meta.classes), str(path)
    return np.full(len(meta.classes), 0.5), "default 0.5"


def _write_labels(
    req: PredictRequest, meta: ckpt.ModelMeta, thresholds: np.ndarray, source: str
) -> None:
    """The run's labels beside its parts, so `lcm query --parts` can name them."""
    n = len(meta.classes)
    table = pa.table(
        {
            "run_id": pa.array([req.run_id] * n, pa.string()),
            "label_id": pa.array(range(n), pa.int16()),
            "name": pa.array(meta.classes, pa.string()),
            "threshold": pa.array(thresholds, pa.float64()),
            "threshold_source": pa.array([source] * n, pa.string()),
        }
    )
    req.run_parts.mkdir(parents=True, exist_ok=True)
    with atomic_path(req.run_parts / store.LABELS_FILE) as tmp:
        pq.write_table(table, tmp)


# ---------------------------------------------------------------------------------- score
def part_path(req: PredictRequest, unit: Unit) -> Path:
    return req.run_parts / f"part-{unit.name}.parquet"


def score_unit(req: PredictRequest, unit: Unit, model_sha256: str) -> store.PartRecord:
    """Score one unit and write its part atomically; returns what the merge needs."""
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
    workers = 0 if multiprocessing.current_process().daemon else req.num_workers
    keys: list[str] = []
    scores: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    skipped: list[tuple[str, str]] = []
    loader = _loader(unit, loaded.meta, req.batch_size, workers)
    for batch in score_batches(loaded.model, loader, device, amp_dtype("auto", device)):
        skipped.extend(batch.skipped)
        if batch.keys:
            keys.extend(batch.keys)
            scores.append(batch.scores)
            targets.append(batch.targets)
    n_classes = len(loaded.meta.classes)
    table = part_table(req.run_id, unit.name, keys, scores, targets, n_classes)
    record = store.PartRecord(
        run_id=req.run_id,
        shard=unit.name,
        path=str(part_path(req, unit)),
        n_images=len(keys),
        skipped=tuple(skipped),
        n_rows=table.num_rows,
        worker=f"{socket.gethostname()}:{os.getpid()}",
        seconds=time.perf_counter() - t0,
    )
    meta = {"model_sha256": model_sha256, "unit_digest": unit.digest, **dataclasses.asdict(record)}
    table = table.replace_schema_metadata({PART_META: json.dumps(meta)})
    Path(record.path).parent.mkdir(parents=True, exist_ok=True)
    write_part(Path(record.path), table)
    return record


def write_part(path: Path, table: pa.Table) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def part_table(
    run_id: str,
    shard: str,
    keys: list[str],
    scores: list[np.ndarray],
    targets: list[np.ndarray],
    n_classes: int,
) -> pa.Table:
    """Long format, one row per (image, class), in stream order then class order."""
    n = len(keys)
    score = np.concatenate(scores).reshape(-1) if n else np.zeros(0, np.float32)
    target_arr = np.concatenate(targets) if n else np.zeros((0, 0), np.float32)
    if target_arr.shape[1] == n_classes:
        target = pa.array(target_arr.reshape(-1).astype(np.int8), pa.int8())
    else:  # image folders carry no labels
        target = pa.nulls(n * n_classes, pa.int8())
    zeros = pa.array(np.zeros(n * n_classes, np.int32))
    key_index = pa.array(np.repeat(np.arange(n, dtype=np.int32), n_classes))
    columns = [
        pa.DictionaryArray.from_arrays(zeros, pa.array([run_id])).cast(pa.string()),
        pa.DictionaryArray.from_arrays(zeros, pa.array([shard])).cast(pa.string()),
        pa.DictionaryArray.from_arrays(key_index, pa.array(keys, pa.string())).cast(pa.string()),
        pa.array(np.tile(np.arange(n_classes, dtype=np.int16), n)),
        pa.array(score.astype(np.float32, copy=False)),
        target,
    ]
    return pa.Table.from_arrays(columns, schema=PART_SCHEMA)


def _loader(unit: Unit, meta: ckpt.ModelMeta, batch_size: int, workers: int) -> Any:
    common = dict(
        batch_size=batch_size,
        image_size=meta.image_size,
        num_workers=workers,
        mean=meta.mean,
        std=meta.std,
    )
    if unit.shard is not None:
        from lcm.data.shards import eval_loader

        path, info = unit.shard
        return eval_loader(([Path(path)], info), align_shards=True, skip_bad=True, **common)
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


def read_part_meta(path: Path) -> dict[str, Any] | None:
    try:
        metadata = pq.read_schema(path).metadata or {}
        return json.loads(metadata[PART_META])
    except (OSError, pa.ArrowInvalid, KeyError, json.JSONDecodeError):
        return None


def _reusable_part(req: PredictRequest, unit: Unit, digest: str) -> store.PartRecord | None:
    """A part an interrupted run already wrote for exactly this unit and model."""
    path = part_path(req, unit)
    meta = read_part_meta(path) if path.is_file() else None
    if not meta or (meta["run_id"], meta["model_sha256"], meta["unit_digest"]) != (
        req.run_id,
        digest,
        unit.digest,
    ):
        return None
    fields = {f.name for f in dataclasses.fields(store.PartRecord)}
    kept = {k: v for k, v in meta.items() if k in fields}
    kept["skipped"] = tuple(tuple(s) for s in kept["skipped"])
    return store.PartRecord(**kept)


# ---------------------------------------------------------------------------------- merge
def merge_parts(req: PredictRequest, parts: list[store.PartRecord]) -> dict[str, Any]:
    """Merge each part in its own transaction, then mark the run complete."""
    with store.writer(req.db, req.lock_timeout) as con:
        committed = store.committed_shards(con, req.run_id)
        for part in parts:
            if part.shard not in committed:
                store.merge_part(con, part)
        run = store.get_run(con, req.run_id)
        if run is None:
            raise DataError(f"{req.db}: run {req.run_id!r} vanished while it was being written")
        done = len(store.committed_shards(con, req.run_id))
        if done != run["n_shards"]:
            raise DataError(
                f"{req.db}: run {req.run_id!r} has {done} of {run['n_shards']} shards "
                "committed; rerun the same command to finish it"
            )
        return store.finish_run(con, req.run_id)


def _digest(units: tuple[Unit, ...]) -> str:
    return _sha256("\n".join(f"{u.name}\0{u.digest}" for u in units))


def _sha256(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


# ------------------------------------------------------------------------------ quick look
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
    )
    skipped: list[tuple[str, str]] = []
    batches = list(loader)
    for b in batches:
        skipped.extend(b.skipped)
    keys, scores, _ = predict(loaded.model, batches, device, amp_dtype("auto", device))
    return keys, scores, skipped
