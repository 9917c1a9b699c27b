"""Analysis of the learned label-level embeddings (paper section 4.4, Figures 3 to 6).

- t-SNE of the active label-level embeddings, BCE-only model beside MulCon (Figure 3);
- retrieval by Euclidean distance between label-level embeddings, for one (image, label) query
  (Figure 4) and for several labels with concatenated embeddings (Figure 5), and a number the paper
  does not give: label-conditioned precision@k over the whole split;
- attention maps of each active label, and of each head of one label (Figure 6);
- where a label's attention falls against where its objects are (`attention_on_objects`, for data
  with boxes such as the demo's), and a figure of one class's maps over several images.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from mulcon.config import Config
from mulcon.data.dataset import ManifestDataset
from mulcon.data.transforms import eval_transform
from mulcon.errors import CheckpointError
from mulcon.inference import load_model
from mulcon.runtime import resolve_device
from mulcon.io import atomic_path, write_json

logger = logging.getLogger(__name__)


@torch.no_grad()
def label_embeddings(network: nn.Module, dataset: ManifestDataset, device: torch.device,
                     batch_size: int = 64) -> np.ndarray:
    """g_i of every image of `dataset`: (N, L, D) float16 (half the memory; distances barely move)."""
    if not hasattr(network, "label_attention"):
        raise CheckpointError("analysis needs a MulCon model (label-level embeddings), not the Baseline")
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    chunks = [network(images.to(device)).label_embeddings.half().cpu().numpy()
              for images, _ in tqdm(loader, desc="embeddings", leave=False, disable=None)]
    return np.concatenate(chunks)


def precision_at_k(embeddings: np.ndarray, targets: np.ndarray, k: int, chunk: int = 1024) -> float:
    """Label-conditioned precision@k, in percent.

    Each active (image i, label j) is a query: the other images are ranked by the distance of their
    label-j embedding to g_ij, and the score is the share of the k nearest that have label j.
    Averaged over all queries.
    """
    num_images, num_labels, _ = embeddings.shape
    k = min(k, num_images - 1)
    hits, queries = 0.0, 0
    for label in range(num_labels):
        database = torch.from_numpy(embeddings[:, label].astype(np.float32))  # (N, D)
        relevant = torch.from_numpy(targets[:, label] > 0.5)  # (N,)
        for start in range(0, num_images, chunk):
            rows = torch.arange(start, min(start + chunk, num_images))
            rows = rows[relevant[rows]]
            if len(rows) == 0:
                continue
            distances = torch.cdist(database[rows], database)  # (Q, N)
            distances[torch.arange(len(rows)), rows] = float("inf")  # never retrieve the query itself
            nearest = distances.topk(k, largest=False).indices  # (Q, k)
            hits += float(relevant[nearest].float().sum())
            queries += len(rows)
    return 100.0 * hits / max(queries * k, 1)


def retrieve(embeddings: np.ndarray, query: int, labels: list[int], k: int) -> list[tuple[int, int]]:
    """The k images nearest to image `query` under `labels`, with the label that matched.

    One label (Figure 4): each other image's distance is its closest label embedding to g_query,label,
    and that label is returned. Several labels (Figure 5): the concatenated embeddings of `labels`.
    """
    others = np.array([i for i in range(len(embeddings)) if i != query])
    vectors = embeddings.astype(np.float32)
    if len(labels) == 1:
        distances = np.linalg.norm(vectors[others] - vectors[query, labels[0]], axis=-1)  # (N-1, L)
        matched, best = distances.argmin(1), distances.min(1)
    else:
        database = vectors[others][:, labels].reshape(len(others), -1)
        best = np.linalg.norm(database - vectors[query, labels].reshape(-1), axis=-1)
        matched = np.full(len(others), labels[0])
    order = np.argsort(best, kind="stable")[:k]
    return [(int(others[i]), int(matched[i])) for i in order]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot


def _save(figure, path: Path) -> None:
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", bbox_inches="tight", dpi=100)
    _pyplot().close(figure)


def tsne_figure(path: Path, models: dict[str, np.ndarray], targets: np.ndarray, classes: list[str],
                sample: np.ndarray, seed: int) -> None:
    """Figure 3: t-SNE of the active label embeddings of the `sample` images, one panel per model."""
    from sklearn.manifold import TSNE

    pyplot = _pyplot()
    images, labels = np.nonzero(targets[sample] > 0.5)
    figure, axes = pyplot.subplots(1, len(models), figsize=(6 * len(models), 5.5), squeeze=False)
    colours = pyplot.get_cmap("tab20" if len(classes) > 10 else "tab10")
    for axis, (name, embeddings) in zip(axes[0], models.items()):
        points = embeddings[sample][images, labels].astype(np.float32)  # (P, D)
        perplexity = float(min(30, max(2, len(points) - 1) / 3))
        xy = TSNE(2, init="pca", perplexity=perplexity, random_state=seed).fit_transform(points)
        for label in np.unique(labels):
            chosen = labels == label
            axis.scatter(*xy[chosen].T, s=6, color=colours(label % colours.N), label=classes[label])
        axis.set(title=f"{name}: {len(points)} active label embeddings", xticks=[], yticks=[])
    axes[0, -1].legend(loc="center left", bbox_to_anchor=(1, 0.5), fontsize=7, markerscale=2)
    _save(figure, path)


def _thumbnail(dataset: ManifestDataset, index: int, size: int) -> Image.Image:
    return Image.open(dataset.image_root / dataset.paths[index]).convert("RGB").resize((size, size))


def retrieval_figure(path: Path, dataset: ManifestDataset, classes: list[str], query: int, labels: list[int],
                     results: dict[str, list[tuple[int, int]]], size: int) -> None:
    """Figures 4 and 5: the query image, then the nearest images of each model; under each, for
    one query label the label whose embedding matched, and the query's labels marked present or
    absent (green: all present)."""
    pyplot = _pyplot()
    k = max(len(found) for found in results.values())
    figure, axes = pyplot.subplots(len(results), k + 1, figsize=(2 * (k + 1), 2.3 * len(results)), squeeze=False)
    for row, (name, found) in enumerate(results.items()):
        axes[row, 0].imshow(_thumbnail(dataset, query, size))
        axes[row, 0].set_title(f"query: {' + '.join(classes[j] for j in labels)}", fontsize=8)
        axes[row, 0].set_ylabel(name)
        for column, (index, matched) in enumerate(found, start=1):
            present = [bool(dataset.targets[index, j] > 0.5) for j in labels]
            axes[row, column].imshow(_thumbnail(dataset, index, size))
            marks = " ".join(f"{classes[j]} {'✓' if has else '✗'}" for j, has in zip(labels, present))
            title = f"matched: {classes[matched]}\n{marks}" if len(labels) == 1 else marks
            axes[row, column].set_title(title, fontsize=8, color="green" if all(present) else "red")
    for axis in axes.flat:
        axis.set(xticks=[], yticks=[])
    _save(figure, path)


def attention_figure(path: Path, network: nn.Module, dataset: ManifestDataset, index: int, classes: list[str],
                     device: torch.device) -> None:
    """Figure 6: top row, the image and each active label's map (mean over heads); bottom row,
    each head of the first active label."""
    pyplot = _pyplot()
    image, target = dataset[index]
    with torch.no_grad():
        output = network(image[None].to(device), need_attention=True)
    attention = output.attention[0].float().cpu()  # (h, L, N)
    side = int(round(attention.shape[-1] ** 0.5))
    size = image.shape[-1]
    maps = attention.reshape(*attention.shape[:2], 1, side, side)
    maps = torch.nn.functional.interpolate(maps.flatten(0, 1), size=(size, size), mode="bilinear")
    maps = maps.reshape(attention.shape[0], attention.shape[1], size, size).numpy()  # (h, L, S, S)
    active = [int(j) for j in np.flatnonzero(target.numpy() > 0.5)]
    heads = maps.shape[0]
    columns = max(len(active), heads) + 1
    figure, axes = pyplot.subplots(2, columns, figsize=(2.2 * columns, 4.6), squeeze=False)
    picture = np.asarray(_thumbnail(dataset, index, size))
    rows = [[(f"{classes[j]}", maps[:, j].mean(0)) for j in active],
            [(f"{classes[active[0]]}, head {h + 1}", maps[h, active[0]]) for h in range(heads)] if active else []]
    for row, panels in enumerate(rows):
        axes[row, 0].imshow(picture)
        axes[row, 0].set_title("image" if row == 0 else "heads", fontsize=8)
        for column, (title, heat) in enumerate(panels, start=1):
            axes[row, column].imshow(picture)
            axes[row, column].imshow(heat, cmap="jet", alpha=0.5)
            axes[row, column].set_title(title, fontsize=8)
    for axis in axes.flat:
        axis.set(xticks=[], yticks=[])
        if not axis.images:
            axis.set_visible(False)
    _save(figure, path)


@torch.no_grad()
def label_attention_maps(network: nn.Module, dataset: ManifestDataset, device: torch.device,
                         batch_size: int = 64) -> np.ndarray:
    """(N, L, side, side) float32: each image's attention of each label over the image tokens,
    the mean over heads (each map sums to 1)."""
    if not hasattr(network, "label_attention"):
        raise CheckpointError("attention maps need a MulCon model (the Baseline has no label attention)")
    maps = []
    for start in tqdm(range(0, len(dataset), batch_size), desc="attention", leave=False, disable=None):
        images = torch.stack([dataset[index][0] for index in range(start, min(start + batch_size, len(dataset)))])
        attention = network(images.to(device), need_attention=True).attention.float().mean(1)  # (B, L, N)
        side = int(round(attention.shape[-1] ** 0.5))
        maps.append(attention.reshape(*attention.shape[:2], side, side).cpu().numpy())
    return np.concatenate(maps)


def attention_on_objects(maps: np.ndarray, boxes: list[list[tuple[int, tuple[float, float, float, float]]]],
                         num_labels: int) -> list[dict[str, float]]:
    """Per label: the share of its attention that falls on the tokens its objects cover, against the
    share those tokens are of the map (what a uniform map would put there), over the images where
    the label is present.

    Args:
        maps: (N, L, S, S) from `label_attention_maps`.
        boxes: per image, (label, (x0, y0, x1, y1) as fractions of the image side) of each object.

    Returns:
        One dict per label: `on_object` and `uniform` (means over its images, 0-1) and `images`;
        NaN for a label with no object.
    """
    side = maps.shape[-1]
    edges = np.arange(side + 1) / side
    found: list[list[tuple[float, float]]] = [[] for _ in range(num_labels)]
    for index, objects in enumerate(boxes):
        cover: dict[int, np.ndarray] = {}
        for label, (x0, y0, x1, y1) in objects:  # the tokens a box overlaps; several boxes of a label add up
            rows = (edges[1:] > y0) & (edges[:-1] < y1)
            columns = (edges[1:] > x0) & (edges[:-1] < x1)
            cover[label] = cover.get(label, np.zeros((side, side), bool)) | np.outer(rows, columns)
        for label, cells in cover.items():
            found[label].append((float(maps[index, label][cells].sum()), float(cells.mean())))
    return [{"on_object": float(np.mean([m for m, _ in pairs])) if pairs else float("nan"),
             "uniform": float(np.mean([u for _, u in pairs])) if pairs else float("nan"), "images": len(pairs)}
            for pairs in found]


def class_attention_figure(path: Path, maps: np.ndarray, dataset: ManifestDataset, labels: list[int],
                           classes: list[str], images_per_label: int = 5) -> None:
    """One row per label of `labels`: its first `images_per_label` images that contain it, each with
    that label's map (mean over heads) over the image."""
    pyplot = _pyplot()
    figure, axes = pyplot.subplots(len(labels), images_per_label, figsize=(2.0 * images_per_label, 2.1 * len(labels)),
                                   squeeze=False)
    for row, label in enumerate(labels):
        holding = [int(i) for i in np.flatnonzero(dataset.targets[:, label] > 0.5)][:images_per_label]
        for column, index in enumerate(holding):
            picture = _thumbnail(dataset, index, 96)
            heat = torch.nn.functional.interpolate(torch.from_numpy(maps[index, label])[None, None], size=(96, 96),
                                                   mode="bilinear")[0, 0].numpy()
            axes[row, column].imshow(picture)
            axes[row, column].imshow(heat, cmap="jet", alpha=0.5)
            axes[row, column].set_title(f"{classes[label]} (image {index})", fontsize=7)
    for axis in axes.flat:
        axis.set(xticks=[], yticks=[])
        if not axis.images:
            axis.set_visible(False)
    _save(figure, path)


