"""Embedding prompt tuning for speech encoders (PEFT-SER, Feng & Narayanan 2023).

`speech_prompt` learns k vectors per position set, prepended to the transformer's input
frames: after the CNN feature encoder and feature projection (wav2vec 2.0, WavLM,
HuBERT) or after the log-mel convolutions and positions (Whisper).

- `placement=every_layer` (the task's default, PEFT-SER's code): each layer gets its own
  k vectors in front of its input; what a layer computes at those positions is
  replaced by the next layer's vectors, so every layer sees fresh prompts (L x k x d
  parameters). The prompt joins after the entry's positional convolution and norm,
  which see the audio frames alone.
- `placement=input`: one set of k vectors before the entry (positional convolution and
  norm included), carried through every layer (k x d parameters).

The attention mask grows by k valid positions; the prompt positions are dropped from
the hidden states at the end, so pooling and the head see only the audio frames.
Prepending changes what every frame attends to, so the method does not start as the
identity, and it adds positions rather than changing weights, so it cannot be merged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from peftlab.shared.methods import Applied, register_method
from torch import nn

from .backbones import SpeechEncoder

PLACEMENTS = ("every_layer", "input")


class SpeechPrompt(nn.Module):
    """k learned vectors: one set before the entry (`layers=0`), or one set per layer."""

    def __init__(self, length: int, width: int, init_std: float, layers: int = 0):
        super().__init__()
        self.length = length
        shape = (layers, length, width) if layers else (length, width)
        self.vectors = nn.Parameter(torch.randn(shape) * init_std)

    @property
    def every_layer(self) -> bool:
        return self.vectors.dim() == 3

    def forward(self, frames: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prepend the prompt (the first layer's, per layer) and grow the mask."""
        batch = frames.shape[0]
        first = self.vectors[0] if self.every_layer else self.vectors
        prompt = first.to(frames.dtype).unsqueeze(0).expand(batch, -1, -1)
        valid = torch.ones(batch, self.length, dtype=mask.dtype, device=mask.device)
        return torch.cat([prompt, frames], dim=1), torch.cat([valid, mask], dim=1)

    def before_layer(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """Layer `index`'s input: its own vectors in the prompt positions (per layer), else as is."""
        if not self.every_layer:
            return hidden
        prompt = self.vectors[index].to(hidden.dtype).unsqueeze(0).expand(hidden.shape[0], -1, -1)
        return torch.cat([prompt, hidden[:, self.length:]], dim=1)


@dataclass
class SpeechPromptOptions:
    length: int = field(default=8, metadata={"help": "number of learned vectors prepended to the encoder's input frames"})
    init_std: float = field(default=0.02, metadata={"help": "standard deviation of the prompt's random initialisation"})
    placement: str = field(default="input", metadata={
        "help": "every_layer: fresh vectors in front of each layer's input (PEFT-SER's code; the speech-emotion "
                "task's default); input: one set before the first layer, carried through"})

    def __post_init__(self):
        if self.length < 1:
            raise ValueError(f"length must be >= 1, got {self.length}")
        if self.init_std <= 0:
            raise ValueError(f"init_std must be > 0, got {self.init_std}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be {' or '.join(PLACEMENTS)}, got {self.placement!r}")


def apply_speech_prompt(model: SpeechEncoder, options: SpeechPromptOptions) -> Applied:
    layers = model.num_layers if options.placement == "every_layer" else 0
    model.speech_prompt = SpeechPrompt(options.length, model.width, options.init_std, layers)
    return Applied(model, ["speech_prompt.vectors"])


register_method(
    "speech_prompt",
    SpeechPromptOptions,
    apply_speech_prompt,
    description="speech embedding prompt (PEFT-SER): k learned vectors prepended to each layer's (or the first layer's) input frames",
    mergeable=False,
    identity_at_init=False,
    applies_to=lambda model: isinstance(model, SpeechEncoder),
)
