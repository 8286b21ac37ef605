"""The method registry: name -> options dataclass + apply function.

Like peft's `register_peft_method` or timm's `@register_model`: one call registers a
method, duplicates fail at import, unknown names fail with the list of known ones.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from peftlab.shared.errors import UserError, did_you_mean
from torch import nn


@dataclass(frozen=True)
class MethodSpec:
    name: str
    options: type
    """A dataclass; each field carries `metadata={"help": ...}`."""
    apply: Callable[[nn.Module, Any], Any]
    """(model, options) -> `Applied`: the (possibly wrapped) model and its method parameters."""
    description: str
    mergeable: bool
    """`merge()` folds the method into plain weights with the same outputs."""
    identity_at_init: bool
    """The adapted model's output equals the base model's before any training."""
    merge: Callable[[nn.Module, Any, Any], nn.Module] | None = None
    peft_backed: bool = False
    applies_to: Callable[[nn.Module], bool] | None = None
    """For methods of one architecture (e.g. visual prompts need a ViT): which models
    they fit. None means any `nn.Module`."""

    def fits(self, model: nn.Module) -> bool:
        return self.applies_to is None or bool(self.applies_to(model))


@dataclass
class Applied:
    model: nn.Module
    parameter_names: list[str]
    """Names (relative to `model`) of the parameters the method trains."""
    state: Any = None
    """Whatever the method needs later to merge (e.g. hook handles)."""
    buffer_names: list[str] = field(default_factory=list)
    """Buffers (relative to `model`) the method fills while training, e.g. a memory
    bank: saved and restored with the adapter like its parameters."""


_METHODS: dict[str, MethodSpec] = {}


def register_method(
    name: str,
    options: type,
    apply: Callable,
    *,
    description: str,
    mergeable: bool,
    identity_at_init: bool,
    merge: Callable | None = None,
    peft_backed: bool = False,
    applies_to: Callable[[nn.Module], bool] | None = None,
) -> MethodSpec:
    if name in _METHODS:
        raise ValueError(f"PEFT method {name!r} is registered twice")
    if not dataclasses.is_dataclass(options):
        raise TypeError(f"options of method {name!r} must be a dataclass")
    spec = MethodSpec(name, options, apply, description, mergeable, identity_at_init, merge, peft_backed, applies_to)
    _METHODS[name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    _load_methods()
    if name not in _METHODS:
        raise UserError(f"unknown PEFT method {name!r}{did_you_mean(name, _METHODS)}")
    return _METHODS[name]


def list_methods() -> list[str]:
    _load_methods()
    return sorted(_METHODS)


def build_options(spec: MethodSpec, options: dict[str, Any]):
    """Options dict -> the method's dataclass, naming any unknown or mistyped field."""
    fields = {f.name: f for f in dataclasses.fields(spec.options)}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise UserError(
            f"method {spec.name!r} has no option {unknown[0]!r}; "
            f"valid options: {', '.join(sorted(fields))}"
        )
    check_option_types(spec.options, options, f"method {spec.name!r}", "method")
    try:
        return spec.options(**options)
    except (TypeError, ValueError) as error:
        raise UserError(f"method {spec.name!r}: {error}") from None


_PLAIN_TYPES = {int: "a whole number", float: "a number", bool: "true or false", str: "a string"}
"""Option types checked up front: a wrong one otherwise surfaced deep inside the method
or task (a float rank as torch's TypeError, a string rate as a failed `<` against an int)."""


def check_option_types(options_class, options: dict[str, Any], owner: str, section: str) -> None:
    """UserError naming the first option whose value is not of its field's plain type
    (int, float, bool, str; `None` too where the field is optional). Other types (lists,
    mappings) are left to the dataclass."""
    hints = typing.get_type_hints(options_class)
    for key, value in options.items():
        expected, optional = _plain_type(hints.get(key))
        if expected is None or (value is None and optional) or _is_instance(value, expected):
            continue
        allowed = f"{_PLAIN_TYPES[expected]}{' or null' if optional else ''}"
        raise UserError(f"{owner}: option {key!r} must be {allowed}, got {value!r} ({section}.{key}=...)")


def _plain_type(hint) -> tuple[type | None, bool]:
    """(the plain type a hint asks for, whether None is allowed), or (None, _) for others."""
    if hint in _PLAIN_TYPES:
        return hint, False
    members = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else ()
    plain = [m for m in members if m is not type(None)]
    if len(plain) == 1 and len(members) == 2 and plain[0] in _PLAIN_TYPES:
        return plain[0], True
    return None, False


def _is_instance(value, expected: type) -> bool:
    if isinstance(value, bool) and expected is not bool:
        return False
    return isinstance(value, int | float) if expected is float else isinstance(value, expected)


def options_help(spec: MethodSpec) -> list[tuple[str, Any, str]]:
    """(field, default, help) for each option, for `peftlab list methods`."""
    rows = []
    for option in dataclasses.fields(spec.options):
        default = option.default if option.default is not dataclasses.MISSING else None
        if option.default_factory is not dataclasses.MISSING:
            default = option.default_factory()
        rows.append((option.name, default, option.metadata.get("help", "")))
    return rows


def _load_methods() -> None:
    # The built-in methods register themselves on import; a domain's methods (visual
    # prompts, Point-PEFT, ...) when its package is imported.
    from peftlab.shared.methods import builtin  # noqa: F401
    from peftlab.shared.tasks import load_domains

    load_domains()
