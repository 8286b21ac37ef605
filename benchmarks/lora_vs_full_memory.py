"""Peak resident memory of LoRA training against full fine-tuning, same model and batch.

`protein-classify` on the ESM-2 35M architecture (random weights), batch 8, sequences
of 30-1000 residues (median ~300), bf16 autocast as `precision: auto` picks here. Each
run is its own process, so each peak (Linux VmHWM, as metrics.json reports it) is that
run's alone; the import-only baseline of a process is printed for scale. Each method
runs as it is and with `train.activation_checkpointing=true`. Printed: each run's peak,
trainable parameters and samples/s, and the peak ratios LoRA / full (the issue's figure:
default settings, target <= 0.5) and with checkpointing.

Measured on this project's 2-core CPU (torch 2.11 CUDA wheel, 12 steps) - see the README's
"Speed and memory" section for the figures and where LoRA's peak goes.

    python benchmarks/lora_vs_full_memory.py [--steps 12] [--architecture esm2_t12_35M_UR50D]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from protein_training_speed import BATCH, make_sequences, write_inputs

# What a run imports before its first step: the protein pipeline and the libraries
# training loads at start-up (light commands such as `peftlab list` load fewer).
BASELINE = ("import peftlab.pipelines.cli, peftlab.domains.protein.tasks, accelerate, peft.helpers, sklearn.metrics, "
            "transformers.optimization; from peftlab.shared.training import peak_rss_mb; print(peak_rss_mb())")


def train_peak(backbone: Path, card: Path, out: Path, method: str, steps: int, extra: list[str]) -> dict:
    command = [sys.executable, "-m", "peftlab.pipelines.cli", "run", "protein-classify", "--backbone", str(backbone),
               "--data", str(card), "--method", method, "--out", str(out), f"train.max_steps={steps}",
               "train.epochs=1", f"train.batch_size={BATCH}", "eval.splits=[test]", *extra]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = json.loads((out / "metrics.json").read_text())
    return {"peak_rss_mb": metrics["train"]["peak_rss_mb"], "trainable": metrics["params"]["trainable"],
            "samples_per_s": metrics["train"]["samples_per_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--architecture", default="esm2_t12_35M_UR50D")
    parser.add_argument("--methods", default="lora,full")
    parser.add_argument("--no-checkpointing-runs", action="store_true", help="skip the activation-checkpointing runs")
    parser.add_argument("extra", nargs="*", help="key=value overrides for every run")
    args = parser.parse_args()
    train = make_sequences(args.steps * BATCH, seed=0)
    test = make_sequences(BATCH, seed=2)
    baseline = float(subprocess.run([sys.executable, "-c", BASELINE], check=True, capture_output=True, text=True).stdout)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        backbone, card = write_inputs(folder, train, test, test, architecture=args.architecture)
        for method in args.methods.split(","):
            for recompute in (False,) if args.no_checkpointing_runs else (False, True):
                label = f"{method}+checkpointing" if recompute else method
                extra = [*args.extra, f"train.activation_checkpointing={str(recompute).lower()}"]
                results[label] = train_peak(backbone, card, folder / label, method, args.steps, extra)
                print(f"{label}: peak RSS {results[label]['peak_rss_mb']:.0f} MiB, "
                      f"{results[label]['trainable']:,} trainable parameters, "
                      f"{results[label]['samples_per_s']:.2f} samples/s", flush=True)
    print(f"process baseline (imports only): {baseline:.0f} MiB")
    ratios = {}
    # the first is the figure: same model and batch, default settings (target <= 0.5)
    for lora, full in [("lora", "full"), ("lora+checkpointing", "full"), ("lora+checkpointing", "full+checkpointing")]:
        if {lora, full} <= results.keys():
            ratios[f"{lora} / {full}"] = results[lora]["peak_rss_mb"] / results[full]["peak_rss_mb"]
            print(f"{lora} / {full} peak RSS: {ratios[f'{lora} / {full}']:.2f}")
    print(json.dumps({"architecture": args.architecture, "baseline_mb": round(baseline), **results,
                      "ratios": {k: round(v, 3) for k, v in ratios.items()}}))


if __name__ == "__main__":
    main()
