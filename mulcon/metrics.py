"""Multi-label evaluation metrics: per-class average precision, mAP and the threshold metrics.

Implements the evaluation protocol of the MulCon paper's experiments, which is the field's
(ML-GCN, ASL, Query2Label; see REFERENCE.md, "Metrics"):
mAP over labels with at least one positive image, and CP/CR/CF1/OP/OR/OF1 at a probability
threshold, for all predictions and for each image's top-3 labels. Every value is in percent.
Ties in AP follow scikit-learn's `average_precision_score`, so results never depend on row order.

Targets may hold an "ignore" state (PASCAL VOC's difficult objects): -1 in the targets, or 0 where
an explicit `mask` is False. An ignored (image, label) pair is neither positive nor negative: it is
left out of that label's AP and of its threshold counts, as the VOC devkit does.
`calibrate_thresholds` chooses one threshold per label (the one maximising its F1), for use on
the validation split only.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from mulcon.io import usable_cpus

TOP_K = 3  # the "top-3" metrics of ML-GCN and its successors


def _as_numpy(array) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu()
        if array.is_floating_point() and array.dtype not in (torch.float32, torch.float64):
            array = array.float()  # numpy has no bfloat16; widening to float32 keeps every tie
        array = array.numpy()
    return np.asarray(array)


def _validate(scores, targets, mask=None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Return scores as float32/float64, positives as bool (N, L) and the kept (not ignored) pairs
    as bool (N, L), or None when nothing is ignored; ValueError on bad input."""
    scores, targets = _as_numpy(scores), _as_numpy(targets)
    if scores.ndim != 2 or scores.shape != targets.shape:
        raise ValueError(
            f"scores and targets must be 2-D arrays of the same shape (images, labels); "
            f"got scores {scores.shape} and targets {targets.shape}"
        )
    if 0 in scores.shape:
        raise ValueError(f"need at least one image and one label; got shape {scores.shape}")
    if scores.dtype.kind not in "biuf":
        raise ValueError(f"scores must be real numbers; got dtype {scores.dtype}")
    if scores.dtype not in (np.float32, np.float64):
        # float16 -> float32 is exact; integers go to float64, which holds them exactly.
        scores = scores.astype(np.float32 if scores.dtype == np.float16 else np.float64)
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinity")
    kept = None
    if targets.dtype != bool:
        if not ((targets == 0) | (targets == 1) | (targets == -1)).all():
            raise ValueError(f"targets must be binary (0 or 1), or -1 for an ignored pair; found values {np.unique(targets)[:5]}")
        if (targets == -1).any():
            kept = targets != -1
        targets = targets == 1
    if mask is not None:
        mask = _as_numpy(mask)
        if mask.shape != scores.shape:
            raise ValueError(f"mask must have the shape of scores {scores.shape}; got {mask.shape}")
        mask = mask.astype(bool)
        kept = mask if kept is None else kept & mask
        targets = targets & mask
    if kept is not None and kept.all():
        kept = None
    return scores, targets, kept


def _label_major(array: np.ndarray, rows_per_block: int = 512) -> np.ndarray:
    """(N, L) -> C-contiguous (L, N): numpy sorts, masks and counts contiguous rows several times
    faster than strided columns, so every metric but the per-image top-k works label-major.
    Copied in blocks of rows that stay in cache: about 1.7x faster than one strided copy."""
    transposed = np.empty(array.shape[::-1], dtype=array.dtype)
    for start in range(0, array.shape[0], rows_per_block):
        transposed[:, start:start + rows_per_block] = array[start:start + rows_per_block].T
    return transposed


def _average_precision(scores_by_label: np.ndarray, targets_by_label: np.ndarray,
                       pool: ThreadPoolExecutor, kept_by_label: np.ndarray | None = None) -> np.ndarray:
    # Labels are independent and numpy's sort releases the GIL: blocks of labels run in parallel
    # on the pool's threads (the sort is most of the cost). A few blocks per thread balance the
    # load with other work on the same pool.
    num_labels = scores_by_label.shape[0]
    num_blocks = min(4 * usable_cpus(), num_labels)
    bounds = np.linspace(0, num_labels, num_blocks + 1).astype(int)
    blocks = [slice(start, stop) for start, stop in zip(bounds[:-1], bounds[1:])]
    results = pool.map(lambda block: _block_average_precision(
        scores_by_label[block], targets_by_label[block], None if kept_by_label is None else kept_by_label[block]),
        blocks)
    return np.concatenate(list(results))


