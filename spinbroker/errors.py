"""The one table of protocol error codes.

Every error the broker can answer is an `ErrorCode`; its value is the stable string on the
wire. `BrokerError` carries a code and a message through the pure core and the codec; the
client turns the same codes into one exception type each. protocol.md lists this table.
"""

from __future__ import annotations

import reprlib
from enum import StrEnum


class ErrorCode(StrEnum):
    BAD_REQUEST = "bad_request"
    UNKNOWN_VERB = "unknown_verb"
    MALFORMED = "malformed"
    TOO_LARGE = "too_large"
    LIMIT_EXCEEDED = "limit_exceeded"
    NOT_FOUND = "not_found"
    UNKNOWN_DEPENDENCY = "unknown_dependency"
    NOT_OPEN = "not_open"
    EMPTY_PACKAGE = "empty_package"
    NOT_LEASED = "not_leased"
    ALREADY_COMPLETED = "already_completed"
    STALE_DELIVERY = "stale_delivery"
    INVALID_COMMAND = "invalid_command"
    SHUTTING_DOWN = "shutting_down"
    STORAGE_FAILED = "storage_failed"
    INTERNAL = "internal"


#: Codes after which the connection can no longer be trusted (msgpack mode) and is closed.
FATAL_CODES = frozenset({ErrorCode.MALFORMED, ErrorCode.TOO_LARGE})


class BrokerError(Exception):
    """A request the broker refuses: a stable code and a message for a person."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message

    def to_wire(self) -> dict[str, str]:
        return {"code": self.code.value, "message": self.message}


class _Shown(reprlib.Repr):
    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 256:  # repr() of an int past 4300 digits raises ValueError
            return f"<an int of {x.bit_length()} bits>"
        return super().repr_int(x, level)


_SHOWN = _Shown()
_SHOWN.maxlevel = 3
_SHOWN.maxstring = _SHOWN.maxother = 60


def shown(value: object) -> str:
    """`repr(value)` cut short, for quoting a client's value in an error message: a value
    may be a megabyte long or nested a thousand levels deep (where repr() itself exhausts
    the recursion limit), and the message must stay one short line."""
    return _SHOWN.repr(value)
