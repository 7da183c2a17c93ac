"""Codec tests, h11-style: literal bytes in, events asserted; replies in, bytes asserted."""

from __future__ import annotations

import itertools
import json
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spinbroker.codec import (
    MAX_ID,
    TEXT_USAGE,
    UNPACKERS,
    BadInput,
    Mode,
    Request,
    ServerCodec,
)
from spinbroker.errors import BrokerError, ErrorCode
from spinbroker.requests import command_list
from spinbroker.schema import MAX_NESTING
from spinbroker.textmode import PLAIN_MAX_DEPTH, TOO_DEEP

Event = Request | BadInput


def events_of(*chunks: bytes, max_frame: int = 1 << 20) -> list[Event]:
    codec = ServerCodec(max_frame)
    events: list[Event] = []
    for chunk in chunks:
        codec.receive_data(chunk)
        events += codec.next_events()
    return events


def pack(*values: Any) -> bytes:
    return b"".join(msgpack.packb(v, use_bin_type=True) for v in values)


def error_of(event: Event) -> tuple[ErrorCode, bool]:
    assert isinstance(event, BadInput), event
    return event.error.code, event.fatal


def text(line: str) -> Event:
    """The single event of one text line."""
    [event] = events_of(line.encode() + b"\n")
    return event


def args_of(line: str) -> dict[str, Any]:
    event = text(line)
    assert isinstance(event, Request), event
    return event.args


# Mode ------------------------------------------------------------------------------


@pytest.mark.parametrize("first", [0x90, 0x93, 0x9F, 0xDC, 0xDD])
def test_msgpack_array_first_byte_selects_msgpack(first: int) -> None:
    codec = ServerCodec()
    assert codec.mode is None
    codec.receive_data(bytes([first]))
    assert codec.mode is Mode.MSGPACK


@pytest.mark.parametrize("first", [b"P", b"p", b"\n", b" ", b"\x80", b"\xa4", b"\xde", b"\xff"])
def test_any_other_first_byte_selects_text(first: bytes) -> None:
    codec = ServerCodec()
    codec.receive_data(first)
    assert codec.mode is Mode.TEXT


def test_mode_is_kept_for_the_connection() -> None:
    codec = ServerCodec()
    codec.receive_data(b"PING\n")
    codec.receive_data(pack([1, "PING"]))
    assert codec.mode is Mode.TEXT


def test_no_events_and_no_replies_before_any_byte() -> None:
    codec = ServerCodec()
    assert codec.next_events() == []
    with pytest.raises(RuntimeError):
        codec.encode_error(None, None, BrokerError(ErrorCode.INTERNAL, "x"))


def test_max_frame_must_be_positive() -> None:
    with pytest.raises(ValueError):
        ServerCodec(0)


# msgpack mode: requests --------------------------------------------------------------


def test_msgpack_request_with_and_without_args() -> None:
    frames = pack([7, "next", {"resource": "storage", "timeout": 0}], [8, "PING"])
    assert events_of(frames) == [
        Request(7, "NEXT", {"resource": "storage", "timeout": 0}),
        Request(8, "PING", {}),
    ]


def test_msgpack_unknown_verb_passes_through_upper_cased() -> None:
    assert events_of(pack([1, "frob", {}])) == [Request(1, "FROB", {})]


def test_msgpack_args_keep_their_types() -> None:
    params = {"n": 50, "f": 0.5, "b": b"\x00\xff", "flag": True, "nil": None, "m": {"l": [1, "x"]}}
    [event] = events_of(pack([1, "ADD", {"parameters": params, 3: "int key"}]))
    assert isinstance(event, Request)
    assert event.args == {"parameters": params, 3: "int key"}
    assert type(event.args["parameters"]["b"]) is bytes


def test_msgpack_frame_split_at_every_offset() -> None:
    frame = pack([42, "ADD", {"package": "p", "parameters": {"vm": {"Name": "x"}, "size": 50}}])
    expected = [Request(42, "ADD", msgpack.unpackb(frame)[2])]
    for cut in range(1, len(frame)):
        assert events_of(frame[:cut], frame[cut:]) == expected, cut


def test_msgpack_frame_fed_byte_by_byte() -> None:
    frame = pack([1, "STATUS", {"id": "abc", "commands": True}])
    assert events_of(*(frame[i : i + 1] for i in range(len(frame)))) == [
        Request(1, "STATUS", {"id": "abc", "commands": True})
    ]


def test_many_pipelined_frames_in_a_chunk_larger_than_max_frame() -> None:
    frames = pack(*([i, "PING"] for i in range(1000)))
    assert len(frames) > 64 * 50
    events = events_of(frames, max_frame=64)
    assert events == [Request(i, "PING", {}) for i in range(1000)]


def test_pipelined_chunks_that_cut_frames_anywhere() -> None:
    frames = pack(*([i, "NEXT", {"resource": "r" * (i % 7)}] for i in range(300)))
    chunks = [frames[i : i + 97] for i in range(0, len(frames), 97)]
    events = events_of(*chunks, max_frame=64)
    assert events == [Request(i, "NEXT", {"resource": "r" * (i % 7)}) for i in range(300)]


def test_receive_data_may_be_called_many_times_before_next_events() -> None:
    codec = ServerCodec(64)
    for i in range(100):
        codec.receive_data(pack([i, "PING"]))
    assert codec.next_events() == [Request(i, "PING", {}) for i in range(100)]
    assert codec.next_events() == []


def test_a_frame_exactly_max_frame_bytes_is_accepted() -> None:
    frame = pack([1, "PING", {"pad": "x" * 40}])
    assert events_of(frame, max_frame=len(frame)) == [Request(1, "PING", {"pad": "x" * 40})]


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_a_frame_one_byte_over_max_frame_is_too_large_and_fatal(chunk: int) -> None:
    frame = pack([1, "PING", {"pad": "x" * 40}])
    before, after = pack([0, "PING"]), pack([2, "PING"])
    data = before + frame + after
    events = events_of(
        *(data[i : i + chunk] for i in range(0, len(data), chunk)), max_frame=len(frame) - 1
    )
    assert events[0] == Request(0, "PING", {})
    assert error_of(events[1]) == (ErrorCode.TOO_LARGE, True)
    assert (events[1].id, events[1].verb) == (None, None)
    assert len(events) == 2  # nothing after the fatal event


