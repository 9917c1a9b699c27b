"""The benchmarks run and print their figures (at their tiny sizes; their speed is not tested here),
and their baselines and tools are right: the per-anchor loss, the peak-memory count, the budget."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from benchmarks import gpu
from benchmarks.bench_contrastive import contrastive_problem, per_anchor_label_contrastive_loss
from benchmarks.common import interleaved_times, peak_memory_bytes
from mulcon.losses import label_contrastive_loss
from tests.conftest import ROOT


def test_run_all_quick_prints_every_figure(tmp_path):
    out = tmp_path / "results.json"
    completed = subprocess.run([sys.executable, "-m", "benchmarks.run_all", "--quick", "--out", str(out)], cwd=ROOT,
                               capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    printed = completed.stdout
    for title in ("Benchmark 1: training step", "Benchmark 2: metrics", "Benchmark 3: label contrastive loss",
                  "Benchmark 4: input pipeline", "Benchmark 5: resnet18 at 32 px", "Summary"):
        assert title in printed
    for figure in ("MulCon step / Baseline step:", "multilabel_metrics speed-up:", "|loss - per-anchor loss|",
                   "cache / raw JPEG:", "GFLOP per trained image:", "not judged"):
        assert figure in printed
    results = {result["benchmark"]: result for result in json.loads(out.read_text())["results"]}
    assert sorted(results) == ["contrastive", "gpu", "input", "metrics", "train_step"]
    assert all("error" not in result for result in results.values())
    assert results["train_step"]["cases"]["mulcon"]["ms_per_step"] > 0
    assert results["metrics"]["max_ap_difference"] < 1e-9
    assert results["input"]["cases"]["cache"]["images_per_second"] > 0
    statuses = [row["status"] for row in results["gpu"]["rows"] if row["model"] != "decode_jpeg on GPU + resize"]
    assert statuses == ["ok"] * 18  # 8 eager, 4 end-to-end, 4 loader and 2 compiled rows
    nvjpeg = [row for row in results["gpu"]["rows"] if row["model"] == "decode_jpeg on GPU + resize"]
    assert [row["status"] for row in nvjpeg] == (["ok"] if torch.cuda.is_available() else ["skipped: needs CUDA"])
    assert sorted(results["gpu"]["end_to_end_over_synthetic"]) == [
        "step 1, augment cpu", "step 1, augment cuda", "step 2, augment cpu", "step 2, augment cuda"]


def test_gpu_benchmark_end_to_end_rows_run_in_the_smoke_size(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    result = gpu.main(["--tiny", "--sections", "e2e", "--out", str(out)])
    rows = result["rows"]
    assert [(row["stage"], row["augment_device"], row["status"]) for row in rows] == [
        ("step 1", "cpu", "ok"), ("step 1", "cuda", "ok"), ("step 2", "cpu", "ok"), ("step 2", "cuda", "ok")]
    for row in rows:
        assert row["timed_batches"] == 2 and row["images_per_second"] > 0 and row["cpu_ms_per_image"] > 0
        assert row["rows_per_second"] == pytest.approx(row["images_per_second"] * (2 if row["stage"] == "step 2" else 1))
        if torch.cuda.is_available():  # CUDA events time the device; the GPU's peak gives the MFU
            assert 0 < row["gpu_busy_fraction"] <= 1 and row["mfu"] > 0
        else:  # CPU: no events, no peak
            assert row["gpu_busy_fraction"] is None and row["mfu"] is None
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(rows))
    assert "End to end from the image cache" in capsys.readouterr().out


def test_gpu_benchmark_names_its_results_file_after_the_device(monkeypatch):
    assert gpu.device_slug(torch.device("cpu")) == "cpu"
    for name, slug in (("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"), ("NVIDIA L4", "l4")):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert gpu.device_slug(torch.device("cuda")) == slug


def test_gpu_benchmark_budget_skips_rows_and_says_so(capsys):
    result = gpu.main(["--tiny", "--budget-s", "0", "--no-compile"])
    assert all(row["status"].startswith("skipped:") for row in result["rows"])
    printed = capsys.readouterr().out
    assert "skipped: 0 s of the budget left" in printed and "not judged on this run" in printed


def test_per_anchor_reference_matches_the_vectorised_loss():
    projections, targets = contrastive_problem(6, 9, 8, 0.3, torch.device("cpu"), seed=4)
    projections = projections.double().detach().requires_grad_()
    reference = per_anchor_label_contrastive_loss(projections, targets, 0.2)
    (expected_gradient,) = torch.autograd.grad(reference, projections)
    loss = label_contrastive_loss(projections, targets, 0.2)
    (gradient,) = torch.autograd.grad(loss, projections)
    assert torch.allclose(loss, reference, atol=1e-12)
    assert torch.allclose(gradient, expected_gradient, atol=1e-12)


def test_peak_memory_counts_what_is_alive_at_once():
    def two_of_four_megabytes():
        first = torch.ones(1_000_000)  # 4 MB
        second = first * 2  # 4 MB more
        del first
        return second.sum()

    assert 8_000_000 <= peak_memory_bytes(two_of_four_megabytes, torch.device("cpu")) < 8_100_000


def test_interleaved_times_rotate_the_order_and_skip_the_warmup():
    calls = []
    times = interleaved_times({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=2, warmup=1)
    assert calls == ["a", "b", "b", "a", "a", "b"]
    assert [len(values) for values in times.values()] == [2, 2]


@pytest.mark.parametrize("name, peaks", [("NVIDIA H100 80GB HBM3", (989.4, 494.7)),
                                         ("NVIDIA H100 PCIe", (756.0, 378.0))])
def test_peak_flops_table_knows_the_h100s(name, peaks, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    options = gpu.options_for([])
    assert gpu.peak_tflops(torch.device("cuda"), options) == peaks
