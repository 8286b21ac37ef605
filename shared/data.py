"""Dataset plumbing every domain shares: splits, subsampling, length-bucketed batches."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Sequence

import numpy as np
from peftlab.shared import io
from peftlab.shared.errors import UserError
from peftlab.shared.tasks import Example
from torch.utils.data import Sampler

SPLITS = ("train", "validation", "test")


def table_rows(path, delimiter: str = ",") -> list[tuple[int, list[str]]]:
    """Non-blank rows of a CSV/TSV with their line numbers, so readers can name the line
    of a bad cell; encoding and quoting problems name the file."""
    kind = "TSV" if delimiter == "\t" else "CSV"
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            rows = [(number, cells) for number, cells in enumerate(csv.reader(handle, delimiter=delimiter), start=1)
                    if any(cell.strip() for cell in cells)]
    except UnicodeDecodeError as error:
        raise io.not_utf8(path, error, "save it as UTF-8") from None
    except csv.Error as error:
        raise UserError(f"{path}: malformed {kind} ({error})") from None
    if delimiter == "," and rows and len(rows[0][1]) == 1:  # Excel in many locales saves CSV with ';'
        other = next((name for mark, name in ((";", "semicolons"), ("\t", "tabs")) if mark in rows[0][1][0]), None)
        if other:
            raise UserError(f"{path}:{rows[0][0]}: the header {rows[0][1][0]!r} is one column: the file is separated "
                            f"by {other}; save it with commas")
    return rows


def header_column(header: list[str], name: str, path) -> int | None:
    """The position of column `name` in a table's header row, None where it has none. A
    name the header gives twice is refused: which of the two columns is meant is a guess."""
    positions = [index for index, cell in enumerate(header) if cell == name]
    if len(positions) > 1:
        raise UserError(f"{path}: the header row names column {name!r} {len(positions)} times (columns "
                        f"{', '.join(str(p + 1) for p in positions)}); rename all but one")
    return positions[0] if positions else None


def files_in_folder(folder, list_files: Callable, kind: str, suffixes: Sequence[str]) -> list:
    """The files `list_files` finds in a folder given to `peftlab predict`, or an error
    naming the folder and what it looked for: an empty folder predicts nothing, silently."""
    found = list_files(folder)
    if not found:
        raise UserError(f"{folder}: no {kind} ({', '.join(suffixes)}) in this folder")
    return found


LABEL_FIX = "fix the cell or the card's `labels`"


def parse_label(value: str, labels: list[str] | None, where: str, fix: str = LABEL_FIX) -> int:
    """A label cell -> class index: a label name from the card, or its index (0, 1, 1.0).
    `fix`: what the error for a cell that is neither asks for."""
    value = value.strip()
    if labels and value in labels:
        return labels.index(value)
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):  # not a number at all, or NaN / inf
        known = f"one of {labels} or an index" if labels else "a class index (or set the card's `labels`)"
        raise UserError(f"{where}: label {value!r} is not {known}; {fix}")
    if number != int(number) or number < 0 or (labels and int(number) >= len(labels)):
        raise UserError(f"{where}: label {value!r} is out of range for labels {labels}")
    return int(number)


def label_cell(value: str, labels: list[str] | None, where: str, fix: str = LABEL_FIX) -> int | str:
    """A label cell -> class index; without the card's `labels`, a cell that is not an
    index keeps its name, and `number_classes` numbers the classes once all are read."""
    value = value.strip()
    if labels is None:
        try:
            number = float(value)
        except ValueError:
            return value
        if not math.isfinite(number) or number != int(number):
            return value
    return parse_label(value, labels, where, fix)


def strata(examples: Sequence[Example]) -> dict[int, list[int]]:
    """Example indices by class, in class order: single-label class indices are strata;
    generated targets (text) and multi-label examples are one stratum, -1."""
    by_class: dict[int, list[int]] = {}
    for index, example in enumerate(examples):
        label = example.get("label")
        single = isinstance(label, int | np.integer) and "targets" not in example
        by_class.setdefault(int(label) if single else -1, []).append(index)
    return dict(sorted(by_class.items()))


def number_classes(splits: dict[str, list[Example]], notes: list[str], where: str) -> list[str]:
    """Labels for data read without the card's `labels`: class indices 0..K-1 as they are;
    codes that do not run from 0 without a gap (1..K, say), and label cells' names, are the
    classes' names, in numeric or sorted order, each example renumbered (a note says so:
    the order is a guess). Read as indices, code 1..K would make a class 0 with no examples."""
    values = {e["label"] for split in splits.values() for e in split}
    names = [v for v in values if isinstance(v, str)]
    if names and len(names) < len(values):
        raise UserError(f"{where}: the label column mixes class names and indices; name the classes in `labels`")
    if not names and values == set(range(len(values))):
        return [str(i) for i in range(len(values))]
    ordered = sorted(values)
    position = {value: index for index, value in enumerate(ordered)}
    for split in splits.values():
        for example in split:
            example["label"] = position[example["label"]]
    labels = [str(value) for value in ordered]
    what = "names, sorted" if names else f"codes, which do not run 0..{len(labels) - 1}: class i is the i-th code"
    notes.append(f"labels {labels} are the label column's {what}; set the card's `labels` to choose their order")
    return labels


def validation_fraction(card) -> float:
    """The card's `splits.validation_fraction` (default 0.1): the share of train held out
    for checkpoint selection where the data has no validation split."""
    fraction = (card.splits or {}).get("validation_fraction", 0.1)
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 <= fraction < 1:
        raise UserError(f"{card.card_path}: splits.validation_fraction must be a number in [0, 1), got {fraction!r}")
    return float(fraction)


def split_ratios(card, what: str, comes_split: str = "per-split files") -> dict[str, float]:
    """The card's `splits.ratios` (default 80/10/10) for data that comes unsplit. A
    `validation_fraction` beside them would be ignored (the ratios give validation its
    share), so it is refused; `comes_split` says how this task's data can come split,
    where the fraction does apply."""
    spec = card.splits or {}
    if "validation_fraction" in spec:
        raise UserError(f"{card.card_path}: splits.validation_fraction holds validation out of train where the data "
                        f"comes split ({comes_split}); here splits.ratios divide the {what}: give validation its "
                        f"ratio there (e.g. ratios: {{train: 0.8, validation: 0.1, test: 0.1}}) and remove "
                        f"validation_fraction")
    return spec.get("ratios", {"train": 0.8, "validation": 0.1, "test": 0.1})


def check_validation_given(card, gives_validation: bool) -> None:
    """A `validation_fraction` where the data gives its own validation split would be
    ignored: refused."""
    if gives_validation and "validation_fraction" in (card.splits or {}):
        raise UserError(f"{card.card_path}: splits.validation_fraction holds validation out of train, but the data "
                        f"gives a validation split; remove validation_fraction")


def hold_out_validation(splits: dict[str, list[Example]], card, what: str,
                        group_of: Callable[[Example], object] | None = None) -> tuple[dict[str, list[Example]], str | None]:
    """Where the data comes with train and test but no validation split, hold out
    `splits.validation_fraction` (default 0.1) of train for checkpoint selection, drawn
    with `splits.seed`: stratified by class for single-label data, or with `group_of`
    whole groups (e.g. every caption of one video). Test is never touched. Returns the
    splits and a note saying what was held out (None if nothing)."""
    check_validation_given(card, "validation" in splits)
    if "validation" in splits or "train" not in splits:
        return splits, None
    spec = card.splits or {}
    fraction = validation_fraction(card)
    if fraction == 0:
        return splits, None
    train = splits["train"]
    rng = np.random.default_rng(int(spec.get("seed", 0)))
    if group_of is not None:
        groups: dict[object, list[int]] = {}
        for index, example in enumerate(train):
            groups.setdefault(group_of(example), []).append(index)
        keys = list(groups)
        picked = rng.choice(len(keys), size=int(round(fraction * len(keys))), replace=False)
        chosen = {index for k in picked.tolist() for index in groups[keys[k]]}
    else:
        chosen = set()
        for members in strata(train).values():
            chosen |= set(rng.choice(members, size=int(round(fraction * len(members))), replace=False).tolist())
    held = {**splits, "train": [e for i, e in enumerate(train) if i not in chosen],
            "validation": [e for i, e in enumerate(train) if i in chosen]}
    what = what if len(chosen) != 1 else re.sub(r"^(\w+?)s\b", r"\1", what)  # "1 training image"
    return held, (f"validation: {len(chosen)} training {what} held out "
                  f"(splits.validation_fraction={fraction}, seed {int(spec.get('seed', 0))}); "
                  f"{'test is untouched' if 'test' in splits else 'the data has no test split'}")


UNKNOWN_GROUP = "(none: "
"""How a group value (patient, speaker) starts where its cell is empty: `(none: FILE:LINE)`."""


def group_cell(value: str, where: str) -> str:
    """A patient or speaker cell, stripped; an empty one is a group of its own, named by
    its row. Pooled as one group "", every record without one would move between splits
    together, skewing them."""
    return value.strip() or f"{UNKNOWN_GROUP}{where})"


def is_unknown_group(value) -> bool:
    """Whether a group value is `group_cell`'s stand-in for an empty cell."""
    return str(value).startswith(UNKNOWN_GROUP)


