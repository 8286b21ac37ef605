"""SSF (Lian et al. 2022): a learned per-channel scale and shift after chosen modules.

y = γ ⊙ f(x) + β with γ = 1, β = 0 at init, so the model starts as the base model (the
SSF code draws γ ~ N(1, σ), β ~ N(0, σ) with σ = 0.02: `init_std=0.02`).
After a Linear, LayerNorm, conv or BatchNorm the affine folds into that module's own
weight and bias, which is what `merge()` does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from peftlab.shared.errors import UserError
from peftlab.shared.methods.registry import Applied, register_method
from peftlab.shared.methods.targeting import select_modules
from torch import nn

# Modules whose outputs are (batch, channels, ...): convolutions (transposed ones too) and
# batch / group norms. By default SSF follows linear, norm and (plain) conv modules; a
# transposed convolution is adapted where target_modules names it.
_CHANNEL_FIRST = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.GroupNorm)
_DEFAULT_TYPES = (nn.Linear, nn.LayerNorm, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.modules.batchnorm._BatchNorm, nn.GroupNorm)


class ScaleShift(nn.Module):
    def __init__(self, channels: int, channel_dim: int, init_std: float = 0.0):
        super().__init__()
        self.channel_dim = channel_dim
        self.scale = nn.Parameter(torch.ones(channels))
        self.shift = nn.Parameter(torch.zeros(channels))
        if init_std:  # drawn only when asked: the default leaves the random stream as it was
            with torch.no_grad():
                self.scale.add_(init_std * torch.randn(channels))
                self.shift.add_(init_std * torch.randn(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channel_dim == -1 or x.dim() == 2:
            return x * self.scale + self.shift
        shape = [1] * x.dim()
        shape[1] = -1
        return x * self.scale.view(shape) + self.shift.view(shape)


def _output_channels(module: nn.Module) -> int | None:
    for attr in ("out_features", "out_channels", "num_features", "num_channels"):
        if hasattr(module, attr):
            return getattr(module, attr)
    if isinstance(module, nn.LayerNorm):
        return module.normalized_shape[-1]
    return None


def _hook(module, args, output):
    return module.ssf(output)


@dataclass
class SSFOptions:
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "modules followed by a scale+shift (default: every Linear, norm and conv)"},
    )
    layers: str | list[int] | int | None = field(default=None, metadata={"help": "blocks to adapt: 'all', 'last_N', or indices"})
    blocks: str | None = field(default=None, metadata={"help": "path of the block list"})
    init_std: float = field(default=0.0, metadata={"help": "random init around scale 1 and shift 0 (the SSF code: "
                                                           "0.02); 0 starts exactly as the base model"})

    def __post_init__(self):
        if self.init_std < 0:
            raise ValueError(f"init_std must be >= 0, got {self.init_std}")


def apply_ssf(model: nn.Module, options: SSFOptions) -> Applied:
    types = _DEFAULT_TYPES if options.target_modules is None else None
    chosen = select_modules(model, options.target_modules, types=types, layers=options.layers,
                            blocks_path=options.blocks, method="ssf")
    names, handles = [], []
    for name, module in chosen:
        channels = _output_channels(module)
        if channels is None:
            raise UserError(f"ssf: cannot tell the output channels of {name} ({type(module).__name__}); target Linear, norm or conv modules")
        channel_dim = 1 if isinstance(module, _CHANNEL_FIRST) else -1
        module.ssf = ScaleShift(channels, channel_dim, options.init_std)
        handles.append(module.register_forward_hook(_hook))
        names += [f"{name}.ssf.scale", f"{name}.ssf.shift"]
    return Applied(model, names, state=handles)


def _shared_parameters(model: nn.Module) -> dict[int, list[str]]:
    """Every parameter reachable under more than one name (tied weights), by id."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return {key: found for key, found in names.items() if len(found) > 1}


def _scale_output_channels(module: nn.Module, weight: torch.Tensor, scale: torch.Tensor) -> None:
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        # weight (in, out / groups, *kernel): output channel g * (out / groups) + j is
        # column j of group g's rows
        groups = module.groups
        grouped = weight.view(groups, weight.shape[0] // groups, *weight.shape[1:])
        grouped.mul_(scale.view(groups, 1, -1, *[1] * (weight.dim() - 2)))
    else:
        weight.mul_(scale.view(-1, *[1] * (weight.dim() - 1)))


def merge_ssf(model: nn.Module, options: SSFOptions, handles) -> nn.Module:
    shared = _shared_parameters(model)
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(getattr(module, "ssf", None), ScaleShift) and weight is not None and id(weight) in shared:
            others = [n for n in shared[id(weight)] if n != f"{name}.weight"]
            raise UserError(f"ssf: {name}.weight is the same tensor as {', '.join(others)} (tied weights): folding "
                            f"{name}'s scale into it would change the others too; leave {name} out of target_modules "
                            f"to merge, or use the adapter unmerged")
    for handle in handles:
        handle.remove()
    for name, module in list(model.named_modules()):
        if not isinstance(getattr(module, "ssf", None), ScaleShift):
            continue
        ssf = module.ssf
        del module.ssf
        weight = getattr(module, "weight", None)
        if weight is None:
            raise UserError(f"ssf: {name} has no affine weight to fold the scale into; it cannot be merged")
        with torch.no_grad():
            scale, shift = ssf.scale.detach(), ssf.shift.detach()
            _scale_output_channels(module, weight, scale.to(weight.dtype))
            if module.bias is None:
                module.bias = nn.Parameter(torch.zeros_like(shift, dtype=weight.dtype), requires_grad=False)
            module.bias.mul_(scale.to(weight.dtype)).add_(shift.to(weight.dtype))
    return model


register_method(
    "ssf",
    SSFOptions,
    apply_ssf,
    description="SSF: per-channel scale and shift after each chosen module (γ=1, β=0 at init)",
    mergeable=True,
    identity_at_init=True,
    merge=merge_ssf,
)