def test_a_value_of_many_small_items_is_too_large() -> None:
    # Each array is small, so only counting from the start of the value catches this.
    nested = [[1] * 50 for _ in range(20)]
    frame = pack([1, "ADD", {"parameters": {"a": nested}}])
    assert len(frame) > 1000
    for chunk in (len(frame), 100):
        parts = [frame[i : i + chunk] for i in range(0, len(frame), chunk)]
        [event] = events_of(*parts, max_frame=256)
        assert error_of(event) == (ErrorCode.TOO_LARGE, True)


def test_an_array_announcing_more_items_than_max_frame_is_refused_at_once() -> None:
    [event] = events_of(b"\xdd\x00\x0f\xff\xff", max_frame=1024)  # ~1M items announced
    assert error_of(event) == (ErrorCode.TOO_LARGE, True)
    [event] = events_of(b"\x92\x01\xc9\xff\xff\xff\xff\x05", max_frame=1024)  # a 4 GiB ext
    assert error_of(event) == (ErrorCode.TOO_LARGE, True)


@pytest.mark.parametrize(
    "header",
    [b"\xdb\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff"],
    ids=["str32", "bin32"],
)
def test_a_body_announcing_4_gib_is_too_large_once_max_frame_bytes_arrived(header: bytes) -> None:
    """Unlike an array's, a str or bin header is not refused when read (the Unpacker
    checks those lengths only once the body is buffered); audit h1 (t27) found the comment
    saying otherwise. What holds: nothing past max_frame is buffered, then too_large."""
    codec = ServerCodec(1024)
    codec.receive_data(b"\x92\x01" + header)
    assert codec.next_events() == []
    codec.receive_data(b"x" * 1000)
    assert codec.next_events() == []
    codec.receive_data(b"x" * 100_000)
    [event] = codec.next_events()
    assert error_of(event) == (ErrorCode.TOO_LARGE, True)


def test_an_endless_array_is_refused_without_reading_it_all() -> None:
    codec = ServerCodec(1024)
    codec.receive_data(b"\xdc\x03\xe8")  # 1000 items, each of 16 bytes
    events: list[Event] = []
    for _ in range(100):
        codec.receive_data((b"\x9f" + b"\x01" * 15) * 10)
        events += codec.next_events()
    [event] = events
    assert error_of(event) == (ErrorCode.TOO_LARGE, True)


def test_nothing_after_a_fatal_event() -> None:
    codec = ServerCodec()
    codec.receive_data(pack([1, "PING"]) + b"\x91\xc1")
    assert [type(e) for e in codec.next_events()] == [Request, BadInput]
    codec.receive_data(pack([2, "PING"]))
    assert codec.next_events() == []


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(b"\x93\x01\xa4PING\xc1", id="reserved-byte-0xc1"),
        pytest.param(b"\x93\x01\xa4PING\x81\xa1k\xa2\xff\xfe", id="str-not-utf8"),
        pytest.param(b"\x93\x01\xa4PING\x81\x91\x01\x01", id="list-as-map-key"),
        pytest.param(b"\x91" * 5000, id="nested-too-deep"),
        pytest.param(b"\x92\x01\xc7\x05\xff\x00\x00\x00\x00\x00", id="bad-timestamp-ext"),
    ],
)
def test_invalid_msgpack_is_malformed_and_fatal(garbage: bytes) -> None:
    events = events_of(pack([0, "PING"]) + garbage + pack([9, "PING"]))
    assert events[0] == Request(0, "PING", {})
    assert error_of(events[1]) == (ErrorCode.MALFORMED, True)
    assert len(events) == 2


@pytest.mark.parametrize(
    ("value", "rid", "verb"),
    [
        ({"id": 1}, None, None),
        ("PING", None, None),
        (5, None, None),
        ([], None, None),
        ([1], 1, None),
        ([1, "ping", {}, 4], 1, "PING"),
        (["1", "PING"], None, "PING"),
        ([True, "PING"], None, "PING"),
        ([1.0, "PING"], None, "PING"),
        ([-1, "PING"], -1, "PING"),
        ([MAX_ID + 1, "PING"], MAX_ID + 1, "PING"),
        ([3, 4], 3, None),
        ([3, b"PING"], 3, None),
        ([3, "ping", [1]], 3, "PING"),
        ([3, "PING", None], 3, "PING"),
    ],
)
def test_wrong_shapes_are_bad_request_and_not_fatal(value: Any, rid: Any, verb: Any) -> None:
    events = events_of(pack([0, "PING"], value, [MAX_ID, "PING"]))
    assert events[0] == Request(0, "PING", {})
    bad = events[1]
    assert isinstance(bad, BadInput)
    assert (bad.id, bad.verb, bad.error.code, bad.fatal) == (
        rid,
        verb,
        ErrorCode.BAD_REQUEST,
        False,
    )
    assert "[id, verb, args?]" in bad.error.message
    assert events[2] == Request(MAX_ID, "PING", {})


def nest(depth: int, leaf: Any = 1) -> Any:
    """`leaf` inside `depth` lists."""
    for _ in range(depth):
        leaf = [leaf]
    return leaf


