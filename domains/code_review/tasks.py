"""LLaMA-Reviewer's three tasks (Lu et al. 2023) on any transformers causal LM.

- `code-review-necessity`: diff hunk -> does it need a review comment? A linear head
  reads the LM's last hidden state at the prompt's final token and gives one logit
  (binary cross-entropy), the design of transformers' `*ForSequenceClassification`.
  LLaMA-Reviewer instead generates "yes"/"no"; a head gives a calibrated score, so
  AUROC/AUPR and any threshold apply, and training is one forward pass per hunk. The
  positive class is "needs a comment" (CodeReviewer's y = 1); precision, recall and F1
  are of that class at score threshold 0.5. Primary metric: F1.
- `code-review-comment`: diff hunk -> review comment. Primary: bleu4 (smoothed
  sentence-level BLEU-4 averaged, computed as CodeReviewer's evaluator), with corpus BLEU-4
  (`corpus_bleu4`) and exact match.
- `code-refine`: code before review + review comment -> revised code. Primary: bleu4;
  exact match after whitespace normalisation.

Generation tasks train the LM on prompt + answer with the loss on the answer's tokens
only, and decode greedily or with beam search, batched and left-padded. Their `head` is
an empty module: the LM head is the backbone's own, adapted (or not) by the method.
Prompts come from a template in the recipe's `task:` section; a diff or code too long
for `max_prompt_tokens` loses whole lines from its middle outward, hunk headers kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from peftlab.shared import causal_lm as clm
from peftlab.shared import requests
from peftlab.shared.cards import Card
from peftlab.shared.data import count_by_split, hold_out_validation, ratio_split, split_ratios
from peftlab.shared.errors import UserError
from peftlab.shared.folds import split_sources
from peftlab.shared.loaders import loader_records
from peftlab.shared.tasks import SPLIT_KEYS, Dataset, FP32Head, describe_scores, register_task
from peftlab.shared.text_metrics import compute_text_metrics, smooth_bleu4
from torch import nn
from torch.nn import functional as F

from . import data
from .backbones import backbone_names, load_backbone

# ----------------------------------------------------------------------------- options


@dataclass
class _PromptOptions:
    REQUIRED: ClassVar[tuple[str, ...]] = ()
    LONG_FIELD: ClassVar[str] = ""
    """The field (diff or code) that is cut to fit the prompt budget."""

    prompt_template: str = ""
    max_prompt_tokens: int = field(default=512, metadata={"help": "prompt tokens at most; the diff/code loses lines from its middle outward (hunk headers kept)"})

    def __post_init__(self):
        clm.check_prompt_template(self.prompt_template, self.REQUIRED, self.max_prompt_tokens)


@dataclass
class NecessityOptions(_PromptOptions):
    REQUIRED: ClassVar = ("patch",)
    LONG_FIELD: ClassVar = "patch"
    prompt_template: str = field(
        default="Review the code change below.\n{patch}\nDoes this change need a review comment?",
        metadata={"help": "prompt with {patch}; the head reads the hidden state of its last token"})
    pos_weight: float | None = field(default=None, metadata={"help": "BCE weight of positives (e.g. the negative:positive ratio)"})


@dataclass
class _GenerationOptions(_PromptOptions):
    max_target_tokens: int = field(default=128, metadata={"help": "answer tokens trained on at most (the rest are cut)"})
    max_new_tokens: int = field(default=128, metadata={"help": "tokens generated at most"})
    num_beams: int = field(default=1, metadata={"help": "1 = greedy decoding, more = beam search"})

    def __post_init__(self):
        super().__post_init__()
        clm.GenerationOptions.checked(self)


@dataclass
class CommentOptions(_GenerationOptions):
    REQUIRED: ClassVar = ("patch",)
    LONG_FIELD: ClassVar = "patch"
    prompt_template: str = field(
        default="Review the code change below and write a review comment.\n{patch}\nReview comment:\n",
        metadata={"help": "prompt with {patch}; the comment follows it"})


@dataclass
class RefineOptions(_GenerationOptions):
    REQUIRED: ClassVar = ("old", "comment")
    LONG_FIELD: ClassVar = "old"
    prompt_template: str = field(
        default="Revise the code according to the review comment.\nCode:\n{old}\nReview comment: {comment}\nRevised code:\n",
        metadata={"help": "prompt with {old} and {comment}; the revised code follows it"})
    max_comment_tokens: int = field(default=64, metadata={"help": "the comment is cut at its end to this many tokens"})


# ----------------------------------------------------------------------------- prompts


def _too_long(example: dict, options) -> bool:
    # Characters / 3 is a generous token estimate for code; the exact cut happens per batch.
    return len(example[options.LONG_FIELD]) > 3 * options.max_prompt_tokens


def _cut_note(who: str, options) -> str:
    return (f"about {who} have a {options.LONG_FIELD} longer than max_prompt_tokens={options.max_prompt_tokens}; "
            f"their middle lines are cut (hunk headers kept)")


def render_prompt(tokenizer, options: _PromptOptions, example: dict) -> list[int]:
    """The example's prompt as token ids, within `options.max_prompt_tokens`."""
    values = {name: example[name] for name in options.REQUIRED}
    if isinstance(options, RefineOptions):
        comment_ids = clm.encode(tokenizer, values["comment"])
        if len(comment_ids) > options.max_comment_tokens:
            values["comment"] = tokenizer.decode(comment_ids[:options.max_comment_tokens])
    long_field = options.LONG_FIELD
    frame = clm.prompt_ids(tokenizer, options.prompt_template.format(**{**values, long_field: ""}))
    budget = options.max_prompt_tokens - len(frame)
    values[long_field], _ = data.truncate_lines_middle_out(
        values[long_field], max(budget, 0), lambda text: len(clm.encode(tokenizer, text)))
    ids = clm.prompt_ids(tokenizer, options.prompt_template.format(**values))
    # Token boundaries across lines, or one line longer than the budget, can leave a
    # little over: cut tokens from the middle, which keeps the template's ends intact.
    return clm.truncate_middle(ids, options.max_prompt_tokens)


