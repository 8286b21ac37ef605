"""Libraries imported on first use.

The task and method registries import every domain, and `peftlab list`, `card new` and
`card validate` need nothing but the registries; peft, scikit-learn, timm or
transformers would add seconds to each of those commands. A module that reaches such a
library in many places binds it with `lazy_import` and uses it as before.
"""

from __future__ import annotations

import importlib
from typing import Any


class LazyModule:
    """Stands in for module `name`, importing it at the first attribute read."""

    def __init__(self, name: str):
        self._name = name
        self._module = None

    def __getattr__(self, attribute: str) -> Any:
        # Kept after the first read: some of these are read on every forward pass.
        if self._module is None:
            self._module = importlib.import_module(self._name)
        return getattr(self._module, attribute)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}>"


def lazy_import(name: str) -> Any:
    """`name` (e.g. "sklearn.metrics"), imported when one of its attributes is first read."""
    return LazyModule(name)