def _block_average_precision(scores_by_label: np.ndarray, targets_by_label: np.ndarray,
                             kept_by_label: np.ndarray | None = None) -> np.ndarray:
    """(L,) AP in percent from label-major (L, N) scores and bool targets; pairs where
    `kept_by_label` (L, N) is False are left out of their label's ranking."""
    num_labels = scores_by_label.shape[0]
    average = np.full(num_labels, np.nan)  # a label with no positive has no AP
    for label in range(num_labels):
        scores_of_label, targets_of_label = scores_by_label[label], targets_by_label[label]  # (N,)
        if kept_by_label is not None and not kept_by_label[label].all():
            scores_of_label = np.extract(kept_by_label[label], scores_of_label)  # (N',) ignored pairs out
            targets_of_label = np.extract(kept_by_label[label], targets_of_label)
        num_images = scores_of_label.size
        # np.extract gathers through the indices of the mask: faster than a boolean index here;
        # its result is a fresh array, sorted in place.
        positive_scores = np.extract(targets_of_label, scores_of_label)  # (P,)
        if positive_scores.size == 0:
            continue
        positive_scores.sort()
        # Sorting is most of the cost. A score below every positive ranks above none of them, so
        # it is counted, not sorted; a trained model puts most negatives there (about 40% of the
        # scores of benchmarks/bench_metrics.py), and random scores lose nothing.
        candidates = np.extract(scores_of_label >= positive_scores[0], scores_of_label)  # (K,)
        candidates.sort()
        # AP = sum over distinct thresholds of (R_n - R_{n-1}) P_n = the mean over positives of the
        # precision at the threshold equal to that positive's score. side='left' counts the scores
        # strictly below it, so every score tied with it ranks above it: precision is taken once
        # per distinct threshold, as scikit-learn does, and row order cannot matter.
        below = num_images - candidates.size + np.searchsorted(candidates, positive_scores, side="left")  # (P,)
        positives_below = np.searchsorted(positive_scores, positive_scores, side="left")  # (P,)
        average[label] = np.mean((positive_scores.size - positives_below) / (num_images - below))
    return 100.0 * average


def average_precision(scores, targets, mask=None) -> np.ndarray:
    """Per-label average precision, tie-aware exactly like scikit-learn's average_precision_score.

    Args:
        scores: (N, L) real scores (probabilities or logits; only their order matters), numpy array
            or torch tensor on any device, any float dtype. NaN or infinity is rejected.
        targets: (N, L) ground truth: bool, or 0/1 of any dtype, -1 for an ignored pair.
        mask: optional (N, L) bool, False for an ignored pair (the same as -1 in targets).

    Returns:
        (L,) float64 AP in percent over each label's kept images; NaN for a label with no
        positive image.

    Raises:
        ValueError: shapes not 2-D and equal, an empty dimension, non-finite scores or
            non-binary targets.
    """
    scores, targets, kept = _validate(scores, targets, mask)
    with ThreadPoolExecutor(usable_cpus()) as pool:
        scores_by_label, targets_by_label = pool.map(_label_major, (scores, targets))
        kept_by_label = None if kept is None else _label_major(kept)
        return _average_precision(scores_by_label, targets_by_label, pool, kept_by_label)


def _top_k_mask(scores: np.ndarray, k: int) -> np.ndarray:
    """(N, L) bool: each image's k highest scores. A tie at the k-th place goes to the lower label
    index, so the mask is deterministic and independent of the sorting algorithm."""
    kth_highest = np.partition(scores, scores.shape[1] - k, axis=1)[:, -k, None]  # (N, 1)
    mask = scores >= kth_highest  # (N, L), more than k per image only where the k-th place is tied
    crowded = np.flatnonzero(np.count_nonzero(mask, axis=1) > k)  # rare with real-valued scores
    if crowded.size:
        crowded_scores, crowded_kth = scores[crowded], kth_highest[crowded]
        tied = crowded_scores == crowded_kth
        free_places = k - np.count_nonzero(crowded_scores > crowded_kth, axis=1, keepdims=True)
        mask[crowded] = (crowded_scores > crowded_kth) | (tied & (np.cumsum(tied, axis=1) <= free_places))
    return mask