# ----------------------------------------------------------------------------- models


class NecessityModel(nn.Module):
    """A logit from the LM's last hidden state at the prompt's final token."""

    def __init__(self, causal_lm: clm.CausalLM, options: NecessityOptions):
        super().__init__()
        self.backbone = causal_lm.model
        self.tokenizer = causal_lm.tokenizer
        self.backbone_info = causal_lm.info
        self.options = options
        self.head = FP32Head(nn.Linear(causal_lm.model.config.hidden_size, 1))

    def prompt(self, example: dict) -> list[int]:
        return render_prompt(self.tokenizer, self.options, example)

    def example_length(self, example: dict) -> int:
        # Characters, capped by the prompt budget in tokens: a cheap proxy for
        # bucketing that does not tokenise every example up front.
        return min(len(example["patch"]), 4 * self.options.max_prompt_tokens)

    def collate(self, examples, rng):
        batch = clm.prompt_batch(self.tokenizer, [self.prompt(e) for e in examples], side="right")
        if all("label" in e for e in examples):
            batch["labels"] = torch.tensor([float(e["label"]) for e in examples])
        return batch

    def forward(self, batch) -> torch.Tensor:
        mask = batch["attention_mask"]
        _, hidden = clm.lm_forward(self.backbone, batch["input_ids"], mask, hidden=True)
        last = mask.sum(dim=1) - 1  # right padding: the final real token of each row
        final = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return self.head(final).squeeze(-1)

    def loss(self, logits, batch):
        weight = None if self.options.pos_weight is None else torch.tensor(self.options.pos_weight, device=logits.device)
        return F.binary_cross_entropy_with_logits(logits.float(), batch["labels"].to(logits.device), pos_weight=weight)

    def scores(self, logits):
        return torch.sigmoid(logits.float())


# ----------------------------------------------------------------------------- tasks


