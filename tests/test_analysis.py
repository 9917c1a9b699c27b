"""Section 4.4 analysis: retrieval precision@k against a brute-force loop, retrieval semantics,
and the figures and metrics of `run_analysis` on a tiny trained pair of models."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mulcon.analysis import label_embeddings, precision_at_k, retrieve, run_analysis
from mulcon.config import load_config
from mulcon.data.dataset import ManifestDataset
from mulcon.data.transforms import eval_transform
from mulcon.inference import load_model
from mulcon.train import run_training


def brute_force_precision(embeddings, targets, k):
    scores = []
    for i, j in zip(*np.nonzero(targets)):
        distances = [(np.linalg.norm(embeddings[m, j] - embeddings[i, j]), m) for m in range(len(targets)) if m != i]
        nearest = [m for _, m in sorted(distances)[:k]]
        scores.append(np.mean([targets[m, j] for m in nearest]))
    return 100 * np.mean(scores)


@pytest.mark.parametrize("seed", range(3))
def test_precision_at_k_matches_a_loop(seed):
    rng = np.random.default_rng(seed)
    embeddings = rng.normal(size=(15, 4, 3)).astype(np.float16)
    targets = (rng.random((15, 4)) < 0.4).astype(np.float32)
    expected = brute_force_precision(embeddings.astype(np.float32), targets, 3)
    assert precision_at_k(embeddings, targets, 3, chunk=4) == pytest.approx(expected, rel=1e-6)


def test_retrieve_single_and_multi_label():
    embeddings = np.zeros((4, 3, 2), dtype=np.float32)
    embeddings[0, 1] = [1, 0]  # the query embedding (image 0, label 1)
    embeddings[1, :] = [[5, 5], [5, 5], [1.1, 0]]  # image 1 is closest, through its label 2
    embeddings[2, :] = [[3, 0], [3, 0], [3, 0]]
    embeddings[3, :] = [[9, 9], [9, 9], [9, 9]]
    assert retrieve(embeddings, 0, [1], 2) == [(1, 2), (2, 0)]
    # Labels 0 and 1 concatenated: image 2 ([3,0,3,0]) is nearer to [0,0,1,0] than image 1 ([5,5,5,5]).
    assert [index for index, _ in retrieve(embeddings, 0, [0, 1], 3)] == [2, 1, 3]


def test_run_analysis_writes_figures_and_metrics(tiny_params, tmp_path):
    models = {}
    for variant, name in (("mulcon_bce", "BCE only"), ("mulcon", "MulCon")):
        models[name] = run_training(load_config(tiny_params, [f"train.variant={variant}"]))
    config = load_config(tiny_params, ["analysis.tsne_images=12", "analysis.precision_k=3"])
    metrics = run_analysis(config, models, tmp_path / "analysis")
    assert set(metrics) >= {"precision_at_3_bce_only", "precision_at_3_mulcon"}
    # The reference: a plain loop over queries, each ranking the other images by Euclidean distance.
    dataset = ManifestDataset(config.data.prepared_dir, "test", eval_transform(config.data.image_size))
    for name, slug in (("BCE only", "bce_only"), ("MulCon", "mulcon")):
        embeddings = label_embeddings(load_model(models[name])[0], dataset, torch.device("cpu")).astype(np.float32)
        hits = []
        for image, label in zip(*np.nonzero(dataset.targets > 0.5)):
            distances = np.linalg.norm(embeddings[:, label] - embeddings[image, label], axis=1)
            distances[image] = np.inf
            nearest = np.argsort(distances, kind="stable")[:3]
            hits.append(np.mean(dataset.targets[nearest, label] > 0.5))
        assert metrics[f"precision_at_3_{slug}"] == pytest.approx(100 * np.mean(hits), abs=1e-3)
    assert json.loads((tmp_path / "analysis" / "metrics.json").read_text()) == metrics
    for figure in ("tsne.png", "retrieval_single.png", "retrieval_multi.png", "attention.png"):
        with Image.open(tmp_path / "analysis" / figure) as image:
            assert image.width > 200 and image.height > 100
