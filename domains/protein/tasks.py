"""Protein tasks on ESM-2: `protein-ppi` (pair -> interacts?) and `protein-classify`.

PPI follows Sledzieski et al. 2023: both proteins go through the one backbone, their
residue embeddings are mean-pooled, the two vectors are averaged and a small MLP gives
one logit (binary cross-entropy); model selection on validation AUPR.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peftlab.shared import io, methods, requests
from peftlab.shared.cards import Card
from peftlab.shared.data import (
    count_by_split,
    hold_out_validation,
    number_classes,
    ratio_split,
    split_ratios,
    table_rows,
)
from peftlab.shared.errors import UserError
from peftlab.shared.feature_cache import FeatureCache, frozen_prefix_stages
from peftlab.shared.folds import split_sources
from peftlab.shared.loaders import loader_rows
from peftlab.shared.tasks import SPLIT_KEYS, Dataset, FP32Head, describe_scores, register_task
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.rnn import pad_sequence

from . import data
from .backbones import TINY, TINY_SEED, ESMEncoder, backbone_names, load_backbone


@dataclass
class ProteinOptions:
    max_length: int = field(default=1022, metadata={"help": "residues per sequence; longer ones are cropped (ESM-2 saw 1024 tokens with <cls>/<eos>)"})
    crop_train: str = field(default="random", metadata={"help": "training crop of long sequences: random, start or center window"})
    crop_eval: str = field(default="start", metadata={"help": "evaluation crop: start or center (deterministic)"})
    head_hidden: int = field(default=128, metadata={"help": "hidden width of the MLP head"})
    head_dropout: float = field(default=0.1, metadata={"help": "dropout in the MLP head"})

    def __post_init__(self):
        if self.max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {self.max_length}")
        if self.crop_train not in ("random", "start", "center"):
            raise ValueError(f"crop_train must be random, start or center, got {self.crop_train!r}")
        if self.crop_eval not in ("start", "center"):
            raise ValueError(f"crop_eval must be start or center, got {self.crop_eval!r}")
        if self.head_hidden < 1:
            raise ValueError(f"head_hidden must be >= 1, got {self.head_hidden}")
        if not 0 <= self.head_dropout < 1:
            raise ValueError(f"head_dropout must be in [0, 1), got {self.head_dropout}")


@dataclass
class PPIOptions(ProteinOptions):
    combine: str = field(default="mean", metadata={"help": "how two protein vectors combine: mean (the paper) or mean_product ([mean, a*b])"})
    pos_weight: float | None = field(default=None, metadata={"help": "BCE weight of positives (e.g. the negative:positive ratio)"})

    def __post_init__(self):
        super().__post_init__()
        if self.combine not in ("mean", "mean_product"):
            raise ValueError(f"combine must be mean or mean_product, got {self.combine!r}")
        if self.pos_weight is not None and self.pos_weight <= 0:
            raise ValueError(f"pos_weight must be > 0 (or null), got {self.pos_weight}")


def crop(sequence: str, max_length: int, policy: str, rng: np.random.Generator | None) -> str:
    if len(sequence) <= max_length:
        return sequence
    if policy == "random" and rng is not None:
        start = int(rng.integers(0, len(sequence) - max_length + 1))
    elif policy == "center":
        start = (len(sequence) - max_length) // 2
    else:
        start = 0
    return sequence[start:start + max_length]


def mlp(width: int, hidden: int, outputs: int, dropout: float) -> FP32Head:
    return FP32Head(nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, outputs))


class _ProteinModel(nn.Module):
    """Shared by both tasks: tokenising, cropping, masked mean pooling, and the
    frozen-feature cache (see `shared/feature_cache.py`)."""

    def __init__(self, backbone: ESMEncoder, info: dict, options: ProteinOptions):
        super().__init__()
        self.backbone = backbone
        self.backbone_info = info
        self.options = options
        self.feature_cache: FeatureCache | None = None

    def _encoder(self) -> ESMEncoder:
        return methods.network_of(self.backbone)

    def _token_batch(self, sequences: list[str], rng) -> dict[str, Any]:
        """Tokens of the (cropped) sequences; in training with the cache on, the cropped
        sequences too, as the cache's keys."""
        policy = self.options.crop_train if rng is not None else self.options.crop_eval
        cropped = [crop(s, self.options.max_length, policy, rng) for s in sequences]
        batch: dict[str, Any] = {"tokens": self._encoder().tokenize(cropped)}
        if rng is not None and self.feature_cache is not None:
            batch["cache_keys"] = cropped
        return batch

    def plan_feature_cache(self, train_examples: list[dict], budget_bytes: int) -> str:
        """Turn the cache on when the method leaves the encoder's first stages frozen and
        training inputs do not vary between epochs; say what was decided and why."""
        self.feature_cache = None
        encoder = self._encoder()
        stages = encoder.stages()
        frozen = frozen_prefix_stages(stages)
        if frozen < 2:
            return "feature cache: off (the method trains the encoder from its first layer on; nothing to reuse)"
        sequences = {e[k] for e in train_examples for k in ("seq", "a_seq", "b_seq") if k in e}
        if self.options.crop_train == "random" and any(len(s) > self.options.max_length for s in sequences):
            return ("feature cache: off (sequences longer than task.max_length get a new random crop each epoch; "
                    "task.crop_train=start or center makes them fixed)")
        needed = sum(min(len(s), self.options.max_length) + 2 for s in sequences) * encoder.embed_dim * 4
        if needed > budget_bytes:
            return (f"feature cache: off (the frozen outputs need {needed / 2**30:.1f} GiB, over "
                    f"train.feature_cache_gb={budget_bytes / 2**30:g}; raise it to cache them)")
        self.feature_cache = FeatureCache(frozen, budget_bytes)
        return (f"feature cache: on; the first {frozen} of {len(stages)} encoder stages are frozen and run once per "
                f"sequence ({needed / 2**20:.0f} MiB), not every epoch")

    def embed(self, tokens: torch.Tensor, cache_keys: list[str] | None = None) -> torch.Tensor:
        """Mean over residue positions (not <cls>, <eos> or padding)."""
        encoder = self._encoder()
        alphabet = encoder.alphabet
        cache = self.feature_cache
        if cache is None or cache_keys is None or not self.training:
            hidden = self.backbone(tokens)
        else:
            if cache.missing(cache_keys):
                with torch.no_grad():  # nothing in the frozen prefix needs a gradient
                    prefix = self.backbone(tokens, stop=cache.stages)
                lengths = tokens.ne(alphabet.padding_idx).sum(1).tolist()
                cache.store(cache_keys, [row[:n] for row, n in zip(prefix, lengths)])
            else:
                prefix = pad_sequence(cache.fetch(cache_keys), batch_first=True)
            hidden = self.backbone(tokens, hidden=prefix, start=cache.stages)
        residue = (tokens != alphabet.padding_idx) & (tokens != alphabet.cls_idx) & (tokens != alphabet.eos_idx)
        weights = residue.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)