class _CodeReviewTask:
    domain = "code_review"
    card_keys = ("demo",)
    split_keys = (*SPLIT_KEYS, "validation_fraction")
    KIND: ClassVar[str]
    DEMO_SIZES: ClassVar[dict[str, int]]

    @property
    def field_keys(self) -> tuple[str, ...]:
        return (*data.TASK_FIELDS[self.KIND], "id")

    def backbones(self) -> list[str]:
        return backbone_names()

    def default_method_options(self, method: str, model) -> dict[str, Any]:
        return clm.default_method_options(method, model.backbone)

    def read(self, card: Card, options) -> Dataset:
        labels = self._labels(card)
        if card.format == "demo":
            demo = {**self.DEMO_SIZES, "seed": 0, **(card.option("demo") or {})}
            sizes = {s: int(demo[s]) for s in ("train", "validation", "test")}
            return Dataset(data.demo_examples(self.KIND, sizes, int(demo["seed"])), labels)
        if card.format not in self.formats:
            raise UserError(f"{card.card_path}: {self.name} reads formats {', '.join(self.formats)}, not {card.format!r}")
        per_split = split_sources(card, False, lambda: card.file("data"), data.json_records)
        notes: list[str] = []
        if per_split:
            splits = {split: self._read_file(card, path, notes, records) for split, (path, records) in per_split.items()}
            splits, note = hold_out_validation(splits, card, "records")
            notes += [note] if note else []
        else:
            spec = card.splits or {}
            ratios = split_ratios(card, "records")
            path = card.file("data")
            splits = ratio_split(self._read_file(card, path, notes, loader_records(card, path)), ratios,
                                 int(spec.get("seed", 0)), where=str(card.card_path))
        return Dataset(splits, labels, notes + self._notes(splits, options))

    def _labels(self, card: Card) -> list[str]:
        return []

    def _read_file(self, card: Card, path: Path, notes: list[str], records: list | None) -> list[dict]:
        if card.format == "jsonl":
            return data.read_jsonl(path, self.KIND, card.fields or {}, notes=notes, records=records,
                                   label_names=self._labels(card))
        return data.read_tufano_tsv(path, self.KIND)

    def _notes(self, splits, options) -> list[str]:
        long, where = count_by_split(splits, lambda e: _too_long(e, options))
        return [_cut_note(f"{long} examples ({where})", options)] if long else []

    def input_notes(self, examples, options) -> list[str]:
        long = sum(_too_long(e, options) for e in examples)
        notes = [_cut_note(f"{long} inputs", options)] if long else []
        unmarked = sum(bool(e.get(data.MARKERS_REMOVED)) for e in examples)
        if unmarked:
            notes.append(f"the code of {unmarked} inputs carries CodeReviewer's per-line diff markers (-, space); "
                         f"they are taken off, as training takes them off its records")
        return notes

    def build_model(self, backbone: str, labels: list[str], options):
        causal_lm = load_backbone(backbone)
        if self.KIND == "necessity":
            return NecessityModel(causal_lm, options)
        generation = clm.GenerationOptions.checked(options)
        return clm.PromptedGenerator(
            causal_lm, lambda example: render_prompt(causal_lm.tokenizer, options, example),
            max_target_tokens=options.max_target_tokens, generation=generation,
            length_budget=options.max_prompt_tokens, fields=options.REQUIRED)

    def read_inputs(self, paths, options, fields) -> list[dict]:
        examples = []
        for path in map(Path, paths):
            if path.suffix.lower() in (".jsonl", ".json"):
                examples += data.read_jsonl(path, self.KIND, fields, labelled=False)
            elif path.suffix.lower() == ".tsv":
                examples += data.read_tufano_tsv(path, self.KIND, labelled=False)
            else:
                raise UserError(f"{path}: {self.name} predict reads CodeReviewer JSONL (.jsonl) or Tufano pairs (.tsv)")
        return examples

    def rows_follow_examples(self, options) -> bool:
        return self.KIND == "necessity"  # the generation tasks decode (with beams) rather than score rows

    def parse_request(self, payload: dict, options) -> list[dict]:
        """{"inputs": [{FIELD: TEXT, ...}, ...]} or {"inputs": {ID: {...}}}, with the task's
        CodeReviewer fields (`patch`; for code-refine `old` and `comment`)."""
        fields = [name for name in data.TASK_FIELDS[self.KIND] if name != "label"]
        requests.only_fields(payload, ("inputs",))
        examples = []
        for key, record in requests.items(payload, "inputs", "objects {" + ", ".join(fields) + "}"):
            if not isinstance(record, dict):
                raise UserError(f"inputs[{key}]: an object with {', '.join(fields)}, not {type(record).__name__}")
            requests.only_fields(record, tuple(fields), where=f"inputs[{key}]")
            missing = [name for name in fields if name not in record]
            if missing:
                raise UserError(f"inputs[{key}].{missing[0]}: required ({self.name} reads {', '.join(fields)})")
            examples.append({"id": key, **{name: requests.text(record[name], f"inputs[{key}].{name}") for name in fields}})
        if self.KIND == "refine":  # as predict reads a file of them
            data.drop_old_side_markers(examples)
        return examples

    def export_backbone(self, model, directory: Path) -> str:
        """The transformers causal LM and its tokenizer (`save_pretrained`), which
        `AutoModelForCausalLM.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)` load."""
        clm.save_causal_lm(clm.CausalLM(model.backbone, model.tokenizer, model.backbone_info), directory)
        return ("import transformers\nmodel = transformers.AutoModelForCausalLM.from_pretrained(EXPORT_DIR)\n"
                "tokenizer = transformers.AutoTokenizer.from_pretrained(EXPORT_DIR)")

    def card_template(self) -> str:
        return CARD_TEMPLATES[self.name]


