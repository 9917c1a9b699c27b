"""The end-to-end rows of `benchmarks/gpu.py`: training as `python -m mulcon train` trains, from the
image cache, with the real input pipeline.

A prepared data set of generated 448 px JPEGs (NUS-WIDE layout, 80 labels: the real `prepare`, no
pycocotools needed) is cached with the real `build_cache`; each row then builds its loader with
`mulcon.train.train_loader` (ManifestDataset over the cache, the real transforms or the sampled
augmentation of `data.augment_device: cuda`, seeded sampling, workers sized to the machine, pinned
memory), moves batches with the training loop's own hook (`batch_rows` under `prefetch`: side
stream, non-blocking copies, augmentation on the device) and trains with the real model, objective
and optimizer (fused on CUDA). Step 1: one view, BCE, Adam; step 2: two views, BCE + L_con, SGD.

Per row: images (and rows) per second over the timed batches, the GPU's busy fraction (CUDA-event
time inside the training step over wall time), and the CPU time per image of decode and augment in
a loader worker, measured apart in a loader-only pass (one thread, in this process).
"""

from __future__ import annotations

import concurrent.futures
import csv
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from benchmarks.common import print_table
from mulcon.config import config_from_dict
from mulcon.data.cache import build_cache
from mulcon.data.gpu_augment import prefetch
from mulcon.data.manifest import load_classes
from mulcon.data.preparation import prepare
from mulcon.model import build_model
from mulcon.optim import build_optimizer
from mulcon.runtime import autocast
from mulcon.train import Objective, batch_rows, train_loader
from mulcon.variants import Step

NUM_LABELS = 80
STEPS = {"step 1": Step("pretrain", 1, None), "step 2": Step("finetune", 1, "label")}


