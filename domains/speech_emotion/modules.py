"""Embedding prompt tuning for speech encoders (PEFT-SER, Feng & Narayanan 2023).

`speech_prompt` learns k vectors that are prepended to the encoder's input frames:
after the CNN feature encoder and feature projection (wav2vec 2.0, WavLM, HuBERT) or
after the log-mel convolutions and positions (Whisper), before the transformer layers.
The attention mask grows by k valid positions; the prompt positions are dropped again
from the hidden states, so pooling and the head see only the audio frames.

Prepending changes what every frame attends to, so the method does not start as the
identity, and it adds positions rather than changing weights, so it cannot be merged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from peftlab.shared.methods import Applied, register_method
from torch import nn

from .backbones import SpeechEncoder


class SpeechPrompt(nn.Module):
    def __init__(self, length: int, width: int, init_std: float):
        super().__init__()
        self.length = length
        self.vectors = nn.Parameter(torch.randn(length, width) * init_std)

    def forward(self, frames: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = frames.shape[0]
        prompt = self.vectors.to(frames.dtype).unsqueeze(0).expand(batch, -1, -1)
        valid = torch.ones(batch, self.length, dtype=mask.dtype, device=mask.device)
        return torch.cat([prompt, frames], dim=1), torch.cat([valid, mask], dim=1)


@dataclass
class SpeechPromptOptions:
    length: int = field(default=8, metadata={"help": "number of learned vectors prepended to the encoder's input frames"})
    init_std: float = field(default=0.02, metadata={"help": "standard deviation of the prompt's random initialisation"})

    def __post_init__(self):
        if self.length < 1:
            raise ValueError(f"length must be >= 1, got {self.length}")
        if self.init_std <= 0:
            raise ValueError(f"init_std must be > 0, got {self.init_std}")


def apply_speech_prompt(model: SpeechEncoder, options: SpeechPromptOptions) -> Applied:
    model.speech_prompt = SpeechPrompt(options.length, model.width, options.init_std)
    return Applied(model, ["speech_prompt.vectors"])


register_method(
    "speech_prompt",
    SpeechPromptOptions,
    apply_speech_prompt,
    description="speech embedding prompt (PEFT-SER): k learned vectors prepended to a speech encoder's input frames",
    mergeable=False,
    identity_at_init=False,
    applies_to=lambda model: isinstance(model, SpeechEncoder),
)
