"""Parameter schemas: what an agent's actions accept, and the check every command passes.

An agent describes each action it runs as an `ActionSpec`: a map of parameter name to
`Param`. A `ResourceSchema` gathers the actions of one resource. The same schema is used
twice: the agent checks and coerces every delivered command with it before a handler runs,
and the agent announces it to the broker (`to_wire()`), which rebuilds it (`from_wire()`)
and refuses at ADD time a command that cannot fit (`validate()` raising `SchemaError`,
answered as `invalid_command`). This module is pure: no IO, no clocks, no logging.

Types
-----
``str``, ``int``, ``float``, ``bool``, ``bytes`` (msgpack ``bin``), ``map`` (string keys;
either named ``fields`` each with its own spec, or one spec for all ``values``, or
anything), ``list`` (optionally one spec for all ``items``) and ``any``. Numbers may carry
``minimum``/``maximum``; ``str``, ``bytes``, ``list`` and ``map`` may carry
``min_length``/``max_length``.

Required, optional, default
---------------------------
A parameter is required unless it has a default or is declared ``required=False``. A
missing optional parameter takes its default (a fresh copy each time); without a default it
is left out, so the handler's own default applies. ``null`` given for an optional parameter
means "not given"; for a required one it is an error. Unknown parameters (and unknown keys
of a map with ``fields``) are errors unless the spec says ``extra=True``.

Coercion (what is accepted besides the exact type)
--------------------------------------------------
Values arrive from msgpack clients with their types intact, and from text mode, where
``key=value`` is parsed as JSON first and taken as a string otherwise. The rules follow
from what a person typing a line can produce:

- ``float`` accepts an ``int`` (``ratio=1`` is JSON for an int; 1 -> 1.0). It refuses
  NaN and infinities.
- ``str`` accepts an ``int`` and takes its decimal form: text mode turns ``image_name=2024``
  or ``id=7`` into an int, and the decimal form of an int is exact. A float (``1.50`` would
  become ``"1.5"``) and a bool (``true``) are refused: the person meant something else and
  must quote it (``name="1.50"``).
- ``int`` accepts only an int. A digit string is refused: text mode already makes
  ``image_size=50`` an int, so ``"50"`` only arrives when someone quoted it on purpose or a
  client sent the wrong type; guessing would hide the bug. A float, even ``50.0``, is
  refused too.
- ``bool`` accepts only a bool: text mode already turns ``true``/``false`` into bools, and
  0/1 or "yes" are ambiguous.
- A bool is never a number, although Python says it is.
- ``list`` accepts a tuple; ``bytes`` accepts a bytearray.

Agent-only extras
-----------------
``Map(..., into=f)`` calls ``f`` with the checked dict and hands the result to the handler;
``Dataclass(cls)`` derives a map spec from a dataclass and builds an instance (a
``ValueError`` raised by its ``__post_init__`` becomes a `SchemaError`). ``from_annotation``
and ``params_from_signature`` derive specs from type hints. None of this travels: the
broker sees only the plain structure.

Wire format (schema version 1)
------------------------------
``{"schema": 1, "actions": {name: {"parameters": {name: param}, "extra"?: bool,
"description"?: str}}}`` where a param is ``{"type": str, "required": bool, "default"?:
value, "description"?: str, "minimum"?: num, "maximum"?: num, "min_length"?: int,
"max_length"?: int, "fields"?: {name: param}, "extra"?: bool, "values"?: param, "items"?:
param}``. Every value is plain msgpack. `from_wire` refuses unknown keys, wrong types,
specs nested deeper than `MAX_DEPTH`, and anything msgpack (so the broker's log) cannot carry
anywhere in the schema (`unencodable`): maps and lists nested more than `MAX_NESTING` levels
in all (defaults included), a str holding a lone surrogate, an int outside msgpack's range.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final

from .errors import shown

WIRE_VERSION: Final = 1
#: How deep map/list specs may nest; bounds the work `from_wire` and `validate` can be made to do.
MAX_DEPTH: Final = 16
#: How deep maps and lists may nest in a value a client hands the broker (a request's args,
#: a schema with its defaults): generous for real parameters, and far below Python's
#: recursion limit, so copying, printing or packing such a value can never exhaust it.
MAX_NESTING: Final = 100
#: The ints msgpack can carry: int 64 down to -2^63, uint 64 up to 2^64-1.
INT_MIN: Final = -(1 << 63)
INT_MAX: Final = (1 << 64) - 1
#: Names of actions follow the protocol's rule for `resource` and `action`.
ACTION_NAME = re.compile(r"[A-Za-z0-9_.:@/-]{1,128}")
MAX_NAME_LENGTH: Final = 128


class SchemaError(ValueError):
    """A schema that cannot be built, or a value that does not fit it; `message` says why."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Kind(StrEnum):
    STR = "str"
    INT = "int"
    FLOAT = "float"
    BOOL = "bool"
    BYTES = "bytes"
    MAP = "map"
    LIST = "list"
    ANY = "any"


