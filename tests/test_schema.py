"""Parameter specs: checking, coercion, and the wire form the broker stores."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Annotated, Any

import msgpack
import pytest

from spinbroker import schema as schema_module
from spinbroker.schema import (
    MAX_DEPTH,
    MAX_NESTING,
    MISSING,
    ActionSpec,
    Anything,
    Bool,
    Bytes,
    Dataclass,
    Float,
    Int,
    Kind,
    List,
    Map,
    Param,
    ResourceSchema,
    SchemaError,
    Str,
    check_command,
    from_annotation,
    from_wire,
    optional,
    params_from_signature,
    unencodable,
)


def check(spec: Param, value: Any) -> Any:
    return ActionSpec({"p": spec}).validate({"p": value})["p"]


def refused(spec: Param, value: Any) -> str:
    with pytest.raises(SchemaError) as info:
        check(spec, value)
    return info.value.message


STORAGE = ResourceSchema(
    {
        "add_volume": ActionSpec({"path": Str(min_length=1)}),
        "create_image": ActionSpec(
            {"volume_path": Str(), "image_name": Str(), "image_size": Int(minimum=1)}
        ),
    }
)


# -- coercion ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "value", "expected"),
    [
        (Str(), "a b", "a b"),
        (Str(), 2024, "2024"),
        (Str(), -7, "-7"),
        (Int(), 50, 50),
        (Float(), 1, 1.0),
        (Float(), 2.5, 2.5),
        (Bool(), False, False),
        (Bytes(), bytearray(b"ab"), b"ab"),
        (List(), (1, 2), [1, 2]),
        (List(Int()), [1, 2], [1, 2]),
        (Map(), {"a": 1}, {"a": 1}),
        (Anything(), {1: [b"x"]}, {1: [b"x"]}),
    ],
)
def test_accepts_and_coerces(spec: Param, value: Any, expected: Any) -> None:
    result = check(spec, value)
    assert result == expected
    assert type(result) is type(expected)


@pytest.mark.parametrize(
    ("spec", "value", "message"),
    [
        (Int(), "50", "parameter 'p': expected int, got str '50'"),
        (Int(), 50.0, "parameter 'p': expected int, got float 50.0"),
        (Int(), True, "parameter 'p': expected int, got bool True"),
        (Float(), "1.5", "parameter 'p': expected float, got str '1.5'"),
        (Float(), False, "parameter 'p': expected float, got bool False"),
        (Str(), 1.5, "parameter 'p': expected str, got float 1.5 (quote it to pass a string)"),
        (Str(), True, "parameter 'p': expected str, got bool True (quote it to pass a string)"),
        (Str(), [1], "parameter 'p': expected str, got list"),
        (Bool(), 1, "parameter 'p': expected bool, got int 1"),
        (Bool(), "true", "parameter 'p': expected bool, got str 'true'"),
        (Bytes(), "ab", "parameter 'p': expected bytes, got str 'ab'"),
        (List(), {"a": 1}, "parameter 'p': expected list, got map"),
        (Map(), [1], "parameter 'p': expected map, got list"),
        (Map(), {1: 2}, "parameter 'p': keys must be strings, got int 1"),
    ],
)
def test_refuses_wrong_types(spec: Param, value: Any, message: str) -> None:
    assert refused(spec, value) == message


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_float_must_be_finite(value: float) -> None:
    assert "must be a finite number" in refused(Float(), value)


def test_long_values_are_shortened_in_messages() -> None:
    message = refused(Int(), "x" * 500)
    assert len(message) < 100
    assert message.endswith("...")


# -- bounds ------------------------------------------------------------------------------------


def test_numeric_bounds() -> None:
    spec = Int(minimum=1, maximum=10)
    assert check(spec, 1) == 1
    assert check(spec, 10) == 10
    assert refused(spec, 0) == "parameter 'p': 0 is less than the minimum 1"
    assert refused(spec, 11) == "parameter 'p': 11 is more than the maximum 10"
    assert check(Float(minimum=0.5), 1) == 1.0
    assert "less than the minimum 0.5" in refused(Float(minimum=0.5), 0)


def test_length_bounds() -> None:
    assert refused(Str(min_length=1), "") == "parameter 'p': length 0 is less than the minimum 1"
    assert "more than the maximum 2" in refused(List(max_length=2), [1, 2, 3])
    assert "more than the maximum 1" in refused(Map(max_length=1), {"a": 1, "b": 2})
    assert "less than the minimum 2" in refused(Bytes(min_length=2), b"a")
    # the int -> str coercion happens before the length is measured
    assert check(Str(max_length=4), 2024) == "2024"


# -- required, optional, default, null ---------------------------------------------------------


def test_required_missing_and_null() -> None:
    spec = ActionSpec({"path": Str()})
    with pytest.raises(SchemaError, match="required parameter 'path' is missing"):
        spec.validate({})
    with pytest.raises(SchemaError, match="required parameter 'path' is null"):
        spec.validate({"path": None})
    with pytest.raises(SchemaError, match="required parameter 'path' is missing"):
        spec.validate(None)


def test_optional_without_default_is_left_out() -> None:
    spec = ActionSpec({"a": Str(required=False)})
    assert spec.validate({}) == {}
    assert spec.validate({"a": None}) == {}
    assert spec.validate({"a": "x"}) == {"a": "x"}


def test_default_is_filled_in_and_copied_each_time() -> None:
    spec = ActionSpec({"tags": List(default=["a"]), "n": Int(default=3)})
    first = spec.validate({})
    assert first == {"tags": ["a"], "n": 3}
    first["tags"].append("mutated")
    assert spec.validate({"n": None}) == {"tags": ["a"], "n": 3}


def test_default_none_is_allowed() -> None:
    assert ActionSpec({"v": Str(default=None)}).validate({}) == {"v": None}


def test_optional_helper() -> None:
    spec = optional(Int(minimum=1), 5)
    assert not spec.required
    assert spec.default == 5
    assert spec.minimum == 1
    assert optional(Int()).default is MISSING


# -- unknown names -----------------------------------------------------------------------------


def test_unknown_parameters_are_refused_and_named() -> None:
    spec = ActionSpec({"path": Str()})
    with pytest.raises(SchemaError) as info:
        spec.validate({"path": "a", "zz": 1, "aa": 2})
    assert info.value.message == "unknown parameters 'aa', 'zz' (expected: path)"


def test_extra_parameters_pass_through_when_allowed() -> None:
    spec = ActionSpec({"path": Str()}, extra=True)
    assert spec.validate({"path": 1, "other": [1]}) == {"path": "1", "other": [1]}


def test_parameter_names_must_be_strings() -> None:
    with pytest.raises(SchemaError, match="parameter names must be strings"):
        ActionSpec({}).validate({1: 2})  # type: ignore[dict-item]
    with pytest.raises(SchemaError, match="parameters must be a map"):
        ActionSpec({}).validate([1])  # type: ignore[arg-type]


def test_unknown_action_lists_the_known_ones() -> None:
    with pytest.raises(SchemaError) as info:
        STORAGE.validate("frob", {})
    assert info.value.message == "unknown action 'frob' (known: add_volume, create_image)"


def test_resource_messages_name_the_action() -> None:
    with pytest.raises(SchemaError) as info:
        STORAGE.validate("create_image", {"volume_path": "v", "image_name": "i"})
    assert info.value.message == "create_image: required parameter 'image_size' is missing"
    with pytest.raises(SchemaError) as info:
        STORAGE.validate(
            "create_image", {"volume_path": "v", "image_name": "i", "image_size": "50"}
        )
    assert info.value.message == "create_image: parameter 'image_size': expected int, got str '50'"


def test_resource_validate_returns_coerced_parameters() -> None:
    params = {"volume_path": "v", "image_name": 7, "image_size": 50}
    assert STORAGE.validate("create_image", params) == {
        "volume_path": "v",
        "image_name": "7",
        "image_size": 50,
    }
    assert params["image_name"] == 7  # the input is not changed


# -- nested maps and lists ---------------------------------------------------------------------

VM = Map(
    {
        "Name": Str(min_length=1),
        "Cpus": Int(minimum=1),
        "Images": List(Map({"Path": Str(), "Cdrom": Bool(default=False)}), default=[]),
    }
)


def test_nested_fields_are_checked_with_their_path() -> None:
    assert check(VM, {"Name": "a", "Cpus": 1, "Images": [{"Path": "x"}]}) == {
        "Name": "a",
        "Cpus": 1,
        "Images": [{"Path": "x", "Cdrom": False}],
    }
    assert (
        refused(VM, {"Name": "a", "Cpus": 1, "Images": [{"Path": "x"}, {"Path": []}]})
        == "parameter 'p.Images[1].Path': expected str, got list"
    )
    assert refused(VM, {"Name": "a"}) == "required parameter 'p.Cpus' is missing"
    assert refused(VM, {"Name": "a", "Cpus": 1, "Foo": 1}) == (
        "unknown parameter 'p.Foo' (expected: Cpus, Images, Name)"
    )


def test_map_values_spec() -> None:
    ports = Map(values=Str())
    assert check(ports, {"22": "127.0.0.1:2222", "80": 8080}) == {
        "22": "127.0.0.1:2222",
        "80": "8080",
    }
    assert refused(ports, {"22": False}).startswith("parameter 'p.22': expected str, got bool")


def test_map_with_extra_keeps_unknown_keys() -> None:
    spec = Map({"a": Int()}, extra=True)
    assert check(spec, {"a": 1, "b": "x"}) == {"a": 1, "b": "x"}


def test_into_builds_the_handler_value_and_reports_its_errors() -> None:
    def build(d: dict[str, Any]) -> tuple[int, int]:
        if d["lo"] > d["hi"]:
            raise ValueError("lo must not exceed hi")
        return (d["lo"], d["hi"])

    spec = Map({"lo": Int(), "hi": Int()}, into=build)
    assert check(spec, {"lo": 1, "hi": 2}) == (1, 2)
    assert refused(spec, {"lo": 3, "hi": 2}) == "parameter 'p': lo must not exceed hi"


# -- building specs: mistakes of an agent's author ---------------------------------------------


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Param(Kind.STR, required=True, default="x"), "cannot be required"),
        (lambda: Str(required=True, default="x"), "cannot be required"),
        (lambda: Param(Kind.STR, minimum=1), "minimum/maximum apply to int and float"),
        (lambda: Param(Kind.INT, min_length=1), "min_length/max_length apply"),
        (lambda: Param(Kind.LIST, fields={}), "apply to map"),
        (lambda: Param(Kind.MAP, fields={}, values=Str()), "either fields or values"),
        (lambda: Param(Kind.MAP, extra=True), "extra applies to a map with fields"),
        (lambda: Param(Kind.STR, items=Str()), "items apply to list"),
        (lambda: Int(default="x"), "expected int"),
        (lambda: Map({"": Str()}), "field name must be"),
        (lambda: ActionSpec({"": Str()}), "parameter name must be"),
        (lambda: ActionSpec({"a": "str"}), "spec must be a Param"),  # type: ignore[dict-item]
        (lambda: ResourceSchema({"bad name": ActionSpec()}), "action name 'bad name'"),
        (lambda: ResourceSchema({"a": {}}), "spec must be an ActionSpec"),  # type: ignore[dict-item]
    ],
)
def test_bad_specs_are_refused_when_built(build: Any, message: str) -> None:
    with pytest.raises(SchemaError, match=message):
        build()


# -- wire form ---------------------------------------------------------------------------------

FULL = ResourceSchema(
    {
        "everything": ActionSpec(
            {
                "s": Str(min_length=1, max_length=9, description="a string"),
                "i": Int(minimum=-1, maximum=5),
                "f": Float(default=0.5, minimum=0.0),
                "b": Bool(required=False),
                "y": Bytes(default=b"\x00"),
                "l": List(Int(), max_length=3),
                "m": Map(values=Float()),
                "vm": VM,
                "x": Anything(),
            },
            description="all the types",
        ),
        "open": ActionSpec(extra=True),
    }
)


def test_wire_round_trip_through_msgpack() -> None:
    wire = FULL.to_wire()
    packed = msgpack.packb(wire, use_bin_type=True)
    back = from_wire(msgpack.unpackb(packed, raw=False))
    assert back.to_wire() == wire
    assert back == FULL
    params = {"s": "ab", "i": 0, "l": [1], "m": {"a": 1}, "vm": {"Name": "n", "Cpus": 2}, "x": 0}
    assert back.validate("everything", params) == FULL.validate("everything", params)
    assert back.validate("open", {"anything": 1}) == {"anything": 1}


def test_wire_form_is_compact_and_plain() -> None:
    assert STORAGE.to_wire() == {
        "schema": 1,
        "actions": {
            "add_volume": {
                "parameters": {"path": {"type": "str", "required": True, "min_length": 1}}
            },
            "create_image": {
                "parameters": {
                    "volume_path": {"type": "str", "required": True},
                    "image_name": {"type": "str", "required": True},
                    "image_size": {"type": "int", "required": True, "minimum": 1},
                }
            },
        },
    }


def test_into_does_not_travel() -> None:
    spec = ResourceSchema({"a": ActionSpec({"p": Map({"x": Int()}, into=lambda d: d["x"])})})
    back = from_wire(spec.to_wire())
    assert spec.validate("a", {"p": {"x": 1}}) == {"p": 1}
    assert back.validate("a", {"p": {"x": 1}}) == {"p": {"x": 1}}


def _nested_list(depth: int) -> dict[str, Any]:
    param: dict[str, Any] = {"type": "int"}
    for _ in range(depth - 1):
        param = {"type": "list", "items": param}
    return {"schema": 1, "actions": {"a": {"parameters": {"p": param}}}}


def test_from_wire_bounds_nesting() -> None:
    from_wire(_nested_list(MAX_DEPTH))
    with pytest.raises(SchemaError, match=f"nested deeper than {MAX_DEPTH}"):
        from_wire(_nested_list(MAX_DEPTH + 1))


def _one_param(param: Any) -> dict[str, Any]:
    return {"schema": 1, "actions": {"a": {"parameters": {"p": param}}}}


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        ([], "schema: expected a map"),
        ({"schema": 2, "actions": {}}, "version must be 1, got 2"),
        ({"actions": {}}, "version must be 1, got None"),
        ({"schema": 1, "actions": {}, "more": 1}, "schema: unknown key 'more'"),
        ({"schema": 1, "actions": []}, "schema.actions: expected a map"),
        ({"schema": 1, "actions": {"a b": {}}}, "action name 'a b'"),
        ({"schema": 1, "actions": {"a": {"params": {}}}}, "unknown key 'params'"),
        ({"schema": 1, "actions": {"a": {"extra": 1}}}, "schema.actions.a.extra: expected bool"),
        (_one_param("str"), "schema.actions.a.parameters.p: expected a map"),
        (_one_param({"type": "string"}), "type must be one of str, int"),
        (_one_param({"type": "int", "nope": 1}), "unknown key 'nope'"),
        (_one_param({"type": "int", "required": "yes"}), "required: expected bool"),
        (_one_param({"type": "int", "minimum": "1"}), "minimum: expected a number"),
        (_one_param({"type": "str", "min_length": -1}), "min_length: expected a non-negative"),
        (_one_param({"type": "int", "required": True, "default": 1}), "cannot be required"),
        (
            _one_param({"type": "int", "required": False, "default": "x"}),
            "schema.actions.a.parameters.p: parameter 'default': expected int",
        ),
        (_one_param({"type": "str", "minimum": 1}), "minimum/maximum apply"),
        (_one_param({"type": "map", "fields": {"x": {"type": "?"}}}), "p.fields.x: type must"),
        (_one_param({"type": "list", "items": {"type": "int", "x": 1}}), "p.items: unknown key"),
        (_one_param({"type": "map", "fields": {1: {}}}), "p.fields: expected a map with string"),
    ],
)
def test_from_wire_refuses_malformed_schemas(wire: Any, message: str) -> None:
    with pytest.raises(SchemaError, match=message.replace("(", r"\(").replace("?", r"\?")):
        from_wire(wire)


def test_a_parameter_is_required_unless_it_says_so_or_has_a_default() -> None:
    """protocol.md: "A parameter is required unless `required` is false or it has a
    default" (the framework always writes `required`; a hand-written schema may not)."""
    defaulted = from_wire(_one_param({"type": "int", "default": 5}))
    spec = defaulted.actions["a"]
    assert spec.validate({}) == {"p": 5}
    plain = from_wire(_one_param({"type": "int"})).actions["a"]
    with pytest.raises(SchemaError, match="required parameter 'p' is missing"):
        plain.validate({})
    optional = from_wire(_one_param({"type": "int", "required": False})).actions["a"]
    assert optional.validate({}) == {}


