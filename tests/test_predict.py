"""`lcm batch-predict`: exact scores, idempotent re-runs, SIGKILL at any point, skipped
images, image folders, Dask, and the checks made before a flow starts."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from lcm.checkpoint import load_for_inference, model_digest, save_thresholds
from lcm.errors import CheckpointError, ConfigError, DataError
from lcm.predict import PredictRequest, check_request, check_run_conflict, score_files
from tests._engine_fixtures import CLASSES, ROOT, cli_env, lcm_cmd
from tests._predict_fixtures import (
    copy_model,
    corrupt_one_jpeg,
    direct_scores,
    fetch,
    stored,
)

pytestmark = pytest.mark.usefixtures("prefect_harness")
N_IMAGES, N_SHARDS, C = 32, 4, len(CLASSES)


def run_flow(model, db, run_id, runner="thread", **kw):
    from flows.predict import batch_predict

    kw = {"num_workers": 0, "device": "cpu", "batch_size": 3, **kw}
    return batch_predict(runner, None, checkpoint=str(model), db=str(db), run_id=run_id, **kw)


def api_env(tmp_path):
    """`lcm` subprocesses talk to the session's test server (no server start of their own)."""
    from prefect.settings import PREFECT_API_URL

    return {**cli_env(tmp_path), "PREFECT_API_URL": PREFECT_API_URL.value()}


@pytest.mark.slow
def test_scores_labels_and_targets_match_the_model(trained, tmp_path):
    model = copy_model(trained, tmp_path / "model")
    thresholds = np.array([0.2, 0.4, 0.6, 0.8])
    save_thresholds(model / "thresholds.json", CLASSES, thresholds)
    run = run_flow(model, tmp_path / "p.duckdb", "r1", shards=str(trained.shards))
    db = tmp_path / "p.duckdb"

    direct = direct_scores(model, trained.shards)
    got = stored(db, "r1")
    assert len(got) == N_IMAGES * C and set(got) == set(direct)
    assert max(abs(got[k] - direct[k][0]) for k in got) < 1e-6
    labels = fetch(db, "SELECT label_id, name, threshold, threshold_source FROM labels ORDER BY 1")
    assert [r[1] for r in labels] == list(CLASSES)
    assert [r[2] for r in labels] == pytest.approx(thresholds.tolist())
    assert all(r[3].endswith("thresholds.json") for r in labels)
    targets = {
        (k, c): t for k, c, t in fetch(db, "SELECT image_key, label_id, target FROM targets")
    }
    assert targets == {k: v[1] for k, v in direct.items()}
    assert run["status"] == "complete" and run["n_images"] == N_IMAGES
    assert run["n_shards"] == N_SHARDS and run["n_skipped"] == 0
    assert run["model_sha256"] == model_digest(model, "raw")
    # the views: names, the thresholds' verdict, and predictions beside targets
    predicted = fetch(db, "SELECT image_key, label_id, predicted FROM predictions_named")
    assert all(p == (got[(k, c)] >= thresholds[c]) for k, c, p in predicted)
    assert fetch(db, "SELECT count(*) FROM scored")[0][0] == N_IMAGES * C


@pytest.mark.slow
def test_shards_are_scored_one_at_a_time(trained, tmp_path, monkeypatch):
    """The thread runner scores one shard at a time: a shard's DataLoader forks its decoding
    workers, and a fork while another thread is inside a torch op can leave the child hung in
    its first ``torch.set_num_threads`` (seen with 2 workers and 4 shards on Prefect's default
    thread pool, which ran all four at once)."""
    import threading
    import time

    import lcm.predict

    score_unit, lock, active, most = lcm.predict.score_unit, threading.Lock(), [0], [0]

    def tracked(*args, **kwargs):
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        try:
            time.sleep(0.3)  # long enough for another thread to start a shard meanwhile
            return score_unit(*args, **kwargs)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(lcm.predict, "score_unit", tracked)
    run = run_flow(trained.model, tmp_path / "p.duckdb", "r", shards=str(trained.shards))
    assert run["n_shards"] == N_SHARDS and most[0] == 1


