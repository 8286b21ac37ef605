"""Options shared by the visual-prompt methods (VPT in medical imaging, `clip_prompt` in
video-text): learned tokens prepended to a vision transformer's sequence."""

from __future__ import annotations

from dataclasses import dataclass, field


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