def _nest(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def _optional_any(default: Any) -> dict[str, Any]:
    return _one_param({"type": "any", "required": False, "default": default})


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (
            {"schema": 1, "actions": {"a": {"description": "\ud800"}}},
            "lone surrogate '\\ud800'",
        ),
        ({"schema": 1, "actions": {"a": {"parameters": {"\udc00": {"type": "any"}}}}}, "surrogate"),
        (_optional_any(["ok", "\ud800"]), "surrogate"),
        (_one_param({"type": "int", "minimum": 99999999999999999999999}), "outside msgpack"),
        (_one_param({"type": "int", "maximum": -(2**63) - 1}), "outside msgpack"),
        (_one_param({"type": "str", "max_length": 2**64}), "outside msgpack"),
        (_optional_any({"deep": _nest(600)}), f"nested more than {MAX_NESTING} levels"),
    ],
)
def test_from_wire_refuses_what_msgpack_cannot_carry(wire: Any, message: str) -> None:
    """Such a schema passed every other check, then the broker could not pack its record
    (audit h1: a text-mode ANNOUNCE with `"\\ud800"` in a description poisoned the log)."""
    with pytest.raises(SchemaError) as refused:
        from_wire(wire)
    assert refused.value.message.startswith("schema: holds ")
    assert message in refused.value.message


