"""Evaluation files: metrics.json, per_class.csv, pr_curves.png, thresholds, markdown."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import lcm.io
from lcm.checkpoint import load_thresholds, save_thresholds
from lcm.errors import CheckpointError
from lcm.metrics import EvalResult, evaluate_scores
from lcm.reports import markdown_summary, write_evaluation

CLASSES = ["cat", "dog", "kite", "bus", "car", "a|b", "tree"]


def _case(seed: int = 0) -> tuple[np.ndarray, np.ndarray, EvalResult]:
    rng = np.random.default_rng(seed)
    n, c = 24, len(CLASSES)
    scores = rng.random((n, c)).astype(np.float32)
    targets = (rng.random((n, c)) < 0.3).astype(np.float64)
    targets[rng.random((n, c)) < 0.2] = -1
    targets[0, :] = 1
    targets[:, 2] = np.minimum(targets[:, 2], 0)  # "kite" has no positive: dropped
    thresholds = np.linspace(0.3, 0.7, c)
    return scores, targets, evaluate_scores(scores, targets, CLASSES, thresholds)


def test_write_evaluation_files(tmp_path: Path) -> None:
    scores, targets, res = _case()
    out = tmp_path / "eval"
    write_evaluation(res, scores, targets, CLASSES, out, extra={"split": "val", "epoch": 3})
    assert sorted(p.name for p in out.iterdir()) == [
        "metrics.json",
        "per_class.csv",
        "pr_curves.png",
    ]  # no temporary files left behind

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mAP"] == pytest.approx(res.mAP)
    assert metrics["CF1"] == pytest.approx(res.at_threshold.CF1)
    assert metrics["OF1_top3"] == pytest.approx(res.top3.OF1)
    assert metrics["n_images"] == 24 and metrics["n_classes"] == len(CLASSES)
    assert metrics["dropped_classes"] == ["kite"]
    assert metrics["split"] == "val" and metrics["epoch"] == 3

    with (out / "per_class.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["class", "AP", "precision", "recall", "F1", "positives", "threshold"]
    assert [r["class"] for r in rows] == CLASSES
    assert rows[2]["AP"] == ""  # dropped class: no AP
    assert float(rows[0]["AP"]) == pytest.approx(res.per_class[0].ap, abs=1e-6)
    assert int(rows[1]["positives"]) == int((targets[:, 1] == 1).sum())
    assert float(rows[-1]["threshold"]) == pytest.approx(0.7)

    with Image.open(out / "pr_curves.png") as img:
        assert img.format == "PNG"
        assert img.size[0] > 400 and img.size[1] > 300


def test_write_evaluation_without_any_positive(tmp_path: Path) -> None:
    scores = np.array([[0.2, 0.9], [0.6, 0.1]])
    targets = np.array([[0, -1], [0, 0]], dtype=np.float64)
    res = evaluate_scores(scores, targets, ["x", "y"])
    write_evaluation(res, scores, targets, ["x", "y"], tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["mAP"] is None  # NaN is written as null
    assert metrics["dropped_classes"] == ["x", "y"]
    assert (tmp_path / "pr_curves.png").stat().st_size > 0


def test_write_evaluation_rejects_mismatches(tmp_path: Path) -> None:
    scores, targets, res = _case()
    with pytest.raises(ValueError, match="clash"):
        write_evaluation(res, scores, targets, CLASSES, tmp_path, extra={"mAP": 1.0})
    with pytest.raises(ValueError, match="classes"):
        write_evaluation(res, scores, targets, CLASSES[::-1], tmp_path)
    with pytest.raises(ValueError, match="scores"):
        write_evaluation(res, scores[:5], targets[:5], CLASSES, tmp_path)
    assert not any(tmp_path.iterdir())


def test_interrupted_write_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scores, targets, res = _case()
    write_evaluation(res, scores, targets, CLASSES, tmp_path)
    before = (tmp_path / "metrics.json").read_bytes()

    def fail(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(lcm.io.os, "replace", fail)
    scores2, targets2, res2 = _case(seed=1)
    with pytest.raises(OSError, match="disk full"):
        write_evaluation(res2, scores2, targets2, CLASSES, tmp_path)
    assert (tmp_path / "metrics.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "metrics.json",
        "per_class.csv",
        "pr_curves.png",
    ]


def test_thresholds_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "thresholds.json"
    th = np.array([0.1, 0.25, 0.5, 0.75, 0.9, 0.3, 0.6])
    save_thresholds(path, CLASSES, th)
    assert json.loads(path.read_text())["dog"] == 0.25
    np.testing.assert_array_equal(load_thresholds(path, CLASSES), th)
    # Keyed by name, so another class order gets its own order back.
    np.testing.assert_array_equal(load_thresholds(path, CLASSES[::-1]), th[::-1])


def test_save_thresholds_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="thresholds for"):
        save_thresholds(tmp_path / "t.json", ["a", "b"], np.array([0.5]))
    with pytest.raises(ValueError, match="unique"):
        save_thresholds(tmp_path / "t.json", ["a", "a"], np.array([0.5, 0.5]))
    with pytest.raises(ValueError, match="finite"):
        save_thresholds(tmp_path / "t.json", ["a", "b"], np.array([0.5, np.nan]))


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (None, "not found"),
        ("{not json", "not valid JSON"),
        ("[0.5, 0.5]", "JSON object"),
        ('{"a": 0.5}', "missing 'b'"),
        ('{"a": 0.5, "b": 0.5, "c": 0.1}', "unknown 'c'"),
        ('{"a": 0.5, "b": "high"}', "'b' is not a finite number"),
        ('{"a": 0.5, "b": true}', "'b' is not a finite number"),
    ],
)
def test_load_thresholds_errors_name_the_file(
    tmp_path: Path, content: str | None, match: str
) -> None:
    path = tmp_path / "thresholds.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(CheckpointError, match=match) as info:
        load_thresholds(path, ["a", "b"])
    assert str(path) in str(info.value)


def test_markdown_summary() -> None:
    scores, targets, _ = _case()
    scores[:, 5] = np.where(targets[:, 5] == 1, 0.05, 0.95)  # "a|b" ranks its positives last
    res = evaluate_scores(scores, targets, CLASSES)
    text = markdown_summary(res)
    assert "24 images, 7 classes" in text
    assert f"| mAP | {100 * res.mAP:.2f} |" in text
    assert f"| CF1 | {100 * res.at_threshold.CF1:.2f} | {100 * res.top3.CF1:.2f} |" in text
    assert "no known positive): kite" in text
    kept = sorted((r for r in res.per_class if r.name != "kite"), key=lambda r: r.ap)
    worst_rows = [line for line in text.splitlines() if line.startswith("| ") and "AP" not in line]
    worst_names = [line.split(" | ")[0][2:] for line in worst_rows[-5:]]
    expected = [r.name.replace("|", "\\|") for r in kept[:5]]
    assert worst_names == expected
    assert "a\\|b" in worst_names  # the pipe is escaped so the table keeps its columns
    assert "kite" not in worst_names
