"""The paper's tables from our measured metrics: Table 3 (the ablation) and Tables 1 and 2
(COCO-2014 and NUS-WIDE), with the paper's numbers beside ours.

Inputs are the files that `evaluate` writes for each variant (and each seed: mulcon.spread);
nothing is typed in but the paper's own numbers. With several seeds the table gives each metric's
mean and standard deviation over seeds and each variant's paired mAP difference against MulCon.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from mulcon.config import VARIANTS
from mulcon.errors import DataError
from mulcon.io import write_text
from mulcon.spread import REFERENCE, load_seed_metrics, mean_std, paired_difference, per_class_gain, write_gain_plot

VARIANT_NAMES = {
    "backbone_bce": "Backbone with BCE",
    "backbone_bce_scl": "Backbone with BCE + SCL",
    "mulcon_bce": "MulCon with BCE only",
    "mulcon_no_pretrain": "MulCon without pretraining",
    "mulcon_step2_bce": "MulCon, step 2 without L_con",
    "mulcon": "MulCon",
}
PAPER_TABLE3_MAP = {"backbone_bce": 80.8, "backbone_bce_scl": 81.0, "mulcon_bce": 83.0,
                    "mulcon_no_pretrain": 81.1, "mulcon_step2_bce": None, "mulcon": 84.0}  # COCO-2014; None: not in the paper
PAPER_TABLES = {  # (method, mAP, CF1, OF1); None where the paper prints "-"
    "coco2014": ("Table 1: COCO-2014", [
        ("CNN-RNN", 61.2, None, None), ("SRN", 77.1, 71.2, 75.8), ("s-CLs", 74.6, 69.2, 74.0),
        ("Multi Evidence", None, 74.9, 78.4), ("ML-GCN", 83.0, 78.0, 80.3), ("CMA", 83.4, 77.8, 80.9),
        ("MulCon (paper)", 84.0, 78.6, 81.0)]),
    "nuswide": ("Table 2: NUS-WIDE", [
        ("FitsNet", 57.4, 54.9, 70.4), ("attention-transfer", 57.6, 55.2, 70.3), ("s-CLs", 60.1, 58.7, 73.3),
        ("CMA", 60.8, 60.4, 73.7), ("SRN", 62.0, 58.5, 73.4), ("MulCon (paper)", 62.5, 59.0, 73.8)]),
}


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def load_metrics(reports_root: Path, variants=VARIANTS) -> dict[str, dict[str, Any]]:
    """metrics.json of each variant under `reports_root/<variant>/`; a missing one is an error."""
    found = {}
    for variant in variants:
        path = reports_root / variant / "metrics.json"
        if not path.exists():
            raise DataError(f"{path}: missing; evaluate variant {variant} first")
        found[variant] = json.loads(path.read_text())
    return found


def ablation_rows(reports_root: Path, seeds: list[int], samples: int | None = None,
                  variants=VARIANTS) -> list[dict[str, Any]]:
    """One row per variant: mAP, CF1 and OF1 as mean and standard deviation over `seeds`, and the
    paired mAP difference against MulCon with its 95% bootstrap interval (0 for MulCon itself)."""
    metrics = load_seed_metrics(reports_root, variants, seeds)
    rows = []
    for variant, runs in metrics.items():
        row: dict[str, Any] = {"variant": variant, "method": VARIANT_NAMES[variant], "seeds": len(runs)}
        for key in ("mAP", "CF1", "OF1"):
            row[key], row[f"{key}_std"] = (round(value, 4) for value in mean_std([run[key] for run in runs]))
        if variant == REFERENCE:
            difference = (0.0, 0.0, 0.0)
        else:
            options = {} if samples is None else {"samples": samples}
            difference = paired_difference(reports_root, variant, seeds, **options)
        row.update(zip(("mAP_diff", "mAP_diff_low", "mAP_diff_high"), (round(value, 4) for value in difference)))
        row["paper_mAP_coco2014"] = PAPER_TABLE3_MAP[variant]
        rows.append(row)
    return rows


def ablation_markdown(rows: list[dict[str, Any]], dataset: str, split: str, seeds: list[int]) -> str:
    spread = len(seeds) > 1
    def cell(row: dict[str, Any], key: str) -> str:
        return f"{row[key]:.1f} ± {row[key + '_std']:.1f}" if spread else f"{row[key]:.1f}"

    def difference(row: dict[str, Any]) -> str:
        if row["variant"] == REFERENCE:
            return "-"
        return f"{row['mAP_diff']:+.1f} [{row['mAP_diff_low']:+.1f}, {row['mAP_diff_high']:+.1f}]"

    seeds_text = f"seeds {', '.join(map(str, seeds))}: mean ± std" if spread else f"seed {seeds[0]}"
    lines = [f"# Table 3: ablation ({dataset}, {split} split, final models, {seeds_text})", "",
             "| Method | mAP | CF1 | OF1 | mAP - MulCon [95% CI] | paper mAP (COCO-2014) |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {cell(r, 'mAP')} | {cell(r, 'CF1')} | {cell(r, 'OF1')} | {difference(r)} | "
              f"{_number(r['paper_mAP_coco2014'])} |" for r in rows]
    lines += ["", "mAP - MulCon: the paired difference of mAP on the same test images, averaged over seeds; "
                  "the interval is a 95% percentile bootstrap over test images."]
    return "\n".join(lines) + "\n"


def results_markdown(ours: dict[str, Any], dataset: str) -> str:
    """Tables 1 and 2 in the paper's layout, with our MulCon row added under the table of `dataset`."""
    sections = []
    for key, (title, rows) in PAPER_TABLES.items():
        lines = [f"## {title}", "", "| Method | mAP | CF1 | OF1 |", "|---|---|---|---|"]
        lines += [f"| {name} | {_number(a)} | {_number(c)} | {_number(o)} |" for name, a, c, o in rows]
        if key == dataset:
            lines.append(f"| **MulCon (ours)** | {ours['mAP']:.1f} | {ours['CF1']:.1f} | {ours['OF1']:.1f} |")
        sections.append("\n".join(lines))
    if dataset not in PAPER_TABLES:
        sections.append(f"## This run: {dataset}\n\n| Method | mAP | CF1 | OF1 |\n|---|---|---|---|\n"
                        f"| MulCon (ours) | {ours['mAP']:.1f} | {ours['CF1']:.1f} | {ours['OF1']:.1f} |")
    return "# Results in the layout of Tables 1 and 2\n\n" + "\n\n".join(sections) + "\n"


