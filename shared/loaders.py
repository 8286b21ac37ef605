"""Custom loaders: a card's `loader: module:function` reads a format no domain knows.

The function takes the path of one data file the card names (`files.data`, or each
per-split file) and returns that file's records: dicts from field name to value, as a
list, any iterable of dicts or a pandas DataFrame. The task reads the records as it
reads its own record format (the rows of its table, or the objects of its JSON lines),
so the card's `fields`, `labels` and `splits` mean what they mean there and every check
on a cell applies; an error names FILE:N, the loader's N-th record of that file.

`loader: my_loader:read` finds `my_loader.py` in the card's folder first (with that
folder importable while it loads), then an installed module of that name.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import math
import sys
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from peftlab.shared.cards import Card
from peftlab.shared.errors import UserError


def loader_rows(card: Card, path: Path) -> list[tuple[int, list[str]]] | None:
    """The records the card's loader gives for `path` as a table (what `table_rows` gives
    for a CSV): a header row numbered 0 naming every key, then record N as row N. None
    where the card has no loader: the reader reads the file itself."""
    if card.loader is None:
        return None
    records = loader_records(card, path)
    header: dict[str, None] = {}
    for _, record in records:
        header.update(dict.fromkeys(map(str, record)))
    rows = [(0, list(header))]
    for number, record in records:
        values = {str(key): value for key, value in record.items()}
        rows.append((number, [_cell(values.get(key), f"{path}:{number}", key) for key in header]))
    return rows


def loader_records(card: Card, path: Path) -> list[tuple[int, dict]] | None:
    """The records the card's loader gives for `path`, numbered from 1, with numpy values
    as plain Python ones (as JSON lines would hold them). None where the card has no loader."""
    if card.loader is None:
        return None
    function = loader_function(card)
    try:
        returned = function(path)
        if hasattr(returned, "to_dict") and hasattr(returned, "columns"):  # a pandas DataFrame
            returned = returned.to_dict("records")
        if isinstance(returned, str | bytes | Mapping) or not hasattr(returned, "__iter__"):
            raise UserError(f"{path}: loader {card.loader} returned a {type(returned).__name__}; return the file's "
                            f"records, a list of dicts (one per example, field name -> value)")
        records = list(enumerate(returned, start=1))
    except UserError:
        raise
    except Exception as error:  # the loader's own code failed: say where, in one line
        raise UserError(f"{path}: loader {card.loader} failed: {type(error).__name__}: {error} "
                        f"({_where(error)}); fix the loader or the file") from None
    for number, record in records:
        if not isinstance(record, Mapping):
            raise UserError(f"{path}:{number}: loader {card.loader} gave a {type(record).__name__}, not a dict; "
                            f"each record is a dict (field name -> value)")
    return [(number, {str(key): _plain(value) for key, value in record.items()}) for number, record in records]


def loader_function(card: Card) -> Callable:
    """The card's `loader: module:function`, imported (once per module file)."""
    module_name, _, function_name = card.loader.partition(":")
    if not module_name or not function_name.isidentifier() or not all(p.isidentifier() for p in module_name.split(".")):
        raise UserError(f"{card.card_path}: loader: {card.loader!r} is not module:function; e.g. "
                        f"`loader: my_loader:read` (my_loader.py beside the card, or an installed module)")
    beside = card.folder / (module_name.replace(".", "/") + ".py") if card.folder is not None else None
    try:
        module = _import_file(beside) if beside is not None and beside.is_file() else importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name is not None and (module_name == error.name or module_name.startswith(error.name + ".")):
            raise UserError(f"{card.card_path}: loader: no module {module_name!r}: neither {beside} nor an installed "
                            f"module; put {module_name.split('.')[-1]}.py beside the card or install it") from None
        raise _import_error(card, module_name, error) from None
    except Exception as error:
        raise _import_error(card, module_name, error) from None
    function = getattr(module, function_name, None)
    if not callable(function):
        known = sorted(name for name, value in vars(module).items() if callable(value) and not name.startswith("_")
                       and getattr(value, "__module__", None) == module.__name__)
        raise UserError(f"{card.card_path}: loader: module {module_name!r} has no function {function_name!r}; "
                        f"its functions: {', '.join(known) or 'none'}")
    return function


@functools.cache
def _import_file(path: Path):
    """A loader module beside its card, under a name of its own (two cards' `my_loader.py`
    are two modules), with its folder importable while it runs (for its own helpers)."""
    name = f"peftlab_card_loader_{path.stem}_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


def _import_error(card: Card, module_name: str, error: Exception) -> UserError:
    return UserError(f"{card.card_path}: loader: importing {module_name!r} failed: {type(error).__name__}: {error} "
                     f"({_where(error)})")


def _where(error: Exception) -> str:
    """FILE:LINE of the innermost frame the error passed through: the line to look at."""
    frames = traceback.extract_tb(error.__traceback__)
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "no traceback"


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray) and value.ndim <= 1:  # a column of lists (choices, say) in pandas or datasets
        return value.tolist()
    return value


def _cell(value: Any, where: str, key: str) -> str:
    """A record's value as a table cell reads it: text as it is, numbers in decimal,
    True/False as 1/0, nothing (None, NaN) as an empty cell."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, str | int | float):
        return str(value)
    raise UserError(f"{where}: field {key!r} holds a {type(value).__name__}; these records are read as a table's rows, "
                    f"whose cells hold text or a number: give it as text (e.g. findings joined by '|')")
