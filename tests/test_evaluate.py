"""`lcm evaluate`: reports, calibrated thresholds, class checks, and the Prefect flow."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from lcm.checkpoint import load_for_inference, load_thresholds, threshold_sources
from lcm.config import load_params
from lcm.data.shards import eval_loader, resolve_shards
from lcm.engine import fit
from lcm.errors import CheckpointError
from lcm.evaluate import EvaluateRequest, evaluate_checkpoint
from lcm.inference import predict
from lcm.metrics import evaluate_scores
from lcm.train_request import TrainRequest
from tests._engine_fixtures import CLASSES, make_split, make_tiny_data, write_params


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    data = make_tiny_data(root / "data")
    params = load_params(write_params(root / "params.yaml", train={"epochs": 1}))
    fit(TrainRequest(params, str(data.train), root / "model"))
    return data, root / "model"


def test_evaluate_writes_reports_and_thresholds(trained, tmp_path):
    data, model_dir = trained
    result = evaluate_checkpoint(
        EvaluateRequest(
            checkpoint=model_dir,
            shards=str(data.val),
            out_dir=tmp_path / "eval",
            num_workers=0,
            device="cpu",
        )
    )
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["n_images"] == 24 and metrics["mAP"] == pytest.approx(result.mAP)
    with open(tmp_path / "eval" / "per_class.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["class"] for r in rows] == list(CLASSES)
    assert (tmp_path / "eval" / "pr_curves.png").read_bytes()[:4] == b"\x89PNG"
    thresholds = load_thresholds(model_dir / "thresholds.json", CLASSES)
    assert thresholds.shape == (4,)
    sources = threshold_sources(model_dir, CLASSES)  # why each, for the store's labels
    assert all(s.startswith(str(model_dir / "thresholds.json") + " (") for s in sources)
    assert all(s.endswith(("(F1-optimal)", "default 0.5)")) for s in sources)

    # the same numbers as scoring the stream directly with the raw weights
    model = load_for_inference(model_dir, "raw", torch.device("cpu")).model
    loader = eval_loader(resolve_shards(data.val), batch_size=7, image_size=32, num_workers=2)
    _, scores, targets = predict(model, loader, torch.device("cpu"))
    assert evaluate_scores(scores, targets, CLASSES).mAP == pytest.approx(result.mAP)


def test_no_calibrate_leaves_model_dir_alone(trained, tmp_path):
    data, model_dir = trained
    before = sorted(p.name for p in model_dir.iterdir())
    (model_dir / "thresholds.json").unlink(missing_ok=True)
    evaluate_checkpoint(
        EvaluateRequest(
            checkpoint=model_dir,
            shards=str(data.val),
            out_dir=tmp_path / "e",
            weights="ema",
            num_workers=0,
            device="cpu",
            calibrate=False,
        )
    )
    assert not (model_dir / "thresholds.json").exists()
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["weights"] == "ema"
    assert set(before) - {"thresholds.json"} <= {p.name for p in model_dir.iterdir()}


def test_shards_with_other_classes_are_refused(trained, tmp_path):
    _, model_dir = trained
    rng_root = tmp_path / "other"
    _, shards = make_split(rng_root, 8, seed=5, shard_size=8)
    info = json.loads((shards / "_info.json").read_text())
    info["classes"] = ["a", "b", "c", "d"]
    (shards / "_info.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="classes"):
        evaluate_checkpoint(
            EvaluateRequest(
                checkpoint=model_dir,
                shards=str(shards),
                out_dir=tmp_path / "e",
                num_workers=0,
                device="cpu",
            )
        )


@pytest.mark.slow
def test_evaluate_flow_publishes_metrics(trained, tmp_path, prefect_harness):
    from flows.evaluate import evaluate_flow

    data, model_dir = trained
    metrics = evaluate_flow(
        checkpoint=str(model_dir),
        shards=str(data.val),
        out_dir=str(tmp_path / "flow"),
        num_workers=0,
        device="cpu",
        calibrate=False,
    )
    # the flow reports what the model really scores on these shards, computed here directly
    loaded = load_for_inference(model_dir, "raw", torch.device("cpu"), thresholds=False)
    loader = eval_loader(resolve_shards(data.val), batch_size=8, image_size=32, num_workers=0)
    _, scores, targets = predict(loaded.model, loader, torch.device("cpu"))
    direct = evaluate_scores(scores, targets, CLASSES)
    assert metrics["n_images"] == 24
    assert metrics["mAP"] == pytest.approx(direct.mAP, abs=1e-6)
    assert metrics["OF1"] == pytest.approx(direct.at_threshold.OF1, abs=1e-6)
    assert (tmp_path / "flow" / "metrics.json").exists()
