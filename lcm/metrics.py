"""Multi-label evaluation metrics on score and target arrays (SPEC section 5).

Scores are ``(N, C)`` floats (probabilities, or anything monotone in them when thresholds are
given on the same scale); targets are ``(N, C)`` floats in {1 positive, 0 negative, -1 unknown}.
Unknown entries never enter any count.

Conventions where the literature leaves a choice:

- AP is exact and non-interpolated, identical to ``sklearn.metrics.average_precision_score``:
  tied scores form a single threshold step.
- A class that predicts nothing has precision 0 (denominator set to 1, as SPEC and ML-GCN do);
  a class without a known positive likewise has recall 0. Both still count in CP/CR, which
  average over all C classes; mAP instead drops classes without a positive and names them.
- Top-k metrics follow ML-GCN's ``overall_topk``: an entry is predicted when it is among the
  image's k highest scores *and* reaches its threshold. The k slots are taken over all classes
  (ties go to the lower class index), so a slot that lands on an unknown entry is not counted
  rather than handed to the next class.

All metrics stay in one module (longer than most) so that these conventions are written, and
can be checked against each other, in one place.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.5
TOP_K = 3


def _as_arrays(scores: Any, targets: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert to float64 ``(N, C)`` arrays (float64 keeps float32 ties intact)."""
    s = np.asarray(scores, dtype=np.float64)
    t = np.asarray(targets, dtype=np.float64)
    if s.ndim != 2 or s.shape != t.shape:
        raise ValueError(f"scores {s.shape} and targets {t.shape} must be equal (N, C) shapes")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinite values")
    if not np.isin(t, (-1.0, 0.0, 1.0)).all():
        raise ValueError("targets must only contain 1 (positive), 0 (negative), -1 (unknown)")
    return s, t


def _as_thresholds(thresholds: float | np.ndarray | Sequence[float], n_classes: int) -> np.ndarray:
    th = np.asarray(thresholds, dtype=np.float64)
    if th.ndim == 0:
        th = np.full(n_classes, float(th))
    if th.shape != (n_classes,):
        raise ValueError(f"thresholds must be a scalar or shape ({n_classes},), got {th.shape}")
    return th


def _ranked(scores: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, ...]:
    """Sort each class's scores in descending order, unknown entries sunk to the end as -inf.

    Works class-major, ``(C, N)``, so the sorts and cumulative sums run over contiguous
    memory. Returns the sorted scores, the cumulative known positives and negatives, and a
    mask of the last entry of each group of tied known scores: the points where sklearn
    places a threshold. The order inside a tie group is irrelevant, so the sort need not be
    stable.
    """
    keyed = np.ascontiguousarray(np.where(targets >= 0, scores, -np.inf).T)  # (C, N)
    order = np.argsort(-keyed, axis=1)
    s = np.take_along_axis(keyed, order, axis=1)
    t = np.take_along_axis(targets.T, order, axis=1)
    tps = np.cumsum(t == 1, axis=1)  # (C, N)
    fps = np.cumsum(t == 0, axis=1)
    step = np.ones(s.shape, dtype=bool)
    step[:, :-1] = s[:, :-1] != s[:, 1:]
    step &= np.isfinite(s)
    return s, tps, fps, step


