"""Evaluation: scores on a split, the metrics of REFERENCE.md, per-class AP and PR-curve data.

The numbers are those of the model file given (the final model of a run, or a checkpoint
selected on the validation split, which the model file then says); nothing here chooses a model
by looking at the test split. With `evaluate.calibrate`, per-class thresholds are chosen on the
validation split (each maximising its class's F1) and the threshold metrics at them are reported
beside, never instead of, those at `evaluate.threshold`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from mulcon.config import Config
from mulcon.data.dataset import load_classes
from mulcon.errors import CheckpointError, ConfigError
from mulcon.inference import eval_loader, load_model, predict_scores
from mulcon.io import atomic_path, write_json, write_text
from mulcon.metrics import average_precision, calibrate_thresholds, multilabel_metrics
from mulcon.runtime import resolve_device

logger = logging.getLogger(__name__)

PR_THRESHOLDS = np.linspace(0.0, 1.0, 101)
CALIBRATED_KEYS = ("CP", "CR", "CF1", "OP", "OR", "OF1")
THRESHOLDS_NAME = "thresholds.json"
# The headline of an evaluation, `summary.json`: the DVC metrics file of an evaluate stage (what
# `dvc metrics show` and `dvc exp show` list); the whole set stays in metrics.json, a plain file.
HEADLINE = ("mAP", "CF1", "OF1")


def pr_curve_rows(scores: np.ndarray, targets: np.ndarray, classes: list[str]) -> list[tuple]:
    """(class, threshold, precision, recall) at 101 thresholds, per class and micro-averaged ("all")."""
    positives = targets > 0.5
    kept = targets >= 0  # an ignored pair (-1) is neither a true nor a false positive
    actual = positives.sum(0)  # (L,)
    true_pos = np.empty((len(PR_THRESHOLDS), len(classes)), dtype=np.int64)
    pred_pos = np.empty_like(true_pos)
    for t, threshold in enumerate(PR_THRESHOLDS):  # a loop keeps memory at one (N, L) mask
        predicted = (scores >= threshold) & kept
        true_pos[t], pred_pos[t] = (predicted & positives).sum(0), predicted.sum(0)
    rows = []
    columns = [(name, true_pos[:, c], pred_pos[:, c], actual[c]) for c, name in enumerate(classes)]
    columns.append(("all", true_pos.sum(1), pred_pos.sum(1), actual.sum()))
    for name, tp, pp, pos in columns:
        precision = np.where(pp > 0, tp / np.maximum(pp, 1), 1.0)
        recall = tp / np.maximum(pos, 1)
        rows.extend((name, round(float(t), 2), round(float(p), 6), round(float(r), 6))
                    for t, p, r in zip(PR_THRESHOLDS, precision, recall))
    return rows


def _csv_text(header: list[str], rows: list) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def write_pr_plot(path: Path, rows: list[tuple]) -> None:
    """PR curves as a PNG: the micro-average in bold over each class in thin grey."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(5, 5), dpi=100)
    for name in dict.fromkeys(row[0] for row in rows):
        points = sorted((row[3], row[2]) for row in rows if row[0] == name)
        bold = name == "all"
        axes.plot(*zip(*points), color="C0" if bold else "0.75", linewidth=2.5 if bold else 0.7,
                  label="micro-average" if bold else None, zorder=3 if bold else 1)
    axes.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title="precision-recall")
    axes.legend(loc="lower left")
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", bbox_inches="tight")
    pyplot.close(figure)


def write_scores(path: Path, scores: np.ndarray, targets: np.ndarray) -> None:
    """Per-image scores (N, L) float32 and targets (N, L) int8 as written (1, 0, and -1 for an ignored
    pair), in the split's order: the input of the report's paired bootstrap over test images
    (mulcon.spread), which leaves ignored pairs out as `mulcon.metrics` does."""
    with atomic_path(path) as temporary, open(temporary, "wb") as file:
        np.savez_compressed(file, scores=scores.astype(np.float32), targets=np.asarray(targets).astype(np.int8))


def combined_history(run_dir: Path) -> list[dict[str, Any]]:
    """The per-epoch records of a variant's stages in order, numbered by a global epoch."""
    records: list[dict[str, Any]] = []
    for stage in ("pretrain", "finetune"):
        path = run_dir / stage / "history.json"
        if path.exists():
            records.extend({**record, "global_epoch": len(records) + 1} for record in json.loads(path.read_text()))
    return records