@pytest.mark.slow
def test_rerun_is_a_noop_another_model_is_refused_and_replace_swaps(trained, tmp_path):
    db = tmp_path / "p.duckdb"
    run_flow(trained.model, db, "r", shards=str(trained.shards))
    everything = "SELECT * FROM {} ORDER BY ALL"
    before = {t: fetch(db, everything.format(t)) for t in ("predictions", "run_shards", "runs")}

    again = run_flow(trained.model, db, "r", shards=str(trained.shards))
    assert again["already_complete"]
    assert {t: fetch(db, everything.format(t)) for t in before} == before

    with pytest.raises(ConfigError, match="another weights.*--replace"):
        run_flow(trained.model, db, "r", shards=str(trained.shards), weights="ema")
    other = copy_model(trained, tmp_path / "other")  # the same architecture, other weights
    (other / "model.safetensors").write_bytes((other / "ema.safetensors").read_bytes())
    req = PredictRequest(checkpoint=other, db=db, run_id="r", shards=str(trained.shards))
    with pytest.raises(ConfigError, match="another model .*--replace"):
        check_run_conflict(req, *check_request(req))  # refused before any flow starts
    assert fetch(db, everything.format("predictions")) == before["predictions"]

    run_flow(trained.model, db, "r", shards=str(trained.shards), weights="ema", replace=True)
    raw, ema = before["predictions"], stored(db, "r")
    assert len(ema) == len(raw) == N_IMAGES * C
    direct = direct_scores(trained.model, trained.shards, "ema")
    assert max(abs(ema[k] - direct[k][0]) for k in ema) < 1e-6
    assert any(abs(ema[(k, c)] - s) > 1e-4 for _, _, k, c, s in raw)  # really other scores
    assert fetch(db, "SELECT weights, status FROM runs") == [("ema", "complete")]


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {root!r})
    import lcm.predict.parts, lcm.store

    def die_after(fn):
        def wrapped(*args):
            fn(*args)
            os.kill(os.getpid(), signal.SIGKILL)
        return wrapped

    if sys.argv[1] == "commit":  # right after the shards' registration commits
        lcm.store.register_parts = die_after(lcm.store.register_parts)
    else:  # right after the first part file is written, before anything is committed
        lcm.predict.parts.write_part = die_after(lcm.predict.parts.write_part)
    from cli import app
    app(sys.argv[2:], prog_name="lcm")
    """
)


def _night_args(trained) -> list[str]:
    return ["batch-predict", "--checkpoint", str(trained.model), "--shards",
            str(trained.shards), "--run-id", "night", "--num-workers", "0", "--batch-size", "3",
            "--device", "cpu"]  # fmt: skip


@pytest.fixture(scope="module")
def night_reference(trained, tmp_path_factory, prefect_harness):
    """The uninterrupted `lcm batch-predict` of ``_night_args``: one store both kills compare
    with."""
    tmp = tmp_path_factory.mktemp("night-reference")
    ref = tmp / "ref.duckdb"
    subprocess.run(lcm_cmd(*_night_args(trained), "--db", str(ref)), env=api_env(tmp),
                   check=True, capture_output=True)  # fmt: skip
    return ref


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["part", "commit"])
def test_sigkill_then_rerun_gives_every_row_once_bit_identical(
    trained, night_reference, tmp_path, stage
):
    env = api_env(tmp_path)
    args = _night_args(trained)
    db, ref = tmp_path / "p.duckdb", night_reference

    killer = tmp_path / "killer.py"
    killer.write_text(KILLER.format(root=str(ROOT)))
    cmd = [sys.executable, str(killer), stage, *args, "--db", str(db)]
    killed = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    committed = fetch(db, "SELECT count(*) FROM run_shards")[0][0]
    assert committed == (N_SHARDS if stage == "commit" else 0)
    assert fetch(db, "SELECT status FROM runs") == [("running",)]

    rerun = subprocess.run(lcm_cmd(*args, "--db", str(db)), env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert stored(db, "night") == stored(ref, "night")  # bit-identical, every key
    for table, key in (
        ("predictions", "image_key, label_id"),
        ("targets", "image_key, label_id"),
        ("run_shards", "shard"),
    ):
        total, distinct = fetch(db, f"SELECT count(*), count(DISTINCT ({key})) FROM {table}")[0]
        assert total == distinct, f"duplicates in {table}"
    assert fetch(db, "SELECT count(*) FROM predictions")[0][0] == N_IMAGES * C
    assert fetch(db, "SELECT count(*), sum(n_images) FROM run_shards")[0] == (N_SHARDS, N_IMAGES)
    assert fetch(db, "SELECT status, n_images FROM runs") == [("complete", N_IMAGES)]


@pytest.mark.slow
def test_corrupt_jpeg_is_skipped_here_but_fails_evaluate(trained, tmp_path):
    bad = tmp_path / "bad"
    key = corrupt_one_jpeg(trained.shards, bad)
    db = tmp_path / "p.duckdb"
    run = run_flow(trained.model, db, "b", shards=str(bad))
    skipped = fetch(db, "SELECT shard, image_key, reason FROM skipped_images")
    assert len(skipped) == 1 and skipped[0][:2] == ("shard-000001", key)
    assert "JPEG" in skipped[0][2]
    assert fetch(db, "SELECT count(*) FROM predictions")[0][0] == (N_IMAGES - 1) * C
    assert fetch(db, "SELECT count(*) FROM predictions WHERE image_key = ?", key)[0][0] == 0
    assert (run["n_images"], run["n_skipped"]) == (N_IMAGES - 1, 1)

    cmd = lcm_cmd(
        "evaluate",
        "--checkpoint",
        str(trained.model),
        "--shards",
        str(bad),
        "--out",
        str(tmp_path / "ev"),
        "--num-workers",
        "0",
        "--device",
        "cpu",
    )
    res = subprocess.run(cmd, env=api_env(tmp_path), capture_output=True, text=True)
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0] and "cannot decode" in lines[0], res.stderr


@pytest.mark.slow
def test_image_folder_skips_escapes_and_matches_lcm_predict(trained, tmp_path):
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    sources = sorted(trained.images.glob("*.jpg"))[:5]
    for i, src in enumerate(sources[:4]):
        (root / ("sub" if i % 2 else ".") / src.name).write_bytes(src.read_bytes())
    Image.open(sources[4]).save(root / "as.png")  # PNG is scored too
    (root / "notes.jpg").write_text("not an image")  # undecodable: skipped in its group
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(sources[0].read_bytes())
    (root / "escape.jpg").symlink_to(outside)  # leaves the root: skipped, never read
    db = tmp_path / "p.duckdb"
    run = run_flow(trained.model, db, "i", images=str(root))

    skipped = dict(fetch(db, "SELECT image_key, shard FROM skipped_images"))
    assert skipped == {"escape.jpg": None, "notes.jpg": "images-000000"}
    got = stored(db, "i")
    keys = sorted({k for k, _ in got})
    scored = [*root.rglob("im*.jpg"), root / "as.png"]
    assert keys == sorted(p.relative_to(root).as_posix() for p in scored)
    assert fetch(db, "SELECT count(*) FROM targets")[0][0] == 0  # image files carry no labels
    assert (run["n_images"], run["n_skipped"]) == (5, 2)

    loaded = load_for_inference(trained.model, "raw", torch.device("cpu"))
    files = [root / k for k in keys]
    quick_keys, scores, _ = score_files(files, loaded, torch.device("cpu"), batch_size=2)
    for key, row in zip(keys, scores, strict=True):
        assert max(abs(got[(key, c)] - row[c]) for c in range(C)) < 1e-6
    assert quick_keys == [str(f) for f in files]

    res = subprocess.run(
        lcm_cmd(
            "predict",
            str(root / "as.png"),
            "--checkpoint",
            str(trained.model),
            "--top-k",
            "2",
            "--device",
            "cpu",
        ),
        env=cli_env(tmp_path),
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    best = int(np.argmax([got[("as.png", c)] for c in range(C)]))
    assert f"{CLASSES[best]} {got[('as.png', best)]:.3f}" in res.stdout


def _noise_jpegs(folder, seeds):
    folder.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        pixels = np.random.default_rng(seed).integers(0, 256, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img-{seed:04d}.jpg", quality=90)


@pytest.mark.slow
def test_only_new_scores_only_new_images_and_equals_a_full_run(trained, tmp_path, monkeypatch):
    import lcm.predict.score as score_mod

    folder, db = tmp_path / "folder", tmp_path / "p.duckdb"
    _noise_jpegs(folder, range(100))
    first = run_flow(trained.model, db, "night-1", images=str(folder))
    assert (first["n_images"], first["n_reused"]) == (100, 0)
    _noise_jpegs(folder, range(100, 130))  # the folder grew by 30 images
    (folder / "img-0003.jpg").rename(folder / "renamed-0003.jpg")  # the same bytes, a new key
    scored: list[int] = []
    real = score_mod._loader

    def counting(unit, *args):
        scored.append(len(unit.files))
        return real(unit, *args)

    monkeypatch.setattr(score_mod, "_loader", counting)
    night = run_flow(trained.model, db, "night-2", images=str(folder), only_new=True)
    assert sum(scored) == 30 and (night["n_images"], night["n_reused"]) == (130, 100)
    monkeypatch.setattr(score_mod, "_loader", real)
    full = run_flow(trained.model, db, "full", images=str(folder))
    incremental, everything = stored(db, "night-2"), stored(db, "full")
    assert set(incremental) == set(everything) and len(everything) == 130 * C
    assert max(abs(incremental[k] - everything[k]) for k in everything) <= 1e-6
    assert ("renamed-0003.jpg", 0) in incremental  # reused under tonight's key
    assert run_flow(trained.model, db, "night-2", images=str(folder), only_new=True)[
        "already_complete"]  # fmt: skip
    with pytest.raises(ConfigError, match="--only-new needs --images"):
        check_request(PredictRequest(checkpoint=trained.model, db=db, run_id="x",
                                     shards=str(trained.shards), only_new=True))  # fmt: skip
    assert full["n_reused"] == 0


@pytest.mark.slow
def test_dask_runner_gives_the_same_tables_from_two_worker_processes(trained, tmp_path):
    threads = run_flow(trained.model, tmp_path / "t.duckdb", "r", shards=str(trained.shards))
    dask = run_flow(trained.model, tmp_path / "d.duckdb", "r", "dask", shards=str(trained.shards))
    assert (threads["n_images"], threads["status"]) == (dask["n_images"], dask["status"])
    t, d = stored(tmp_path / "t.duckdb", "r"), stored(tmp_path / "d.duckdb", "r")
    assert set(t) == set(d) and max(abs(t[k] - d[k]) for k in t) < 1e-6
    for table in ("targets", "labels", "skipped_images"):
        sql = f"SELECT * EXCLUDE (run_id) FROM {table} ORDER BY ALL"
        assert fetch(tmp_path / "t.duckdb", sql) == fetch(tmp_path / "d.duckdb", sql)
    sql = "SELECT shard, n_images, n_rows FROM run_shards ORDER BY ALL"
    assert fetch(tmp_path / "t.duckdb", sql) == fetch(tmp_path / "d.duckdb", sql)
    workers = {w for (w,) in fetch(tmp_path / "d.duckdb", "SELECT worker FROM run_shards")}
    pids = {int(w.rsplit(":", 1)[1]) for w in workers}
    assert len(pids) == 2 and os.getpid() not in pids


@pytest.mark.slow
def test_inputs_are_checked_before_anything_starts(trained, tmp_path):
    def req(**kw):
        base = {
            "checkpoint": trained.model,
            "db": tmp_path / "p.duckdb",
            "run_id": "ok",
            "shards": str(trained.shards),
        }
        return PredictRequest(**{**base, **kw})

    with pytest.raises(ConfigError, match="run id"):
        check_request(req(run_id="../etc"))
    with pytest.raises(ConfigError, match="exactly one of --shards or --images"):
        check_request(req(images=str(trained.images)))
    with pytest.raises(CheckpointError, match="model.json"):
        check_request(req(checkpoint=tmp_path))
    with pytest.raises(DataError, match="no shard file matches"):
        check_request(req(shards=str(tmp_path / "none-*.tar")))
    with pytest.raises(ConfigError, match="is a directory"):
        check_request(req(db=tmp_path))
    with pytest.raises(ConfigError, match="device"):
        check_request(req(device="tpu"))
    other = copy_model(trained, tmp_path / "other")
    (other / "model.json").write_text(
        (other / "model.json").read_text().replace('"square"', '"circle"')
    )
    with pytest.raises(CheckpointError, match="classes differ"):
        check_request(req(checkpoint=other))
    assert not (tmp_path / "p.duckdb").exists()

    res = subprocess.run(
        lcm_cmd(
            "batch-predict",
            "--checkpoint",
            str(trained.model),
            "--shards",
            str(trained.shards),
            "--db",
            str(tmp_path / "p.duckdb"),
            "--run-id",
            "a b",
        ),
        env=cli_env(tmp_path),
        capture_output=True,
        text=True,
    )
    assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (tmp_path / "p.duckdb").exists()


@pytest.mark.slow
def test_aligned_eval_batches_never_span_shards_and_keep_their_scores(trained):
    from lcm.data.shards import eval_loader, resolve_shards

    paths, info = resolve_shards(trained.shards)
    aligned = list(
        eval_loader((paths, info), batch_size=3, image_size=32, num_workers=2, align_shards=True)
    )
    assert [len(b.keys) for b in aligned] == [3, 3, 2] * N_SHARDS
    assert [b.shard for b in aligned] == [s for s in range(N_SHARDS) for _ in range(3)]
    plain = list(eval_loader((paths, info), batch_size=3, image_size=32, num_workers=0))
    assert [len(b.keys) for b in plain] == [3] * 10 + [2]
    assert None in {b.shard for b in plain}  # unaligned, some batches span two shards
    assert [k for b in aligned for k in b.keys] == [k for b in plain for k in b.keys]
    # one shard alone gives the same batches, so its scores do not depend on the others
    one = dataclasses.replace(info, shards=(info.shards[2],), total=8)
    alone = list(
        eval_loader(
            ([paths[2]], one), batch_size=3, image_size=32, num_workers=0, align_shards=True
        )
    )
    assert [b.keys for b in alone] == [b.keys for b in aligned if b.shard == 2]
    assert all(
        torch.equal(a.images, b.images)
        for a, b in zip(alone, [b for b in aligned if b.shard == 2], strict=True)
    )


@pytest.mark.slow
def test_a_run_replaced_meanwhile_is_not_merged_into_and_parts_need_equal_settings(
    trained, tmp_path
):
    from lcm.predict import merge_parts, score_unit, start_run

    base = {
        "checkpoint": trained.model,
        "db": tmp_path / "p.duckdb",
        "run_id": "r",
        "shards": str(trained.shards),
        "num_workers": 0,
        "device": "cpu",
        "batch_size": 4,
    }
    raw = PredictRequest(**base)
    plan = start_run(raw)
    done = [score_unit(raw, plan.pending[0], plan.model_sha256, plan.run_dir)]
    # an interrupted run's part is reused only when scored the same way
    assert [p.shard for p in start_run(raw).reused] == [done[0].shard]
    assert start_run(PredictRequest(**{**base, "batch_size": 5})).reused == ()
    # another process replaces the run with other weights before this one merges
    start_run(PredictRequest(**{**base, "weights": "ema", "replace": True}))
    with pytest.raises(ConfigError, match="replaced by another process"):
        merge_parts(raw, done, plan.model_sha256)
    assert fetch(tmp_path / "p.duckdb", "SELECT count(*) FROM predictions")[0][0] == 0
    assert fetch(tmp_path / "p.duckdb", "SELECT weights FROM runs") == [("ema",)]


def test_glob_listing_skips_symlinked_folders(tmp_path):
    from lcm.data.images import list_images

    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    (root / "sub").mkdir(parents=True)
    elsewhere.mkdir()
    Image.new("RGB", (8, 8)).save(root / "sub" / "a.jpg")
    Image.new("RGB", (8, 8)).save(elsewhere / "b.jpg")
    (root / "inside").symlink_to(root / "sub")  # stays in the root, still not followed
    (root / "outside").symlink_to(elsewhere)
    listing = list_images(root)
    assert [f for g in listing.groups for f in g.files] == ["sub/a.jpg"]
    assert {k for k, _ in listing.skipped} == {"inside", "outside"}
    listing = list_images(f"{root}/**/*.jpg")  # glob's ** walks into symlinked folders
    assert [f for g in listing.groups for f in g.files] == ["sub/a.jpg"]
    assert {k for k, _ in listing.skipped} == {"inside/a.jpg", "outside/b.jpg"}