def _precision_recall_f1(correct: np.ndarray, num_predicted: np.ndarray, num_positive: np.ndarray,
                         suffix: str) -> dict[str, float]:
    """CP, CR, CF1, OP, OR, OF1 (names + suffix) in percent from the per-label counts (L,) of
    correct predictions Nc, predictions Np and positives Ng."""
    # A label never predicted (Np = 0) counts 1 in the denominator, as in ML-GCN's evaluation code:
    # its ratio is 0 instead of NaN, and sum Np adds 1 for it. A label never present (Ng = 0) gets
    # recall 0 in CR; OR uses the plain sum of Ng.
    num_predicted = np.maximum(num_predicted, 1)
    class_precision = np.mean(correct / num_predicted)
    class_recall = np.mean(correct / np.maximum(num_positive, 1))
    overall_precision = correct.sum() / num_predicted.sum()
    # OR divides by the true count of positives (ML-GCN's code clamps Np only); 0 when there is none.
    overall_recall = correct.sum() / max(int(num_positive.sum()), 1)
    values = {
        "CP": class_precision, "CR": class_recall, "CF1": _f1(class_precision, class_recall),
        "OP": overall_precision, "OR": overall_recall, "OF1": _f1(overall_precision, overall_recall),
    }
    return {name + suffix: float(100.0 * value) for name, value in values.items()}


def _threshold_metrics(scores: np.ndarray, targets: np.ndarray, scores_by_label: np.ndarray,
                       targets_by_label: np.ndarray, threshold: np.ndarray,
                       kept: np.ndarray | None = None) -> dict[str, float]:
    """The threshold metrics from scores and targets (N, L) and their label-major copies (L, N);
    `threshold` is (L,); pairs where `kept` (N, L) is False count in no Nc, Np or Ng."""
    predicted = scores_by_label >= threshold[:, None]  # (L, N)
    # int32 sums of booleans along contiguous rows run twice as fast as count_nonzero (int64).
    correct = (predicted & targets_by_label).sum(axis=1, dtype=np.int32)  # Nc, (L,); ignored pairs are not positive
    counted = predicted if kept is None else predicted & _label_major(kept)
    num_predicted = counted.sum(axis=1, dtype=np.int32)  # Np, (L,)
    num_positive = targets_by_label.sum(axis=1, dtype=np.int32)  # Ng, (L,)
    # A label passing the threshold outranks every label that fails it, so an image with at most
    # k predictions keeps them all under the top-k rule: only the other images need ranking, and
    # their predictions outside the top k are taken off the counts. Most images have few
    # predictions, so this skips most of the ranking work, with the same result. An ignored
    # label still takes its place in the ranking; it only goes uncounted.
    k = min(TOP_K, scores.shape[1])
    crowded = np.flatnonzero(predicted.sum(axis=0, dtype=np.int32) > k)  # images with > k predictions
    crowded_scores = scores[crowded]  # (C, L)
    dropped = (crowded_scores >= threshold) & ~_top_k_mask(crowded_scores, k)  # (C, L)
    if kept is not None:
        dropped &= kept[crowded]
    correct_top_k = correct - (dropped & targets[crowded]).sum(axis=0, dtype=np.int32)
    predicted_top_k = num_predicted - dropped.sum(axis=0, dtype=np.int32)
    return (_precision_recall_f1(correct, num_predicted, num_positive, "")
            | _precision_recall_f1(correct_top_k, predicted_top_k, num_positive, "_top3"))


