"""The real `dvc repro` and `dvc exp run` on a shrunk copy of the repository (tiny demo, one epoch per
step, tracking off), up to the `evaluate` stage:

- a rerun never reuses a result made under other code: after a result-changing edit of the training
  code, `dvc repro` trains again (it does not resume the old checkpoint) and the model differs; a
  comment in a file outside the training stages' imports reruns nothing; a forced rerun on the same
  code resumes the finished checkpoint and rewrites the stage's history file;
- metrics are kept with every commit and experiment: two `dvc exp run -S ...` each carry their own
  mAP in `dvc exp show --json`, and `dvc metrics diff` against HEAD works after a commit.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
import yaml

from mulcon import checkpoint
from tests.conftest import dvc, make_repo

METRICS = "reports/mulcon/summary.json"  # the evaluate stage's DVC metrics file


def git(repo, environment, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, env=environment, check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def committed(tmp_path_factory):
    """A shrunk repository whose `dvc repro evaluate` result (dvc.lock, metrics) is committed."""
    repo, environment = make_repo(tmp_path_factory.mktemp("exp"), ["tracking.enabled=false"])
    # Shrunk to the stages up to `evaluate`: the copied lock names outputs of the full-size run,
    # which are not in this cache, and experiments check the whole pipeline out.
    (repo / "dvc.lock").unlink()
    pipeline = yaml.safe_load((repo / "dvc.yaml").read_text())
    pipeline["stages"] = {name: pipeline["stages"][name] for name in ("prepare", "pretrain", "finetune", "evaluate")}
    pipeline["plots"] = [plot for plot in pipeline["plots"] if "reports/mulcon/" in json.dumps(plot)]
    (repo / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    dvc(repo, environment, "repro", "evaluate")
    git(repo, environment, "add", "-A")
    git(repo, environment, "commit", "-qm", "measured run")
    return repo, environment


def _weights(repo) -> dict[str, torch.Tensor]:
    return checkpoint.load(repo / "runs" / "mulcon" / "model.pt")["model"]


def test_a_code_change_retrains_and_a_comment_elsewhere_reruns_nothing(committed):
    repo, environment = committed
    before = _weights(repo)
    history = repo / "runs" / "mulcon" / "finetune" / "history.json"
    recorded = json.loads(history.read_text())

    forced = dvc(repo, environment, "repro", "--force", "--single-item", "finetune")
    assert "resuming mulcon/finetune from epoch 1" in forced.stdout + forced.stderr
    assert json.loads(history.read_text()) == recorded  # cleared by DVC, rewritten from the checkpoint
    assert all(torch.equal(before[name], value) for name, value in _weights(repo).items())

    report = repo / "mulcon" / "report.py"
    report.write_text(report.read_text() + "\n# a comment outside the training code\n")
    assert "Data and pipelines are up to date" in dvc(repo, environment, "status", "pretrain", "finetune").stdout

    losses = repo / "mulcon" / "losses.py"  # a result-changing edit: the contrastive loss doubled
    losses.write_text(losses.read_text() + "\n\n_single = label_contrastive_loss\n\n\n"
                      "def label_contrastive_loss(*args, **kwargs):\n    return 2 * _single(*args, **kwargs)\n")
    rerun = dvc(repo, environment, "repro", "finetune")
    output = rerun.stdout + rerun.stderr
    assert "resuming mulcon/finetune" not in output and "resuming mulcon/pretrain" not in output
    assert "was made under other code (mulcon/losses.py changed): mulcon/finetune starts over" in output
    assert any(not torch.equal(before[name], value) for name, value in _weights(repo).items())

    git(repo, environment, "checkout", "--", ".")  # back to the committed code and dvc.lock
    dvc(repo, environment, "checkout", "--force", "--with-deps", "evaluate")


def test_experiments_keep_their_metrics_and_metrics_diff_works(committed):
    repo, environment = committed
    for name, lr in (("lr-high", "0.05"), ("lr-low", "0.002")):
        dvc(repo, environment, "exp", "run", "evaluate", "-n", name, "-S", f"finetune.lr={lr}")
    shown = json.loads(dvc(repo, environment, "exp", "show", "--json").stdout)
    rows = {}
    for baseline in shown:
        for entry in [baseline, *[run for branch in baseline.get("experiments") or [] for run in branch["revs"]]]:
            data = entry.get("data") or {}
            name = entry.get("name") or entry.get("rev")
            metrics = data.get("metrics", {}).get(METRICS, {}).get("data", {})
            lr = data.get("params", {}).get("params.yaml", {}).get("data", {}).get("finetune", {}).get("lr")
            rows[name] = (lr, metrics.get("mAP"))
    assert rows["lr-high"][0] == 0.05 and rows["lr-low"][0] == 0.002
    assert all(isinstance(rows[name][1], float) for name in ("lr-high", "lr-low"))
    assert rows["lr-high"][1] != rows["lr-low"][1]
    baseline_map = [value for name, value in rows.items() if name not in ("lr-high", "lr-low")]
    assert any(isinstance(mean_ap, float) for _, mean_ap in baseline_map), rows  # main keeps its metrics too

    dvc(repo, environment, "exp", "apply", "lr-high")
    diff = dvc(repo, environment, "metrics", "diff", "--json").stdout
    assert "failed to load" not in diff
    changes = json.loads(diff)[METRICS]["mAP"]
    assert changes["new"] == rows["lr-high"][1] and isinstance(changes["old"], float)
