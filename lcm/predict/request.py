"""What a batch-prediction run is asked to do, and every check made before it starts."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any, Literal

from lcm import __version__, store
from lcm import checkpoint as ckpt
from lcm.data.shard_format import ShardInfo
from lcm.errors import CheckpointError, ConfigError
from lcm.handoff import take

RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


@dataclass(frozen=True)
class PredictRequest:
    checkpoint: Path
    db: Path
    run_id: str
    shards: str | None = None  # a shard directory or glob ...
    images: str | None = None  # ... or an image directory or glob
    weights: Literal["raw", "ema"] = "raw"
    batch_size: int = 64
    num_workers: int | None = None  # decoding processes; None: 2 on CUDA, 0 on CPU
    device: str = "auto"
    parts: Path | None = None  # data root; default: <db dir>/parts/<db stem>
    replace: bool = False
    lock_timeout: float = 60.0
    run_date: date | None = None  # the night a run stands for (None: today, UTC)
    only_new: bool = False  # images: score only those no earlier run scored (reuse.py)

    @property
    def parts_root(self) -> Path:
        return self.parts if self.parts is not None else store.default_parts_root(self.db)

    def flow_params(self) -> dict[str, Any]:
        """The request as the batch-prediction flow's (JSON-friendly) parameters."""
        raw = dataclasses.asdict(self)
        return {k: str(v) if isinstance(v, Path | date) else v for k, v in raw.items()}

    def params(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "device": self.device,
            "weights": self.weights,
            "only_new": self.only_new,
        }


@dataclass(frozen=True)
class Unit:
    """One shard, or one group of image files: scored, written and committed as a whole."""

    name: str
    count: int
    digest: str
    shard: tuple[str, ShardInfo] | None = None  # (tar path, info of this shard alone)
    root: str | None = None  # images: the source root ...
    files: tuple[str, ...] = ()  # ... and the files to score, relative to it
    hashes: tuple[bytes, ...] = ()  # images: each file's content sha256, in file order
    # --only-new: images an earlier run scored: (file tonight, its key there, sha256), and
    # that run's file to copy their rows from (lcm.predict.reuse)
    reuse: tuple[tuple[str, str, bytes], ...] = ()
    reuse_from: str | None = None


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

    @property
    def to_score(self) -> int:
        """Images to score (fewer than ``total`` when earlier runs' scores are reused)."""
        return sum(len(u.files) if u.root is not None else u.count for u in self.units)


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
    if req.batch_size < 1 or (req.num_workers or 0) < 0 or req.lock_timeout < 0:
        raise ConfigError("--batch-size must be >= 1, --num-workers and --lock-timeout >= 0")
    if req.weights not in ("raw", "ema"):
        raise ConfigError(f"--weights {req.weights!r}: expected raw or ema")
    if req.only_new and req.images is None:
        raise ConfigError("--only-new needs --images: shards carry no per-image content hash")
    select_device(req.device)
    meta = ckpt.load_meta(req.checkpoint)
    weights = ckpt.weights_path(req.checkpoint, req.weights)
    if not weights.is_file():
        raise CheckpointError(f"{weights}: not found (this model has no {req.weights} weights)")
    ckpt.thresholds_or_default(req.checkpoint, meta.classes)  # a bad file fails here
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


def checked_request(req: PredictRequest, token: str | None = None) -> tuple[ckpt.ModelMeta, Source]:
    """The inputs the caller checked and handed over under ``token`` in this process
    (:func:`lcm.handoff.hand_over`); else (a deployment's run, a Dask worker) checked here."""
    found = take(token)
    return found if found is not None else check_request(req)


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
        version = store.schema_version(con)
        store.check_version(version, req.db, writing=True)  # older or newer: one line
        row = store.get_run(con, req.run_id) if version else None
    finally:
        con.close()
    if row is None:
        return None
    digest = ckpt.model_digest(req.checkpoint, req.weights)
    refuse_other_work(req, run_record(req, meta, source, digest), row)
    return str(row["status"])


def refuse_other_work(req: PredictRequest, record: store.RunRecord, row: dict) -> None:
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


def run_record(
    req: PredictRequest,
    meta: ckpt.ModelMeta,
    source: Source,
    digest: str,
    flow_run_id: str | None = None,
    deployment: str | None = None,
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
        run_date=req.run_date,
        deployment=deployment,
    )


def _digest(units: tuple[Unit, ...]) -> str:
    return _sha256("\n".join(f"{u.name}\0{u.digest}" for u in units))


def _sha256(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()
