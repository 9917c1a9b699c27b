"""Benchmark 4: the input pipeline, training images per second on one core, from COCO-sized JPEGs
(640 x 480, about 150 KB) against the prepared image cache (pixels resized once, at prepare time,
to the training resolution; `mulcon.data.cache`).

One process, one thread, reading `ManifestDataset` items (decode or cache read, transforms, the
normalised tensor) as a DataLoader worker does. Cases:
- raw_jpeg: the raw files through `train_transform` (decode, resize, flip, RandAugment, tensor).
- cache: the same transforms on the cached pixels: Resize is a no-op, the tensors are identical.
- raw_jpeg_torchvision_tensor: raw_jpeg with torchvision's ToImage/ToDtype/Normalize in place of
  `ToNormalisedTensor` (the pipeline before issue 5; same values).
- jpeg_at_training_size: the cache's alternative, JPEGs (quality 95) at the training size; not
  used because it changes the pixels (its error is printed) and is slower than the cache.
- the eval_ cases: the same with `eval_transform` (evaluation reads the cache too).
- decode_only_pil, decode_only_torchvision_io: JPEG decoding alone, PIL (what the dataset uses)
  against torchvision.io.decode_jpeg; both are libjpeg-turbo, and torchvision.io would need tensor
  transforms whose RandAugment differs from PIL's, so the dataset keeps PIL.
Target (issue 5): the cache at least 2x raw_jpeg.

    python -m benchmarks.bench_input [--quick] [--image-size 448] [--images 64] [--out result.json]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg, read_file
from torchvision.transforms import v2

from benchmarks.common import (
    finish, interleaved_times, make_coco_like_dataset, median, paired_ratio, parser, print_table, verdict,
)
from mulcon.data import ManifestDataset, eval_transform, train_transform
from mulcon.data.cache import build_cache, cache_dir
from mulcon.data.sampling import SeededDataset
from mulcon.data.transforms import IMAGENET_MEAN, IMAGENET_STD, resize

TARGET = 2.0  # cached images per second / raw images per second, at least


def torchvision_train_transform(image_size: int) -> Callable:
    """train_transform as it was before `ToNormalisedTensor` (same values, slower)."""
    return v2.Compose([resize(image_size), v2.RandomHorizontalFlip(), v2.RandAugment(), v2.ToImage(),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
                       v2.ToPureTensor()])


def write_jpegs_at_size(prepared: Path, image_root: Path, out: Path, image_size: int) -> tuple[float, float, float]:
    """The cache's alternative: each image resized and saved as a quality-95 JPEG under `out`.

    Returns the mean file size in KB and the mean and largest absolute pixel error (0-255) of the
    decoded JPEGs against the exactly resized pixels the cache keeps.
    """
    dataset = ManifestDataset(prepared, "train", eval_transform(image_size), image_root=image_root)
    sizes, errors, largest = [], [], 0
    for name in dataset.paths:
        with Image.open(image_root / name) as image:
            exact = resize(image_size)(image.convert("RGB"))
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        exact.save(out / name, "JPEG", quality=95)
        sizes.append((out / name).stat().st_size)
        with Image.open(out / name) as saved:
            difference = np.abs(np.asarray(saved.convert("RGB"), dtype=np.int16) - np.asarray(exact, dtype=np.int16))
        errors.append(difference.mean())
        largest = max(largest, int(difference.max()))
    return float(np.mean(sizes) / 1024), float(np.mean(errors)), float(largest)


def read_all(dataset: ManifestDataset) -> Callable[[], None]:
    """One pass over the dataset's items, each under its own seed, as training reads them."""
    seeded = SeededDataset(dataset, seed=0)

    def epoch() -> None:
        for index in range(len(dataset)):
            seeded[0, index]
    return epoch


def decode_all(files: list[Path], decoder: str) -> Callable[[], None]:
    """One pass decoding the JPEG files to RGB pixels only, with PIL or torchvision.io."""
    def epoch() -> None:
        for path in files:
            if decoder == "pil":
                with Image.open(path) as image:
                    image.convert("RGB")
            else:
                decode_jpeg(read_file(str(path)), mode=ImageReadMode.RGB)
    return epoch