@pytest.mark.parametrize(
    ("parameters", "deep"),
    [
        # args 1 > commands 2 > a command 3 > parameters 4 > x from level 5 on
        ({"x": nest(MAX_NESTING - 4)}, False),
        ({"x": nest(MAX_NESTING - 3)}, True),
        ({"x": nest(1015)}, True),  # deep enough for repr() to exhaust the recursion limit
        ({"a": [{"b": [1]}] * 3, "c": "d" * 100}, False),
    ],
)
def test_parameters_nest_at_most_max_nesting_levels_from_the_args_map(
    parameters: dict[str, Any], deep: bool
) -> None:
    """msgpack reads 1024 levels. The codec passes a request on as it is (its hot path
    checks no depth); parameters, the only args that may nest (schemas aside), are refused
    past MAX_NESTING levels, counted from the args map as in text mode, so nothing
    downstream (a text-mode reply, a deep copy, a message) sees such a value (audit h1)."""
    (event,) = events_of(
        pack(
            [
                1,
                "submit",
                {"commands": [{"resource": "r", "action": "a", "parameters": parameters}]},
            ]
        )
    )
    assert isinstance(event, Request) and (event.id, event.verb) == (1, "SUBMIT")
    args = event.args
    if not deep:
        assert command_list(args, positions=True)[0].parameters == parameters
        return
    with pytest.raises(BrokerError) as refused:
        command_list(args, positions=True)
    assert refused.value.code is ErrorCode.BAD_REQUEST
    assert f"nested more than {MAX_NESTING} levels" in refused.value.message


def test_text_args_nest_as_deep_as_msgpack_args() -> None:
    """The limit counts from the args map in both modes, so a line reads as deep as the
    msgpack request it maps to."""
    ok = "[" * (MAX_NESTING - 2) + "]" * (MAX_NESTING - 2)
    assert args_of(f"ADD p r a x={ok}")["parameters"]["x"] == nest(MAX_NESTING - 3, [])
    event = text(f"ADD p r a x=[{ok}]")
    assert isinstance(event, BadInput)
    assert (event.verb, event.error.code, event.fatal) == ("ADD", ErrorCode.BAD_REQUEST, False)
    assert f"nested more than {MAX_NESTING} levels" in event.error.message
    event = text(f'SUBMIT [{{"resource":"r","action":"a","parameters":{{"x":{ok}}}}}]')
    assert isinstance(event, BadInput)
    assert event.error.code is ErrorCode.BAD_REQUEST


def test_bytes_given_to_receive_data_may_be_reused_by_the_caller() -> None:
    codec = ServerCodec(16)
    data = bytearray(pack(*([i, "PING"] for i in range(20))))
    codec.receive_data(memoryview(data))
    data[:] = b"\x00" * len(data)
    assert codec.next_events() == [Request(i, "PING", {}) for i in range(20)]


# msgpack mode: Unpackers lent from a pool ---------------------------------------------


def test_a_connection_between_requests_holds_no_unpacker() -> None:
    """An Unpacker costs ~45 KB: a connection borrows one only while bytes of an
    unfinished value are buffered (a max_frame no other test uses keeps this pool apart)."""
    size = 4321
    whole, part = pack([1, "PING"]), pack([2, "NEXT", {"resource": "r"}])
    a, b, c = ServerCodec(size), ServerCodec(size), ServerCodec(size)
    a.receive_data(whole)
    assert a.next_events() == [Request(1, "PING", {})]
    assert UNPACKERS.idle(size) == 1  # a gave its Unpacker back
    b.receive_data(part[:5])
    assert b.next_events() == []
    assert UNPACKERS.idle(size) == 0  # b holds it: 5 bytes of a value
    c.receive_data(whole)
    assert c.next_events() == [Request(1, "PING", {})]
    assert UNPACKERS.idle(size) == 1  # c made a second one and gave it back
    b.receive_data(part[5:] + whole)
    assert b.next_events() == [Request(2, "NEXT", {"resource": "r"}), Request(1, "PING", {})]
    assert UNPACKERS.idle(size) == 2


@settings(max_examples=200, deadline=None)
@given(
    cuts=st.lists(st.tuples(st.integers(0, 2), st.integers(1, 40)), min_size=1, max_size=60),
    max_frame=st.sampled_from([64, 1 << 20]),
)
def test_connections_reading_in_turns_each_get_their_own_requests(
    cuts: list[tuple[int, int]], max_frame: int
) -> None:
    """Three connections whose bytes arrive in turns, cut anywhere: the Unpackers they
    borrow and give back never mix their streams."""
    streams = [
        pack(*([k * 1000 + i, "NEXT", {"resource": "r" * (i % 5 + k)}] for i in range(12)))
        for k in range(3)
    ]
    codecs = [ServerCodec(max_frame) for _ in range(3)]
    got: list[list[Event]] = [[], [], []]
    sent = [0, 0, 0]
    for k, n in [*cuts, (0, 10**6), (1, 10**6), (2, 10**6)]:
        chunk = streams[k][sent[k] : sent[k] + n]
        sent[k] += len(chunk)
        codecs[k].receive_data(chunk)
        got[k] += codecs[k].next_events()
    for k in range(3):
        expected = [
            Request(k * 1000 + i, "NEXT", {"resource": "r" * (i % 5 + k)}) for i in range(12)
        ]
        assert got[k] == expected


# msgpack mode: replies ---------------------------------------------------------------


def msgpack_codec() -> ServerCodec:
    codec = ServerCodec()
    codec.receive_data(pack([1, "PING"]))
    return codec


def test_msgpack_reply_ok() -> None:
    codec = msgpack_codec()
    body = {"id": "c", "parameters": {"b": b"\x01", "n": 5}, "ttr": None}
    data = codec.encode_reply(Request(5, "NEXT", {}), "ok", body)
    assert data == msgpack.packb([5, "ok", body], use_bin_type=True)
    assert msgpack.unpackb(data) == [5, "ok", body]


def test_msgpack_reply_empty() -> None:
    data = msgpack_codec().encode_reply(Request(6, "WAIT", {}), "empty", None)
    assert data == b"\x93\x06\xa5empty\xc0"


