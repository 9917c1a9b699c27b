"""Tests for mulcon.metrics: AP against scikit-learn, threshold metrics against hand counts."""

import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from mulcon.metrics import average_precision, calibrate_thresholds, multilabel_metrics

THRESHOLD_KEYS = ["CP", "CR", "CF1", "OP", "OR", "OF1"]


def _random_problem(seed, num_images=300, num_labels=7, dtype=np.float64, decimals=None):
    rng = np.random.default_rng(seed)
    targets = (rng.random((num_images, num_labels)) < 0.2).astype(np.int64)
    # Scores correlate with the targets so AP is far from both 0 and 100.
    scores = (rng.random((num_images, num_labels)) + 0.4 * targets).astype(dtype)
    if decimals is not None:
        scores = np.round(scores, decimals).astype(dtype)  # many ties per label
    return scores, targets


def _sklearn_ap(scores, targets):
    return 100.0 * np.array(
        [average_precision_score(targets[:, label], scores[:, label]) for label in range(scores.shape[1])]
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("decimals", [None, 1])
def test_average_precision_matches_sklearn(dtype, decimals):
    scores, targets = _random_problem(seed=0, dtype=dtype, decimals=decimals)
    np.testing.assert_allclose(average_precision(scores, targets), _sklearn_ap(scores, targets), rtol=1e-10)


def test_average_precision_matches_sklearn_on_logits_with_signed_zeros():
    scores, targets = _random_problem(seed=1, decimals=0)
    scores = scores - 1.0  # logits in {-1, 0}: two huge tie groups
    scores[::3][scores[::3] == 0.0] = -0.0  # -0.0 == 0.0, so the two must form one tie group
    assert np.signbit(scores[scores == 0.0]).any() and not np.signbit(scores[scores == 0.0]).all()
    np.testing.assert_allclose(average_precision(scores, targets), _sklearn_ap(scores, targets), rtol=1e-10)


def test_float64_scores_are_not_rounded_into_ties():
    # Distinct in float64, equal in float32: rounding would tie the positive with two negatives.
    scores = np.array([[0.5 + 2e-12], [0.5], [0.5 + 1e-12]])
    np.testing.assert_allclose(average_precision(scores, np.array([[1], [0], [0]])), [100.0])


def test_average_precision_tie_gets_the_group_precision():
    # Two tied images, one positive: one threshold with precision 1/2, whichever row comes first.
    for scores, targets in (([[0.5], [0.5]], [[1], [0]]), ([[0.5], [0.5]], [[0], [1]])):
        np.testing.assert_allclose(average_precision(np.array(scores), np.array(targets)), [50.0])


def test_average_precision_ignores_row_order_with_ties():
    scores, targets = _random_problem(seed=2, decimals=1)
    order = np.random.default_rng(3).permutation(len(scores))
    shuffled = average_precision(scores[order], targets[order])
    np.testing.assert_array_equal(shuffled, average_precision(scores, targets))


def test_label_without_positive_has_nan_ap_and_is_left_out_of_map():
    scores, targets = _random_problem(seed=4)
    targets[:, 2] = 0
    per_label = average_precision(scores, targets)
    assert np.isnan(per_label[2]) and not np.isnan(np.delete(per_label, 2)).any()
    expected = _sklearn_ap(np.delete(scores, 2, axis=1), np.delete(targets, 2, axis=1)).mean()
    assert multilabel_metrics(scores, targets)["mAP"] == pytest.approx(expected, rel=1e-10)


def test_no_positive_at_all_gives_nan_map_without_warning():
    scores, targets = _random_problem(seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metrics = multilabel_metrics(scores, np.zeros_like(targets))
    assert np.isnan(metrics["mAP"])


def test_threshold_metrics_match_hand_counts():
    scores = np.array([
        [0.9, 0.6, 0.1],
        [0.8, 0.2, 0.3],
        [0.4, 0.7, 0.2],
        [0.5, 0.1, 0.4],  # 0.5 sits on the threshold: predicted (>=)
    ])
    targets = np.array([[1, 0, 0], [1, 0, 1], [0, 1, 0], [0, 1, 1]])
    # Counted by hand at threshold 0.5:
    #   label 0: predicted rows 0, 1, 3 -> Np = 3; correct rows 0, 1 -> Nc = 2; Ng = 2
    #   label 1: predicted rows 0, 2    -> Np = 2; correct row 2     -> Nc = 1; Ng = 2
    #   label 2: predicted none         -> Np = 0, counted 1; Nc = 0;           Ng = 2
    # CP = (2/3 + 1/2 + 0/1) / 3 = 7/18; CR = (2/2 + 1/2 + 0/2) / 3 = 1/2
    # CF1 = 2 (7/18)(1/2) / (7/18 + 1/2) = 7/16 (the mean of per-label F1s would be 13/30)
    # OP = (2+1+0) / (3+2+1) = 1/2; OR = 3 / (2+2+2) = 1/2; OF1 = 1/2
    metrics = multilabel_metrics(scores, targets)
    expected = {"CP": 700 / 18, "CR": 50.0, "CF1": 700 / 16, "OP": 50.0, "OR": 50.0, "OF1": 50.0}
    assert {key: metrics[key] for key in expected} == pytest.approx(expected, rel=1e-12)
    # At 0.95 nothing is predicted: every ratio is 0, and the F1s are 0 rather than 0/0.
    assert [multilabel_metrics(scores, targets, threshold=0.95)[key] for key in THRESHOLD_KEYS] == [0.0] * 6


def test_top3_metrics_match_hand_counts():
    scores = np.array([
        [0.9, 0.8, 0.7, 0.6, 0.1],  # label 3 passes 0.5 but ranks 4th: not a top-3 prediction
        [0.2, 0.3, 0.55, 0.1, 0.95],  # top 3 = labels 4, 2, 1; label 1 fails the threshold
        [0.6, 0.6, 0.6, 0.6, 0.0],  # four-way tie at 3rd place: the lower indices 0, 1, 2 win
    ])
    targets = np.array([[1, 0, 0, 1, 0], [0, 0, 1, 0, 1], [0, 0, 1, 1, 0]])
    # Top-3 predictions: row 0 -> {0, 1, 2}; row 1 -> {2, 4}; row 2 -> {0, 1, 2}
    #   label 0: Np = 2, Nc = 1, Ng = 1
    #   label 1: Np = 2, Nc = 0, Ng = 0 (recall 0 in CR)
    #   label 2: Np = 3, Nc = 2, Ng = 2
    #   label 3: Np = 0 counted 1, Nc = 0, Ng = 2
    #   label 4: Np = 1, Nc = 1, Ng = 1
    # CP = (1/2 + 0 + 2/3 + 0 + 1) / 5 = 13/30; CR = (1 + 0 + 1 + 0 + 1) / 5 = 3/5
    # CF1 = 2 (13/30)(3/5) / (13/30 + 3/5) = 78/155
    # OP = 4 / (2+2+3+1+1) = 4/9; OR = 4 / (1+0+2+2+1) = 2/3 (plain sum of Ng);
    # OF1 = 2 (4/9)(2/3) / (4/9 + 2/3) = 8/15
    metrics = multilabel_metrics(scores, targets)
    expected = {"CP": 1300 / 30, "CR": 60.0, "CF1": 7800 / 155, "OP": 400 / 9, "OR": 200 / 3, "OF1": 800 / 15}
    assert {key: metrics[key + "_top3"] for key in expected} == pytest.approx(expected, rel=1e-12)
    # Without the top-3 rule label 3 is predicted in rows 0 and 2 (both correct): OP = 6/10.
    assert metrics["OP"] == pytest.approx(60.0, rel=1e-12)


def test_metrics_keys_and_types():
    scores, targets = _random_problem(seed=6)
    metrics = multilabel_metrics(scores, targets)
    expected_keys = ["mAP"] + THRESHOLD_KEYS + [key + "_top3" for key in THRESHOLD_KEYS]
    assert sorted(metrics) == sorted(expected_keys)
    assert all(type(value) is float for value in metrics.values())


def test_torch_input_matches_numpy():
    scores, targets = _random_problem(seed=7, dtype=np.float32, decimals=2)
    expected = multilabel_metrics(scores, targets)
    assert multilabel_metrics(torch.from_numpy(scores), torch.from_numpy(targets)) == expected
    np.testing.assert_array_equal(
        average_precision(torch.from_numpy(scores), torch.from_numpy(targets).bool()),
        average_precision(scores, targets),
    )
    # bfloat16 has no numpy dtype: it is widened exactly, so it matches the widened values.
    bfloat16_scores = torch.from_numpy(scores).bfloat16()
    widened = multilabel_metrics(bfloat16_scores.float().numpy(), targets)
    assert multilabel_metrics(bfloat16_scores, torch.from_numpy(targets)) == widened


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensor_input_matches_numpy():
    scores, targets = _random_problem(seed=8, dtype=np.float32)
    on_device = multilabel_metrics(torch.from_numpy(scores).cuda(), torch.from_numpy(targets).cuda())
    assert on_device == multilabel_metrics(scores, targets)


@pytest.mark.parametrize(
    "scores, targets, message",
    [
        (np.zeros(4), np.zeros(4), "2-D arrays of the same shape"),
        (np.zeros((4, 3)), np.zeros((4, 2)), r"got scores \(4, 3\) and targets \(4, 2\)"),
        (np.zeros((0, 3)), np.zeros((0, 3)), "at least one image and one label"),
        (np.zeros((2, 2)), np.array([[0, 1], [2, 0]]), "targets must be binary"),
        (np.zeros((2, 2)), np.array([[0, 0.5], [1, 0]]), "targets must be binary"),
        (np.array([[0.1, np.nan], [0.2, 0.3]]), np.zeros((2, 2)), "NaN or infinity"),
        (np.array([["a", "b"]]), np.zeros((1, 2)), "scores must be real numbers"),
    ],
)
def test_bad_input_raises_value_error(scores, targets, message):
    with pytest.raises(ValueError, match=message):
        average_precision(scores, targets)
    with pytest.raises(ValueError, match=message):
        multilabel_metrics(scores, targets)


def _ignored_problem(seed=11, num_images=200, num_labels=6):
    scores, targets = _random_problem(seed, num_images, num_labels)
    ignored = np.random.default_rng(seed + 1).random(targets.shape) < 0.15
    return scores, np.where(ignored, -1, targets), ignored


def test_average_precision_with_ignored_pairs_matches_sklearn_on_the_kept_rows():
    scores, targets, ignored = _ignored_problem()
    expected = [100 * average_precision_score(targets[~ignored[:, label], label], scores[~ignored[:, label], label])
                for label in range(targets.shape[1])]
    np.testing.assert_allclose(average_precision(scores, targets), expected, rtol=1e-12)
    # The same ignore state given as {0, 1} targets plus a mask.
    np.testing.assert_allclose(average_precision(scores, targets.clip(min=0), mask=~ignored), expected, rtol=1e-12)


def test_ignored_pairs_count_in_no_threshold_count():
    scores = np.array([[0.9, 0.6], [0.8, 0.2], [0.7, 0.7]])
    targets = np.array([[1, -1], [-1, 0], [0, 1]])
    # label 0 keeps rows 0 and 2: Np = 2 (both >= 0.5), Nc = 1, Ng = 1
    # label 1 keeps rows 1 and 2: Np = 1 (row 2), Nc = 1, Ng = 1; row 0's 0.6 is not a false positive
    # CP = (1/2 + 1) / 2 = 3/4; CR = 1; OP = 2/3; OR = 1
    metrics = multilabel_metrics(scores, targets)
    expected = {"CP": 75.0, "CR": 100.0, "CF1": 100 * 2 * 0.75 / 1.75, "OP": 200 / 3, "OR": 100.0, "OF1": 80.0}
    assert {key: metrics[key] for key in expected} == pytest.approx(expected, rel=1e-12)


def test_an_ignored_score_changes_nothing():
    scores, targets, ignored = _ignored_problem(seed=3)
    moved = np.where(ignored, np.random.default_rng(0).random(scores.shape), scores)
    keys = ["mAP", *THRESHOLD_KEYS]  # in the top-3 metrics an ignored label still takes its place in the ranking
    before, after = multilabel_metrics(scores, targets), multilabel_metrics(moved, targets)
    assert {key: after[key] for key in keys} == pytest.approx({key: before[key] for key in keys}, rel=1e-12)


def test_calibrated_thresholds_maximise_each_labels_f1():
    scores, targets, ignored = _ignored_problem(seed=5, num_images=80, num_labels=4)
    thresholds = calibrate_thresholds(scores, targets)

    def f1(label, threshold):
        keep = ~ignored[:, label]
        predicted, positive = scores[keep, label] >= threshold, targets[keep, label] == 1
        return 2 * (predicted & positive).sum() / (predicted.sum() + positive.sum())

    for label in range(4):  # a brute-force search over every score as a threshold
        best = max(f1(label, candidate) for candidate in scores[:, label])
        assert f1(label, thresholds[label]) == pytest.approx(best, rel=1e-12)
    # Per-label thresholds are accepted by the metrics; a label with no positive keeps the default.
    assert calibrate_thresholds(scores, np.zeros_like(targets), default=0.4).tolist() == [0.4] * 4
    assert multilabel_metrics(scores, targets, threshold=thresholds)["CF1"] >= multilabel_metrics(scores, targets)["CF1"] - 1e-9
