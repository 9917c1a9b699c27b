"""The CLI as a user runs it: --help on every verb, and bad input giving one clear line, exit 2,
and no partial output."""

import json
import os
import subprocess
import sys

import pytest

from mulcon.cli import COMMANDS, main
from tests.conftest import ROOT


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "mulcon", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)


@pytest.mark.parametrize("verb", sorted(COMMANDS))
def test_help_on_every_verb(verb, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([verb, "--help"])
    assert exit_info.value.code == 0
    assert "--params" in capsys.readouterr().out


@pytest.mark.parametrize("override, message", [
    ("train.epochs=3", "unknown key train.epochs"),
    ("train.variant=mulcon_v2", "train.variant: 'mulcon_v2' is not one of backbone_bce, backbone_bce_scl"),
    ("model.backbone=resnet34", "model.backbone: 'resnet34' is not one of resnet18, resnet50, resnet101"),
    ("train.pretrain_epochs=many", "train.pretrain_epochs: expected int, got str 'many'"),
])
def test_bad_param_exits_2_naming_the_key(override, message, tiny_params, tmp_path):
    result = run_cli("train", "--params", str(tiny_params), "-S", override, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr and "params.yaml" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_prepare_without_data_says_what_to_put_where(tmp_path):
    result = run_cli("prepare", "--params", str(ROOT / "params.yaml"), "-S", "data.dataset=coco2014",
                     "-S", f"data.root={tmp_path / 'data'}", "-S", f"data.prepared_root={tmp_path / 'prepared'}",
                     cwd=tmp_path)
    assert result.returncode == 2
    assert "data/coco2014" in result.stderr and "annotations/, train2014/ and val2014/" in result.stderr
    assert not (tmp_path / "prepared").exists()


def test_prepare_names_a_malformed_annotation_file_and_line(tiny_data, tmp_path):
    import shutil

    raw = tmp_path / "data" / "demo"
    shutil.copytree(tiny_data / "data" / "demo", raw)
    annotation = raw / "annotations" / "instances_val2014.json"
    annotation.write_text('{"images": [],\n "annotations": [\n')
    result = run_cli("prepare", "--params", str(ROOT / "params.yaml"), "-S", f"data.root={tmp_path / 'data'}",
                     "-S", f"data.prepared_root={tmp_path / 'prepared'}", cwd=tmp_path)
    assert result.returncode == 2
    assert "instances_val2014.json" in result.stderr and "line 3" in result.stderr
    assert not (tmp_path / "prepared" / "demo").exists()


def test_train_then_evaluate_prints_the_metrics_table(tiny_params, tmp_path):
    result = run_cli("train", "--params", str(tiny_params), "-S", "train.variant=mulcon_bce", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    result = run_cli("evaluate", "--params", str(tiny_params), "-S", "train.variant=mulcon_bce", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "| all |" in result.stdout and "mAP" in result.stdout
    metrics = json.loads((tmp_path / "reports" / "mulcon_bce" / "metrics.json").read_text())
    assert f"{metrics['mAP']:.1f}" in result.stdout


def test_evaluate_a_missing_model_is_a_clear_error(tiny_params, tmp_path):
    result = run_cli("evaluate", "--params", str(tiny_params), "--model", str(tmp_path / "nope.pt"), cwd=tmp_path)
    assert result.returncode == 2
    assert "nope.pt: no such checkpoint" in result.stderr
