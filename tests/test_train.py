"""Training: a two-epoch run of every Table 3 variant, exact resume after SIGKILL, a NaN loss
stopping the run with the last good checkpoint kept, and resuming onto a different label set."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image, ImageOps

import mulcon.train
from mulcon import checkpoint
from mulcon.config import VARIANTS, load_config
from mulcon.errors import CheckpointError, TrainingError
from mulcon.evaluate import evaluate_model
from mulcon.train import run_training
from mulcon.variants import Step
from tests.conftest import ROOT, reference_map


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_variant_trains_two_epochs_and_evaluates(variant, tiny_params, tmp_path):
    config = load_config(tiny_params, [f"train.variant={variant}"])
    records = []
    final = run_training(config, callback=records.append)
    assert final == tmp_path / "runs" / variant / "model.pt" and final.exists()
    assert sum(1 for r in records) == 2  # the same budget for every variant: 1 + 1 epochs
    assert all(torch.isfinite(torch.tensor(r["total"])) for r in records)
    contrastive = variant in ("backbone_bce_scl", "mulcon_no_pretrain", "mulcon_step2_bce", "mulcon")
    assert any("contrastive" in r for r in records) == contrastive
    assert all("val_mAP" in r for r in records)
    saved = checkpoint.load(final)
    assert saved["variant"] == variant and saved["selected_on"] == "final"
    metrics = evaluate_model(config, final, tmp_path / "reports")
    expected = reference_map(config, final)  # scikit-learn on the model's own test scores
    assert metrics["mAP"] == pytest.approx(expected, abs=1e-3) and metrics["num_images"] == 12
    assert (tmp_path / "reports" / "per_class_ap.csv").read_text().startswith("class,positives,ap\n")
    assert json.loads((tmp_path / "reports" / "metrics.json").read_text())["mAP"] == pytest.approx(expected, abs=1e-3)


def test_step2_without_l_con_takes_mulcons_path_with_the_contrastive_term_out_of_the_gradient(tiny_params, tmp_path):
    """mulcon_step2_bce: MulCon's pretrain to the bit, then the same two-view step 2 whose loss is BCE
    alone (L_con computed and reported, weight 0); so only L_con's gradient separates it from mulcon."""
    histories, models = {}, {}
    for variant in ("mulcon", "mulcon_step2_bce"):
        config = load_config(tiny_params, [f"train.variant={variant}", "loss.contrastive_weight=0.5"])
        histories[variant] = []
        models[variant] = run_training(config, callback=histories[variant].append)
    pretrained = {variant: checkpoint.load(tmp_path / "runs" / variant / "pretrain" / "model.pt")["model"]
                  for variant in models}
    assert all(torch.equal(pretrained["mulcon"][name], pretrained["mulcon_step2_bce"][name]) for name in pretrained["mulcon"])
    [with_l_con], [without] = ([r for r in histories[v] if r["stage"] == "finetune"] for v in models)
    assert with_l_con["total"] == pytest.approx(with_l_con["classification"] + 0.5 * with_l_con["contrastive"], rel=1e-5)
    assert without["contrastive"] > 0 and without["total"] == pytest.approx(without["classification"], rel=1e-6)
    final = {variant: checkpoint.load(path)["model"] for variant, path in models.items()}
    assert any(not torch.equal(final["mulcon"][name], final["mulcon_step2_bce"][name]) for name in final["mulcon"])


def _train_command(params, out_dir, *extra):
    return [sys.executable, "-m", "mulcon", "train", "--params", str(params), "--out-dir", str(out_dir),
            "--checkpoint-dir", f"{out_dir}-checkpoints",
            "-S", "train.pretrain_epochs=3", "-S", "train.finetune_epochs=2", *extra]


