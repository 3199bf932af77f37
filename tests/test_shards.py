"""Shard writer and the train/eval readers, on ~20 JPEGs of 32-48 px."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lcm.data import shard_writer
from lcm.data.manifest import ImageRecord, make_key, read_manifest, write_manifest
from lcm.data.shard_format import INFO_FILE
from lcm.data.shard_writer import write_shards
from lcm.data.shards import eval_loader, load_info, resolve_shards, train_loader
from lcm.data.transforms import MEAN, STD, eval_transform, normalize
from lcm.errors import ConfigError, DataError
from tests._shard_fixtures import CLASSES, TinySplit, save_jpeg, tiny_split

# 3 workers on a 2-CPU machine is deliberate here: order must hold for any worker count
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")


def _members(tar_path: Path) -> dict[str, bytes]:
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def _shard_files(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir())


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory) -> TinySplit:
    return tiny_split(tmp_path_factory.mktemp("split"), n=20, bad=True)


@pytest.fixture(scope="module")
def shards(split: TinySplit, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_shards(split.prepared, split.images, out, max_side=40, shard_size=6, workers=0)
    return out


# --- writer -------------------------------------------------------------------------------


def test_bytes_are_identical_across_runs_and_worker_counts(split: TinySplit, tmp_path: Path):
    a = write_shards(split.prepared, split.images, tmp_path / "a", shard_size=6, workers=0)
    b = write_shards(split.prepared, split.images, tmp_path / "b", shard_size=6, workers=2)
    assert a == b
    assert len(a.shards) == 4
    for e in a.shards:
        assert (tmp_path / "a" / e.name).read_bytes() == (tmp_path / "b" / e.name).read_bytes()
    assert (tmp_path / "a" / INFO_FILE).read_bytes() == (tmp_path / "b" / INFO_FILE).read_bytes()
    c = write_shards(split.prepared, split.images, tmp_path / "c", shard_size=6, max_side=30)
    assert c.checksum != a.checksum


def test_info_counts_and_sample_layout(split: TinySplit, shards: Path):
    info = load_info(shards)
    assert info.classes == CLASSES
    assert [(e.name, e.count) for e in info.shards] == [
        ("shard-000000.tar", 6),
        ("shard-000001.tar", 6),
        ("shard-000002.tar", 6),
        ("shard-000003.tar", 2),
    ]
    assert info.total == 20 and info.max_side == 40
    assert _shard_files(shards) == [INFO_FILE] + [e.name for e in info.shards]
    names = list(_members(shards / "shard-000000.tar"))
    first = split.good_keys[:6]
    assert names == [f"{k}{ext}" for k in first for ext in (".jpg", ".json")]
    with tarfile.open(shards / "shard-000000.tar") as tar:
        m = tar.getmember(names[0])
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o644)


def test_metadata_keeps_labels_and_original_size(split: TinySplit, shards: Path):
    by_key = {r.key: r for r in read_manifest(split.prepared).records()}
    meta = {
        name[: -len(".json")]: json.loads(data)
        for e in load_info(shards).shards
        for name, data in _members(shards / e.name).items()
        if name.endswith(".json")
    }
    assert list(meta) == split.good_keys
    for key, m in meta.items():
        r = by_key[key]
        assert (m["labels"], m["ignore"]) == (list(r.labels), list(r.ignore))
        assert (m["width"], m["height"]) == (r.width, r.height)


@pytest.mark.parametrize("max_side", [40, None])
def test_max_side_resizes_large_and_copies_small(split: TinySplit, tmp_path: Path, max_side):
    info = write_shards(split.prepared, split.images, tmp_path, max_side=max_side, workers=0)
    by_key = {r.key: r for r in split.records}
    resized = copied = 0
    for name, data in _members(tmp_path / info.shards[0].name).items():
        if not name.endswith(".jpg"):
            continue
        r = by_key[name[: -len(".jpg")]]
        source = (split.images / r.path).read_bytes()
        img = Image.open(io.BytesIO(data))
        assert img.format == "JPEG"
        if max_side is not None and max(r.width, r.height) > max_side:
            assert max(img.size) == max_side
            assert abs(img.size[0] / img.size[1] - r.width / r.height) < 0.05
            resized += 1
        else:
            assert data == source
            copied += 1
    assert copied > 0 and (resized > 0 or max_side is None)


@pytest.mark.parametrize("max_side", [None, 16])  # copy path and resize path
def test_broken_inputs_are_skipped_with_reasons(split: TinySplit, tmp_path: Path, max_side):
    info = write_shards(split.prepared, split.images, tmp_path, max_side=max_side, workers=2)
    reasons = {s.key: s.reason for s in info.skipped}
    assert set(reasons) == {"truncated", "notes", "gone"}
    assert reasons["gone"] == "missing file"
    assert reasons["truncated"].startswith("undecodable")
    assert reasons["notes"].startswith("undecodable")
    assert {s.path for s in info.skipped} == {"truncated.jpg", "notes.jpg", "gone.jpg"}
    assert info.total == len(split.good_keys)
    summary = info.summary()
    assert "\n" not in summary and "skipped 3" in summary and "missing file" in summary
    on_disk = json.loads((tmp_path / INFO_FILE).read_text())
    assert {s["key"] for s in on_disk["skipped"]} == {"truncated", "notes", "gone"}


def test_rerun_with_fewer_shards_removes_stale_ones(split: TinySplit, tmp_path: Path):
    write_shards(split.prepared, split.images, tmp_path, shard_size=4, workers=0)
    assert len(list(tmp_path.glob("shard-*.tar"))) == 5
    info = write_shards(split.prepared, split.images, tmp_path, shard_size=8, workers=0)
    assert _shard_files(tmp_path) == [INFO_FILE] + [e.name for e in info.shards]
    assert len(info.shards) == 3


def test_crash_mid_shard_leaves_no_half_shard_and_no_info(
    split: TinySplit, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    write_shards(split.prepared, split.images, tmp_path, shard_size=4, workers=0)
    calls = {"n": 0}
    real_add = shard_writer._add_member

    def crash_in_second_shard(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        calls["n"] += 1
        if calls["n"] == 9:  # shard size 3: members 7.. belong to the second shard
            raise RuntimeError("simulated crash")
        real_add(tar, name, data)

    monkeypatch.setattr(shard_writer, "_add_member", crash_in_second_shard)
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_shards(split.prepared, split.images, tmp_path, shard_size=3, workers=2)
    assert _shard_files(tmp_path) == ["shard-000000.tar"]  # no temp file, no stale shards
    assert len(_members(tmp_path / "shard-000000.tar")) == 6  # complete: 3 samples
    with pytest.raises(DataError, match=INFO_FILE):
        load_info(tmp_path)
    monkeypatch.setattr(shard_writer, "_add_member", real_add)
    info = write_shards(split.prepared, split.images, tmp_path, shard_size=3, workers=0)
    assert load_info(tmp_path) == info and info.total == len(split.good_keys)


def test_progress_and_bad_arguments(split: TinySplit, tmp_path: Path):
    seen: list[tuple[int, int]] = []
    write_shards(
        split.prepared, split.images, tmp_path, workers=0, progress=lambda *a: seen.append(a)
    )
    n = len(split.records)
    assert seen[-1] == (n, n) and len(seen) == n
    with pytest.raises(ConfigError):
        write_shards(split.prepared, split.images, tmp_path, shard_size=0)
    with pytest.raises(ConfigError):
        write_shards(split.prepared, split.images, tmp_path, max_side=0)


def test_long_keys_and_webdataset_can_read_the_shards(tmp_path: Path):
    """Keys past the 100-byte ustar name field go through pax headers, for both readers."""
    import webdataset as wds

    rel = "a" * 60 + "/" + "b" * 70 + ".jpg"
    save_jpeg(tmp_path / "images" / rel, (40, 30), seed=0)
    save_jpeg(tmp_path / "images" / "short.jpg", (30, 40), seed=1)
    records = [ImageRecord(make_key(r), r, (1,), (), 0, 0) for r in (rel, "short.jpg")]
    write_manifest(tmp_path / "prepared", CLASSES, records)
    write_shards(tmp_path / "prepared", tmp_path / "images", tmp_path / "shards", workers=0)
    keys = [r.key for r in records]
    assert len(keys[0]) > 100
    batch = next(iter(eval_loader(tmp_path / "shards", batch_size=2, image_size=8, num_workers=0)))
    assert batch.keys == keys and batch.targets[:, 1].tolist() == [1.0, 1.0]
    stream = wds.WebDataset(str(tmp_path / "shards" / "shard-000000.tar"), shardshuffle=False)
    samples = list(stream)
    assert [s["__key__"] for s in samples] == keys
    assert json.loads(samples[0]["json"])["labels"] == [1]


# --- locating shards ----------------------------------------------------------------------


def test_resolve_directory_and_glob(shards: Path):
    paths, info = resolve_shards(shards)
    assert [p.name for p in paths] == [e.name for e in info.shards] and info.total == 20
    paths, sub = resolve_shards(str(shards / "shard-00000[13].tar"))
    assert [p.name for p in paths] == ["shard-000001.tar", "shard-000003.tar"]
    assert sub.total == 8 and sub.classes == info.classes
    paths, _ = resolve_shards(shards / "*")  # _info.json itself is not a shard
    assert len(paths) == 4


def test_resolve_errors(shards: Path, tmp_path: Path):
    with pytest.raises(DataError, match="nothing-here"):
        resolve_shards(str(tmp_path / "nothing-here-*.tar"))
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    shutil.copy(copy / "shard-000000.tar", copy / "shard-000099.tar")
    with pytest.raises(DataError, match="shard-000099.tar"):
        resolve_shards(str(copy / "shard-*.tar"))
    (copy / INFO_FILE).unlink()
    with pytest.raises(DataError, match=INFO_FILE):
        resolve_shards(copy)
    with pytest.raises(DataError, match=INFO_FILE):
        resolve_shards(str(copy / "shard-*.tar"))


def test_normalize_matches_the_textbook_formula():
    img = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    assert torch.allclose(normalize(img), (img / 255.0 - mean) / std, atol=1e-5)
    one = eval_transform(4)(img[0])
    assert one.shape == (3, 4, 4) and one.dtype == torch.float32
    with pytest.raises(ConfigError):
        eval_transform(0)


# --- eval stream --------------------------------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 2, 3])
@pytest.mark.parametrize("shard_size", [100, 3])  # one shard, several shards
def test_eval_yields_every_key_once_in_order(
    split: TinySplit, tmp_path: Path, num_workers, shard_size
):
    write_shards(
        split.prepared, split.images, tmp_path, max_side=40, shard_size=shard_size, workers=0
    )
    loader = eval_loader(tmp_path, batch_size=3, image_size=24, num_workers=num_workers)
    batches = list(loader)
    assert len(batches) == len(loader) == 7  # 20 samples
    assert [k for b in batches for k in b.keys] == split.good_keys
    assert [len(b.keys) for b in batches] == [3] * 6 + [2]
    targets = read_manifest(split.prepared).targets()  # rows in manifest order
    row = {r.key: i for i, r in enumerate(split.records)}
    for b in batches:
        assert b.images.shape == (len(b.keys), 3, 24, 24) and b.images.dtype == torch.float32
        assert torch.isfinite(b.images).all()
        expected = targets[[row[k] for k in b.keys]]
        assert np.array_equal(b.targets.numpy(), expected)


def test_eval_is_deterministic_and_unaugmented(shards: Path):
    a = list(eval_loader(shards, batch_size=8, image_size=32, num_workers=0))
    b = list(eval_loader(shards, batch_size=8, image_size=32, num_workers=2))
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.images, y.images)


# --- train stream -------------------------------------------------------------------------


def _epoch(shards: Path | str, **kw) -> list:
    args = dict(batch_size=3, image_size=16, seed=1, epoch=0, num_workers=0) | kw
    return list(train_loader(shards, **args))


def test_train_len_and_disjoint_equal_ranks(shards: Path):
    per_rank = [_epoch(shards, rank=r, world_size=2, num_workers=2) for r in range(2)]
    loader = train_loader(
        shards, batch_size=3, image_size=16, seed=1, epoch=0, num_workers=2, world_size=2
    )
    assert len(loader) == 20 // (2 * 3) == 3
    assert [len(p) for p in per_rank] == [3, 3]
    keys = [[k for b in p for k in b.keys] for p in per_rank]
    assert all(len(set(k)) == 9 for k in keys)
    assert not set(keys[0]) & set(keys[1])
    assert all(b.images.shape == (3, 3, 16, 16) for p in per_rank for b in p)


def test_train_is_deterministic_and_independent_of_workers(shards: Path):
    a, b = _epoch(shards, num_workers=0), _epoch(shards, num_workers=3)
    assert len(a) == 6
    for x, y in zip(a, b, strict=True):
        assert x.keys == y.keys
        assert torch.equal(x.images, y.images) and torch.equal(x.targets, y.targets)
    other = [k for batch in _epoch(shards, epoch=1) for k in batch.keys]
    assert other != [k for batch in a for k in batch.keys]


def test_train_shuffles_and_flips(split: TinySplit, shards: Path):
    train = _epoch(shards, batch_size=20)
    assert train[0].keys != split.good_keys and sorted(train[0].keys) == sorted(split.good_keys)
    plain = next(iter(eval_loader(shards, batch_size=20, image_size=16, num_workers=0)))
    ref = dict(zip(plain.keys, plain.images, strict=True))
    flipped = [
        not torch.equal(img, ref[k]) for k, img in zip(train[0].keys, train[0].images, strict=True)
    ]
    assert 0 < sum(flipped) < 20
    for k, img, f in zip(train[0].keys, train[0].images, flipped, strict=True):
        assert torch.equal(img, ref[k].flip(-1) if f else ref[k])
    unaugmented = _epoch(shards, batch_size=20, augment=False)[0]
    assert torch.equal(unaugmented.images, torch.stack([ref[k] for k in unaugmented.keys]))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skip_batches_resumes_exactly(shards: Path, num_workers):
    full = _epoch(shards, batch_size=2, num_workers=num_workers, shuffle_window=4)
    loader = train_loader(
        shards, batch_size=2, image_size=16, seed=1, epoch=0, num_workers=num_workers,
        skip_batches=3, shuffle_window=4,
    )  # fmt: skip
    rest = list(loader)
    assert len(loader) == 10 and loader.remaining == 7 and len(rest) == 7
    for x, y in zip(full[3:], rest, strict=True):
        assert x.keys == y.keys and torch.equal(x.images, y.images)
    with pytest.raises(ConfigError):
        train_loader(
            shards, batch_size=2, image_size=16, seed=1, epoch=0, num_workers=0, skip_batches=11
        )


def test_fewer_shards_than_ranks_times_workers(split: TinySplit, tmp_path: Path):
    write_shards(split.prepared, split.images, tmp_path, max_side=40, shard_size=100, workers=0)
    per_rank = [
        _epoch(tmp_path, batch_size=2, rank=r, world_size=3, num_workers=2) for r in range(3)
    ]
    assert [len(p) for p in per_rank] == [3, 3, 3]
    keys = [k for p in per_rank for b in p for k in b.keys]
    assert len(keys) == len(set(keys)) == 18


def test_resample_draws_shards_with_replacement(split: TinySplit, shards: Path):
    a = _epoch(shards, resample=True, world_size=2, num_workers=2)
    b = _epoch(shards, resample=True, world_size=2, num_workers=0)
    assert len(a) == 3 and [x.keys for x in a] == [x.keys for x in b]
    epochs = [[k for x in _epoch(shards, resample=True, epoch=e) for k in x.keys] for e in range(6)]
    assert all(len(keys) == 18 and set(keys) <= set(split.good_keys) for keys in epochs)
    assert any(len(set(keys)) < len(keys) for keys in epochs)  # some shard drawn twice


def test_train_rejects_bad_arguments(shards: Path):
    with pytest.raises(ConfigError, match="cannot fill"):
        _epoch(shards, batch_size=11, world_size=2)
    with pytest.raises(ConfigError, match="rank"):
        _epoch(shards, rank=2, world_size=2)
    with pytest.raises(DataError, match="no shard"):
        _epoch(str(shards / "nope-*.tar"))


def test_corrupt_shard_is_a_data_error(shards: Path, tmp_path: Path):
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    data = (copy / "shard-000001.tar").read_bytes()
    (copy / "shard-000001.tar").write_bytes(data[: len(data) // 3])
    with pytest.raises(DataError, match="shard-000001.tar"):
        list(eval_loader(copy, batch_size=4, image_size=16, num_workers=0))
