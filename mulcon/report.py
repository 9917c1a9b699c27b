"""The paper's tables from our measured metrics: Table 3 (the ablation) and Tables 1 and 2
(COCO-2014 and NUS-WIDE), with the paper's numbers beside ours.

Inputs are the `metrics.json` files that `evaluate` writes for each variant; nothing is typed in
but the paper's own numbers.
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

VARIANT_NAMES = {
    "backbone_bce": "Backbone with BCE",
    "backbone_bce_scl": "Backbone with BCE + SCL",
    "mulcon_bce": "MulCon with BCE only",
    "mulcon_no_pretrain": "MulCon without pretraining",
    "mulcon": "MulCon",
}
PAPER_TABLE3_MAP = {"backbone_bce": 80.8, "backbone_bce_scl": 81.0, "mulcon_bce": 83.0,
                    "mulcon_no_pretrain": 81.1, "mulcon": 84.0}  # COCO-2014
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


def ablation_rows(metrics: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"variant": variant, "method": VARIANT_NAMES[variant], "mAP": values["mAP"], "CF1": values["CF1"],
             "OF1": values["OF1"], "paper_mAP_coco2014": PAPER_TABLE3_MAP[variant]}
            for variant, values in metrics.items()]


def ablation_markdown(rows: list[dict[str, Any]], dataset: str, split: str) -> str:
    lines = [f"# Table 3: ablation ({dataset}, {split} split, final models)", "",
             "| Method | mAP | CF1 | OF1 | paper mAP (COCO-2014) |", "|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['mAP']:.1f} | {r['CF1']:.1f} | {r['OF1']:.1f} | {r['paper_mAP_coco2014']:.1f} |"
              for r in rows]
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


def write_report(reports_root: str | Path, dataset: str) -> list[Path]:
    """Write ablation.md, ablation.csv and metrics.md into `reports_root`; return their paths."""
    reports_root = Path(reports_root)
    metrics = load_metrics(reports_root)
    rows = ablation_rows(metrics)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    split = metrics["mulcon"].get("split", "test")
    files = {"ablation.md": ablation_markdown(rows, dataset, split), "ablation.csv": buffer.getvalue(),
             "metrics.md": results_markdown(metrics["mulcon"], dataset)}
    for name, text in files.items():
        write_text(reports_root / name, text)
    return [reports_root / name for name in files]
