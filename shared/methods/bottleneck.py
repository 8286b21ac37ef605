"""Bottleneck adapters: sequential (Houlsby et al. 2019) and parallel (He et al. 2022).

Sequential: y = f(x) + up(act(down(f(x)))), inserted after the chosen modules (Houlsby
places them after the attention output projection and after the feed-forward block).
Parallel (scaled): y = f(x) + s · up(act(down(x))), a side branch from the module's input,
or, with `input_from`, from a sibling module's input: He et al.'s parallel adapter at the
feed-forward block targets its last Linear (fc2) and reads the first one's (fc1) input,
so the branch spans the whole block, from its input to its output.
The up-projection is zero-initialised, so the adapted model starts equal to the base.
(adapter-bert instead draws both projections from a truncated normal of std 1e-3, uses
GELU, `activation=gelu`, and also trains the layer norms.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from peftlab.shared.errors import UserError
from peftlab.shared.methods.registry import Applied, register_method
from peftlab.shared.methods.targeting import find_blocks, select_modules
from torch import nn

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class Bottleneck(nn.Module):
    def __init__(self, in_features: int, out_features: int, size: int, activation: str, scale: float):
        super().__init__()
        self.down = nn.Linear(in_features, size)
        self.act = _ACTIVATIONS[activation]()
        self.up = nn.Linear(size, out_features)
        self.scale = scale
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x))) * self.scale


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _replace_first(output, value):
    return (value, *output[1:]) if isinstance(output, tuple) else value


def _sequential_hook(module, args, output):
    hidden = _first(output)
    return _replace_first(output, hidden + module.adapter(hidden))


def _parallel_hook(module, args, output):
    return _replace_first(output, _first(output) + module.adapter(args[0]))


def _keep_input(module, args):
    # The adapters are found through the module, not a closure, so that a deep copy of
    # the model feeds its own copies.
    for adapter in module.spanned_adapters:
        adapter.kept_input = args[0]


def _spanning_hook(module, args, output):
    kept = module.adapter.__dict__.pop("kept_input", None)
    if kept is None:
        raise UserError("parallel_adapter: the input_from module did not run before the module the adapter "
                        "follows; choose one that runs first in the same block (e.g. fc1 for fc2)")
    return _replace_first(output, _first(output) + module.adapter(kept))


@dataclass
class AdapterOptions:
    size: int = field(default=64, metadata={"help": "bottleneck width"})
    activation: str = field(default="relu", metadata={"help": "relu, gelu, silu or tanh"})
    scale: float = field(default=1.0, metadata={"help": "multiplier on the adapter branch (parallel adapters use 4.0 in He et al.)"})
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "modules the adapter follows (default: the task's choice, else the last Linear of each block)"},
    )
    input_from: str | None = field(
        default=None,
        metadata={"help": "parallel_adapter: the sibling module (same parent as each target) whose input feeds the "
                          "branch, e.g. fc1 with target fc2 for a branch across the feed-forward block; default: the "
                          "target's own input"},
    )
    layers: str | list[int] | int | None = field(default=None, metadata={"help": "blocks to adapt: 'all', 'last_N', or indices"})
    blocks: str | None = field(default=None, metadata={"help": "path of the block list"})

    def __post_init__(self):
        if self.size < 1:
            raise ValueError(f"size must be >= 1, got {self.size}")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(_ACTIVATIONS)}, got {self.activation!r}")


def _default_targets(model: nn.Module, blocks: str | None) -> list[str]:
    path, block_list = find_blocks(model, blocks)
    names = []
    for index, block in enumerate(block_list):
        linears = [n for n, m in block.named_modules() if isinstance(m, nn.Linear)]
        if linears:
            names.append(f"{path}.{index}.{linears[-1]}")
    return names


def _features(module: nn.Module, name: str) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, nn.LayerNorm):
        width = module.normalized_shape[-1]
        return width, width
    raise UserError(f"adapter: {name} is a {type(module).__name__}; target Linear or LayerNorm modules")


def _apply(model: nn.Module, options: AdapterOptions, parallel: bool) -> Applied:
    method = "parallel_adapter" if parallel else "adapter"
    targets = options.target_modules
    if targets is None:
        targets = _default_targets(model, options.blocks)
    if options.input_from is not None and not parallel:
        raise UserError("adapter: input_from applies to parallel_adapter only (a sequential adapter reads its module's output)")
    chosen = select_modules(model, targets, layers=options.layers, blocks_path=options.blocks, method=method)
    modules = dict(model.named_modules())
    names, handles = [], []
    for name, module in chosen:
        in_features, out_features = _features(module, name)
        source = None
        if options.input_from is not None:
            parent = name.rpartition(".")[0]
            source_name = f"{parent}.{options.input_from}" if parent else options.input_from
            source = modules.get(source_name)
            if source is None:
                raise UserError(f"parallel_adapter: input_from={options.input_from!r}: {name} has no sibling "
                                f"{source_name}; name a module beside it (e.g. fc1 beside fc2)")
            in_features = _features(source, source_name)[0]
        module.adapter = Bottleneck(in_features if parallel else out_features, out_features,
                                    options.size, options.activation, options.scale)
        if source is not None:
            if "spanned_adapters" not in source.__dict__:
                source.spanned_adapters = []
                handles.append(source.register_forward_pre_hook(_keep_input))
            source.spanned_adapters.append(module.adapter)
            handles.append(module.register_forward_hook(_spanning_hook))
        else:
            handles.append(module.register_forward_hook(_parallel_hook if parallel else _sequential_hook))
        names += [f"{name}.adapter.{p}" for p, _ in module.adapter.named_parameters()]
    return Applied(model, names, state=handles)


register_method(
    "adapter",
    AdapterOptions,
    lambda model, options: _apply(model, options, parallel=False),
    description="bottleneck adapter (Houlsby): down-project, non-linearity, zero-init up-project, residual",
    mergeable=False,
    identity_at_init=True,
)

register_method(
    "parallel_adapter",
    AdapterOptions,
    lambda model, options: _apply(model, options, parallel=True),
    description="parallel adapter (Pfeiffer / He et al.): scaled bottleneck branch beside the module",
    mergeable=False,
    identity_at_init=True,
)
