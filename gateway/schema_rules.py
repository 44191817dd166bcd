"""Kong's schema vocabulary, in Python: `Field` (types, `one_of`, `between`, `gt`, required
fields, record checks) and `check_value`, which returns one readable error per problem, each
with its path (`plugins[3].config.minute: expected a number, got 'lots'`).

The tables written in it are in `gateway.kong39`; `gateway.kong_schema` walks a kong.yml.

Kong's semantics kept here: `null` is accepted for any field that is not required; a string is
non-empty unless `len_min=0`; `integer` is a whole number; a boolean is never a number; unknown
fields are errors; a `set` has no duplicates.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# A record-level rule (Kong's `entity_checks`, `custom_validator`): the record -> a message.
RecordCheck = Callable[[Mapping[str, Any]], str | None]

TYPES = ("string", "integer", "number", "boolean", "array", "set", "record", "map", "any")


@dataclass(frozen=True)
class Field:
    """One field of a Kong schema, as Kong declares it (`type = "number", gt = 0`...)."""

    type: str
    required: bool = False
    one_of: tuple[Any, ...] = ()
    between: tuple[float, float] | None = None
    gt: float | None = None
    len_min: int | None = None
    match: str | None = None  # a Python regex a string must match (Kong's `match`/validators)
    match_hint: str = ""  # what the regex means, for the message
    elements: Field | None = None  # array, set
    fields: Mapping[str, Field] = field(default_factory=dict)  # record
    keys: Field | None = None  # map
    values: Field | None = None  # map
    checks: tuple[RecordCheck, ...] = ()  # record
    default: Any = None  # Kong's default, for the reader of the table only

    def __post_init__(self) -> None:
        if self.type not in TYPES:
            raise ValueError(f"unknown schema type {self.type!r}")


def record(checks: Sequence[RecordCheck] = (), /, **fields: Field) -> Field:
    return Field("record", fields=fields, checks=tuple(checks))


def strings(
    *, required: bool = False, set_: bool = False, default: Any = None, **element: Any
) -> Field:
    """An array (or a set) of strings; `element` constrains each string."""
    kind = "set" if set_ else "array"
    return Field(kind, required=required, default=default, elements=Field("string", **element))


def nonempty(value: Any) -> bool:
    """Kong's `is_nonempty`: null, an empty string and an empty array or map are empty."""
    return value is not None and value not in ("", [], {})


def quoted(names: Sequence[str]) -> str:
    return ", ".join(f"'{n}'" for n in names)


def at_least_one_of(*names: str, prefix: str = "") -> RecordCheck:
    """Kong's `at_least_one_of`: an empty string, array or map counts as unset (`prefix`, e.g.
    `config.`, goes before each name in the message, as Kong prints it)."""

    def check(value: Mapping[str, Any]) -> str | None:
        if not any(nonempty(value.get(n)) for n in names):
            shown = quoted([prefix + n for n in names])
            return f"at least one of these fields must be non-empty: {shown}"
        return None

    return check


def only_one_of(*names: str, prefix: str = "") -> RecordCheck:
    """Kong's `only_one_of`: at most one of the fields is non-empty."""

    def check(value: Mapping[str, Any]) -> str | None:
        if sum(nonempty(value.get(n)) for n in names) > 1:
            shown = quoted([prefix + n for n in names])
            return f"only one of these fields must be non-empty: {shown}"
        return None

    return check


def distinct(*names: str) -> RecordCheck:
    """Kong's `distinct`: the set fields have different values."""

    def check(value: Mapping[str, Any]) -> str | None:
        present = [value[n] for n in names if value.get(n) is not None]
        if len(present) != len(set(present)):
            return f"values of these fields must be distinct: {quoted(names)}"
        return None

    return check


def null_unless(name: str, *, on: str, one_of: tuple[str, ...], default: str) -> RecordCheck:
    """Kong's `conditional` with `then_match = { eq = null }`: `name` is only set when `on` is
    one of `one_of`."""

    def check(value: Mapping[str, Any]) -> str | None:
        current = value.get(on) or default
        if current not in one_of and value.get(name) is not None:
            allowed = " or ".join(f"'{p}'" for p in one_of)
            return f"{name} can only be set when {on} is {allowed}, not {current!r}"
        return None

    return check


