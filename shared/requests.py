"""JSON request bodies for `peftlab serve`: the checks every task's `parse_request` shares.

A task's natural input arrives as a JSON object whose fields hold either a list of
inputs (ids become "0", "1", ...) or an object {id: input}. Every mistake is a
UserError naming the field (the server answers it with 422), never a traceback.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from peftlab.shared.errors import UserError

MAX_ITEMS = 1024
"""Inputs in one request at most: a bound on what one request can cost."""


def only_fields(payload: dict, allowed: tuple[str, ...], where: str = "") -> None:
    """`where`: the path of a nested object (`inputs[0]`), which the error names."""
    unknown = sorted(set(payload) - set(allowed))
    if unknown:
        raise UserError(f"{where}{'.' if where else ''}{unknown[0]}: not a field of this request; use {', '.join(allowed)}")


def items(payload: dict, field: str, what: str) -> list[tuple[str, Any]]:
    """`payload[field]` as (id, value) pairs: a non-empty list or {id: value} object."""
    value = payload.get(field)
    if isinstance(value, list):
        pairs = [(str(i), v) for i, v in enumerate(value)]
    elif isinstance(value, dict):
        pairs = [(str(k), v) for k, v in value.items()]
    else:
        raise UserError(f"{field}: required, a list of {what} or an object {{id: {what}}}")
    if not pairs:
        raise UserError(f"{field}: empty; give at least one")
    if len(pairs) > MAX_ITEMS:
        raise UserError(f"{field}: {len(pairs)} inputs; send at most {MAX_ITEMS} per request")
    return pairs


def text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise UserError(f"{where}: expected a string, got {type(value).__name__}")
    return value


def base64_bytes(value: Any, where: str) -> bytes:
    """Standard base64 (a `data:...;base64,` prefix is allowed) -> bytes."""
    if not isinstance(value, str):
        raise UserError(f"{where}: expected a base64 string, got {type(value).__name__}")
    if value.startswith("data:") and "," in value:
        value = value.split(",", 1)[1]
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as error:
        raise UserError(f"{where}: not valid base64 ({error})") from None
    if not raw:
        raise UserError(f"{where}: empty after base64 decoding")
    return raw
