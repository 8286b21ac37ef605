"""Data cards: Markdown with a YAML header (the Hugging Face dataset-card convention).

A card says what a dataset is (name, domain, task, format, files, fields, labels,
splits, licence, source) so a supported format plugs in with no code. Paths are
relative to the card unless absolute; `${VAR}` expands from the environment. A run keeps
a copy of its card (RUN/card.md) that is read with the original card's folder as the
base of its relative paths, so the copy reads the same files as training did.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any

import yaml
from peftlab.shared import io
from peftlab.shared.errors import UserError
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

CORE_KEYS = (
    "name", "domain", "task", "format", "path", "files", "fields", "labels", "splits",
    "metrics", "license", "source", "citation", "group_by", "loader", "description",
)


class Card(BaseModel):
    model_config = ConfigDict(extra="allow", arbitrary_types_allowed=True)

    name: str
    domain: str
    task: str
    format: str
    path: str | None = None
    files: dict[str, str] | None = None
    fields: dict[str, int | str] = {}
    labels: list[str] | None = None
    splits: dict[str, Any] | None = None
    metrics: list[str] | None = None
    license: str | None = None
    source: str | None = None
    citation: str | None = None
    group_by: str | None = None
    loader: str | None = None
    description: str | None = None

    # Set by `read_card`, not by the header.
    card_path: Path | None = None
    root: Path | None = None
    """The folder relative paths start from: the card's own, or for a run's copy of a
    card, the original's."""
    body: str = ""
    text: str = ""

    @field_validator("labels", mode="before")
    @classmethod
    def _label_names(cls, labels: Any) -> Any:
        """Classes named by whole numbers (`labels: [0, 1]`) are names as YAML wrote them;
        anything else that is no text says what `labels` holds."""
        if labels is None:
            return labels
        if not isinstance(labels, list):
            raise ValueError(f"labels is the list of class names in order (labels: [negative, positive]), got "
                             f"{io.yaml_text(labels)}")
        for label in labels:
            if not isinstance(label, str) and (isinstance(label, bool) or not isinstance(label, int)):
                written = io.yaml_text(label)  # as the card has it: true, null, 1.5
                raise ValueError(f"labels name the classes in order as text, got {written}: quote it "
                                 f"(labels: ['{written}', ...]) or leave `labels` out")
        return [str(label) for label in labels]

    @field_validator("splits")
    @classmethod
    def _split_seed(cls, splits: dict[str, Any] | None) -> dict[str, Any] | None:
        seed = (splits or {}).get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"splits.seed must be a whole number, got {seed!r}")
        return splits

    @property
    def extras(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    def option(self, key: str, default=None):
        return self.extras.get(key, default)

    def resolve(self, value: str, what: str = "path") -> Path:
        """Expand `${VAR}` and make relative paths relative to the card's folder."""
        expanded = expand_vars(value, f"{self.card_path}: {what}")
        path = Path(expanded).expanduser()
        if not path.is_absolute() and self.folder is not None:
            path = self.folder / path
        return path

    @property
    def folder(self) -> Path | None:
        return self.root or (self.card_path.parent if self.card_path is not None else None)

    def file(self, key: str) -> Path:
        """`files.<key>` resolved and checked to exist."""
        if not self.files or key not in self.files:
            raise UserError(f"{self.card_path}: field 'files.{key}' is missing; add `files: {{{key}: PATH}}`")
        path = self.resolve(self.files[key], f"files.{key}")
        if not path.exists():
            raise UserError(f"{self.card_path}: files.{key} = {path} does not exist; fix the path (relative paths start at {self.folder})")
        return path

    def data_exists(self, path: Path) -> bool:
        """Whether a data path names something to read: a file, or for a card's loader also
        a folder (a saved dataset, say)."""
        return path.exists() if self.loader else path.is_file()

    def split_files(self) -> dict[str, Path] | None:
        """`splits: {train: a.tsv, validation: b.tsv, test: c.tsv}` resolved and checked,
        or None when the card splits by ratios (or not at all)."""
        files = {k: v for k, v in (self.splits or {}).items() if k in ("train", "validation", "test")}
        resolved = {}
        for split, value in files.items():
            path = self.resolve(str(value), f"splits.{split}")
            if not self.data_exists(path):
                raise UserError(f"{self.card_path}: splits.{split} = {path} does not exist; fix the path")
            resolved[split] = path
        return resolved or None

    def check_split_keys(self, allowed, task_name: str) -> None:
        """A misspelt `splits:` key is an error: read as absent, it would fall back to a
        default split without a word."""
        unknown = sorted(set(self.splits or {}) - set(allowed))
        if unknown:
            close = difflib.get_close_matches(unknown[0], allowed, n=1)
            hint = f"did you mean splits.{close[0]}? " if close else ""
            raise UserError(f"{self.card_path}: splits.{unknown[0]} is not understood by {task_name}; "
                            f"{hint}its split keys: {', '.join(allowed)}")

    def check_field_keys(self, allowed, task_name: str) -> None:
        """A misspelt `fields:` key is an error: read as absent, the default column was
        looked for instead, and the error named the data file, not the card."""
        unknown = sorted(set(self.fields) - set(allowed))
        if unknown:
            reads = f"its fields: {', '.join(allowed)}" if allowed else "it reads no `fields`; remove the field"
            raise UserError(f"{self.card_path}: fields.{unknown[0]} is not a field {task_name} reads; {reads}")

    def check_keys(self, allowed_extra) -> None:
        unknown = sorted(set(self.extras) - set(allowed_extra))
        if unknown:
            valid = ", ".join(sorted(set(CORE_KEYS) | set(allowed_extra)))
            raise UserError(f"{self.card_path}: unknown field {unknown[0]!r}; valid fields: {valid}")


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_vars(value: str, where: str) -> str:
    def substitute(match):
        name = match.group(1)
        if name not in os.environ:
            raise UserError(f"{where}: environment variable {name} is not set; set it or write the path out")
        return os.environ[name]

    return _VAR.sub(substitute, value)


def card_text(path) -> str:
    """A card file's text as `read_card` reads it (a byte-order mark dropped), to compare a
    card with a run's copy of it; bytes that are not UTF-8 compare as replaced."""
    return Path(path).read_text(encoding="utf-8-sig", errors="replace")


def read_card(path, root=None) -> Card:
    """`root`: the folder relative paths start from, when not the card's own."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data card {path} does not exist; pass the path of a card (see `peftlab list cards`)")
    path = path.resolve()  # every message names the card as the checks after reading do
    try:
        text = path.read_text(encoding="utf-8-sig")  # Notepad saves a byte-order mark
    except UnicodeDecodeError as error:
        raise io.not_utf8(path, error, "save the card as UTF-8") from None
    header, body = _split_front_matter(text, path)
    try:
        data = io.load_yaml(header)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f" line {mark.line + 2}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise UserError(f"{path}:{line}: the YAML header does not parse ({problem}); fix the YAML") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: the YAML header must be a mapping of fields (name:, domain:, task:, ...)")
    try:
        card = Card(**data)
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        if first["type"] == "missing":
            raise UserError(f"{path}: required field {field!r} is missing; add `{field}:` to the header") from None
        raise UserError(f"{path}: field {field!r}: {first['msg'].removeprefix('Value error, ')}") from None
    if card.labels is not None:
        _check_labels(card.labels, path)
    card.card_path = path
    card.root = Path(root).resolve() if root is not None else None
    card.body = body.strip()
    card.text = text
    return card


def _check_labels(labels: list[str], path: Path) -> None:
    if not labels:
        raise UserError(f"{path}: `labels` is empty; name the classes in order, or remove the field")
    seen = set()
    for label in labels:
        if label in seen:
            raise UserError(f"{path}: `labels` names {label!r} twice; each class needs one distinct name")
        seen.add(label)


def _split_front_matter(text: str, path: Path) -> tuple[str, str]:
    lines = text.splitlines()
    if not lines or lines[0].strip() != "---":
        raise UserError(f"{path}:1: a data card starts with a '---' line, then the YAML header, then '---'")
    for index, line in enumerate(lines[1:], start=1):
        if line.strip() == "---":
            return "\n".join(lines[1:index]), "\n".join(lines[index + 1:])
    raise UserError(f"{path}: the YAML header has no closing '---' line")
