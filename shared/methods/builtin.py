"""Importing this module registers the built-in methods."""

from peftlab.shared.methods import (  # noqa: F401
    bitfit,
    bottleneck,
    freeze_layers,
    full,
    peft_methods,
    reft,
    ssf,
)
