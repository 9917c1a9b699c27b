"""The ablation's spread over seeds: mean and standard deviation of each variant's metrics, the
paired mAP difference of each variant against `mulcon` with a 95% bootstrap interval over test
images, and the per-class AP gain of `mulcon` over `backbone_bce` as a figure.

Inputs are what `evaluate` writes: `metrics.json`, `per_class_ap.csv` and `scores.npz` (per-image
scores and targets) of seed `train.seed` in `<reports>/<variant>/` and of each further seed k of
`train.seeds` in `<reports>/<variant>/seed<k>/`.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from mulcon.errors import DataError
from mulcon.io import atomic_path

BOOTSTRAP_SAMPLES = 1000  # resamples of the test images for the 95% interval
REFERENCE = "mulcon"


def seed_dir(reports_root: Path, variant: str, seed: int, main_seed: int) -> Path:
    """Where evaluate wrote `variant` trained with `seed`: the variant's folder for the main seed."""
    return reports_root / variant if seed == main_seed else reports_root / variant / f"seed{seed}"


def _read(path: Path) -> Path:
    if not path.exists():
        raise DataError(f"{path}: missing; evaluate that variant and seed first")
    return path


def load_seed_metrics(reports_root: Path, variants, seeds: list[int]) -> dict[str, list[dict[str, Any]]]:
    """metrics.json of every variant and seed: {variant: [metrics of seeds[0], ...]}."""
    return {variant: [json.loads(_read(seed_dir(reports_root, variant, seed, seeds[0]) / "metrics.json").read_text())
                      for seed in seeds] for variant in variants}


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for one value)."""
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def _scores(directory: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(_read(directory / "scores.npz")) as stored:
        return stored["scores"], stored["targets"]


def weighted_maps(scores: np.ndarray, targets: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """mAP (percent) under each row of image weights: a bootstrap resample is the count of each image.

    Args:
        scores: (N, L); targets: (N, L) bool, or 1/0 with -1 for an ignored pair (as `evaluate`
            writes them); weights: (B, N) non-negative counts.

    Returns:
        (B,) mAP over the labels with a positive in the resample. With all weights 1 this is
        `mulcon.metrics.average_precision` (scikit-learn's on the pairs not ignored): an ignored pair
        is neither a hit nor a rank, and tied scores share the precision at the end of their group.
    """
    targets = np.asarray(targets)
    kept = targets >= 0  # bool targets: every pair kept
    positives = targets == 1
    per_label = np.full((len(weights), scores.shape[1]), np.nan)
    for label in range(scores.shape[1]):
        order = np.argsort(-scores[:, label], kind="stable")
        ranked, positive = -scores[order, label], positives[order, label]
        group_end = np.searchsorted(ranked, ranked, side="right") - 1  # last index of each tie group
        counted = weights[:, order] * kept[order, label]  # (B, N); an ignored pair counts for nothing
        hits = np.cumsum(counted * positive, axis=1)
        precision = hits[:, group_end] / np.maximum(np.cumsum(counted, axis=1)[:, group_end], 1e-12)
        total = hits[:, -1]
        with np.errstate(invalid="ignore", divide="ignore"):
            per_label[:, label] = (counted * positive * precision).sum(1) / total
    with np.errstate(all="ignore"):
        return 100 * np.nanmean(per_label, axis=1)


def paired_difference(reports_root: Path, variant: str, seeds: list[int], *, samples: int = BOOTSTRAP_SAMPLES,
                      seed: int = 0) -> tuple[float, float, float]:
    """mAP of `variant` minus mAP of `mulcon`, averaged over seeds, with a 95% percentile bootstrap
    interval: each resample draws the test images with replacement, the same draw for both models
    and all seeds (paired), and recomputes the difference of the seed-averaged mAPs.

    Raises:
        DataError: a scores.npz is missing, or two files disagree on the test images' targets.
    """
    pairs = []
    for k in seeds:
        ours, targets = _scores(seed_dir(reports_root, variant, k, seeds[0]))
        reference, reference_targets = _scores(seed_dir(reports_root, REFERENCE, k, seeds[0]))
        if not np.array_equal(targets, reference_targets):
            raise DataError(f"{seed_dir(reports_root, variant, k, seeds[0])}/scores.npz: targets differ from "
                            f"{REFERENCE}'s; both must be evaluated on the same split")
        pairs.append((ours, reference, targets))
    count = len(pairs[0][2])
    draws = np.random.default_rng(seed).integers(0, count, (samples, count))
    weights = np.stack([np.bincount(row, minlength=count) for row in draws]).astype(np.float64)  # (B, N)
    weights = np.concatenate([np.ones((1, count)), weights])  # row 0: the test set itself
    differences = np.mean([weighted_maps(a, t, weights) - weighted_maps(b, t, weights) for a, b, t in pairs], axis=0)
    low, high = np.percentile(differences[1:], [2.5, 97.5])
    return float(differences[0]), float(low), float(high)


def mean_class_ap(reports_root: Path, variant: str, seeds: list[int]) -> dict[str, float]:
    """{class: AP of `variant` averaged over `seeds`}, from each seed's per_class_ap.csv; classes
    without a positive test image (an empty AP) are left out."""
    totals: dict[str, list[float]] = {}
    for k in seeds:
        with open(_read(seed_dir(reports_root, variant, k, seeds[0]) / "per_class_ap.csv"), newline="") as file:
            for row in csv.DictReader(file):
                if row["ap"] != "":
                    totals.setdefault(row["class"], []).append(float(row["ap"]))
    return {name: float(np.mean(values)) for name, values in totals.items() if len(values) == len(seeds)}


def per_class_gain(reports_root: Path, seeds: list[int], minuend: str = REFERENCE,
                   subtrahend: str = "backbone_bce") -> list[tuple[str, float]]:
    """(class, AP of `minuend` minus AP of `subtrahend`), each averaged over seeds, largest first;
    classes without a positive test image are left out."""
    first, second = mean_class_ap(reports_root, minuend, seeds), mean_class_ap(reports_root, subtrahend, seeds)
    return sorted(((name, first[name] - second[name]) for name in first if name in second),
                  key=lambda item: item[1], reverse=True)


def write_gain_plot(path: Path, gains: list[tuple[str, float]], title: str) -> None:
    """Sorted horizontal bars of the per-class AP gain, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    height = max(2.5, 0.22 * len(gains) + 1)
    figure, axes = pyplot.subplots(figsize=(6, height), dpi=100)
    names, values = [name for name, _ in gains][::-1], [value for _, value in gains][::-1]
    axes.barh(names, values, color=["C2" if value >= 0 else "C3" for value in values])
    axes.axvline(0, color="0.3", linewidth=0.8)
    axes.set(xlabel="AP difference (points)", title=title)
    axes.tick_params(axis="y", labelsize=7)
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", bbox_inches="tight")
    pyplot.close(figure)
