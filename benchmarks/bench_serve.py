"""Requests/s and p50/p95 latency of the image server over loopback HTTP, at several concurrencies,
per backend this machine has, beside the runner's own batch-``max_batch`` images/s.

Each backend gets a server in this process (``export/serve.py``'s app under uvicorn on 127.0.0.1);
``--concurrency`` clients send 1-image requests (prompts and seeds varying, so K/V caching and
batching both happen as they would in service) until ``--requests`` answers or ``--seconds`` pass.
Rows go to benchmarks/results/results.csv: ``serve/http`` (median_ms/p95_ms = request latency,
images_per_s = throughput) and ``serve/runner`` (the runner alone, one batch of ``max_batch``).
The target on a GPU is HTTP throughput >= 90% of the runner's batch images/s.

    python benchmarks/bench_serve.py [--student DIR] [--concurrency 1,4,16] [--requests 64]
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_rows
from opad.export import export_onnx
from opad.export.runtime import Runner
from opad.export.server.app import Settings, build_app
from opad.export.server.launch import ThreadedServer

from opad.devices import pick_device

PROMPTS = ["a photo of a dog", "a dog on the beach", "a dog in the snow", "a watercolor painting of a dog"]


def _post(port: int, body: dict) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", "/v1/images/generations", body=json.dumps(body),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def load(port: int, concurrency: int, requests: int, seconds: float) -> dict:
    """``concurrency`` clients in a closed loop; latency quantiles in ms and answers per second."""
    latencies: list[float] = []
    failures: list[int] = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds
    counter = iter(range(10**9))

    def client() -> None:
        while time.perf_counter() < stop_at:
            with lock:
                i = next(counter)
                if i >= requests:
                    return
            start = time.perf_counter()
            status = _post(port, {"prompt": PROMPTS[i % len(PROMPTS)], "seed": i, "n": 1})
            with lock:
                (latencies if status == 200 else failures).append((time.perf_counter() - start) * 1000)

    began = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - began
    if failures:
        raise SystemExit(f"{len(failures)} requests failed at concurrency {concurrency}")
    q = statistics.quantiles(latencies, n=20) if len(latencies) > 1 else latencies * 19
    return {"median_ms": statistics.median(latencies), "p20_ms": q[3], "p80_ms": q[15], "p95_ms": q[18],
            "peak_mem_mb": None, "images_per_s": len(latencies) / elapsed}


def runner_images_per_s(runner: Runner, batch: int, repeats: int = 5) -> float:
    items = [(None, PROMPTS[i % len(PROMPTS)], i) for i in range(batch)]
    runner.run_batch(items, 1)  # warm (and cache the K/V)
    start = time.perf_counter()
    for _ in range(repeats):
        runner.run_batch(items, 1)
    return batch * repeats / (time.perf_counter() - start)


def runners(args: argparse.Namespace, device: torch.device, tmp: str):
    yield "eager", lambda: Runner("eager", student=args.student, device=str(device), torch_conditioning=True)
    if device.type == "cuda":
        yield "compiled", lambda: Runner("compiled", student=args.student, device=str(device), torch_conditioning=True)
    if importlib.util.find_spec("onnxruntime") is None:
        print("onnxruntime is not installed: its rows are skipped", file=sys.stderr)
        return
    argv = ["--out", f"{tmp}/onnx", "--steps", "1", "--no-single", "--batch-range", f"1:{args.max_batch}"]
    argv += ["--student", args.student] if args.student else []
    if export_onnx.main(argv) != 0:
        raise SystemExit("the ONNX export failed")
    yield "onnxruntime", lambda: Runner("onnxruntime", student=args.student, onnx={None: f"{tmp}/onnx"},
                                        torch_conditioning=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--requests", type=int, default=64, help="answers per concurrency level (at most)")
    p.add_argument("--seconds", type=float, default=30.0, help="time per concurrency level (at most)")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--batch-window-ms", type=float, default=5.0)
    args = p.parse_args(argv)
    device = pick_device(args.device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for backend, make in runners(args, device, tmp):
            settings = Settings(max_batch=args.max_batch, batch_window_ms=args.batch_window_ms, queue=1024)
            served = build_app(make, None, settings)  # every torch call on the server's one model thread
            reference = served.model.run(runner_images_per_s, served.runner, args.max_batch)
            rows.append({"name": "serve/runner", "provider": backend, "shape": f"batch={args.max_batch}",
                         "images_per_s": reference})
            server = ThreadedServer(served.app)
            try:
                while _ready(server.port) != 200:
                    time.sleep(0.05)
                for c in [int(c) for c in args.concurrency.split(",")]:
                    row = load(server.port, c, args.requests, args.seconds)
                    rows.append({"name": "serve/http", "provider": backend, "shape": f"concurrency={c},n=1", **row})
                    print(f"{backend:12s} concurrency {c:3d}: p50 {row['median_ms']:8.1f} ms  p95 "
                          f"{row['p95_ms']:8.1f} ms  {row['images_per_s']:7.1f} img/s  "
                          f"({row['images_per_s'] / reference:.0%} of the runner's batch-{args.max_batch} "
                          f"{reference:.1f} img/s)", file=sys.stderr)
            finally:
                server.stop()
    print(write_rows(rows, device))
    return 0


def _ready(port: int) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/ready")
        return conn.getresponse().status
    except OSError:
        return 0
    finally:
        conn.close()


if __name__ == "__main__":
    sys.exit(main())
