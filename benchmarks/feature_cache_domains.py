"""Frozen-feature caching in medical imaging, speech emotion and point clouds: seconds
per training epoch with and without it, and the same head at the end.

Each domain's demo data, on a backbone bigger than the demo's (the demo models are so
small that a step is mostly Python overhead): a random-init ViT-S/16 at 64 px
(`medical-classify`, `task.augment=false`), a random-init WavLM with the real 7-layer
512-channel CNN and 4 layers of width 256, dropout off (`speech-emotion`; written to a
temporary folder, as a local checkpoint would be), Point-BERT `small` on 1024 points
(`pointcloud-classify`, `task.augment=false`). Per domain, a linear probe and one
partial method, each with the cache (`train.feature_cache_gb`, the default) and without
(`train.feature_cache_gb=0`); epoch 1 computes and stores the frozen outputs, later
epochs reuse them.

    python benchmarks/feature_cache_domains.py [--epochs 3] [--train 96] [--domains medical,speech,points]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import peftlab
import torch
import transformers
from peftlab.shared import io

PROBE = ("freeze_layers", {"method.trainable_blocks": 0, "method.train_after_blocks": False})
DOMAINS = {
    "medical": ("medical-classify", "random-init:vit_small_patch16_224",
                {"task.image_size": 64, "task.augment": False, "train.batch_size": 32},
                {"linear probe": PROBE, "freeze_layers (last block trains)": ("freeze_layers", {"method.trainable_blocks": 1})}),
    "speech": ("speech-emotion", "SPEECH_FOLDER", {"train.batch_size": 16},
               {"linear probe": PROBE, "LoRA on the last layer": ("lora", {"method.layers": "last_1", "method.dropout": 0.0})}),
    "points": ("pointcloud-classify", "small", {"task.num_points": 1024, "task.augment": False, "train.batch_size": 16},
               {"linear probe": PROBE, "Point-PEFT (prompt + adapters in every block)": ("point_peft", {})}),
}


def speech_folder(folder: Path) -> Path:
    """A random-init WavLM with the real CNN, saved as transformers saves a checkpoint."""
    config = transformers.WavLMConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
                                      feat_extract_norm="layer", hidden_dropout=0.0, attention_dropout=0.0,
                                      activation_dropout=0.0, feat_proj_dropout=0.0, apply_spec_augment=False)
    torch.manual_seed(0)
    path = folder / "wavlm-small-random"
    transformers.WavLMModel(config).save_pretrained(path)
    return path


def train(folder: Path, domain: str, backbone: str, label: str, method: tuple, epochs: int, train_size: int,
          cache: bool) -> dict:
    pipeline, _, settings, _ = DOMAINS[domain]
    out = folder / f"{domain}-{label}-{cache}".replace(" ", "_")
    name, options = method
    peftlab.run(pipeline, demo=True, backbone=backbone, method=name, out=out, overrides={
        **settings, **options, "train.epochs": epochs, "train.early_stopping_patience": None,
        "train.feature_cache_gb": 4.0 if cache else 0.0, "data.limit.train": train_size,
        "data.limit.validation": 8, "data.limit.test": 8, "eval.splits": []})
    metrics = json.loads((out / "metrics.json").read_text())
    return {"epoch_seconds": metrics["train"]["epoch_seconds"], "head": io.load_tensors(out / "adapter" / "head.safetensors")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train", type=int, default=96, help="training examples per run")
    parser.add_argument("--domains", default=",".join(DOMAINS))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for domain in args.domains.split(","):
            pipeline, backbone, _, methods = DOMAINS[domain]
            if backbone == "SPEECH_FOLDER":
                backbone = str(speech_folder(folder))
            for label, method in methods.items():
                cached = train(folder, domain, backbone, label, method, args.epochs, args.train, cache=True)
                plain = train(folder, domain, backbone, label, method, args.epochs, args.train, cache=False)
                later_cached = float(np.mean(cached["epoch_seconds"][1:]))
                later_plain = float(np.mean(plain["epoch_seconds"][1:]))
                difference = max((cached["head"][k] - plain["head"][k]).abs().max().item() for k in plain["head"])
                rows.append({"pipeline": pipeline, "method": label,
                             "epoch_s_cache": [round(s, 2) for s in cached["epoch_seconds"]],
                             "epoch_s_none": [round(s, 2) for s in plain["epoch_seconds"]],
                             "speedup_after_first": round(later_plain / later_cached, 1),
                             "head_max_difference": difference})
                print(json.dumps(rows[-1]), flush=True)
    print()
    print("| pipeline | method | first epoch s (cache / none) | later epochs s (cache / none) | speed-up after the first "
          "| head max abs difference |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        first = f"{row['epoch_s_cache'][0]} / {row['epoch_s_none'][0]}"
        later = f"{np.mean(row['epoch_s_cache'][1:]):.2f} / {np.mean(row['epoch_s_none'][1:]):.2f}"
        print(f"| {row['pipeline']} | {row['method']} | {first} | {later} | {row['speedup_after_first']}x | "
              f"{row['head_max_difference']:.1e} |")


if __name__ == "__main__":
    main()