class PPIModel(_ProteinModel):
    def __init__(self, backbone, info, options: PPIOptions):
        super().__init__(backbone, info, options)
        width = backbone.embed_dim * (2 if options.combine == "mean_product" else 1)
        self.head = mlp(width, options.head_hidden, 1, options.head_dropout)

    def example_length(self, example) -> int:
        return min(max(len(example["a_seq"]), len(example["b_seq"])), self.options.max_length)

    def collate(self, examples, rng):
        # Each distinct protein in the batch is encoded once.
        unique: dict[str, int] = {}
        for example in examples:
            for key in ("a_seq", "b_seq"):
                unique.setdefault(example[key], len(unique))
        batch = {
            **self._token_batch(list(unique), rng),
            "a": torch.tensor([unique[e["a_seq"]] for e in examples]),
            "b": torch.tensor([unique[e["b_seq"]] for e in examples]),
        }
        if all("label" in e for e in examples):
            batch["labels"] = torch.tensor([float(e["label"]) for e in examples])
        return batch

    def forward(self, batch) -> torch.Tensor:
        vectors = self.embed(batch["tokens"], batch.get("cache_keys"))
        a, b = vectors[batch["a"]], vectors[batch["b"]]
        pair = (a + b) / 2
        if self.options.combine == "mean_product":
            pair = torch.cat([pair, a * b], dim=-1)
        return self.head(pair).squeeze(-1)

    def loss(self, logits, batch):
        weight = None if self.options.pos_weight is None else torch.tensor(self.options.pos_weight)
        return F.binary_cross_entropy_with_logits(logits.float(), batch["labels"], pos_weight=weight)

    def scores(self, logits):
        return torch.sigmoid(logits.float())


