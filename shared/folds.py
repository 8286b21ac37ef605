"""Where each split's records come from: one file per split, or one file whose `fold_by`
column names each record's split.

`splits: {fold_by: COLUMN}` reads one table (or JSON lines) of the task's record format,
the format a card loader's records are read as, and divides its records by COLUMN:

- `fold_by: set` alone: each cell is a split name, train, validation or test (or
  training, valid, val, dev, testing), in any case (FLIP's `set` column; a saved Hugging Face dataset's `split`);
- `fold_by: session, test: [5]` (and `validation: [4]`): the records with those values
  are the test (and validation) split and every other record trains. A fold per run
  (`data.splits.test=[2]`) or per cell of a sweep (`peftlab bench --folds test=1,2,3`)
  makes cross-validation.

Each split's records are then read as a per-split file's are, so a validation split the
data does not give is held out of train the same way (`validation_fraction`). Values
compare as text, numbers by value (`5`, `"5"`, `5.0` and `"5.0"` are one fold; `"05"`
is another), booleans in any case. COLUMN may be a `fields` key that names a column (speech-emotion's
`fields.session`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from peftlab.shared.cards import Card
from peftlab.shared.data import check_validation_given, header_column
from peftlab.shared.errors import UserError, did_you_mean
from peftlab.shared.loaders import loader_records, loader_rows

SPLITS = ("train", "validation", "test")

Source = tuple[Path, list | None]
"""A split's file, and its records where they are already read (a table's header row
first), or None where the task reads the file itself."""


def split_sources(card: Card, table: bool, data_file: Callable[[], Path],
                  read_file: Callable[[Path], list]) -> dict[str, Source] | None:
    """The card's data as one source per split, in train, validation, test order, or None
    for data that ratios divide.

    - per-split files (`splits: {train: a.csv, test: b.csv}`): each file, with the card
      loader's records of it (None without a loader: the task reads the file);
    - `splits.fold_by`: the one file `data_file()` names, its records (the loader's, else
      `read_file`'s) divided by the fold column.

    `table`: the task reads rows of a table (a header row numbered 0, then numbered rows
    of cells) rather than records (numbered dicts)."""
    if "fold_by" in (card.splits or {}):
        path = data_file()
        records = (loader_rows if table else loader_records)(card, path)
        return {split: (path, part) for split, part in
                fold_split(card, path, read_file(path) if records is None else records, table).items()}
    files = card.split_files()
    if files is None:
        return None
    load = loader_rows if table else loader_records
    return {split: (path, load(card, path)) for split, path in files.items()}


def check_fold_by(card: Card, task) -> None:
    """`fold_by` divides one file of the task's record format; any other format (a demo,
    an image folder, MSR-VTT JSON with its own splits) would ignore it: refused, as are
    keys beside it that would be ignored or misread."""
    spec = card.splits or {}
    if "fold_by" not in spec:
        return
    if card.format != task.loader_format:
        how = "a demo generates its own splits" if card.format == "demo" else \
            "split it with ratios or per-split files, or read it with `loader: module:function`"
        raise UserError(f"{card.card_path}: splits.fold_by divides the records of one {task.loader_format} file by a "
                        f"column; format {card.format!r} has none ({how})")
    column = spec["fold_by"]
    if isinstance(column, bool) or not isinstance(column, str | int) or not str(column).strip():
        raise UserError(f"{card.card_path}: splits.fold_by names the column that holds each record's split or fold, "
                        f"e.g. fold_by: set; got {column!r}")
    for key in ("ratios", "train"):
        if key in spec:
            raise UserError(f"{card.card_path}: splits.{key} beside splits.fold_by: the fold column makes the splits "
                            f"(every record not in test or validation trains); remove splits.{key}")
    for key in ("validation", "test"):
        if key not in spec:
            continue
        values = spec[key]
        if values is None or values == []:
            raise UserError(f"{card.card_path}: splits.{key} names no {column} value; list the values that make "
                            f"{key} (e.g. {key}: [5]) or leave {key} out")
        for value in values if isinstance(values, list | tuple) else [values]:
            if value is None or (isinstance(value, str) and not value.strip()):
                raise UserError(f"{card.card_path}: splits.{key} lists an empty value ({value!r}); list {column} "
                                f"values, e.g. {key}: [5]")
            if isinstance(value, list | dict):
                raise UserError(f"{card.card_path}: splits.{key} lists {value!r}; list {column} values (text or "
                                f"numbers), e.g. {key}: [5]")
            if isinstance(value, str) and (Path(value).suffix.lower() in DATA_SUFFIXES or card.resolve(value).is_file()):
                raise UserError(f"{card.card_path}: splits.{key} = {value} is a file, but beside splits.fold_by "
                                f"{key} lists {column} values; give one file (files.data) with the {column} column, "
                                f"or leave fold_by out to read one file per split")


DATA_SUFFIXES = frozenset((".csv", ".tsv", ".txt", ".json", ".jsonl", ".npz", ".h5", ".parquet", ".pkl", ".fasta"))
"""Suffixes of files a per-split `splits.test` names: beside fold_by, not a fold value."""

SPLIT_NAMES = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
               "val": "validation", "validating": "validation", "dev": "validation", "development": "validation",
               "test": "test", "testing": "test"}
"""Cell text (any case) -> the split it names, where the cells name the split."""


def _names_held_out_split(value: str) -> bool:
    """A cell that reads as a test or validation split's name ("test", "Testing", "test_set",
    "valid"): in a column of fold values, training on it would be a silent mistake."""
    return SPLIT_NAMES.get(value.lower(), "train") != "train" or re.search(r"test|valid", value.lower()) is not None


def fold_split(card: Card, path: Path, records: list, table: bool) -> dict[str, list]:
    """The file's records by split (a table's header row heads each split's rows)."""
    spec = card.splits or {}
    key = str(spec["fold_by"])  # a header like 2020 reads from YAML as a number
    named = (card.fields or {}).get(key)
    column = named if isinstance(named, str) else key
    if table:
        header, records = (records[0][1], records[1:]) if records else ([], [])
    if not records:
        raise UserError(f"{path}: no records to divide by splits.fold_by")
    if table:
        names = [cell.strip() for cell in header]
        if isinstance(named, int) and not isinstance(named, bool) and 0 <= named < len(names):
            index = named  # fields.KEY as a column position
            column = names[index]
        elif (found := header_column(names, column, path)) is not None:
            index = found
        else:
            raise UserError(f"{path}: splits.fold_by names column {column!r}, which the header lacks "
                            f"({', '.join(names)}); name one of them (fold_by needs a header row naming the column)")
        value_of: Callable[[Any], Any] = lambda cells: cells[index] if index < len(cells) else None  # noqa: E731
    else:
        for number, record in records:
            if not isinstance(record, dict):
                raise UserError(f"{path}:{number}: a {type(record).__name__}, not a record (a JSON object of named fields)")
        if not any(column in record for _, record in records):
            raise UserError(f"{path}: splits.fold_by names key {column!r}, which no record has"
                            f"{did_you_mean(column, records[0][1])}")
        value_of = lambda record: record.get(column)  # noqa: E731
    values = []
    for number, record in records:
        value = fold_value(value_of(record), f"{path}:{number}", column)
        if value is None:
            raise UserError(f"{path}:{number}: no {column!r} value; splits.fold_by: {key} needs one in every record")
        values.append(value)
    given = {split: [fold_value(v, f"{card.card_path}: splits.{split}", column) for v in _as_list(spec[split])]
             for split in ("validation", "test") if split in spec}
    check_validation_given(card, "validation" in given)
    if given:
        split_of = _split_by_values(given, values, records, path, column, str(card.card_path))
    else:
        split_of = _split_by_names(values, records, path, column, key)
    parts: dict[str, list] = {split: [] for split in SPLITS}
    for record, value in zip(records, values):
        parts[split_of.get(value, "train")].append(record)
    if not parts["train"]:
        raise UserError(f"{card.card_path}: splits.fold_by: {key} leaves no record to train on: every {column} value "
                        f"is in test or validation")
    if table:
        parts = {split: [(0, header), *rows] for split, rows in parts.items()}
    return {split: rows for split, rows in parts.items() if len(rows) > (1 if table else 0)}


