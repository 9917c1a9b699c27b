"""Benchmark 5 (GPU): MulCon training throughput at the paper's size on one GPU, end to end and on
synthetic device tensors, against the Baseline.

    python benchmarks/gpu.py [--out gpu.json]      # sized for one H100/H200: at most 8 minutes
    python benchmarks/gpu.py --tiny                # ResNet-18, 32 px, batch 2, 2 steps: CPU smoke run
    python benchmarks/gpu.py --sections e2e        # only the end-to-end rows (a rerun)

The GPU session's command (issue 13), from the repository root on the lent machine, nothing to
carry (its image has torch, torchvision, pillow, pyyaml, tqdm; the loader rows' pycocotools aside):

    set -o pipefail; PYTHONUNBUFFERED=1 timeout 560 python3 benchmarks/gpu.py --results-dir "$OUT" 2>&1 | tee "$OUT/gpu.txt"

(run it with timeout_s 600); it writes $OUT/gpu-<device>.json (gpu-h200.json, gpu-h100.json);
commit that file and gpu.txt as benchmarks/results/gpu-<device>.{json,txt}.

Synthetic rows: data already on the device, ResNet-101 at 448 px, batch 64, MulCon (D=1024, h=4,
L=80, d_z=128) and the Baseline, one Adam step each (fused on CUDA, as training's; BCE, one MulCon
row adds L_con), comparing fp32 with bf16 autocast, channels_last with NCHW, the fused
scaled_dot_product_attention with the explicit softmax path, and torch.compile on and off
(--compile-mode). End-to-end rows (`benchmarks/gpu_e2e.py`): at least 2,000 generated 448 px
images, prepared and cached with the real `prepare` and `build_cache`, trained through the real
`mulcon.train` loader, device hook, model, objective and optimizer, for step 1 (one view, BCE) and
step 2 (two views, BCE + L_con) with `data.augment_device` cpu and cuda; at least 30 timed
batches after a warm-up; img/s, rows/s, GPU busy fraction, CPU ms per image in a loader worker,
MFU and the ratio to the synthetic step. Then the older loader rows: COCO-sized demo JPEGs, from
the raw files and from the image cache (need pycocotools), and nvJPEG decoding on the GPU.

MFU: the step's FLOPs (counted by torch.utils.flop_counter, about 190 GFLOP per trained 448 px
image for ResNet-101) times the trained rows per second over the chip's dense peak (bf16 rows:
bf16 peak; fp32 rows: TF32 peak, which cuDNN's convolutions use). A time budget (--budget-s,
420 s) skips the remaining rows, saying so; rows run most important first and each is bounded.
Targets (issue 13): end to end, step 1 >= 1,000 img/s, step 2 >= 450 img/s, >= 0.90 of the
synthetic rate; synthetic MulCon >= 1,200 img/s, MulCon/Baseline step time <= 1.05.

The loader rows' `prepare` of the demo set needs pycocotools, which the device image lacks (they
are then skipped with a note). To run them, carry its wheel (see the device tool's README):
`pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64
-d .whl pycocotools` here, then start the command with `pip install --no-index --target /tmp/site
.whl/*.whl && export PYTHONPATH=/tmp/site`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/gpu.py` from anywhere

from benchmarks.common import machine, make_coco_like_dataset, print_table, training_step, usable_cpus  # noqa: E402
from benchmarks.gpu_e2e import end_to_end_ratios, report_e2e, run_e2e_rows  # noqa: E402
from mulcon.model import Baseline, MulCon  # noqa: E402

TARGET_IMAGES_PER_SECOND = 1200  # synthetic MulCon step (issue 13; issue 5 asked 1,000)
TARGET_STEP_RATIO = 1.05  # MulCon step time / Baseline's
NUM_LABELS = 80
# Dense peak TFLOP/s (bf16, TF32) by device name; SXM figures for the H100 (80GB HBM3) and H200.
PEAK_TFLOPS = {"H100 PCIe": (756.0, 378.0), "H100": (989.4, 494.7), "H200": (989.4, 494.7),
               "A100": (312.0, 156.0)}
# (model, precision, channels_last, compile, attention, objective), most important first: the
# budget drops rows from the end. The first row is the training default (bf16, channels_last).
EAGER_ROWS = [
    ("mulcon", "bf16", True, False, "sdpa", "bce"), ("baseline", "bf16", True, False, "sdpa", "bce"),
    ("mulcon", "bf16", True, False, "sdpa", "bce+lcon"), ("mulcon", "bf16", True, False, "explicit", "bce"),
    ("mulcon", "bf16", False, False, "sdpa", "bce"), ("baseline", "bf16", False, False, "sdpa", "bce"),
    ("mulcon", "fp32", True, False, "sdpa", "bce"), ("baseline", "fp32", True, False, "sdpa", "bce"),
]
COMPILED_ROWS = [("mulcon", "bf16", True, True, "sdpa", "bce"), ("baseline", "bf16", True, True, "sdpa", "bce")]


class Budget:
    """Seconds left of the run's budget; `allows(estimate)` says whether a row still fits."""

    def __init__(self, seconds: float):
        self.seconds, self.started = seconds, time.perf_counter()

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.started)

    def allows(self, estimate: float) -> bool:
        return self.left() >= estimate


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(kind: str, options: argparse.Namespace, device: torch.device, channels_last: bool) -> torch.nn.Module:
    if kind == "mulcon":
        model = MulCon(NUM_LABELS, options.backbone, False, options.embed_dim, 4, 128)
    else:
        model = Baseline(NUM_LABELS, options.backbone, False, 128)
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def train_step(model: torch.nn.Module, device: torch.device, precision: str, attention: str,
               objective: str) -> Callable[[torch.Tensor, torch.Tensor], None]:
    return training_step(model, device_type=device.type, precision=precision,
                         need_attention=attention == "explicit", contrastive=objective == "bce+lcon")


