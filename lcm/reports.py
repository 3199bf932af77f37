"""Files that record an evaluation: metrics JSON, per-class CSV, PR plot, thresholds, summary.

Every file is written to a temporary name in its target folder and renamed into place, so an
interrupted run never leaves a half-written file where a DVC stage or a reader expects one.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from lcm.io import atomic_write_bytes
from lcm.metrics import EvalResult, average_precision, precision_recall_points

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
PER_CLASS_FILE = "per_class.csv"
PR_PLOT_FILE = "pr_curves.png"
PER_CLASS_COLUMNS = ("class", "AP", "precision", "recall", "F1", "positives", "threshold")
# Best and worst classes by AP drawn beside the pooled curve; more lines stop being readable.
PLOT_CLASSES_EACH_END = 3
WORST_CLASSES = 5


def _jsonable(value: Any) -> Any:
    """Plain JSON types; NaN and infinities become null (JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def _dump_json(payload: Any) -> bytes:
    return (json.dumps(_jsonable(payload), indent=2, allow_nan=False) + "\n").encode()


def _cell(x: float) -> str:
    return "" if math.isnan(x) else f"{x:.6f}"


def _per_class_csv(result: EvalResult) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(PER_CLASS_COLUMNS)
    for row in result.per_class:
        writer.writerow(
            [
                row.name,
                _cell(row.ap),
                _cell(row.precision),
                _cell(row.recall),
                _cell(row.f1),
                row.positives,
                _cell(row.threshold),
            ]
        )
    return buf.getvalue().encode()


def _pr_plot_png(result: EvalResult, scores: np.ndarray, targets: np.ndarray) -> bytes:
    """Pooled PR curve over all known entries plus the best and worst classes by AP."""
    # matplotlib is imported here, not with the module: ~0.5 s of every `lcm train`,
    # `lcm evaluate` and `lcm batch-predict` start that would draw nothing
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.float64)
    fig = Figure(figsize=(7.0, 5.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if (targets == 1).any():
        precision, recall = precision_recall_points(scores.ravel(), targets.ravel())
        pooled_ap = average_precision(scores.ravel(), targets.ravel())
        ax.plot(
            recall,
            precision,
            drawstyle="steps-pre",
            color="black",
            linewidth=2.2,
            label=f"all classes pooled (AP {pooled_ap:.3f})",
        )
    else:
        ax.text(0.5, 0.5, "no known positive labels", ha="center", va="center")
    ranked = sorted(
        (i for i, row in enumerate(result.per_class) if not math.isnan(row.ap)),
        key=lambda i: result.per_class[i].ap,
        reverse=True,
    )
    if len(ranked) > 2 * PLOT_CLASSES_EACH_END:
        ranked = ranked[:PLOT_CLASSES_EACH_END] + ranked[-PLOT_CLASSES_EACH_END:]
    for i in ranked:
        precision, recall = precision_recall_points(scores[:, i], targets[:, i])
        row = result.per_class[i]
        ax.plot(
            recall,
            precision,
            drawstyle="steps-pre",
            linewidth=1.2,
            alpha=0.85,
            label=f"{row.name} (AP {row.ap:.3f})",
        )
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("recall", fontsize=12)
    ax.set_ylabel("precision", fontsize=12)
    ax.set_title(
        f"Precision-recall: mAP {result.mAP:.3f} over {result.n_images} images", fontsize=13
    )
    ax.grid(True, alpha=0.3)
    if ax.lines:
        ax.legend(loc="best", fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def write_evaluation(
    result: EvalResult,
    scores: np.ndarray,
    targets: np.ndarray,
    classes: Sequence[str],
    out_dir: Path,
    *,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write ``metrics.json``, ``per_class.csv`` and ``pr_curves.png`` into ``out_dir``.

    ``metrics.json`` holds the scalar metrics (fractions in [0, 1]), ``n_images``,
    ``n_classes``, ``dropped_classes`` and the ``extra`` keys at top level, so DVC can read
    every number directly; ``extra`` may not reuse a metric's key.
    """
    if list(classes) != result.classes:
        raise ValueError("classes do not match the classes of the evaluation result")
    scores = np.asarray(scores)
    if scores.shape != (result.n_images, len(result.per_class)):
        raise ValueError(
            f"scores {scores.shape} do not match the result's "
            f"({result.n_images}, {len(result.per_class)})"
        )
    payload: dict[str, Any] = dict(result.scalars())
    payload["n_images"] = result.n_images
    payload["n_classes"] = len(result.per_class)
    payload["dropped_classes"] = list(result.dropped_classes)
    if extra:
        clash = sorted(payload.keys() & extra.keys())
        if clash:
            raise ValueError(f"extra keys clash with metric keys: {clash}")
        payload.update(extra)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / METRICS_FILE, _dump_json(payload))
    atomic_write_bytes(out_dir / PER_CLASS_FILE, _per_class_csv(result))
    atomic_write_bytes(out_dir / PR_PLOT_FILE, _pr_plot_png(result, scores, targets))
    logger.info("wrote evaluation of %d images to %s", result.n_images, out_dir)


def _pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:.2f}"


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def markdown_summary(result: EvalResult) -> str:
    """Headline metrics (%) at the thresholds and top-3, and the 5 worst classes by AP."""
    lines = [
        f"**{result.n_images} images, {len(result.per_class)} classes** (values in %)",
        "",
        "| metric | at threshold | top-3 |",
        "|---|---:|---:|",
        f"| mAP | {_pct(result.mAP)} | |",
    ]
    top3 = asdict(result.top3)
    for key, value in asdict(result.at_threshold).items():
        lines.append(f"| {key} | {_pct(value)} | {_pct(top3[key])} |")
    if result.dropped_classes:
        lines += [
            "",
            "Left out of mAP (no known positive): "
            + ", ".join(_md(c) for c in result.dropped_classes),
        ]
    worst = sorted(
        (row for row in result.per_class if not math.isnan(row.ap)), key=lambda row: row.ap
    )[:WORST_CLASSES]
    if worst:
        lines += [
            "",
            f"**{len(worst)} worst classes by AP**",
            "",
            "| class | AP | precision | recall | F1 | positives |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {_md(r.name)} | {_pct(r.ap)} | {_pct(r.precision)} | {_pct(r.recall)} "
            f"| {_pct(r.f1)} | {r.positives} |"
            for r in worst
        ]
    return "\n".join(lines) + "\n"