def fold_value(value, where: str, column: str) -> str | None:
    """A fold cell or a listed value as text, None where empty: numbers as their value
    (5, 5.0 and "5.0" are one fold; "05" keeps its zero, as a label would)."""
    if value is None:
        return None
    if isinstance(value, list | tuple | dict):
        raise UserError(f"{where}: {column} holds {type(value).__name__} {value!r}; a fold value is text or a number")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    if text.lower() in ("true", "false"):  # YAML's true, JSON's true and a cell's "True" are one value
        return text.lower()
    if _DECIMAL.fullmatch(text):  # "5.0" as a float column writes 5, "5.50" is 5.5
        text = text.rstrip("0").rstrip(".")
    return text or None


_DECIMAL = re.compile(r"-?(0|[1-9][0-9]*)\.[0-9]+")
"""A decimal number without leading zeros, whose trailing zeros say nothing ("5.0", "5.50")."""


def _split_by_names(values: list[str], records: list, path: Path, column: str, key: str) -> dict[str, str]:
    """{cell: split} where the cells name the split (any case; valid, val and dev validate)."""
    unknown = sorted({value for value in values if value.lower() not in SPLIT_NAMES})
    if unknown:
        number = next(n for (n, _), value in zip(records, values) if value == unknown[0])
        present = sorted(set(values))
        # a fold number is the usual held-out value; a name could mean anything, so none is guessed
        example = unknown[-1] if all(re.fullmatch(r"-?[0-9.]+", value) for value in unknown) else "VALUE"
        raise UserError(f"{path}:{number}: {column} is {unknown[0]!r}, not a split name (train, validation or valid, "
                        f"test); the column holds {', '.join(present[:8])}{', ...' if len(present) > 8 else ''}: list "
                        f"the values that test (and validate), e.g. splits: {{fold_by: {key}, test: [{example}]}}, "
                        f"and the rest trains")
    return {value: SPLIT_NAMES[value.lower()] for value in set(values)}


