"""Data-parallel training on CPU: two gloo processes with half a batch each give the loss and the
gradients of one process on the whole batch, the sampler's shards make up the single-process
batches, and `torchrun -m mulcon train` trains with rank 0 alone writing files and logging."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
import torch.multiprocessing
from torch import nn

from mulcon import distributed
from mulcon.config import Config
from mulcon.data.sampling import EpochSampler
from mulcon.errors import ConfigError
from mulcon.model import ModelOutput
from mulcon.train import Objective
from tests.conftest import BIN, ROOT, free_port

WORLD_SIZE, ROWS, FEATURES, LABELS = 2, 8, 6, 4


class TinyNetwork(nn.Module):
    """Label-level embeddings (B, L, D) from a linear map, one classifier per label and a projector:
    MulCon's heads without the backbone, and without BatchNorm, whose per-process statistics gloo
    cannot synchronise (the CUDA path uses SyncBatchNorm)."""

    def __init__(self, label_level: bool, dim: int = 5, projection_dim: int = 3):
        super().__init__()
        self.label_level, self.dim = label_level, dim
        self.embed = nn.Linear(FEATURES, LABELS * dim)
        self.classifier_weight = nn.Parameter(torch.randn(LABELS, dim))
        self.projector = nn.Linear(dim if label_level else LABELS * dim, projection_dim)

    def forward(self, features: torch.Tensor, need_projections: bool = True) -> ModelOutput:
        embeddings = torch.tanh(self.embed(features)).view(len(features), LABELS, self.dim)  # (B, L, D)
        logits = (embeddings * self.classifier_weight).sum(-1)  # (B, L)
        pooled = embeddings if self.label_level else embeddings.flatten(1)
        return ModelOutput(logits, self.projector(pooled) if need_projections else None)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(ROWS, FEATURES, generator=generator)
    targets = (torch.rand(ROWS, LABELS, generator=generator) < 0.5).float()
    targets[:, 0] = 1  # every row shares label 0: each anchor has positives in both halves
    return features, targets


def loss_and_gradients(contrastive: str, features: torch.Tensor, targets: torch.Tensor, wrap: bool):
    torch.manual_seed(0)
    model = TinyNetwork(label_level=contrastive == "label")
    network = distributed.wrap(model, torch.device("cpu")) if wrap else model
    terms = Objective(Config(), contrastive)(network(features), targets)
    terms["total"].backward()
    gradients = {name: parameter.grad.clone() for name, parameter in model.named_parameters()}
    return {name: value.detach() for name, value in terms.items()}, gradients


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    features, targets = batch()
    share = slice(rank * ROWS // WORLD_SIZE, (rank + 1) * ROWS // WORLD_SIZE)
    with distributed.process_group(torch.device("cpu")):
        results = {contrastive: loss_and_gradients(contrastive, features[share], targets[share], wrap=True)
                   for contrastive in ("label", "image")}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def test_two_processes_give_the_loss_and_gradients_of_one_process_on_the_whole_batch(tmp_path):
    torch.multiprocessing.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]
    features, targets = batch()
    for contrastive in ("label", "image"):
        terms, gradients = loss_and_gradients(contrastive, features, targets, wrap=False)
        for rank in ranks:
            rank_terms, rank_gradients = rank[contrastive]
            # Every process computes the contrastive loss over the global batch ...
            torch.testing.assert_close(rank_terms["contrastive"], terms["contrastive"], atol=1e-6, rtol=1e-5)
            # ... and, after DDP averages them, holds the gradients of one process on the whole batch.
            for name, gradient in gradients.items():
                torch.testing.assert_close(rank_gradients[name], gradient, atol=1e-6, rtol=1e-5, msg=name)
        # BCE is a mean over each process's rows: their average is the mean over the batch.
        bce = sum(rank[contrastive][0]["classification"] for rank in ranks) / WORLD_SIZE
        torch.testing.assert_close(bce, terms["classification"], atol=1e-6, rtol=1e-5)


def test_rank_shards_make_up_the_single_process_batches():
    length, batch_size = 37, 8
    single = list(EpochSampler(length, 5, batch_size=batch_size, drop_last=True))
    shards = [list(EpochSampler(length, 5, batch_size=batch_size // WORLD_SIZE, drop_last=True, rank=rank,
                                world_size=WORLD_SIZE)) for rank in range(WORLD_SIZE)]
    local = batch_size // WORLD_SIZE
    assert len(shards[0]) == len(shards[1]) == len(single) // WORLD_SIZE
    for step in range(len(single) // batch_size):
        together = sorted(key for shard in shards for key in shard[step * local:(step + 1) * local])
        assert together == sorted(single[step * batch_size:(step + 1) * batch_size])


def test_global_batch_must_divide_among_the_processes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match="batch size 8 is not divisible by the 3 training processes"):
        distributed.local_batch_size(8)


def test_torchrun_trains_with_rank_zero_writing_and_logging(tiny_params, tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1"}
    command = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={WORLD_SIZE}", "-m", "mulcon", "train",
               "--params", str(tiny_params), "-S", "tracking.enabled=true", "-S", "tracking.system_metrics=false"]
    result = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 1 of 2 on cpu (gloo)" in result.stderr
    runs = tmp_path / "runs" / "mulcon"
    assert (runs / "model.pt").exists()
    assert [len(json.loads((runs / stage / "history.json").read_text())) for stage in ("pretrain", "finetune")] == [1, 1]
    client = mlflow.MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("mulcon-demo").experiment_id],
                               filter_string="tags.`mulcon.kind` = 'variant'")
    assert [metric.step for metric in client.get_metric_history(run.info.run_id, "loss_contrastive")] == [2]
    assert len(client.search_model_versions("name='mulcon-demo'")) == 1