def test_sigkill_then_resume_reaches_the_uninterrupted_weights(tiny_params, tmp_path):
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(_train_command(tiny_params, tmp_path / "whole"), check=True, env=environment, cwd=tmp_path,
                   capture_output=True)
    process = subprocess.Popen(_train_command(tiny_params, tmp_path / "killed"), env=environment, cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    history = tmp_path / "killed" / "pretrain" / "history.json"
    deadline = time.monotonic() + 120
    while not history.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "killed" / "model.pt").exists()
    assert checkpoint.load(tmp_path / "killed-checkpoints" / "pretrain" / "checkpoint.pt")["epoch"] < 3
    subprocess.run(_train_command(tiny_params, tmp_path / "killed", "--resume"), check=True, env=environment,
                   cwd=tmp_path, capture_output=True)
    whole = checkpoint.load(tmp_path / "whole" / "model.pt")["model"]
    resumed = checkpoint.load(tmp_path / "killed" / "model.pt")["model"]
    assert whole.keys() == resumed.keys()
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_params, tmp_path, monkeypatch):
    config = load_config(tiny_params, ["train.variant=mulcon_bce", "train.pretrain_epochs=2"])
    calls = {"count": 0}
    real_bce = mulcon.train.bce_loss

    def bce_turning_nan(logits, targets, **options):
        calls["count"] += 1
        loss = real_bce(logits, targets, **options)
        return loss * float("nan") if calls["count"] > 2 else loss  # 2 batches per epoch: NaN in epoch 2

    monkeypatch.setattr(mulcon.train, "bce_loss", bce_turning_nan)
    with pytest.raises(TrainingError, match=r"non-finite loss in epoch 2 by batch 2"):
        run_training(config)
    kept = checkpoint.load(tmp_path / "checkpoints" / "mulcon_bce" / "pretrain" / "checkpoint.pt")
    assert kept["epoch"] == 1
    assert all(torch.isfinite(value).all() for value in kept["model"].values() if value.is_floating_point())
    assert not (tmp_path / "runs" / "mulcon_bce" / "model.pt").exists()


def test_resume_with_a_different_label_set_starts_over_and_a_mislabelled_checkpoint_is_refused(
        tiny_params, tiny_data, tmp_path, caplog):
    run_training(load_config(tiny_params, ["train.variant=mulcon_bce"]))
    (tmp_path / "runs" / "mulcon_bce" / "pretrain" / "model.pt").unlink()  # so resume reads checkpoint.pt
    other = tmp_path / "prepared" / "demo"
    shutil.copytree(tiny_data / "prepared" / "demo", other)
    classes = json.loads((other / "classes.json").read_text())
    (other / "classes.json").write_text(json.dumps(classes + ["extra"]))
    config = load_config(tiny_params, ["train.variant=mulcon_bce", f"data.prepared_root={tmp_path / 'prepared'}"])
    with caplog.at_level("WARNING", logger="mulcon.train"):
        run_training(config, resume=True)  # other classes: other data, so the stage starts over
    assert "checkpoint.pt was made on other data (classes.json changed): mulcon_bce/pretrain starts over" in caplog.text
    assert len(checkpoint.load(tmp_path / "runs" / "mulcon_bce" / "model.pt")["classes"]) == 13
    # A checkpoint that claims this data but holds another label set is refused, never loaded.
    state = checkpoint.load(tmp_path / "checkpoints" / "mulcon_bce" / "pretrain" / "checkpoint.pt")
    checkpoint.save(tmp_path / "checkpoints" / "mulcon_bce" / "pretrain" / "checkpoint.pt", {**state, "num_labels": 12})
    (tmp_path / "runs" / "mulcon_bce" / "pretrain" / "model.pt").unlink()
    with pytest.raises(CheckpointError, match=r"checkpoint.pt: made for variant mulcon_bce with 12 labels, "
                                              r"cannot resume mulcon_bce with 13 labels"):
        run_training(config, resume=True)


def test_finetune_stage_needs_the_pretrain_stage(tiny_params):
    config = load_config(tiny_params)
    with pytest.raises(CheckpointError, match=r"pretrain/model.pt: missing; run the earlier stage first"):
        run_training(config, stages=("finetune",))


