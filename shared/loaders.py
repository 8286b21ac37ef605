"""Custom loaders: a card's `loader: module:function` reads a format no domain knows.

The function takes the path of one data file the card names (`files.data`, or each
per-split file) and returns that file's records: dicts from field name to value, as a
list, any iterable of dicts or a pandas DataFrame. The task reads the records as it
reads its own record format (the rows of its table, or the objects of its JSON lines),
so the card's `fields`, `labels` and `splits` mean what they mean there and every check
on a cell applies; an error names FILE:N, the loader's N-th record of that file.

`loader: my_loader:read` finds `my_loader.py` (or a package `my_loader/`) in the card's
folder first, then an installed module of that name; the card's folder is importable
for the loader's own imports.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import importlib.util
import inspect
import json
import math
import os
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
        header.update(dict.fromkeys(record))
    return [(0, list(header))] + [(number, [_cell(record.get(key)) for key in header]) for number, record in records]


def loader_records(card: Card, path: Path) -> list[tuple[int, dict]] | None:
    """The records the card's loader gives for `path`, numbered from 1, as JSON lines would
    hold them: numpy values as Python ones, and a field with no value (None, NaN) left
    out, as a missing key. None where the card has no loader."""
    if card.loader is None:
        return None
    function = loader_function(card)
    try:
        inspect.signature(function).bind(path)
    except TypeError:
        raise UserError(f"{card.card_path}: loader: {card.loader} takes {inspect.signature(function)}; a loader takes "
                        f"one argument, the data file's path") from None
    except ValueError:  # no signature to inspect (a builtin): the call says
        pass
    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout is peftlab's results (JSON lines)
            returned = function(path)
            if hasattr(returned, "to_dict") and hasattr(returned, "columns"):  # a pandas DataFrame
                returned = returned.to_dict("records")
            if isinstance(returned, str | bytes | Mapping) or not hasattr(returned, "__iter__"):
                raise UserError(f"{path}: loader {card.loader} returned a {type(returned).__name__}; return the "
                                f"file's records, a list of dicts (one per example, field name -> value)")
            records = list(enumerate(returned, start=1))
    except UserError:
        raise
    except (Exception, SystemExit) as error:  # the loader's own code failed: say where, in one line
        raise UserError(f"{path}: loader {card.loader} failed: {type(error).__name__}: {error} "
                        f"({_where(error)}); fix the loader or the file") from None
    if not records:
        raise UserError(f"{path}: loader {card.loader} gave no records for this file")
    for number, record in records:
        if not isinstance(record, Mapping):
            raise UserError(f"{path}:{number}: loader {card.loader} gave a {type(record).__name__}, not a dict; "
                            f"each record is a dict (field name -> value)")
    plain = [(number, {str(key): _plain(value) for key, value in record.items()}) for number, record in records]
    return [(number, {key: value for key, value in record.items() if value is not None}) for number, record in plain]


def loader_function(card: Card) -> Callable:
    """The card's `loader: module:function`: a module beside the card (a file or a package
    in the card's folder), else an installed one."""
    module_name, _, function_name = card.loader.partition(":")
    if not module_name or not function_name.isidentifier() or not all(p.isidentifier() for p in module_name.split(".")):
        raise UserError(f"{card.card_path}: loader: {card.loader!r} is not module:function; e.g. "
                        f"`loader: my_loader:read` (my_loader.py beside the card, or an installed module)")
    try:
        with contextlib.redirect_stdout(sys.stderr):
            module = _import_beside(card, module_name) or importlib.import_module(module_name)
    except UserError:
        raise
    except ModuleNotFoundError as error:
        if error.name is not None and (module_name == error.name or module_name.startswith(error.name + ".")):
            raise UserError(f"{card.card_path}: loader: no module {module_name!r}: neither "
                            f"{card.folder / module_name.split('.')[0]}.py (or a package folder) nor an installed "
                            f"module; put {module_name.split('.')[0]}.py beside the card or install it") from None
        raise _import_error(card, module_name, error) from None
    except (Exception, SystemExit) as error:
        raise _import_error(card, module_name, error) from None
    function = getattr(module, function_name, None)
    if not callable(function):
        known = sorted(name for name, value in vars(module).items() if callable(value) and not name.startswith("_")
                       and getattr(value, "__module__", None) == module.__name__)
        raise UserError(f"{card.card_path}: loader: module {module_name!r} has no function {function_name!r}; "
                        f"its functions: {', '.join(known) or 'none'}")
    return function