class _Missing:
    """The absence of a default (None is a valid default)."""

    _instance: _Missing | None = None

    def __new__(cls) -> _Missing:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "MISSING"

    def __deepcopy__(self, memo: dict[int, Any]) -> _Missing:
        return self


MISSING: Final = _Missing()

_NUMERIC = frozenset({Kind.INT, Kind.FLOAT})
_SIZED = frozenset({Kind.STR, Kind.BYTES, Kind.LIST, Kind.MAP})


@dataclass(frozen=True, slots=True)
class Param:
    """The spec of one parameter (or of one field, value or item inside a map or list)."""

    kind: Kind
    required: bool = True
    default: Any = MISSING
    description: str = ""
    minimum: int | float | None = None
    maximum: int | float | None = None
    min_length: int | None = None
    max_length: int | None = None
    #: map: the named fields, each with its own spec.
    fields: Mapping[str, Param] | None = None
    #: map with fields (or an action): keys not named are kept as they are instead of refused.
    extra: bool = False
    #: map without fields: the spec every value must fit.
    values: Param | None = None
    #: list: the spec every item must fit.
    items: Param | None = None
    #: agent-local, never on the wire: builds the handler's value from the checked map.
    into: Callable[[dict[str, Any]], Any] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        _check_param_shape(self)

    @property
    def has_default(self) -> bool:
        return self.default is not MISSING

    def default_value(self) -> Any:
        """A fresh copy of the default, so a handler mutating it changes nothing shared."""
        return copy.deepcopy(self.default)

    def check(self, value: Any, where: str) -> Any:
        """The value coerced to this spec, or `SchemaError` naming the path `where`
        (``vm.Images[0].Path``) and the problem."""
        if value is None:
            raise SchemaError(f"{_at(where)}: must not be null")
        checker = _CHECKERS[self.kind]
        return checker(self, value, where)

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"type": self.kind.value, "required": self.required}
        if self.has_default:
            wire["default"] = self.default
        if self.description:
            wire["description"] = self.description
        for key in ("minimum", "maximum", "min_length", "max_length"):
            bound = getattr(self, key)
            if bound is not None:
                wire[key] = bound
        if self.fields is not None:
            wire["fields"] = {name: spec.to_wire() for name, spec in self.fields.items()}
        if self.extra:
            wire["extra"] = True
        if self.values is not None:
            wire["values"] = self.values.to_wire()
        if self.items is not None:
            wire["items"] = self.items.to_wire()
        return wire


def _check_param_shape(p: Param) -> None:
    if not isinstance(p.kind, Kind):
        raise SchemaError(f"unknown parameter type {p.kind!r}")
    if p.required and p.has_default:
        raise SchemaError("a parameter with a default cannot be required")
    if (p.minimum is not None or p.maximum is not None) and p.kind not in _NUMERIC:
        raise SchemaError(f"minimum/maximum apply to int and float, not {p.kind.value}")
    if (p.min_length is not None or p.max_length is not None) and p.kind not in _SIZED:
        raise SchemaError(
            f"min_length/max_length apply to str, bytes, list, map, not {p.kind.value}"
        )
    if p.kind is not Kind.MAP and (p.fields is not None or p.values is not None or p.into):
        raise SchemaError(f"fields/values/into apply to map, not {p.kind.value}")
    if p.fields is not None and p.values is not None:
        raise SchemaError("a map has either fields or values, not both")
    if p.extra and p.fields is None:
        raise SchemaError("extra applies to a map with fields")
    if p.items is not None and p.kind is not Kind.LIST:
        raise SchemaError(f"items apply to list, not {p.kind.value}")
    for name in p.fields or {}:
        _check_name(name, "field")
    if p.has_default and p.default is not None:
        p.check(p.default, "default")


