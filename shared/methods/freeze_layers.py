"""Freeze-layers / partial tuning: train the last k blocks (and what follows them)."""

from __future__ import annotations

from dataclasses import dataclass, field

from peftlab.shared.errors import UserError
from peftlab.shared.methods.registry import Applied, register_method
from peftlab.shared.methods.targeting import find_blocks
from torch import nn


@dataclass
class FreezeLayersOptions:
    trainable_blocks: int = field(default=1, metadata={
        "help": "how many of the last blocks train; 0 with train_after_blocks=false is a linear probe (the task head alone trains)"})
    blocks: str | None = field(default=None, metadata={"help": "path of the block list (default: the longest nn.ModuleList)"})
    train_after_blocks: bool = field(
        default=True,
        metadata={"help": "also train modules registered after the blocks (e.g. the final norm)"},
    )


def apply_freeze_layers(model: nn.Module, options: FreezeLayersOptions) -> Applied:
    path, blocks = find_blocks(model, options.blocks)
    if not 0 <= options.trainable_blocks <= len(blocks):
        raise UserError(f"freeze_layers: trainable_blocks must be in 0..{len(blocks)}, got {options.trainable_blocks}")
    first = len(blocks) - options.trainable_blocks
    trainable_prefixes = [f"{path}.{i}." for i in range(first, len(blocks))]
    if options.train_after_blocks:
        trainable_prefixes += _modules_after(model, path)
    names = [n for n, _ in model.named_parameters() if n.startswith(tuple(trainable_prefixes))]
    return Applied(model, names)


def _modules_after(model: nn.Module, blocks_path: str) -> list[str]:
    """Prefixes of the sibling modules registered after the block list."""
    parent_path, _, leaf = blocks_path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    names = list(dict(parent.named_children()))
    later = names[names.index(leaf) + 1:]
    prefix = f"{parent_path}." if parent_path else ""
    return [f"{prefix}{name}." for name in later]


register_method(
    "freeze_layers",
    FreezeLayersOptions,
    apply_freeze_layers,
    description="freeze-layers: train the last k blocks only",
    mergeable=True,
    identity_at_init=True,
    merge=lambda model, options, state: model,
)
