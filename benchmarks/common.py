"""Shared helpers of the benchmarks: interleaved timing, medians and paired ratios, the machine
they ran on, tables, targets and JSON output.

Timings on a shared machine are noisy: every benchmark measures its baseline in the same process,
runs the cases round-robin (the order rotating each round) so that a burst of load hits them
alike, and reports medians and the median of per-round ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from mulcon.io import usable_cpus


def machine() -> dict[str, Any]:
    """Where the figures come from: CPU, cores, GPU, library versions and the load at the time."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "cores": usable_cpus(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    if hasattr(os, "getloadavg"):
        info["load_average"] = round(os.getloadavg()[0], 2)
    return info


def interleaved_times(cases: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1,
                      synchronize: Callable[[], None] = lambda: None,
                      cpu_times: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Wall seconds per call of each case: `warmup` untimed rounds, then `repeats` timed rounds,
    each round calling every case once, starting one case later each round. When `cpu_times` is
    given it receives the process CPU seconds of each call as well (all threads: the work done,
    whatever else the machine runs)."""
    names = list(cases)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(warmup + repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            synchronize()
            started, cpu_started = time.perf_counter(), time.process_time()
            cases[name]()
            synchronize()
            if round_index >= warmup:
                times[name].append(time.perf_counter() - started)
                if cpu_times is not None:
                    cpu_times.setdefault(name, []).append(time.process_time() - cpu_started)
    return times


def peak_memory_bytes(function: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes allocated by torch while `function` runs, above what was allocated before it.

    CUDA: the caching allocator's peak statistic. CPU: the profiler's allocation records, summed
    in time order (the profiler slows the run down, so time and memory are measured apart).
    """
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the CPU profiler's warnings about absent GPUs
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        function()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profiler:
        function()
    records = [event for event in profiler.profiler.kineto_results.events() if event.name() == "[memory]"]
    live = peak = 0
    for record in sorted(records, key=lambda event: event.start_ns()):
        live += record.nbytes()
        peak = max(peak, live)
    return peak


def median(values: list[float]) -> float:
    return statistics.median(values)


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median over rounds of numerator / denominator: robust to load that drifts between rounds."""
    return statistics.median(a / b for a, b in zip(numerator, denominator))


def verdict(value: float, target: float, at_most: bool, judged: bool = True) -> str:
    """'target <= 1.15x: met' (or NOT met); a --quick run is too small to judge."""
    if not judged:
        return f"target {'<=' if at_most else '>='} {target:g}x: not judged at the --quick size"
    met = value <= target if at_most else value >= target
    return f"target {'<=' if at_most else '>='} {target:g}x: {'met' if met else 'NOT met'}"


def print_table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    """A plain fixed-width table on stdout (benchmarks are scripts: printing is their output)."""
    cells = [[str(value) for value in row] for row in [header, *rows]]
    widths = [max(len(row[column]) for row in cells) for column in range(len(header))]
    print(f"\n{title}")
    for index, row in enumerate(cells):
        print("  " + "  ".join(value.ljust(width) for value, width in zip(row, widths)))
        if index == 0:
            print("  " + "  ".join("-" * width for width in widths))


def parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="a tiny size that runs in seconds (for tests)")
    parser.add_argument("--out", type=Path, help="also write the figures to this JSON file")
    return parser


def set_threads(threads: int) -> int:
    """Use `threads` intra-op threads (0: one per usable core); returns the number set."""
    threads = threads or usable_cpus()
    torch.set_num_threads(threads)
    return threads


def finish(result: dict[str, Any], out: Path | None) -> dict[str, Any]:
    """Add the machine description and write `result` to `out` (atomically) when given."""
    result["machine"] = machine()
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        temporary = out.with_name(f".{out.name}.tmp")
        temporary.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        temporary.replace(out)
    return result


def make_coco_like_dataset(root: Path, num_images: int, seed: int = 0, repeats: int = 1) -> Path:
    """A prepared dataset of `num_images` COCO-sized training JPEGs; returns the prepared folder.

    The demo generator's scenes at 640 px, cropped to 640 x 480 and given film grain so that each
    file weighs about as much as a COCO-2014 JPEG (about 150 KB at quality 92): JPEG decoding
    cost follows pixels and entropy, and the demo's flat shapes alone would decode too fast.
    With `repeats` the train manifest lists every image that many times: an epoch long enough to
    keep many loader workers busy, from few files.
    """
    from mulcon.data import make_demo, prepare

    raw = root / "raw"
    make_demo(raw, num_train=num_images, num_val=2, image_size=640, seed=seed)
    generator = np.random.default_rng(seed)
    for path in sorted(raw.glob("*2014/*.jpg")):
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB").crop((0, 80, 640, 560)), dtype=np.float32)
        grain = generator.normal(0.0, 12.0, pixels.shape)
        Image.fromarray(np.clip(pixels + grain, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=92)
    prepared = root / "prepared"
    prepare("demo", raw, prepared, val_fraction=0.0, seed=0)
    if repeats > 1:
        header, *rows = (prepared / "train.csv").read_text(encoding="utf-8").splitlines(keepends=True)
        (prepared / "train.csv").write_text(header + "".join(rows * repeats), encoding="utf-8")
    return prepared


def training_step(model: torch.nn.Module, *, device_type: str = "cpu", precision: str = "fp32",
                  need_attention: bool = False, projections: bool = False,
                  contrastive: bool = False) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """One training step like `mulcon.train.train_one_epoch`'s: autocast forward (bf16 when
    `precision` is bf16), BCE (+ 0.1 L_con), backward, an Adam update (fused on CUDA, as training's)."""
    from mulcon.losses import bce_loss, label_contrastive_loss
    from mulcon.optim import kernel_options

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, **kernel_options(model))
    model.train()

    def step(images: torch.Tensor, targets: torch.Tensor) -> None:
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            output = model(images, need_attention=need_attention, need_projections=projections or contrastive)
            loss = bce_loss(output.logits, targets)
            if contrastive:
                loss = loss + 0.1 * label_contrastive_loss(output.projections, targets, 0.2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step
