"""Metrics against sklearn and hand-computed cases; unknown (-1) targets never count."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score, f1_score

from lcm.metrics import (
    average_precision,
    calibrate,
    calibrate_thresholds,
    evaluate_scores,
    mean_average_precision,
    per_class_ap,
    per_class_prf,
    precision_recall_points,
    predictions,
    threshold_metrics,
)


def _random_case(rng: np.random.Generator, n: int, c: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores rounded to one decimal (many ties) and targets with about 20% unknown."""
    scores = np.round(rng.random((n, c)), 1)
    targets = (rng.random((n, c)) < 0.3).astype(np.float64)
    targets[rng.random((n, c)) < 0.2] = -1
    return scores, targets


def _sklearn_ap(scores: np.ndarray, targets: np.ndarray) -> float:
    known = targets >= 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns about classes without a positive
        return float(average_precision_score(targets[known], scores[known]))


def test_ap_hand_cases() -> None:
    assert average_precision(np.array([0.9, 0.8, 0.7]), np.array([1, 0, 1])) == pytest.approx(
        (1 + 2 / 3) / 2
    )
    # Tied scores are one threshold step: precision 1/2 at recall 1.
    assert average_precision(np.array([0.5, 0.5]), np.array([1, 0])) == pytest.approx(0.5)
    # An unknown entry ranked first changes nothing.
    assert average_precision(np.array([0.99, 0.9, 0.8, 0.7]), np.array([-1, 1, 0, 1])) == (
        pytest.approx((1 + 2 / 3) / 2)
    )
    assert math.isnan(average_precision(np.array([0.3, 0.2]), np.array([0, -1])))


def test_ap_matches_sklearn_with_ties_and_unknowns() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 40))
        scores, targets = _random_case(rng, n, 1)
        ours = average_precision(scores[:, 0], targets[:, 0])
        if not (targets == 1).any():
            assert math.isnan(ours)
        else:
            assert ours == pytest.approx(_sklearn_ap(scores[:, 0], targets[:, 0]), abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 6), st.sampled_from([-1, 0, 1])), min_size=1, max_size=25
    ).filter(lambda rows: any(t == 1 for _, t in rows))
)
def test_ap_matches_sklearn_property(rows: list[tuple[int, int]]) -> None:
    scores = np.array([s / 6 for s, _ in rows])
    targets = np.array([t for _, t in rows], dtype=np.float64)
    assert average_precision(scores, targets) == pytest.approx(
        _sklearn_ap(scores, targets), abs=1e-12
    )


def test_per_class_ap_matches_sklearn_float32() -> None:
    rng = np.random.default_rng(1)
    scores, targets = _random_case(rng, 60, 7)
    scores = scores.astype(np.float32)  # the dtype model outputs come in
    targets[:, 3] = np.where(targets[:, 3] == 1, 0, targets[:, 3])  # no positive
    ap = per_class_ap(scores, targets)
    assert ap.shape == (7,)
    assert math.isnan(ap[3])
    for k in (0, 1, 2, 4, 5, 6):
        assert ap[k] == pytest.approx(_sklearn_ap(scores[:, k], targets[:, k]), abs=1e-12)


def test_map_drops_classes_without_positives() -> None:
    rng = np.random.default_rng(2)
    scores, targets = _random_case(rng, 50, 6)
    targets[:, 1] = -1  # all unknown
    targets[:, 4] = np.where(targets[:, 4] == 1, -1, targets[:, 4])  # positives all unknown
    m_ap, ap, dropped = mean_average_precision(scores, targets)
    assert dropped == [1, 4]
    expected = [_sklearn_ap(scores[:, k], targets[:, k]) for k in (0, 2, 3, 5)]
    assert m_ap == pytest.approx(np.mean(expected), abs=1e-12)
    assert np.isnan(ap[[1, 4]]).all() and np.isfinite(ap[[0, 2, 3, 5]]).all()


