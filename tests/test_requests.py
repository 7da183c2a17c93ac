"""Typed reading of request arguments: every bad value is a short `bad_request`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from spinbroker import requests
from spinbroker.errors import BrokerError, ErrorCode, shown


def nest(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


#: Deep enough that repr() exhausts Python's recursion limit.
DEEP = nest(1015)


@pytest.mark.parametrize(
    ("read", "args"),
    [
        (lambda a: requests.string(a, "id"), {"id": DEEP}),
        (lambda a: requests.boolean(a, "success"), {"success": DEEP}),
        (lambda a: requests.seconds(a, "timeout"), {"timeout": DEEP}),
        (lambda a: requests.optional_int(a, "delivery"), {"delivery": DEEP}),
        (lambda a: requests.optional_str(a, "reason"), {"reason": DEEP}),
        (lambda a: requests.new_command(a), DEEP),
        (lambda a: requests.new_command(a), {"resource": "r", "action": "a", "parameters": DEEP}),
        (lambda a: requests.string(a, "id"), {"id": ["x" * 1_000_000]}),
        (lambda a: requests.string(a, "id"), {"id": 10**5000}),
    ],
)
def test_a_bad_value_is_quoted_short(read: Callable[[Any], Any], args: Any) -> None:
    """Audit h1 (t01): the message quoted repr() of the value, which for a value ~1000
    levels deep raised RecursionError (answered `internal`), and for a long one made a
    message as long as the value."""
    with pytest.raises(BrokerError) as refused:
        read(args)
    assert refused.value.code is ErrorCode.BAD_REQUEST
    assert len(refused.value.message) < 200


@pytest.mark.parametrize("value", [10**400, -(10**400), 2**64 - 1.0 + 1e300 * 1e300])
def test_seconds_past_what_a_float_holds_are_a_bad_request(value: Any) -> None:
    """A 400-digit timeout raised OverflowError converting it to float (audit h1, t04)."""
    with pytest.raises(BrokerError) as refused:
        requests.seconds({"timeout": value}, "timeout")
    assert refused.value.code is ErrorCode.BAD_REQUEST
    assert "must be a finite number >= 0" in refused.value.message


def test_seconds_takes_what_msgpack_carries() -> None:
    assert requests.seconds({"timeout": 2**64 - 1}, "timeout") == float(2**64 - 1)
    assert requests.seconds({"timeout": 0}, "timeout") == 0.0


def test_shown_is_repr_for_small_values_and_short_for_any() -> None:
    assert shown("id") == "'id'"
    assert shown({"a": [1, 2]}) == "{'a': [1, 2]}"
    assert shown(DEEP) == "[[[[...]]]]"
    assert shown(10**5000) == "<an int of 16610 bits>"
    assert len(shown("x" * 1_000_000)) < 70
