"""Benchmark 3: the label contrastive loss L_con (Eq. 8), forward and backward, at a realistic size,
against a straightforward per-anchor implementation: time and peak memory.

Size: 64 rows (32 images x 2 views, the finetuning batch) x 80 labels, 3.6% of the pairs active
(COCO's 2.9 labels per image; both views of an image share its labels), d_z = 128, tau = 0.2.
`label_contrastive_loss` builds one (M x M) similarity matrix over the M active pairs; the
reference loops over the anchors, each with a softmax over the other active pairs. No target:
the figures show what the vectorised loss costs next to the rest of a step (benchmark 1).

    python -m benchmarks.bench_contrastive [--quick] [--device cpu|cuda] [--out result.json]
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from benchmarks.common import (
    finish, interleaved_times, median, paired_ratio, parser, peak_memory_bytes, print_table, set_threads,
)
from mulcon.losses import label_contrastive_loss

TEMPERATURE = 0.2


def per_anchor_label_contrastive_loss(projections: torch.Tensor, targets: torch.Tensor,
                                      temperature: float) -> torch.Tensor:
    """Eq. 8 one anchor at a time: the straightforward implementation (the reference)."""
    rows, labels = torch.nonzero(targets > 0.5, as_tuple=True)
    embeddings = F.normalize(projections[rows, labels], dim=-1)  # (M, d)
    losses = []
    for anchor in range(len(labels)):
        others = torch.arange(len(labels), device=labels.device) != anchor
        logits = embeddings[others] @ embeddings[anchor] / temperature  # (M - 1,)
        positives = labels[others] == labels[anchor]
        if positives.any():
            losses.append(-(logits - torch.logsumexp(logits, dim=0))[positives].mean())
    return torch.stack(losses).mean() if losses else projections.sum() * 0.0


def contrastive_problem(images: int, num_labels: int, dimension: int, density: float, device: torch.device,
                        seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Projections (2 * images, L, d) requiring grad, and targets (2 * images, L) of two views."""
    generator = torch.Generator().manual_seed(seed)
    targets = (torch.rand(images, num_labels, generator=generator) < density).float()
    targets[torch.arange(images), torch.randint(num_labels, (images,), generator=generator)] = 1.0
    targets = targets.repeat(2, 1)  # the two views of each image share its labels
    projections = torch.randn(2 * images, num_labels, dimension, generator=generator)
    return projections.to(device).requires_grad_(), targets.to(device)


def run(images: int, num_labels: int, dimension: int, repeats: int, device: torch.device) -> dict:
    projections, targets = contrastive_problem(images, num_labels, dimension, 0.036, device)
    implementations = {"label_contrastive_loss": label_contrastive_loss,
                       "per_anchor_reference": per_anchor_label_contrastive_loss}

    def forward_backward(loss_function):
        def call() -> float:
            loss = loss_function(projections, targets, TEMPERATURE)
            loss.backward()
            projections.grad = None  # freed inside the call: the peak memory counts the gradient
            return float(loss.detach())
        return call

    cases = {name: forward_backward(function) for name, function in implementations.items()}
    losses = {name: call() for name, call in cases.items()}
    synchronize = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    times = interleaved_times(cases, repeats, warmup=1, synchronize=synchronize)
    reference = times["per_anchor_reference"]
    figures = {name: {"ms": 1e3 * median(values), "speedup": paired_ratio(reference, values),
                      "peak_memory_kib": peak_memory_bytes(cases[name], device) / 1024}
               for name, values in times.items()}
    return {"benchmark": "contrastive", "device": str(device), "rows": 2 * images, "num_labels": num_labels,
            "dimension": dimension, "active_pairs": int(targets.sum()), "repeats": repeats, "cases": figures,
            "loss_difference": abs(losses["label_contrastive_loss"] - losses["per_anchor_reference"]),
            "speedup": figures["label_contrastive_loss"]["speedup"]}


def report(result: dict) -> None:
    rows = [[name, f"{case['ms']:.2f}", f"{case['speedup']:.1f}", f"{case['peak_memory_kib']:.0f}"]
            for name, case in result["cases"].items()]
    print_table(f"Benchmark 3: label contrastive loss, forward + backward, {result['rows']} rows x "
                f"{result['num_labels']} labels, {result['active_pairs']} active pairs, d={result['dimension']}, "
                f"{result['device']}, median of {result['repeats']} interleaved rounds",
                ["implementation", "ms", "x faster than per-anchor", "peak memory KiB"], rows)
    print(f"  |loss - per-anchor loss|: {result['loss_difference']:.1e}; "
          f"label_contrastive_loss is {result['speedup']:.1f}x faster (no target)")


def main(argv: list[str] | None = None) -> dict:
    arguments = parser(__doc__.splitlines()[0])
    arguments.add_argument("--repeats", type=int, default=20, help="timed rounds (default 20)")
    arguments.add_argument("--device", default="cpu")
    arguments.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1); 0 = one per core")
    options = arguments.parse_args(argv)
    set_threads(1 if options.quick else options.threads)
    device = torch.device(options.device)
    result = run(4, 10, 16, 2, device) if options.quick else run(32, 80, 128, options.repeats, device)
    report(result)
    return finish(result, options.out)


if __name__ == "__main__":
    main(sys.argv[1:])