def test_precision_recall_points_area_is_ap() -> None:
    rng = np.random.default_rng(3)
    scores, targets = _random_case(rng, 40, 1)
    targets[0, 0] = 1
    precision, recall = precision_recall_points(scores[:, 0], targets[:, 0])
    assert (precision[0], recall[0]) == (1.0, 0.0) and recall[-1] == pytest.approx(1.0)
    area = float(np.sum(np.diff(recall) * precision[1:]))
    assert area == pytest.approx(average_precision(scores[:, 0], targets[:, 0]))


# A 4-image, 3-class case small enough to count by hand at threshold 0.5.
HAND_SCORES = np.array(
    [
        [0.9, 0.6, 0.1],
        [0.7, 0.2, 0.8],
        [0.4, 0.9, 0.3],
        [0.6, 0.1, 0.2],
    ]
)
HAND_TARGETS = np.array(
    [
        [1, 0, 0],
        [0, -1, 1],
        [1, 1, -1],
        [-1, 0, 0],
    ],
    dtype=np.float64,
)


def test_threshold_metrics_hand_checked() -> None:
    # Class 0: predicted rows 0, 1 (row 3 is unknown); correct row 0; positives rows 0, 2.
    # Class 1: predicted rows 0, 2; correct row 2; one positive.
    # Class 2: predicted row 1; correct row 1; one positive.
    precision, recall, f1, positives = per_class_prf(HAND_SCORES, HAND_TARGETS, 0.5)
    np.testing.assert_allclose(precision, [1 / 2, 1 / 2, 1])
    np.testing.assert_allclose(recall, [1 / 2, 1, 1])
    np.testing.assert_allclose(f1, [1 / 2, 2 / 3, 1])
    np.testing.assert_array_equal(positives, [2, 1, 1])
    m = threshold_metrics(HAND_SCORES, HAND_TARGETS)
    assert pytest.approx(2 / 3) == m.CP
    assert pytest.approx(5 / 6) == m.CR
    assert pytest.approx(2 * (2 / 3) * (5 / 6) / (2 / 3 + 5 / 6)) == m.CF1
    assert pytest.approx(3 / 5) == m.OP
    assert pytest.approx(3 / 4) == m.OR
    assert pytest.approx(2 * 0.6 * 0.75 / 1.35) == m.OF1


def test_cf1_comes_from_the_averages_not_per_class_f1() -> None:
    precision, recall, f1, _ = per_class_prf(HAND_SCORES, HAND_TARGETS, 0.5)
    m = threshold_metrics(HAND_SCORES, HAND_TARGETS)
    assert pytest.approx(2 * m.CP * m.CR / (m.CP + m.CR)) == m.CF1
    assert pytest.approx(float(np.mean(f1))) != m.CF1


def test_no_predictions_and_no_positives_count_as_zero() -> None:
    scores = np.array([[0.1, 0.9], [0.2, 0.8]])
    targets = np.array([[1, 0], [0, 0]], dtype=np.float64)
    precision, recall, _, positives = per_class_prf(scores, targets)
    # Class 0 predicts nothing: precision 0. Class 1 has no positive: recall 0.
    np.testing.assert_array_equal(precision, [0.0, 0.0])
    np.testing.assert_array_equal(recall, [0.0, 0.0])
    np.testing.assert_array_equal(positives, [1, 0])
    m = threshold_metrics(scores, targets)
    assert (m.CP, m.CR, m.CF1, m.OP, m.OR, m.OF1) == (0.0, 0.0, 0.0, 0.0, 0.0, 0.0)


def test_per_class_thresholds() -> None:
    th = np.array([0.95, 0.5, 0.05])
    pred = predictions(HAND_SCORES, th)
    np.testing.assert_array_equal(pred[:, 0], [False, False, False, False])
    np.testing.assert_array_equal(pred[:, 2], [True, True, True, True])
    with pytest.raises(ValueError, match="thresholds"):
        predictions(HAND_SCORES, np.array([0.5, 0.5]))


