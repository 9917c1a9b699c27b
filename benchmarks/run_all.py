"""Run every benchmark of issue 5, each in its own process, and print a summary of the targets.

    python -m benchmarks.run_all [--quick] [--gpu] [--out benchmarks/results.json]

Benchmarks 1 to 4 run on the CPU (about 5 minutes on a 2-core machine); benchmark 5
(`benchmarks/gpu.py`) runs when CUDA is available or --gpu is given, and in its CPU smoke size
with --quick. Each benchmark measures its baseline in its own process and prints its figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python benchmarks/run_all.py` works too

from benchmarks.common import machine, print_table  # noqa: E402

BENCHMARKS = ["bench_train_step", "bench_metrics", "bench_contrastive", "bench_input"]


def run_one(module: str, arguments: list[str], out: Path) -> dict:
    """Run benchmarks/<module>.py with `arguments`, its output passing through; returns its JSON.

    gpu.py runs as a file (`python benchmarks/gpu.py`), the way a GPU machine runs it alone.
    """
    environment = {**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}  # no progress bars in the log
    target = [str(ROOT / "benchmarks" / "gpu.py")] if module == "gpu" else ["-m", f"benchmarks.{module}"]
    completed = subprocess.run([sys.executable, *target, *arguments, "--out", str(out)], cwd=ROOT, env=environment,
                               check=False)
    if completed.returncode != 0:
        return {"benchmark": module, "error": f"exit status {completed.returncode}"}
    return json.loads(out.read_text(encoding="utf-8"))


def summary_rows(results: list[dict]) -> list[list[str]]:
    rows = []
    for result in results:
        if "error" in result:
            rows.append([result["benchmark"], "-", "-", f"failed ({result['error']})"])
        elif "verdict" in result:
            figure = next(result[key] for key in ("mulcon_to_baseline", "speedup", "cache_to_raw") if key in result)
            rows.append([result["benchmark"], f"{figure:.2f}x", result["verdict"], ""])
        elif result["benchmark"] == "gpu":
            headline = result["rows"][0]
            rate = headline.get("images_per_second")
            rows.append(["gpu", "-" if rate is None else f"{rate:.0f} img/s", "target >= 1200 img/s on one H100",
                         "judged on a GPU run only" if result["machine"]["gpu"] is None else ""])
        else:
            rows.append([result["benchmark"], f"{result['speedup']:.1f}x", "no target", ""])
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="every benchmark at its tiny size (for tests)")
    parser.add_argument("--gpu", action="store_true", help="run benchmarks/gpu.py even without CUDA")
    parser.add_argument("--out", type=Path, help="write all figures to this JSON file")
    options = parser.parse_args(argv)
    import torch

    results = []
    with tempfile.TemporaryDirectory(prefix="mulcon-bench-") as folder:
        for module in BENCHMARKS:
            results.append(run_one(module, ["--quick"] if options.quick else [], Path(folder) / f"{module}.json"))
        if options.quick or options.gpu or torch.cuda.is_available():
            results.append(run_one("gpu", ["--tiny"] if options.quick else [], Path(folder) / "gpu.json"))
        else:
            print("\nBenchmark 5 (benchmarks/gpu.py): skipped, no CUDA device; run `python benchmarks/gpu.py` "
                  "on a GPU")
    print_table("Summary", ["benchmark", "figure", "target", "note"], summary_rows(results))
    if options.out is not None:
        options.out.parent.mkdir(parents=True, exist_ok=True)
        options.out.write_text(json.dumps({"machine": machine(), "results": results}, indent=2) + "\n",
                               encoding="utf-8")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
