"""Benchmark 1: one training step of MulCon against the Baseline, same backbone, resolution and batch.

A step is forward, loss, backward and an Adam update on random images already in memory (the data
path is benchmark 4). Cases, all with the same rows per step:
- baseline: Baseline (GAP + linear), BCE: the pretraining step of `backbone_bce`.
- mulcon: MulCon, BCE, projector skipped (`need_projections=False`): its pretraining step.
- mulcon_with_projector: the same step also computing the unused projections (the cost before
  `need_projections`).
- mulcon_bce_lcon: MulCon, BCE + gamma L_con on the projections: the finetuning step's objective.
- baseline_nchw, mulcon_nchw: both models with NCHW weights (before `build_model` turned on
  channels_last); every other case is channels_last, as `build_model` builds them.
Target (issue 5): the MulCon step at most 1.15x the Baseline's (CPU: ResNet-50, 224 px, batch 8).

One intra-op thread by default: on a CPU the ratio is a property of the work, and one thread
keeps the figure stable on a shared machine (two threads there swing by 2x with other load).

    python -m benchmarks.bench_train_step [--quick] [--threads N] [--out result.json]
"""

from __future__ import annotations

import sys
from typing import Callable

import torch

from benchmarks.common import (
    finish, interleaved_times, median, paired_ratio, parser, print_table, set_threads, training_step, verdict,
)
from mulcon.model import Baseline, MulCon

TARGET = 1.15  # MulCon step time / Baseline step time, at most
NUM_LABELS, LABEL_DENSITY = 80, 0.036  # COCO: 80 labels, 2.9 per image


def synthetic_batch(batch_size: int, image_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images (B, 3, s, s) and COCO-like targets (B, 80) with at least one label per image."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
    targets = (torch.rand(batch_size, NUM_LABELS, generator=generator) < LABEL_DENSITY).float()
    targets[torch.arange(batch_size), torch.randint(NUM_LABELS, (batch_size,), generator=generator)] = 1.0
    return images, targets


def make_step(model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor, *,
              projections: bool = False, contrastive: bool = False) -> Callable[[], None]:
    """A closure running one training step (Adam) of `model` on the fixed batch."""
    step = training_step(model, projections=projections, contrastive=contrastive)
    return lambda: step(images, targets)


def build_cases(backbone: str, embed_dim: int, images: torch.Tensor,
                targets: torch.Tensor) -> dict[str, Callable[[], None]]:
    def mulcon(channels_last: bool = True) -> MulCon:
        model = MulCon(NUM_LABELS, backbone, False, embed_dim, 4, 128)
        return model.to(memory_format=torch.channels_last) if channels_last else model

    def baseline(channels_last: bool = True) -> Baseline:
        model = Baseline(NUM_LABELS, backbone, False, 128)
        return model.to(memory_format=torch.channels_last) if channels_last else model

    return {
        "baseline": make_step(baseline(), images, targets),
        "mulcon": make_step(mulcon(), images, targets),
        "mulcon_with_projector": make_step(mulcon(), images, targets, projections=True),
        "mulcon_bce_lcon": make_step(mulcon(), images, targets, contrastive=True),
        "baseline_nchw": make_step(baseline(False), images, targets),
        "mulcon_nchw": make_step(mulcon(False), images, targets),
    }


def run(backbone: str, image_size: int, batch_size: int, embed_dim: int, repeats: int, warmup: int,
        threads: int, judged: bool = True) -> dict:
    threads = set_threads(threads)
    torch.manual_seed(0)
    images, targets = synthetic_batch(batch_size, image_size)
    cpu: dict[str, list[float]] = {}
    times = interleaved_times(build_cases(backbone, embed_dim, images, targets), repeats, warmup, cpu_times=cpu)
    figures = {name: {"ms_per_step": 1e3 * median(values), "images_per_second": batch_size / median(values),
                      "ratio_to_baseline": paired_ratio(values, times["baseline"]),
                      "cpu_ratio_to_baseline": paired_ratio(cpu[name], cpu["baseline"])}
               for name, values in times.items()}
    ratio = figures["mulcon"]["ratio_to_baseline"]
    return {"benchmark": "train_step", "backbone": backbone, "image_size": image_size, "batch_size": batch_size,
            "embed_dim": embed_dim, "num_labels": NUM_LABELS, "threads": threads, "repeats": repeats,
            "cases": figures, "mulcon_to_baseline": ratio,
            "mulcon_to_baseline_nchw": paired_ratio(times["mulcon_nchw"], times["baseline_nchw"]),
            "channels_last_speedup": paired_ratio(times["baseline_nchw"], times["baseline"]),
            "target": TARGET, "target_met": ratio <= TARGET if judged else None,
            "verdict": verdict(ratio, TARGET, at_most=True, judged=judged)}


def report(result: dict) -> None:
    rows = [[name, f"{case['ms_per_step']:.0f}", f"{case['images_per_second']:.2f}",
             f"{case['ratio_to_baseline']:.3f}", f"{case['cpu_ratio_to_baseline']:.3f}"]
            for name, case in result["cases"].items()]
    print_table(f"Benchmark 1: training step, {result['backbone']} at {result['image_size']} px, batch "
                f"{result['batch_size']}, L={result['num_labels']}, D={result['embed_dim']}, "
                f"{result['threads']} thread(s), median of {result['repeats']} interleaved rounds",
                ["case", "ms/step", "img/s", "x baseline (wall)", "x baseline (CPU time)"], rows)
    print(f"  channels_last speed-up of the Baseline step: {result['channels_last_speedup']:.2f}x; "
          f"MulCon / Baseline in NCHW: {result['mulcon_to_baseline_nchw']:.3f}x")
    print(f"  MulCon step / Baseline step: {result['mulcon_to_baseline']:.3f}x ({result['verdict']})")


def main(argv: list[str] | None = None) -> dict:
    arguments = parser(__doc__.splitlines()[0])
    arguments.add_argument("--repeats", type=int, default=5, help="timed rounds (default 5)")
    arguments.add_argument("--threads", type=int, default=1, help="intra-op threads; 0 = one per core")
    options = arguments.parse_args(argv)
    if options.quick:
        result = run("resnet18", 32, 2, 32, repeats=1, warmup=1, threads=options.threads, judged=False)
    else:
        result = run("resnet50", 224, 8, 1024, options.repeats, warmup=1, threads=options.threads)
    report(result)
    return finish(result, options.out)


if __name__ == "__main__":
    main(sys.argv[1:])