def test_overall_f1_matches_sklearn_micro() -> None:
    rng = np.random.default_rng(4)
    for _ in range(20):
        scores, targets = _random_case(rng, 30, 5)
        targets[0, 0] = 1  # at least one positive
        scores[0, 0] = 0.9  # and one prediction
        known = targets >= 0
        pred = (scores >= 0.5)[known].astype(int)
        expected = f1_score(targets[known].astype(int), pred, average="micro", labels=[1])
        assert pytest.approx(expected, abs=1e-12) == threshold_metrics(scores, targets).OF1


def test_top3_hand_example() -> None:
    scores = np.array(
        [
            [0.9, 0.8, 0.7, 0.6, 0.1],  # 0.6 reaches 0.5 but is 4th: not predicted
            [0.95, 0.3, 0.2, 0.1, 0.05],  # only one top-3 score reaches 0.5
            [0.9, 0.8, 0.7, 0.6, 0.55],  # slot on an unknown is lost, not passed on
        ]
    )
    targets = np.array(
        [
            [1, 0, 1, 1, 0],
            [1, 0, 0, 0, 0],
            [-1, 1, 0, 1, 0],
        ],
        dtype=np.float64,
    )
    pred = predictions(scores, 0.5, top_k=3)
    np.testing.assert_array_equal(
        pred,
        [
            [True, True, True, False, False],
            [True, False, False, False, False],
            [True, True, True, False, False],
        ],
    )
    m = threshold_metrics(scores, targets, top_k=3)
    # Known predictions: image 0 -> 3 (2 correct), image 1 -> 1 (1), image 2 -> 2 (1).
    assert pytest.approx(4 / 6) == m.OP
    assert pytest.approx(4 / 6) == m.OR  # positives: 3 + 1 + 2
    # Per class, correct of known predictions: c0 2 of 2, c1 1 of 2, c2 1 of 2, c3 and c4 none.
    assert pytest.approx((1 + 1 / 2 + 1 / 2 + 0 + 0) / 5) == m.CP
    assert pytest.approx((1 + 1 + 1 + 0 + 0) / 5) == m.CR
    # Without top-k the 0.6 positives of images 0 and 2 would be found as well.
    assert pytest.approx(1.0) == threshold_metrics(scores, targets).OR


def _f1_at(scores: np.ndarray, targets: np.ndarray, threshold: float) -> float:
    known = targets >= 0
    pred = scores[known] >= threshold
    truth = targets[known] == 1
    tp = np.sum(pred & truth)
    denom = pred.sum() + truth.sum()
    return 2 * tp / denom if denom else 0.0


def test_calibrated_thresholds_beat_every_candidate() -> None:
    rng = np.random.default_rng(5)
    for _ in range(30):
        scores, targets = _random_case(rng, 25, 4)
        targets[0, :3] = 1
        targets[:, 3] = np.minimum(targets[:, 3], 0)  # class 3 has no positive
        th = calibrate_thresholds(scores, targets)
        assert th[3] == 0.5
        for k in range(3):
            known = targets[:, k] >= 0
            assert th[k] in scores[known, k]  # a known score, never an unknown one
            best = _f1_at(scores[:, k], targets[:, k], th[k])
            candidates = np.concatenate([scores[:, k], np.linspace(-0.05, 1.05, 23)])
            for cand in candidates:
                assert best >= _f1_at(scores[:, k], targets[:, k], cand) - 1e-12


def test_calibration_ignores_unknown_entries() -> None:
    scores = np.array([[0.9], [0.8], [0.3], [0.2]])
    targets = np.array([[-1], [0], [1], [0]], dtype=np.float64)
    # Known: 0.8 neg, 0.3 pos, 0.2 neg -> predicting from 0.3 down gives F1 = 1.
    np.testing.assert_array_equal(calibrate_thresholds(scores, targets), [0.3])