_BESIDE: dict[str, tuple[str, dict[str, float]]] = {}
"""Top-level modules imported from a card's folder: name -> (folder, mtime of each file loaded)."""


def _import_beside(card: Card, module_name: str):
    """`module_name` from the card's folder, or None where the folder has no such module.
    The folder stays importable (at the end of sys.path) for the loader's own imports, when
    it loads and when it runs. Another card's module of the same name, or one edited since
    it was imported (a notebook reading the card again), is imported afresh."""
    if card.folder is None:
        return None
    folder, top = str(card.folder.resolve()), module_name.split(".")[0]
    spec = importlib.machinery.PathFinder.find_spec(top, [folder])
    if spec is None:
        return None
    loaded = sys.modules.get(top)
    if loaded is not None and top not in _BESIDE and getattr(loaded, "__file__", None) != spec.origin:
        raise UserError(f"{card.card_path}: loader: {spec.origin} has the name of a module already in use "
                        f"({getattr(loaded, '__file__', None) or top}); rename it")
    stale = top in _BESIDE and (_BESIDE[top][0] != folder or any(
        not os.path.exists(file) or os.path.getmtime(file) != mtime for file, mtime in _BESIDE[top][1].items()))
    if stale:
        for name in [name for name in sys.modules if name == top or name.startswith(top + ".")]:
            del sys.modules[name]
    if folder not in sys.path:
        sys.path.append(folder)
    if top not in sys.modules:  # from this folder, whatever an installed module of the name
        module = importlib.util.module_from_spec(spec)
        sys.modules[top] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[top]
            raise
    module = importlib.import_module(module_name)
    files = {m.__file__ for name, m in list(sys.modules.items())
             if (name == top or name.startswith(top + ".")) and getattr(m, "__file__", None)}
    _BESIDE[top] = (folder, {file: os.path.getmtime(file) for file in files})
    return module


def _import_error(card: Card, module_name: str, error: BaseException) -> UserError:
    return UserError(f"{card.card_path}: loader: importing {module_name!r} failed: {type(error).__name__}: {error} "
                     f"({_where(error)})")


def _where(error: BaseException) -> str:
    """FILE:LINE to look at: a syntax error's own, else the innermost frame the error passed through."""
    if isinstance(error, SyntaxError) and error.filename:
        return f"{error.filename}:{error.lineno}"
    frames = traceback.extract_tb(error.__traceback__)
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "no traceback"


def _plain(value: Any) -> Any:
    """A value as JSON would hold it: numpy scalars and size-1 arrays as Python values,
    1-D arrays as lists, bytes (HDF5 strings) as text, NaN as None."""
    if isinstance(value, np.ndarray) and value.size == 1 and value.ndim >= 1:
        value = value.reshape(())[()]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, np.ndarray) and value.ndim == 1:  # a column of lists (choices, say) in pandas or datasets
        return [_plain(item) for item in value.tolist()]
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _cell(value: Any) -> str:
    """A record's value as a table cell reads it: text as it is, numbers in decimal,
    True/False as 1/0, nothing as an empty cell, a list or mapping as its JSON, anything
    else (a date, say) as its text. A column the task does not read may hold anything."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, str | int | float):
        return str(value)
    if isinstance(value, list | tuple | dict):
        return json.dumps(value, default=str)
    return str(value)
