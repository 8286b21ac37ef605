"""PEFT modules special to vision backbones: task-specific adapters and visual prompts.

- `tsa` (task-specific adapters; Li, Liu & Bilen 2022, "Cross-domain few-shot learning
  with task-specific adapters"; one of the CNN methods Dutt et al. compare): a 1x1
  convolution in parallel with each 3x3 convolution of a ResNet's residual blocks,
  y = conv3x3(x) + alpha(x). alpha is zero-initialised (the URL code starts it at
  1e-4 I), so the adapted network starts as the base one, and it folds exactly into the
  centre tap of the 3x3 kernel, so it merges.
- `vpt` (visual prompt tuning; Jia et al. 2022): learned tokens placed after a ViT's
  CLS (prefix) tokens, after the position embedding, and taken out again before the
  final norm, so pooling (CLS token or patch average) sees the usual layout. "deep"
  gives every block its own prompts. Prompts change what attention sees, so the output
  differs from the base model at init (identity_at_init=False).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from peftlab.shared.errors import UserError
from peftlab.shared.methods import Applied, register_method
from peftlab.shared.methods.prompt_tokens import PromptTokenOptions, PromptTokens
from peftlab.shared.methods.targeting import select_modules
from torch import nn

from .backbones import is_vit

# ------------------------------------------------------------------------------------ TSA


def _residual_block_types() -> tuple[type, ...]:
    from timm.models.resnet import BasicBlock, Bottleneck

    types: list[type] = [BasicBlock, Bottleneck]
    try:  # a torchvision ResNet brought through the Python API fits too
        from torchvision.models.resnet import BasicBlock as TVBasic
        from torchvision.models.resnet import Bottleneck as TVBottleneck

        types += [TVBasic, TVBottleneck]
    except ImportError:
        pass
    return tuple(types)


def has_residual_blocks(model: nn.Module) -> bool:
    types = _residual_block_types()
    return any(isinstance(m, types) for m in model.modules())


def _foldable(conv: nn.Module) -> bool:
    """A 3x3 conv whose centre tap a parallel 1x1 conv (same stride) can be folded into."""
    return (isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) and conv.groups == 1
            and conv.dilation == (1, 1) and conv.padding == (1, 1) and conv.padding_mode == "zeros")


@dataclass
class TSAOptions:
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "3x3 convs to adapt (suffixes or regex); default: every 3x3 conv inside the residual blocks"})


def _tsa_hook(module, args, output):
    return output + module.tsa(args[0])


def apply_tsa(model: nn.Module, options: TSAOptions) -> Applied:
    if options.target_modules is None:
        block_types = _residual_block_types()
        chosen = [(f"{block_name}.{conv_name}", conv)
                  for block_name, block in model.named_modules() if isinstance(block, block_types)
                  for conv_name, conv in block.named_modules() if _foldable(conv)]
    else:
        chosen = select_modules(model, options.target_modules, types=(nn.Conv2d,), method="tsa")
    if not chosen:
        raise UserError("tsa: no 3x3 convolution inside residual blocks to adapt; pass target_modules naming 3x3 convs")
    names, handles = [], []
    for name, conv in chosen:
        if not _foldable(conv):
            raise UserError(f"tsa: {name} is not a plain 3x3 conv (kernel {conv.kernel_size}, groups {conv.groups}, "
                            f"padding {conv.padding}); target ungrouped 3x3 convs with padding 1")
        alpha = nn.Conv2d(conv.in_channels, conv.out_channels, kernel_size=1, stride=conv.stride, bias=False)
        nn.init.zeros_(alpha.weight)
        conv.tsa = alpha.to(device=conv.weight.device, dtype=conv.weight.dtype)
        handles.append(conv.register_forward_hook(_tsa_hook))
        names.append(f"{name}.tsa.weight")
    return Applied(model, names, state=handles)


def merge_tsa(model: nn.Module, options: TSAOptions, handles) -> nn.Module:
    for handle in handles:
        handle.remove()
    for module in model.modules():
        alpha = getattr(module, "tsa", None)
        if isinstance(alpha, nn.Conv2d):
            del module.tsa
            with torch.no_grad():
                module.weight[:, :, 1, 1] += alpha.weight[:, :, 0, 0].to(module.weight.dtype)
    return model


register_method(
    "tsa",
    TSAOptions,
    apply_tsa,
    description="task-specific adapters (Li et al. 2022): zero-init 1x1 conv beside each 3x3 conv of a ResNet",
    mergeable=True,
    identity_at_init=True,
    merge=merge_tsa,
    applies_to=has_residual_blocks,
)


# ------------------------------------------------------------------------------------ VPT


def _vpt_insert(prompts: PromptTokens):
    def hook(module, args, output):
        p = prompts.prefix
        return torch.cat([output[:, :p], prompts.tokens(0, output.shape[0]).to(output.dtype), output[:, p:]], dim=1)

    return hook


def _vpt_replace(prompts: PromptTokens, layer: int):
    def hook(module, args):
        x = args[0]
        p, n = prompts.prefix, prompts.num_tokens
        x = torch.cat([x[:, :p], prompts.tokens(layer, x.shape[0]).to(x.dtype), x[:, p + n:]], dim=1)
        return (x, *args[1:])

    return hook


def _vpt_remove(prompts: PromptTokens):
    def hook(module, args):
        x = args[0]
        p, n = prompts.prefix, prompts.num_tokens
        return (torch.cat([x[:, :p], x[:, p + n:]], dim=1), *args[1:])

    return hook


def apply_vpt(model: nn.Module, options: PromptTokenOptions) -> Applied:
    width = model.embed_dim if hasattr(model, "embed_dim") else model.num_features
    patch = getattr(model.patch_embed, "patch_size", (16, 16))
    prompts = PromptTokens(options.num_tokens, width, len(model.blocks), options.deep, options.dropout,
                            int(patch[0] * patch[1]))
    prompts.prefix = int(model.num_prefix_tokens)
    prompts.to(next(model.parameters()).device)
    model.vpt = prompts
    # After the position embedding (norm_pre is the last step before the blocks),
    # and out again before the final norm, so pooling sees CLS + patch tokens only.
    handles = [model.norm_pre.register_forward_hook(_vpt_insert(prompts)),
               model.norm.register_forward_pre_hook(_vpt_remove(prompts))]
    if options.deep:
        handles += [model.blocks[i].register_forward_pre_hook(_vpt_replace(prompts, i)) for i in range(1, len(model.blocks))]
    return Applied(model, ["vpt.prompts"], state=handles)


register_method(
    "vpt",
    PromptTokenOptions,
    apply_vpt,
    description="visual prompt tuning (Jia et al. 2022): learned tokens after a ViT's CLS token (shallow or deep)",
    mergeable=False,
    identity_at_init=False,
    applies_to=is_vit,
)
