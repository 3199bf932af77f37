"""A tiny trained model and shards for the batch-prediction tests, and helpers to read the
prediction store back."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import torch

from lcm.checkpoint import load_for_inference
from lcm.config import load_params
from lcm.data.shards import eval_loader, resolve_shards
from lcm.data.tar_index import scan_tar
from lcm.engine import fit
from lcm.inference import predict
from lcm.train_request import TrainRequest
from tests._engine_fixtures import make_split, write_params


@dataclass(frozen=True)
class Trained:
    model: Path  # model directory (raw and EMA weights)
    shards: Path  # 4 shards of 8 images
    images: Path  # the JPEGs the shards were made from


def make_trained(root: Path) -> Trained:
    prepared, shards = make_split(root / "data", 32, seed=5, shard_size=8)
    params = load_params(write_params(root / "params.yaml", train={"epochs": 1}))
    fit(TrainRequest(params, str(shards), root / "model"))
    return Trained(root / "model", shards, root / "data" / "images")


def copy_model(trained: Trained, dest: Path) -> Path:
    shutil.copytree(trained.model, dest)
    return dest


def direct_scores(model_dir: Path, shards: Path, weights: str = "raw") -> dict:
    """{(key, label): (score, target)} from the model run directly on the shards."""
    loaded = load_for_inference(model_dir, weights, torch.device("cpu"))
    loader = eval_loader(
        resolve_shards(shards), batch_size=5, image_size=loaded.meta.image_size, num_workers=0
    )
    keys, scores, targets = predict(loaded.model, loader, torch.device("cpu"))
    return {
        (k, c): (float(scores[i, c]), int(targets[i, c]))
        for i, k in enumerate(keys)
        for c in range(scores.shape[1])
    }


def stored(db: Path, run_id: str) -> dict:
    """{(key, label): score} of a run, read back from DuckDB."""
    con = duckdb.connect(str(db), read_only=True)
    try:
        rows = con.execute(
            "SELECT image_key, label_id, score FROM predictions WHERE run_id = ?", [run_id]
        ).fetchall()
    finally:
        con.close()
    return {(k, c): s for k, c, s in rows}


def fetch(db: Path, sql: str, *args) -> list[tuple]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute(sql, list(args)).fetchall()
    finally:
        con.close()


def corrupt_one_jpeg(shard_dir: Path, dest: Path, shard: str = "shard-000001.tar") -> str:
    """Copy the shards and overwrite one JPEG's bytes inside a tar (headers intact)."""
    shutil.copytree(shard_dir, dest)
    tar = dest / shard
    for name, offset, size in scan_tar(tar):
        if name.endswith(".jpg"):
            with open(tar, "r+b") as f:
                f.seek(offset)
                f.write(b"\0" * size)
            return name.removesuffix(".jpg")
    raise AssertionError(f"{tar} has no JPEG")


def as_array(scores: dict) -> np.ndarray:
    return np.array([scores[k] for k in sorted(scores)], dtype=np.float64)
