"""The demo study: every variant's setting chosen on the validation split under one tuning budget,
then the chosen settings measured on test over three seeds (`python -m mulcon study`, `make study`).

Design: one factor at a time from the demo recipe (`make study`: docs/study/recipe.yaml, the
params.yaml the study was run from; the full grid of the factors below is 2 x 2 x 2 x 3 x 3 x 2 =
144 runs a variant, about 40 hours of the 2-core machine).
Each variant gets the same number of trials, one seed (train.seed) each:
- every variant: the learning rate of its last step x0.3 and x3, that step's backbone_lr_scale
  0.1, and the epoch budget x2 and x3 (the same 5:3 split: 10 + 6, 15 + 9) (step 2's `finetune.lr`
  and `finetune.backbone_lr_scale`; `pretrain.*` for the one-step BCE variants, whose only step it is);
- MulCon's variants: the authors' attention block (their LayerNorm and full softmax scale with it),
  the full softmax scale alone, LayerNorm alone;
- the Backbone variants, which have no attention block, the same number of trials on their
  learning rates instead: x0.1, x10 and backbone_lr_scale 0.3.

A trial is kept in `<out>/trials/<variant>/<trial>.json` with the config, code, libraries and data it
was made under (`mulcon.train.provenance`); a later run reuses it only when all four still match, so
the study resumes where it stopped, also on another machine that has the committed records. Each
test evaluation of a chosen setting is kept the same way in `<out>/test_runs/<variant>[/seed<k>]`.
The choice reads the trials' validation mAP alone (the model each trial saved); no test image is
read until every choice is made. The chosen settings then train under each seed of `seeds` and are
evaluated on test: `<out>/test.md` is Table 3 with mean ± std and paired intervals (`mulcon.report`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mulcon import checkpoint
from mulcon.analysis import attention_on_objects, class_attention_figure, label_attention_maps
from mulcon.config import VARIANTS, Config, load_config, to_dict
from mulcon.data.dataset import ManifestDataset
from mulcon.data.transforms import eval_transform
from mulcon.data.identity import data_identity
from mulcon.evaluate import evaluate_model
from mulcon.fingerprint import code_fingerprint
from mulcon.inference import load_model
from mulcon.io import write_json, write_text
from mulcon.report import VARIANT_NAMES, ablation_markdown, ablation_rows, csv_text
from mulcon.runtime import resolve_device
from mulcon.spread import mean_class_ap, seed_dir
from mulcon.train import provenance, run_training, stale_reason, training_splits
from mulcon.variants import plan_variant

logger = logging.getLogger(__name__)

BACKBONE_VARIANTS = ("backbone_bce", "backbone_bce_scl")
TEST_SEEDS = (0, 1, 2)
# What the test table and the per-class comparison read of an evaluation; kept under <out>/test_runs.
TEST_FILES = ("metrics.json", "per_class_ap.csv", "scores.npz")
EVALUATION_KEYS = ("split", "threshold", "calibrate")  # evaluate.* keys a test report depends on


@dataclass(frozen=True)
class Trial:
    name: str
    overrides: tuple[str, ...]


def design(variant: str, base: Config) -> list[Trial]:
    """The trials of `variant`, the demo recipe (`base`) first; every variant gets as many."""
    step = plan_variant(dataclasses.replace(base.train, variant=variant)).steps[-1].stage
    lr = getattr(base, step).lr
    pre, fine = base.train.pretrain_epochs, base.train.finetune_epochs

    def epochs(factor: int) -> Trial:
        return Trial(f"epochs x{factor}", (f"train.pretrain_epochs={pre * factor}", f"train.finetune_epochs={fine * factor}"))

    def rate(factor: float) -> Trial:
        return Trial(f"{step}.lr x{factor:g}", (f"{step}.lr={lr * factor:.6g}",))

    def backbone_scale(scale: float) -> Trial:
        return Trial(f"{step}.backbone_lr_scale {scale:g}", (f"{step}.backbone_lr_scale={scale:g}",))

    trials = [Trial("recipe", ()), rate(0.3), rate(3), backbone_scale(0.1)]
    if variant in BACKBONE_VARIANTS:
        trials += [rate(0.1), rate(10), backbone_scale(0.3)]
    else:
        trials += [Trial("authors' block", ("model.attention_block=authors", "model.layer_norm=true",
                                             "model.attention_scale=full")),
                   Trial("attention_scale full", ("model.attention_scale=full",)),
                   Trial("layer_norm", ("model.layer_norm=true",))]
    return trials + [epochs(2), epochs(3)]  # the costly ones last


def _slug(name: str) -> str:
    return "".join(character if character.isalnum() or character in "._-" else "_" for character in name).strip("_")


class Study:
    """Runs and records the trials of `params` under `out` (records, tables) and `work` (models)."""

    def __init__(self, params: str | Path, overrides: list[str], out: str | Path, work: str | Path):
        self.params, self.overrides, self.out, self.work = Path(params), list(overrides), Path(out), Path(work)
        self.base = load_config(self.params, self.overrides)

    def config(self, variant: str, trial: Trial, seed: int | None = None) -> Config:
        seed = self.base.train.seed if seed is None else seed
        return load_config(self.params, [*self.overrides, f"train.variant={variant}", *trial.overrides,
                                         f"train.seed={seed}", "train.seeds=[]", "evaluate.split=test"])

    def run_dir(self, variant: str, trial: Trial, seed: int) -> Path:
        return self.work / "runs" / variant / _slug(trial.name) / f"seed{seed}"

    def record_path(self, variant: str, trial: Trial) -> Path:
        return self.out / "trials" / variant / f"{_slug(trial.name)}.json"

    def _train(self, config: Config, variant: str, trial: Trial, seed: int) -> Path:
        folder = self.run_dir(variant, trial, seed)
        return run_training(config, out_dir=folder, checkpoint_dir=self.work / "checkpoints" / folder.relative_to(self.work / "runs"),
                            resume=True)

    def trial(self, variant: str, trial: Trial) -> dict[str, Any]:
        """The trial's record: reused when made under this config, code, libraries and data, else trained."""
        config, path = self.config(variant, trial), self.record_path(variant, trial)
        made_from = provenance(config)
        if path.exists():
            record = json.loads(path.read_text())
            reason = stale_reason(record, config, "finetune", made_from)
            if reason is None:
                return record
            logger.info("%s was made %s: trial %s/%s runs again", path, reason, variant, trial.name)
        started = time.perf_counter()
        saved = checkpoint.load(self._train(config, variant, trial, config.train.seed))
        history = [{key: value for key, value in entry.items() if key.startswith("val_") or key in ("stage", "epoch")}
                   for stage in plan_variant(config.train).steps
                   for entry in json.loads((self.run_dir(variant, trial, config.train.seed) / stage.stage / "history.json").read_text())]
        record = {"variant": variant, "trial": trial.name, "overrides": list(trial.overrides),
                  "val_mAP": saved["val"]["val_mAP"], "val_CF1": saved["val"].get("val_CF1"),
                  "val_OF1": saved["val"].get("val_OF1"), "val_history": history,
                  "minutes": round((time.perf_counter() - started) / 60, 2),
                  "config": to_dict(config), **made_from}
        write_json(path, record)
        logger.info("study: %s / %s: val mAP %.2f", variant, trial.name, record["val_mAP"])
        return record

    def select(self, variants=VARIANTS) -> dict[str, dict[str, Any]]:
        """Run (or reuse) every trial of `variants`, write the val grid and the choice; returns
        {variant: chosen record}. Reads the validation split only."""
        designs = {variant: design(variant, self.base) for variant in variants}
        records: dict[str, list[dict[str, Any]]] = {variant: [] for variant in variants}
        for position in range(max(map(len, designs.values()))):  # trial by trial across variants: a
            for variant in variants:                               # stopped study has a comparable grid
                records[variant].append(self.trial(variant, designs[variant][position]))
                self.write_grid(records, complete=False)
        chosen = choose(records)
        self.write_grid(records, complete=True)
        write_json(self.out / "chosen.json", {variant: {key: record[key] for key in ("trial", "overrides", "val_mAP")}
                                              for variant, record in chosen.items()})
        return chosen

    def write_grid(self, records: dict[str, list[dict[str, Any]]], complete: bool) -> None:
        """val_grid.md and val_grid.csv of the trials so far; the choices are marked once all are done."""
        done = {variant: found for variant, found in records.items() if found}
        note = "" if complete else "\n**Unfinished: trials of this study are still to run; nothing is chosen yet.**\n"
        write_text(self.out / "val_grid.md", val_grid_markdown(done, choose(done) if complete else {}) + note)
        write_text(self.out / "val_grid.csv", val_grid_csv(done))

    def recorded(self, variants=VARIANTS) -> dict[str, list[dict[str, Any]]]:
        """The trials recorded under the current config, code, libraries and data, in design order,
        stopping at each variant's first missing one; trains nothing."""
        found: dict[str, list[dict[str, Any]]] = {}
        for variant in variants:
            found[variant] = []
            for trial in design(variant, self.base):
                path, config = self.record_path(variant, trial), self.config(variant, trial)
                if not path.exists() or stale_reason(record := json.loads(path.read_text()), config, "finetune") is not None:
                    break
                found[variant].append(record)
        return found

    def test_provenance(self, config: Config) -> dict[str, dict[str, str]]:
        """What a test evaluation depends on besides its config: the training and evaluation code,
        the libraries, and the data of training and of the test split."""
        made = provenance(config)
        splits = (*training_splits(config), config.evaluate.split)
        return {**made, "code": {**made["code"], **code_fingerprint("evaluate")},
                "data": data_identity(config.data.prepared_dir, splits, config.data.cache_size)}

    def test_run(self, variant: str, trial: Trial, seed: int, main_seed: int) -> Path:
        """The folder of `variant`'s `trial` trained under `seed` and evaluated on test (TEST_FILES
        and record.json): reused when made under this config, code, libraries and data, else made."""
        config = self.config(variant, trial, seed)
        folder, made_from = seed_dir(self.out / "test_runs", variant, seed, main_seed), self.test_provenance(config)
        record_path = folder / "record.json"
        if record_path.exists() and all((folder / name).exists() for name in TEST_FILES):
            kept = json.loads(record_path.read_text())
            reason = stale_reason(kept, config, "finetune", made_from)
            if reason is None and any(kept["config"].get("evaluate", {}).get(key) != getattr(config.evaluate, key)
                                      for key in EVALUATION_KEYS):
                reason = "under another evaluate section"
            if reason is None:
                return folder
            logger.info("%s was made %s: %s/%s seed %d is tested again", record_path, reason, variant, trial.name, seed)
        record_path.unlink(missing_ok=True)  # the files below are only valid once the record is written
        scratch = seed_dir(self.work / "reports", variant, seed, main_seed)
        evaluate_model(config, self._train(config, variant, trial, seed), scratch)
        for name in TEST_FILES:
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(scratch / name, folder / name)
        write_json(record_path, {"variant": variant, "trial": trial.name, "seed": seed, "config": to_dict(config), **made_from})
        return folder

    def test(self, chosen: dict[str, dict[str, Any]], seeds=TEST_SEEDS) -> Path:
        """Train each chosen setting under `seeds`, evaluate on test, write test.md and test.csv."""
        for seed in seeds:  # seed by seed: a stopped study has every variant's first seeds
            for variant, record in chosen.items():
                self.test_run(variant, Trial(record["trial"], tuple(record["overrides"])), seed, seeds[0])
        rows = ablation_rows(self.out / "test_runs", list(seeds), variants=tuple(chosen))
        for row in rows:
            row["setting"] = chosen[row["variant"]]["trial"]
        table = ablation_markdown(rows, self.base.data.dataset, "test", list(seeds))
        settings = "\n".join(f"- {VARIANT_NAMES[variant]}: {record['trial']} ({', '.join(record['overrides']) or 'params.yaml'}), "
                             f"val mAP {record['val_mAP']:.1f}" for variant, record in chosen.items())
        write_text(self.out / "test.md", f"{table}\nSettings (chosen on val, seed {self.base.train.seed}):\n{settings}\n")
        write_text(self.out / "test.csv", csv_text(rows))
        if {"mulcon", "backbone_bce"} <= set(chosen):
            self.per_class(chosen["mulcon"], seeds)
        return self.out / "test.md"

    def per_class(self, record: dict[str, Any], seeds, worst: int = 3) -> None:
        """per_class.csv: each class's test AP of the chosen MulCon and Backbone with BCE (means over
        `seeds`), and how much of MulCon's attention (seed `seeds[0]`) falls on the class's objects;
        attention_worst.png: the maps of the `worst` classes of MulCon against the Backbone."""
        trial = Trial(record["trial"], tuple(record["overrides"]))
        config = self.config("mulcon", trial, seeds[0])
        dataset = ManifestDataset(config.data.prepared_dir, "test", eval_transform(config.data.image_size),
                                  image_size=config.data.cache_size)
        device = resolve_device(config.train.device)
        network = load_model(self._train(config, "mulcon", trial, seeds[0]), device)[0]  # trained if not kept
        maps = label_attention_maps(network, dataset, device)
        where = attention_on_objects(maps, object_boxes(config, dataset), len(dataset.classes))
        aps = {variant: mean_class_ap(self.out / "test_runs", variant, list(seeds)) for variant in ("mulcon", "backbone_bce")}
        rows = [{"class": name, "ap_mulcon": round(aps["mulcon"][name], 2), "ap_backbone_bce": round(aps["backbone_bce"][name], 2),
                 "gain": round(aps["mulcon"][name] - aps["backbone_bce"][name], 2),
                 "attention_on_object": round(where[index]["on_object"], 3), "uniform_on_object": round(where[index]["uniform"], 3),
                 "images": where[index]["images"]} for index, name in enumerate(dataset.classes)
                if name in aps["mulcon"] and name in aps["backbone_bce"]]
        rows.sort(key=lambda row: row["gain"])
        write_text(self.out / "per_class.csv", csv_text(rows))
        labels = [dataset.classes.index(row["class"]) for row in rows[:worst]]
        class_attention_figure(self.out / "attention_worst.png", maps, dataset, labels, dataset.classes)


