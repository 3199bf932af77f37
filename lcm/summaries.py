"""Per-(run, label) summaries of a run, computed from its data files when the run completes.

One row per label: images scored, how many the run's threshold predicts, the mean score, a
20-bin histogram of the scores over [0, 1], and where the source carries labels, positives,
negatives, true positives and the exact AP over the known targets (:func:`lcm.metrics.
per_class_ap`, the evaluation's own). Questions over many runs (a label's rate over a year,
drift from last week) then read a few thousand summary rows instead of a billion scores; the
``label_drift`` view (:mod:`lcm.store`) is built on them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lcm.metrics import per_class_ap
from lcm.store import HISTOGRAM_BINS

SUMMARY_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("label_id", pa.int16()),
        ("images", pa.int64()),
        ("predicted", pa.int64()),
        ("mean_score", pa.float64()),
        ("histogram", pa.list_(pa.int32())),
        ("positives", pa.int64()),
        ("negatives", pa.int64()),
        ("true_positives", pa.int64()),
        ("ap", pa.float64()),
    ]
)


def score_bins(scores: np.ndarray) -> np.ndarray:
    """The histogram bin of each score: [0, 0.05) -> 0 ... [0.95, 1] -> 19."""
    return np.minimum((scores.astype(np.float64) * HISTOGRAM_BINS).astype(np.int64),
                      HISTOGRAM_BINS - 1).clip(min=0)  # fmt: skip


def summarize(run_id: str, files: Sequence[Path], thresholds: np.ndarray) -> pa.Table:
    """The summary rows of a run from its data files (long format: label_id, score, target)."""
    parts = [pq.read_table(f, columns=["label_id", "score", "target"]) for f in files]
    return summarize_table(run_id, pa.concat_tables(parts) if parts else None, thresholds)


def summarize_table(run_id: str, table: pa.Table | None, thresholds: np.ndarray) -> pa.Table:
    """The summary rows of a run from its rows (columns label_id, score, target)."""
    n_labels = len(thresholds)
    if table is None:
        table = pa.table({"label_id": pa.array([], pa.int16()), "score": pa.array([], pa.float32()),
                          "target": pa.array([], pa.int8())})  # fmt: skip
    label = table.column("label_id").to_numpy().astype(np.int64)
    score = table.column("score").to_numpy()
    target_col = table.column("target")
    known_labels = target_col.null_count < len(target_col)
    images = np.bincount(label, minlength=n_labels)
    predicted = np.bincount(label, weights=score >= thresholds[label], minlength=n_labels)
    sums = np.bincount(label, weights=score.astype(np.float64), minlength=n_labels)
    hist = np.zeros((n_labels, HISTOGRAM_BINS), dtype=np.int64)
    np.add.at(hist, (label, score_bins(score)), 1)
    columns: dict[str, object] = {
        "run_id": pa.array([run_id] * n_labels, pa.string()),
        "label_id": pa.array(np.arange(n_labels), pa.int16()),
        "images": pa.array(images, pa.int64()),
        "predicted": pa.array(predicted.astype(np.int64), pa.int64()),
        "mean_score": pa.array(
            np.where(images > 0, sums / np.maximum(images, 1), np.nan),
            pa.float64(),
            from_pandas=True,
        ),  # fmt: skip
        "histogram": pa.array(hist.tolist(), pa.list_(pa.int32())),
    }
    if known_labels:
        target = target_col.fill_null(-1).to_numpy().astype(np.int64)
        pos, neg = target == 1, target == 0
        columns["positives"] = pa.array(np.bincount(label, pos, n_labels).astype(np.int64))
        columns["negatives"] = pa.array(np.bincount(label, neg, n_labels).astype(np.int64))
        tp = pos & (score >= thresholds[label])
        columns["true_positives"] = pa.array(np.bincount(label, tp, n_labels).astype(np.int64))
        columns["ap"] = pa.array(_ap_by_label(label, score, target, n_labels), pa.float64(),
                                 from_pandas=True)  # fmt: skip
    else:
        for name in ("positives", "negatives", "true_positives", "ap"):
            columns[name] = pa.nulls(n_labels, SUMMARY_SCHEMA.field(name).type)
    return pa.table(columns, schema=SUMMARY_SCHEMA)


def _ap_by_label(
    label: np.ndarray, score: np.ndarray, target: np.ndarray, n_labels: int
) -> np.ndarray:
    """Exact AP per label over the known targets (NaN without a positive)."""
    out = np.full(n_labels, np.nan)
    order = np.argsort(label, kind="stable")
    bounds = np.searchsorted(label[order], np.arange(n_labels + 1))
    for c in range(n_labels):
        idx = order[bounds[c] : bounds[c + 1]]
        if len(idx):
            out[c] = per_class_ap(score[idx, None].astype(np.float64),
                                  target[idx, None].astype(np.float64))[0]  # fmt: skip
    return out