def _f1(precision: float, recall: float) -> float:
    # The F1 of the two means (not the mean of per-label F1s); 0 when both are 0.
    return 2.0 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def multilabel_metrics(scores, targets, threshold: float | np.ndarray = 0.5, mask=None) -> dict[str, float]:
    """mAP and the threshold metrics CP/CR/CF1/OP/OR/OF1, for all labels and for each image's top 3.

    Args:
        scores: (N, L) probabilities (not logits: the threshold applies to them), numpy array or
            torch tensor on any device, any float dtype.
        targets: (N, L) ground truth: bool, or 0/1 of any dtype, -1 for an ignored pair.
        threshold: a label is predicted when its probability is >= threshold; a float, or one
            threshold per label (L,) (from `calibrate_thresholds`).
        mask: optional (N, L) bool, False for an ignored pair (the same as -1 in targets).

    Returns:
        Plain floats in percent under the keys mAP, CP, CR, CF1, OP, OR, OF1 and the same six with
        the suffix _top3, where a label is predicted only if it also ranks among the image's three
        highest scores (a tie at third place goes to the lower label index). mAP is the mean AP
        over labels with at least one positive, NaN when no label has one. A label never predicted
        (Np = 0) counts 1 in that denominator, so its precision is 0 (not NaN) and sum Np grows by 1
        for it (ML-GCN's convention); a label never present (Ng = 0) has recall 0 in CR, and OR
        divides by the plain sum of Ng. Ignored pairs count in none of Nc, Np, Ng nor in AP.

    Raises:
        ValueError: as for `average_precision`, or a threshold vector of the wrong length.
    """
    scores, targets, kept = _validate(scores, targets, mask)
    thresholds = np.broadcast_to(np.asarray(threshold, dtype=np.float64), scores.shape[1:])
    with ThreadPoolExecutor(usable_cpus()) as pool:
        scores_by_label, targets_by_label = pool.map(_label_major, (scores, targets))
        kept_by_label = None if kept is None else _label_major(kept)
        # Submitted first, the threshold metrics run on one thread while the others sort for AP.
        threshold_metrics = pool.submit(_threshold_metrics, scores, targets, scores_by_label, targets_by_label,
                                        thresholds, kept)
        per_label_ap = _average_precision(scores_by_label, targets_by_label, pool, kept_by_label)
        # nanmean would warn on an all-NaN vector; a set with no positive at all gives NaN quietly.
        has_positive = ~np.isnan(per_label_ap)
        mean_ap = float(per_label_ap[has_positive].mean()) if has_positive.any() else float("nan")
        return {"mAP": mean_ap} | threshold_metrics.result()


def calibrate_thresholds(scores, targets, default: float = 0.5, mask=None) -> np.ndarray:
    """One threshold per label: the score at which that label's F1 on these images is highest.

    Meant for the validation split (choosing on test would report a tuned number). For each label
    the candidates are its distinct kept scores; predicting "score >= candidate" gives
    F1 = 2 TP / (Np + Ng), and the highest F1 wins (a tie goes to the higher threshold, fewer
    predictions).

    Args:
        scores: (N, L) probabilities; targets and mask as for `multilabel_metrics`.
        default: the threshold of a label with no kept positive image (its F1 is 0 at any threshold).

    Returns:
        (L,) float64 thresholds.
    """
    scores, targets, kept = _validate(scores, targets, mask)
    thresholds = np.full(scores.shape[1], float(default))
    for label in range(scores.shape[1]):
        keep = slice(None) if kept is None else kept[:, label]
        scores_of_label, positives = scores[keep, label], targets[keep, label]
        num_positive = int(positives.sum())
        if num_positive == 0:
            continue
        order = np.argsort(-scores_of_label, kind="stable")
        ranked = scores_of_label[order]  # descending
        true_positives = np.cumsum(positives[order])  # TP when predicting the first i+1
        # Only the last of a run of tied scores is a threshold one can realise with ">=".
        last_of_tie = np.append(ranked[1:] != ranked[:-1], True)
        f1 = np.where(last_of_tie, 2.0 * true_positives / (np.arange(1, ranked.size + 1) + num_positive), -1.0)
        best = np.flatnonzero(f1 == f1.max())[0]  # the first maximum: the highest threshold
        thresholds[label] = float(ranked[best])
    return thresholds
