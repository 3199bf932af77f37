"""Each input is resolved once per call: ``lcm train``, ``lcm evaluate`` and ``lcm
batch-predict`` check their request once and hand what they resolved down to the flow, so
each ``_info.json`` is read once and the model's ``model.json`` is parsed once by the checks
(the scorer, which may run in another process, loads the model once per process).

The commands run in this process (Typer's runner, the session's Prefect test server), with
the two readers wrapped to count their calls.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

import lcm.checkpoint as ckpt
import lcm.data.shards as shards
from cli import app
from tests._engine_fixtures import write_params
from tests._predict_fixtures import copy_model

pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture
def reads(monkeypatch) -> Counter:
    counts: Counter = Counter()
    load_info, load_meta = shards.load_info, ckpt.load_meta

    def counted_info(shard_dir):
        counts[Path(shard_dir).resolve() / "_info.json"] += 1
        return load_info(shard_dir)

    def counted_meta(model_dir, *args, **kwargs):
        counts[Path(model_dir).resolve() / ckpt.MODEL_JSON] += 1
        return load_meta(model_dir, *args, **kwargs)

    monkeypatch.setattr(shards, "load_info", counted_info)
    monkeypatch.setattr(ckpt, "load_meta", counted_meta)
    return counts


def invoke(*args: str) -> None:
    done = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert done.exit_code == 0, done.output


def info(path: Path) -> Path:
    return path.resolve() / "_info.json"


def test_train_reads_each_info_once(tiny_data, tmp_path, reads, one_thread):
    params = write_params(tmp_path / "params.yaml", train={"epochs": 1})
    invoke("train", "--shards", str(tiny_data.train), "--val-shards", str(tiny_data.val),
           "--out", str(tmp_path / "model"), "--params", str(params), "--no-live")  # fmt: skip
    assert reads == {info(tiny_data.train): 1, info(tiny_data.val): 1}


def test_evaluate_reads_each_input_once(trained, tmp_path, reads, one_thread):
    model = copy_model(trained, tmp_path / "model")  # evaluation writes thresholds
    invoke("evaluate", "--checkpoint", str(model), "--shards", str(trained.shards),
           "--out", str(tmp_path / "eval"), "--num-workers", "0")  # fmt: skip
    assert reads == {info(trained.shards): 1, model.resolve() / ckpt.MODEL_JSON: 1}


def test_batch_predict_reads_each_input_once(trained, tmp_path, reads, one_thread):
    model = copy_model(trained, tmp_path / "model")
    invoke("batch-predict", "--checkpoint", str(model), "--shards", str(trained.shards),
           "--db", str(tmp_path / "p.duckdb"), "--run-id", "r1", "--num-workers", "0")  # fmt: skip
    meta = model.resolve() / ckpt.MODEL_JSON
    assert reads[info(trained.shards)] == 1
    # the checks parse it once; the scorer's one load per process (a fresh model) is the other
    assert reads[meta] == 2