def test_from_wire_takes_what_msgpack_can_carry() -> None:
    wire = _optional_any({"deep": _nest(MAX_NESTING - 8), "text": "caf\u00e9 \U0001f600"})
    wire["actions"]["a"]["parameters"]["n"] = {"type": "int", "minimum": -(2**63)}
    wire["actions"]["a"]["parameters"]["m"] = {"type": "int", "maximum": 2**64 - 1}
    msgpack.packb(wire)
    assert from_wire(wire).validate("a", {"n": 1, "m": 1})["p"]["text"] == "caf\u00e9 \U0001f600"


def test_a_deep_default_is_refused_before_anything_copies_it() -> None:
    """A default nested 600 deep made every later SUBMIT fail with an internal
    RecursionError in its deep copy (audit h1, t03); the schema is now refused instead."""
    with pytest.raises(SchemaError, match="nested more than"):
        from_wire(_optional_any(_nest(600)))
    problem = check_command(_optional_any(_nest(600)), "a", {})
    assert problem is not None
    assert problem.startswith("the announced schema is malformed: schema: holds maps and lists")


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (_nest(MAX_NESTING), None),  # the outer list is level 1, the innermost level 100
        (_nest(MAX_NESTING + 1), f"maps and lists nested more than {MAX_NESTING} levels deep"),
        (_nest(100_000), f"maps and lists nested more than {MAX_NESTING} levels deep"),
        ({"k": {"k": 1}}, None),
        ("\ud800", "a string with a lone surrogate '\\ud800', which is not UTF-8"),
        ({"\udfff": 1}, "a string with a lone surrogate '\\udfff', which is not UTF-8"),
        ("\ud83d\ude00", "a string with a lone surrogate '\\ud83d', which is not UTF-8"),
        ("\U0001f600", None),
        (2**64 - 1, None),
        (2**64, "an integer outside msgpack's range -2^63 to 2^64-1"),
        (-(2**63), None),
        (-(2**63) - 1, "an integer outside msgpack's range -2^63 to 2^64-1"),
        ((1, b"\xff", 1.5e300, None, True), None),
    ],
)
def test_unencodable_names_what_msgpack_cannot_carry(value: Any, problem: str | None) -> None:
    assert unencodable(value) == problem
    if problem is None and not isinstance(value, list):
        msgpack.packb(value)


