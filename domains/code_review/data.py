"""Code-review data: CodeReviewer JSONL, Tufano-style TSV pairs, diff truncation, demo data.

CodeReviewer (Li et al. 2022) ships one JSON object per line:
- review necessity (quality estimation): `patch` (a unified-diff hunk) and `y` (1 = the
  hunk received a review comment, 0 = it did not);
- comment generation: `patch` and `msg` (the reviewer's comment);
- code refinement: `old` (code before the review), `comment`, `new` (code after); in
  CodeReviewer's files each line of `old` and `new` starts with a diff marker (+, -,
  space), which the reader takes off, as CodeReviewer's evaluation does.
A card's `fields` renames any of these (e.g. `fields: {patch: diff_hunk}`).

Tufano-style pairs (Tufano et al. 2021/2022, the second dataset LLaMA-Reviewer uses)
are read as a TSV with one example per line, `source<TAB>target`, no header: for
comment generation the source is the code and the target the comment; for refinement
the source is `<code>OLD</code><technical_language>COMMENT</technical_language>`
and the target the revised code (Tufano's code is one line of space-separated tokens).

Every reader error names the file and line.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
from peftlab.shared import io
from peftlab.shared.errors import MissingField, UserError

# ----------------------------------------------------------------------------- readers

# The record fields each task needs, and the CodeReviewer key each is read from.
TASK_FIELDS = {
    "necessity": {"patch": "patch", "label": "y"},
    "comment": {"patch": "patch", "label": "msg"},
    "refine": {"old": "old", "comment": "comment", "label": "new"},
}


# The fields holding the code under review: a record with one empty has nothing to review.
REVIEWED_FIELDS = ("patch", "old")


def text_lines(path: Path) -> list[str]:
    """The file's lines, split at \n (and \r\n) only: JSON strings and code may hold \x85,
    \u2028 or a form feed raw, which `str.splitlines` would also break at."""
    with open(path, encoding="utf-8-sig", newline="") as handle:
        return [line.removesuffix("\n").removesuffix("\r") for line in handle]


def read_jsonl(path: Path, kind: str, fields: dict, labelled: bool = True, notes: list[str] | None = None,
               records: list[tuple[int, dict]] | None = None, label_names: list[str] | None = None) -> list[dict]:
    """CodeReviewer JSONL -> examples with the task's fields (`label` = y, msg or new).
    Ids come from the records' `id` (else FILE:LINE). CodeReviewer's ids repeat (two
    projects' hunks share one): a repeated id gets `@LINE` so that each prediction line
    names one record, and `notes` (where given) says so. `records`: a card loader's
    records of the file, numbered, in place of its lines. `label_names`: the card's
    names of necessity labels 0 and 1, read as those labels."""
    keys = {**TASK_FIELDS[kind], **{k: v for k, v in fields.items() if k in TASK_FIELDS[kind] or k == "id"}}
    examples, line_numbers = [], []
    for number, record in json_records(path) if records is None else records:
        where = f"{path}:{number}"
        example = {"id": str(record.get(keys.get("id", "id"), f"{Path(path).name}:{number}"))}
        for name, key in keys.items():
            if name == "id" or (name == "label" and not labelled):
                continue
            if key not in record:
                raise MissingField(where, f"no field {key!r} (needed as `{name}`)", f"add it, or map it with the card's `fields: {{{name}: KEY}}`", field=name)
            value = record[key]
            example[name] = _necessity_label(value, where, key, label_names) if (name == "label" and kind == "necessity") \
                else _text(value, where, key)
            if name in REVIEWED_FIELDS and not example[name].strip():
                raise UserError(f"{where}: field {key!r} is empty; a record needs the code to review (drop the line or fill it)")
            if name == "label" and kind == "comment" and not example[name].strip():
                raise UserError(f"{where}: field {key!r} is empty; a record needs the review comment the model "
                                f"learns to write (drop the line or fill it)")
        examples.append(example)
        line_numbers.append(number)
    if not examples:
        raise UserError(f"{path}: no records (expected one JSON object per line)")
    if kind == "refine":
        unmarked = sum(_drop_diff_markers(example) for example in examples) if labelled else \
            drop_old_side_markers(examples)
        if unmarked and notes is not None:
            notes.append(f"{path.name}: the code of {unmarked} records carries CodeReviewer's per-line diff markers "
                         f"(+, -, space); they are taken off, as CodeReviewer's evaluation does")
    lines_of = {}
    for example, number in zip(examples, line_numbers):
        lines_of.setdefault(example["id"], []).append(number)
    repeated = {record_id: numbers for record_id, numbers in lines_of.items() if len(numbers) > 1}
    for example, number in zip(examples, line_numbers):
        if example["id"] in repeated:
            example["id"] = f"{example['id']}@{number}"
    if repeated and notes is not None:
        first, numbers = next(iter(repeated.items()))
        notes.append(f"{path.name}: several records share an id ({len(repeated)} such id{'s' * (len(repeated) != 1)}, e.g. "
                     f"{first!r} at lines {', '.join(map(str, numbers))}); those records are named ID@LINE")
    return examples


def json_records(path: Path) -> list[tuple[int, dict]]:
    """The JSON object on each non-blank line, with its line number."""
    try:
        lines = text_lines(path)
    except UnicodeDecodeError as error:
        raise io.not_utf8(path, error, "save it as UTF-8 JSON lines") from None
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = io.user_json(line, f"{path}:{number}")
        except json.JSONDecodeError as error:
            if not records and line.strip() == "[":  # a pretty-printed JSON array: one record over many lines
                raise UserError(f"{path}: a JSON array over several lines, not JSON lines; write each record as one "
                                f"JSON object on a line of its own") from None
            raise UserError(f"{path}:{number}: not a JSON object ({error.msg} at column {error.colno}); each line must "
                            f"be one JSON object") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}:{number}: a {type(record).__name__}, not a JSON object; each line must be one "
                            f"JSON object")
        records.append((number, record))
    return records


def _marked(code: str, change: str) -> bool:
    """Whether every non-empty line starts with `change` or a space, and some with `change`."""
    lines = [line for line in code.split("\n") if line]
    return any(line[0] == change for line in lines) and all(line[0] in (change, " ") for line in lines)


def diff_marked(old: str, new: str) -> bool:
    """CodeReviewer's refinement code: `old` lines marked - or space, `new` lines + or
    space, each with at least one change, and code left on both sides without them.
    Plain code that merely starts with a dash or a space is not taken for it."""
    return _marked(old, "-") and _marked(new, "+") and bool(_unmarked(old).strip()) and bool(_unmarked(new).strip())


def _unmarked(code: str) -> str:
    return "\n".join(line[1:] for line in code.split("\n"))


def _drop_diff_markers(example: dict) -> bool:
    """Refinement code with CodeReviewer's markers -> the code itself, as its evaluator
    compares it (`line[1:]`): the model writes code, and BLEU and exact match score code,
    not markers that every line of a prediction would match for free. It takes the
    `new` side to tell markers from code, so unlabelled records (predict) are read as given."""
    if not isinstance(example.get("label"), str) or not diff_marked(example["old"], example["label"]):
        return False
    example["old"], example["label"] = _unmarked(example["old"]), _unmarked(example["label"])
    return True


MARKERS_REMOVED = "markers_removed"
"""Set on unlabelled refinement inputs whose diff markers were taken off (for predict's note)."""


def drop_old_side_markers(examples: list[dict]) -> int:
    """Unlabelled refinement records (predict: no `new` side to check against) -> their
    code without CodeReviewer's markers, decided for the file as a whole: every line of
    every record starts with - or a space, and at least half the records remove a line.
    Indented plain code starts its lines with spaces but rarely with a dash at column 0,
    let alone in half its records. Kept, the markers would be input the model never saw."""
    removes_a_line = [_marked(example["old"], "-") for example in examples]
    every_line_marked = all(removes or _marked(example["old"], " ") for removes, example in zip(removes_a_line, examples))
    code_left = all(_unmarked(example["old"]).strip() for example in examples)
    if not (every_line_marked and code_left and 2 * sum(removes_a_line) >= len(examples)):
        return 0
    for example in examples:
        example["old"] = _unmarked(example["old"])
        example[MARKERS_REMOVED] = True
    return len(examples)


def _text(value, where: str, key: str) -> str:
    if not isinstance(value, str):
        kind = {int: "a number", float: "a number", bool: "true/false", list: "a list", dict: "an object",
                type(None): "null"}.get(type(value), type(value).__name__)
        raise UserError(f"{where}: field {key!r} is {kind}, expected a string")
    return value


def _necessity_label(value, where: str, key: str, names: list[str] | None = None) -> int:
    if isinstance(value, str):
        value = value.strip()  # " 1" and "needs_comment " too, as a table's label cells read
    if value in (0, 1, "0", "1", True, False):  # 1.0 too, as a table's label cell reads
        return int(value)
    if names and value in names:  # the card's `labels` name 0 then 1, and the CSV tasks read such names
        return names.index(value)
    named = f", or the card's `labels` {names[1]!r} (1) and {names[0]!r} (0)" if names else ""
    raise UserError(f"{where}: field {key!r} is {value!r}; review necessity labels are 1 (needs a comment) or 0{named}")


_TUFANO_REFINE = re.compile(r"\s*<code>(?P<old>.*)</code>\s*<technical_language>(?P<comment>.*)</technical_language>\s*", re.S)


def read_tufano_tsv(path: Path, kind: str, labelled: bool = True) -> list[dict]:
    """`source<TAB>target` per line (see the module docstring for each task's source)."""
    if kind == "necessity":
        raise UserError(f"{path}: Tufano pairs have no review-necessity labels; use CodeReviewer JSONL (format: jsonl)")
    examples = []
    try:
        lines = text_lines(path)
    except UnicodeDecodeError as error:
        raise io.not_utf8(path, error, "save it as UTF-8") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        cells = line.split("\t")
        if len(cells) > 2 or (labelled and len(cells) != 2):
            raise UserError(f"{where}: expected 2 tab-separated columns (source, target), found {len(cells)}")
        example = {"id": f"{Path(path).name}:{number}"}
        if kind == "comment":
            if not cells[0].strip():
                raise UserError(f"{where}: the source (code to review) is empty; drop the line or fill it")
            example["patch"] = cells[0]
        else:
            match = _TUFANO_REFINE.fullmatch(cells[0])
            if not match:
                raise UserError(f"{where}: the source must read <code>OLD</code><technical_language>COMMENT</technical_language>")
            example["old"], example["comment"] = match["old"].strip(), match["comment"].strip()
        if labelled:
            if kind == "comment" and not cells[1].strip():
                raise UserError(f"{where}: the target (the reviewer's comment) is empty; drop the line or fill it")
            example["label"] = cells[1]
        examples.append(example)
    if not examples:
        raise UserError(f"{path}: no pairs")
    return examples


# ----------------------------------------------------------------------------- truncation


def is_hunk_header(line: str) -> bool:
    return line.startswith("@@")


def truncate_lines_middle_out(text: str, budget: int, count: Callable[[str], int]) -> tuple[str, int]:
    """Fit `text` into `budget` tokens by cutting whole lines from its middle outward.

    The start of a diff (where the change begins) and its end (where it settles) say
    most about it, so lines go from the middle first; hunk headers (`@@ -a,b +c,d @@`)
    always stay, so the model still sees where each hunk is. Each cut run becomes one
    `... (N lines cut) ...` line. Returns (text, lines cut). A single line longer than
    the whole budget is left for the caller's token-level cut.
    """
    lines = text.split("\n")
    costs = [count(line + "\n") for line in lines]
    total = sum(costs)
    if total <= budget:
        return text, 0
    middle = (len(lines) - 1) / 2
    order = sorted((i for i, line in enumerate(lines) if not is_hunk_header(line)), key=lambda i: (abs(i - middle), i))
    marker_cost = count("... (0000 lines cut) ...\n")
    removed: set[int] = set()
    runs = 0  # of consecutive cut lines, each one marker; kept as lines go (a recount is quadratic)
    for index in order:
        if total + max(runs, 1) * marker_cost <= budget:
            break
        runs += 1 - (index - 1 in removed) - (index + 1 in removed)
        removed.add(index)
        total -= costs[index]
    kept: list[str] = []
    for index, line in enumerate(lines):
        if index in removed:
            if index == 0 or index - 1 not in removed:
                run = 0
                while index + run in removed:
                    run += 1
                kept.append(f"... ({run} lines cut) ...")
            continue
        kept.append(line)
    return "\n".join(kept), len(removed)


# ----------------------------------------------------------------------------- demo data
# Small Python functions, each with one planted, learnable review issue, and the same
# function with the issue fixed. The fixed versions are the "no comment needed"
# hunks, so necessity depends on seeing the issue, not on the kind of code:
#   unused variable      `b = a * 2` never read        -> remove the line
#   missing None check   `return a.attr` after a lookup -> guard with `if a is None`
#   magic number         `return a * 7`                -> `return a * LIMIT`
# Comments are short (a tiny model learns to copy short prompts far sooner) and
# templated with the names involved, so a model must read the hunk to write them. Refinements need the code and the comment: the constant's name (SCALE,
# LIMIT, RATE or STEP) is the reviewer's choice, written only in the comment.

DEMO_NAMES = ("count", "total", "user", "item", "path", "size", "value", "token")
DEMO_FUNCTIONS = ("load", "fetch", "parse", "find")
DEMO_ATTRIBUTES = ("name", "size", "data")
DEMO_NUMBERS = (3, 7, 12, 42, 60, 100)
DEMO_CONSTANTS = ("SCALE", "LIMIT", "RATE", "STEP")
DEMO_ISSUES = ("unused_variable", "missing_none_check", "magic_number")


def demo_case(rng: np.random.Generator, issue: str) -> dict:
    """One function with `issue` planted: its code, the fixed code and the comment."""
    first, second = rng.choice(len(DEMO_NAMES), size=2, replace=False)
    a, b = DEMO_NAMES[first], DEMO_NAMES[second]
    function = DEMO_FUNCTIONS[int(rng.integers(len(DEMO_FUNCTIONS)))]
    attribute = DEMO_ATTRIBUTES[int(rng.integers(len(DEMO_ATTRIBUTES)))]
    number = DEMO_NUMBERS[int(rng.integers(len(DEMO_NUMBERS)))]
    constant = DEMO_CONSTANTS[int(rng.integers(len(DEMO_CONSTANTS)))]
    head = [f"def {function}_{a}(key):", f"    {a} = {function}(key)"]
    if issue == "unused_variable":
        old = [*head, f"    {b} = {a} * 2", f"    return {a}"]
        new = [*head, f"    return {a}"]
        comment = f"`{b}` is never used; remove it."
    elif issue == "missing_none_check":
        old = [*head, f"    return {a}.{attribute}"]
        new = [*head, f"    if {a} is None:", "        return None", f"    return {a}.{attribute}"]
        comment = f"`{a}` may be None; check it."
    elif issue == "magic_number":
        old = [*head, f"    return {a} * {number}"]
        new = [*head, f"    return {a} * {constant}"]
        comment = f"Name {number} as a constant, {constant}."
    else:
        raise ValueError(f"unknown demo issue {issue!r}")
    return {"issue": issue, "old": "\n".join(old), "new": "\n".join(new), "comment": comment}


def as_hunk(code: str, start: int) -> str:
    """The function as an added hunk of a unified diff."""
    lines = code.split("\n")
    return "\n".join([f"@@ -{start},0 +{start},{len(lines)} @@", *(f"+{line}" for line in lines)])


def demo_examples(kind: str, sizes: dict[str, int], seed: int) -> dict[str, list[dict]]:
    """Deterministic demo splits for task kind `necessity`, `comment` or `refine`."""
    splits = {}
    for offset, (split, count) in enumerate(sizes.items()):
        rng = np.random.default_rng([seed, offset])
        examples = []
        # necessity: exactly half of each split needs a comment, in a random order (a coin per
        # hunk put 127 of 200 test hunks on one side at seed 0)
        needs = rng.permutation(np.arange(count) % 2) if kind == "necessity" else None
        for index in range(count):
            case = demo_case(rng, DEMO_ISSUES[int(rng.integers(len(DEMO_ISSUES)))])
            start = int(rng.integers(1, 400))
            example_id = f"demo-{split}-{index}"
            if kind == "necessity":
                needs_comment = int(needs[index])
                code = case["old"] if needs_comment else case["new"]
                examples.append({"id": example_id, "patch": as_hunk(code, start), "label": needs_comment,
                                 "issue": case["issue"] if needs_comment else "none"})
            elif kind == "comment":
                examples.append({"id": example_id, "patch": as_hunk(case["old"], start), "label": case["comment"],
                                 "issue": case["issue"]})
            elif kind == "refine":
                examples.append({"id": example_id, "old": case["old"], "comment": case["comment"], "label": case["new"],
                                 "issue": case["issue"]})
            else:
                raise ValueError(f"unknown task kind {kind!r}")
        splits[split] = examples
    return splits
