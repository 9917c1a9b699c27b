"""The demo study (`python -m mulcon study`), shrunk: every variant gets the same trial budget, the
choice reads validation metrics alone (no test image exists while it is made), a rerun reuses every
trial made under the same config, code and data, and the chosen settings are tested over seeds."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

import mulcon.study
from mulcon.analysis import attention_on_objects
from mulcon.config import VARIANTS, load_config
from mulcon.study import Study, Trial, choose, design, run_study
from mulcon.train import run_training
from tests.conftest import ROOT


def test_every_variant_gets_the_same_number_of_trials_and_the_backbones_their_learning_rates():
    base = load_config(ROOT / "docs" / "study" / "recipe.yaml", [])  # the study's base recipe
    trials = {variant: design(variant, base) for variant in VARIANTS}
    assert len({len(found) for found in trials.values()}) == 1
    assert all(found[0] == Trial("recipe", ()) for found in trials.values())
    overrides = {variant: {item for trial in found for item in trial.overrides} for variant, found in trials.items()}
    assert "pretrain.lr=0.003" in overrides["backbone_bce"] and "pretrain.lr=0.01" in overrides["backbone_bce"]
    assert "finetune.lr=0.003" in overrides["mulcon"] and "model.attention_block=authors" in overrides["mulcon"]
    assert not any(item.startswith("model.") for item in overrides["backbone_bce_scl"])  # no attention block
    assert {"train.pretrain_epochs=15", "train.finetune_epochs=9"} <= overrides["mulcon_step2_bce"]  # 24 epochs, 5:3


def test_the_choice_is_the_best_validation_map_the_recipe_first_on_a_tie():
    records = {"mulcon": [{"trial": "recipe", "val_mAP": 70.0}, {"trial": "a", "val_mAP": 72.5},
                          {"trial": "b", "val_mAP": 72.5}],
               "backbone_bce": [{"trial": "recipe", "val_mAP": 80.0}, {"trial": "a", "val_mAP": 80.0}]}
    chosen = choose(records)
    assert chosen["mulcon"]["trial"] == "a" and chosen["backbone_bce"]["trial"] == "recipe"


def test_the_study_chooses_on_val_without_a_test_split_reuses_its_trials_and_tests_the_choice(
        tiny_params, tiny_data, tmp_path, monkeypatch):
    # Two variants and three of their trials keep the test quick; the code path is the whole study's.
    monkeypatch.setattr(mulcon.study, "design", lambda variant, base: design(variant, base)[:2] + design(variant, base)[-2:-1])
    variants = ("backbone_bce", "mulcon")
    prepared = tiny_data / "prepared" / "demo"
    hidden = tmp_path / "hidden-test.csv"
    shutil.move(prepared / "test.csv", hidden)  # selection must not need (or read) a test image
    try:
        chosen = run_study(tiny_params, [], tmp_path / "out", tmp_path / "work", variants=variants, phase="select")
    finally:
        shutil.move(hidden, prepared / "test.csv")
    records = {variant: [json.loads(path.read_text()) for path in sorted((tmp_path / "out" / "trials" / variant).glob("*.json"))]
               for variant in variants}
    assert all(len(found) == 3 for found in records.values())
    for variant, found in records.items():
        assert chosen[variant]["val_mAP"] == max(record["val_mAP"] for record in found)
        assert not any(key.startswith("test") for record in found for key in record)
        for record in found:  # the recorded number is the saved model's val mAP
            assert record["val_mAP"] == pytest.approx(record["val_history"][-1]["val_mAP"])
    assert json.loads((tmp_path / "out" / "chosen.json").read_text())["mulcon"]["trial"] == chosen["mulcon"]["trial"]
    grid = (tmp_path / "out" / "val_grid.md").read_text()
    assert f"**{chosen['mulcon']['trial']}**" in grid and "epochs x2" in grid

    status = run_study(tiny_params, [], tmp_path / "out", tmp_path / "work", variants=variants, phase="status")
    assert status == {} and "Unfinished" in (tmp_path / "out" / "val_grid.md").read_text()

    def no_training(*args, **kwargs):
        raise AssertionError("a recorded trial was trained again")
    with monkeypatch.context() as patched:
        patched.setattr(mulcon.study, "run_training", no_training)
        shutil.rmtree(tmp_path / "work")  # the records alone suffice (a fresh clone has only them)
        assert run_study(tiny_params, [], tmp_path / "out", tmp_path / "work", variants=variants, phase="select") == chosen
    # Another config makes the records stale: trained again.
    study = Study(tiny_params, ["loss.temperature=0.5"], tmp_path / "out", tmp_path / "work")
    [again] = [study.trial("backbone_bce", design("backbone_bce", study.base)[0])]
    assert again["config"]["loss"]["temperature"] == 0.5

    Study(tiny_params, [], tmp_path / "out", tmp_path / "work").test(chosen, seeds=(0, 1))
    table = (tmp_path / "out" / "test.md").read_text()
    assert "seeds 0, 1: mean ± std" in table and "| MulCon |" in table and "Backbone with BCE" in table
    assert chosen["backbone_bce"]["trial"] in table
    for variant in variants:
        for folder in ("", "seed1"):
            metrics = json.loads((tmp_path / "work" / "reports" / variant / folder / "metrics.json").read_text())
            assert metrics["split"] == "test" and metrics["num_images"] == 12
    # Where the chosen MulCon loses per class, beside where its attention falls.
    rows = list(csv.DictReader(open(tmp_path / "out" / "per_class.csv")))
    aps = {variant: {row["class"]: float(row["ap"]) for row in csv.DictReader(open(tmp_path / "work" / "reports" / variant
                                                                                    / "per_class_ap.csv"))}
           for variant in variants}
    seed1 = {variant: {row["class"]: float(row["ap"]) for row in csv.DictReader(open(tmp_path / "work" / "reports" / variant
                                                                                     / "seed1" / "per_class_ap.csv"))}
             for variant in variants}
    first = rows[0]
    expected = {variant: (aps[variant][first["class"]] + seed1[variant][first["class"]]) / 2 for variant in variants}
    assert float(first["gain"]) == pytest.approx(expected["mulcon"] - expected["backbone_bce"], abs=0.01)
    assert [float(row["gain"]) for row in rows] == sorted(float(row["gain"]) for row in rows)
    assert all(0 <= float(row["attention_on_object"]) <= 1 and 0 < float(row["uniform_on_object"]) <= 1 for row in rows)
    assert (tmp_path / "out" / "attention_worst.png").stat().st_size > 1000

    # The test evaluations are kept with the records: a fresh clone's rerun reuses them, training only
    # the seed-0 MulCon model whose attention per_class reads; another config tests again.
    for variant in variants:
        for folder in ("", "seed1"):
            kept = tmp_path / "out" / "test_runs" / variant / folder
            assert json.loads((kept / "record.json").read_text())["seed"] == (1 if folder else 0)
            assert (kept / "metrics.json").read_bytes() == (tmp_path / "work" / "reports" / variant / folder / "metrics.json").read_bytes()
    trained = []

    def counted(config, **kwargs):
        trained.append((config.train.variant, config.train.seed))
        return run_training(config, **kwargs)

    def no_evaluation(*args, **kwargs):
        raise AssertionError("a kept test evaluation was made again")
    with monkeypatch.context() as patched:
        patched.setattr(mulcon.study, "run_training", counted)
        patched.setattr(mulcon.study, "evaluate_model", no_evaluation)
        shutil.rmtree(tmp_path / "work")
        Study(tiny_params, [], tmp_path / "out", tmp_path / "work").test(chosen, seeds=(0, 1))
    assert (tmp_path / "out" / "test.md").read_text() == table and trained == [("mulcon", 0)]
    study = Study(tiny_params, ["evaluate.threshold=0.4"], tmp_path / "out", tmp_path / "work")
    with pytest.raises(AssertionError, match="made again"), monkeypatch.context() as patched:
        patched.setattr(mulcon.study, "evaluate_model", no_evaluation)
        study.test_run("backbone_bce", Trial(chosen["backbone_bce"]["trial"], tuple(chosen["backbone_bce"]["overrides"])), 0, 0)


def test_attention_on_objects_counts_the_mass_on_the_tokens_a_box_covers():
    maps = np.zeros((2, 2, 3, 3), np.float32)
    maps[0, 0] = 1 / 9  # uniform
    maps[1, 1, 0, 0] = 1.0  # all on the top-left token
    boxes = [[(0, (0.0, 0.0, 0.3, 0.3))],  # image 0: label 0 in the top-left token
             [(1, (0.0, 0.0, 0.5, 0.2)), (1, (0.9, 0.9, 1.0, 1.0))]]  # image 1: label 1, two boxes, three tokens
    found = attention_on_objects(maps, boxes, num_labels=2)
    assert found[0] == pytest.approx({"on_object": 1 / 9, "uniform": 1 / 9, "images": 1})
    assert found[1] == pytest.approx({"on_object": 1.0, "uniform": 3 / 9, "images": 1})


def test_a_kept_test_evaluation_is_reused_only_under_the_same_config_evaluation_code_and_data(tiny_params, tmp_path, monkeypatch):
    made = []

    def fake_evaluation(config, model, out_dir):
        made.append(config.evaluate.threshold)
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in mulcon.study.TEST_FILES:
            (out_dir / name).write_text(str(len(made)))
    monkeypatch.setattr(mulcon.study, "evaluate_model", fake_evaluation)
    monkeypatch.setattr(Study, "_train", lambda self, config, variant, trial, seed: tmp_path / "model.pt")
    trial = Trial("recipe", ())

    def run(*overrides):
        return Study(tiny_params, list(overrides), tmp_path / "out", tmp_path / "work").test_run("mulcon", trial, 1, 0)
    folder = run()
    assert folder == tmp_path / "out" / "test_runs" / "mulcon" / "seed1" and made == [0.5]
    assert run() == folder and made == [0.5]  # kept
    run("evaluate.threshold=0.4")  # the threshold changes CF1/OF1, though not the training
    run("loss.temperature=0.5")
    assert made == [0.5, 0.4, 0.5] and (folder / "metrics.json").read_text() == "3"
    record = json.loads((folder / "record.json").read_text())
    assert "mulcon/evaluate.py" in record["code"]  # the evaluation code is recorded too
    record["code"]["mulcon/evaluate.py"] = "edited"
    (folder / "record.json").write_text(json.dumps(record))
    run("loss.temperature=0.5")
    assert len(made) == 4  # other evaluation code: made again
    (folder / "scores.npz").unlink()
    run("loss.temperature=0.5")
    assert len(made) == 5  # a kept file missing: made again