# -- specs from type hints ---------------------------------------------------------------------


@dataclass
class Image:
    path: str = field(metadata={"key": "Path"})
    cdrom: bool = field(default=False, metadata={"key": "Cdrom"})
    volume: str | None = field(default=None, metadata={"key": "Volume"})

    def __post_init__(self) -> None:
        if not self.cdrom and self.volume is None:
            raise ValueError("an image that is not a cdrom needs a Volume")


@dataclass
class Machine:
    name: str
    cpus: Annotated[int, Int(minimum=1)]
    images: list[Image] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    memory: int = field(default=128, metadata={"param": Int(minimum=16)})


def test_dataclass_spec_builds_instances() -> None:
    spec = Dataclass(Machine)
    value = check(spec, {"name": "a", "cpus": 2, "images": [{"Path": "p", "Volume": "v"}]})
    assert value == Machine("a", 2, [Image("p", False, "v")], {}, 128)
    assert (
        refused(spec, {"name": "a", "cpus": 0})
        == "parameter 'p.cpus': 0 is less than the minimum 1"
    )
    assert refused(spec, {"name": "a", "cpus": 1, "memory": 8}).endswith("minimum 16")
    assert refused(spec, {"name": "a", "cpus": 1, "images": [{"Path": "p"}]}) == (
        "parameter 'p.images[0]': an image that is not a cdrom needs a Volume"
    )


