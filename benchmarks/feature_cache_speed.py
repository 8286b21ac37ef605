"""Frozen-feature caching: time per epoch with and without it, and the same results.

`protein-classify` on the ESM-2 8M architecture (random weights), sequences of 30-1000
residues, batch 8, for methods that leave the bottom of the encoder frozen: a linear
probe (only the head trains), `freeze_layers` with the last block training, and LoRA
on the last layer. Each runs with the cache (`train.feature_cache_gb`, the default) and
without it (`train.feature_cache_gb=0`); the first epoch computes and stores the frozen
outputs, later epochs reuse them.

With one of L layers training, an epoch without the cache costs about L forward layers
plus the trained layer's backward (~2 more); with it, ~3: the speed-up is bounded near
(L + 2) / 3, 2.7x on the 6-layer 8M model. `--architecture esm2_t30_150M_UR50D` (30
layers) shows the deep-model case, the one users fine-tune.

    python benchmarks/feature_cache_speed.py [--epochs 3] [--steps-per-epoch 10]
        [--architecture esm2_t6_8M_UR50D] [--methods "linear probe,LoRA on the last layer"]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import peftlab
from peftlab.shared import io
from protein_training_speed import ARCHITECTURE, BATCH, make_sequences, write_inputs

METHODS = {
    "linear probe": ("freeze_layers", {"method.trainable_blocks": 0, "method.train_after_blocks": False}),
    "freeze_layers (last block trains)": ("freeze_layers", {"method.trainable_blocks": 1}),
    "LoRA on the last layer": ("lora", {"method.layers": "last_1", "method.dropout": 0.0}),
}


def train(folder: Path, backbone: Path, card: Path, label: str, method: tuple, epochs: int, cache: bool) -> dict:
    out = folder / f"{label}-{cache}".replace(" ", "_")
    name, options = method
    peftlab.run("protein-classify", backbone=str(backbone), data=str(card), method=name, out=out, overrides={
        **options, "train.epochs": epochs, "train.batch_size": BATCH, "train.early_stopping_patience": None,
        "train.feature_cache_gb": 4.0 if cache else 0.0, "eval.splits": ["test"]})
    metrics = json.loads((out / "metrics.json").read_text())
    return {"epoch_seconds": metrics["train"]["epoch_seconds"], "test": metrics["test"],
            "head": io.load_tensors(out / "adapter" / "head.safetensors")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps-per-epoch", type=int, default=10)
    parser.add_argument("--architecture", default=ARCHITECTURE, help="an ESM-2 architecture name (random weights)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from: " + ", ".join(METHODS))
    args = parser.parse_args()
    chosen = [m.strip() for m in args.methods.split(",")]
    if unknown := set(chosen) - set(METHODS):
        parser.error(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    train_set = make_sequences(args.steps_per_epoch * BATCH, seed=0)
    validation, test = make_sequences(16, seed=1), make_sequences(32, seed=2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        backbone, card = write_inputs(folder, train_set, validation, test, architecture=args.architecture)
        print(f"{args.architecture}, {len(train_set[0])} training sequences, {args.epochs} epochs", flush=True)
        for label in chosen:
            method = METHODS[label]
            cached = train(folder, backbone, card, label, method, args.epochs, cache=True)
            plain = train(folder, backbone, card, label, method, args.epochs, cache=False)
            later_cached = float(np.mean(cached["epoch_seconds"][1:]))
            later_plain = float(np.mean(plain["epoch_seconds"][1:]))
            head_difference = max((cached["head"][k] - plain["head"][k]).abs().max().item() for k in plain["head"])
            rows.append({"method": label, "first_epoch_s": [round(cached["epoch_seconds"][0], 2), round(plain["epoch_seconds"][0], 2)],
                         "later_epoch_s": [round(later_cached, 2), round(later_plain, 2)],
                         "speedup_after_first": round(later_plain / later_cached, 1),
                         "test_accuracy": [cached["test"]["accuracy"], plain["test"]["accuracy"]],
                         "head_max_difference": head_difference})
            print(json.dumps(rows[-1]), flush=True)
    print()
    print("| method | first epoch s (cache / none) | later epochs s (cache / none) | speed-up after the first | "
          "test accuracy (cache / none) | head max abs difference |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['method']} | {row['first_epoch_s'][0]} / {row['first_epoch_s'][1]} | "
              f"{row['later_epoch_s'][0]} / {row['later_epoch_s'][1]} | {row['speedup_after_first']}x | "
              f"{row['test_accuracy'][0]:.3f} / {row['test_accuracy'][1]:.3f} | {row['head_max_difference']:.1e} |")


if __name__ == "__main__":
    main()