def unknown_groups_note(examples: Sequence[Example], key: str, items: str) -> str | None:
    """A note where some records' `key` cell (patient, speaker) was empty."""
    unknown = [str(e[key]) for e in examples if key in e and is_unknown_group(e[key])]
    if not unknown:
        return None
    return (f"{len(unknown)} {items} have an empty {key} cell (e.g. {unknown[0][len(UNKNOWN_GROUP):-1]}): each is "
            f"split as a {key} of its own, so if some are one {key}'s, they may be in train and test")


def in_several_splits(splits: dict[str, list[Example]], key: str) -> list[str]:
    """The values of `key` (a speaker, patient or video) that examples of more than one
    split hold, sorted: where given splits leak one across train and test."""
    splits_of: dict[str, set[str]] = {}
    for split, examples in splits.items():
        for example in examples:
            if key in example:
                splits_of.setdefault(str(example[key]), set()).add(split)
    return sorted(value for value, names in splits_of.items() if len(names) > 1)


def in_several_splits_note(splits: dict[str, list[Example]], key: str, noun: str, items: str) -> str | None:
    """A note where given splits (files, or a fold column) put one `key` (a patient, a
    video) in more than one split, so that a model is tested on what it trained on."""
    shared = in_several_splits(splits, key)
    if not shared:
        return None
    who = f"1 {noun} has" if len(shared) == 1 else f"{len(shared)} {noun}s have"
    return (f"{who} {items} in more than one split (e.g. {', '.join(shared[:3])}): results on them are not on "
            f"unseen {noun}s")