def test_dataclass_wire_form_is_plain() -> None:
    wire = Dataclass(Machine).to_wire()
    assert wire["type"] == "map"
    assert wire["fields"]["images"]["items"]["fields"]["Volume"] == {
        "type": "str",
        "required": False,
        "default": None,
    }
    assert wire["fields"]["labels"] == {
        "type": "map",
        "required": False,
        "default": {},
        "values": {"type": "str", "required": True},
    }
    msgpack.packb(wire)


@pytest.mark.parametrize(
    ("annotation", "default", "kind", "required"),
    [
        (str, MISSING, Kind.STR, True),
        (int, 3, Kind.INT, False),
        (float, MISSING, Kind.FLOAT, True),
        (bool, MISSING, Kind.BOOL, True),
        (bytes, MISSING, Kind.BYTES, True),
        (Any, MISSING, Kind.ANY, True),
        (list[int], MISSING, Kind.LIST, True),
        (list, MISSING, Kind.LIST, True),
        (tuple[int, ...], MISSING, Kind.LIST, True),
        (dict[str, Any], MISSING, Kind.MAP, True),
        (dict, MISSING, Kind.MAP, True),
        (int | None, MISSING, Kind.INT, False),
        (Annotated[int, Int(minimum=1)] | None, MISSING, Kind.INT, False),
        (Image, MISSING, Kind.MAP, True),
    ],
)
def test_from_annotation(annotation: Any, default: Any, kind: Kind, required: bool) -> None:
    spec = from_annotation(annotation, default)
    assert spec.kind is kind
    assert spec.required is required


