"""Partial-label masks: the draw, the file, and the join with the training shards."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lcm.data.manifest import ImageRecord, read_manifest, write_manifest
from lcm.data.masks import apply_mask, make_mask, make_masks, mask_file, read_mask
from lcm.data.shard_writer import write_shards
from lcm.data.shards import check_mask_matches, resolve_shards, train_loader
from lcm.errors import ConfigError, DataError
from tests._shard_fixtures import tiny_split

N_IMAGES, N_CLASSES = 1000, 20


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1000 images x 20 classes (20k targets), some unknown; no JPEGs needed."""
    rng = np.random.default_rng(7)
    records = []
    for i in range(N_IMAGES):
        labels = tuple(int(c) for c in np.flatnonzero(rng.random(N_CLASSES) < 0.15))
        ignore = tuple(int(c) for c in np.flatnonzero(rng.random(N_CLASSES) < 0.05))
        records.append(ImageRecord(f"img{i:05d}", f"img{i:05d}.jpg", labels, ignore))
    out = tmp_path_factory.mktemp("synthetic")
    write_manifest(out, [f"c{c}" for c in range(N_CLASSES)], records)
    return out


def _known_in_manifest(prepared: Path) -> np.ndarray:
    return read_manifest(prepared).targets() != -1  # (N, C)


def test_zero_missing_hides_nothing(synthetic: Path, tmp_path: Path):
    report = make_mask(synthetic, 0.0, seed=3, out=tmp_path / "m.parquet")
    mask = read_mask(tmp_path / "m.parquet")
    known = _known_in_manifest(synthetic)
    assert report.hidden_entries == 0 and report.realised == 0.0
    assert report.known_entries == int(known.sum()) < N_IMAGES * N_CLASSES
    keys = read_manifest(synthetic).table.column("key").to_pylist()
    assert list(mask) == keys
    assert np.array_equal(np.stack([mask[k] for k in keys]), known)


@pytest.mark.parametrize("missing", [0.1, 0.5, 0.9])
def test_realised_share_is_close_and_counted_on_known_targets(
    synthetic: Path, tmp_path: Path, missing: float
):
    report = make_mask(synthetic, missing, seed=0, out=tmp_path / "m.parquet")
    mask = read_mask(tmp_path / "m.parquet")
    known_in = _known_in_manifest(synthetic)
    known = mask.known  # (N, C)
    assert report.known_entries >= 10_000
    assert abs(report.realised - missing) < 0.01
    assert not (known & ~known_in).any()  # unknown in the manifest stays unknown
    assert report.hidden_entries == int((known_in & ~known).sum())
    targets = read_manifest(synthetic).targets()
    pos, neg = targets == 1, targets == 0
    for kind in (pos, neg):  # positives and negatives alike
        assert abs((~known[kind]).mean() - missing) < 0.05
    assert f"{100 * report.realised:.2f}%" in report.summary()
    assert (mask.num_classes, mask.missing, mask.seed) == (N_CLASSES, missing, 0)


def test_same_seed_same_mask_other_seed_other_mask(synthetic: Path, tmp_path: Path):
    make_mask(synthetic, 0.5, seed=1, out=tmp_path / "a.parquet")
    make_mask(synthetic, 0.5, seed=1, out=tmp_path / "b.parquet")
    make_mask(synthetic, 0.5, seed=2, out=tmp_path / "c.parquet")
    a, b, c = (read_mask(tmp_path / f"{n}.parquet").known for n in "abc")
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()


def test_file_layout_is_packed_little_endian_bits(synthetic: Path, tmp_path: Path):
    make_mask(synthetic, 0.3, seed=0, out=tmp_path / "m.parquet")
    table = pq.read_table(tmp_path / "m.parquet")
    assert table.schema.field("known").type == pa.binary()
    meta = table.schema.metadata
    assert (meta[b"num_classes"], meta[b"missing"], meta[b"seed"]) == (b"20", b"0.3", b"0")
    row = table.column("known")[0].as_py()
    assert len(row) == math.ceil(N_CLASSES / 8)
    bits = np.unpackbits(np.frombuffer(row, np.uint8), count=N_CLASSES, bitorder="little")
    mask = read_mask(tmp_path / "m.parquet")
    assert np.array_equal(bits.astype(bool), mask[table.column("key")[0].as_py()])
    assert not list(tmp_path.glob(".*tmp*"))  # atomic write leaves no temp file


@pytest.mark.parametrize("missing", [1.0, -0.1, float("nan"), 2])
def test_missing_out_of_range_is_a_config_error(synthetic: Path, tmp_path: Path, missing):
    with pytest.raises(ConfigError, match="missing"):
        make_mask(synthetic, missing, seed=0, out=tmp_path / "m.parquet")
    assert not (tmp_path / "m.parquet").exists()


