"""Domain pipelines. Each sub-package registers its tasks (and any methods of its
field) when imported; `load_all()` imports every one, so adding a domain is adding a
folder."""

import importlib
import pkgutil


def load_all() -> None:
    for info in pkgutil.iter_modules(__path__):
        if info.ispkg:
            importlib.import_module(f"{__name__}.{info.name}")