def test_msgpack_reply_error() -> None:
    codec = msgpack_codec()
    err = BrokerError(ErrorCode.NOT_FOUND, "no package 'x'")
    data = codec.encode_error(7, "STATUS", err)
    assert msgpack.unpackb(data) == [7, "error", {"code": "not_found", "message": "no package 'x'"}]
    data = codec.encode_error(None, None, BrokerError(ErrorCode.MALFORMED, "bad"))
    assert msgpack.unpackb(data) == [None, "error", {"code": "malformed", "message": "bad"}]


def test_msgpack_packer_recovers_from_an_unpackable_body() -> None:
    codec = msgpack_codec()
    with pytest.raises(TypeError):
        codec.encode_reply(Request(1, "STATS", {}), "ok", object())
    assert msgpack.unpackb(codec.encode_reply(Request(2, "PING", {}), "ok", "pong")) == [
        2,
        "ok",
        "pong",
    ]


# text mode: the verbs ----------------------------------------------------------------

PKG = "5f0c2d1e-8b7a-4c3d-9e21-000000000001"


@pytest.mark.parametrize(
    ("line", "verb", "args"),
    [
        ("HELLO", "HELLO", {}),
        ("PING", "PING", {}),
        ("NEW", "NEW", {}),
        ("STATS", "STATS", {}),
        ("HELP", "HELP", {}),
        ("QUIT", "QUIT", {}),
        ("ping", "PING", {}),
        ("Quit", "QUIT", {}),
        (
            f"ADD {PKG} storage add_volume path=test",
            "ADD",
            {
                "package": PKG,
                "resource": "storage",
                "action": "add_volume",
                "parameters": {"path": "test"},
                "dependencies": [],
            },
        ),
        (
            "add p storage create_image volume_path=test image_size=50 --dep c1 --dep=c2",
            "ADD",
            {
                "package": "p",
                "resource": "storage",
                "action": "create_image",
                "parameters": {"volume_path": "test", "image_size": 50},
                "dependencies": ["c1", "c2"],
            },
        ),
        (
            "ADD 1 2 3 --dep 4",
            "ADD",
            {
                "package": "1",
                "resource": "2",
                "action": "3",
                "parameters": {},
                "dependencies": ["4"],
            },
        ),
        (
            'ADD p [{"resource": "r", "action": "a", "parameters": {"n": 1}}, {"resource": "s"}]',
            "ADD",
            {
                "package": "p",
                "commands": [
                    {"resource": "r", "action": "a", "parameters": {"n": 1}},
                    {"resource": "s"},
                ],
            },
        ),
        (f"ENQUEUE {PKG}", "ENQUEUE", {"package": PKG}),
        ("CANCEL 12", "CANCEL", {"package": "12"}),
        (
            'SUBMIT [{"resource": "r", "action": "a", "dependencies": [0]}]',
            "SUBMIT",
            {"commands": [{"resource": "r", "action": "a", "dependencies": [0]}]},
        ),
        ("STATUS 123", "STATUS", {"id": "123", "commands": False}),
        ("STATUS abc --commands", "STATUS", {"id": "abc", "commands": True}),
        ("WAIT p", "WAIT", {"package": "p"}),
        ("WAIT p 2.5", "WAIT", {"package": "p", "timeout": 2.5}),
        ("NEXT storage", "NEXT", {"resource": "storage"}),
        ("NEXT storage 0", "NEXT", {"resource": "storage", "timeout": 0}),
        ("NEXT storage 0 30", "NEXT", {"resource": "storage", "timeout": 0, "ttr": 30}),
        ('NEXT "--odd"', "NEXT", {"resource": "--odd"}),
        ("TOUCH c", "TOUCH", {"command": "c"}),
        ("TOUCH c 60", "TOUCH", {"command": "c", "ttr": 60}),
        ("TOUCH c 60 --delivery 2", "TOUCH", {"command": "c", "ttr": 60, "delivery": 2}),
        ("TOUCH c --delivery=2", "TOUCH", {"command": "c", "delivery": 2}),
        ("COMPLETE c true", "COMPLETE", {"command": "c", "success": True}),
        ("COMPLETE c FALSE", "COMPLETE", {"command": "c", "success": False}),
        (
            'COMPLETE c false   disk full: {no space} "left"  ',
            "COMPLETE",
            {"command": "c", "success": False, "reason": 'disk full: {no space} "left"'},
        ),
        (
            "COMPLETE c false --delivery 3 timed out",
            "COMPLETE",
            {"command": "c", "success": False, "delivery": 3, "reason": "timed out"},
        ),
        (
            "COMPLETE c true --delivery=3",
            "COMPLETE",
            {"command": "c", "success": True, "delivery": 3},
        ),
        ("FROB a b {broken", "FROB", {}),
        ("   \tPING", "PING", {}),
    ],
)
def test_text_verb_maps_to_msgpack_args(line: str, verb: str, args: dict[str, Any]) -> None:
    assert text(line) == Request(None, verb, args)


def test_text_parameters_are_typed_like_json() -> None:
    line = (
        "ADD p r a image_size=50 ratio=0.5 neg=-3 big=1e3 flag=true off=false nothing=null "
        'path=test version=1.2.3 zip=007 nan=NaN name="a b" '
        'vm={"Name": "x", "disks": [{"size": 10}, {"size": 20}]} tags=["a b", 1] empty='
    )
    assert args_of(line)["parameters"] == {
        "image_size": 50,
        "ratio": 0.5,
        "neg": -3,
        "big": 1000.0,
        "flag": True,
        "off": False,
        "nothing": None,
        "path": "test",
        "version": "1.2.3",
        "zip": "007",
        "nan": "NaN",
        "name": "a b",
        "vm": {"Name": "x", "disks": [{"size": 10}, {"size": 20}]},
        "tags": ["a b", 1],
        "empty": "",
    }
    assert type(args_of("ADD p r a n=50")["parameters"]["n"]) is int


