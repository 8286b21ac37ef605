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
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
from torch import nn


def frozen_prefix_stages(stages: Sequence[nn.Module]) -> int:
    """How many leading stages are a fixed function of their input: no trainable
    parameter, no forward hook (hook-based methods such as ReFT edit outputs there),
    and no active dropout. Stops at the first stage that fails."""
    count = 0
    for stage in stages:
        for module in stage.modules():
            if any(p.requires_grad for p in module.parameters(recurse=False)):
                return count
            if module._forward_hooks or module._forward_pre_hooks:
                return count
            if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
                return count
            if isinstance(getattr(module, "dropout", None), float) and module.dropout > 0:
                return count  # attention modules that keep their rate as a float
        count += 1
    return count


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

    def store(self, keys: Sequence[Hashable], features: Sequence[torch.Tensor]) -> None:
        """Keep the features of keys not cached yet, while the budget allows; past it,
        those examples are simply recomputed each epoch."""
        for key, feature in zip(keys, features):
            if key in self._features:
                continue
            size = feature.numel() * feature.element_size()
            if self.bytes + size > self.budget_bytes:
                continue
            self._features[key] = feature.detach().clone()
            self.bytes += size

    def fetch(self, keys: Sequence[Hashable]) -> list[torch.Tensor]:
        return [self._features[key] for key in keys]