class ClassifyModel(_ProteinModel):
    def __init__(self, backbone, info, options: ProteinOptions, num_labels: int):
        super().__init__(backbone, info, options)
        self.head = mlp(backbone.embed_dim, options.head_hidden, num_labels, options.head_dropout)

    def example_length(self, example) -> int:
        return min(len(example["seq"]), self.options.max_length)

    def collate(self, examples, rng):
        batch = self._token_batch([e["seq"] for e in examples], rng)
        if all("label" in e for e in examples):
            batch["labels"] = torch.tensor([e["label"] for e in examples])
        return batch

    def forward(self, batch) -> torch.Tensor:
        return self.head(self.embed(batch["tokens"], batch.get("cache_keys")))

    def loss(self, logits, batch):
        return F.cross_entropy(logits.float(), batch["labels"])

    def scores(self, logits):
        probabilities = torch.softmax(logits.float(), dim=-1)
        # Two classes: report P(class 1), so binary metrics (AUROC, AUPR) apply.
        return probabilities[:, 1] if probabilities.shape[1] == 2 else probabilities


# Defaults that suit fair-esm's module names (Sledzieski et al.: LoRA on attention
# key/value of the last 8 layers; Houlsby adapters after attention and feed-forward).
_ESM_METHOD_DEFAULTS = {
    "lora": {"target_modules": ["k_proj", "v_proj"], "layers": "last_8"},
    "dora": {"target_modules": ["k_proj", "v_proj"], "layers": "last_8"},
    "loha": {"target_modules": ["k_proj", "v_proj"], "layers": "last_8"},
    "lokr": {"target_modules": ["k_proj", "v_proj"], "layers": "last_8"},
    "vera": {"target_modules": ["k_proj", "v_proj"], "layers": "last_8"},
    "ia3": {"target_modules": ["k_proj", "v_proj", "fc2"], "feedforward_modules": ["fc2"]},
    "adapter": {"target_modules": ["out_proj", "fc2"]},
    "parallel_adapter": {"target_modules": ["fc2"], "input_from": "fc1", "scale": 4.0},
    "freeze_layers": {"blocks": "layers"},
}


class _ProteinTask:
    domain = "protein"
    options = ProteinOptions
    card_keys = ("demo",)

    def backbones(self) -> list[str]:
        return backbone_names()

    def default_method_options(self, method: str, model) -> dict[str, Any]:
        return dict(_ESM_METHOD_DEFAULTS.get(method, {}))

    split_keys = (*SPLIT_KEYS, "validation_fraction")

    def _split_spec(self, card: Card) -> dict[str, Any]:
        spec = dict(card.splits or {})
        if not isinstance(spec.get("group_by_protein", False), bool):
            raise UserError(f"{card.card_path}: splits.group_by_protein must be true or false, "
                            f"got {spec['group_by_protein']!r}")
        return spec

    def _splits(self, card: Card, examples: list[dict], what: str, group_of=None) -> dict[str, list[dict]]:
        spec = self._split_spec(card)
        ratios = split_ratios(card, what)
        return ratio_split(examples, ratios, int(spec.get("seed", 0)), group_of, where=str(card.card_path))

    # ------------------------------------------------------------- serving and export
    def export_backbone(self, model, directory: Path) -> str:
        """The (merged) encoder as fair-esm releases ESM-2, which
        `esm.pretrained.load_model_and_alphabet_local(<dir>/<name>.pt)` loads without
        peftlab: `<name>.pt` ({"model": state dict, "cfg": {"model": Namespace}}) and the
        `<name>-contact-regression.pt` it reads beside it. The LM and contact heads, which
        fine-tuning never touches, come from the source checkpoint (the tiny preset
        rebuilds its own from its seed)."""
        import argparse

        encoder = model.backbone
        heads = _esm_heads(model.backbone_info, encoder)
        name = f"esm2_t{encoder.num_layers}_{encoder.embed_dim}_merged"  # fair-esm dispatches on the esm2 prefix
        state = {**encoder.state_dict(), **{k: v for k, v in heads.items() if not k.startswith("contact_head.")}}
        config = argparse.Namespace(encoder_layers=encoder.num_layers, encoder_embed_dim=encoder.embed_dim,
                                    encoder_attention_heads=encoder.attention_heads, token_dropout=encoder.token_dropout)
        files = [directory / f"{name}.pt", directory / f"{name}-contact-regression.pt"]
        contact = {k: v for k, v in heads.items() if k.startswith("contact_head.")}
        for path, content in zip(files, [{"model": state, "cfg": {"model": config}}, {"model": contact}]):
            with io.atomic_path(path) as tmp:
                torch.save({k: ({n: t.detach().clone().contiguous() for n, t in v.items()} if k == "model" else v)
                            for k, v in content.items()}, tmp)
        return ("import argparse, torch, esm\n"
                "with torch.serialization.safe_globals([argparse.Namespace]):\n"
                f"    model, alphabet = esm.pretrained.load_model_and_alphabet_local(EXPORT_DIR + '/{files[0].name}')")