def test_text_json_values_may_hold_spaces_tabs_and_equals() -> None:
    line = 'SUBMIT [ {"resource" :\t"r", "action": "a",  "parameters": {"q": "x = y"}} ]'
    assert args_of(line) == {
        "commands": [{"resource": "r", "action": "a", "parameters": {"q": "x = y"}}]
    }


@pytest.mark.parametrize(
    ("line", "verb", "fragment"),
    [
        ("PING now", "PING", "unexpected 'now'; usage: PING"),
        ("ADD", "ADD", "missing <pkg>"),
        ("ADD p", "ADD", "missing <resource> <action>"),
        ("ADD p r", "ADD", "missing <action>"),
        ("ADD p r a stray", "ADD", "expected key=value or --dep <id>, got 'stray'"),
        ("ADD p r a x=1 x=2", "ADD", "parameter 'x' given twice"),
        ("ADD p r a --dep", "ADD", "--dep needs a value"),
        ("ADD p r a --dep=", "ADD", "command id"),
        ("ADD p r a --deps x", "ADD", "got '--deps'"),
        ('ADD p r a vm={"a": 1', "ADD", "bad JSON at column"),
        ('ADD p r a vm={"a": 1}x', "ADD", "right after a JSON value"),
        ("ADD p r a x=[NaN]", "ADD", "NaN is not JSON"),
        ('ADD p [{"resource": "r"}] more', "ADD", "unexpected 'more'"),
        ('ADD p {"resource": "r"} a', "ADD", "expected <resource> (a string)"),
        ("ENQUEUE", "ENQUEUE", "missing <pkg>; usage: ENQUEUE <pkg>"),
        ("ENQUEUE a b", "ENQUEUE", "unexpected 'b'"),
        ("CANCEL p=1", "CANCEL", "expected <pkg>, got 'p=1'"),
        ("SUBMIT", "SUBMIT", "expected a JSON list of commands, got nothing"),
        ('SUBMIT {"resource": "r"}', "SUBMIT", "expected a JSON list of commands"),
        ("SUBMIT [1, 2", "SUBMIT", "bad JSON at column"),
        ("ANNOUNCE", "ANNOUNCE", "missing <resource>"),
        ("ANNOUNCE r", "ANNOUNCE", "expected a JSON schema map, got nothing"),
        ("ANNOUNCE r [1]", "ANNOUNCE", "expected a JSON schema map, got '[1]'"),
        ('ANNOUNCE r {"schema": 1} x', "ANNOUNCE", "unexpected 'x'"),
        ('ANNOUNCE {"schema": 1}', "ANNOUNCE", "expected <resource>"),
        ("STATUS", "STATUS", "missing <id>"),
        ("STATUS --commands", "STATUS", "got option '--commands'"),
        ("STATUS x --all", "STATUS", "unknown option '--all'"),
        ("WAIT p soon", "WAIT", "timeout must be a number of seconds, got 'soon'"),
        ("WAIT p true", "WAIT", "timeout must be a number"),
        ('WAIT p "5"', "WAIT", "timeout must be a number"),
        ("WAIT p 1 2", "WAIT", "unexpected '2'"),
        ("NEXT", "NEXT", "usage: NEXT <resource> [timeout] [ttr]"),
        ("NEXT r 1 x", "NEXT", "ttr must be a number"),
        ("TOUCH c --delivery x", "TOUCH", "--delivery needs an integer, got 'x'"),
        ("TOUCH c --delivery 1.5", "TOUCH", "--delivery needs an integer"),
        ("TOUCH c 1 2", "TOUCH", "unexpected '2'"),
        ("COMPLETE c", "COMPLETE", "the status must be true or false, got nothing"),
        ("COMPLETE c yes", "COMPLETE", "got 'yes'; usage: COMPLETE <cmd> true|false"),
        ("COMPLETE c true --delivery", "COMPLETE", "--delivery needs a value"),
        ("COMPLETE c true --delivery=two", "COMPLETE", "--delivery needs an integer"),
    ],
)
def test_text_bad_requests_say_what_was_expected(line: str, verb: str, fragment: str) -> None:
    event = text(line)
    assert isinstance(event, BadInput), event
    assert (event.id, event.verb, event.error.code, event.fatal) == (
        None,
        verb,
        ErrorCode.BAD_REQUEST,
        False,
    )
    assert fragment in event.error.message
    assert event.error.message.endswith("usage: " + TEXT_USAGE[verb])


_SURROGATE = "lone surrogate '\\ud800'"
_OUT_OF_RANGE = "outside the integer range -2^63 to 2^64-1"
_TOO_DEEP = "maps and lists nested more than 100 levels deep"


