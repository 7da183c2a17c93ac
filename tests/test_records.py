"""Records survive the trip to the log and back: to_wire -> msgpack -> from_wire is identity."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from spinbroker.records import (
    SUBMITTED_ONE,
    BrokerStarted,
    CommandCompleted,
    CommandLeased,
    CommandsAdded,
    CommandSpec,
    LeaseCancelled,
    LeaseReleased,
    LeaseTouched,
    PackageCancelled,
    PackageCreated,
    PackageEnqueued,
    PackageExpired,
    PackageForgotten,
    PackageSubmitted,
    Record,
    SchemaAnnounced,
    from_wire,
    to_wire,
)

PARAMS: dict[str, Any] = {
    "int": 50,
    "neg": -(2**40),
    "float": 1.25,
    "str": "test.raw",
    "bytes": b"\x00\xff",
    "bool": True,
    "none": None,
    "list": [1, "a", [2.5, False]],
    "map": {"Name": "x", "nested": {"deep": [1, 2]}},
}

SPEC_A = CommandSpec("c-1", "storage", "add_volume", {"path": "test"}, ())
SPEC_B = CommandSpec("c-2", "storage", "create_image", PARAMS, ("c-1", "c-0"))

RECORDS: list[Record] = [
    PackageCreated("p-1", 1.5),
    CommandsAdded("p-1", (SPEC_A, SPEC_B), 2.0),
    CommandsAdded("p-1", (), 2.0),
    PackageEnqueued("p-1", 3.0),
    PackageSubmitted("p-2", (SPEC_A, SPEC_B), 4.25),
    PackageSubmitted("p-4", (SPEC_A,), 4.5),
    CommandLeased("c-1", 1, 7, None, 5.0),
    CommandLeased("c-1", 3, None, 35.5, 5.5),
    LeaseTouched("c-1", 60.0, 30.0),
    LeaseReleased("c-1", 61.0),
    LeaseCancelled("c-1", 61.5),
    CommandCompleted("c-1", True, None, 62.0),
    CommandCompleted("c-2", False, "disk full", 63.0),
    PackageCancelled("p-1", 64.0),
    PackageExpired("p-3", 3600.0),
    PackageForgotten("p-3", 90000.0),
    SchemaAnnounced("storage", {"add_volume": {"path": "str"}, "n": 1}, 1.0),
    BrokerStarted(100.5),
]


def through_msgpack(wire: Any) -> Any:
    data = msgpack.packb(wire, use_bin_type=True)
    return msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=False)


@pytest.mark.parametrize("rec", RECORDS, ids=lambda r: type(r).__name__)
def test_round_trip_through_msgpack(rec: Record) -> None:
    back = from_wire(through_msgpack(to_wire(rec)))
    assert back == rec
    assert type(back) is type(rec)


def test_every_record_type_is_covered() -> None:
    covered = {type(r) for r in RECORDS}
    assert covered == set(Record.__args__)  # type: ignore[attr-defined]


def test_wire_tags_are_distinct() -> None:
    tags = {type(r): to_wire(r)[0] for r in RECORDS}
    assert len(set(tags.values())) == len(tags)


def test_a_one_command_submit_is_logged_flat_and_the_nested_form_still_decodes() -> None:
    """The commonest record has a flat form whose fields replay hands straight to
    `Broker.apply_submitted_one`; logs written before it hold the nested form."""
    rec = PackageSubmitted("p-4", (SPEC_A,), 4.5)
    flat = to_wire(rec)
    assert flat == [SUBMITTED_ONE, "p-4", "c-1", "storage", "add_volume", {"path": "test"}, 4.5]
    nested = ["submitted", "p-4", [SPEC_A.to_wire()], 4.5]
    assert from_wire(through_msgpack(nested)) == rec == from_wire(through_msgpack(flat))
    with_dependency = PackageSubmitted("p-5", (SPEC_B,), 4.5)
    assert to_wire(with_dependency)[0] == "submitted"


def test_parameter_types_survive() -> None:
    rec = PackageSubmitted("p", (SPEC_B,), 0.0)
    back = from_wire(through_msgpack(to_wire(rec)))
    assert isinstance(back, PackageSubmitted)
    params = back.commands[0].parameters
    assert params == PARAMS
    assert type(params["int"]) is int
    assert type(params["float"]) is float
    assert type(params["bytes"]) is bytes
    assert type(params["bool"]) is bool
    assert back.commands[0].dependencies == ("c-1", "c-0")


def test_int_keys_in_nested_parameters_survive() -> None:
    spec = CommandSpec("c", "r", "a", {"m": {1: "one"}}, ())
    back = from_wire(through_msgpack(to_wire(PackageSubmitted("p", (spec,), 0.0))))
    assert isinstance(back, PackageSubmitted)
    assert back.commands[0].parameters == {"m": {1: "one"}}


def test_unknown_tag_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="unknown record tag"):
        from_wire(["frobnicated", "p", 1.0])


@pytest.mark.parametrize(
    "wire",
    [
        [],
        ["created"],
        ["created", "p"],
        ["added", "p", 5, 1.0],
        ["added", "p", [["c-1", "r"]], 1.0],
        ["leased", "c", 1],
        ["completed", "c", True],
        [SUBMITTED_ONE, "p", "c", "r", "a", b"\x80"],
        None,
    ],
    ids=repr,
)
def test_malformed_record_is_a_value_error(wire: Any) -> None:
    with pytest.raises(ValueError):
        from_wire(wire)


@pytest.mark.parametrize(
    "wire",
    [{}, {"tag": "created"}, ["added", "p", [{"id": "c"}], 1.0]],
    ids=repr,
)
def test_map_shaped_record_is_a_value_error(wire: Any) -> None:
    # A log frame that decodes to a map (or a map where a command spec belongs) is a
    # malformed record; from_wire promises ValueError, not a KeyError from indexing.
    with pytest.raises(ValueError):
        from_wire(wire)


def test_to_wire_refuses_a_non_record() -> None:
    with pytest.raises(TypeError):
        to_wire(("created", "p", 1.0))  # type: ignore[arg-type]