def test_select_on_val_keeps_the_best_val_epoch(tiny_params, tmp_path):
    config = load_config(tiny_params, ["train.variant=backbone_bce", "train.pretrain_epochs=3",
                                       "train.select_on_val=true"])
    records = []
    final = run_training(config, callback=records.append)
    saved = checkpoint.load(final)
    scores = [record["val_mAP"] for record in records]
    assert saved["selected_on"] == "val"
    assert saved["epoch"] == scores.index(max(scores)) + 1
    last = checkpoint.load(tmp_path / "checkpoints" / "backbone_bce" / "pretrain" / "checkpoint.pt")["model"]
    same = all(torch.equal(saved["model"][name], last[name]) for name in last)
    assert same == (saved["epoch"] == len(records))  # a snapshot, not the live weights


def test_resume_under_another_config_starts_over(tiny_params, tmp_path, caplog):
    config = load_config(tiny_params, ["train.variant=mulcon_bce"])
    run_training(config)
    changed = load_config(tiny_params, ["train.variant=mulcon_bce", "pretrain.lr=0.005", "data.num_workers=1"])
    records = []
    run_training(changed, resume=True, callback=records.append)
    assert [r["epoch"] for r in records] == [1, 2]  # retrained: the old model was made with another lr
    records.clear()
    run_training(load_config(tiny_params, ["train.variant=mulcon_bce", "pretrain.lr=0.005"]), resume=True,
                 callback=records.append)
    assert records == []  # num_workers does not change results: nothing to redo
    assert checkpoint.load(tmp_path / "runs" / "mulcon_bce" / "model.pt")["config"]["pretrain"]["lr"] == 0.005


def _weights(path):
    return checkpoint.load(path)["model"]


def test_prepare_with_data_cache_builds_the_cache_that_training_reads_to_the_same_weights(tiny_params, tmp_path):
    prepared = tmp_path / "prepared"
    subprocess.run([sys.executable, "-m", "mulcon", "prepare", "--params", str(tiny_params),
                    "-S", f"data.prepared_root={prepared}", "-S", "data.cache=true"],
                   check=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True)
    assert (prepared / "demo" / "cache" / "32" / "cache.json").is_file()
    base = ["train.variant=mulcon", f"data.prepared_root={prepared}"]
    cached = load_config(tiny_params, [*base, "data.cache=true", f"train.out_root={tmp_path / 'cached'}"])
    raw = load_config(tiny_params, [*base, "data.cache=false", f"train.out_root={tmp_path / 'raw'}",
                                    f"train.checkpoint_root={tmp_path / 'raw-checkpoints'}"])
    step = Step("finetune", 1, "label")
    assert mulcon.train.train_loader(cached, step).dataset.dataset.cache is not None
    assert mulcon.train.train_loader(raw, step).dataset.dataset.cache is None
    first, second = _weights(run_training(cached)), _weights(run_training(raw))
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_train_compile_compiles_the_forward_and_keeps_the_weights(tiny_params, tmp_path, monkeypatch):
    compiled = []
    real = torch.compile

    def compile_eagerly(module, **options):  # TorchDynamo's tracing, without Inductor's C++ build
        compiled.append(options)
        return real(module, backend="eager", **options)

    monkeypatch.setattr(torch, "compile", compile_eagerly)
    base = ["train.variant=mulcon_bce"]
    eager = _weights(run_training(load_config(tiny_params, [*base, f"train.out_root={tmp_path / 'eager'}",
                                                            f"train.checkpoint_root={tmp_path / 'c1'}"])))
    assert compiled == []
    fast = _weights(run_training(load_config(tiny_params, [*base, "train.compile=true",
                                                           "train.compile_mode=max-autotune-no-cudagraphs"])))
    assert compiled == [{"mode": "max-autotune-no-cudagraphs"}]  # the eager backend ignores the mode
    assert fast.keys() == eager.keys()  # no "_orig_mod." prefixes in the saved weights
    assert all(torch.allclose(fast[name].float(), eager[name].float(), atol=1e-4) for name in eager)