def keep_proteins_apart(splits: dict[str, list[dict]]) -> str:
    """Make the splits protein-disjoint (C3 pairs, Park & Marcotte 2012): test keeps
    every pair, validation drops pairs with a test protein, train drops pairs with a
    test or validation protein. Pairs were split by their first protein, so most pairs
    stay; the rest are counted in the note returned."""
    seen_later: set[str] = set()
    dropped = {}
    for name in ("test", "validation", "train"):
        pairs = splits.get(name, [])
        kept = [e for e in pairs if e["a"] not in seen_later and e["b"] not in seen_later]
        if name in splits:
            splits[name] = kept
        dropped[name] = len(pairs) - len(kept)
        seen_later |= {protein for e in kept for protein in (e["a"], e["b"])}
    remain = ", ".join(f"{len(splits[name])} {name}" for name in ("train", "validation", "test") if name in splits)
    return (f"group_by_protein: no protein is in two splits; dropped {dropped['train']} training and "
            f"{dropped['validation']} validation pairs that shared a protein with a later split; {remain} pairs remain")


def drop_repeated_pairs(splits: dict[str, list[dict]], where: str) -> str | None:
    """Each unordered pair once, in place: a pair listed again (in either order: the
    model reads a pair symmetrically) would be the same example twice, and across splits
    a test example seen in training. The copy in the latest split stays (test, then
    validation, then train); a pair listed with both labels is left out entirely."""
    def key(example):
        return tuple(sorted((example["a"], example["b"])))

    labels: dict[tuple, set] = {}
    for examples in splits.values():
        for example in examples:
            labels.setdefault(key(example), set()).add(example["label"])
    conflicting = {pair for pair, found in labels.items() if len(found) > 1}
    seen: set[tuple] = set()
    repeats = both_labels = 0
    for name in sorted(splits, key=lambda n: {"test": 0, "validation": 1, "train": 2}.get(n, 3)):
        kept = []
        for example in splits[name]:
            pair = key(example)
            if pair in conflicting:
                both_labels += 1
            elif pair in seen:
                repeats += 1
            else:
                seen.add(pair)
                kept.append(example)
        splits[name] = kept
    parts = []
    if repeats:
        parts.append(f"{repeats} repeated pair{'s' if repeats > 1 else ''} (the same two proteins, in either order) "
                     f"left out, each pair kept once")
    if both_labels:
        parts.append(f"{both_labels} lines of {len(conflicting)} pairs listed with both labels left out")
    return f"{where}: {'; '.join(parts)}" if parts else None


