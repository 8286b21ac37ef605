"""`protein-classify` + LoRA training speed against two reference loops, side by side.

All three loops train the same ESM-2 8M architecture (random weights, identical in
all three), LoRA r=8 (alpha 32, dropout 0.1) on attention k/v, AdamW lr 1e-3, batch 8,
on the same sequences (30-1000 residues, log-normal, median ~300) for the same number
of steps:

- hand-written: fair-esm `ESM2` + peft, fp32, fair-esm's eager attention, shuffled
  batches padded to their longest sequence (fair-esm's batch converter);
- knowledgeable: transformers `EsmForSequenceClassification` + peft, SDPA attention,
  bf16 autocast, length-bucketed batches;
- peftlab: `peftlab.run("protein-classify", ...)` with its defaults.

Model FLOPs count the useful work of a step over real (unpadded) tokens: the forward
pass, plus the backward pass a frozen backbone needs (input gradients only: the linear
layers' forward FLOPs once more, attention's twice more). The machine's bf16 matmul
peak is measured in the same run, and each loop's achieved model FLOP/s is printed as
a share of it. Also printed: the mean train loss of the last epoch (equal or lower is
better) and held-out accuracy.

    python benchmarks/protein_training_speed.py [--epochs 3] [--steps-per-epoch 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import esm
import numpy as np
import peft
import peftlab
import torch
import yaml
from peftlab.domains.protein.backbones import ESM2_ARCHITECTURES, ESMEncoder, hf_to_fair_esm
from peftlab.domains.protein.data import STANDARD_RESIDUES
from torch import nn
from torch.nn import functional as F

ARCHITECTURE = "esm2_t6_8M_UR50D"
BATCH = 8
LORA = {"r": 8, "lora_alpha": 32, "lora_dropout": 0.1}
LR = 1e-3
HYDROPHOBIC = set("AILMFVW")


# ----------------------------------------------------------------------------- setup
def bf16_matmul_peak(seconds: float = 3.0) -> float:
    """Best bf16 GFLOP/s over square matmuls of a few sizes (oneDNN's best case)."""
    best = 0.0
    for n in (1024, 2048):
        a, b = torch.randn(n, n, dtype=torch.bfloat16), torch.randn(n, n, dtype=torch.bfloat16)
        for _ in range(3):
            a @ b
        deadline = time.perf_counter() + seconds / 2
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            for _ in range(5):
                a @ b
            best = max(best, 5 * 2 * n**3 / (time.perf_counter() - start) / 1e9)
    return best


def make_sequences(count: int, seed: int) -> tuple[list[str], list[int]]:
    """Random sequences; the label says whether the hydrophobic share is above the
    expected one, so the task is learnable from composition (mean-pooled embeddings)."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(300), 0.6, size=count), 30, 1000).astype(int)
    residues = np.array(sorted(STANDARD_RESIDUES))
    sequences = ["".join(rng.choice(residues, size=n)) for n in lengths]
    expected = len(HYDROPHOBIC) / len(residues)
    labels = [int(sum(c in HYDROPHOBIC for c in s) / len(s) > expected) for s in sequences]
    return sequences, labels


def write_inputs(folder: Path, train, validation, test, architecture: str = ARCHITECTURE) -> tuple[Path, Path]:
    """The backbone as an official-format fair-esm file and a data card over CSV splits."""
    layers, width, heads = ESM2_ARCHITECTURES[architecture]
    torch.manual_seed(0)
    encoder = ESMEncoder(layers, width, heads)
    config = argparse.Namespace(encoder_layers=layers, encoder_embed_dim=width, encoder_attention_heads=heads,
                                token_dropout=True)
    backbone = folder / f"{architecture}.pt"
    torch.save({"model": {f"encoder.sentence_encoder.{k}": v for k, v in encoder.state_dict().items()},
                "cfg": {"model": config}}, backbone)
    for name, (sequences, labels) in {"train": train, "validation": validation, "test": test}.items():
        rows = ["sequence,label"] + [f"{s},{'ab'[y]}" for s, y in zip(sequences, labels)]
        (folder / f"{name}.csv").write_text("\n".join(rows) + "\n")
    card = folder / "card.md"
    card.write_text("---\nname: speed\ndomain: protein\ntask: protein-classify\nformat: csv\nlabels: [a, b]\n"
                    "splits: {train: train.csv, validation: validation.csv, test: test.csv}\n---\n"
                    "Random sequences of realistic lengths; label: hydrophobic share above expectation.\n")
    return backbone, card


def encoder_weights() -> dict[str, torch.Tensor]:
    layers, width, heads = ESM2_ARCHITECTURES[ARCHITECTURE]
    torch.manual_seed(0)
    return ESMEncoder(layers, width, heads).state_dict()


def model_flops(sequence_length: int) -> float:
    """Useful FLOPs of one training example (see the module docstring)."""
    layers, width, _ = ESM2_ARCHITECTURES[ARCHITECTURE]
    tokens = sequence_length + 2
    linear = 2 * tokens * 12 * width * width  # q, k, v, out (4 d^2) and fc1, fc2 (8 d^2) multiply-adds
    attention = 4 * tokens * tokens * width  # scores and weighted sum
    return layers * (2 * linear + 3 * attention)


def bucketed_batches(lengths: list[int], epoch: int, pool: int = 50) -> list[list[int]]:
    """Length-grouped batches as transformers' `group_by_length` forms them: shuffle,
    sort inside mega-batches of 50 batches, shuffle the batches."""
    rng = np.random.default_rng([1, epoch])
    order = rng.permutation(len(lengths))
    batches = []
    for start in range(0, len(order), BATCH * pool):
        chunk = sorted(order[start:start + BATCH * pool], key=lambda i: lengths[i])
        batches += [chunk[i:i + BATCH] for i in range(0, len(chunk), BATCH)]
    rng.shuffle(batches)
    return batches


def shuffled_batches(count: int, epoch: int) -> list[list[int]]:
    order = np.random.default_rng([2, epoch]).permutation(count).tolist()
    return [order[i:i + BATCH] for i in range(0, count, BATCH)]


# ------------------------------------------------------------------ reference loops
def hand_written_loop(train, test, epochs: int) -> dict:
    layers, width, heads = ESM2_ARCHITECTURES[ARCHITECTURE]
    alphabet = esm.data.Alphabet.from_architecture("ESM-1b")
    torch.manual_seed(0)
    esm_model = esm.ESM2(num_layers=layers, embed_dim=width, attention_heads=heads, alphabet=alphabet)
    esm_model.load_state_dict(encoder_weights(), strict=False)

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.esm = esm_model
            self.head = nn.Linear(width, 2)

        def forward(self, tokens):
            hidden = self.esm(tokens, repr_layers=[layers])["representations"][layers]
            residue = ((tokens != alphabet.padding_idx) & (tokens != alphabet.cls_idx)
                       & (tokens != alphabet.eos_idx)).unsqueeze(-1).float()
            return self.head((hidden * residue).sum(1) / residue.sum(1))

    model = peft.get_peft_model(Classifier(), peft.LoraConfig(target_modules=["k_proj", "v_proj"],
                                                              modules_to_save=["head"], **LORA))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    convert = alphabet.get_batch_converter()
    sequences, labels = train

    def batch_of(indices):
        _, _, tokens = convert([(str(i), sequences[i]) for i in indices])
        return tokens, torch.tensor([labels[i] for i in indices])

    def predict(tokens):
        return model(tokens)

    return _run_loop(model, optimizer, lambda e: shuffled_batches(len(sequences), e), batch_of, predict,
                     train, test, epochs, autocast=False, test_batches=lambda seqs: convert([("", s) for s in seqs])[2])


def knowledgeable_loop(train, test, epochs: int) -> dict:
    from transformers import EsmConfig, EsmForSequenceClassification

    layers, width, heads = ESM2_ARCHITECTURES[ARCHITECTURE]
    alphabet = esm.data.Alphabet.from_architecture("ESM-1b")
    config = EsmConfig(vocab_size=33, hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                       intermediate_size=4 * width, max_position_embeddings=1026, position_embedding_type="rotary",
                       token_dropout=True, mask_token_id=alphabet.mask_idx, pad_token_id=alphabet.padding_idx,
                       layer_norm_eps=1e-5, emb_layer_norm_before=False, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0, num_labels=2)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = EsmForSequenceClassification(config)
    fair = encoder_weights()
    state = model.state_dict()
    for key in state:  # the same backbone weights, under transformers' names
        fair_key = next(iter(hf_to_fair_esm({key: None})), None)
        if fair_key in fair:
            state[key] = fair[fair_key]
    model.load_state_dict(state)
    model = peft.get_peft_model(model, peft.LoraConfig(task_type="SEQ_CLS", target_modules=["key", "value"], **LORA))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    sequences, labels = train
    tokenize = ESMEncoder(1, 16, 1).tokenize  # ESM-2's alphabet: <cls> residues <eos>, right-padded

    def predict(tokens):
        return model(input_ids=tokens, attention_mask=tokens != alphabet.padding_idx).logits

    def batch_of(indices):
        return tokenize([sequences[i] for i in indices]), torch.tensor([labels[i] for i in indices])

    lengths = [len(s) for s in sequences]
    return _run_loop(model, optimizer, lambda e: bucketed_batches(lengths, e), batch_of, predict,
                     train, test, epochs, autocast=True, test_batches=tokenize)


def _run_loop(model, optimizer, batches_of_epoch, batch_of, predict, train, test, epochs, autocast, test_batches):
    sequences = train[0]
    steps, seconds, flops, last_losses = 0, 0.0, 0.0, []
    model.train()
    for epoch in range(epochs):
        last_losses = []
        for indices in batches_of_epoch(epoch):
            start = time.perf_counter()
            tokens, labels = batch_of(indices)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = F.cross_entropy(predict(tokens).float(), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seconds += time.perf_counter() - start
            steps += 1
            flops += sum(model_flops(len(sequences[i])) for i in indices)
            last_losses.append(loss.item())
        print(f"  epoch {epoch + 1}: {steps} steps, {steps * BATCH / seconds:.2f} samples/s, "
              f"train loss {np.mean(last_losses):.4f}", flush=True)
    model.eval()
    correct = 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        for start in range(0, len(test[0]), BATCH):
            logits = predict(test_batches(test[0][start:start + BATCH]))
            correct += sum(int(p == y) for p, y in zip(logits.argmax(-1).tolist(), test[1][start:start + BATCH]))
    return {"samples_per_s": steps * BATCH / seconds, "seconds": seconds, "steps": steps,
            "gflop_per_s": flops / seconds / 1e9, "last_epoch_loss": float(np.mean(last_losses)),
            "test_accuracy": correct / len(test[0])}


def peftlab_loop(folder: Path, backbone: Path, card: Path, train, epochs: int, extra: dict) -> dict:
    run_dir = peftlab.run(
        "protein-classify", backbone=str(backbone), data=str(card), out=folder / f"run-{len(list(folder.glob('run-*')))}",
        overrides={"method.r": LORA["r"], "method.alpha": LORA["lora_alpha"], "method.dropout": LORA["lora_dropout"],
                   "train.lr": LR, "train.epochs": epochs, "train.batch_size": BATCH, "train.warmup_ratio": 0.0,
                   "train.schedule": "constant", "train.early_stopping_patience": None, "eval.splits": ["test"],
                   **extra},
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    seconds = metrics["train"]["seconds"]
    flops = epochs * sum(model_flops(len(s)) for s in train[0])
    return {"samples_per_s": metrics["train"]["samples_per_s"], "seconds": seconds, "steps": metrics["train"]["steps"],
            "gflop_per_s": flops / seconds / 1e9, "last_epoch_loss": metrics["history"][-1]["train_loss"],
            "test_accuracy": metrics["test"]["accuracy"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps-per-epoch", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=1, help="run every loop this many times; medians are reported")
    parser.add_argument("--skip-hand-written", action="store_true", help="it is the slow one (~10 s a step)")
    parser.add_argument("--peftlab", action="append", default=[], metavar="KEY=VALUE",
                        help="extra peftlab override, e.g. train.precision=fp32 (repeatable)")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    train = make_sequences(args.steps_per_epoch * BATCH, seed=0)
    validation, test = make_sequences(16, seed=1), make_sequences(64, seed=2)
    lengths = [len(s) for s in train[0]]
    print(f"{len(lengths)} training sequences: median length {int(np.median(lengths))}, "
          f"mean {np.mean(lengths):.0f}, max {max(lengths)}; {args.epochs} epochs of {math.ceil(len(lengths) / BATCH)} steps")
    peak = bf16_matmul_peak()
    print(f"bf16 matmul peak: {peak:.0f} GFLOP/s")
    extra = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in args.peftlab)}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        backbone, card = write_inputs(folder, train, validation, test)
        loops = {"peftlab": lambda: peftlab_loop(folder, backbone, card, train, args.epochs, extra),
                 "knowledgeable": lambda: knowledgeable_loop(train, test, args.epochs)}
        if not args.skip_hand_written:
            loops["hand-written"] = lambda: hand_written_loop(train, test, args.epochs)
        names = list(loops)
        rounds = []
        for round_index in range(args.rounds):
            # the machine's speed drifts between minutes: each round runs every loop, in a
            # rotated order, and the ratios are taken within a round
            order = names[round_index % len(names):] + names[:round_index % len(names)]
            rounds.append({})
            for name in order:
                print(f"{name} (round {round_index + 1} of {args.rounds}):", flush=True)
                rounds[-1][name] = loops[name]()
    results = {name: dict(rounds[-1][name]) for name in names}
    for name in names:
        results[name]["samples_per_s"] = float(np.median([r[name]["samples_per_s"] for r in rounds]))
        results[name]["gflop_per_s"] = float(np.median([r[name]["gflop_per_s"] for r in rounds]))
        results[name]["vs_knowledgeable"] = float(np.median(
            [r[name]["samples_per_s"] / r["knowledgeable"]["samples_per_s"] for r in rounds]))
        results[name]["rounds_samples_per_s"] = [r[name]["samples_per_s"] for r in rounds]
    print()
    if args.rounds > 1:
        print(f"medians over {args.rounds} rounds; ratios are medians of each round's ratio")
    print("| loop | samples/s | vs knowledgeable | model GFLOP/s | share of bf16 peak | last-epoch loss | test accuracy |")
    print("|---|---|---|---|---|---|---|")
    for name, result in results.items():
        print(f"| {name} | {result['samples_per_s']:.2f} | {result['vs_knowledgeable']:.2f}x | "
              f"{result['gflop_per_s']:.0f} | {result['gflop_per_s'] / peak:.0%} | "
              f"{result['last_epoch_loss']:.4f} | {result['test_accuracy']:.3f} |")
    print(json.dumps({"bf16_peak_gflop_per_s": round(peak), **results}, default=lambda v: round(v, 4)))


if __name__ == "__main__":
    main()
