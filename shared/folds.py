"""Where each split's records come from: one file per split, or one file whose `fold_by`
column names each record's split.

`splits: {fold_by: COLUMN}` reads one table (or JSON lines) of the task's record format,
the format a card loader's records are read as, and divides its records by COLUMN:

- `fold_by: set` alone: each cell is a split name, train, validation or test (FLIP's
  `set` column; a saved Hugging Face dataset's `split`);
- `fold_by: session, test: [5]` (and `validation: [4]`): the records with those values
  are the test (and validation) split and every other record trains. A fold per run
  (`data.splits.test=[2]`) or per cell of a sweep (`peftlab bench --folds test=1,2,3`)
  makes cross-validation.

Each split's records are then read as a per-split file's are, so a validation split the
data does not give is held out of train the same way (`validation_fraction`). Values
compare as text (`5` and `"5"` are one fold). COLUMN may be a `fields` key that names a
column (speech-emotion's `fields.session`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from peftlab.shared.cards import Card
from peftlab.shared.data import check_validation_given
from peftlab.shared.errors import UserError
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
    an image folder, MSR-VTT JSON with its own splits) would ignore it: refused."""
    spec = card.splits or {}
    if "fold_by" not in spec:
        return
    if card.format != task.loader_format:
        raise UserError(f"{card.card_path}: splits.fold_by divides the records of one {task.loader_format} file by a "
                        f"column; format {card.format!r} has none (split it with ratios or per-split files, or read "
                        f"it with `loader: module:function`)")
    column = spec["fold_by"]
    if isinstance(column, bool) or not isinstance(column, str | int) or not str(column).strip():
        raise UserError(f"{card.card_path}: splits.fold_by names the column that holds each record's split or fold, "
                        f"e.g. fold_by: set; got {column!r}")
    for key in ("ratios", "train"):
        if key in spec:
            raise UserError(f"{card.card_path}: splits.{key} beside splits.fold_by: the fold column makes the splits "
                            f"(every record not in test or validation trains); remove splits.{key}")


def fold_split(card: Card, path: Path, records: list, table: bool) -> dict[str, list]:
    """The file's records by split (a table's header row heads each split's rows)."""
    spec = card.splits or {}
    key = str(spec["fold_by"])  # a header like 2020 reads from YAML as a number
    named = (card.fields or {}).get(key)
    column = named if isinstance(named, str) else key
    if table:
        header, records = records[0][1], records[1:]
        names = [cell.strip() for cell in header]
        if column not in names:
            raise UserError(f"{path}: splits.fold_by names column {column!r}, which the header lacks ({', '.join(names)}); "
                            f"name one of them")
        index = names.index(column)
        value_of: Callable[[Any], Any] = lambda cells: cells[index].strip() if index < len(cells) else None  # noqa: E731
    else:
        value_of = lambda record: record.get(column)  # noqa: E731
    values = []
    for number, record in records:
        if not table and not isinstance(record, dict):
            raise UserError(f"{path}:{number}: a {type(record).__name__}, not a record (a JSON object of named fields)")
        value = value_of(record)
        if value is None or str(value).strip() == "":
            raise UserError(f"{path}:{number}: no {column!r} value; splits.fold_by: {key} needs one in every record")
        values.append(str(value).strip())
    given = {split: _as_texts(spec[split]) for split in ("validation", "test") if split in spec}
    check_validation_given(card, "validation" in given)
    if given:
        split_of = _split_by_values(given, set(values), column, str(card.card_path))
    else:
        unknown = next(((number, value) for (number, _), value in zip(records, values) if value not in SPLITS), None)
        if unknown is not None:
            number, value = unknown
            as_split = "validation" if value.lower() in ("dev", "val", "valid", "validation") else "test"
            raise UserError(f"{path}:{number}: {column} is {value!r}, not a split name (train, validation, test); "
                            f"name the values that make each split, e.g. splits: {{fold_by: {key}, {as_split}: [{value}]}}")
        split_of = {value: value for value in SPLITS}
    parts: dict[str, list] = {split: [] for split in SPLITS}
    for record, value in zip(records, values):
        parts[split_of.get(value, "train")].append(record)
    if not parts["train"]:
        raise UserError(f"{card.card_path}: splits.fold_by: {key} leaves no record to train on: every {column} value "
                        f"is in test or validation")
    if table:
        parts = {split: [(0, header), *rows] for split, rows in parts.items()}
    return {split: rows for split, rows in parts.items() if len(rows) > (1 if table else 0)}


def _split_by_values(given: dict[str, list[str]], present: set[str], column: str, where: str) -> dict[str, str]:
    """{value: split} for the values `test:` and `validation:` name; each must be in the data."""
    for split, wanted in given.items():
        missing = sorted(set(wanted) - present)
        if missing:
            raise UserError(f"{where}: splits.{split} names {column} {missing[0]!r}, which no record has; the data "
                            f"has {sorted(present)}")
    both = sorted(set(given.get("test", [])) & set(given.get("validation", [])))
    if both:
        raise UserError(f"{where}: splits names {column} {both[0]!r} for both test and validation; a fold's test "
                        f"{column} must not also validate (leave `validation` out to hold validation out of the rest)")
    return {value: split for split, wanted in given.items() for value in wanted}


def _as_texts(value) -> list[str]:
    """`test: 5`, `test: Ses05` or `test: [1, 2]` -> the values as text."""
    return [str(v).strip() for v in (value if isinstance(value, list | tuple) else [value])]
