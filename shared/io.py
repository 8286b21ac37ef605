"""Atomic file writes, safetensors helpers and the YAML reading configs and cards share.

Every file peftlab writes goes to a temporary name in the same folder and is renamed
into place, so a crash never leaves a half-written file under the final name.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml
from peftlab.shared.errors import UserError
from safetensors.torch import load_file, save_file


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to `path`; rename it onto `path` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp makes the file owner-only; the final file gets the mode any new file
        # gets (0644 under the usual umask), so a run can be read by other users or a server.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def write_jsonl(path, rows) -> None:
    write_text(path, "".join(json.dumps(r, default=_json_default) + "\n" for r in rows))


def write_yaml(path, obj) -> None:
    write_text(path, yaml.safe_dump(obj, sort_keys=False))


class _YamlLoader(yaml.SafeLoader):
    """YAML as `safe_load` reads it, with YAML 1.2's numbers and booleans: `1e-3` is a
    number (PyYAML's YAML 1.1 wants `1.0e-3` and otherwise keeps the text), only
    true/false are booleans (YAML 1.1 also reads yes/no/on/off so, which turned
    `task.feature_cache=off` into False), and an integer is decimal whatever its leading
    zeros (YAML 1.1 read the fold `010` as octal 8 and `1:30` as 90); 0o17 and 0x1f
    are octal and hexadecimal."""

    def construct_yaml_int(self, node):
        text = self.construct_scalar(node).replace("_", "")
        sign, digits = (-1, text[1:]) if text.startswith("-") else (1, text.lstrip("+"))
        base = {"0o": 8, "0x": 16}.get(digits[:2].lower(), 10)
        return sign * int(digits[2:] if base != 10 else digits, base)


_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:int")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?[0-9][0-9_]*|0o[0-7]+|0x[0-9a-fA-F]+)$"), list("-+0123456789"))
_YamlLoader.add_constructor("tag:yaml.org,2002:int", _YamlLoader.construct_yaml_int)
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def yaml_text(value) -> str:
    """A value as YAML writes it inline (`true`, `null`, `1.5`, `{a: 1}`): how a message
    quotes what a card or config says."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def load_yaml(text: str):
    """Parse YAML text (configs, overrides, card headers); raises yaml.YAMLError."""
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass


_COMPRESSED = (  # (suffix, leading bytes, what the file is and how to open it)
    (".gz", b"\x1f\x8b", "gzip-compressed: decompress it (gunzip)"),
    (".zip", b"PK\x03\x04", "a zip archive: unzip it"),
    (".bz2", b"BZh", "bzip2-compressed: decompress it (bunzip2)"),
    (".xz", b"\xfd7zXZ", "xz-compressed: decompress it (unxz)"),
    (".zst", b"\x28\xb5\x2f\xfd", "zstd-compressed: decompress it (unzstd)"),
)


def compressed_by_suffix(path) -> str | None:
    """What a file named as compressed is and how to open it (None for other names): for
    inputs whose format is not known yet (`peftlab predict`), where leading bytes cannot
    tell, as an `.npz` or `.pt` is a zip file too."""
    suffix = Path(path).suffix.lower()
    return next((what for known, _, what in _COMPRESSED if suffix == known), None)


def not_utf8(path, error: UnicodeDecodeError, fix: str) -> UserError:
    """The error for a text file that is not UTF-8: a compressed file says so (its bytes
    are not text in any encoding), anything else gets `fix`."""
    with open(path, "rb") as handle:
        start = handle.read(6)
    compressed = next((what for _, magic, what in _COMPRESSED if start.startswith(magic)), None)
    if compressed:
        return UserError(f"{path}: {compressed}, then pass the text file")
    return UserError(f"{path}: not UTF-8 text (byte {error.start}); {fix}")


class RepeatedKey(ValueError):
    """An object in a user's JSON that names one key twice."""

    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _refuse_repeated_keys(pairs: list) -> dict:
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise RepeatedKey(key)
        seen[key] = value
    return seen


def user_json(text: str, where) -> object:
    """`json.loads` for a user's data: an object that names a key twice is a UserError at
    `where` (json keeps the last value silently, so `{"label": 1, "label": 0}` would read
    as 0). JSON syntax errors stay JSONDecodeError, for the caller to word."""
    try:
        return json.loads(text, object_pairs_hook=_refuse_repeated_keys)
    except RepeatedKey as error:
        raise UserError(f"{where}: an object names the key {error.key!r} twice; keep the one meant") from None


def read_json(path):
    """A JSON file peftlab wrote; a damaged one (truncated, edited, not UTF-8) is a UserError naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as error:
        raise UserError(f"{path}: not valid JSON ({error.msg}, line {error.lineno} column {error.colno}); "
                        f"the file is damaged") from None
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: not UTF-8 text (byte {error.start}); the file is damaged") from None


def read_jsonl(path) -> list:
    """A JSON-lines file peftlab wrote; a damaged line is a UserError naming file and line."""
    rows = []
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: not UTF-8 text (byte {error.start}); the file is damaged") from None
    for number, line in enumerate(lines, start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise UserError(f"{path}:{number}: not valid JSON ({error.msg}); the file is damaged") from None
    return rows


def _json_default(value):
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def save_tensors(path, tensors: Mapping[str, torch.Tensor], metadata: dict | None = None) -> None:
    # safetensors refuses shared or non-contiguous storage; clone makes each tensor its own.
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(plain, str(tmp), metadata=metadata)


def load_tensors(path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def tensors_fingerprint(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