def run(num_images: int, image_size: int, repeats: int, folder: Path, judged: bool = True) -> dict:
    torch.set_num_threads(1)
    prepared = make_coco_like_dataset(folder, num_images)
    image_root = folder / "raw"
    raw_kb = float(np.mean([(image_root / name).stat().st_size for name in
                            ManifestDataset(prepared, "train", eval_transform(image_size)).paths]) / 1024)
    started = time.perf_counter()
    build_cache(prepared, image_size, workers=1)
    cache_build_rate = num_images / (time.perf_counter() - started)
    jpeg_kb, jpeg_error, jpeg_largest = write_jpegs_at_size(prepared, image_root, folder / "jpeg", image_size)

    def dataset(transform: Callable, **options) -> ManifestDataset:
        return ManifestDataset(prepared, "train", transform, **options)

    train, evaluate = train_transform(image_size), eval_transform(image_size)
    files = [image_root / name for name in dataset(evaluate).paths]
    cases = {
        "raw_jpeg": read_all(dataset(train)),
        "cache": read_all(dataset(train, image_size=image_size)),
        "raw_jpeg_torchvision_tensor": read_all(dataset(torchvision_train_transform(image_size))),
        "jpeg_at_training_size": read_all(dataset(train, image_root=folder / "jpeg")),
        "eval_raw_jpeg": read_all(dataset(evaluate)),
        "eval_cache": read_all(dataset(evaluate, image_size=image_size)),
        "decode_only_pil": decode_all(files, "pil"),
        "decode_only_torchvision_io": decode_all(files, "torchvision"),
    }
    times = interleaved_times(cases, repeats, warmup=1)
    reference = {"eval": "eval_raw_jpeg", "decode": "decode_only_pil"}
    figures = {name: {"images_per_second": num_images / median(values),
                      "ratio_to_raw": paired_ratio(times[reference.get(name.split("_")[0], "raw_jpeg")], values)}
               for name, values in times.items()}
    ratio = figures["cache"]["ratio_to_raw"]
    return {"benchmark": "input", "images": num_images, "image_size": image_size, "threads": 1,
            "repeats": repeats, "cases": figures, "raw_jpeg_kb": raw_kb, "cache_kb": 3 * image_size ** 2 / 1024,
            "jpeg_at_size_kb": jpeg_kb, "jpeg_at_size_mean_error": jpeg_error, "jpeg_at_size_max_error": jpeg_largest,
            "cache_build_images_per_second": cache_build_rate,
            "cache_bytes": sum(path.stat().st_size for path in cache_dir(prepared, image_size).iterdir()),
            "cache_to_raw": ratio, "target": TARGET, "target_met": ratio >= TARGET if judged else None,
            "verdict": verdict(ratio, TARGET, at_most=False, judged=judged)}


def report(result: dict) -> None:
    rows = [[name, f"{case['images_per_second']:.1f}", f"{case['ratio_to_raw']:.2f}"]
            for name, case in result["cases"].items()]
    print_table(f"Benchmark 4: input pipeline, {result['images']} COCO-sized JPEGs ({result['raw_jpeg_kb']:.0f} KB "
                f"each) to {result['image_size']} px tensors, 1 core, median of {result['repeats']} interleaved passes",
                ["case", "img/s per core", "speed-up"], rows)
    print("  speed-ups against raw_jpeg; the eval_ rows against eval_raw_jpeg, the decode_ rows against "
          "decode_only_pil")
    print(f"  cache: {result['cache_kb']:.0f} KB per image, built at {result['cache_build_images_per_second']:.0f} "
          f"img/s per core; JPEG at training size: {result['jpeg_at_size_kb']:.0f} KB per image, pixel error "
          f"mean {result['jpeg_at_size_mean_error']:.2f}, max {result['jpeg_at_size_max_error']:.0f} (of 255)")
    print(f"  cache / raw JPEG: {result['cache_to_raw']:.2f}x ({result['verdict']})")


def main(argv: list[str] | None = None) -> dict:
    arguments = parser(__doc__.splitlines()[0])
    arguments.add_argument("--image-size", type=int, default=448, help="training resolution (default 448)")
    arguments.add_argument("--images", type=int, default=64, help="images per pass (default 64)")
    arguments.add_argument("--repeats", type=int, default=5, help="timed passes (default 5)")
    options = arguments.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mulcon-bench-input-") as folder:
        if options.quick:
            result = run(4, 64, 1, Path(folder), judged=False)
        else:
            result = run(options.images, options.image_size, options.repeats, Path(folder))
    report(result)
    return finish(result, options.out)


if __name__ == "__main__":
    main(sys.argv[1:])
