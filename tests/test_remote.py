"""Shards from URLs: a local HTTP server (started and stopped by PID) and `pipe:cat` serve
the test shards; evaluation and batch prediction match the local files exactly, training
holds what the README promises for the streaming mode."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli import app
from lcm.data.indexing import index_shards
from lcm.data.shards import eval_loader, is_remote, load_info, resolve_shards, train_loader
from lcm.errors import DataError
from tests._engine_fixtures import CLASSES, cli_env, free_port, run_cli
from tests._predict_fixtures import fetch


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_data, trained):
    """An HTTP server on 127.0.0.1 over a folder holding the test shard directories."""
    root = tmp_path_factory.mktemp("served")
    for name, src in (("train", tiny_data.train), ("val", tiny_data.val), ("p", trained.shards)):
        shutil.copytree(src, root / name)
    (root / "bare").mkdir()  # shards without their _info.json
    for tar in sorted(trained.shards.glob("*.tar")):
        shutil.copy(tar, root / "bare" / tar.name)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise RuntimeError("the test HTTP server did not start")
        yield root, f"http://127.0.0.1:{port}"
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)


def _by_key(loader) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {
        k: (b.images[i], b.targets[i]) for b in loader for i, k in enumerate(b.keys)
    }  # fmt: skip


def test_url_specs_resolve_beside_their_info(served, trained):
    root, url = served
    local, info = resolve_shards(trained.shards)
    brace, binfo = resolve_shards(f"{url}/p/shard-{{000000..000003}}.tar")
    assert is_remote(brace) and not is_remote(local)
    assert brace == [f"{url}/p/{p.name}" for p in local] and binfo == info
    assert resolve_shards(f"{url}/p/")[0] == brace  # a directory URL: every listed shard
    two, tinfo = resolve_shards(f"{url}/p/shard-{{000001,000003}}.tar")
    assert [Path(u).name for u in two] == ["shard-000001.tar", "shard-000003.tar"]
    assert tinfo.total == 16
    piped, _ = resolve_shards(f"pipe:cat {root}/p/shard-{{000000..000003}}.tar")
    assert piped[0] == f"pipe:cat {root}/p/shard-000000.tar"
    files, finfo = resolve_shards(f"{trained.shards}/shard-{{000000..000003}}.tar")
    assert files == local and finfo == info  # a local brace list stays local (exact) mode
    assert resolve_shards(f"file://{trained.shards}") == (local, info)


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("{url}/bare/shard-000000.tar", "exited with status 22.*lcm data index"),
        ("{url}/p/shard-000009.tar", "does not list shard-000009.tar"),
        ("{url}/p/{{a,b}}", "names no .tar file"),
        ("{{{url}/p/shard-000000.tar,{root}/p/shard-000001.tar}}", "mixes URLs and local paths"),
        ("pipe:false {root}/p/shard-000000.tar", "_info.json"),
    ],
)
def test_url_spec_errors_name_the_problem(served, spec, fragment):
    root, url = served
    with pytest.raises(DataError, match=fragment):
        resolve_shards(spec.format(url=url, root=root))


@pytest.mark.parametrize("num_workers", [0, 2, 4])  # 4 workers > 3 shards
def test_streamed_evaluation_batches_equal_the_local_ones(served, tiny_data, num_workers):
    _, url = served
    kw = dict(batch_size=5, image_size=32, num_workers=num_workers)
    local = _by_key(eval_loader(tiny_data.train, **kw))
    remote = eval_loader(f"{url}/train/shard-{{000000..000002}}.tar", **kw)
    assert len(remote) == len(eval_loader(tiny_data.train, **kw))
    streamed = _by_key(remote)
    assert streamed.keys() == local.keys()
    for k, (img, tgt) in local.items():
        assert torch.equal(streamed[k][0], img) and torch.equal(streamed[k][1], tgt)


def _epoch(spec, **kw) -> list[tuple[list[str], torch.Tensor]]:
    args = dict(batch_size=8, image_size=32, seed=4, epoch=1, num_workers=0) | kw
    return [(b.keys, b.images) for b in train_loader(spec, **args)]


def test_streamed_training_holds_what_the_readme_says(served, tiny_data):
    _, url = served
    spec = f"{url}/train/shard-{{000000..000002}}.tar"
    one = _epoch(spec)
    assert [len(k) for k, _ in one] == [8] * 6  # the local mode's batches per epoch
    keys = [k for ks, _ in one for k in ks]
    assert sorted(keys) == sorted(_by_key(eval_loader(tiny_data.train, batch_size=48,
                                                       image_size=32, num_workers=0)))  # fmt: skip
    again = _epoch(spec)  # a pure function of (seed, epoch, rank, ranks, workers)
    assert all(a[0] == b[0] and torch.equal(a[1], b[1]) for a, b in zip(one, again, strict=True))
    assert _epoch(spec, epoch=2)[0][0] != one[0][0]
    for workers in (0, 2):  # resuming reads past the first batches and continues exactly
        full = _epoch(spec, num_workers=workers)
        for skip in (3, 4):  # 3: the worker that delivers first is not batch 0's
            rest = _epoch(spec, num_workers=workers, skip_batches=skip)
            assert [k for k, _ in rest] == [k for k, _ in full[skip:]]
            assert all(torch.equal(a[1], b[1]) for a, b in zip(rest, full[skip:], strict=True))
    listed = _epoch(f"{tiny_data.train}/shard-{{000000..000002}}.tar")  # local: exact mode
    whole = _epoch(tiny_data.train)
    assert all(a[0] == b[0] and torch.equal(a[1], b[1]) for a, b in zip(listed, whole, strict=True))
    ranks = [_epoch(spec, rank=r, world_size=2) for r in range(2)]
    assert [len(r) for r in ranks] == [3, 3]  # equal batches per rank
    rank0 = {k for ks, _ in ranks[0] for k in ks}
    rank1 = {k for ks, _ in ranks[1] for k in ks}
    assert not rank0 & rank1  # ranks read different shards


def test_foreign_shards_get_an_info_file(served, trained, tmp_path):
    root, url = served
    (tmp_path / "classes.json").write_text(json.dumps(list(CLASSES)))
    out = root / "bare" / "_info.json"
    info = index_shards(f"{url}/bare/shard-{{000000..000003}}.tar", tmp_path / "classes.json", out)
    try:
        made = load_info(trained.shards)
        assert (info.classes, info.shards, info.checksum) == (
            made.classes, made.shards, made.checksum,
        )  # fmt: skip
        assert resolve_shards(f"{url}/bare/")[1].total == made.total
    finally:
        out.unlink()
    (tmp_path / "one.tar").write_bytes(b"not a tar" * 100)
    with pytest.raises(DataError, match="one.tar: corrupt tar header"):
        index_shards(str(tmp_path / "one.tar"), tmp_path / "classes.json", tmp_path / "_info.json")
    (tmp_path / "two.json").write_text(json.dumps(["a"]))  # too few classes for the labels
    with pytest.raises(DataError, match="class indices in"):
        index_shards(str(trained.shards), tmp_path / "two.json", tmp_path / "_info.json")
    assert not (tmp_path / "_info.json").exists()


def _run(tmp_path, api, *args):
    return run_cli(cli_env(tmp_path, api), *args)


@pytest.mark.slow
def test_cli_evaluates_and_predicts_from_urls_like_from_files(
    served, trained, tmp_path, prefect_api
):
    root, url = served
    sources = {
        "local": str(trained.shards),
        "http": f"{url}/p/shard-{{000000..000003}}.tar",
        "pipe": f"pipe:cat {root}/p/shard-{{000000..000003}}.tar",
    }
    metrics, rows = {}, {}
    for name, spec in sources.items():
        model = tmp_path / f"model-{name}"
        shutil.copytree(trained.model, model)
        db = tmp_path / f"{name}.duckdb"
        evaluate = ["evaluate", "--checkpoint", str(model), "--shards", spec, "--out",
                    str(tmp_path / f"eval-{name}")]  # fmt: skip
        predict = ["batch-predict", "--checkpoint", str(model), "--shards", spec, "--db", str(db),
                   "--run-id", "r"]  # fmt: skip
        if name == "local":  # the reference: the same CLI in this process (a start saved)
            for args in (evaluate, [*predict, "--num-workers", "0"]):  # no fork of this process
                done = CliRunner().invoke(app, args, catch_exceptions=False)
                assert done.exit_code == 0, done.output
        else:
            _run(tmp_path, prefect_api, *evaluate)
            _run(tmp_path, prefect_api, *predict, "--num-workers", "2")
        doc = json.loads((tmp_path / f"eval-{name}" / "metrics.json").read_text())
        metrics[name] = {k: v for k, v in doc.items() if isinstance(v, float)}
        rows[name] = sorted(fetch(db, "SELECT shard, image_key, label_id, score FROM predictions"))
    assert metrics["http"] == metrics["local"] and metrics["pipe"] == metrics["local"]
    assert len(rows["local"]) == 32 * len(CLASSES)
    assert rows["http"] == rows["local"] and rows["pipe"] == rows["local"]


@pytest.mark.slow
def test_cli_trains_one_epoch_from_urls(served, tmp_path, prefect_api):
    root, url = served
    out = tmp_path / "model"
    from tests._engine_fixtures import write_params

    params = write_params(tmp_path / "params.yaml", train={"epochs": 1})
    _run(tmp_path, prefect_api, "train", "--shards", f"{url}/train/shard-{{000000..000002}}.tar",
         "--val-shards", f"{url}/val/", "--out", str(out), "--params", str(params),
         "--no-live")  # fmt: skip
    history = json.loads((out / "history.json").read_text())
    assert [row["step"] for row in history] == [6]  # 48 images, batch 8: the local count
    assert np.isfinite(history[0]["val_mAP"])