def _check_name(name: object, what: str) -> None:
    if not isinstance(name, str) or not name or len(name) > MAX_NAME_LENGTH:
        raise SchemaError(f"{what} name must be a string of 1 to {MAX_NAME_LENGTH} characters")


# -- checking values -------------------------------------------------------------------------


def unencodable(value: object, max_depth: int = MAX_NESTING) -> str | None:
    """What in `value` msgpack (and so the broker's log) cannot carry, or None.

    That is: maps and lists nested more than `max_depth` levels (`value` itself is level 1),
    a str holding a lone surrogate (JSON's `"\\ud800"` decodes to one; UTF-8 has none), an
    int outside -2^63 to 2^64-1. The walk is iterative: any value is safe to ask about.
    """
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if not item.isascii():  # O(1); only non-ASCII text can hold a surrogate
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError as exc:
                    char = item[exc.start]
                    return f"a string with a lone surrogate {char!r}, which is not UTF-8"
        elif isinstance(item, int) and not isinstance(item, bool):
            if not INT_MIN <= item <= INT_MAX:
                return "an integer outside msgpack's range -2^63 to 2^64-1"
        elif isinstance(item, dict | list | tuple):
            if depth > max_depth:
                return f"maps and lists nested more than {max_depth} levels deep"
            children = (x for kv in item.items() for x in kv) if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return None


def _at(path: str) -> str:
    return f"parameter {path!r}"


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, dict):
        return "map"
    if isinstance(value, list | tuple):
        return "list"
    return type(value).__name__