def run_analysis(config: Config, models: dict[str, Path | nn.Module], out_dir: str | Path) -> dict[str, Any]:
    """All figures and the retrieval precision@k of `models` ({"BCE only": path, "MulCon": path}):
    model files (read with `weights_only=True`) or networks already loaded (from a registered model).

    Returns:
        The metrics written to `<out_dir>/metrics.json`.
    """
    out_dir = Path(out_dir)
    device = resolve_device(config.train.device)
    dataset = ManifestDataset(config.data.prepared_dir, config.analysis.split, eval_transform(config.data.image_size),
                              image_size=config.data.cache_size)
    classes = dataset.classes
    networks = {name: model.to(device).eval() if isinstance(model, nn.Module) else load_model(model, device)[0]
                for name, model in models.items()}
    embeddings = {name: label_embeddings(network, dataset, device) for name, network in networks.items()}
    targets = dataset.targets
    k = config.analysis.precision_k
    metrics = {f"precision_at_{k}_{_slug(name)}": round(precision_at_k(values, targets, k), 4)
               for name, values in embeddings.items()}
    metrics.update(split=config.analysis.split, num_images=len(dataset), k=k)
    rng = np.random.default_rng(config.analysis.seed)
    sample = np.sort(rng.permutation(len(dataset))[: config.analysis.tsne_images])
    tsne_figure(out_dir / "tsne.png", embeddings, targets, classes, sample, config.analysis.seed)
    multi = [int(i) for i in rng.permutation(len(dataset)) if (targets[i] > 0.5).sum() >= 2] or [0]
    query = multi[0]
    labels = [int(j) for j in np.flatnonzero(targets[query] > 0.5)]
    size = config.data.image_size
    for file_name, chosen in (("retrieval_single.png", labels[:1]), ("retrieval_multi.png", labels[:2])):
        results = {name: retrieve(values, query, chosen, 4) for name, values in embeddings.items()}
        retrieval_figure(out_dir / file_name, dataset, classes, query, chosen, results, size)
    attention_figure(out_dir / "attention.png", networks[list(networks)[-1]], dataset, query, classes, device)
    write_json(out_dir / "metrics.json", metrics)
    return metrics


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")