class PPITask(_ProteinTask):
    name = "protein-ppi"
    example_unit = "protein pairs"
    description = "protein-protein interaction: two sequences -> interact yes/no (ESM-2, Sledzieski et al. 2023)"
    metrics = ("aupr", "auroc", "f1", "precision", "recall", "accuracy")
    primary_metric = "aupr"
    formats = ("fasta+pairs_tsv", "demo")
    loader_format = "fasta+pairs_tsv"  # the loader reads the pairs files; sequences stay in the FASTA
    split_keys = (*_ProteinTask.split_keys, "group_by_protein")
    field_keys = ("protein_a", "protein_b", "label")
    options = PPIOptions

    def read(self, card: Card, options: ProteinOptions) -> Dataset:
        labels = card.labels or ["no_interaction", "interaction"]
        if len(labels) != 2:
            raise UserError(f"{card.card_path}: protein-ppi is binary; `labels` must name 2 classes, got {labels}")
        if card.format == "demo":
            demo = {"families": 8, "per_family": 12, "positive_fraction": 0.35, "seed": 0,
                    "train": 800, "validation": 200, "test": 300, **(card.option("demo") or {})}
            sizes = {s: int(demo[s]) for s in ("train", "validation", "test")}
            splits = data.demo_pairs(sizes, demo["families"], demo["per_family"], demo["positive_fraction"], demo["seed"])
            return Dataset(splits, labels)
        if card.format != "fasta+pairs_tsv":
            raise UserError(f"{card.card_path}: protein-ppi reads formats {', '.join(self.formats)}, not {card.format!r}")
        sequences = data.read_fasta(card.file("sequences"))
        per_split = split_sources(card, True, lambda: card.file("pairs"), lambda path: table_rows(path, "\t"))
        group = self._split_spec(card).get("group_by_protein", False)
        by_first_protein = (lambda e: e["a"]) if group else None
        notes = [note for note in [data.nucleotide_note(sequences.values(), str(card.file("sequences")))] if note]
        if per_split:
            splits = {s: data.read_pairs(p, sequences, card.fields, labels, rows=rows) for s, (p, rows) in per_split.items()}
            repeated = drop_repeated_pairs(splits, str(card.card_path))
            splits, held_out = hold_out_validation(splits, card, "pairs", group_of=by_first_protein)
            notes += [note for note in (repeated, held_out) if note]
        else:
            path = card.file("pairs")
            pairs = {"all": data.read_pairs(path, sequences, card.fields, labels, rows=loader_rows(card, path))}
            repeated = drop_repeated_pairs(pairs, str(card.file("pairs")))
            notes += [repeated] if repeated else []
            splits = self._splits(card, pairs["all"], "pairs", by_first_protein)
        if group:  # given files too: pairs of train (and validation) sharing a protein with a later split go
            notes.append(keep_proteins_apart(splits))
            emptied = [name for name in ("train", "validation") if name in splits and not splits[name]]
            if emptied:
                raise UserError(f"{card.card_path}: splits.group_by_protein left split {emptied[0]!r} empty: every one "
                                f"of its pairs shares a protein with a later split; give it pairs of other proteins, "
                                f"or set group_by_protein: false")
        long, where = count_by_split(splits, lambda e: max(len(e["a_seq"]), len(e["b_seq"])) > options.max_length)
        if long:
            notes.append(f"{long} pairs ({where}) have a sequence longer than {options.max_length} residues, cropped "
                         f"({options.crop_train} in training, {options.crop_eval} at evaluation)")
        return Dataset(splits, labels, notes)

    def build_model(self, backbone: str, labels: list[str], options: PPIOptions) -> PPIModel:
        encoder, info = load_backbone(backbone)
        return PPIModel(encoder, info, options)

    def read_inputs(self, paths, options, fields) -> list[dict]:
        fasta = [p for p in paths if Path(p).suffix.lower() in (".fasta", ".fa", ".faa")]
        tables = [p for p in paths if Path(p).suffix.lower() in (".tsv", ".txt")]
        if len(fasta) != 1 or len(tables) != 1:
            raise UserError("protein-ppi predict takes one FASTA file (.fasta/.fa/.faa) and one pairs TSV (.tsv)")
        sequences = data.read_fasta(Path(fasta[0]))
        return data.read_pairs(Path(tables[0]), sequences, fields, None, labelled=False)

    def input_notes(self, examples, options: ProteinOptions) -> list[str]:
        long = sum(max(len(e["a_seq"]), len(e["b_seq"])) > options.max_length for e in examples)
        pairs = "1 pair has" if long == 1 else f"{long} pairs have"
        return [f"{pairs} a sequence longer than {options.max_length} residues: its "
                f"{options.crop_eval} window is scored (task.crop_eval, task.max_length)"] if long else []

    def describe(self, example, scores, labels) -> dict:
        return {"protein_a": example["a"], "protein_b": example["b"], **describe_scores(scores, labels)}

    def rows_follow_examples(self, options) -> bool:
        return False  # a batch encodes each distinct protein once, shared by its pairs

    def parse_request(self, payload: dict, options) -> list[dict]:
        """{"pairs": [[SEQ_A, SEQ_B], ...]}, or a FASTA and a pairs table as JSON:
        {"sequences": {ID: SEQ, ...}, "pairs": [[ID_A, ID_B], ...]}."""
        requests.only_fields(payload, ("pairs", "sequences"))
        named = None
        if "sequences" in payload:
            named = {key: data.check_sequence(requests.text(value, f"sequences.{key}"), f"sequences.{key}")
                     for key, value in requests.items(payload, "sequences", "sequences")}
        examples = []
        for index, pair in requests.items(payload, "pairs", "pairs [A, B]"):
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
                raise UserError(f"pairs[{index}]: a pair is a list of two strings ({'ids' if named else 'sequences'})")
            if named is None:
                ids = [f"{index}:a", f"{index}:b"]
                seqs = [data.check_sequence(p, f"pairs[{index}][{side}]") for side, p in enumerate(pair)]
            else:
                unknown = [p for p in pair if p not in named]
                if unknown:
                    raise UserError(f"pairs[{index}]: {unknown[0]!r} is not an id in `sequences`")
                ids, seqs = pair, [named[p] for p in pair]
            examples.append({"id": f"{ids[0]}|{ids[1]}", "a": ids[0], "b": ids[1], "a_seq": seqs[0], "b_seq": seqs[1]})
        return examples

    def card_template(self) -> str:
        return CARD_TEMPLATES[self.name]