def test_from_annotation_refuses_what_it_cannot_express() -> None:
    with pytest.raises(SchemaError, match="union"):
        from_annotation(int | str)
    with pytest.raises(SchemaError, match="map keys must be str"):
        from_annotation(dict[int, str])
    with pytest.raises(SchemaError, match="cannot derive"):
        from_annotation(set[int])


def test_params_from_signature() -> None:
    def handler(  # type: ignore[no-untyped-def]
        ctx: object,
        path: str,
        size: Annotated[int, Int(minimum=1)],
        sparse: bool = True,
        note: str | None = None,
        untyped=1,
        *rest: int,
        **more: int,
    ) -> None:
        pass

    specs = params_from_signature(handler, skip=["ctx"])
    assert list(specs) == ["path", "size", "sparse", "note", "untyped"]
    assert specs["path"] == Str()
    assert specs["size"] == Int(minimum=1)
    assert specs["sparse"] == Bool(default=True)
    assert specs["note"] == Str(default=None)
    assert specs["untyped"] == Anything(default=1)


def test_params_from_signature_names_the_bad_parameter() -> None:
    def positional(a: int, /) -> None:
        pass

    def odd(a: set[int]) -> None:
        pass

    with pytest.raises(SchemaError, match="positional-only"):
        params_from_signature(positional)
    with pytest.raises(SchemaError, match="parameter 'a': cannot derive"):
        params_from_signature(odd)


