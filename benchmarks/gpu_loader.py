"""The real loader rows of `benchmarks/gpu.py`: a DataLoader built as `mulcon.train.train_loader`
builds it, reading raw COCO-sized JPEGs or the image cache, alone and feeding a training step; and
nvJPEG decoding (`torchvision.io.decode_jpeg` on the GPU), which the loader could use instead.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from benchmarks.common import usable_cpus
from mulcon.data import ManifestDataset, train_transform
from mulcon.data.cache import build_cache
from mulcon.data.sampling import EpochSampler, SeededDataset

Step = Callable[[torch.Tensor, torch.Tensor], None]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_loader(dataset: ManifestDataset, batch_size: int, workers: int,
                 device: torch.device) -> torch.utils.data.DataLoader:
    """Seeded epochs, worker processes kept between epochs, pinned memory on CUDA."""
    sampler = EpochSampler(len(dataset), 0, batch_size=batch_size, drop_last=True)
    return torch.utils.data.DataLoader(SeededDataset(dataset, 0), batch_size=batch_size, sampler=sampler,
                                       num_workers=workers, persistent_workers=workers > 0,
                                       pin_memory=device.type == "cuda")


def _epochs(data: torch.utils.data.DataLoader) -> Iterator:
    epoch = 0
    while True:
        data.sampler.set_epoch(epoch)
        epoch += 1
        yield from data


def feed(data: torch.utils.data.DataLoader, device: torch.device, step: Step | None, num_labels: int,
         batches: int, max_seconds: float) -> float:
    """Images per second delivered to `device` (and trained on, with `step`) after a warm-up of
    a batch per worker and two more (the workers start and their queues fill)."""
    stream = _epochs(data)
    for _ in range(data.num_workers + 2):
        next(stream)
    _synchronize(device)
    started, images = time.perf_counter(), 0
    for index, (batch, targets) in enumerate(stream):
        batch = batch.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        # The demo has 12 classes: zero-padded to COCO's 80, the step is the synthetic rows' step.
        targets = F.pad(targets.to(device, non_blocking=True), (0, num_labels - targets.shape[1]))
        if step is not None:
            step(batch, targets)
        images += len(batch)
        if index + 1 >= batches or time.perf_counter() - started > max_seconds:
            break
    _synchronize(device)
    return images / (time.perf_counter() - started)


def loader_rates(prepared: Path, options, device: torch.device, step: Step,
                 num_labels: int) -> dict[tuple[str, str], float]:
    """{(source, fed): img/s} for source raw_jpeg and cache, fed 'loader only' and 'loader + mulcon step'."""
    build_cache(prepared, options.image_size, workers=usable_cpus())
    rates = {}
    for source in ("raw_jpeg", "cache"):
        dataset = ManifestDataset(prepared, "train", train_transform(options.image_size),
                                  image_size=options.image_size if source == "cache" else None)
        data = train_loader(dataset, options.batch_size, options.workers, device)
        for fed, fed_step in (("loader only", None), ("loader + mulcon step", step)):
            rates[source, fed] = feed(data, device, fed_step, num_labels, options.loader_batches, options.max_seconds)
        del data  # ends its worker processes
    return rates


def decode_rate(prepared: Path, options, device: torch.device) -> float:
    """Images per second of nvJPEG decoding a batch of the raw JPEGs and resizing it on the GPU
    (no augmentation: RandAugment would follow on the GPU)."""
    from torchvision.io import decode_jpeg, read_file

    root = Path(json.loads((prepared / "info.json").read_text())["image_root"])
    files = [read_file(str(path)) for path in sorted(root.glob("train2014/*.jpg"))][: options.batch_size]
    rounds = max(2, options.steps)
    for round_index in range(rounds + 2):  # two warm-up rounds
        if round_index == 2:
            _synchronize(device)
            started = time.perf_counter()
        images = torch.stack(decode_jpeg(files, device=device)).float()  # (B, 3, 480, 640)
        F.interpolate(images, size=(options.image_size,) * 2, mode="bilinear", antialias=True)
    _synchronize(device)
    return rounds * len(files) / (time.perf_counter() - started)
