"""Inference latency: base ESM-2 encoder, LoRA merged into it, and LoRA left unmerged.

ESM-2 8M architecture (random weights), LoRA r=8 on attention k/v of every layer with
non-zero B (as after training), one batch of 8 sequences of 300 residues, no gradients,
the precision `peftlab predict` uses here. The models run in interleaved rounds, each
taking each place in a round equally often (so drift in the machine's speed hits all
alike), and the median is reported. A copy of the base runs too: the spread between
two identical models is the noise floor the other differences must exceed.

    python benchmarks/merged_latency.py [--rounds 30] [--length 300] [--precision auto]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
from peftlab.domains.protein.backbones import ESM2_ARCHITECTURES, ESMEncoder
from peftlab.shared import methods
from peftlab.shared.training import resolve_precision


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--length", type=int, default=300)
    parser.add_argument("--architecture", default="esm2_t6_8M_UR50D")
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()
    torch.manual_seed(0)
    base = ESMEncoder(*ESM2_ARCHITECTURES[args.architecture]).eval()
    unmerged = methods.apply(copy.deepcopy(base), "lora", r=8, alpha=32, target_modules=["k_proj", "v_proj"]).eval()
    with torch.no_grad():
        for name, parameter in unmerged.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.02)
    merged = copy.deepcopy(unmerged).merge().eval()
    residues = "ACDEFGHIKLMNPQRSTVWY"
    tokens = base.tokenize(["".join(residues[(i * 7 + j) % 20] for j in range(args.length)) for i in range(8)])
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolve_precision(args.precision))
    # the same model twice: the spread between identical models is this machine's noise floor
    models = {"base": base, "base again (a copy)": copy.deepcopy(base), "merged": merged, "unmerged LoRA": unmerged}

    def forward(model):
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            return model(tokens)

    with torch.no_grad():  # in fp32: the merge itself, without bf16 rounding
        difference = (merged(tokens) - unmerged(tokens)).abs().max().item()
    for model in models.values():
        for _ in range(3):
            forward(model)
    times = {name: [] for name in models}
    names = list(models)
    for round_index in range(args.rounds):
        # each model takes each place in a round equally often: the first of a round ran slower
        for name in names[round_index % len(names):] + names[:round_index % len(names)]:
            model = models[name]
            start = time.perf_counter()
            forward(model)
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) * 1000 for name, values in times.items()}
    for name, value in medians.items():
        print(f"{name}: {value:.1f} ms median ({(value / medians['base'] - 1) * 100:+.1f}% vs base)")
    print(f"merged vs unmerged outputs (fp32): max |difference| {difference:.2e}")
    print(json.dumps({"batch": [8, args.length], "precision": resolve_precision(args.precision),
                      "median_ms": {k: round(v, 2) for k, v in medians.items()},
                      "merged_vs_base": round(medians["merged"] / medians["base"] - 1, 4),
                      "unmerged_vs_base": round(medians["unmerged LoRA"] / medians["base"] - 1, 4)}))


if __name__ == "__main__":
    main()
