"""PEFT methods behind one registry.

    from peftlab.shared import methods
    methods.list_methods()
    adapted = methods.apply(model, "ssf", target_modules=["fc1", "fc2"])
    adapted.parameter_counts(); adapted.save("adapter/"); merged = adapted.merge()
"""

from peftlab.shared.methods.adapted import AdaptedModel, apply, load_adapter, network_of
from peftlab.shared.methods.registry import (
    Applied,
    MethodSpec,
    get_method,
    list_methods,
    options_help,
    register_method,
)

__all__ = [
    "AdaptedModel",
    "Applied",
    "MethodSpec",
    "apply",
    "get_method",
    "list_methods",
    "load_adapter",
    "network_of",
    "options_help",
    "register_method",
]