def test_apply_mask_sets_unknown():
    targets = np.array([[1, 0, -1, 1], [0, 0, 1, -1]], np.float32)
    known = np.array([[True, False, True, True], [False, True, True, True]])
    out = apply_mask(targets, known)
    assert np.array_equal(out, [[1, -1, -1, 1], [-1, 0, 1, -1]])
    assert targets[0, 1] == 0  # input untouched


def test_read_mask_rejects_bad_files(tmp_path: Path):
    with pytest.raises(DataError, match="absent.parquet"):
        read_mask(tmp_path / "absent.parquet")
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="junk.parquet"):
        read_mask(tmp_path / "junk.parquet")
    bad = pa.table({"key": ["a"], "known": [b"\x00\x00"]}).replace_schema_metadata(
        {"num_classes": "20", "missing": "0.1", "seed": "0"}
    )
    pq.write_table(bad, tmp_path / "short.parquet")  # 20 classes need 3 bytes
    with pytest.raises(DataError, match="short.parquet"):
        read_mask(tmp_path / "short.parquet")


# --- join with the training shards ----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("tiny")
    split = tiny_split(root, n=12)
    write_shards(split.prepared, split.images, root / "shards", max_side=40, workers=0)
    return split, root / "shards"


def test_train_loader_joins_the_mask_by_key(tiny, tmp_path: Path):
    split, shards = tiny
    make_mask(split.prepared, 0.5, seed=0, out=tmp_path / "m.parquet")
    mask = read_mask(tmp_path / "m.parquet")
    args = dict(batch_size=4, image_size=16, seed=0, epoch=0, num_workers=0, augment=False)
    plain = list(train_loader(shards, **args))
    masked = list(train_loader(shards, mask=tmp_path / "m.parquet", **args))
    hidden = 0
    for p, m in zip(plain, masked, strict=True):
        assert p.keys == m.keys and torch.equal(p.images, m.images)
        known = torch.from_numpy(np.stack([mask[k] for k in m.keys]))  # (B, C)
        assert torch.equal(m.targets[known], p.targets[known])
        assert (m.targets[~known] == -1).all()
        hidden += int((p.targets[~known] != -1).sum())
    assert hidden > 0


def test_mask_from_another_split_is_rejected(tiny, tmp_path: Path):
    split, shards = tiny
    other = tiny_split(tmp_path / "other", n=8, seed=1)  # keys img000..img007 only
    make_mask(other.prepared, 0.1, seed=0, out=tmp_path / "other.parquet")
    with pytest.raises(DataError, match="other.parquet"):
        train_loader(
            shards, batch_size=4, image_size=16, seed=0, epoch=0, num_workers=0,
            mask=tmp_path / "other.parquet",
        )  # fmt: skip


def test_mask_with_other_class_count_is_rejected(tiny, tmp_path: Path):
    split, shards = tiny
    records = read_manifest(split.prepared).records()
    write_manifest(tmp_path / "wide", [f"c{i}" for i in range(9)], records)
    make_mask(tmp_path / "wide", 0.1, seed=0, out=tmp_path / "wide.parquet")
    with pytest.raises(DataError, match="wide.parquet.*9 classes"):
        check_mask_matches(tmp_path / "wide.parquet", *resolve_shards(shards))


def test_mask_check_notices_a_replaced_mask_file(tiny, tmp_path: Path):
    split, shards = tiny
    make_mask(split.prepared, 0.1, seed=0, out=tmp_path / "m.parquet")
    args = dict(batch_size=4, image_size=16, seed=0, epoch=0, num_workers=0)
    train_loader(shards, mask=tmp_path / "m.parquet", **args)
    train_loader(shards, mask=tmp_path / "m.parquet", **args | {"epoch": 1})
    other = tiny_split(tmp_path / "other", n=8, seed=1)
    make_mask(other.prepared, 0.1, seed=0, out=tmp_path / "m.parquet")  # same path, new content
    with pytest.raises(DataError, match="m.parquet"):
        train_loader(shards, mask=tmp_path / "m.parquet", **args)


def test_mask_files_are_named_once_and_found_by_train_missing(synthetic, tmp_path):
    from lcm.config import params_from_dict
    from lcm.errors import ConfigError
    from lcm.training import mask_for

    reports = make_masks(synthetic, [0.5, 0.1], seed=0, out_dir=tmp_path / "masks")
    assert [r.path for r in reports] == [mask_file(tmp_path / "masks", m) for m in (0.5, 0.1)]
    params = params_from_dict({"train": {"missing": 0.5}})
    assert mask_for(params, None, tmp_path / "masks") == reports[0].path
    assert mask_for(params, tmp_path / "x.parquet", None) == tmp_path / "x.parquet"
    assert mask_for(params_from_dict({}), None, tmp_path / "masks") is None
    with pytest.raises(ConfigError, match="--masks DIR"):
        mask_for(params, None, None)
    with pytest.raises(ConfigError, match="missing ratio"):  # checked before any file is written
        make_masks(synthetic, [0.2, 1.5], seed=0, out_dir=tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