def object_boxes(config: Config, dataset) -> list[list[tuple[int, tuple[float, float, float, float]]]]:
    """Per image of `dataset` (a test split in COCO format: the demo's, or COCO-2014's val2014), each
    object's (label, box as fractions of the image side), read from the raw annotation file."""
    annotations = json.loads((config.data.raw_dir / "annotations" / "instances_val2014.json").read_text())
    names = {category["id"]: category["name"] for category in annotations["categories"]}
    images = {image["id"]: image for image in annotations["images"]}
    label = {name: index for index, name in enumerate(dataset.classes)}
    by_file: dict[str, list] = {}
    for item in annotations["annotations"]:
        image = images[item["image_id"]]
        x, y, width, height = item["bbox"]
        box = (x / image["width"], y / image["height"], (x + width) / image["width"], (y + height) / image["height"])
        by_file.setdefault(image["file_name"], []).append((label[names[item["category_id"]]], box))
    return [by_file.get(Path(path).name, []) for path in dataset.paths]


def choose(records: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Each variant's trial of the highest validation mAP (the first listed on a tie: the recipe first).
    Reads `val_mAP` alone: a trial record holds no test metric."""
    return {variant: max(trials, key=lambda record: (record["val_mAP"], -trials.index(record)))
            for variant, trials in records.items()}


def val_grid_markdown(records: dict[str, list[dict[str, Any]]], chosen: dict[str, dict[str, Any]]) -> str:
    """One row per trial and variant: val mAP, val CF1/OF1, minutes; the chosen trial in bold."""
    lines = ["# The study's validation grid", "",
             "One seed a trial (train.seed 0); val: 80 images carved from train; the chosen trial of each variant "
             "(highest val mAP) in bold.", ""]
    for variant, trials in records.items():
        lines += [f"## {VARIANT_NAMES[variant]} (`{variant}`)", "", "| trial | overrides | val mAP | val CF1 | val OF1 | minutes |",
                  "|---|---|---|---|---|---|"]
        for record in trials:
            mark = "**" if record is chosen.get(variant) else ""
            lines.append(f"| {mark}{record['trial']}{mark} | {' '.join(record['overrides']) or '-'} | "
                         f"{mark}{record['val_mAP']:.1f}{mark} | {record['val_CF1'] or 0:.1f} | {record['val_OF1'] or 0:.1f} | "
                         f"{record['minutes']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def val_grid_csv(records: dict[str, list[dict[str, Any]]]) -> str:
    return csv_text([{"variant": variant, "trial": record["trial"], "overrides": " ".join(record["overrides"]),
                  "val_mAP": record["val_mAP"], "val_CF1": record["val_CF1"], "val_OF1": record["val_OF1"],
                  "minutes": record["minutes"]} for variant, trials in records.items() for record in trials])


def run_study(params: str | Path, overrides: list[str], out: str | Path, work: str | Path, *,
              variants=VARIANTS, seeds=TEST_SEEDS, phase: str = "all") -> dict[str, dict[str, Any]]:
    """Select (every trial, on val), then test (the chosen settings under `seeds`); with phase
    "select" the first alone; with "status" only the grid of the trials recorded so far.

    Returns:
        {variant: chosen trial record} ({} for "status").
    """
    study = Study(params, overrides, out, work)
    if phase == "status":
        found = study.recorded(variants)
        study.write_grid(found, complete=False)
        return {}
    chosen = study.select(variants)
    if phase == "all":
        study.test(chosen, seeds)
    return chosen
