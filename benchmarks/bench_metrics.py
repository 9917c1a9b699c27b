"""Benchmark 2: `multilabel_metrics` on a COCO-val-sized score matrix (40,137 images x 80 labels)
against scikit-learn's per-class `average_precision_score` loop.

`multilabel_metrics` computes mAP and the twelve threshold metrics; the scikit-learn loop only the
80 APs. The scores are COCO-like: skewed label frequencies (2.9 labels per image, the commonest on
45% of the images), sigmoid probabilities of a model with an mAP near 80, about three labels per
image above the 0.5 threshold. Also printed: the largest AP difference to scikit-learn.
Target (issue 5): at least 10x faster.

    python -m benchmarks.bench_metrics [--quick] [--out result.json]
"""

from __future__ import annotations

import sys

import numpy as np
from sklearn.metrics import average_precision_score

from benchmarks.common import finish, interleaved_times, median, paired_ratio, parser, print_table, usable_cpus, verdict
from mulcon.metrics import average_precision, multilabel_metrics

TARGET = 10.0  # scikit-learn loop time / multilabel_metrics time, at least


def coco_like_scores(num_images: int, num_labels: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """float32 probabilities (N, L) and bool targets (N, L) with COCO's label statistics."""
    rng = np.random.default_rng(seed)
    frequency = 1.0 / np.arange(1, num_labels + 1) ** 0.9  # Zipf-like, as COCO's classes
    frequency = np.minimum(frequency / frequency.mean() * 0.036, 0.45)
    targets = rng.random((num_images, num_labels)) < frequency
    logits = np.where(targets, rng.normal(1.0, 2.0, targets.shape), rng.normal(-5.0, 2.0, targets.shape))
    return (1.0 / (1.0 + np.exp(-logits))).astype(np.float32), targets


def sklearn_average_precision(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    return 100.0 * np.array([average_precision_score(targets[:, label], scores[:, label])
                             for label in range(scores.shape[1])])


def run(num_images: int, num_labels: int, repeats: int, judged: bool = True) -> dict:
    scores, targets = coco_like_scores(num_images, num_labels)
    cases = {
        "sklearn_ap_loop": lambda: sklearn_average_precision(scores, targets),
        "multilabel_metrics": lambda: multilabel_metrics(scores, targets),
        "average_precision": lambda: average_precision(scores, targets),
    }
    cpu: dict[str, list[float]] = {}
    times = interleaved_times(cases, repeats, warmup=1, cpu_times=cpu)
    baseline = times["sklearn_ap_loop"]
    figures = {name: {"ms": 1e3 * median(values), "speedup": paired_ratio(baseline, values),
                      "cpu_ms": 1e3 * median(cpu[name]), "cpu_ratio": paired_ratio(cpu["sklearn_ap_loop"], cpu[name])}
               for name, values in times.items()}
    metrics = multilabel_metrics(scores, targets)
    difference = np.nanmax(np.abs(average_precision(scores, targets) - sklearn_average_precision(scores, targets)))
    speedup = figures["multilabel_metrics"]["speedup"]
    return {"benchmark": "metrics", "num_images": num_images, "num_labels": num_labels, "cores": usable_cpus(),
            "repeats": repeats, "cases": figures, "mAP": metrics["mAP"],
            "labels_per_image": float(targets.sum(1).mean()),
            "predicted_per_image": float((scores >= 0.5).sum(1).mean()), "max_ap_difference": float(difference),
            "speedup": speedup, "target": TARGET, "target_met": speedup >= TARGET if judged else None,
            "verdict": verdict(speedup, TARGET, at_most=False, judged=judged)}


def report(result: dict) -> None:
    rows = [[name, f"{case['ms']:.1f}", f"{case['speedup']:.1f}", f"{case['cpu_ms']:.1f}", f"{case['cpu_ratio']:.1f}"]
            for name, case in result["cases"].items()]
    print_table(f"Benchmark 2: metrics on {result['num_images']:,} x {result['num_labels']} scores "
                f"(mAP {result['mAP']:.1f}, {result['labels_per_image']:.2f} labels and "
                f"{result['predicted_per_image']:.2f} predictions per image; {result['cores']} cores; "
                f"median of {result['repeats']} interleaved rounds)",
                ["case", "ms", "x faster than scikit-learn", "CPU ms (all threads)", "x less CPU time"], rows)
    print(f"  largest |AP - scikit-learn AP|: {result['max_ap_difference']:.2e} (percent points)")
    print(f"  multilabel_metrics speed-up: {result['speedup']:.1f}x ({result['verdict']}); it sorts on "
          f"{result['cores']} threads, so a busy second core lowers it towards the CPU-time ratio")


def main(argv: list[str] | None = None) -> dict:
    arguments = parser(__doc__.splitlines()[0])
    arguments.add_argument("--repeats", type=int, default=7, help="timed rounds (default 7)")
    options = arguments.parse_args(argv)
    result = run(2000, 20, 1, judged=False) if options.quick else run(40137, 80, options.repeats)
    report(result)
    return finish(result, options.out)


if __name__ == "__main__":
    main(sys.argv[1:])
