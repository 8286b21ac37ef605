"""`peftlab run --num-processes N`: start N DDP processes of the same command here.

Kept free of heavy imports (no torch): the launching process only starts and watches
its workers, which set up the process group themselves (see `shared/training.py`).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time


def launch(argv: list[str], processes: int) -> int:
    """`peftlab ARGV` as `processes` DDP processes on this machine (gloo on CPU, NCCL on
    GPUs), set up the way torchrun sets up its workers. Returns the exit code of the
    first process that failed (the others are then stopped: they would wait for it
    forever), else 0. Several machines: start each with torchrun or `accelerate launch`."""
    with socket.socket() as probe:  # a free port for the process group's rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    threads = max(1, (os.cpu_count() or 1) // processes)  # the processes share the cores
    workers = []
    for rank in range(processes):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(processes),
               "RANK": str(rank), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(processes)}
        env.setdefault("OMP_NUM_THREADS", str(threads))
        workers.append(subprocess.Popen([sys.executable, "-m", "peftlab.pipelines.cli", *argv], env=env))
    failed = None
    try:
        while failed is None and any(w.poll() is None for w in workers):
            failed = next((w.returncode for w in workers if w.returncode not in (None, 0)), None)
            time.sleep(0.1)
        failed = failed if failed is not None else next((w.returncode for w in workers if w.returncode), None)
    except KeyboardInterrupt:
        failed = 130
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.terminate()
        for worker in workers:
            try:
                worker.wait(timeout=10)
            except subprocess.TimeoutExpired:
                worker.kill()
    return failed or 0