@pytest.mark.parametrize(
    ("line", "verb", "fragment"),
    [
        # Every verb that takes JSON: the value is refused before anything can store it.
        (
            'ANNOUNCE sur {"schema":1,"actions":{"a":{"description":"\\ud800"}}}',
            "ANNOUNCE",
            _SURROGATE,
        ),
        (
            'ANNOUNCE r {"schema":1,"x":99999999999999999999999}',
            "ANNOUNCE",
            "outside msgpack's range",
        ),
        (
            'SUBMIT [{"resource":"r","action":"a","parameters":{"x":"\\ud800"}}]',
            "SUBMIT",
            _SURROGATE,
        ),
        ('SUBMIT [{"resource":"r","action":"a","parameters":{"\\ud800":1}}]', "SUBMIT", _SURROGATE),
        (
            'ADD p [{"resource":"r","action":"a","parameters":{"x":-9223372036854775809}}]',
            "ADD",
            "range",
        ),
        ('ADD p r a x="\\udfff"', "ADD", "lone surrogate '\\udfff'"),
        ('ADD p r a x=["ok",{"k":"\\ud800"}]', "ADD", _SURROGATE),
        ('ADD p r a --dep "\\ud800"', "ADD", _SURROGATE),
        ('STATUS "\\ud800"', "STATUS", _SURROGATE),
        ('NEXT "\\ud800" 0', "NEXT", _SURROGATE),
        # Bare numbers are JSON too.
        ("ADD p r a x=18446744073709551616", "ADD", _OUT_OF_RANGE),
        ("ADD p r a x=-9223372036854775809", "ADD", _OUT_OF_RANGE),
        ("ADD p r a x=" + "9" * 5000, "ADD", _OUT_OF_RANGE),  # past Python's digit limit
        ("NEXT r " + "9" * 400, "NEXT", _OUT_OF_RANGE),
        ("WAIT p " + "9" * 400, "WAIT", _OUT_OF_RANGE),
        ("TOUCH c " + "9" * 400, "TOUCH", _OUT_OF_RANGE),
        ("COMPLETE c true --delivery " + "9" * 400, "COMPLETE", _OUT_OF_RANGE),
        # Depth: past the limit, and far past Python's recursion limit.
        ("ADD p r a x=" + "[" * 101 + "]" * 101, "ADD", _TOO_DEEP),
        ("ADD p r a x=" + "[" * 5000 + "]" * 5000, "ADD", _TOO_DEEP),
        ("SUBMIT " + "[" * 5000 + "]" * 5000, "SUBMIT", _TOO_DEEP),
        ('ANNOUNCE r {"a":' + '{"a":' * 5000 + "1" + "}" * 5001, "ANNOUNCE", _TOO_DEEP),
    ],
)
def test_text_json_msgpack_cannot_carry_is_a_bad_request(
    line: str, verb: str, fragment: str
) -> None:
    """Audit h1: a lone surrogate or a huge int passed to the core (and an ANNOUNCE holding
    one poisoned the log); a number of 400 digits made NEXT, WAIT and TOUCH fail with an
    internal OverflowError; JSON 5000 levels deep raised RecursionError out of the codec,
    which closed the connection without a reply."""
    event = text(line)
    assert isinstance(event, BadInput), event
    assert (event.verb, event.error.code, event.fatal) == (verb, ErrorCode.BAD_REQUEST, False)
    assert fragment in event.error.message


def test_text_json_msgpack_can_carry_is_taken() -> None:
    deep = "[" * 98 + "1" + "]" * 98
    args = args_of(
        f'ADD p r a big=18446744073709551615 small=-9223372036854775808 s="\\ud83d\\ude00" d={deep}'
    )
    assert args["parameters"]["big"] == 2**64 - 1
    assert args["parameters"]["small"] == -(2**63)
    assert args["parameters"]["s"] == "\U0001f600"  # a surrogate pair is one character
    msgpack.packb(args)
    assert args_of("ADD p r a id=007 v=1.2.3")["parameters"] == {"id": "007", "v": "1.2.3"}


def test_text_usage_covers_every_verb_consistently() -> None:
    verbs = ["HELLO", "PING", "NEW", "ADD", "ENQUEUE", "SUBMIT", "STATUS", "WAIT", "NEXT"]
    verbs += ["TOUCH", "COMPLETE", "CANCEL", "ANNOUNCE", "STATS", "HELP", "QUIT"]
    assert list(TEXT_USAGE) == verbs
    for verb, usage in TEXT_USAGE.items():
        assert usage.startswith(verb)
        assert ";" not in usage  # HELP joins the lines with "; "
        event = text(verb.lower())
        if usage == verb:  # takes no arguments
            assert event == Request(None, verb, {})
        else:  # a known verb missing its arguments, not an unknown verb
            assert error_of(event) == (ErrorCode.BAD_REQUEST, False)
            assert event.error.message.endswith("usage: " + usage)  # type: ignore[union-attr]


# text mode: framing ------------------------------------------------------------------


def test_text_lines_in_one_chunk_with_lf_crlf_and_blank_lines() -> None:
    data = b"PING\r\n\n   \r\n\t\nNEW\nSTATUS x\r\n\r\n"
    assert events_of(data) == [
        Request(None, "PING", {}),
        Request(None, "NEW", {}),
        Request(None, "STATUS", {"id": "x", "commands": False}),
    ]


def test_only_one_cr_is_stripped() -> None:
    # Only spaces and tabs separate tokens: a second "\r" is part of the id.
    assert events_of(b"STATUS x\r\r\n") == [
        Request(None, "STATUS", {"id": "x\r", "commands": False})
    ]


def test_text_line_split_at_every_offset() -> None:
    line = b'ADD p r a vm={"Name": "x y"} n=5 --dep c\r\n'
    expected = [
        Request(
            None,
            "ADD",
            {
                "package": "p",
                "resource": "r",
                "action": "a",
                "parameters": {"vm": {"Name": "x y"}, "n": 5},
                "dependencies": ["c"],
            },
        )
    ]
    for cut in range(1, len(line)):
        assert events_of(line[:cut], line[cut:]) == expected, cut


def test_text_needs_the_newline() -> None:
    codec = ServerCodec()
    codec.receive_data(b"PING")
    assert codec.next_events() == []
    codec.receive_data(b"\nPI")
    assert codec.next_events() == [Request(None, "PING", {})]


def test_empty_data_changes_nothing() -> None:
    codec = ServerCodec()
    codec.receive_data(b"")
    assert codec.mode is None
    codec.receive_data(b"PI")
    codec.receive_data(b"")
    codec.receive_data(b"NG\n")
    assert codec.next_events() == [Request(None, "PING", {})]


def too_large(event: Event) -> bool:
    return error_of(event) == (ErrorCode.TOO_LARGE, False) and event.verb is None


def test_oversize_line_is_skipped_across_chunks_then_the_next_line_works() -> None:
    codec = ServerCodec(16)
    codec.receive_data(b"PING\nADD p r a x=" + b"1" * 20)
    first = codec.next_events()
    assert first[0] == Request(None, "PING", {})
    assert too_large(first[1]) and len(first) == 2
    codec.receive_data(b"2" * 100)
    assert codec.next_events() == []
    codec.receive_data(b"3" * 100 + b"\r\nNEW\n")
    assert codec.next_events() == [Request(None, "NEW", {})]


