"""Tasks: the interface a domain implements, and the registry that holds them.

A task is a `typing.Protocol`, not a base class: a domain writes a plain class with
these members and registers an instance. Importing `peftlab.domains` registers them all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from peftlab.shared.cards import Card
from peftlab.shared.errors import UserError, did_you_mean
from torch import nn

SPLIT_KEYS = ("ratios", "seed", "train", "validation", "test", "fold_by")
"""What every task reads from a card's `splits:`: ratios and seed, one file per split, or
the column whose values make the splits (`shared.folds`)."""

Example = dict[str, Any]
"""One record: task-specific fields, plus `label` (class index) where labelled and `id`."""


class FP32Head(nn.Sequential):
    """A task head that computes in fp32 whatever autocast says. Under bf16 autocast its
    logits had 8 bits of mantissa: different inputs got the same score (86 distinct
    scores for 200 protein pairs), tying the rankings AUROC and AUPR measure. A head is
    tiny next to the backbone, so fp32 costs nothing measurable."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        with torch.autocast(features.device.type, enabled=False):
            return super().forward(features.float())


def file_identity(example: Example) -> dict[str, str]:
    """A file-backed example's identity on a prediction line: its `id` (a table's cell or
    the path as given), and the file it read as `path` where that says more."""
    row = {"id": example["id"]}
    if example.get("path", example["id"]) != example["id"]:
        row["path"] = example["path"]
    return row


def describe_scores(scores: np.ndarray, labels: list[str]) -> dict[str, Any]:
    """A single-label prediction as one JSON line's fields. Binary tasks score one
    probability, that of `labels[1]`, which the line names as `positive_class`."""
    if np.ndim(scores) == 0:
        probability = float(scores)
        return {"score": probability, "positive_class": labels[1], "prediction": labels[int(probability >= 0.5)]}
    return {"scores": {label: float(s) for label, s in zip(labels, scores)}, "prediction": labels[int(np.argmax(scores))]}


@dataclass
class Dataset:
    splits: dict[str, list[Example]]
    labels: list[str]
    notes: list[str] = field(default_factory=list)
    """What the reader did that a user should know (crops, drops), shown after reading."""


@runtime_checkable
class TaskModel(Protocol):
    """What the training loop needs of a task's model (an `nn.Module`)."""

    backbone: nn.Module
    """Where the PEFT method applies."""
    head: nn.Module
    """Always trains, saved with the adapter."""
    backbone_info: dict[str, Any]
    """name, source, weights_sha256: recorded in meta.json and checked on load."""

    def collate(self, examples: Sequence[Example], rng: np.random.Generator | None) -> dict[str, Any]:
        """Examples -> a batch; `rng` drives training-time randomness (None at eval)."""

    def __call__(self, batch: dict[str, Any]) -> torch.Tensor: ...

    def loss(self, outputs: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor: ...

    def scores(self, outputs: torch.Tensor) -> torch.Tensor:
        """(N,) positive-class probabilities for binary tasks, (N, K) otherwise."""

    def example_length(self, example: Example) -> int:
        """A cost proxy used to bucket batches by length."""


@runtime_checkable
class Task(Protocol):
    name: str
    domain: str
    description: str
    metrics: tuple[str, ...]
    primary_metric: str
    example_unit: str
    """What one example is, plural ("protein pairs", "clips"): how `card validate` counts."""
    formats: tuple[str, ...]
    loader_format: str
    """The format whose reader reads the records of a card's `loader: module:function`
    (a table's rows, or JSON lines' objects): shared/loaders.py."""
    card_keys: tuple[str, ...]
    """Extra card header fields this task reads, besides the core ones."""
    split_keys: tuple[str, ...]
    """The keys of the card's `splits:` this task reads (usually `SPLIT_KEYS`)."""
    field_keys: tuple[str, ...]
    """The keys of the card's `fields:` (column renames) this task reads; () for none."""
    options: type
    """Dataclass of the recipe's `task:` section (with help text)."""

    def backbones(self) -> list[str]: ...

    def read(self, card: Card, options: Any) -> Dataset: ...

    def build_model(self, backbone: str, labels: list[str], options: Any) -> TaskModel: ...

    def default_method_options(self, method: str, model: TaskModel) -> dict[str, Any]:
        """Method options that suit this backbone (e.g. LoRA targets), overridable by the user."""

    def read_inputs(self, paths: Sequence[Path], options: Any, fields: dict[str, int | str]) -> list[Example]:
        """The task's natural input files -> unlabelled examples, for `peftlab predict`.
        `fields`: the training card's, so tables keep the columns the run was trained on."""

    def describe(self, example: Example, scores: np.ndarray, labels: list[str]) -> dict[str, Any]:
        """One JSONL prediction line: the example's identity, scores and predicted label."""

    def card_template(self) -> str: ...

    # Optional hooks, looked up where they are used:
    #   compute_metrics(names, examples, outputs)       metrics other than shared/metrics.py's per-example ones
    #   applicable_metrics(dataset)                     the metrics it can compute on this data (default: its own
    #                                                   and every metric scoring what they score); run_metrics refuses others
    #   chance_levels(names, train, scored)             (metric -> a model's score that learnt nothing, how it is
    #                                                   got) where a constant answer is not that model (retrieval)
    #   write_report(split, examples, outputs, labels, directory)   per-class files next to metrics.json
    #   input_notes(examples, options)                  notes on `peftlab predict` inputs (what `read` notes for a card)
    #   describe_predictions(examples, outputs, labels) prediction rows that depend on each other (retrieval)
    #   rows_follow_examples(options)                   whether the backbone sees one input row per example (serve mixes adapters by row)
    #   parse_request(body, options)                    `peftlab serve`'s JSON input form
    #   export_backbone(model, directory)               the backbone in its library's own format
    #   group_metrics (attribute)                       True where the card's `group_by` gives per-group metrics
    #   named_classes (attribute)                       False where targets are text, so a card's `labels` is refused
    #   held_out_example_unit (attribute)               `example_unit` of validation and test where it differs (captions)


_TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    if task.name in _TASKS:
        raise ValueError(f"task {task.name!r} is registered twice")
    missing = [m for m in ("example_unit", "loader_format", "split_keys", "field_keys", "read", "build_model", "read_inputs", "describe", "card_template") if not hasattr(task, m)]
    if missing:
        raise TypeError(f"task {task.name!r} lacks {', '.join(missing)}")
    _TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    load_domains()
    if name not in _TASKS:
        raise UserError(f"unknown task {name!r}{did_you_mean(name, _TASKS)}")
    return _TASKS[name]


def list_tasks() -> list[Task]:
    load_domains()
    return [_TASKS[name] for name in sorted(_TASKS)]


def load_domains() -> None:
    # The registries (tasks, and the methods of a field) live in shared; the domains fill
    # them. Imported by name at run time so that `shared` has no import-time dependency
    # on any domain.
    import importlib

    importlib.import_module("peftlab.domains").load_all()
