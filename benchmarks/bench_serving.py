"""Soak of the served model: a registered model under `mlflow models serve` on 127.0.0.1, many
requests from concurrent clients, some of them malformed, as users (and attackers) send them.

Every valid request must answer 200 with the labels `python -m mulcon predict` gives for the same
image, every malformed one 400 (non-image bytes, bad base64, a 196-megapixel PNG, an empty body,
a file path of the server), the server must still answer after, and its memory (the resident set
of the server and its workers, measured after a warm-up of 4 requests per client and after the
soak) must stay flat. Latencies are per request, malformed ones included.

    python -m benchmarks.bench_serving --model models:/mulcon-demo@champion --params params.yaml \\
        --images data/demo/val2014 [--requests 2000 --clients 8 --malformed 0.15]

MLFLOW_TRACKING_URI names the registry. The run is bounded: each request waits at most
`--request-timeout` seconds, the whole soak at most `--max-seconds`.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import random
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import psutil
from PIL import Image

from benchmarks.common import machine

MALFORMED_KINDS = ("non-image bytes", "bad base64", "196-megapixel image", "empty body", "server path")
FLAT_MEMORY_MIB = 64  # the growth of the server's RSS accepted as flat (allocator noise, warm caches)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def serve(model_uri: str, log_path: Path, environment: dict[str, str] | None = None,
          startup_seconds: float = 240) -> Iterator[tuple[str, subprocess.Popen]]:
    """`mlflow models serve -m model_uri` (local environment, one worker) on a free port of 127.0.0.1;
    yields its URL and process, stopped after."""
    port = free_port()
    mlflow = Path(sys.executable).parent / "mlflow"
    with open(log_path, "w") as log:
        server = subprocess.Popen([str(mlflow), "models", "serve", "-m", model_uri, "--env-manager", "local",
                                   "-h", "127.0.0.1", "-p", str(port), "-w", "1"], env=environment or dict(os.environ),
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + startup_seconds
            while True:
                if server.poll() is not None:
                    raise RuntimeError(f"mlflow models serve exited with {server.returncode}; see {log_path}")
                try:
                    urllib.request.urlopen(f"{url}/ping", timeout=2).read()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{url} did not answer within {startup_seconds:g} s") from None
                    time.sleep(0.3)
            yield url, server
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, 15)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, 9)
                server.wait()


def server_rss_mib(server: subprocess.Popen) -> float:
    """Resident memory of the server and all its child processes (the workers), in MiB."""
    process = psutil.Process(server.pid)
    total = 0
    for member in [process, *process.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += member.memory_info().rss
    return total / 2**20


def bomb_png() -> bytes:
    """A 14,000 x 14,000 PNG (196 megapixels, over PIL's decompression-bomb limit): 24 kB on the wire."""
    buffer = io.BytesIO()
    Image.new("1", (14_000, 14_000)).save(buffer, format="PNG")
    return buffer.getvalue()


def malformed_bodies(server_path: str) -> dict[str, bytes]:
    """One request body of each malformed kind (all JSON but the empty body)."""
    def body(image: str) -> bytes:
        return json.dumps({"dataframe_records": [{"image": image}]}).encode()

    return {"non-image bytes": body(base64.b64encode(b"GIF89a but not an image at all").decode()),
            "bad base64": body("iVBORw0KGgo!!*not base64*"),
            "196-megapixel image": body(base64.b64encode(bomb_png()).decode()),
            "empty body": b"",
            "server path": body(server_path)}


def expected_labels(model_uri: str, params_file: str, images: list[str], threshold: float,
                    environment: dict[str, str] | None = None) -> list[list[str]]:
    """The labels `python -m mulcon predict --json` gives each image (the CLI users run)."""
    result = subprocess.run([sys.executable, "-m", "mulcon", "predict", "--params", params_file, "--model", model_uri,
                             "--threshold", str(threshold), "--json", *images], capture_output=True, text=True,
                            timeout=600, env=environment or dict(os.environ))
    if result.returncode != 0:
        raise RuntimeError(f"predict failed: {result.stderr.strip().splitlines()[-1:]}")
    return [answer["labels"] for answer in json.loads(result.stdout)]


def answered_error(text: str) -> str:
    """The model's own error message in a 400 answer: MLflow's server prefixes it with the request's
    data ("Failed to predict data '...'. Error: ..."), i.e. what the client sent."""
    try:
        message = str(json.loads(text).get("message", text))
    except (ValueError, AttributeError):
        message = text
    return message.rsplit("\nError: ", 1)[-1]


def _post(url: str, body: bytes, timeout: float) -> tuple[int, str, float]:
    request = urllib.request.Request(f"{url}/invocations", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            status, text = answer.status, answer.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as error:
        status, text = error.code, error.read().decode("utf-8", "replace")
    except OSError as error:  # no answer within the timeout, or the connection dropped
        status, text = 0, f"{type(error).__name__}: {error}"
    return status, text, time.perf_counter() - started


def soak(url: str, server: subprocess.Popen, images: list[str], labels: list[list[str]], *, threshold: float,
         requests: int, clients: int, malformed_fraction: float, server_path: str, seed: int = 0,
         request_timeout: float = 60, max_seconds: float = 1800) -> dict[str, Any]:
    """Send `requests` requests from `clients` threads, `malformed_fraction` of them malformed
    (the kinds in turn), and check every answer; returns the figures and the failures (at most 20)."""
    payloads = [json.dumps({"dataframe_records": [{"image": base64.b64encode(Path(path).read_bytes()).decode()}],
                            "params": {"threshold": threshold}}).encode() for path in images]
    bad = malformed_bodies(server_path)
    rng = random.Random(seed)
    malformed = set(rng.sample(range(requests), round(requests * malformed_fraction)))
    plan, sent_malformed = [], 0
    for index in range(requests):
        if index in malformed:
            plan.append(("malformed", MALFORMED_KINDS[sent_malformed % len(MALFORMED_KINDS)]))
            sent_malformed += 1
        else:
            plan.append(("valid", index % len(images)))
    # Warm-up at the soak's concurrency (the server's thread pool and allocator reach their working
    # size), so that `rss_before` is the working set and any growth after it is what the soak added.
    with ThreadPoolExecutor(clients) as pool:
        warm = list(pool.map(lambda i: _post(url, payloads[i % len(payloads)], request_timeout), range(clients * 4)))
    if any(status != 200 for status, _, _ in warm):
        raise RuntimeError(f"the server answered a warm-up request {[w[0] for w in warm]}: {warm[0][1][:300]}")
    rss_before = server_rss_mib(server)
    deadline = time.monotonic() + max_seconds

    def one(item: tuple[str, Any]) -> dict[str, Any]:
        if time.monotonic() > deadline:
            return {"kind": item[1] if item[0] == "malformed" else "valid", "ok": False, "seconds": 0.0,
                    "why": "not sent: the soak ran past --max-seconds"}
        if item[0] == "valid":
            status, text, seconds = _post(url, payloads[item[1]], request_timeout)
            got = json.loads(text)["predictions"][0]["labels"] if status == 200 else None
            ok = status == 200 and got == labels[item[1]]
            return {"kind": "valid", "ok": ok, "seconds": seconds,
                    "why": "" if ok else f"{status}: {got if status == 200 else text[:200]}"}
        status, text, seconds = _post(url, bad[item[1]], request_timeout)
        ok = status == 400 and "Traceback" not in text and server_path not in answered_error(text)
        return {"kind": item[1], "ok": ok, "seconds": seconds, "why": "" if ok else f"{status}: {text[:200]}"}

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        outcomes = list(pool.map(one, plan))
    wall = time.perf_counter() - started
    alive = server.poll() is None and _post(url, payloads[0], request_timeout)[0] == 200
    rss_after = server_rss_mib(server) if server.poll() is None else float("nan")
    latencies = np.array([o["seconds"] for o in outcomes if o["seconds"] > 0]) * 1000
    valid = [o for o in outcomes if o["kind"] == "valid"]
    by_kind = {kind: sum(o["kind"] == kind for o in outcomes) for kind in MALFORMED_KINDS}
    return {"requests": requests, "clients": clients, "valid": len(valid), "malformed": by_kind,
            "valid_ok": sum(o["ok"] for o in valid), "malformed_ok": sum(o["ok"] for o in outcomes if o["kind"] != "valid"),
            "wall_seconds": round(wall, 2), "requests_per_second": round(requests / wall, 2),
            "p50_ms": round(float(np.percentile(latencies, 50)), 1), "p99_ms": round(float(np.percentile(latencies, 99)), 1),
            "valid_p50_ms": round(float(np.percentile([o["seconds"] * 1000 for o in valid], 50)), 1),
            "rss_before_mib": round(rss_before, 1), "rss_after_mib": round(rss_after, 1),
            "memory_flat": bool(rss_after - rss_before <= FLAT_MEMORY_MIB), "server_alive": bool(alive),
            "failures": [o for o in outcomes if not o["ok"]][:20]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="registered model URI, e.g. models:/mulcon-demo@champion")
    parser.add_argument("--params", default="params.yaml", help="params file for `predict` (default: params.yaml)")
    parser.add_argument("--images", required=True, help="folder of JPEG images to send (the first --num-images)")
    parser.add_argument("--num-images", type=int, default=32)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--malformed", type=float, default=0.15, help="fraction of malformed requests")
    parser.add_argument("--threshold", type=float, default=0.3)
    parser.add_argument("--request-timeout", type=float, default=60)
    parser.add_argument("--max-seconds", type=float, default=1800)
    parser.add_argument("--log", default="serve.log", help="the server's log file")
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args(argv)
    images = sorted(str(path) for path in Path(args.images).glob("*.jpg"))[: args.num_images]
    if not images:
        parser.error(f"--images {args.images}: no .jpg file")
    labels = expected_labels(args.model, args.params, images, args.threshold)
    environment = {key: value for key, value in os.environ.items() if key != "MULCON_SERVE_IMAGE_ROOT"}
    with serve(args.model, Path(args.log), environment) as (url, server):
        result = soak(url, server, images, labels, threshold=args.threshold, requests=args.requests,
                      clients=args.clients, malformed_fraction=args.malformed, server_path=str(Path(images[0]).resolve()),
                      request_timeout=args.request_timeout, max_seconds=args.max_seconds)
    result = {"benchmark": "serving", "model": args.model, "machine": machine(), **result}
    print(f"{result['requests']} requests from {result['clients']} clients in {result['wall_seconds']} s "
          f"({result['requests_per_second']}/s): valid {result['valid_ok']}/{result['valid']} answered 200 with "
          f"predict's labels, malformed {result['malformed_ok']}/{result['requests'] - result['valid']} answered 400; "
          f"p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms; server RSS {result['rss_before_mib']} -> "
          f"{result['rss_after_mib']} MiB ({'flat' if result['memory_flat'] else 'GREW'}); server "
          f"{'alive' if result['server_alive'] else 'DOWN'}")
    for failure in result["failures"]:
        print(f"  failed {failure['kind']}: {failure['why']}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    passed = (result["valid_ok"] == result["valid"] and result["malformed_ok"] == result["requests"] - result["valid"]
              and result["server_alive"] and result["memory_flat"])
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
