"""Training speed of `protein-classify` + LoRA on the ESM-2 8M architecture.

Sequences of realistic lengths (30-1000 residues, log-normal, median ~300), batch 8,
LoRA r=8 on attention k/v. The backbone is the esm2_t6_8M_UR50D architecture with
random weights, written as an official-format fair-esm file so it loads through the
same path as a user's checkpoint (speed does not depend on the weights' values).

    python benchmarks/protein_classify_speed.py [--steps 40] [--precision auto|bf16|fp32]

Prints samples/s and peak RSS (the run's metrics.json `train` section).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import peftlab
import torch
from peftlab.domains.protein.backbones import ESM2_ARCHITECTURES, ESMEncoder
from peftlab.domains.protein.data import STANDARD_RESIDUES


def write_backbone(folder: Path) -> Path:
    layers, width, heads = ESM2_ARCHITECTURES["esm2_t6_8M_UR50D"]
    torch.manual_seed(0)
    encoder = ESMEncoder(layers, width, heads)
    cfg = argparse.Namespace(encoder_layers=layers, encoder_embed_dim=width, encoder_attention_heads=heads, token_dropout=True)
    path = folder / "esm2_t6_8M_UR50D.pt"
    torch.save({"model": {f"encoder.sentence_encoder.{k}": v for k, v in encoder.state_dict().items()},
                "cfg": {"model": cfg}}, path)
    return path


def write_data(folder: Path, count: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(300), 0.6, size=count), 30, 1000).astype(int)
    residues = np.array(list(STANDARD_RESIDUES))
    rows = ["sequence,label"] + [f"{''.join(rng.choice(residues, size=n))},{i % 2}" for i, n in enumerate(lengths)]
    (folder / "seqs.csv").write_text("\n".join(rows) + "\n")
    card = folder / "card.md"
    card.write_text("---\nname: speed\ndomain: protein\ntask: protein-classify\nformat: csv\n"
                    "files: {data: seqs.csv}\nlabels: [a, b]\n"
                    "splits: {ratios: {train: 0.9, validation: 0.05, test: 0.05}, seed: 0}\n---\n"
                    "Random sequences with realistic lengths, for timing only.\n")
    print(f"sequence lengths: median {int(np.median(lengths))}, min {lengths.min()}, max {lengths.max()}")
    return card


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        backbone = write_backbone(folder)
        card = write_data(folder, count=int(args.steps * args.batch_size / 0.9) + 64)
        run_dir = peftlab.run(
            "protein-classify", backbone=str(backbone), data=str(card), out=folder / "run",
            overrides={"method.r": 8, "train.max_steps": args.steps, "train.epochs": 1,
                       "train.batch_size": args.batch_size, "train.precision": args.precision,
                       "eval.splits": ["test"]},
        )
        train = json.loads((run_dir / "metrics.json").read_text())["train"]
    print(json.dumps({"samples_per_s": round(train["samples_per_s"], 2), "peak_rss_mb": round(train["peak_rss_mb"]),
                      "steps": train["steps"], "seconds": round(train["seconds"], 1), "precision": train["precision"]}))


if __name__ == "__main__":
    main()