def synthetic_batch(options: argparse.Namespace, device: torch.device, channels_last: bool):
    generator = torch.Generator(device=device).manual_seed(0)
    size = (options.batch_size, 3, options.image_size, options.image_size)
    images = torch.randn(size, device=device, generator=generator)
    targets = (torch.rand(options.batch_size, NUM_LABELS, device=device, generator=generator) < 0.036).float()
    targets[:, 0] = 1.0  # every image has a label; L_con has positives (two rows share label 0)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images, targets


def time_steps(run_one: Callable[[], int], device: torch.device, warmup: int, steps: int,
               max_seconds: float) -> tuple[float, float]:
    """(images per second, seconds per step) over up to `steps` timed calls after `warmup`."""
    for _ in range(warmup):
        run_one()
    synchronize(device)
    started, done, images = time.perf_counter(), 0, 0
    while done < steps and (done < 2 or time.perf_counter() - started < max_seconds):
        images += run_one()
        done += 1
    synchronize(device)
    seconds = time.perf_counter() - started
    return images / seconds, seconds / done


def flops_per_image(kind: str, options: argparse.Namespace, device: torch.device) -> float:
    """Training FLOPs (forward + backward) of one image, counted on a batch of two."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build(kind, options, device, channels_last=False)
    images = torch.randn(2, 3, options.image_size, options.image_size, device=device)
    with FlopCounterMode(display=False) as counter:
        output = model(images, need_projections=False)
        output.logits.sum().backward()
    return counter.get_total_flops() / 2


def peak_tflops(device: torch.device, options: argparse.Namespace) -> tuple[float, float] | None:
    if options.peak_tflops:
        return options.peak_tflops, options.peak_tflops / 2
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peaks for key, peaks in PEAK_TFLOPS.items() if key in name), None)


def row_result(status: str, **fields) -> dict:
    return {"status": status, **fields}


def reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def run_synthetic(row: tuple, options, device, budget: Budget, flops: dict, peaks) -> dict:
    kind, precision, channels_last, compiled, attention, objective = row
    fields = dict(section="synthetic", model=kind, precision=precision, channels_last=channels_last,
                  compile=compiled, attention=attention if kind == "mulcon" else "-", objective=objective)
    estimate = options.compile_estimate_s if compiled else options.row_estimate_s
    if not budget.allows(estimate):
        return row_result(f"skipped: {max(budget.left(), 0):.0f} s of the budget left, the row needs about "
                          f"{estimate:.0f} s", **fields)
    reset_memory(device)
    model = build(kind, options, device, channels_last)
    if compiled:
        model = torch.compile(model, backend=options.compile_backend, mode=options.compile_mode)
    step = train_step(model, device, precision, attention, objective)
    images, targets = synthetic_batch(options, device, channels_last)

    def one_step() -> int:
        step(images, targets)
        return len(images)

    started = time.perf_counter()
    try:
        rate, seconds = time_steps(one_step, device, options.warmup, options.steps, options.max_seconds)
    except Exception as error:  # out of memory, or a compiler failure: report it, go on with the next row
        del model, step
        reset_memory(device)
        status = "out of memory" if isinstance(error, torch.OutOfMemoryError) else f"failed: {error!r}"[:120]
        return row_result(status, **fields)
    mfu = None
    if peaks is not None:
        peak = peaks[0] if precision == "bf16" else peaks[1]
        mfu = flops[kind] * rate / (peak * 1e12)
    result = row_result("ok", **fields, images_per_second=rate, ms_per_step=1e3 * seconds,
                        peak_memory_gib=peak_gib(device), mfu=mfu, row_seconds=time.perf_counter() - started)
    del model, step
    return result


def run_loader_rows(options, device, budget: Budget, flops: dict, peaks) -> list[dict]:
    """The real loader path: raw JPEGs and the image cache, alone and feeding the MulCon step;
    then nvJPEG decoding on the GPU."""
    names = [(source, fed) for source in ("raw_jpeg", "cache") for fed in ("loader only", "loader + mulcon step")]
    base = dict(section="loader", precision="bf16", channels_last=True, compile=False, attention="sdpa")
    if importlib.util.find_spec("pycocotools") is None:
        reason = "skipped: pycocotools is missing (see this file's docstring)"
    elif not budget.allows(options.loader_estimate_s):
        reason = f"skipped: {max(budget.left(), 0):.0f} s of the budget left"
    else:
        reason = None
    if reason is not None:
        return [row_result(reason, model=fed, objective=source, **base) for source, fed in names]
    from benchmarks.gpu_loader import decode_rate, loader_rates

    rows = []
    with tempfile.TemporaryDirectory(prefix="mulcon-gpu-bench-") as folder:
        # Each worker makes whole batches: an epoch of 4 batches per worker keeps all of them busy.
        repeats = -(-4 * options.batch_size * max(options.workers, 1) // options.loader_images)
        prepared = make_coco_like_dataset(Path(folder), options.loader_images, repeats=repeats)
        step = train_step(build("mulcon", options, device, channels_last=True), device, "bf16", "sdpa", "bce")
        for (source, fed), rate in loader_rates(prepared, options, device, step, NUM_LABELS).items():
            mfu = flops["mulcon"] * rate / (peaks[0] * 1e12) if peaks and fed != "loader only" else None
            rows.append(row_result("ok", model=fed, objective=source, images_per_second=rate,
                                   peak_memory_gib=peak_gib(device), mfu=mfu, **base))
        fields = dict(section="loader", model="decode_jpeg on GPU + resize", precision="-", channels_last=False,
                      compile=False, attention="-", objective="raw_jpeg")
        if device.type == "cuda":
            rows.append(row_result("ok", images_per_second=decode_rate(prepared, options, device), **fields))
        else:
            rows.append(row_result("skipped: needs CUDA", **fields))
    return rows


def speedups(rows: list[dict]) -> dict[str, float]:
    """What each option buys the MulCon step (against the default row: bf16, channels_last, SDPA,
    eager), and MulCon's step time over the Baseline's; only for rows that ran."""
    rate = {(row["model"], row["precision"], row["channels_last"], row["compile"], row["attention"],
             row["objective"]): row["images_per_second"]
            for row in rows if row["section"] == "synthetic" and row["status"] == "ok"}
    default = ("mulcon", "bf16", True, False, "sdpa", "bce")
    pairs = {"bf16 over fp32": (default, ("mulcon", "fp32", True, False, "sdpa", "bce")),
             "channels_last over NCHW": (default, ("mulcon", "bf16", False, False, "sdpa", "bce")),
             "SDPA over explicit softmax": (default, ("mulcon", "bf16", True, False, "explicit", "bce")),
             "compile over eager": (("mulcon", "bf16", True, True, "sdpa", "bce"), default),
             "MulCon step time / Baseline's": (("baseline", "bf16", True, False, "-", "bce"), default)}
    return {name: rate[fast] / rate[slow] for name, (fast, slow) in pairs.items() if fast in rate and slow in rate}


def report(rows: list[dict], options, device) -> None:
    def number(value, digits):
        return "-" if value is None else f"{value:.{digits}f}"

    table = [[row["section"], row["model"], row["precision"], "NHWC" if row["channels_last"] else "NCHW",
              "on" if row["compile"] else "off", row["attention"], row["objective"],
              number(row.get("images_per_second"), 1), number(row.get("ms_per_step"), 1),
              number(row.get("peak_memory_gib"), 1), number(100 * row["mfu"] if row.get("mfu") else None, 1),
              row["status"]] for row in rows]
    print_table(f"Benchmark 5: {options.backbone} at {options.image_size} px, batch {options.batch_size}, "
                f"on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}",
                ["section", "model / path", "precision", "layout", "compile", "attention", "objective / source",
                 "img/s", "ms/step", "peak GiB", "MFU %", "status"], table)
    if speedups(rows):
        print("  " + "; ".join(f"{name}: {value:.2f}x" for name, value in speedups(rows).items()))
    alone = {row["objective"]: row["images_per_second"] for row in rows
             if row["model"] == "loader only" and row["status"] == "ok"}
    if alone:
        print(f"  loader only, per worker ({options.workers} workers): "
              + ", ".join(f"{source} {rate / max(options.workers, 1):.0f} img/s" for source, rate in alone.items()))
    report_e2e(rows, options, device)
    mulcon = [row for row in rows if row["section"] == "synthetic" and row["model"] == "mulcon"
              and row["objective"] == "bce" and row["status"] == "ok"]
    if options.tiny or device.type != "cuda" or not mulcon:
        print(f"  target (>= {TARGET_IMAGES_PER_SECOND} MulCon img/s at 448 px on one H100): not judged on this run")
        return
    best = max(mulcon, key=lambda row: row["images_per_second"])
    met = best["images_per_second"] >= TARGET_IMAGES_PER_SECOND and options.image_size == 448
    print(f"  fastest MulCon training step: {best['images_per_second']:.0f} img/s ({best['precision']}, "
          f"{'channels_last' if best['channels_last'] else 'NCHW'}, compile {'on' if best['compile'] else 'off'}, "
          f"{best['attention']}); target >= {TARGET_IMAGES_PER_SECOND} img/s at 448 px: {'met' if met else 'NOT met'}")
    ratio = speedups(rows).get("MulCon step time / Baseline's")
    if ratio is not None:
        print(f"  MulCon step time / Baseline's: {ratio:.2f}x; target <= {TARGET_STEP_RATIO}: "
              f"{'met' if ratio <= TARGET_STEP_RATIO else 'NOT met'}")


TINY = {"backbone": "resnet18", "image_size": 32, "batch_size": 2, "embed_dim": 64, "warmup": 1, "steps": 2,
        "loader_images": 4, "loader_batches": 1, "workers": 1, "compile_backend": "eager",
        "e2e_images": 8, "e2e_batches": 2, "e2e_workers": 1,
        "compile_estimate_s": 5.0}  # --tiny: a CPU smoke run of every row (compile traced, not code-generated)


def options_for(argv: list[str] | None) -> argparse.Namespace:
    """The command line; with --tiny the TINY values are the defaults (explicit flags still win)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="ResNet-18, 32 px, batch 2, 2 steps (CPU smoke run)")
    parser.add_argument("--out", type=Path, help="write the rows and the machine to this JSON file (default: "
                        "<results-dir>/gpu-<device>.json, e.g. gpu-h200.json; none with --tiny)")
    parser.add_argument("--results-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backbone", default="resnet101")
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--embed-dim", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per row")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per row (at most)")
    parser.add_argument("--max-seconds", type=float, default=10.0, help="timed seconds per row (at most)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip the rows that would end past this")
    parser.add_argument("--row-estimate-s", type=float, default=20.0)
    parser.add_argument("--compile-estimate-s", type=float, default=150.0)
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--compile-mode", help="torch.compile mode, e.g. max-autotune-no-cudagraphs (default: none)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--loader-images", type=int, default=256, help="COCO-sized JPEGs for the loader rows")
    parser.add_argument("--loader-batches", type=int, default=30, help="timed batches per loader row (at most)")
    parser.add_argument("--loader-estimate-s", type=float, default=90.0)
    parser.add_argument("--workers", type=int, default=usable_cpus(), help="DataLoader worker processes")
    parser.add_argument("--sections", default="synthetic,e2e,loader",
                        help="the row sections to run, comma-separated (e.g. e2e for a rerun of those rows)")
    parser.add_argument("--e2e-images", type=int, default=2000, help="generated images of the end-to-end rows "
                        "(at least; more when the warm-up and timed batches need them)")
    parser.add_argument("--e2e-batches", type=int, default=30, help="timed batches per end-to-end row (at most)")
    parser.add_argument("--e2e-max-seconds", type=float, default=25.0, help="timed seconds per end-to-end row")
    parser.add_argument("--e2e-workers", type=int, default=max(1, usable_cpus() - 1),
                        help="loader workers of the end-to-end rows (one core is left to the training loop)")
    parser.add_argument("--e2e-estimate-s", type=float, default=60.0)
    parser.add_argument("--e2e-setup-estimate-s", type=float, default=60.0, help="generate, prepare, cache")
    parser.add_argument("--peak-tflops", type=float, help="the chip's dense bf16 peak, if not in PEAK_TFLOPS")
    if parser.parse_known_args(argv)[0].tiny:
        parser.set_defaults(**TINY)
    return parser.parse_args(argv)