def _split_by_values(given: dict[str, list[str]], values: list[str], records: list, path: Path, column: str,
                     where: str) -> dict[str, str]:
    """{value: split} for the values `test:` and `validation:` list; each must be in the
    data, and a cell that itself names a held-out split must be listed (else it would train)."""
    present = set(values)
    for split, wanted in given.items():
        missing = sorted(set(wanted) - present)
        if missing:
            padded = sorted(value for value in present if value.lstrip("0") == missing[0].lstrip("0") != "")
            hint = f" (write it quoted, {split}: ['{padded[0]}'], to keep its zeros)" if padded else ""
            raise UserError(f"{where}: splits.{split} names {column} {missing[0]!r}, which no record has; the data "
                            f"has {sorted(present)}{hint}")
    both = sorted(set(given.get("test", [])) & set(given.get("validation", [])))
    if both:
        raise UserError(f"{where}: splits names {column} {both[0]!r} for both test and validation; a fold's test "
                        f"{column} must not also validate (leave `validation` out to hold validation out of the rest)")
    split_of = {value: split for split, wanted in given.items() for value in wanted}
    trained = next(((n, value) for (n, _), value in zip(records, values)
                    if value not in split_of and _names_held_out_split(value)), None)
    if trained is not None:
        number, value = trained
        split = SPLIT_NAMES.get(value.lower(), "test" if "test" in value.lower() else "validation")
        raise UserError(f"{path}:{number}: {column} is {value!r}, a split's name that splits.test and "
                        f"splits.validation do not list, so it would train; list it (e.g. {split}: [{value}]), or "
                        f"leave test and validation out to read the cells as split names")
    return split_of


def _as_list(value) -> list:
    """`test: 5`, `test: Ses05` or `test: [1, 2]` -> a list of values."""
    return list(value) if isinstance(value, list | tuple) else [value]