class ClassifyTask(_ProteinTask):
    name = "protein-classify"
    example_unit = "sequences"
    description = "protein sequence -> class (e.g. symmetry, function, activity) on ESM-2"
    metrics = ("accuracy", "macro_f1", "auroc")
    primary_metric = "accuracy"
    formats = ("csv", "demo")
    loader_format = "csv"
    field_keys = ("sequence", "label", "id")

    def read(self, card: Card, options: ProteinOptions) -> Dataset:
        if card.format == "demo":
            demo = {"families": 4, "seed": 0, "train": 400, "validation": 100, "test": 200, **(card.option("demo") or {})}
            labels = card.labels or [f"family_{i}" for i in range(demo["families"])]
            sizes = {s: int(demo[s]) for s in ("train", "validation", "test")}
            return Dataset(data.demo_sequences(sizes, demo["families"], demo["seed"]), labels)
        if card.format != "csv":
            raise UserError(f"{card.card_path}: protein-classify reads formats csv and demo, not {card.format!r}")
        labels = card.labels
        per_split = split_sources(card, True, lambda: card.file("data"), table_rows)
        note = None
        if per_split:
            splits = {s: data.read_sequence_csv(p, card.fields, labels, rows=rows) for s, (p, rows) in per_split.items()}
            splits, note = hold_out_validation(splits, card, "sequences")
        else:
            path = card.file("data")
            splits = self._splits(card, data.read_sequence_csv(path, card.fields, labels, rows=loader_rows(card, path)),
                                  "sequences")
        every = [e for examples in splits.values() for e in examples]
        notes = [n for n in (note, data.nucleotide_note((e["seq"] for e in every), str(card.card_path)),
                             data.repeated_ids_note(every, str(card.card_path))) if n]
        if labels is None:
            labels = number_classes(splits, notes, str(card.card_path))
        long, where = count_by_split(splits, lambda e: len(e["seq"]) > options.max_length)
        if long:
            notes.append(f"{long} sequences ({where}) are longer than {options.max_length} residues, cropped "
                         f"({options.crop_train} in training, {options.crop_eval} at evaluation)")
        return Dataset(splits, labels, notes)

    def build_model(self, backbone: str, labels: list[str], options: ProteinOptions) -> ClassifyModel:
        encoder, info = load_backbone(backbone)
        return ClassifyModel(encoder, info, options, len(labels))

    def read_inputs(self, paths, options, fields) -> list[dict]:
        examples = []
        for path in map(Path, paths):
            if path.suffix.lower() in (".fasta", ".fa", ".faa"):
                examples += [{"id": k, "seq": v} for k, v in data.read_fasta(path).items()]
            elif path.suffix.lower() == ".csv":
                examples += data.read_sequence_csv(path, fields, None, labelled=False)
            else:
                raise UserError(f"{path}: protein-classify predict reads FASTA (.fasta/.fa/.faa) or CSV with a `sequence` column")
        return examples

    def input_notes(self, examples, options: ProteinOptions) -> list[str]:
        long = sum(len(e["seq"]) > options.max_length for e in examples)
        return [f"{long} sequences are longer than {options.max_length} residues: their {options.crop_eval} "
                f"window is scored (task.crop_eval, task.max_length)"] if long else []

    def describe(self, example, scores, labels) -> dict:
        return {"id": example["id"], **describe_scores(scores, labels)}

    def rows_follow_examples(self, options) -> bool:
        return True

    def parse_request(self, payload: dict, options) -> list[dict]:
        """{"sequences": [SEQ, ...]} (ids "0", "1", ...) or {"sequences": {ID: SEQ, ...}}."""
        requests.only_fields(payload, ("sequences",))
        return [{"id": key, "seq": data.check_sequence(requests.text(value, f"sequences[{key}]"), f"sequences[{key}]")}
                for key, value in requests.items(payload, "sequences", "sequences")]

    def card_template(self) -> str:
        return CARD_TEMPLATES[self.name]


