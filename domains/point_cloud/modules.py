"""Point-PEFT's modules (Tang et al. 2023), registered as PEFT methods for Point-BERT.

- `point_prior_prompt`: learnable prompt tokens inserted after CLS, before the
  transformer blocks (and removed from the output); with `prompt_blocks=N`, each of
  the first N blocks gets fresh prompts instead (VPT-deep style, as the released code
  does for N = 6) and the later blocks see none. Optionally each sample's prompts
  are enhanced from a memory bank of training features ("point-prior bank"): the
  first `memory_size` training samples' global features (max-pooled patch tokens) are
  cached; for a new sample, the `memory_topk` entries nearest to its own feature
  (cosine) are retrieved, and the prompts attend to them with parameter-free
  attention, prompt <- prompt + memory_weight * softmax(P Mᵀ / (√C · τ)) M.
  The paper builds the bank from the frozen pre-trained encoder's outputs over the
  whole training set, in a pass of its own; here it holds the frozen patch embedding's
  tokens (before the blocks), cached during the first epoch, with no extra pass.
- `geometry_adapter`: in every chosen block, between attention and MLP, the patch
  tokens are regrouped by FPS + kNN over their patch centres; a small single-head
  attention runs inside each local group (on down-projected features plus a relative
  position code), groups are max+mean pooled, the group features are propagated back
  to every token (inverse-distance weighting of its 3 nearest group anchors), and an
  up-projection is added through a zero-initialised per-channel gate, so the adapted
  model starts exactly as the base model.
- `point_peft`: both. This is our reading of the paper's design, simpler than its code
  (Ivan-Tang-3D/Point-PEFT), which inserts fresh prompts in each of the first six blocks
  (`prompt_blocks=6` here), builds the bank from the frozen pre-trained encoder's outputs over the whole training
  set, uses a geometry adapter that is not identity at init (local attention,
  propagation over all anchors, an ungated residual adapter), and also trains biases,
  norms and the CLS token: 0.6 M parameters reported for Point-BERT, 0.18 M here at
  adapter_dim 16 (0.8 %).

The prompt is not identity at init (extra tokens change attention), like every prompt
method; the adapter is. Neither merges into the base weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from peftlab.shared.errors import UserError
from peftlab.shared.methods import Applied, register_method
from peftlab.shared.methods.targeting import resolve_layers
from torch import nn
from torch.nn import functional as F

from .backbones import PointBERT, farthest_point_sample, gather, knn


class PointPriorPrompt(nn.Module):
    """Prompt tokens after CLS: one set before the blocks, carried through all of them
    (`blocks=0`), or fresh ones for each of the first `blocks` blocks (`deep`)."""

    def __init__(self, width: int, num_tokens: int, memory_size: int = 0, memory_topk: int = 8,
                 memory_weight: float = 0.5, temperature: float = 1.0, blocks: int = 0):
        super().__init__()
        self.tokens = nn.Parameter(torch.empty((blocks, num_tokens, width) if blocks else (num_tokens, width)))
        nn.init.trunc_normal_(self.tokens, std=0.02)
        self.memory_size, self.memory_topk = memory_size, memory_topk
        self.memory_weight, self.temperature = memory_weight, temperature
        if memory_size:
            self.register_buffer("memory", torch.zeros(memory_size, width))
            self.register_buffer("memory_count", torch.zeros((), dtype=torch.long))

    @property
    def deep(self) -> bool:
        return self.tokens.dim() == 3

    @property
    def blocks(self) -> int:
        """The blocks that get fresh prompts (0: one set carried through every block)."""
        return self.tokens.shape[0] if self.deep else 0

    @property
    def length(self) -> int:
        return self.tokens.shape[-2]

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """x, pos: (B, 1 + G, C), CLS first -> (B, 1 + P + G, C) with the (first block's)
        prompts after CLS, and the sample's global feature the bank is searched with
        (None without a bank)."""
        feature = x[:, 1:].max(dim=1).values if self.memory_size else None
        prompts = self._prompts(0, x.shape[0], feature)
        if feature is not None and self.training:
            self.remember(feature.detach())
        x = torch.cat([x[:, :1], prompts.to(x.dtype), x[:, 1:]], dim=1)
        pos = torch.cat([pos[:, :1], torch.zeros_like(prompts, dtype=pos.dtype), pos[:, 1:]], dim=1)
        return x, pos, feature

    def refresh(self, block: int, x: torch.Tensor, feature: torch.Tensor | None) -> torch.Tensor:
        """Block `block`'s input with its own prompts in place of what the previous block
        made of the prompt positions (deep prompts, VPT-deep style)."""
        prompts = self._prompts(block, x.shape[0], feature).to(x.dtype)
        return torch.cat([x[:, :1], prompts, x[:, 1 + self.length:]], dim=1)

    def _prompts(self, block: int, batch: int, feature: torch.Tensor | None) -> torch.Tensor:
        prompts = (self.tokens[block] if self.deep else self.tokens).unsqueeze(0).expand(batch, -1, -1)
        if feature is not None:
            prompts = prompts + self.memory_weight * self.recall(prompts, feature)
        return prompts

    def recall(self, prompts: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
        """Parameter-free attention of the prompts over the memory entries nearest `feature`."""
        count = int(self.memory_count)
        if count == 0:
            return torch.zeros_like(prompts)
        memory = self.memory[:count]
        similarity = F.normalize(feature, dim=-1) @ F.normalize(memory, dim=-1).T   # (B, M)
        nearest = memory[similarity.topk(min(self.memory_topk, count), dim=-1).indices]  # (B, k, C)
        logits = prompts @ nearest.transpose(1, 2) / (math.sqrt(prompts.shape[-1]) * self.temperature)
        return logits.softmax(dim=-1) @ nearest

    @torch.no_grad()
    def remember(self, features: torch.Tensor) -> None:
        """Cache training features until the bank is full; it stays fixed afterwards."""
        count = int(self.memory_count)
        take = min(self.memory_size - count, len(features))
        if take > 0:
            self.memory[count:count + take] = features[:take].to(self.memory.dtype)
            self.memory_count += take


class GeometryAdapter(nn.Module):
    def __init__(self, width: int, dim: int, local_groups: int, local_size: int):
        super().__init__()
        self.local_groups, self.local_size = local_groups, local_size
        self.norm = nn.LayerNorm(width)
        self.down = nn.Linear(width, dim)
        self.position = nn.Linear(3, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.up = nn.Linear(dim, width)
        self.gate = nn.Parameter(torch.zeros(width))  # zero: starts as the base model

    def forward(self, x: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
        """x: (B, prefix + G, C) with the G patch tokens last; centers: (B, G, 3)."""
        num_patches = centers.shape[1]
        prefix, tokens = x[:, :-num_patches], x[:, -num_patches:]
        groups, size = min(self.local_groups, num_patches), min(self.local_size, num_patches)
        anchors = gather(centers, farthest_point_sample(centers, groups))   # (B, L, 3)
        members = knn(anchors, centers, size)                                # (B, L, k)
        hidden = F.gelu(self.down(self.norm(tokens)))                        # (B, G, d)
        relative = gather(centers, members) - anchors.unsqueeze(2)          # (B, L, k, 3)
        local = gather(hidden, members) + self.position(relative)           # (B, L, k, d)
        q, k, v = self.qkv(local).chunk(3, dim=-1)
        local = F.scaled_dot_product_attention(q, k, v)                     # attention inside each group
        pooled = local.max(dim=2).values + local.mean(dim=2)                 # (B, L, d)
        # Back to every token: inverse-distance weights over its nearest anchors.
        nearest = knn(centers, anchors, min(3, groups))                      # (B, G, 3)
        distance = (gather(anchors, nearest) - centers.unsqueeze(2)).norm(dim=-1)
        weights = 1.0 / (distance + 1e-8)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        propagated = (gather(pooled, nearest) * weights.unsqueeze(-1)).sum(dim=2)
        tokens = tokens + self.gate * self.up(F.gelu(propagated + hidden))
        return torch.cat([prefix, tokens], dim=1)


# ----------------------------------------------------------------------------- options


def _prompt_fields():
    return {
        "prompt_tokens": field(default=10, metadata={"help": "number of learnable prompt tokens inserted after CLS"}),
        "memory_size": field(default=0, metadata={"help": "point-prior bank: training features cached (0 = no bank); "
                                                          "saved with the adapter"}),
        "memory_topk": field(default=8, metadata={"help": "bank entries nearest to a sample that its prompts attend to"}),
        "memory_weight": field(default=0.5, metadata={"help": "weight of the bank's contribution added to the prompts"}),
        "memory_temperature": field(default=1.0, metadata={"help": "softmax temperature of the prompt-to-bank attention"}),
        "prompt_blocks": field(default=0, metadata={
            "help": "0: one set of prompts before the first block, carried through all of them; N: each of the first "
                    "N blocks gets its own prompts, and the blocks after them see none (the released code: 6)"}),
    }


def _adapter_fields():
    return {
        "adapter_dim": field(default=16, metadata={"help": "bottleneck width of the geometry-aware adapter (paper: 16)"}),
        "local_groups": field(default=16, metadata={"help": "local groups of tokens per block (FPS over patch centres)"}),
        "local_size": field(default=8, metadata={"help": "tokens per local group (kNN over patch centres)"}),
        "layers": field(default=None, metadata={"help": "blocks that get an adapter: 'all', 'last_N', 'first_N' or indices"}),
    }


@dataclass
class PointPriorPromptOptions:
    prompt_tokens: int = _prompt_fields()["prompt_tokens"]
    memory_size: int = _prompt_fields()["memory_size"]
    memory_topk: int = _prompt_fields()["memory_topk"]
    memory_weight: float = _prompt_fields()["memory_weight"]
    memory_temperature: float = _prompt_fields()["memory_temperature"]
    prompt_blocks: int = _prompt_fields()["prompt_blocks"]

    def __post_init__(self):
        _check_prompt(self)


@dataclass
class GeometryAdapterOptions:
    adapter_dim: int = _adapter_fields()["adapter_dim"]
    local_groups: int = _adapter_fields()["local_groups"]
    local_size: int = _adapter_fields()["local_size"]
    layers: str | list[int] | int | None = _adapter_fields()["layers"]

    def __post_init__(self):
        _check_adapter(self)


@dataclass
class PointPEFTOptions:
    prompt_tokens: int = _prompt_fields()["prompt_tokens"]
    memory_size: int = _prompt_fields()["memory_size"]
    memory_topk: int = _prompt_fields()["memory_topk"]
    memory_weight: float = _prompt_fields()["memory_weight"]
    memory_temperature: float = _prompt_fields()["memory_temperature"]
    prompt_blocks: int = _prompt_fields()["prompt_blocks"]
    adapter_dim: int = _adapter_fields()["adapter_dim"]
    local_groups: int = _adapter_fields()["local_groups"]
    local_size: int = _adapter_fields()["local_size"]
    layers: str | list[int] | int | None = _adapter_fields()["layers"]

    def __post_init__(self):
        _check_prompt(self)
        _check_adapter(self)


def _check_prompt(o) -> None:
    if o.prompt_tokens < 1:
        raise ValueError(f"prompt_tokens must be >= 1, got {o.prompt_tokens}")
    if o.memory_size < 0 or o.memory_topk < 1:
        raise ValueError(f"memory_size must be >= 0 and memory_topk >= 1, got {o.memory_size}, {o.memory_topk}")
    if o.memory_temperature <= 0:
        raise ValueError(f"memory_temperature must be > 0, got {o.memory_temperature}")
    if o.prompt_blocks < 0:
        raise ValueError(f"prompt_blocks must be >= 0, got {o.prompt_blocks}")


def _check_adapter(o) -> None:
    for name in ("adapter_dim", "local_groups", "local_size"):
        if getattr(o, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(o, name)}")


# ----------------------------------------------------------------------------- apply


def _check_backbone(model: nn.Module, method: str) -> None:
    if not isinstance(model, PointBERT):
        raise UserError(f"{method} applies to Point-BERT backbones, not {type(model).__name__}")
    if model.prompt is not None or any(b.geometry_adapter is not None for b in model.blocks.blocks):
        raise UserError(f"{method}: this Point-BERT already carries Point-PEFT modules; build a fresh backbone")


def add_prompt(model: PointBERT, o) -> list[str]:
    depth = len(model.blocks.blocks)
    if o.prompt_blocks > depth:
        raise UserError(f"prompt_blocks is {o.prompt_blocks}, but this Point-BERT has {depth} blocks")
    model.prompt = PointPriorPrompt(model.embed_dim, o.prompt_tokens, o.memory_size, o.memory_topk,
                                    o.memory_weight, o.memory_temperature, o.prompt_blocks)
    return [f"prompt.{name}" for name, _ in model.prompt.named_parameters()]


def add_geometry_adapters(model: PointBERT, o) -> list[str]:
    blocks = model.blocks.blocks
    indices = resolve_layers(o.layers, len(blocks)) or range(len(blocks))
    names = []
    for index in indices:
        blocks[index].geometry_adapter = GeometryAdapter(model.embed_dim, o.adapter_dim, o.local_groups, o.local_size)
        names += [f"blocks.blocks.{index}.geometry_adapter.{n}" for n, _ in blocks[index].geometry_adapter.named_parameters()]
    return names


def _bank_buffers(model: PointBERT) -> list[str]:
    """The memory bank fills during training: it is saved and restored with the adapter."""
    return [f"prompt.{name}" for name, _ in model.prompt.named_buffers()]


def apply_point_prior_prompt(model: nn.Module, o: PointPriorPromptOptions) -> Applied:
    _check_backbone(model, "point_prior_prompt")
    return Applied(model, add_prompt(model, o), buffer_names=_bank_buffers(model))


def apply_geometry_adapter(model: nn.Module, o: GeometryAdapterOptions) -> Applied:
    _check_backbone(model, "geometry_adapter")
    return Applied(model, add_geometry_adapters(model, o))


def apply_point_peft(model: nn.Module, o: PointPEFTOptions) -> Applied:
    _check_backbone(model, "point_peft")
    return Applied(model, add_prompt(model, o) + add_geometry_adapters(model, o), buffer_names=_bank_buffers(model))


def _is_point_bert(model: nn.Module) -> bool:
    return isinstance(model, PointBERT)


register_method(
    "point_prior_prompt", PointPriorPromptOptions, apply_point_prior_prompt,
    description="Point-PEFT point-prior prompt: learnable tokens after CLS, optionally enhanced from a bank of training features (Point-BERT only)",
    mergeable=False, identity_at_init=False, applies_to=_is_point_bert,
)
register_method(
    "geometry_adapter", GeometryAdapterOptions, apply_geometry_adapter,
    description="Point-PEFT geometry-aware adapter: local attention over FPS+kNN token groups, pooled, propagated back through a zero-init gate (Point-BERT only)",
    mergeable=False, identity_at_init=True, applies_to=_is_point_bert,
)
register_method(
    "point_peft", PointPEFTOptions, apply_point_peft,
    description="Point-PEFT (Tang et al. 2023): point-prior prompt + geometry-aware adapters (Point-BERT only)",
    mergeable=False, identity_at_init=False, applies_to=_is_point_bert,
)
