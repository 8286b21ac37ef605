"""Frozen-feature caching: compute the untouched bottom of a backbone once, reuse it.

Methods that leave the first stages of a backbone as they were (a linear probe,
`freeze_layers`, LoRA restricted to the last N layers) make those stages a fixed
function of the input. Without input augmentation, each training example's output
of that frozen prefix is the same every epoch, so it is computed in the first epoch,
kept, and later epochs run only the stages that train. The backward pass never
entered the prefix (nothing there needs a gradient), so the saving is the prefix's
forward pass, every epoch after the first.

A domain uses it in three steps: list its backbone's stages in order
(`frozen_prefix_stages` says how many lead untouched), build a `FeatureCache` in its
task model's `plan_feature_cache`, and in `forward` take cached prefix outputs by
example key, computing (and storing) the ones not yet cached.

The helpers below serve every domain the same way: `Stage` names the parts of a stage
that are not one submodule (loose parameters, functional dropout), `frozen_prefix`
also says why the prefix ends, `plan` makes the on/off decision and its log line, and
`FeatureCache.prefix` runs or fetches a batch's prefix outputs (one tensor per example,
or a tuple of them).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

Features = torch.Tensor | tuple[torch.Tensor, ...]
"""One example's (or one batch's) prefix outputs: a tensor, or a tuple of them."""

_RANDOM_RATE = re.compile(r"(dropout|drop_prob|drop_rate)$")
"""Float attributes that hold a random drop rate (transformers' attention and Whisper
layers keep `dropout` / `activation_dropout` as floats; timm's DropPath `drop_prob`)."""


@dataclass
class Stage:
    """A backbone stage that is not a single submodule: the modules it runs, parameters
    it uses directly (e.g. a ViT's CLS token and position table), and the rate of any
    functional dropout it applies in training."""

    modules: Sequence[nn.Module] = ()
    parameters: Sequence[nn.Parameter] = ()
    dropout: float = 0.0


def frozen_prefix_stages(stages: Sequence[nn.Module | Stage]) -> int:
    """How many leading stages are a fixed function of their input: no trainable
    parameter, no forward hook (hook-based methods such as ReFT edit outputs there),
    no active dropout, and no BatchNorm using batch statistics. Stops at the first
    stage that fails."""
    return frozen_prefix(stages)[0]


def frozen_prefix(stages: Sequence[nn.Module | Stage]) -> tuple[int, str | None]:
    """`frozen_prefix_stages`, and what ends the prefix (None when every stage is fixed).

    BatchNorm counts by its mode, so ask with the model in training mode (`in_training`)."""
    for index, stage in enumerate(stages):
        reason = _not_fixed(stage)
        if reason is not None:
            return index, reason
    return len(stages), None


def _not_fixed(stage: nn.Module | Stage) -> str | None:
    if isinstance(stage, Stage):
        if any(p.requires_grad for p in stage.parameters):
            return "trainable parameters"
        if stage.dropout > 0:
            return "dropout"
        modules = [m for part in stage.modules for m in part.modules()]
    else:
        modules = list(stage.modules())
    for module in modules:
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            return "trainable parameters"
        if module._forward_hooks or module._forward_pre_hooks:
            return "a forward hook (a method that edits outputs there)"
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            return "dropout"
        if any(_RANDOM_RATE.search(name) and isinstance(value, float) and value > 0
               for name, value in vars(module).items()):
            return "dropout"  # attention modules and DropPath keep their rate as a float
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            return "BatchNorm using batch statistics"  # an example's output depends on its batch
    return None


def in_training(model: nn.Module, stages: Callable[[], Sequence[nn.Module | Stage]]) -> tuple[int, str | None, int]:
    """`frozen_prefix` of `stages()` with `model` in training mode, as the loop will run
    it (a task model's `train` may keep some BatchNorms in eval mode), then back to its
    mode. -> (frozen stages, what ends them, all stages)."""
    was_training = model.training
    model.train()
    try:
        listed = stages()
        frozen, reason = frozen_prefix(listed)
    finally:
        model.train(was_training)
    return frozen, reason, len(listed)


def plan(frozen: int, reason: str | None, total: int, budget_bytes: int, needed_bytes: Callable[[int], int], *,
         worth_from: int = 1, varying_inputs: str | None = None, hint: str = "") -> tuple[FeatureCache | None, str]:
    """The cache, or None, and the log line saying why.

    `worth_from`: fewer frozen stages than this save too little to cache (an embedding
    lookup); `varying_inputs`: why training inputs change between epochs, if they do;
    `needed_bytes(frozen)`: memory for every training example's prefix outputs; `hint`
    is added when the prefix is too short (how a task option could lengthen it)."""
    if frozen < worth_from:
        if frozen == 0 and reason == "trainable parameters":
            why = "the method trains the backbone from its first stage on; nothing to reuse"
        else:
            why = f"backbone stage {frozen + 1} of {total} has {reason}; {'too little' if frozen else 'nothing'} before it to reuse"
        return None, f"feature cache: off ({why}{'; ' + hint if hint else ''})"
    if varying_inputs:
        return None, f"feature cache: off ({varying_inputs})"
    needed = needed_bytes(frozen)
    if needed > budget_bytes:
        return None, (f"feature cache: off (the frozen outputs need {needed / 2**30:.1f} GiB, over "
                      f"train.feature_cache_gb={budget_bytes / 2**30:g}; raise it to cache them)")
    return FeatureCache(frozen, budget_bytes), (
        f"feature cache: on; the first {frozen} of {total} backbone stages are frozen and run once per example "
        f"({needed / 2**20:.3g} MiB), not every epoch" + (f"; stage {frozen + 1} has {reason}" if reason else ""))


def output_bytes(model: nn.Module, compute: Callable[[], Features]) -> int:
    """Bytes of what `compute()` returns (e.g. one blank example through the prefix), run
    without gradients and with `model` in eval mode (so BatchNorm learns nothing from it)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            outputs = compute()
    finally:
        model.train(was_training)
    parts = outputs if isinstance(outputs, tuple) else (outputs,)
    return sum(t.numel() * t.element_size() for t in parts)


def unique_ids(examples: Sequence[dict]) -> str | None:
    """Why examples' `id`s cannot key the cache (missing or repeated), or None."""
    ids = [e.get("id") for e in examples]
    if any(i is None for i in ids) or len(set(ids)) != len(ids):
        return "training examples lack unique ids to key the cache by"
    return None


class FeatureCache:
    """Per-example prefix outputs, by key (e.g. the exact input the example feeds in),
    stored unpadded and detached in the dtype they were computed in."""

    def __init__(self, stages: int, budget_bytes: int):
        self.stages = stages
        self.budget_bytes = budget_bytes
        self.bytes = 0
        self._features: dict[Hashable, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._features)

    def missing(self, keys: Sequence[Hashable]) -> bool:
        return any(key not in self._features for key in keys)

    def store(self, keys: Sequence[Hashable], features: Sequence[Features]) -> None:
        """Keep the features of keys not cached yet, while the budget allows; past it,
        those examples are simply recomputed each epoch."""
        for key, feature in zip(keys, features):
            if key in self._features:
                continue
            parts = feature if isinstance(feature, tuple) else (feature,)
            size = sum(t.numel() * t.element_size() for t in parts)
            if self.bytes + size > self.budget_bytes:
                continue
            kept = tuple(t.detach().clone() for t in parts)
            self._features[key] = kept if isinstance(feature, tuple) else kept[0]
            self.bytes += size

    def fetch(self, keys: Sequence[Hashable]) -> list[Features]:
        return [self._features[key] for key in keys]

    def prefix(self, keys: Sequence[Hashable], compute: Callable[[], Features],
               split: Callable[[Features], list[Features]], join: Callable[[list[Features]], Features]) -> Features:
        """A batch's prefix outputs: `compute()`d without gradients (nothing in the frozen
        prefix needs one) and kept per example (`split`) while any example is missing,
        else the cached ones `join`ed back into a batch."""
        if self.missing(keys):
            with torch.no_grad():
                outputs = compute()
            self.store(keys, split(outputs))
            return outputs
        return join(self.fetch(keys))


def split_rows(outputs: Features) -> list[Features]:
    """A batch's outputs (tensors with the batch first) -> one entry per example."""
    if isinstance(outputs, tuple):
        return list(zip(*(list(t) for t in outputs)))
    return list(outputs)


def stack_rows(rows: list[Features]) -> Features:
    """`split_rows` undone for examples of one shape."""
    if isinstance(rows[0], tuple):
        return tuple(torch.stack(parts) for parts in zip(*rows))
    return torch.stack(rows)