def per_class_ap(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Exact AP per class over known entries, ``(C,)``; NaN for a class without a positive."""
    s, t = _as_arrays(scores, targets)
    n, c = s.shape
    if n == 0:
        return np.full(c, np.nan)
    _, tps, fps, step = _ranked(s, t)
    # Each step adds (positives gained in its tie group) / P times the precision after the group.
    at_step = np.where(step, tps, 0)
    before = np.zeros_like(tps)
    before[:, 1:] = np.maximum.accumulate(at_step, axis=1)[:, :-1]  # tps at the previous step
    gain = np.where(step, tps - before, 0)  # (C, N)
    seen = tps + fps
    precision = np.divide(tps, seen, out=np.zeros(tps.shape), where=seen > 0)
    n_pos = tps[:, -1].astype(np.float64)  # (C,)
    ap = np.full(c, np.nan)
    has_pos = n_pos > 0
    ap[has_pos] = (gain * precision).sum(axis=1)[has_pos] / n_pos[has_pos]
    return ap


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Exact AP of one class, ``(N,)`` inputs; unknown targets ignored; NaN without a positive."""
    s = np.asarray(scores, dtype=np.float64)
    t = np.asarray(targets, dtype=np.float64)
    if s.ndim != 1 or t.shape != s.shape:
        raise ValueError(f"average_precision expects equal 1-D shapes, got {s.shape}, {t.shape}")
    return float(per_class_ap(s[:, None], t[:, None])[0])


def mean_average_precision(
    scores: np.ndarray, targets: np.ndarray
) -> tuple[float, np.ndarray, list[int]]:
    """mAP over classes with a known positive, the ``(C,)`` APs, and the dropped class indices."""
    ap = per_class_ap(scores, targets)
    dropped = [int(i) for i in np.flatnonzero(np.isnan(ap))]
    kept = ap[~np.isnan(ap)]
    return (float(kept.mean()) if kept.size else math.nan), ap, dropped


def precision_recall_points(
    scores: np.ndarray, targets: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall after each threshold step of one class, ``(N,)`` inputs.

    Ordered by decreasing threshold and starting at (recall 0, precision 1). Drawn as a
    pre-step line (each precision held over the recall gained to reach it), the area under
    the curve is exactly :func:`average_precision`.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1, 1)
    t = np.asarray(targets, dtype=np.float64).reshape(-1, 1)
    s, t = _as_arrays(s, t)
    _, tps, fps, step = _ranked(s, t)
    tp, fp = tps[0, step[0]], fps[0, step[0]]
    n_pos = tp[-1] if tp.size else 0
    precision = tp / np.maximum(tp + fp, 1)
    recall = tp / n_pos if n_pos > 0 else np.zeros(tp.shape)
    return np.concatenate([[1.0], precision]), np.concatenate([[0.0], recall])


def predictions(
    scores: np.ndarray,
    thresholds: float | np.ndarray | Sequence[float] = DEFAULT_THRESHOLD,
    top_k: int | None = None,
) -> np.ndarray:
    """Boolean ``(N, C)`` predictions: score >= threshold, and among the top-k when k is given."""
    s = np.asarray(scores, dtype=np.float64)
    pred = s >= _as_thresholds(thresholds, s.shape[1])  # (N, C)
    if top_k is not None:
        k = min(top_k, s.shape[1])
        top = np.argsort(-s, axis=1, kind="stable")[:, :k]  # (N, k)
        in_top = np.zeros(s.shape, dtype=bool)
        np.put_along_axis(in_top, top, True, axis=1)
        pred &= in_top
    return pred


def _f1(precision: np.ndarray | float, recall: np.ndarray | float) -> np.ndarray:
    p, r = np.asarray(precision, dtype=np.float64), np.asarray(recall, dtype=np.float64)
    total = p + r
    return np.divide(2 * p * r, total, out=np.zeros(total.shape), where=total > 0)


def _counts(
    scores: np.ndarray, targets: np.ndarray, thresholds: Any, top_k: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per class: correct predictions, predictions, positives; known entries only, ``(C,)``."""
    s, t = _as_arrays(scores, targets)
    pred = predictions(s, thresholds, top_k)
    correct = (pred & (t == 1)).sum(axis=0)
    predicted = (pred & (t >= 0)).sum(axis=0)
    positives = (t == 1).sum(axis=0)
    return correct, predicted, positives


def per_class_prf(
    scores: np.ndarray,
    targets: np.ndarray,
    thresholds: float | np.ndarray | Sequence[float] = DEFAULT_THRESHOLD,
    top_k: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-class precision, recall, F1 (floats) and known positives (ints), each ``(C,)``."""
    correct, predicted, positives = _counts(scores, targets, thresholds, top_k)
    precision = correct / np.maximum(predicted, 1)
    recall = correct / np.maximum(positives, 1)
    return precision, recall, _f1(precision, recall), positives


@dataclass(frozen=True)
class ThresholdMetrics:
    """Class-averaged (C*) and overall pooled (O*) precision, recall and F1."""

    CP: float
    CR: float
    CF1: float
    OP: float
    OR: float
    OF1: float


def threshold_metrics(
    scores: np.ndarray,
    targets: np.ndarray,
    thresholds: float | np.ndarray | Sequence[float] = DEFAULT_THRESHOLD,
    top_k: int | None = None,
) -> ThresholdMetrics:
    """CP, CR, CF1, OP, OR, OF1 at the thresholds, optionally among each image's top-k."""
    correct, predicted, positives = _counts(scores, targets, thresholds, top_k)
    cp = float(np.mean(correct / np.maximum(predicted, 1))) if correct.size else 0.0
    cr = float(np.mean(correct / np.maximum(positives, 1))) if correct.size else 0.0
    op = float(correct.sum() / max(int(predicted.sum()), 1))
    orc = float(correct.sum() / max(int(positives.sum()), 1))
    # CF1 is the harmonic mean of the two averages, not the average of per-class F1s.
    return ThresholdMetrics(cp, cr, float(_f1(cp, cr)), op, orc, float(_f1(op, orc)))


def calibrate_thresholds(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per class, the known score that maximises F1 when used as the threshold, ``(C,)``.

    Predictions are ``score >= threshold``; candidates are every distinct known score, and on
    equal F1 the highest threshold wins. A class without a known positive has no F1 to gain,
    so it keeps the default threshold 0.5.
    """
    s, t = _as_arrays(scores, targets)
    n, c = s.shape
    if n == 0:
        return np.full(c, DEFAULT_THRESHOLD)
    sorted_s, tps, fps, step = _ranked(s, t)
    n_pos = tps[:, -1:]  # (C, 1)
    # F1 = 2 TP / (TP + FP + P); the denominator is >= 1 at every step.
    f1 = np.where(step, 2 * tps / np.maximum(tps + fps + n_pos, 1), -1.0)  # (C, N)
    best = np.argmax(f1, axis=1)  # first maximum = highest threshold
    chosen = sorted_s[np.arange(c), best]
    return np.where(n_pos[:, 0] > 0, chosen, DEFAULT_THRESHOLD)


# A class whose validation AP does not beat its prevalence (a random ranking's AP) by this
# much has no skill to calibrate: its F1-optimal threshold would be "predict it everywhere".
NO_SKILL_MARGIN = 0.05


@dataclass(frozen=True)
class Calibration:
    """Per-class thresholds and why each was chosen."""

    thresholds: np.ndarray  # (C,)
    reasons: tuple[str, ...]  # "F1-optimal", or why the class keeps DEFAULT_THRESHOLD


def calibrate(scores: np.ndarray, targets: np.ndarray, margin: float = NO_SKILL_MARGIN
              ) -> Calibration:  # fmt: skip
    """:func:`calibrate_thresholds`, except that a class whose AP is below its prevalence
    plus ``margin`` (no skill to threshold) keeps the default threshold 0.5: a model that
    learned nothing about a class scores it about its prevalence, so 0.5 seldom predicts it,
    where its F1-optimal threshold predicts it on every image."""
    s, t = _as_arrays(scores, targets)
    best = calibrate_thresholds(s, t)
    ap = per_class_ap(s, t)
    known = (t >= 0).sum(axis=0)
    prevalence = np.divide((t == 1).sum(axis=0), known, out=np.zeros(t.shape[1]),
                           where=known > 0)  # fmt: skip
    thresholds, reasons = best.copy(), []
    for c in range(t.shape[1]):
        if np.isnan(ap[c]):
            reasons.append(f"no known positive: default {DEFAULT_THRESHOLD}")
        elif ap[c] < prevalence[c] + margin:
            thresholds[c] = DEFAULT_THRESHOLD
            reasons.append(f"no skill (AP {ap[c]:.3f} < prevalence {prevalence[c]:.3f} + "
                           f"{margin}): default {DEFAULT_THRESHOLD}")  # fmt: skip
        else:
            reasons.append("F1-optimal")
    return Calibration(thresholds, tuple(reasons))


@dataclass(frozen=True)
class ClassMetrics:
    """One row of the per-class table."""

    name: str
    ap: float
    precision: float
    recall: float
    f1: float
    positives: int
    threshold: float


def _json_float(x: float) -> float | None:
    return None if math.isnan(x) or math.isinf(x) else float(x)


@dataclass(frozen=True)
class EvalResult:
    """Everything one evaluation measures; scalar metrics are fractions in [0, 1]."""

    mAP: float
    at_threshold: ThresholdMetrics
    top3: ThresholdMetrics
    n_images: int
    dropped_classes: tuple[str, ...]
    per_class: tuple[ClassMetrics, ...]

    @property
    def classes(self) -> list[str]:
        return [row.name for row in self.per_class]

    @property
    def thresholds(self) -> np.ndarray:
        return np.array([row.threshold for row in self.per_class], dtype=np.float64)

    def scalars(self) -> dict[str, float]:
        """Flat headline metrics: mAP, CP ... OF1, and CP_top3 ... OF1_top3 (NaN kept)."""
        out = {"mAP": self.mAP}
        out.update(asdict(self.at_threshold))
        out.update({f"{k}_top3": v for k, v in asdict(self.top3).items()})
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: scalars, counts, dropped classes, per-class rows; NaN -> None."""
        out: dict[str, Any] = {k: _json_float(v) for k, v in self.scalars().items()}
        out["n_images"] = self.n_images
        out["n_classes"] = len(self.per_class)
        out["dropped_classes"] = list(self.dropped_classes)
        out["per_class"] = [
            {k: (_json_float(v) if isinstance(v, float) else v) for k, v in asdict(row).items()}
            for row in self.per_class
        ]
        return out


def evaluate_scores(
    scores: np.ndarray,
    targets: np.ndarray,
    classes: Sequence[str],
    thresholds: float | np.ndarray | Sequence[float] | None = None,
) -> EvalResult:
    """All SPEC metrics for one set of scores; ``thresholds`` defaults to 0.5 for every class."""
    s, t = _as_arrays(scores, targets)
    if len(classes) != s.shape[1]:
        raise ValueError(f"{len(classes)} class names for {s.shape[1]} score columns")
    th = _as_thresholds(DEFAULT_THRESHOLD if thresholds is None else thresholds, s.shape[1])
    m_ap, ap, dropped = mean_average_precision(s, t)
    if dropped:
        logger.warning(
            "mAP leaves out %d class(es) without a known positive: %s",
            len(dropped),
            ", ".join(classes[i] for i in dropped),
        )
    precision, recall, f1, positives = per_class_prf(s, t, th)
    rows = tuple(
        ClassMetrics(
            str(name),
            float(ap[i]),
            float(precision[i]),
            float(recall[i]),
            float(f1[i]),
            int(positives[i]),
            float(th[i]),
        )
        for i, name in enumerate(classes)
    )
    return EvalResult(
        mAP=m_ap,
        at_threshold=threshold_metrics(s, t, th),
        top3=threshold_metrics(s, t, th, top_k=TOP_K),
        n_images=int(s.shape[0]),
        dropped_classes=tuple(str(classes[i]) for i in dropped),
        per_class=rows,
    )
