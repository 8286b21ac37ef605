"""BitFit (Ben Zaken et al. 2022): train only the bias terms."""

from __future__ import annotations

from dataclasses import dataclass, field

from peftlab.shared.errors import UserError
from peftlab.shared.methods.registry import Applied, register_method
from peftlab.shared.methods.targeting import name_matches
from torch import nn


@dataclass
class BitFitOptions:
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "only biases of these modules (suffixes or regex); default: every bias"}
    )


def apply_bitfit(model: nn.Module, options: BitFitOptions) -> Applied:
    names = []
    for name, _ in model.named_parameters():
        module_name, _, leaf = name.rpartition(".")
        if leaf == "bias" and (options.target_modules is None or name_matches(module_name, options.target_modules)):
            names.append(name)
    if not names:
        raise UserError("bitfit: the model has no bias parameters to train" + (
            f" in target_modules={options.target_modules!r}" if options.target_modules else ""))
    return Applied(model, names)


register_method(
    "bitfit",
    BitFitOptions,
    apply_bitfit,
    description="BitFit: train the bias terms only",
    mergeable=True,  # nothing to fold: the trained biases are the model's own
    identity_at_init=True,
    merge=lambda model, options, state: model,
)
