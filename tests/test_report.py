"""The report over seeds (mulcon.report, mulcon.spread): mean and standard deviation per variant,
the paired bootstrap difference against MulCon, the per-class gain figure, and the CLI's table."""

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from mulcon.config import VARIANTS
from mulcon.errors import DataError
from mulcon.report import aggregate_metrics, write_report
from mulcon.spread import paired_difference, per_class_gain, seed_dir
from tests.conftest import ROOT

CLASSES = ["circle", "square", "star", "ring"]
QUALITY = {"backbone_bce": 0.5, "backbone_bce_scl": 0.8, "mulcon_bce": 1.0, "mulcon_no_pretrain": 1.2, "mulcon_step2_bce": 1.3,
           "mulcon": 1.5}


def _sklearn_map(scores, targets) -> float:
    return 100 * float(np.mean([average_precision_score(targets[:, c], scores[:, c]) for c in range(targets.shape[1])]))


def _write_reports(root, seeds, images=60):
    """Evaluations of every variant and seed: scores that separate the classes by QUALITY, noise by seed."""
    targets = np.random.default_rng(99).random((images, len(CLASSES))) < 0.4
    targets[0], targets[1] = True, False  # every class has a positive and a negative
    found = {}
    for variant in VARIANTS:
        for seed in seeds:
            rng = np.random.default_rng(100 * VARIANTS.index(variant) + seed)
            scores = (QUALITY[variant] * targets + rng.normal(size=targets.shape)).astype(np.float32)
            directory = seed_dir(root, variant, seed, seeds[0])
            directory.mkdir(parents=True)
            np.savez(directory / "scores.npz", scores=scores, targets=targets)
            aps = [100 * average_precision_score(targets[:, c], scores[:, c]) for c in range(len(CLASSES))]
            metrics = {"mAP": float(np.mean(aps)), "CF1": 50.0 + seed, "OF1": 60.0 - seed, "split": "test"}
            (directory / "metrics.json").write_text(json.dumps(metrics))
            with open(directory / "per_class_ap.csv", "w", newline="") as file:
                csv.writer(file).writerows([("class", "positives", "ap"), *[(n, 1, round(a, 4)) for n, a in zip(CLASSES, aps)]])
            found[variant, seed] = (scores, targets, metrics)
    return found


def test_mean_std_and_paired_difference_over_seeds(tmp_path):
    seeds = [0, 3, 4]
    found = _write_reports(tmp_path, seeds)
    files = write_report(tmp_path, "demo", seeds=seeds, samples=200)
    rows = {row["variant"]: row for row in csv.DictReader(open(tmp_path / "ablation.csv"))}
    for variant in VARIANTS:
        values = [found[variant, seed][2]["mAP"] for seed in seeds]
        assert float(rows[variant]["mAP"]) == pytest.approx(np.mean(values), abs=1e-3)
        assert float(rows[variant]["mAP_std"]) == pytest.approx(np.std(values, ddof=1), abs=1e-3)
        assert float(rows[variant]["CF1"]) == pytest.approx(np.mean([50.0 + s for s in seeds]), abs=1e-3)
        # The observed difference is that of the seed-averaged mAPs, computed here by scikit-learn.
        expected = np.mean([_sklearn_map(*found[variant, s][:2]) - _sklearn_map(*found["mulcon", s][:2]) for s in seeds])
        assert float(rows[variant]["mAP_diff"]) == pytest.approx(expected, abs=1e-3)
        low, high = float(rows[variant]["mAP_diff_low"]), float(rows[variant]["mAP_diff_high"])
        assert low <= float(rows[variant]["mAP_diff"]) <= high
    assert float(rows["backbone_bce"]["mAP_diff_high"]) < 0  # much weaker scores: the whole interval below 0
    assert rows["mulcon"]["mAP_diff"] == "0.0"
    table = (tmp_path / "ablation.md").read_text()
    assert "seeds 0, 3, 4: mean ± std" in table and f"| MulCon | {float(rows['mulcon']['mAP']):.1f} ± " in table
    assert (tmp_path / "per_class_gain.png").stat().st_size > 1000 and tmp_path / "per_class_gain.png" in files
    metrics = aggregate_metrics(tmp_path / "ablation.csv")
    assert metrics["mAP_mean_mulcon"] == float(rows["mulcon"]["mAP"]) and "mAP_diff_low_backbone_bce" in metrics