def check_ratios(ratios, where: str) -> None:
    """UserError unless `ratios` maps split names to non-negative numbers summing to 1."""
    if not isinstance(ratios, dict):
        raise UserError(f"{where}: splits.ratios must be a mapping like {{train: 0.8, validation: 0.1, test: 0.1}}")
    unknown = sorted(set(ratios) - set(SPLITS))
    if unknown:
        raise UserError(f"{where}: splits.ratios names {unknown[0]!r}; use train, validation, test")
    if any(isinstance(v, bool) or not isinstance(v, int | float) for v in ratios.values()):
        raise UserError(f"{where}: splits.ratios must give a number per split, got {ratios}")
    total = sum(ratios.values())
    if not 0.99 <= total <= 1.01 or any(v < 0 for v in ratios.values()):
        raise UserError(f"{where}: splits.ratios must be non-negative and sum to 1, got {ratios}")


def ratio_split(
    examples: Sequence[Example],
    ratios: dict[str, float],
    seed: int,
    group_of: Callable[[Example], object] | None = None,
    where: str = "card",
) -> dict[str, list[Example]]:
    """Random split by ratios, each class in proportion (to within one example); with
    `group_of`, whole groups go to one split. A split of ratio 0 is left out, so that
    `{test: 1.0}` makes a card of test data only."""
    check_ratios(ratios, where)
    rng = np.random.default_rng(seed)
    names = list(ratios)
    bounds = np.cumsum([ratios[n] for n in names])
    if group_of is None:
        order = _classes_spread(examples, rng)
        cut = np.round(bounds * len(examples)).astype(int)
        starts = np.concatenate([[0], cut[:-1]])
        return {n: [examples[i] for i in order[s:e]] for n, s, e in zip(names, starts, cut) if ratios[n] > 0}
    return _group_split(examples, names, ratios, bounds, rng, group_of)


def _group_split(examples, names, ratios, bounds, rng, group_of) -> dict[str, list[Example]]:
    """Whole groups in a random order, each to the split whose share of the examples holds
    the group's middle example, so split sizes follow the ratios in examples (to within a
    group); a split of ratio above 0 left empty then takes the smallest group of the split
    with the most groups, as long as that split keeps one."""
    members: dict[str, list[int]] = {}
    for index, example in enumerate(examples):
        members.setdefault(str(group_of(example)), []).append(index)
    names_sorted = sorted(members)
    groups = [names_sorted[k] for k in rng.permutation(len(names_sorted))]
    sizes = np.array([len(members[g]) for g in groups], dtype=float)
    middles = (np.cumsum(sizes) - sizes / 2) / max(len(examples), 1)
    last = max(i for i, n in enumerate(names) if ratios[n] > 0)  # ratios may sum to 0.99: the end goes there
    groups_of: dict[str, list[str]] = {n: [] for n in names if ratios[n] > 0}
    for group, middle in zip(groups, middles):
        groups_of[names[min(int(np.searchsorted(bounds, middle, side="right")), last)]].append(group)
    for name in [n for n, chosen in groups_of.items() if not chosen]:
        donor = max(groups_of, key=lambda n: len(groups_of[n]))
        if len(groups_of[donor]) > 1:
            smallest = min(groups_of[donor], key=lambda g: len(members[g]))
            groups_of[donor].remove(smallest)
            groups_of[name].append(smallest)
    return {name: [examples[i] for i in sorted(i for g in chosen for i in members[g])] for name, chosen in groups_of.items()}


