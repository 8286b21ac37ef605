"""Load test of `peftlab serve`: 1, 4 and 16 LoRA adapters on one protein backbone.

Builds one short `protein-classify` LoRA run (2 training steps), copies it into N runs
whose LoRA and head weights are perturbed differently (so every adapter answers
differently), starts the real `peftlab serve` command on 127.0.0.1 for each N, and
sends a bounded number of requests (one sequence each, adapters round-robin) from
`--concurrency` client threads. Reports requests/s, p50/p99 latency, the server's RSS,
and N x the RSS of a server holding one adapter (one process per adapter).

    python benchmarks/serve_load.py [--backbone tiny|PATH] [--requests 300] [--concurrency 16] [--out serve_load.json]

Loopback only; nothing is downloaded (PEFTLAB_OFFLINE=1).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil


def build_runs(folder: Path, count: int, backbone: str) -> list[Path]:
    import peftlab
    import torch
    from peftlab.shared import io

    base = peftlab.run("protein-classify", demo=True, backbone=backbone, out=folder / "run_0",
                       overrides={"train.max_steps": 2, "train.epochs": 1, "train.batch_size": 8, "train.precision": "fp32",
                                  "eval.splits": ["test"], "data.limit": {"train": 16, "validation": 8, "test": 8}})
    runs = [base]
    for index in range(1, count):
        run_dir = folder / f"run_{index}"
        shutil.copytree(base, run_dir)
        generator = torch.Generator().manual_seed(index)
        for file in ("adapter_model.safetensors", "head.safetensors"):
            path = run_dir / "adapter" / file
            tensors = io.load_tensors(path)
            io.save_tensors(path, {k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in tensors.items()})
        runs.append(run_dir)
    return runs


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def request(url: str, body: dict | None = None, timeout: float = 60) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as response:
        return json.loads(response.read())


def start_server(runs: list[Path], port: int, log: Path, threads: int) -> subprocess.Popen:
    peftlab = Path(sys.executable).parent / "peftlab"
    command = [str(peftlab)] if peftlab.is_file() else [sys.executable, "-m", "peftlab.pipelines.cli"]
    named = [f"a{i}={run}" for i, run in enumerate(runs)]
    with log.open("w") as log_file:  # a file, not a pipe: a full pipe would stall the server
        process = subprocess.Popen([*command, "serve", *named, "--port", str(port), "--threads", str(threads)],
                                   stdout=subprocess.DEVNULL, stderr=log_file, text=True)
    deadline = time.time() + 300
    while True:
        try:
            request(f"http://127.0.0.1:{port}/health", timeout=5)
            return process
        except (urllib.error.URLError, ConnectionError):
            if process.poll() is not None:
                raise SystemExit(f"peftlab serve failed:\n{log.read_text()[-3000:]}") from None
            if time.time() > deadline:
                process.kill()
                raise SystemExit("peftlab serve did not start within 300 s") from None
            time.sleep(0.5)


def load_test(adapters: int, runs: list[Path], sequences: list[str], total: int, concurrency: int, max_seconds: float,
              threads: int) -> dict:
    port = free_port()
    started = time.perf_counter()
    server = start_server(runs[:adapters], port, runs[0].parent / f"serve_{adapters}.log", threads)
    load_seconds = time.perf_counter() - started
    url = f"http://127.0.0.1:{port}/predict/a{{}}"
    try:
        for i in range(min(8, total)):  # warm-up: first calls pay one-off costs
            request(url.format(i % adapters), {"sequences": [sequences[i]]})
        deadline = time.perf_counter() + max_seconds

        def one(i: int) -> float | None:
            if time.perf_counter() > deadline:
                return None
            begin = time.perf_counter()
            reply = request(url.format(i % adapters), {"sequences": [sequences[i % len(sequences)]]})
            assert len(reply["predictions"]) == 1
            return time.perf_counter() - begin

        begin = time.perf_counter()
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            latencies = [t for t in pool.map(one, range(total)) if t is not None]
        elapsed = time.perf_counter() - begin
        rss = psutil.Process(server.pid).memory_info().rss
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    ms = np.array(latencies) * 1000
    return {"adapters": adapters, "requests": len(latencies), "seconds": elapsed,
            "requests_per_s": len(latencies) / elapsed, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "server_rss_mb": rss / 2**20, "startup_s": load_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="tiny", help="protein backbone: tiny, or a local ESM-2 .pt file / EsmModel folder")
    parser.add_argument("--adapters", default="1,4,16", help="adapter counts to test")
    parser.add_argument("--requests", type=int, default=300, help="requests per adapter count (after 8 warm-up)")
    parser.add_argument("--concurrency", type=int, default=16, help="client threads")
    parser.add_argument("--max-seconds", type=float, default=120, help="stop sending after this long, per adapter count")
    parser.add_argument("--threads", type=int, default=1, help="the server's torch CPU threads")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    os.environ.setdefault("PEFTLAB_OFFLINE", "1")
    counts = [int(c) for c in args.adapters.split(",")]

    rng = np.random.default_rng(0)
    residues = np.array(list("ACDEFGHIKLMNPQRSTVWY"))
    lengths = np.clip(rng.lognormal(np.log(120), 0.5, size=256), 30, 400).astype(int)
    sequences = ["".join(rng.choice(residues, size=n)) for n in lengths]

    with tempfile.TemporaryDirectory() as tmp:
        runs = build_runs(Path(tmp), max(counts), args.backbone)
        results = [load_test(n, runs, sequences, args.requests, args.concurrency, args.max_seconds, args.threads)
                   for n in counts]
    single = next((r["server_rss_mb"] for r in results if r["adapters"] == 1), None)
    for row in results:
        row["one_process_per_adapter_rss_mb"] = None if single is None else single * row["adapters"]

    print(f"backbone {args.backbone}; {args.concurrency} concurrent clients; one sequence per request "
          f"(median {int(np.median(lengths))} residues); server on {args.threads} torch thread(s); "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print("| adapters | requests | req/s | p50 ms | p99 ms | server RSS MB | N x 1-adapter RSS MB |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        per_adapter = "-" if r["one_process_per_adapter_rss_mb"] is None else f"{r['one_process_per_adapter_rss_mb']:.0f}"
        print(f"| {r['adapters']} | {r['requests']} | {r['requests_per_s']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} "
              f"| {r['server_rss_mb']:.0f} | {per_adapter} |")
    if args.out:
        args.out.write_text(json.dumps({"backbone": args.backbone, "concurrency": args.concurrency, "threads": args.threads,
                                        "cpus": os.cpu_count(), "load_average": os.getloadavg()[0], "results": results}, indent=2))


if __name__ == "__main__":
    main()