def each(names: Sequence[str], problem: Callable[[str], str | None]) -> RecordCheck:
    """A Kong `custom_validator` on the string elements of this record's array fields."""

    def check(value: Mapping[str, Any]) -> str | None:
        for name in names:
            for i, item in enumerate(value.get(name) or []):
                message = problem(item) if isinstance(item, str) else None
                if message:
                    return f"{name}[{i}]: {message}"
        return None

    return check


def required_if(name: str, equals: Any, then: str) -> RecordCheck:
    def check(value: Mapping[str, Any]) -> str | None:
        if value.get(name) == equals and value.get(then) is None:
            return f"{then} is required when {name} is {equals!r}"
        return None

    return check


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_value(spec: Field, value: Any, path: str) -> list[str]:
    """The errors of `value` against `spec`, each prefixed by `path`."""
    if value is None:
        return [f"{path}: required field missing"] if spec.required else []
    kind = spec.type
    if kind == "any":
        return []
    if kind == "string" and not isinstance(value, str):
        return [f"{path}: expected a string, got {_show(value)}"]
    if kind == "boolean" and not isinstance(value, bool):
        return [f"{path}: expected a boolean, got {_show(value)}"]
    if kind == "number" and not _is_number(value):
        return [f"{path}: expected a number, got {_show(value)}"]
    if kind == "integer" and not (_is_number(value) and float(value).is_integer()):
        return [f"{path}: expected an integer, got {_show(value)}"]
    if kind in ("array", "set") and not isinstance(value, list):
        return [f"{path}: expected an array, got {_show(value)}"]
    if kind in ("record", "map") and not isinstance(value, dict):
        return [f"{path}: expected a record (a mapping), got {_show(value)}"]

    if spec.one_of and value not in spec.one_of:
        allowed = ", ".join(str(v) for v in spec.one_of)
        return [f"{path}: expected one of: {allowed}; got {_show(value)}"]
    if spec.between is not None and _is_number(value):
        low, high = spec.between
        if not low <= value <= high:
            return [f"{path}: value should be between {_num(low)} and {_num(high)}, got {value!r}"]
    if spec.gt is not None and _is_number(value) and not value > spec.gt:
        return [f"{path}: value must be greater than {_num(spec.gt)}, got {value!r}"]
    if kind == "string":
        len_min = 1 if spec.len_min is None else spec.len_min
        if len(value) < len_min:
            return [f"{path}: length must be at least {len_min}"]
        if spec.match is not None and not re.fullmatch(spec.match, value):
            return [f"{path}: {_show(value)} {spec.match_hint or 'has an invalid format'}"]

    if kind in ("array", "set"):
        problems: list[str] = []
        if spec.len_min is not None and len(value) < spec.len_min:
            problems.append(f"{path}: length must be at least {spec.len_min}")
        if kind == "set":
            seen: list[Any] = []
            for item in value:
                if item in seen:
                    problems.append(f"{path}: {_show(item)} appears twice in a set")
                seen.append(item)
        if spec.elements is not None:
            for i, item in enumerate(value):
                problems += check_value(spec.elements, item, f"{path}[{i}]")
        return problems
    if kind == "map":
        problems = []
        for key, item in value.items():
            if spec.keys is not None:
                problems += check_value(spec.keys, key, f"{path} key")
            if spec.values is not None:
                problems += check_value(spec.values, item, f"{path}.{key}")
        return problems
    if kind == "record":
        return check_record(spec, value, path)
    return []


def check_record(spec: Field, value: Mapping[str, Any], path: str) -> list[str]:
    problems: list[str] = []
    prefix = f"{path}." if path else ""
    for name in value:
        if name not in spec.fields:
            known = ", ".join(sorted(spec.fields))
            problems.append(f"{prefix}{name}: unknown field (known: {known})")
    for name, sub in spec.fields.items():
        problems += check_value(sub, value.get(name), f"{prefix}{name}")
    if not problems:  # as Kong does: the record's own rules once its fields are valid
        for rule in spec.checks:
            message = rule(value)
            if message:
                problems.append(f"{path or '(top level)'}: {message}")
    return problems