def test_oversize_line_in_one_chunk() -> None:
    events = events_of(b"STATUS " + b"x" * 100 + b"\nPING\n", max_frame=16)
    assert too_large(events[0])
    assert events[1:] == [Request(None, "PING", {})]


def test_line_of_exactly_max_frame_bytes_is_read_with_or_without_cr() -> None:
    line = b"STATUS " + b"x" * 9
    assert len(line) == 16
    for ending in (b"\n", b"\r\n"):
        for cut in range(1, len(line) + len(ending)):
            data = line + ending
            [event] = events_of(data[:cut], data[cut:], max_frame=16)
            assert event == Request(None, "STATUS", {"id": "x" * 9, "commands": False})
    [event] = events_of(line + b"x\n", max_frame=16)
    assert too_large(event)


def test_non_ascii_outside_json_strings_is_malformed_not_fatal() -> None:
    events = events_of("ADD p r a name=été\nPING\n".encode())
    assert error_of(events[0]) == (ErrorCode.MALFORMED, False)
    assert "'é' at column 16" in events[0].error.message  # type: ignore[union-attr]
    assert events[0].verb == "ADD"  # type: ignore[union-attr]
    assert events[1] == Request(None, "PING", {})


@pytest.mark.parametrize(
    "line",
    [
        "PÏNG",
        "STATUS ünïcode",
        'ADD p r a vm={"a": é}',
        'ADD p r a vm={"a": 1 é}',
        'ADD p r a vm={"a": 1}é',
        "COMPLETE c false déjà vu",
        "FROB ü",
    ],
)
def test_non_ascii_anywhere_but_json_strings_is_malformed(line: str) -> None:
    assert error_of(text(line)) == (ErrorCode.MALFORMED, False)


def test_non_ascii_inside_json_strings_is_fine() -> None:
    assert args_of('ADD p r a name="été" vm={"nom": ["ça"]}')["parameters"] == {
        "name": "été",
        "vm": {"nom": ["ça"]},
    }
    assert args_of('STATUS "idé"') == {"id": "idé", "commands": False}


def test_bytes_that_are_not_utf8_are_malformed() -> None:
    events = events_of(b"PING \xff\xfe\nPING\n")
    assert error_of(events[0]) == (ErrorCode.MALFORMED, False)
    assert events[1] == Request(None, "PING", {})
    assert error_of(events_of(b"\xffPING\n")[0]) == (ErrorCode.MALFORMED, False)


# text mode: replies ------------------------------------------------------------------


def text_codec() -> ServerCodec:
    codec = ServerCodec()
    codec.receive_data(b"\n")
    return codec


def reply(verb: str, kind: str, body: Any) -> bytes:
    return text_codec().encode_reply(Request(None, verb, {}), kind, body)


def test_text_replies_by_verb() -> None:
    assert reply("NEXT", "empty", None) == b"EMPTY\n"
    assert reply("WAIT", "empty", None) == b"EMPTY\n"
    assert reply("PING", "ok", "pong") == b"PONG\n"
    assert reply("NEW", "ok", {"package": PKG}) == f"OK {PKG}\n".encode()
    assert reply("ADD", "ok", {"command": "c1"}) == b"OK c1\n"
    assert reply("ADD", "ok", {"commands": ["c1", "c2"]}) == b'OK ["c1","c2"]\n'
    assert reply("ENQUEUE", "ok", {"commands": ["c1"]}) == b'OK ["c1"]\n'
    assert reply("HELP", "ok", ["PING", "NEW"]) == b"OK PING; NEW\n"
    assert reply("QUIT", "ok", None) == b"OK bye\n"
    assert reply("CANCEL", "ok", {"package": "p", "cancelled": 2}) == (
        b'OK {"package":"p","cancelled":2}\n'
    )
    assert reply("SUBMIT", "ok", {"package": "p", "commands": ["c"]}) == (
        b'OK {"package":"p","commands":["c"]}\n'
    )
    assert reply("STATS", "ok", None) == b"OK\n"


def test_text_reply_json_for_values_json_cannot_carry() -> None:
    body = {
        "parameters": {"b": b"\x00\x01\xff", "n": 1, "nested": {"t": (1, 2)}},
        7: "int key",
        None: "nil key",
        "nan": float("nan"),
        "ext": msgpack.ExtType(5, b"x"),
        "code": ErrorCode.NOT_FOUND,
        "text": "ça\nva",
    }
    line = reply("STATUS", "ok", body)
    assert line.endswith(b"\n") and line.count(b"\n") == 1 and line.isascii()
    assert line.startswith(b"OK {")
    assert json.loads(line[3:]) == {
        "parameters": {"b": "AAH/", "n": 1, "nested": {"t": [1, 2]}},
        "7": "int key",
        "None": "nil key",
        "nan": "nan",
        "ext": "ExtType(code=5, data=b'x')",
        "code": "not_found",
        "text": "ça\nva",
    }


def test_text_reply_of_a_value_deeper_than_any_request_is_one_line() -> None:
    """A command held from a log written before requests were bounded may nest 1000 levels;
    its delivery in text mode raised RecursionError in `_plain` (audit h1, t07)."""
    line = reply("NEXT", "ok", {"id": "c", "parameters": {"x": nest(1020)}})
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    got = json.loads(line[3:])["parameters"]["x"]
    for _ in range(PLAIN_MAX_DEPTH - 2):  # the body and parameters maps hold two levels
        [got] = got
    assert got == TOO_DEEP
    fine = nest(MAX_NESTING)
    assert json.loads(reply("NEXT", "ok", {"parameters": {"x": fine}})[3:])["parameters"] == {
        "x": fine
    }


def test_text_error_line() -> None:
    codec = text_codec()
    err = BrokerError(ErrorCode.UNKNOWN_VERB, "unknown verb 'FROB';\nHELP lists the verbs\r")
    assert codec.encode_error(None, "FROB", err) == (
        b"ERR unknown_verb unknown verb 'FROB'; HELP lists the verbs \n"
    )