class NecessityTask(_CodeReviewTask):
    name = "code-review-necessity"
    example_unit = "diff hunks"
    description = "diff hunk -> needs a review comment? (LLaMA-Reviewer's review necessity prediction)"
    metrics = ("f1", "precision", "recall", "accuracy", "auroc", "aupr")
    primary_metric = "f1"
    formats = ("jsonl", "demo")
    loader_format = "jsonl"
    options = NecessityOptions
    KIND = "necessity"
    DEMO_SIZES = {"train": 600, "validation": 100, "test": 200}
    LABELS = ["no_comment", "needs_comment"]

    def _labels(self, card: Card) -> list[str]:
        labels = card.labels or self.LABELS
        if len(labels) != 2:
            raise UserError(f"{card.card_path}: {self.name} is binary; `labels` must name 2 classes (0 then 1), got {labels}")
        return labels

    def describe(self, example, score, labels) -> dict:
        return {"id": example["id"], **describe_scores(score, labels)}


class _GenerationTask(_CodeReviewTask):
    named_classes = False  # the target is text
    metrics = ("bleu4", "corpus_bleu4", "exact_match")
    primary_metric = "bleu4"
    formats = ("jsonl", "tufano_tsv", "demo")
    loader_format = "jsonl"

    def compute_metrics(self, metric_names, examples, outputs) -> dict:
        references, hypotheses = [e["label"] for e in examples], list(outputs)
        stopwords = examples[0].get(STOPWORDS) if examples else None
        if not stopwords or "bleu4" not in metric_names:
            return compute_text_metrics(metric_names, references, hypotheses)
        others = compute_text_metrics([n for n in metric_names if n != "bleu4"], references, hypotheses)
        return {name: smooth_bleu4(references, hypotheses, stopwords) if name == "bleu4" else others[name]
                for name in metric_names}

    def describe(self, example, output, labels) -> dict:
        return {"id": example["id"], "prediction": output}


class CommentTask(_GenerationTask):
    name = "code-review-comment"
    example_unit = "diff hunks with their comments"
    description = "diff hunk -> review comment (LLaMA-Reviewer's review comment generation)"
    options = CommentOptions
    card_keys = ("demo", "bleu_stopwords")
    KIND = "comment"
    DEMO_SIZES = {"train": 600, "validation": 60, "test": 150}

    def read(self, card: Card, options) -> Dataset:
        """The card's `bleu_stopwords: FILE` (one word per line, as CodeReviewer's
        stopwords.txt) makes `bleu4` CodeReviewer's review-comment figure: those words are
        dropped from both sides first. The words travel on the examples, so evaluation
        scores the split the way its card says."""
        dataset = super().read(card, options)
        if card.option("bleu_stopwords") is None:
            return dataset
        path = card.resolve(str(card.option("bleu_stopwords")), "bleu_stopwords")
        stopwords = _stopwords(path, card)
        for examples in dataset.splits.values():
            for example in examples:
                example[STOPWORDS] = stopwords
        dataset.notes.append(f"bleu4 drops the {len(stopwords)} words of {path} from comments and references first "
                             f"(bleu_stopwords, as CodeReviewer's review-comment BLEU)")
        return dataset


