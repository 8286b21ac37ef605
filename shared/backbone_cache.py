"""Load each distinct backbone once while many runs are being built.

`peftlab serve` and `peftlab.load([...])` rebuild one task model per run. Inside
`shared_backbones()`, a backbone loader decorated with `@load_once` reads a given
backbone from disk (or builds a preset) the first time only; later calls with the same
arguments get a deep copy of that pristine model. Outside the block loaders behave as
usual and nothing is kept, so the cache never doubles a long-lived process's memory.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

_loaded: dict[tuple, Any] | None = None


@contextmanager
def shared_backbones() -> Iterator[None]:
    global _loaded
    outermost = _loaded is None
    if outermost:
        _loaded = {}
    try:
        yield
    finally:
        if outermost:
            _loaded = None


def load_once(loader: Callable) -> Callable:
    @functools.wraps(loader)
    def load(*args, **kwargs):
        if _loaded is None:
            return loader(*args, **kwargs)
        key = (loader.__module__, loader.__qualname__, repr(args), repr(sorted(kwargs.items())))
        if key not in _loaded:
            _loaded[key] = loader(*args, **kwargs)
        return copy.deepcopy(_loaded[key])

    return load