def ablation_headline(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """The ablation's DVC metrics: mAP's mean, standard deviation and paired difference against MulCon,
    each as {variant: value}. Grouped by quantity, so that `dvc exp show` lists every variant's mAP
    side by side in its first columns (mAP.mulcon, mAP.backbone_bce, ...); the rest is in ablation.csv."""
    return {key: {row["variant"]: row[key] for row in rows} for key in ("mAP", "mAP_std", "mAP_diff")}


def csv_text(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_report(reports_root: str | Path, dataset: str, seeds: list[int] | None = None,
                 samples: int | None = None) -> list[Path]:
    """Write ablation.md, ablation.csv (every column), ablation.json (`ablation_headline`: the DVC
    metrics file), metrics.md, per_class_gain.csv and per_class_gain.png into `reports_root`;
    return their paths.

    Args:
        seeds: train.seed, then train.seeds (default: [0], the variants' folders alone).
        samples: bootstrap resamples (default mulcon.spread.BOOTSTRAP_SAMPLES).
    """
    reports_root, seeds = Path(reports_root), list(seeds or [0])
    metrics = load_metrics(reports_root)
    rows = ablation_rows(reports_root, seeds, samples)
    split = metrics["mulcon"].get("split", "test")
    gains = per_class_gain(reports_root, seeds)
    files = {"ablation.md": ablation_markdown(rows, dataset, split, seeds), "ablation.csv": csv_text(rows),
             "metrics.md": results_markdown(metrics["mulcon"], dataset),
             "per_class_gain.csv": csv_text([{"class": name, "ap_gain": round(gain, 4)} for name, gain in gains])
             if gains else "class,ap_gain\n",
             "ablation.json": json.dumps(ablation_headline(rows), indent=2) + "\n"}
    for name, text in files.items():
        write_text(reports_root / name, text)
    write_gain_plot(reports_root / "per_class_gain.png", gains,
                    f"per-class AP: MulCon minus Backbone with BCE ({dataset}, {len(seeds)} seed{'s' * (len(seeds) > 1)})")
    return [reports_root / name for name in (*files, "per_class_gain.png")]


def aggregate_metrics(rows_csv: str | Path) -> dict[str, float]:
    """The per-variant means and spread of ablation.csv as flat MLflow metrics (mAP_mean_mulcon, ...)."""
    with open(rows_csv, newline="") as file:
        rows = list(csv.DictReader(file))
    names = {"mAP": "mAP_mean", "mAP_std": "mAP_std", "CF1": "CF1_mean", "OF1": "OF1_mean",
             "mAP_diff": "mAP_diff", "mAP_diff_low": "mAP_diff_low", "mAP_diff_high": "mAP_diff_high"}
    return {f"{name}_{row['variant']}": float(row[key]) for row in rows for key, name in names.items()}
