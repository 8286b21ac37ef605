"""Options shared by the visual-prompt methods (VPT in medical imaging, `clip_prompt` in
video-text): learned tokens prepended to a vision transformer's sequence."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class PromptTokenOptions:
    num_tokens: int = field(default=8, metadata={"help": "prompt tokens per layer (Jia et al. use 1-200; 10-50 typical)"})
    deep: bool = field(default=False, metadata={"help": "VPT-deep: new prompts at every block, not only at the input"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the prompt tokens"})

    def __post_init__(self):
        if self.num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {self.num_tokens}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


class PromptTokens(nn.Module):
    """Learned prompt tokens for a vision transformer: one set (shallow) or one per block (deep)."""

    def __init__(self, num_tokens: int, width: int, blocks: int, deep: bool, dropout: float, patch_area: int):
        super().__init__()
        self.num_tokens = num_tokens
        # Jia et al.: uniform in +-sqrt(6 / (fan_in + fan_out)) of the patch projection.
        bound = math.sqrt(6.0 / float(3 * patch_area + width))
        self.prompts = nn.Parameter(torch.empty(blocks if deep else 1, num_tokens, width).uniform_(-bound, bound))
        self.dropout = nn.Dropout(dropout)
        self.prefix = 0
        """Where the prompts go: after the model's CLS / register tokens (set when applied)."""

    def tokens(self, layer: int, batch: int, dtype=None) -> torch.Tensor:
        tokens = self.dropout(self.prompts[layer]).unsqueeze(0).expand(batch, -1, -1)
        return tokens if dtype is None else tokens.to(dtype)
