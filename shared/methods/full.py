"""Full fine-tuning: every backbone parameter trains. The reference row of every table."""

from __future__ import annotations

from dataclasses import dataclass

from peftlab.shared.methods.registry import Applied, register_method


@dataclass
class FullOptions:
    pass


register_method(
    "full",
    FullOptions,
    lambda model, options: Applied(model, [n for n, _ in model.named_parameters()]),
    description="full fine-tuning: every backbone parameter trains (the baseline)",
    mergeable=True,
    identity_at_init=True,
    merge=lambda model, options, state: model,
)

