"""PEFT modules special to video-text CLIP models, registered into the core registry.

- `temporal_adapter`: the alignment adapter in the style of AGAdapter (Fang et al. 2023).
  Frame embeddings go through a bottleneck (down-projection), a small pre-norm
  transformer over time with learned frame-position embeddings, and an up-projection
  that starts at zero, added back to the frames before pooling:
  f' = f + up(T(down(f) + pos)). At init the video embedding is CLIP's mean-pooled one
  exactly, and training learns temporal structure (order, motion) that mean pooling
  cannot see. "Knowledge sharing", our reading of AGAdapter's design: the same down/up
  projections also adapt the text embedding (t' = t + up(gelu(down(t)))), so both
  modalities move through one shared low-dimensional space (`share_text: false` turns
  the text branch off). Only the image tower's *output* is adapted, so its features are
  cached.
- `clip_prompt`: visual prompt tokens (VPT, Jia et al. 2022) for an open_clip ViT:
  learned tokens after the class token, inserted after `ln_pre` and taken out again
  after the transformer, so pooling sees the usual layout; `deep` gives every block its
  own. Prompts change what attention sees: not identity at init.

Low-rank (`lora`, and `lokr` as KAdaptation's Kronecker-product update, He et al. 2023),
bottleneck `adapter`s and `full` are the core's methods; `tasks.py` gives their targets
in CLIP's module names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from peftlab.shared.methods import Applied, register_method
from peftlab.shared.methods.prompt_tokens import PromptTokenOptions, PromptTokens
from torch import nn
from torch.nn import functional as F

from .backbones import VideoCLIP

# ----------------------------------------------------------------------------- temporal adapter


class TemporalAdapter(nn.Module):
    def __init__(self, dim: int, width: int, layers: int, heads: int, frames: int, share_text: bool):
        super().__init__()
        self.down = nn.Linear(dim, width)
        self.position = nn.Parameter(torch.randn(frames, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.temporal = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.up = nn.Linear(width, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.share_text = share_text

    def frames(self, frames: torch.Tensor) -> torch.Tensor:
        hidden = self.down(frames) + self.position[: frames.shape[1]].to(frames.dtype)
        return frames + self.up(self.temporal(hidden))

    def text(self, text: torch.Tensor) -> torch.Tensor:
        return text + self.up(F.gelu(self.down(text)))


@dataclass
class TemporalAdapterOptions:
    width: int = field(default=64, metadata={"help": "bottleneck width of the adapter (shared by the video and text branches)"})
    layers: int = field(default=1, metadata={"help": "transformer layers over the frames"})
    heads: int = field(default=4, metadata={"help": "attention heads (must divide width)"})
    share_text: bool = field(default=True, metadata={"help": "also adapt the text embedding through the shared projections"})

    def __post_init__(self):
        if self.width < 1 or self.layers < 1 or self.heads < 1:
            raise ValueError(f"width, layers and heads must be >= 1, got {self.width}, {self.layers}, {self.heads}")
        if self.width % self.heads:
            raise ValueError(f"heads ({self.heads}) must divide width ({self.width})")


def apply_temporal_adapter(model: VideoCLIP, options: TemporalAdapterOptions) -> Applied:
    adapter = TemporalAdapter(model.embed_dim, options.width, options.layers, options.heads, model.num_frames,
                              options.share_text)
    model.temporal_adapter = adapter.to(next(model.parameters()).device)
    handles = [model.frame_pool.register_forward_pre_hook(lambda module, args: (adapter.frames(args[0]), *args[1:]))]
    if options.share_text:
        handles.append(model.text_out.register_forward_hook(lambda module, args, output: adapter.text(output)))
    names = [f"temporal_adapter.{n}" for n, _ in adapter.named_parameters()]
    return Applied(model, names, state=handles)


register_method(
    "temporal_adapter",
    TemporalAdapterOptions,
    apply_temporal_adapter,
    description="temporal alignment adapter (AGAdapter-style): zero-init residual transformer over frame embeddings "
                "before pooling, projections shared with a text branch",
    mergeable=False,
    identity_at_init=True,
    applies_to=lambda model: isinstance(model, VideoCLIP),
)


# ----------------------------------------------------------------------------- visual prompts


def _prompted_vit(model: nn.Module) -> bool:
    if not isinstance(model, VideoCLIP):
        return False
    visual = model.clip.visual
    return all(hasattr(visual, a) for a in ("ln_pre", "transformer", "class_embedding")) \
        and getattr(visual, "attn_pool", None) is None


def apply_clip_prompt(model: VideoCLIP, options: PromptTokenOptions) -> Applied:
    visual = model.clip.visual
    blocks = visual.transformer.resblocks
    patch = visual.conv1.kernel_size
    prompts = PromptTokens(options.num_tokens, visual.class_embedding.shape[0], len(blocks), options.deep,
                            options.dropout, int(patch[0] * patch[1])).to(visual.class_embedding.device)
    visual.prompts = prompts
    n = options.num_tokens

    def insert(module, args, output):  # after ln_pre: [CLS, patches] -> [CLS, prompts, patches]
        return torch.cat([output[:, :1], prompts.tokens(0, output.shape[0], output.dtype), output[:, 1:]], dim=1)

    def replace(layer):
        def hook(module, args, kwargs):
            x = args[0]
            x = torch.cat([x[:, :1], prompts.tokens(layer, x.shape[0], x.dtype), x[:, 1 + n:]], dim=1)
            return (x, *args[1:]), kwargs

        return hook

    def remove(module, args, output):  # after the transformer: drop the prompts again
        return torch.cat([output[:, :1], output[:, 1 + n:]], dim=1)

    if not visual.transformer.batch_first:
        from peftlab.shared.errors import UserError

        raise UserError("clip_prompt: this CLIP's vision transformer is sequence-first; use a batch-first open_clip model")
    handles = [visual.ln_pre.register_forward_hook(insert), visual.transformer.register_forward_hook(remove)]
    if options.deep:
        handles += [blocks[i].register_forward_pre_hook(replace(i), with_kwargs=True) for i in range(1, len(blocks))]
    return Applied(model, ["clip.visual.prompts.prompts"], state=handles)


register_method(
    "clip_prompt",
    PromptTokenOptions,
    apply_clip_prompt,
    description="visual prompt tokens in CLIP's image tower (VPT, Jia et al. 2022): learned tokens after the class "
                "token, shallow or deep",
    mergeable=False,
    identity_at_init=False,
    applies_to=_prompted_vit,
)
