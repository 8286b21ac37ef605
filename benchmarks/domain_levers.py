"""Each pipeline's demo: training samples/s with peftlab's speed levers and without.

"with" is the pipeline's demo as it ships (`train.precision: auto`, which is bf16 where
the CPU has it, and frozen-feature caching where it applies); "without" sets
`train.precision=fp32 train.feature_cache_gb=0`. Length bucketing and fused attention
have no switch and are on in both. Each run is its own process, a fixed number of
steps, and the samples/s of its training loop (metrics.json) is reported.

    python benchmarks/domain_levers.py [--steps 20] [--pipelines protein-classify,speech-emotion]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

WITHOUT = ["train.precision=fp32", "train.feature_cache_gb=0"]


def pipelines() -> list[str]:
    from peftlab.pipelines.config import list_pipelines, read_recipe

    return [name for name in list_pipelines() if read_recipe(name).get("demo")]


def samples_per_s(pipeline: str, out: Path, steps: int, extra: list[str]) -> dict:
    command = [sys.executable, "-m", "peftlab.pipelines.cli", "run", pipeline, "--demo", "--out", str(out),
               f"train.max_steps={steps}", "train.epochs=100", "train.early_stopping_patience=null", "eval.splits=[]",
               *extra]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        return {"error": (result.stderr.strip().splitlines() or ["?"])[-1]}
    train = json.loads((out / "metrics.json").read_text())["train"]
    return {"samples_per_s": train["samples_per_s"], "precision": train["precision"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--pipelines", default=None, help="comma-separated; default: every pipeline with a demo")
    args = parser.parse_args()
    names = args.pipelines.split(",") if args.pipelines else pipelines()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            with_levers = samples_per_s(name, Path(tmp) / f"{name}-with", args.steps, [])
            without = samples_per_s(name, Path(tmp) / f"{name}-without", args.steps, WITHOUT)
            rows.append((name, with_levers, without))
            print(json.dumps({"pipeline": name, "with": with_levers, "without": without}), flush=True)
    print()
    print("| pipeline | samples/s with levers | samples/s without (fp32, no cache) | ratio |")
    print("|---|---|---|---|")
    for name, with_levers, without in rows:
        if "error" in with_levers or "error" in without:
            print(f"| {name} | {with_levers.get('error', '')} | {without.get('error', '')} | |")
            continue
        print(f"| {name} | {with_levers['samples_per_s']:.1f} ({with_levers['precision']}) | "
              f"{without['samples_per_s']:.1f} | {with_levers['samples_per_s'] / without['samples_per_s']:.2f}x |")


if __name__ == "__main__":
    main()
