"""The ReFT paper's reasoning tasks (Wu et al. 2024) on any transformers causal LM.

- `reasoning-commonsense`: multiple-choice or yes/no questions (BoolQ, PIQA, SIQA,
  HellaSwag, WinoGrande, ARC-e, ARC-c, OBQA, or the unified form). The model writes the
  option letter (or true/false); the first valid answer in the generated text is taken
  (`data.extract_choice`) and compared with the gold one.
- `reasoning-arithmetic`: math word problems (GSM8K, AQuA, MAWPS, SVAMP). The model
  writes a rationale ending in "The answer is N."; the number after "answer is" (else the
  last number) is compared with the gold one within 1e-3, as LLM-Adapters does; AQuA's
  option letters are extracted like commonsense answers.

Both generate greedily (or with beams) from a prompt template in the recipe and train
with the loss on the answer's tokens only (`causal_lm.PromptedGenerator`). Metrics:
`accuracy` over all test questions (primary), `accuracy/<dataset>` for each dataset the
split holds, and `accuracy_avg`, the mean of the per-dataset accuracies: the "Avg"
column of the paper's tables, which can be the primary metric too
(`eval.primary_metric=accuracy_avg`: checkpoints and early stopping then follow it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from peftlab.shared import causal_lm as clm
from peftlab.shared import requests
from peftlab.shared.cards import Card
from peftlab.shared.data import hold_out_validation, ratio_split, split_ratios
from peftlab.shared.errors import UserError
from peftlab.shared.folds import split_sources
from peftlab.shared.loaders import loader_records
from peftlab.shared.metrics import list_metrics, register_metric
from peftlab.shared.tasks import SPLIT_KEYS, Dataset, register_task

from . import data

# Derived in `compute_metrics` below; registered for its name and direction, so that it
# can be the primary metric. A re-import of this module finds it there.
if "accuracy_avg" not in list_metrics():
    register_metric("accuracy_avg", None)

# ----------------------------------------------------------------------------- options


@dataclass
class ReasoningOptions:
    prompt_template: str = field(
        default="Question: {question}\n{choices}Answer: ",
        metadata={"help": "prompt with {question} and {choices} (the options as '(A) text' lines, empty for yes/no)"})
    max_prompt_tokens: int = field(default=512, metadata={"help": "prompt tokens at most; a longer question loses its middle"})
    max_target_tokens: int = field(default=256, metadata={"help": "answer tokens trained on at most"})
    max_new_tokens: int = field(default=32, metadata={"help": "tokens generated at most"})
    num_beams: int = field(default=1, metadata={"help": "1 = greedy decoding, more = beam search"})
    answer_prefix: str = field(default="", metadata={
        "help": "text the model is trained to write before the answer (pyreft's commonsense protocol: "
                "'the correct answer is '); scoring reads what follows it"})
    scoring: str = field(default="lenient", metadata={
        "help": "how generations are scored: lenient (the most explicit answer form; see the README) or pyreft "
                "(ReFT's evaluation: commonsense by exact match of the whole generation, math by its last number, "
                "AQuA by its first capital A-E), for numbers comparable with the paper's"})

    def __post_init__(self):
        if self.scoring not in ("lenient", "pyreft"):
            raise ValueError(f"scoring must be lenient or pyreft, got {self.scoring!r}")
        clm.GenerationOptions.checked(self)
        clm.check_prompt_template(self.prompt_template, ("question", "choices"), self.max_prompt_tokens)


def render_prompt(tokenizer, options: ReasoningOptions, example: dict) -> list[int]:
    shown = [] if example.get("choices_in_question") else example.get("choices") or []
    choices = "".join(f"({data.LETTERS[i]}) {c}\n" for i, c in enumerate(shown))
    frame = clm.prompt_ids(tokenizer, options.prompt_template.format(question="", choices=choices))
    question = clm.encode(tokenizer, example["question"])
    budget = max(options.max_prompt_tokens - len(frame), 0)
    text = example["question"] if len(question) <= budget else tokenizer.decode(clm.truncate_middle(question, budget))
    ids = clm.prompt_ids(tokenizer, options.prompt_template.format(question=text, choices=choices))
    return clm.truncate_middle(ids, options.max_prompt_tokens)


def _stamp(examples: list[dict], options: ReasoningOptions) -> list[dict]:
    """The answer prefix joins the training target; it and the scoring rule ride on each
    example, because scoring happens where only the examples reach (compute_metrics)."""
    for example in examples:
        example["scoring"] = options.scoring
        example["answer_prefix"] = options.answer_prefix
        if "label" in example and options.answer_prefix:
            example["label"] = options.answer_prefix + example["label"]
    return examples


# ----------------------------------------------------------------------------- tasks


class _ReasoningTask:
    domain = "reasoning"
    named_classes = False  # the answer is text (or an option of its own problem)
    metrics = ("accuracy", "accuracy_avg")
    primary_metric = "accuracy"
    formats = ("jsonl", "demo")
    loader_format = "jsonl"
    card_keys = ("demo",)
    split_keys = (*SPLIT_KEYS, "validation_fraction")
    field_keys = ()
    options = ReasoningOptions
    KIND: ClassVar[str]
    NUMERIC: ClassVar[bool]
    DEMO_SIZES: ClassVar[dict[str, int]]

    def backbones(self) -> list[str]:
        return [*clm.TINY_PRESETS, *clm.PACKAGED_GGUF, "HuggingFaceTB/SmolLM2-135M", "meta-llama/Llama-2-7b-hf"]

    def default_method_options(self, method: str, model) -> dict[str, Any]:
        return clm.default_method_options(method, model.backbone)

    def read(self, card: Card, options) -> Dataset:
        dataset = self._read(card)
        for examples in dataset.splits.values():
            _stamp(examples, options)
        return dataset

    def _read(self, card: Card) -> Dataset:
        if card.format == "demo":
            demo = {**self.DEMO_SIZES, "seed": 0, **(card.option("demo") or {})}
            sizes = {s: int(demo[s]) for s in ("train", "validation", "test")}
            generate = data.demo_commonsense if self.KIND == "commonsense" else data.demo_math
            return Dataset(generate(sizes, int(demo["seed"])), [])
        per_split = split_sources(card, False, lambda: card.file("data"), data.json_records)
        note = None
        if per_split:
            splits = {split: data.read_jsonl(path, self.KIND, records=records) for split, (path, records) in per_split.items()}
            splits, note = hold_out_validation(splits, card, "problems")
        else:
            spec = card.splits or {}
            ratios = split_ratios(card, "problems")
            path = card.file("data")
            splits = ratio_split(data.read_jsonl(path, self.KIND, records=loader_records(card, path)), ratios,
                                 int(spec.get("seed", 0)), where=str(card.card_path))
        return Dataset(splits, [], [note] if note else [])

    def build_model(self, backbone: str, labels: list[str], options: ReasoningOptions):
        causal_lm = clm.load_causal_lm(backbone)
        generation = clm.GenerationOptions.checked(options)
        return clm.PromptedGenerator(
            causal_lm, lambda example: render_prompt(causal_lm.tokenizer, options, example),
            max_target_tokens=options.max_target_tokens, generation=generation,
            length_budget=options.max_prompt_tokens, fields=("question",))

    def extract(self, text: str, example: dict) -> str | None:
        prefix = example.get("answer_prefix", "")
        if prefix:  # the answer follows the prefix; pyreft counts a generation without it as wrong
            _, found, after = text.partition(prefix)
            if found:
                text = after
            elif example.get("scoring") == "pyreft":
                return None
        if example.get("scoring") == "pyreft":
            return data.extract_as_pyreft(text, example, self.NUMERIC)
        return data.extract_math(text, example) if self.NUMERIC else data.extract_choice(text, example)

    def is_right(self, text: str, example: dict) -> bool:
        numeric = self.NUMERIC and not example.get("choices")
        compare = data.same_answer_as_pyreft if example.get("scoring") == "pyreft" else data.same_answer
        return compare(self.extract(text, example), example["answer"], numeric)

    def applicable_metrics(self, dataset) -> tuple[str, ...]:
        return self.metrics  # scored on extracted answers, not class scores

    def compute_metrics(self, metric_names, examples, outputs) -> dict:
        correct: dict[str, list[bool]] = {}
        for example, text in zip(examples, outputs):
            correct.setdefault(example["dataset"], []).append(self.is_right(text, example))
        per_dataset = {name: sum(flags) / len(flags) for name, flags in sorted(correct.items())}
        total = [flag for flags in correct.values() for flag in flags]
        results: dict[str, Any] = {"accuracy": sum(total) / len(total) if total else None}
        results.update({f"accuracy/{name}": value for name, value in per_dataset.items()})
        results["accuracy_avg"] = sum(per_dataset.values()) / len(per_dataset) if per_dataset else None
        return results

    def read_inputs(self, paths, options, fields) -> list[dict]:
        examples = []
        for path in map(Path, paths):
            if path.suffix.lower() not in (".jsonl", ".json"):
                raise UserError(f"{path}: {self.name} predict reads JSON lines of questions (.jsonl)")
            examples += data.read_jsonl(path, self.KIND, labelled=False)
        return _stamp(examples, options)

    def parse_request(self, payload: dict, options) -> list[dict]:
        """{"questions": [QUESTION, ...]} or {"questions": {ID: QUESTION, ...}}: a question's
        text, or an object of a shape predict reads from JSON lines (e.g. {"question": TEXT,
        "choices": [TEXT, ...]}), without the answer."""
        requests.only_fields(payload, ("questions",))
        examples = []
        for key, record in requests.items(payload, "questions", "questions (text or objects)"):
            where = f"questions[{key}]"
            if isinstance(record, str):
                record = {"question": record}
            if not isinstance(record, dict):
                raise UserError(f"{where}: a question's text or an object, not {type(record).__name__}")
            if not str(record.get("question", "x")).strip():
                raise UserError(f"{where}: empty question")
            examples.append(data.record_example(record, where, self.KIND, False, "request", key))
        return _stamp(examples, options)

    def describe(self, example, output, labels) -> dict:
        # The gold answer joins as `label` where the split has one (runner.evaluate_split).
        return {"id": example["id"], "dataset": example["dataset"], "prediction": output,
                "extracted": self.extract(output, example)}

    def card_template(self) -> str:
        return CARD_TEMPLATE.format(task=self.name, shapes=SHAPES[self.KIND])


class CommonsenseTask(_ReasoningTask):
    name = "reasoning-commonsense"
    example_unit = "questions"
    description = "multiple-choice and yes/no commonsense questions -> answer (BoolQ, PIQA, SIQA, HellaSwag, WinoGrande, ARC, OBQA)"
    KIND = "commonsense"
    NUMERIC = False
    DEMO_SIZES = {"train": 900, "validation": 90, "test": 240}


class ArithmeticTask(_ReasoningTask):
    name = "reasoning-arithmetic"
    example_unit = "problems"
    description = "math word problems -> rationale and final number (GSM8K, AQuA, MAWPS, SVAMP)"
    KIND = "math"
    NUMERIC = True
    DEMO_SIZES = {"train": 900, "validation": 60, "test": 200}


SHAPES = {
    "commonsense": ('{"question": "Which one is a fruit?", "choices": ["hammer", "plum"], "answer": "B", "dataset": "mine"}\n'
                    '# also read as published: BoolQ, PIQA, SIQA, HellaSwag, WinoGrande, ARC, OBQA, LLM-Adapters'),
    "math": ('{"question": "Ann has 3 pens and gets 2 more. How many pens?", "answer": 5, "rationale": "3 + 2 = 5."}\n'
             '# also read as published: GSM8K, AQuA, SVAMP, MAWPS, LLM-Adapters math'),
}

CARD_TEMPLATE = """---
name: my-{task}-data
domain: reasoning
task: {task}
format: jsonl                 # one JSON object per line (or a JSON array)
splits: {{train: train.jsonl, validation: dev.jsonl, test: test.jsonl}}
# or one file: files: {{data: all.jsonl}}, and splits: {{ratios: {{train: 0.8, validation: 0.1, test: 0.1}}, seed: 0}}, or a key naming each record's split: {{fold_by: split}} (train, validation, test)
license: ""
source: ""
---
One record per line, for example:
{shapes}
An optional "dataset" key names the benchmark a record belongs to; metrics come per
dataset (accuracy/<dataset>) and averaged (accuracy_avg). Where the data comes from,
intended use, known biases.
"""

register_task(CommonsenseTask())
register_task(ArithmeticTask())