def test_params_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Str().required = False  # type: ignore[misc]


# -- the broker's ADD-time check ----------------------------------------------------------------


def test_check_command_answers_the_problem_or_none() -> None:
    wire = STORAGE.to_wire()
    assert check_command(wire, "add_volume", {"path": "v"}) is None
    assert check_command(wire, "add_volume", {}) == "required parameter 'path' is missing"
    assert check_command(
        wire, "create_image", {"volume_path": "v", "image_name": "i", "image_size": "5"}
    ) == ("parameter 'image_size': expected int, got str '5'")
    assert check_command(wire, "frob", {}) == (
        "unknown action 'frob' (known: add_volume, create_image)"
    )


def test_check_command_reports_a_malformed_schema() -> None:
    problem = check_command({"schema": 9}, "a", {})
    assert problem is not None
    assert problem.startswith("the announced schema is malformed: schema: version must be 1")


def test_check_command_rebuilds_each_schema_once() -> None:
    wire = STORAGE.to_wire()
    check_command(wire, "add_volume", {"path": "v"})
    wire["actions"]["add_volume"]["parameters"]["path"]["type"] = "int"  # same dict: cached
    assert check_command(wire, "add_volume", {"path": "v"}) is None
    fresh = STORAGE.to_wire()
    fresh["actions"]["add_volume"]["parameters"]["path"]["type"] = "int"
    assert check_command(fresh, "add_volume", {"path": "v"}) is not None


def _announced(round_: int, description: str = "") -> dict[str, Any]:
    """The wire form a broker stores for one ANNOUNCE: a new dict each time."""
    wire = STORAGE.to_wire()
    wire["actions"]["add_volume"]["description"] = description or f"round {round_}"
    return wire


def test_check_command_forgets_replaced_schemas_by_their_size() -> None:
    """Audit h1 (t28): each ANNOUNCE of a big schema followed by an ADD left the replaced
    schema cached, up to 256 of them: ~9 MiB more memory per round for a 529 KB schema."""
    rounds = [_announced(i, f"{i:03} " + "x" * (300 << 10)) for i in range(12)]
    for wire in rounds:
        assert check_command(wire, "add_volume", {"path": "v"}) is None
    cached = [id(entry[0]) for entry in schema_module._rebuilt.values()]
    assert id(rounds[-1]) in cached and id(rounds[0]) not in cached
    assert len(cached) <= 4  # 1 MiB of schemas, 300 KB each
    assert schema_module._rebuilt_weight == sum(
        entry[2] for entry in schema_module._rebuilt.values()
    )


def test_check_command_keeps_the_schemas_in_use() -> None:
    """The cache still spares the rebuild on every ADD: the schemas in use stay cached
    while replaced ones, however large, fall out."""
    in_use = [_announced(i) for i in range(50)]
    for round_ in range(8):
        for wire in in_use:
            check_command(wire, "add_volume", {"path": "v"})
        check_command(_announced(round_, "x" * (200 << 10)), "add_volume", {"path": "v"})
    for wire in in_use:  # a change to a cached dict goes unseen: it is not rebuilt
        wire["actions"]["add_volume"]["parameters"]["path"]["type"] = "int"
        assert check_command(wire, "add_volume", {"path": "v"}) is None