def _classes_spread(examples: Sequence[Example], rng: np.random.Generator) -> np.ndarray:
    """A random order of the examples in which each class's examples sit evenly spaced
    (shuffled within the class, at a random phase), so that any contiguous cut of it
    holds every class in proportion. Data without classes gets a plain permutation."""
    position = np.empty(len(examples))
    for members in strata(examples).values():
        shuffled = np.asarray(members)[rng.permutation(len(members))]
        position[shuffled] = (np.arange(len(members)) + rng.random()) / len(members)
    return np.argsort(position, kind="stable")


def fingerprint(splits: dict[str, list[Example]]) -> str:
    """A digest of the examples as read (every field, arrays by their bytes), so that a
    sweep resumed on data that has changed since can tell."""
    digest = hashlib.sha256()
    for split in sorted(splits):
        digest.update(split.encode())
        for example in splits[split]:
            digest.update(json.dumps(example, sort_keys=True, default=_digestible).encode())
    return digest.hexdigest()


def _digestible(value) -> str:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, bytes | bytearray):
        return hashlib.sha256(value).hexdigest()
    if isinstance(value, set | frozenset):
        return json.dumps(sorted(map(str, value)))
    if hasattr(value, "__array__") or hasattr(value, "numpy"):  # numpy, torch, PIL images
        array = np.ascontiguousarray(value.numpy() if hasattr(value, "numpy") else np.asarray(value))
        return f"{array.dtype}{array.shape}:{hashlib.sha256(array.tobytes()).hexdigest()}"
    return type(value).__name__  # anything else: its kind, never its (address-bearing) repr


def count_by_split(splits: dict[str, list[Example]], holds: Callable[[Example], bool]) -> tuple[int, str]:
    """How many examples `holds` is true of: the total, and by split ("train 8, test 4"),
    so a note read at evaluation says how many of them the evaluated split has."""
    counts = {split: sum(1 for e in examples if holds(e)) for split, examples in splits.items()}
    return sum(counts.values()), ", ".join(f"{split} {n}" for split, n in counts.items() if n)


def subsample(examples: list[Example], limit: int | None, seed: int) -> list[Example]:
    """`limit` examples (all, where there are no more), in class proportions where there
    are classes (seeded)."""
    if limit is None or len(examples) <= limit:
        return examples
    rng = np.random.default_rng(seed)
    groups = list(strata(examples).values())
    exact = np.array([limit * len(members) / len(examples) for members in groups])
    shares = np.floor(exact).astype(int)
    # the seats rounding down leaves go to the largest remainders, so exactly `limit` are kept
    shares[np.argsort(shares - exact, kind="stable")[:limit - shares.sum()]] += 1
    chosen: list[int] = []
    for members, share in zip(groups, shares):
        chosen += rng.choice(members, size=int(share), replace=False).tolist()
    chosen = sorted(chosen)
    return [examples[i] for i in chosen]


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of similar length, in a seeded random order that changes each epoch.

    Indices are shuffled, cut into pools of `batch_size * pool_factor`, sorted by
    length inside each pool, batched, and the batches shuffled: little padding and no
    fixed length order. The order is a pure function of (seed, epoch), so a resumed run
    sees exactly the batches an uninterrupted one would. A pool that would end in a
    batch of one ends in batches of `batch_size - 1` and 2.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, shuffle: bool = True, pool_factor: int = 50):
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.pool = batch_size * pool_factor
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        if not self.shuffle:
            # evaluation: longest first, so the peak-memory batch comes at once
            order = np.argsort(-self.lengths, kind="stable")
            return [order[i:i + self.batch_size].tolist() for i in range(0, len(order), self.batch_size)]
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.lengths))
        batches = []
        starts = list(range(0, len(order), self.pool))
        if len(order) % self.pool == 1 and len(starts) > 1:
            starts.pop()  # a last pool of one joins the one before
        for start, end in zip(starts, starts[1:] + [len(order)]):
            pool = order[start:end]
            pool = pool[np.argsort(self.lengths[pool], kind="stable")].tolist()
            cuts = list(range(0, len(pool), self.batch_size))
            if len(pool) % self.batch_size == 1 and len(cuts) > 1:
                cuts[-1] -= 1  # no training batch of one: batch norm cannot train on it (B-1 and 2 instead)
            batches += [pool[first:last] for first, last in zip(cuts, cuts[1:] + [len(pool)])]
        rng.shuffle(batches)
        return batches

    def __iter__(self):
        return iter(self.batches())

    def __len__(self) -> int:
        return (len(self.lengths) + self.batch_size - 1) // self.batch_size