def _shown(value: object) -> str:
    text = shown(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _mismatch(p: Param, value: object, where: str, hint: str = "") -> SchemaError:
    got = _type_name(value)
    shown = "" if isinstance(value, dict | list | tuple) else f" {_shown(value)}"
    return SchemaError(f"{_at(where)}: expected {p.kind.value}, got {got}{shown}{hint}")


def _check_bounds(p: Param, number: int | float, where: str) -> None:
    if p.minimum is not None and number < p.minimum:
        raise SchemaError(f"{_at(where)}: {number} is less than the minimum {p.minimum}")
    if p.maximum is not None and number > p.maximum:
        raise SchemaError(f"{_at(where)}: {number} is more than the maximum {p.maximum}")


def _check_length(p: Param, length: int, where: str) -> None:
    if p.min_length is not None and length < p.min_length:
        raise SchemaError(f"{_at(where)}: length {length} is less than the minimum {p.min_length}")
    if p.max_length is not None and length > p.max_length:
        raise SchemaError(f"{_at(where)}: length {length} is more than the maximum {p.max_length}")


def _check_str(p: Param, value: Any, where: str) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        hint = " (quote it to pass a string)" if isinstance(value, float | bool) else ""
        raise _mismatch(p, value, where, hint)
    _check_length(p, len(value), where)
    return value


def _check_int(p: Param, value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _mismatch(p, value, where)
    _check_bounds(p, value, where)
    return value


def _check_float(p: Param, value: Any, where: str) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise _mismatch(p, value, where)
    number = float(value)
    if not math.isfinite(number):
        raise SchemaError(f"{_at(where)}: must be a finite number, got {number}")
    _check_bounds(p, number, where)
    return number


def _check_bool(p: Param, value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise _mismatch(p, value, where)
    return value


def _check_bytes(p: Param, value: Any, where: str) -> bytes:
    if not isinstance(value, bytes | bytearray):
        raise _mismatch(p, value, where)
    _check_length(p, len(value), where)
    return bytes(value)


def _check_list(p: Param, value: Any, where: str) -> list[Any]:
    if not isinstance(value, list | tuple):
        raise _mismatch(p, value, where)
    _check_length(p, len(value), where)
    if p.items is None:
        return list(value)
    return [p.items.check(item, f"{where}[{i}]") for i, item in enumerate(value)]


def _check_map(p: Param, value: Any, where: str) -> Any:
    if not isinstance(value, dict):
        raise _mismatch(p, value, where)
    for key in value:
        if not isinstance(key, str):
            got = f"{_type_name(key)} {_shown(key)}"
            raise SchemaError(f"{_at(where)}: keys must be strings, got {got}")
    _check_length(p, len(value), where)
    if p.fields is not None:
        checked = _check_fields(p.fields, p.extra, value, where)
    elif p.values is not None:
        values = p.values
        checked = {key: values.check(item, f"{where}.{key}") for key, item in value.items()}
    else:
        checked = dict(value)
    if p.into is None:
        return checked
    try:
        return p.into(checked)
    except (TypeError, ValueError) as exc:
        raise SchemaError(f"{_at(where)}: {exc}") from exc


def _check_any(p: Param, value: Any, where: str) -> Any:
    return value


_CHECKERS: Final[dict[Kind, Callable[[Param, Any, str], Any]]] = {
    Kind.STR: _check_str,
    Kind.INT: _check_int,
    Kind.FLOAT: _check_float,
    Kind.BOOL: _check_bool,
    Kind.BYTES: _check_bytes,
    Kind.LIST: _check_list,
    Kind.MAP: _check_map,
    Kind.ANY: _check_any,
}


def _check_fields(
    specs: Mapping[str, Param], extra: bool, given: Mapping[str, Any], where: str
) -> dict[str, Any]:
    """Checks the named entries of a map, or an action's parameters when `where` is empty."""
    prefix = f"{where}." if where else ""
    unknown = [key for key in given if key not in specs]
    if unknown and not extra:
        known = ", ".join(sorted(specs)) or "none"
        names = ", ".join(repr(prefix + key) for key in sorted(unknown))
        plural = "s" if len(unknown) > 1 else ""
        raise SchemaError(f"unknown parameter{plural} {names} (expected: {known})")
    checked: dict[str, Any] = {key: given[key] for key in unknown}
    for name, spec in specs.items():
        value = given.get(name)
        if value is not None:
            checked[name] = spec.check(value, prefix + name)
        elif spec.required:
            state = "is null" if name in given else "is missing"
            raise SchemaError(f"required {_at(prefix + name)} {state}")
        elif spec.has_default:
            checked[name] = spec.default_value()
    return checked


# -- actions and resources -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ActionSpec:
    """The parameters one action takes."""

    parameters: Mapping[str, Param] = field(default_factory=dict)
    #: Keep parameters the spec does not name instead of refusing them.
    extra: bool = False
    description: str = ""

    def __post_init__(self) -> None:
        for name, spec in self.parameters.items():
            _check_name(name, "parameter")
            if not isinstance(spec, Param):
                raise SchemaError(f"parameter {name!r}: spec must be a Param")

    def validate(self, parameters: Mapping[str, Any] | None) -> dict[str, Any]:
        """The parameters checked and coerced, with defaults filled in; or `SchemaError`."""
        given = {} if parameters is None else parameters
        if not isinstance(given, Mapping):
            raise SchemaError(f"parameters must be a map, got {_type_name(given)}")
        for key in given:
            if not isinstance(key, str):
                raise SchemaError(f"parameter names must be strings, got {_shown(key)}")
        return _check_fields(self.parameters, self.extra, given, "")

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {
            "parameters": {name: spec.to_wire() for name, spec in self.parameters.items()}
        }
        if self.extra:
            wire["extra"] = True
        if self.description:
            wire["description"] = self.description
        return wire


@dataclass(frozen=True, slots=True)
class ResourceSchema:
    """Every action of one resource: what an agent announces and the broker checks ADD with."""

    actions: Mapping[str, ActionSpec]

    def __post_init__(self) -> None:
        for name, spec in self.actions.items():
            if not isinstance(name, str) or not ACTION_NAME.fullmatch(name):
                raise SchemaError(
                    f"action name {_shown(name)} must be 1 to 128 letters, digits or _ . : @ / -"
                )
            if not isinstance(spec, ActionSpec):
                raise SchemaError(f"action {name!r}: spec must be an ActionSpec")

    def validate(self, action: str, parameters: Mapping[str, Any] | None) -> dict[str, Any]:
        """The parameters of `action` checked and coerced; `SchemaError` names the problem."""
        spec = self.actions.get(action)
        if spec is None:
            known = ", ".join(sorted(self.actions)) or "none"
            raise SchemaError(f"unknown action {action!r} (known: {known})")
        try:
            return spec.validate(parameters)
        except SchemaError as exc:
            raise SchemaError(f"{action}: {exc.message}") from exc

    def to_wire(self) -> dict[str, Any]:
        return {
            "schema": WIRE_VERSION,
            "actions": {name: spec.to_wire() for name, spec in self.actions.items()},
        }

    @classmethod
    def from_wire(cls, data: object) -> ResourceSchema:
        """Rebuilds a schema announced by an agent; `SchemaError` if it is not well formed."""
        wire = _expect_map(data, "schema")
        problem = unencodable(wire)
        if problem is not None:
            raise SchemaError(f"schema: holds {problem}")
        _refuse_unknown_keys(wire, {"schema", "actions"}, "schema")
        if wire.get("schema") != WIRE_VERSION:
            got = _shown(wire.get("schema"))
            raise SchemaError(f"schema: version must be {WIRE_VERSION}, got {got}")
        actions = _expect_map(wire.get("actions"), "schema.actions")
        return cls({name: _action_from_wire(name, spec) for name, spec in actions.items()})


def from_wire(data: object) -> ResourceSchema:
    """Shorthand for `ResourceSchema.from_wire`."""
    return ResourceSchema.from_wire(data)


#: Schemas rebuilt by `check_command`, by the identity of their wire dict, least recently
#: used first: (wire dict, rebuilt schema or its error, weight). Each entry keeps its dict
#: alive, so an id cannot be reused while it is cached. A broker keeps one dict per resource
#: and replaces it at each ANNOUNCE, so a replaced schema is never asked for again: bounding
#: the entries' weight (`_weight`, about their size packed) lets those fall out, however
#: large, while the schemas in use stay at the end.
_rebuilt: dict[int, tuple[object, ResourceSchema | SchemaError, int]] = {}
_rebuilt_weight = 0
_REBUILT_MAX: Final = 256
_REBUILT_MAX_WEIGHT: Final = 1 << 20


def check_command(schema: dict[str, Any], action: str, parameters: dict[str, Any]) -> str | None:
    """The broker's ADD-time check: the problem with a command, or None if it fits.

    `schema` is the wire form an agent announced. The message names the action only when
    it is unknown (the broker prefixes resource and action itself). Rebuilt schemas are
    cached by the identity of `schema`, so a broker that keeps one dict per resource
    parses it once, not on every ADD.
    """
    rebuilt = _rebuild(schema)
    if isinstance(rebuilt, SchemaError):
        return f"the announced schema is malformed: {rebuilt.message}"
    spec = rebuilt.actions.get(action)
    if spec is None:
        known = ", ".join(sorted(rebuilt.actions)) or "none"
        return f"unknown action {action!r} (known: {known})"
    try:
        spec.validate(parameters)
    except SchemaError as exc:
        return exc.message
    return None


def _rebuild(schema: dict[str, Any]) -> ResourceSchema | SchemaError:
    global _rebuilt_weight
    key = id(schema)
    cached = _rebuilt.get(key)
    if cached is not None and cached[0] is schema:
        if next(reversed(_rebuilt)) != key:
            _rebuilt[key] = _rebuilt.pop(key)  # now the most recently used
        return cached[1]
    try:
        rebuilt: ResourceSchema | SchemaError = ResourceSchema.from_wire(schema)
    except SchemaError as exc:
        rebuilt = exc
    weight = _weight(schema)
    _rebuilt[key] = (schema, rebuilt, weight)
    _rebuilt_weight += weight
    # Evict the least recently used, but never the one just rebuilt: a schema larger than
    # the whole budget is still parsed once, not at every ADD.
    while len(_rebuilt) > 1 and (
        len(_rebuilt) > _REBUILT_MAX or _rebuilt_weight > _REBUILT_MAX_WEIGHT
    ):
        _rebuilt_weight -= _rebuilt.pop(next(iter(_rebuilt)))[2]
    return rebuilt


def _weight(value: object) -> int:
    """About how many bytes `value` takes packed: its strings' and byte strings' lengths,
    plus one for every other item."""
    weight = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str | bytes):
            weight += len(item)
            continue
        weight += 1
        if isinstance(item, dict):
            stack += item.keys()
            stack += item.values()
        elif isinstance(item, list | tuple):
            stack += item
    return weight


# -- reading the wire form -------------------------------------------------------------------

_KIND_NAMES: Final = frozenset(k.value for k in Kind)
_PARAM_KEYS: Final = frozenset(
    {
        "type",
        "required",
        "default",
        "description",
        "minimum",
        "maximum",
        "min_length",
        "max_length",
        "fields",
        "extra",
        "values",
        "items",
    }
)


def _expect_map(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise SchemaError(f"{where}: expected a map with string keys, got {_type_name(value)}")
    return value


def _refuse_unknown_keys(wire: Mapping[str, Any], allowed: Iterable[str], where: str) -> None:
    unknown = sorted(set(wire) - set(allowed))
    if unknown:
        raise SchemaError(f"{where}: unknown key {_shown(unknown[0])}")


def _action_from_wire(name: str, data: object) -> ActionSpec:
    where = f"schema.actions.{name}"
    wire = _expect_map(data, where)
    _refuse_unknown_keys(wire, {"parameters", "extra", "description"}, where)
    params = _expect_map(wire.get("parameters", {}), f"{where}.parameters")
    return ActionSpec(
        parameters={
            key: _param_from_wire(spec, f"{where}.parameters.{key}", 1)
            for key, spec in params.items()
        },
        extra=_wire_bool(wire, "extra", where),
        description=_wire_str(wire, "description", where),
    )


def _param_from_wire(data: object, where: str, depth: int) -> Param:
    if depth > MAX_DEPTH:
        raise SchemaError(f"{where}: nested deeper than {MAX_DEPTH} levels")
    wire = _expect_map(data, where)
    _refuse_unknown_keys(wire, _PARAM_KEYS, where)
    type_name = wire.get("type")
    if type_name not in _KIND_NAMES:
        kinds = ", ".join(k.value for k in Kind)
        raise SchemaError(f"{where}: type must be one of {kinds}, got {_shown(type_name)}")
    kind = Kind(type_name)
    fields = wire.get("fields")
    default = wire.get("default", MISSING)
    try:
        return Param(
            kind=kind,
            # protocol.md: required unless `required` is false or it has a default
            required=_wire_bool(wire, "required", where, default=default is MISSING),
            default=default,
            description=_wire_str(wire, "description", where),
            minimum=_wire_number(wire, "minimum", where),
            maximum=_wire_number(wire, "maximum", where),
            min_length=_wire_length(wire, "min_length", where),
            max_length=_wire_length(wire, "max_length", where),
            fields=None
            if fields is None
            else {
                key: _param_from_wire(spec, f"{where}.fields.{key}", depth + 1)
                for key, spec in _expect_map(fields, f"{where}.fields").items()
            },
            extra=_wire_bool(wire, "extra", where),
            values=_nested(wire, "values", where, depth),
            items=_nested(wire, "items", where, depth),
        )
    except SchemaError as exc:
        if exc.message.startswith(where):
            raise
        raise SchemaError(f"{where}: {exc.message}") from exc


def _nested(wire: Mapping[str, Any], key: str, where: str, depth: int) -> Param | None:
    if wire.get(key) is None:
        return None
    return _param_from_wire(wire[key], f"{where}.{key}", depth + 1)


def _wire_bool(wire: Mapping[str, Any], key: str, where: str, default: bool = False) -> bool:
    value = wire.get(key, default)
    if not isinstance(value, bool):
        raise SchemaError(f"{where}.{key}: expected bool, got {_type_name(value)}")
    return value


def _wire_str(wire: Mapping[str, Any], key: str, where: str) -> str:
    value = wire.get(key, "")
    if not isinstance(value, str):
        raise SchemaError(f"{where}.{key}: expected str, got {_type_name(value)}")
    return value


def _wire_number(wire: Mapping[str, Any], key: str, where: str) -> int | float | None:
    value = wire.get(key)
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise SchemaError(f"{where}.{key}: expected a number, got {_type_name(value)}")
    return value


def _wire_length(wire: Mapping[str, Any], key: str, where: str) -> int | None:
    value = wire.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise SchemaError(f"{where}.{key}: expected a non-negative int, got {_shown(value)}")
    return value


# -- building specs --------------------------------------------------------------------------
# Factories named for the type they accept: `{"path": Str(), "size": Int(minimum=1)}`.


def _param(kind: Kind, required: bool | None, default: Any, **options: Any) -> Param:
    if required is None:
        required = default is MISSING
    return Param(kind=kind, required=required, default=default, **options)


def Str(
    *,
    required: bool | None = None,
    default: Any = MISSING,
    description: str = "",
    min_length: int | None = None,
    max_length: int | None = None,
) -> Param:
    return _param(
        Kind.STR,
        required,
        default,
        description=description,
        min_length=min_length,
        max_length=max_length,
    )


def Int(
    *,
    required: bool | None = None,
    default: Any = MISSING,
    description: str = "",
    minimum: int | None = None,
    maximum: int | None = None,
) -> Param:
    return _param(
        Kind.INT, required, default, description=description, minimum=minimum, maximum=maximum
    )


def Float(
    *,
    required: bool | None = None,
    default: Any = MISSING,
    description: str = "",
    minimum: float | None = None,
    maximum: float | None = None,
) -> Param:
    return _param(
        Kind.FLOAT, required, default, description=description, minimum=minimum, maximum=maximum
    )


def Bool(*, required: bool | None = None, default: Any = MISSING, description: str = "") -> Param:
    return _param(Kind.BOOL, required, default, description=description)


def Bytes(
    *,
    required: bool | None = None,
    default: Any = MISSING,
    description: str = "",
    min_length: int | None = None,
    max_length: int | None = None,
) -> Param:
    return _param(
        Kind.BYTES,
        required,
        default,
        description=description,
        min_length=min_length,
        max_length=max_length,
    )


def List(
    items: Param | None = None,
    *,
    required: bool | None = None,
    default: Any = MISSING,
    description: str = "",
    min_length: int | None = None,
    max_length: int | None = None,
) -> Param:
    return _param(
        Kind.LIST,
        required,
        default,
        items=items,
        description=description,
        min_length=min_length,
        max_length=max_length,
    )


def Map(
    fields: Mapping[str, Param] | None = None,
    *,
    values: Param | None = None,
    extra: bool = False,
    into: Callable[[dict[str, Any]], Any] | None = None,
    required: bool | None = None,
    default: Any = MISSING,
    description: str = "",
    min_length: int | None = None,
    max_length: int | None = None,
) -> Param:
    return _param(
        Kind.MAP,
        required,
        default,
        fields=None if fields is None else dict(fields),
        values=values,
        extra=extra,
        into=into,
        description=description,
        min_length=min_length,
        max_length=max_length,
    )


def Anything(
    *, required: bool | None = None, default: Any = MISSING, description: str = ""
) -> Param:
    return _param(Kind.ANY, required, default, description=description)


def optional(spec: Param, default: Any = MISSING) -> Param:
    """The same spec, made optional (with `default` when given)."""
    return dataclasses.replace(spec, required=False, default=default)


# -- specs from type hints -------------------------------------------------------------------

_SCALARS: Final[dict[object, Kind]] = {
    str: Kind.STR,
    int: Kind.INT,
    float: Kind.FLOAT,
    bool: Kind.BOOL,
    bytes: Kind.BYTES,
    Any: Kind.ANY,
    object: Kind.ANY,
}


def from_annotation(annotation: object, default: Any = MISSING) -> Param:
    """The spec for a type hint: str, int, float, bool, bytes, Any, list[X], dict[str, X],
    a dataclass, ``X | None`` (optional), or ``Annotated[X, Param]`` (that Param)."""
    required = default is MISSING
    base, nullable = _strip_none(annotation)
    extras: tuple[object, ...] = ()
    if typing.get_origin(base) is typing.Annotated:
        base, *rest = typing.get_args(base)
        extras = tuple(rest)
        base, inner_nullable = _strip_none(base)
        nullable = nullable or inner_nullable
    given = next((e for e in extras if isinstance(e, Param)), None)
    if nullable and required:
        required, default = False, None
    spec = given if given is not None else _spec_for_type(base)
    if required:
        return spec
    return dataclasses.replace(spec, required=False, default=default)


def _strip_none(annotation: object) -> tuple[object, bool]:
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
        raise SchemaError(f"cannot derive a spec from the union {annotation!r}")
    return annotation, False


def _spec_for_type(annotation: object) -> Param:
    kind = _SCALARS.get(annotation)
    if kind is not None:
        return Param(kind)
    origin = typing.get_origin(annotation) or annotation
    args = typing.get_args(annotation)
    if origin is list or origin is tuple:
        item = args[0] if args and origin is list else None
        return List(None if item is None else from_annotation(item))
    if origin is dict:
        if args and args[0] is not str:
            raise SchemaError(f"map keys must be str, not {args[0]!r}")
        return Map(values=from_annotation(args[1]) if len(args) == 2 else None)
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        return Dataclass(annotation)
    raise SchemaError(f"cannot derive a spec from the type {annotation!r}")


def Dataclass(cls: type[Any], **options: Any) -> Param:
    """A map spec derived from a dataclass; the handler receives an instance of `cls`.

    A field's key is ``field(metadata={"key": "Name"})`` or its own name; its spec is
    ``metadata={"param": Param}`` or derived from its type hint; dataclass defaults become
    defaults. Map options (`description`, `required`, `default`) pass through `options`.
    """
    hints = typing.get_type_hints(cls, include_extras=True)
    specs: dict[str, Param] = {}
    keys: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key = f.metadata.get("key", f.name)
        default: Any = MISSING
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        given = f.metadata.get("param")
        if isinstance(given, Param):
            spec = given if default is MISSING else optional(given, default)
        else:
            spec = from_annotation(hints[f.name], default)
        specs[key] = spec
        keys[key] = f.name

    def build(checked: dict[str, Any]) -> Any:
        return cls(**{keys[key]: value for key, value in checked.items() if key in keys})

    return Map(specs, into=build, **options)


def params_from_signature(
    function: Callable[..., Any], skip: Iterable[str] = ()
) -> dict[str, Param]:
    """Specs for a handler's keyword parameters from its type hints and defaults.

    Parameters named in `skip` (the framework's context argument) and ``*args``/``**kwargs``
    are left out; a parameter without a type hint accepts anything.
    """
    hints = typing.get_type_hints(function, include_extras=True)
    skipped = set(skip)
    specs: dict[str, Param] = {}
    for name, parameter in inspect.signature(function).parameters.items():
        if name in skipped or name == "self":
            continue
        if parameter.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            continue
        if parameter.kind is inspect.Parameter.POSITIONAL_ONLY:
            raise SchemaError(f"{name}: positional-only parameters cannot be named by a command")
        default = MISSING if parameter.default is inspect.Parameter.empty else parameter.default
        try:
            specs[name] = from_annotation(hints.get(name, Any), default)
        except SchemaError as exc:
            raise SchemaError(f"parameter {name!r}: {exc.message}") from exc
    return specs