def write_reports(out_dir: str | Path, metrics: dict[str, Any], per_class_ap: np.ndarray, scores: np.ndarray,
                  targets: np.ndarray, classes: list[str], run_dir: Path | None = None) -> list[Path]:
    """Write the report files of an evaluation into `out_dir`, each atomically; return their paths.

    metrics.json, summary.json (HEADLINE), per_class_ap.csv, pr_curve.csv (micro-average),
    pr_curve_per_class.csv, pr_curve.png, scores.npz and, when `run_dir` holds per-stage histories,
    history.csv.
    """
    out_dir = Path(out_dir)
    ap_rows = [(name, int((targets[:, c] == 1).sum()), "" if np.isnan(ap) else round(float(ap), 4))
               for c, (name, ap) in enumerate(zip(classes, per_class_ap))]
    curves = pr_curve_rows(scores, targets, classes)
    write_text(out_dir / "per_class_ap.csv", _csv_text(["class", "positives", "ap"], ap_rows))
    write_text(out_dir / "pr_curve.csv", _csv_text(["threshold", "precision", "recall"],
                                                   [row[1:] for row in curves if row[0] == "all"]))
    write_text(out_dir / "pr_curve_per_class.csv", _csv_text(["class", "threshold", "precision", "recall"],
                                                             [row for row in curves if row[0] != "all"]))
    write_pr_plot(out_dir / "pr_curve.png", curves)
    write_scores(out_dir / "scores.npz", scores, targets)
    files = [out_dir / name for name in ("per_class_ap.csv", "pr_curve.csv", "pr_curve_per_class.csv", "pr_curve.png",
                                         "scores.npz")]
    history = combined_history(run_dir) if run_dir is not None else []
    if history:
        columns = ["global_epoch", "stage", "epoch", "lr", "classification", "contrastive", "total", "val_mAP", "val_CF1", "val_OF1"]
        rows = [[record.get(column, "") for column in columns] for record in history]
        write_text(out_dir / "history.csv", _csv_text(columns, rows))
        files.append(out_dir / "history.csv")
    write_json(out_dir / "summary.json", {key: metrics[key] for key in HEADLINE})
    write_json(out_dir / "metrics.json", metrics)
    return [out_dir / "metrics.json", out_dir / "summary.json", *files]


def evaluate_model(config: Config, model_path: str | Path, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Score the model at `model_path` on `config.evaluate.split` and write the reports.

    Returns:
        The metrics dict (percent) plus `split`, `num_images`, `variant` and `selected_on`.
    """
    device = resolve_device(config.train.device)
    model, state = load_model(model_path, device)
    loader = eval_loader(config, config.evaluate.split, config.evaluate.batch_size)
    classes = load_classes(config.data.prepared_dir)
    if len(classes) != len(state["classes"]):
        raise CheckpointError(f"{model_path}: model has {len(state['classes'])} labels, "
                              f"{config.data.prepared_dir} has {len(classes)}")
    scores, targets = predict_scores(model, loader, device, config.train.precision, progress="evaluate")
    metrics = multilabel_metrics(scores, targets, threshold=config.evaluate.threshold)
    thresholds = None
    if config.evaluate.calibrate:
        thresholds = validation_thresholds(config, model, device)
        calibrated = multilabel_metrics(scores, targets, threshold=thresholds)
        metrics.update({f"calibrated_{key}": calibrated[key] for key in CALIBRATED_KEYS})
    metrics = {key: round(value, 4) for key, value in metrics.items()}
    metrics.update(split=config.evaluate.split, num_images=int(len(scores)), variant=state.get("variant"),
                   selected_on=state.get("selected_on", "final"))
    if out_dir is not None:
        write_reports(out_dir, metrics, average_precision(scores, targets), scores, targets, classes,
                      run_dir=Path(model_path).parent)
        if thresholds is not None:
            write_json(Path(out_dir) / THRESHOLDS_NAME,
                       {"chosen_on": "val", "rule": "max F1 per class", "default": config.evaluate.threshold,
                        "model": str(model_path), "thresholds": dict(zip(classes, map(float, thresholds)))})
    return metrics


def validation_thresholds(config: Config, model, device) -> np.ndarray:
    """(L,) per-class thresholds maximising each class's F1 on the val split (never on test).

    Raises:
        ConfigError: the prepared data has no val images (data.val_fraction is 0).
    """
    loader = eval_loader(config, "val", config.evaluate.batch_size)
    if len(loader.dataset) == 0:
        raise ConfigError("evaluate.calibrate: needs a validation split, but the prepared val split is empty "
                          "(set data.val_fraction > 0 and prepare again)")
    scores, targets = predict_scores(model, loader, device, config.train.precision, progress="calibrate on val")
    return calibrate_thresholds(scores, targets, default=config.evaluate.threshold)


def format_table(metrics: dict[str, Any]) -> str:
    """The metrics as the paper's tables print them (mAP, CP, CR, CF1, OP, OR, OF1 and top-3)."""
    keys = ["mAP", "CP", "CR", "CF1", "OP", "OR", "OF1"]
    lines = ["| " + " | ".join(["", *keys]) + " |", "|" + "---|" * (len(keys) + 1),
             "| all | " + " | ".join(f"{metrics[k]:.1f}" for k in keys) + " |",
             "| top-3 | - | " + " | ".join(f"{metrics[k + '_top3']:.1f}" for k in keys[1:]) + " |"]
    if "calibrated_CF1" in metrics:  # thresholds chosen per class on val, reported on this split
        lines.append("| calibrated on val | - | " + " | ".join(f"{metrics['calibrated_' + k]:.1f}" for k in keys[1:]) + " |")
    return "\n".join(lines)