def _write_image(path: Path, image_size: int, seed: int) -> None:
    """A JPEG with a coarse colour field, two blocks and grain: content for the operations to change."""
    rng = np.random.default_rng(seed)
    field = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((image_size,) * 2,
                                                                                   Image.BILINEAR)
    pixels = np.asarray(field, dtype=np.int16).copy()
    for _ in range(2):
        top, left = rng.integers(0, image_size // 2, 2)
        pixels[top:top + image_size // 3, left:left + image_size // 4] = rng.integers(0, 256, 3)
    pixels += rng.integers(-10, 11, pixels.shape, dtype=np.int16)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=90)


def make_cached_dataset(root: Path, num_images: int, image_size: int, workers: int) -> Path:
    """Generate `num_images` training images (plus a few test ones), prepare them (NUS-WIDE layout)
    and build the image cache at `image_size`; returns the prepared folder."""
    raw = root / "raw"
    (raw / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"image_{index:05d}.jpg" for index in range(num_images + 4)]
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:  # PIL encodes without the GIL
        list(pool.map(lambda item: _write_image(raw / "images" / item[1], image_size, item[0]), enumerate(names)))
    with open(raw / "nus_wid_data.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["filename", "label", "split"])
        for index, name in enumerate(names):
            labels = sorted({f"concept_{label:02d}" for label in rng.integers(0, NUM_LABELS, rng.integers(1, 4))})
            writer.writerow([name, repr(labels if index >= 4 else [f"concept_{index:02d}"]),
                             "val" if index < 4 else "train"])
    prepared = root / "prepared" / "nuswide"
    prepare("nuswide", raw, prepared, val_fraction=0.0, seed=0)
    build_cache(prepared, image_size, workers=workers)
    return prepared


def row_config(prepared: Path, options, augment_device: str, workers: int):
    """The training config of a row: the paper's COCO preset's shape at the benchmark's size."""
    return config_from_dict({
        "data": {"dataset": "nuswide", "prepared_root": str(prepared.parent), "image_size": options.image_size,
                 "val_fraction": 0.0, "num_workers": workers, "cache": True, "augment_device": augment_device},
        "model": {"backbone": options.backbone, "pretrained": False, "embed_dim": options.embed_dim},
        "pretrain": {"batch_size": options.batch_size}, "finetune": {"batch_size": max(1, options.batch_size // 2)},
        "train": {"device": options.device, "precision": "bf16"},
    })


def _epochs(loader) -> Iterator:
    epoch = 0
    while True:
        loader.sampler.set_epoch(epoch)
        epoch += 1
        yield from loader


def cpu_ms_per_image(loader, images: int) -> float:
    """CPU milliseconds a loader worker spends per image (all its views: read, decode or cache
    read, augment or sample, to tensors), measured in this process on one thread."""
    dataset, threads = loader.dataset, torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    try:
        keys = [(0, index % len(dataset)) for index in range(images)]
        for key in keys:  # first use: maps the cache and reads its pages from the disk
            dataset[key]
        started = time.process_time()
        for key in keys:
            dataset[key]
        return 1e3 * (time.process_time() - started) / images
    finally:
        torch.set_num_threads(threads)


def train_rate(config, stage: str, device: torch.device, batches: int, max_seconds: float) -> dict:
    """Train on the row's loader: a warm-up of a batch per worker and two more, then up to
    `batches` timed batches (at most `max_seconds`). Returns img/s, rows/s and the GPU busy fraction."""
    step = STEPS[stage]
    loader = train_loader(config, step)
    model = build_model(config.model, len(load_classes(config.data.prepared_dir)), label_level=True).to(device)
    optimizer = build_optimizer(config, step.stage, model)
    objective = Objective(config, step.contrastive)
    model.train()
    cuda = device.type == "cuda"
    busy = []

    def train(images: torch.Tensor, targets: torch.Tensor) -> None:
        with autocast(device, config.train.precision):
            terms = objective(model(images, need_projections=step.contrastive is not None), targets)
        optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        optimizer.step()

    stream = prefetch(_epochs(loader), lambda batch: batch_rows(batch, device), device)
    for _ in range(max(loader.num_workers, 1) + 2):
        train(*next(stream))
    if cuda:
        torch.cuda.synchronize(device)
    started, images, done = time.perf_counter(), 0, 0
    while done < batches and (done < 2 or time.perf_counter() - started < max_seconds):
        rows, targets = next(stream)
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
        train(rows, targets)
        if cuda:
            end.record()
            busy.append((begin, end))
        images += len(rows) // (2 if step.contrastive else 1)
        done += 1
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    views = 2 if step.contrastive else 1
    busy_seconds = sum(begin.elapsed_time(end) for begin, end in busy) / 1e3 if cuda else None
    result = {"images_per_second": images / seconds, "rows_per_second": views * images / seconds,
              "timed_batches": done, "workers": loader.num_workers,
              "gpu_busy_fraction": busy_seconds / seconds if cuda else None,
              "cpu_ms_per_image": cpu_ms_per_image(loader, min(64, len(loader.dataset)))}
    del stream, loader  # ends the worker processes
    return result


ROWS = [(stage, augment) for stage in STEPS for augment in ("cpu", "cuda")]


def run_e2e_rows(options, device: torch.device, budget, flops: float, peak: float | None) -> list[dict]:
    """The four end-to-end rows (step 1 and 2, augment_device cpu and cuda), each skipped, saying
    so, when the budget has no room for it; `flops` per trained row, `peak` the bf16 peak TFLOP/s."""
    workers = options.e2e_workers
    base = dict(section="e2e", precision="bf16", channels_last=True, compile=False, attention="sdpa")
    fields = [dict(model=f"mulcon {stage}", objective=f"cache, augment {augment}", stage=stage,
                   augment_device=augment, **base) for stage, augment in ROWS]
    if not budget.allows(options.e2e_setup_estimate_s + options.e2e_estimate_s):
        return [{"status": f"skipped: {max(budget.left(), 0):.0f} s of the budget left", **row} for row in fields]
    rows = []
    # Enough images that the warm-up and the timed batches of step 1 fit in one epoch.
    num_images = max(options.e2e_images, options.batch_size * (workers + 2 + options.e2e_batches + 2))
    with tempfile.TemporaryDirectory(prefix="mulcon-gpu-e2e-") as folder:
        started = time.perf_counter()
        prepared = make_cached_dataset(Path(folder), num_images, options.image_size,
                                       workers=max(workers, 1))
        setup_seconds = time.perf_counter() - started
        for row in fields:
            if not budget.allows(options.e2e_estimate_s):
                rows.append({"status": f"skipped: {max(budget.left(), 0):.0f} s of the budget left, the row "
                                       f"needs about {options.e2e_estimate_s:.0f} s", **row})
                continue
            started = time.perf_counter()
            config = row_config(prepared, options, row["augment_device"], workers)
            try:
                measured = train_rate(config, row["stage"], device, options.e2e_batches, options.e2e_max_seconds)
            except Exception as error:  # out of memory, a worker failure: report it, go on
                status = "out of memory" if isinstance(error, torch.OutOfMemoryError) else f"failed: {error!r}"[:160]
                rows.append({"status": status, **row})
                continue
            mfu = flops * measured["rows_per_second"] / (peak * 1e12) if peak else None
            rows.append({"status": "ok", **row, **measured, "mfu": mfu, "setup_seconds": setup_seconds,
                         "images": num_images,
                         "row_seconds": time.perf_counter() - started})
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def end_to_end_ratios(rows: list[dict]) -> dict[str, float]:
    """Each end-to-end row's rows/s over the synthetic eager step's of its objective (1.0: the input
    pipeline costs nothing)."""
    synthetic = {row["objective"]: row["images_per_second"] for row in rows if row["section"] == "synthetic"
                 and row["status"] == "ok" and row["model"] == "mulcon" and row["precision"] == "bf16"
                 and row["channels_last"] and not row["compile"] and row["attention"] == "sdpa"}
    ratios = {}
    for row in rows:
        objective = "bce" if row.get("stage") == "step 1" else "bce+lcon"
        if row["section"] == "e2e" and row["status"] == "ok" and objective in synthetic:
            ratios[f"{row['stage']}, augment {row['augment_device']}"] = row["rows_per_second"] / synthetic[objective]
    return ratios


def report_e2e(rows: list[dict], options, device) -> None:
    """The end-to-end table and issue 13's targets for it."""
    e2e = [row for row in rows if row["section"] == "e2e"]
    if not e2e:
        return

    def number(value, digits, scale=1.0):
        return "-" if value is None else f"{scale * value:.{digits}f}"

    ratios = end_to_end_ratios(rows)
    table = [[row["stage"], row["augment_device"], number(row.get("images_per_second"), 1),
              number(row.get("rows_per_second"), 1), number(row.get("gpu_busy_fraction"), 1, 100),
              number(row.get("cpu_ms_per_image"), 2), number(row.get("mfu"), 1, 100),
              number(ratios.get(f"{row['stage']}, augment {row['augment_device']}"), 2),
              row.get("workers", "-"), row.get("timed_batches", "-"), row["status"]] for row in e2e]
    print_table(f"End to end from the image cache ({options.e2e_workers} workers, step 1: batch "
                f"{options.batch_size} x 1 view, BCE; step 2: batch {max(1, options.batch_size // 2)} x 2 views, "
                "BCE + L_con)",
                ["step", "augment", "img/s", "rows/s", "GPU busy %", "CPU ms/img", "MFU %", "/ synthetic",
                 "workers", "batches", "status"], table)
    if options.tiny or device.type != "cuda":
        print("  targets (step 1 >= 1000 img/s, step 2 >= 450 img/s, >= 0.90 of synthetic): not judged on this run")
        return
    for stage, target in (("step 1", 1000), ("step 2", 450)):
        best = max((row for row in e2e if row["stage"] == stage and row["status"] == "ok"),
                   key=lambda row: row["images_per_second"], default=None)
        if best is not None:
            ratio = ratios.get(f"{stage}, augment {best['augment_device']}")
            print(f"  {stage} end to end: {best['images_per_second']:.0f} img/s (augment {best['augment_device']}); "
                  f"target >= {target}: {'met' if best['images_per_second'] >= target else 'NOT met'}; "
                  f"{'-' if ratio is None else f'{ratio:.2f}'} of the synthetic step (target >= 0.90)")