STOPWORDS = "bleu_stopwords"
"""The example key that carries the card's `bleu_stopwords` words to the metrics."""


def _stopwords(path: Path, card: Card) -> tuple[str, ...]:
    """The file's words, sorted (a tuple: examples stay JSON-able)."""
    if not path.is_file():
        raise UserError(f"{card.card_path}: bleu_stopwords = {path} is not a file; give a text file of one word per "
                        f"line (relative paths start at {card.folder})")
    try:
        words = tuple(sorted({line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()}))
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: not UTF-8 text (byte {error.start}); save the stopwords as UTF-8") from None
    if not words:
        raise UserError(f"{path}: no words; bleu_stopwords lists one word per line")
    return words


class RefineTask(_GenerationTask):
    name = "code-refine"
    example_unit = "code changes with their revisions"
    description = "code + review comment -> revised code (LLaMA-Reviewer's code refinement)"
    options = RefineOptions
    KIND = "refine"
    DEMO_SIZES = {"train": 600, "validation": 60, "test": 150}


CARD_TEMPLATES = {
    "code-review-necessity": """---
name: my-review-necessity-data
domain: code_review
task: code-review-necessity
format: jsonl                     # CodeReviewer JSON lines
files:
  data: hunks.jsonl               # one {"patch": "@@ ... @@ ...", "y": 0 or 1} per line
fields: {patch: patch, label: y}  # which JSON key is what
labels: [no_comment, needs_comment]  # the names of y = 0 and 1; a record's y may give the name
splits: {ratios: {train: 0.8, validation: 0.1, test: 0.1}, seed: 0}
# or one file per split, without files.data: splits: {train: train.jsonl, validation: valid.jsonl, test: test.jsonl}; without validation, validation_fraction (0.1) of train is held out
# or a column naming each record's split: splits: {fold_by: set} (cells train, validation, test), or its fold: {fold_by: fold, test: [5]} (the rest trains)
license: ""
source: ""
---
Where the hunks come from, how "needs a comment" was decided, intended use, known biases.
""",
    "code-review-comment": """---
name: my-review-comment-data
domain: code_review
task: code-review-comment
format: jsonl                     # CodeReviewer JSON lines, or tufano_tsv (code<TAB>comment)
files:
  data: comments.jsonl            # one {"patch": "@@ ... @@ ...", "msg": "review comment"} per line
fields: {patch: patch, label: msg}
# bleu_stopwords: stopwords.txt   # CodeReviewer's review-comment BLEU drops these words (one per line) first
splits: {ratios: {train: 0.8, validation: 0.1, test: 0.1}, seed: 0}
# or one file per split, without files.data: splits: {train: train.jsonl, validation: valid.jsonl, test: test.jsonl}; without validation, validation_fraction (0.1) of train is held out
# or a column naming each record's split: splits: {fold_by: set} (cells train, validation, test), or its fold: {fold_by: fold, test: [5]} (the rest trains)
license: ""
source: ""
---
Where the hunks and comments come from, intended use, known biases.
""",
    "code-refine": """---
name: my-code-refinement-data
domain: code_review
task: code-refine
format: jsonl                     # CodeReviewer JSON lines, or tufano_tsv
files:
  data: refinements.jsonl         # one {"old": code, "comment": review, "new": revised code} per line
fields: {old: old, comment: comment, label: new}
splits: {ratios: {train: 0.8, validation: 0.1, test: 0.1}, seed: 0}
# or one file per split, without files.data: splits: {train: train.jsonl, validation: valid.jsonl, test: test.jsonl}; without validation, validation_fraction (0.1) of train is held out
# or a column naming each record's split: splits: {fold_by: set} (cells train, validation, test), or its fold: {fold_by: fold, test: [5]} (the rest trains)
license: ""
source: ""
---
Where the code and reviews come from, intended use, known biases.
""",
}

register_task(NecessityTask())
register_task(CommentTask())
register_task(RefineTask())
