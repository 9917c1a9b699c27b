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
from mulcon.metrics import average_precision

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


def _map(scores: np.ndarray, targets: np.ndarray) -> float:
    return float(np.nanmean(average_precision(scores, targets)))


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
    observed = float(np.mean([_map(a, t) - _map(b, t) for a, b, t in pairs]))
    generator = np.random.default_rng(seed)
    count = len(pairs[0][2])
    differences = np.empty(samples)
    for sample in range(samples):
        rows = generator.integers(0, count, count)
        differences[sample] = np.mean([_map(a[rows], t[rows]) - _map(b[rows], t[rows]) for a, b, t in pairs])
    low, high = np.percentile(differences, [2.5, 97.5])
    return observed, float(low), float(high)


def per_class_gain(reports_root: Path, seeds: list[int], minuend: str = REFERENCE,
                   subtrahend: str = "backbone_bce") -> list[tuple[str, float]]:
    """(class, AP of `minuend` minus AP of `subtrahend`), each averaged over seeds, largest first;
    classes without a positive test image are left out."""
    def mean_ap(variant: str) -> dict[str, float]:
        totals: dict[str, list[float]] = {}
        for k in seeds:
            with open(_read(seed_dir(reports_root, variant, k, seeds[0]) / "per_class_ap.csv"), newline="") as file:
                for row in csv.DictReader(file):
                    if row["ap"] != "":
                        totals.setdefault(row["class"], []).append(float(row["ap"]))
        return {name: float(np.mean(values)) for name, values in totals.items() if len(values) == len(seeds)}

    first, second = mean_ap(minuend), mean_ap(subtrahend)
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