def test_a_class_without_skill_gets_no_everywhere_threshold() -> None:
    rng = np.random.default_rng(7)
    targets = (rng.random((200, 3)) < 0.2).astype(np.float64)
    scores = np.column_stack([
        np.full(200, 0.3),  # a constant scorer: no skill at all
        targets[:, 1] * 0.6 + rng.random(200) * 0.3,  # a good one
        rng.random(200),  # a random one: AP about the prevalence
    ])  # fmt: skip
    # the F1-optimal threshold of a constant scorer predicts the class on every image
    assert calibrate_thresholds(scores, targets)[0] == pytest.approx(0.3)
    cal = calibrate(scores, targets)
    assert cal.thresholds[0] == 0.5 and cal.reasons[0].startswith("no skill (AP 0.2")
    assert (scores[:, 0] >= cal.thresholds[0]).sum() == 0  # never, not everywhere
    assert cal.reasons[1] == "F1-optimal"
    assert cal.thresholds[1] == calibrate_thresholds(scores, targets)[1]
    assert cal.thresholds[2] == 0.5 and cal.reasons[2].startswith("no skill")
    none = calibrate(scores, np.zeros_like(targets))
    assert none.reasons[0] == "no known positive: default 0.5"


def test_evaluate_scores_result_and_json() -> None:
    rng = np.random.default_rng(6)
    scores, targets = _random_case(rng, 20, 4)
    targets[:, 2] = np.minimum(targets[:, 2], 0)
    targets[0, [0, 1, 3]] = 1
    classes = ["cat", "dog", "kite", "bus"]
    th = np.array([0.5, 0.4, 0.5, 0.7])
    res = evaluate_scores(scores, targets, classes, thresholds=th)
    assert res.n_images == 20 and res.classes == classes
    assert res.dropped_classes == ("kite",)
    assert res.mAP == pytest.approx(mean_average_precision(scores, targets)[0])
    assert res.at_threshold == threshold_metrics(scores, targets, th)
    assert res.top3 == threshold_metrics(scores, targets, th, top_k=3)
    np.testing.assert_array_equal(res.thresholds, th)
    assert res.per_class[1].positives == int((targets[:, 1] == 1).sum())
    d = res.to_dict()
    text = json.dumps(d, allow_nan=False)  # NaN would raise here
    back = json.loads(text)
    assert back["per_class"][2]["ap"] is None
    assert back["dropped_classes"] == ["kite"]
    assert set(res.scalars()) >= {"mAP", "CF1", "OF1", "CP_top3", "OF1_top3"}
    assert back["OF1_top3"] == pytest.approx(res.top3.OF1)


def test_evaluate_scores_default_threshold_and_all_dropped() -> None:
    scores = np.array([[0.7, 0.2]])
    targets = np.array([[0, -1]], dtype=np.float64)
    res = evaluate_scores(scores, targets, ["a", "b"])
    assert math.isnan(res.mAP)
    assert res.dropped_classes == ("a", "b")
    np.testing.assert_array_equal(res.thresholds, [0.5, 0.5])
    assert res.to_dict()["mAP"] is None


@pytest.mark.parametrize(
    ("scores", "targets", "match"),
    [
        (np.zeros((2, 3)), np.zeros((2, 2)), "shapes"),
        (np.zeros((2, 2)), np.full((2, 2), 2.0), "targets"),
        (np.full((2, 2), np.nan), np.zeros((2, 2)), "NaN"),
    ],
)
def test_invalid_inputs_raise(scores: np.ndarray, targets: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        per_class_ap(scores, targets)


def test_class_names_must_match_columns() -> None:
    with pytest.raises(ValueError, match="class names"):
        evaluate_scores(np.zeros((2, 2)), np.zeros((2, 2)), ["only-one"])
