"""Which modules a method touches.

`target_modules` follows peft: a list matches module-name suffixes (`"k_proj"` matches
`layers.3.self_attn.k_proj`), a string is a regex that must match the whole name.
`layers` restricts to transformer blocks: `"last_8"`, `"first_2"`, `"all"` or a list of
block indices. Blocks are the children of the model's longest `nn.ModuleList`
(e.g. `layers` in fair-esm, `encoder.layer` in transformers' BERT-likes).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from peftlab.shared.errors import UserError
from torch import nn


def find_blocks(model: nn.Module, path: str | None = None) -> tuple[str, nn.ModuleList]:
    """The repeated-block container: named by `path`, else the longest ModuleList."""
    if path is not None:
        try:
            blocks = model.get_submodule(path)
        except AttributeError:
            raise UserError(f"the model has no module {path!r} to use as its blocks") from None
        if not isinstance(blocks, nn.ModuleList | nn.Sequential):
            raise UserError(f"module {path!r} is a {type(blocks).__name__}, not a list of blocks")
        return path, blocks
    best_name, best = None, None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > (len(best) if best is not None else 0):
            best_name, best = name, module
    if best is None:
        raise UserError(f"the model has no nn.ModuleList of blocks; name its list of blocks with method.blocks=PATH, "
                        f"or the modules with method.target_modules=[...] (module names look like: "
                        f"{', '.join(_example_names(model))})")
    return best_name, best


def resolve_layers(layers, num_blocks: int) -> list[int] | None:
    """`last_8` / `first_2` / `all` / [0, 5] / 3 -> sorted block indices (None = all)."""
    if layers is None or layers == "all":
        return None
    if isinstance(layers, int):
        layers = [layers]
    if isinstance(layers, str):
        match = re.fullmatch(r"(last|first)_(\d+)", layers)
        if not match:
            raise UserError(f"method.layers={layers!r} is not understood; use 'all', 'last_N', 'first_N' or a list of indices")
        count = min(int(match.group(2)), num_blocks)
        return list(range(num_blocks - count, num_blocks)) if match.group(1) == "last" else list(range(count))
    indices = sorted(set(int(i) for i in layers))
    bad = [i for i in indices if not 0 <= i < num_blocks]
    if bad:
        raise UserError(f"method.layers: {bad} out of range: the model has {num_blocks} blocks (0..{num_blocks - 1})")
    return indices


def name_matches(name: str, targets: str | Iterable[str]) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def select_modules(
    model: nn.Module,
    targets: str | Iterable[str] | None,
    *,
    types: tuple[type, ...] | None = None,
    layers=None,
    blocks_path: str | None = None,
    method: str = "method",
) -> list[tuple[str, nn.Module]]:
    """Modules whose names match `targets` (and `types`), inside the chosen blocks.

    The output projection of torch's `nn.MultiheadAttention` is never chosen: attention
    reads its weight without calling it, so a hook or a replaced module there would never
    run (and a merge would fold an untrained change into the weight). It is left out of
    type-based defaults and refused when `targets` names it."""
    bypassed = {f"{name}.out_proj" for name, module in model.named_modules() if isinstance(module, nn.MultiheadAttention)}
    block_prefixes = None
    if layers not in (None, "all"):
        path, blocks = find_blocks(model, blocks_path)
        indices = resolve_layers(layers, len(blocks))
        block_prefixes = tuple(f"{path}.{i}." if path else f"{i}." for i in indices)
    chosen = []
    for name, module in model.named_modules():
        if not name:
            continue
        if targets is not None and not name_matches(name, targets):
            continue
        if types is not None and not isinstance(module, types):
            continue
        if block_prefixes is not None and not name.startswith(block_prefixes):
            continue
        if name in bypassed:
            if targets is None:
                continue
            raise UserError(f"{method}: {name} is the output projection of torch's nn.MultiheadAttention, which uses its "
                            f"weight without calling it, so {method} there would never act; leave it out of target_modules")
        chosen.append((name, module))
    if not chosen:
        raise UserError(
            f"{method}: no module matches target_modules={targets!r}"
            + (f" in layers={layers!r}" if block_prefixes is not None else "")
            + f"; module names look like: {', '.join(_example_names(model))}"
        )
    return chosen


def _example_names(model: nn.Module, limit: int = 8) -> list[str]:
    leaves = [n for n, m in model.named_modules() if n and not list(m.children())]
    return leaves[:limit]