def _esm_heads(info: dict, encoder: ESMEncoder) -> dict[str, torch.Tensor]:
    """The LM head and contact head of the checkpoint the encoder came from (ESMEncoder
    keeps neither): rebuilt from the seed for the tiny preset, read from a fair-esm file."""
    import argparse

    import esm

    source = info.get("source", "")
    if info.get("name") == "tiny":
        with torch.random.fork_rng():
            torch.manual_seed(TINY_SEED)
            full = esm.model.esm2.ESM2(*TINY, alphabet=esm.data.Alphabet.from_architecture("ESM-1b"))
        return {k: v for k, v in full.state_dict().items() if k.startswith(("lm_head.", "contact_head."))}
    path = Path(source)
    regression = path.with_name(f"{path.stem}-contact-regression.pt")
    if path.suffix != ".pt" or not path.is_file() or not regression.is_file():
        raise UserError(f"exporting ESM-2 for fair-esm needs the source checkpoint's LM and contact heads: "
                        f"{source} is not a fair-esm .pt file with its -contact-regression.pt beside it "
                        f"(the merged run from `peftlab merge --out` works without them)")
    heads = {}
    for file in (path, regression):
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(file, map_location="cpu", weights_only=True)["model"]
        for key, value in state.items():
            key = key.removeprefix("encoder.")
            if key.startswith(("lm_head.", "contact_head.")):
                heads[key] = value
    return heads


CARD_TEMPLATES = {
    "protein-ppi": """---
name: my-ppi-dataset
domain: protein
task: protein-ppi
format: fasta+pairs_tsv
files:
  sequences: sequences.fasta      # >id then residues
  pairs: pairs.tsv                # protein_a<TAB>protein_b<TAB>label (0/1)
fields: {protein_a: 0, protein_b: 1, label: 2}
labels: [no_interaction, interaction]
splits: {ratios: {train: 0.8, validation: 0.1, test: 0.1}, seed: 0, group_by_protein: false}
# or one pairs file per split, keeping files.sequences: splits: {train: train.tsv, validation: valid.tsv, test: test.tsv}; without validation, validation_fraction (0.1) of train is held out
# or a column naming each row's split: splits: {fold_by: set} (cells train, validation, test), or its fold: {fold_by: fold, test: [5]} (the rest trains)
license: ""
source: ""
---
What the pairs are, how interactions and negatives were chosen, intended use, known biases.
""",
    "protein-classify": """---
name: my-sequence-dataset
domain: protein
task: protein-classify
format: csv
files:
  data: sequences.csv             # header row; one sequence per line
fields: {sequence: sequence, label: label}
labels: [negative, positive]      # label cells hold these names or their indices
splits: {ratios: {train: 0.8, validation: 0.1, test: 0.1}, seed: 0}
# or one file per split, without files.data: splits: {train: train.csv, validation: valid.csv, test: test.csv}; without validation, validation_fraction (0.1) of train is held out
# or a column naming each row's split: splits: {fold_by: set} (cells train, validation, test), or its fold: {fold_by: fold, test: [5]} (the rest trains)
license: ""
source: ""
---
What the sequences are, how labels were measured, intended use, known biases.
""",
}

register_task(PPITask())
register_task(ClassifyTask())