def run(options: argparse.Namespace) -> dict:
    device = torch.device(options.device)
    budget = Budget(options.budget_s)
    torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick the fastest kernels
    flops = {kind: flops_per_image(kind, options, device) for kind in ("mulcon", "baseline")}
    peaks = peak_tflops(device, options)
    rows = []
    # Most important first (the budget drops rows from the end): the default step, its Baseline
    # and its L_con row, then the end-to-end rows, the compiled steps, the other options, the loader.
    order = EAGER_ROWS[:3] + ["e2e"] + ([] if options.no_compile else COMPILED_ROWS) + EAGER_ROWS[3:] + ["loader"]
    sections = set(options.sections.split(","))
    for row in order:
        if (row if isinstance(row, str) else "synthetic") not in sections:
            continue
        if row == "e2e":
            rows += run_e2e_rows(options, device, budget, flops["mulcon"], peaks[0] if peaks else None)
        elif row == "loader":
            rows += run_loader_rows(options, device, budget, flops, peaks)
        else:
            rows.append(run_synthetic(row, options, device, budget, flops, peaks))
            if "row_seconds" in rows[-1]:  # the next row of this kind is estimated from this one
                setattr(options, "compile_estimate_s" if row[3] else "row_estimate_s", 1.25 * rows[-1]["row_seconds"])
    report(rows, options, device)
    seconds = time.perf_counter() - budget.started
    print(f"  GFLOP per trained image: MulCon {flops['mulcon'] / 1e9:.1f}, Baseline {flops['baseline'] / 1e9:.1f}; "
          f"total {seconds:.0f} s")
    return {"benchmark": "gpu", "options": {key: str(value) for key, value in vars(options).items()},
            "gflops_per_trained_image": {kind: value / 1e9 for kind, value in flops.items()},
            "peak_tflops": peaks, "rows": rows, "speedups": speedups(rows),
            "end_to_end_over_synthetic": end_to_end_ratios(rows), "seconds": seconds, "machine": machine()}


def main(argv: list[str] | None = None) -> dict:
    options = options_for(argv)
    threads = torch.get_num_threads()
    if options.tiny:
        torch.set_num_threads(1)  # a smoke run: on a busy CPU one thread is faster than two
    try:
        result = run(options)
    finally:
        torch.set_num_threads(threads)
    out = options.out
    if out is None and not options.tiny:
        out = options.results_dir / f"gpu-{device_slug(torch.device(options.device))}.json"
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"  wrote {out}")
    return result


def device_slug(device: torch.device) -> str:
    """'h100', 'h200', 'h100-pcie', 'cpu': the name of the device's results file."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device)
    known = next((key for key in PEAK_TFLOPS if key in name), None)
    return (known or name.replace("NVIDIA ", "")).lower().replace(" ", "-")


if __name__ == "__main__":
    main(sys.argv[1:])