def _drop_a_third_of_the_training_images(raw_dir) -> None:
    """A new data version: every third image of instances_train2014.json removed, with its annotations."""
    path = raw_dir / "annotations" / "instances_train2014.json"
    coco = json.loads(path.read_text())
    dropped = {image["id"] for image in coco["images"][::3]}
    coco["images"] = [image for image in coco["images"] if image["id"] not in dropped]
    coco["annotations"] = [note for note in coco["annotations"] if note["image_id"] not in dropped]
    path.write_text(json.dumps(coco))


def test_resume_on_new_data_starts_over_and_trains_on_it(tiny_params, tiny_data, tmp_path, caplog):
    from mulcon.data import prepare

    raw = tmp_path / "data" / "demo"
    shutil.copytree(tiny_data / "data" / "demo", raw)
    settings = ["train.variant=mulcon_bce", f"data.root={tmp_path / 'data'}", f"data.prepared_root={tmp_path / 'prepared'}"]
    config = load_config(tiny_params, settings)
    prepare("demo", raw, config.data.prepared_dir, val_fraction=config.data.val_fraction, seed=config.data.split_seed)
    first = checkpoint.load(run_training(config, resume=True))
    before = first["model"]
    records = []
    run_training(config, resume=True, callback=records.append)
    assert records == []  # the same data: nothing to redo

    _drop_a_third_of_the_training_images(raw)
    counts = prepare("demo", raw, config.data.prepared_dir, val_fraction=config.data.val_fraction,
                     seed=config.data.split_seed)["counts"]
    assert counts["train"] + counts["val"] == 16  # 24 images, a third dropped
    with caplog.at_level("INFO", logger="mulcon.train"):
        final = run_training(config, resume=True, callback=records.append)
    assert [(r["stage"], r["epoch"]) for r in records] == [("pretrain", 1), ("pretrain", 2)]  # its 1 + 1 epochs
    assert ("was made on other data (train images, train.csv, val images, ... changed): training the stage again"
            in caplog.text)
    after = checkpoint.load(final)
    assert after["data"]["train.csv"] != first["data"]["train.csv"]
    assert after["data"]["classes.json"] == first["data"]["classes.json"]
    assert any(not torch.equal(before[name], after["model"][name]) for name in before)
    loader_images = len(mulcon.train.train_loader(config, Step("pretrain", 1, None)).dataset.dataset)
    assert loader_images == counts["train"]

    # A photo replaced under its old name: the manifests stay as they were, the images do not.
    records.clear()
    name = (config.data.prepared_dir / "train.csv").read_text().splitlines()[1].split(",")[0]
    with Image.open(raw / name) as image:
        ImageOps.mirror(image).save(raw / name)
    prepare("demo", raw, config.data.prepared_dir, val_fraction=config.data.val_fraction, seed=config.data.split_seed)
    caplog.clear()
    with caplog.at_level("INFO", logger="mulcon.train"):
        run_training(config, resume=True, callback=records.append)
    assert len(records) == 2 and "was made on other data (train images changed)" in caplog.text


def test_resume_under_other_libraries_starts_over(tiny_params, tmp_path, caplog, monkeypatch):
    config = load_config(tiny_params, ["train.variant=mulcon_bce"])
    run_training(config)
    (tmp_path / "runs" / "mulcon_bce" / "pretrain" / "model.pt").unlink()  # so resume reads checkpoint.pt
    installed = mulcon.train.library_versions()
    monkeypatch.setattr(mulcon.train, "library_versions", lambda: {**installed, "torch": "9.9.9"})
    records = []
    with caplog.at_level("INFO", logger="mulcon.train"):
        run_training(config, resume=True, callback=records.append)
    assert [r["epoch"] for r in records] == [1, 2]
    assert (f"checkpoint.pt was made with other libraries (torch {installed['torch']} -> 9.9.9 changed): "
            "mulcon_bce/pretrain starts over") in caplog.text
    assert checkpoint.load(tmp_path / "runs" / "mulcon_bce" / "model.pt")["libraries"]["torch"] == "9.9.9"