def test_text_reply_kind_must_be_known() -> None:
    with pytest.raises(ValueError):
        reply("PING", "error", None)


# Properties --------------------------------------------------------------------------


def chunked(data: bytes, draw: st.DrawFn) -> list[bytes]:
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(1 << 63), (1 << 64) - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=10)
    | st.binary(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=12,
)
msgpack_requests = st.tuples(
    st.integers(0, MAX_ID),
    st.text(min_size=1, max_size=10),
    st.none() | st.dictionaries(st.text(max_size=8), msgpack_values, max_size=4),
)


@settings(max_examples=200)
@given(st.lists(msgpack_requests, max_size=20), st.data())
def test_msgpack_requests_survive_any_chunking(
    requests: list[tuple[int, str, dict[str, Any] | None]], data: st.DataObject
) -> None:
    frames = pack(
        *([rid, verb] if args is None else [rid, verb, args] for rid, verb, args in requests)
    )
    max_frame = max([64, *(len(pack(r)) for r in requests)])
    events = events_of(*chunked(frames, data.draw), max_frame=max_frame)
    assert events == [Request(rid, verb.upper(), args or {}) for rid, verb, args in requests]


words = st.from_regex(r"[A-Za-z0-9_.:@/][A-Za-z0-9_.:@/-]{0,15}", fullmatch=True)
keys = st.from_regex(r"[a-z_][a-z0-9_.]{0,10}", fullmatch=True)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(1 << 63), (1 << 64) - 1)  # what msgpack carries; more is refused
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
seconds = st.integers(0, 10**6) | st.floats(0, 1e6, allow_nan=False)
reasons = st.from_regex(r"[!-~]([ !-~]{0,20}[!-~])?", fullmatch=True).filter(
    lambda r: not r.lower().startswith("--delivery")
)


@st.composite
def text_requests(draw: st.DrawFn) -> tuple[list[str], Request]:
    """A request as the tokens a person types, and the Request it must read as."""
    verb = draw(st.sampled_from(sorted(TEXT_USAGE)))
    tokens: list[str] = []
    args: dict[str, Any] = {}
    if verb == "ADD" and draw(st.booleans()):
        commands = draw(st.lists(st.dictionaries(keys, json_values, max_size=3), max_size=3))
        args = {"package": draw(words), "commands": commands}
        tokens = [args["package"], json.dumps(commands, ensure_ascii=False)]
    elif verb == "ADD":
        params = draw(st.dictionaries(keys, json_values, max_size=4))
        deps = draw(st.lists(words, max_size=3))
        args = {"package": draw(words), "resource": draw(words), "action": draw(words)}
        args |= {"parameters": params, "dependencies": deps}
        tokens = [args["package"], args["resource"], args["action"]]
        tokens += [f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in params.items()]
        tokens += [draw(st.sampled_from(["--dep ", "--dep="])) + d for d in deps]
    elif verb in ("ENQUEUE", "CANCEL"):
        args = {"package": draw(words)}
        tokens = [args["package"]]
    elif verb == "SUBMIT":
        args = {
            "commands": draw(st.lists(st.dictionaries(keys, json_values, max_size=3), max_size=3))
        }
        tokens = [json.dumps(args["commands"], ensure_ascii=False)]
    elif verb == "ANNOUNCE":
        args = {
            "resource": draw(words),
            "schema": draw(st.dictionaries(keys, json_values, max_size=3)),
        }
        tokens = [args["resource"], json.dumps(args["schema"], ensure_ascii=False)]
    elif verb == "STATUS":
        args = {"id": draw(words), "commands": draw(st.booleans())}
        tokens = [args["id"], *(["--commands"] if args["commands"] else [])]
    elif verb in ("WAIT", "NEXT"):
        name = "package" if verb == "WAIT" else "resource"
        args = {name: draw(words)}
        tokens = [args[name]]
        optional = ["timeout"] if verb == "WAIT" else ["timeout", "ttr"]
        for key in optional[: draw(st.integers(0, len(optional)))]:
            args[key] = draw(seconds)
            tokens.append(json.dumps(args[key]))
    elif verb == "TOUCH":
        args = {"command": draw(words)}
        tokens = [args["command"]]
        if draw(st.booleans()):
            args["ttr"] = draw(seconds)
            tokens.append(json.dumps(args["ttr"]))
        if draw(st.booleans()):
            args["delivery"] = draw(st.integers(0, 100))
            tokens.append(f"--delivery {args['delivery']}")
    elif verb == "COMPLETE":
        args = {"command": draw(words), "success": draw(st.booleans())}
        status = draw(st.sampled_from([str.lower, str.upper, str.title]))
        tokens = [args["command"], status("true" if args["success"] else "false")]
        if draw(st.booleans()):
            args["delivery"] = draw(st.integers(0, 100))
            tokens.append(f"--delivery={args['delivery']}")
        if draw(st.booleans()):
            args["reason"] = draw(reasons)
            tokens.append(args["reason"])
    typed_verb = draw(st.sampled_from([verb, verb.lower(), verb.title()]))
    return [typed_verb, *tokens], Request(None, verb, args)


@settings(max_examples=200)
@given(
    st.lists(
        st.tuples(
            text_requests(),
            st.sampled_from([" ", "  ", "\t", " \t "]),
            st.sampled_from(["\n", "\r\n", "\n\n", " \r\n\t\n"]),
        ),
        max_size=10,
    ),
    st.data(),
)
def test_text_requests_survive_any_chunking(
    requests: list[tuple[tuple[list[str], Request], str, str]], data: st.DataObject
) -> None:
    stream = "".join(sep.join(tokens) + end for (tokens, _), sep, end in requests)
    events = events_of(*chunked(stream.encode(), data.draw))
    assert events == [request for (_, request), _, _ in requests]