def test_bootstrap_of_a_model_against_itself_is_zero_and_intervals_shrink_with_images(tmp_path):
    seeds = [0]
    _write_reports(tmp_path / "small", seeds, images=40)
    _write_reports(tmp_path / "large", seeds, images=400)
    small = paired_difference(tmp_path / "small", "mulcon_bce", seeds, samples=300)
    large = paired_difference(tmp_path / "large", "mulcon_bce", seeds, samples=300)
    assert large[2] - large[1] < small[2] - small[1]
    assert paired_difference(tmp_path / "small", "mulcon", seeds, samples=50) == (0.0, 0.0, 0.0)


def test_per_class_gain_is_sorted_and_averaged_over_seeds(tmp_path):
    seeds = [0, 1]
    found = _write_reports(tmp_path, seeds)
    gains = per_class_gain(tmp_path, seeds)
    assert [gain for _, gain in gains] == sorted((gain for _, gain in gains), reverse=True)
    targets = found["mulcon", 0][1]
    for name, gain in gains:
        c = CLASSES.index(name)
        expected = np.mean([100 * (average_precision_score(targets[:, c], found["mulcon", s][0][:, c])
                                   - average_precision_score(targets[:, c], found["backbone_bce", s][0][:, c]))
                            for s in seeds])
        assert gain == pytest.approx(expected, abs=1e-3)


def test_a_missing_seed_is_one_clear_error(tmp_path):
    _write_reports(tmp_path, [0])
    with pytest.raises(DataError, match=r"backbone_bce/seed2/metrics.json: missing; evaluate that variant and seed"):
        write_report(tmp_path, "demo", seeds=[0, 2], samples=10)


def test_cli_report_prints_the_spread_table(tmp_path):
    _write_reports(tmp_path / "reports", [0, 1])
    result = subprocess.run([sys.executable, "-m", "mulcon", "report", "--params", str(ROOT / "params.yaml"),
                             "-S", f"evaluate.out_root={tmp_path / 'reports'}", "-S", "tracking.enabled=false",
                             "-S", "train.seeds=[1]"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "seeds 0, 1: mean ± std" in result.stdout and "| Backbone with BCE |" in result.stdout


def test_ignored_pairs_are_left_out_of_the_paired_difference_as_of_the_map_column(tmp_path):
    """scores.npz as evaluate writes it, with -1 for ignored pairs (VOC-2007's difficult objects): the
    observed difference is exactly the difference of the two variants' mAP, each computed by
    mulcon.metrics with the ignored pairs left out, and differs from counting them as negatives."""
    from mulcon.evaluate import write_scores
    from mulcon.metrics import average_precision

    rng = np.random.default_rng(5)
    targets = (rng.random((80, len(CLASSES))) < 0.4).astype(np.float32)
    targets[0], targets[1] = 1, 0
    targets[rng.random(targets.shape) < 0.15] = -1  # ignored pairs
    maps = {}
    for variant in VARIANTS:
        scores = (QUALITY[variant] * (targets == 1) + rng.normal(size=targets.shape)).astype(np.float32)
        scores[targets == -1] += 3.0  # ignored pairs scored high: they would be false positives if counted
        write_scores(tmp_path / variant / "scores.npz", scores, targets)
        maps[variant] = float(np.nanmean(average_precision(scores, targets)))  # percent
        with np.load(tmp_path / variant / "scores.npz") as stored:
            assert np.array_equal(stored["targets"], targets)  # 1, 0 and -1 as written
    for variant in VARIANTS:
        point, _, _ = paired_difference(tmp_path, variant, [0], samples=20)
        assert point == pytest.approx(maps[variant] - maps["mulcon"], abs=1e-9)
    counted = {variant: _sklearn_map(np.load(tmp_path / variant / "scores.npz")["scores"], targets == 1)
               for variant in ("backbone_bce", "mulcon")}
    assert abs((counted["backbone_bce"] - counted["mulcon"]) - (maps["backbone_bce"] - maps["mulcon"])) > 0.1
