"""The server side of the wire, sans-IO: bytes in, events out; replies in, bytes out.

This room holds the framing of both protocol modes (protocol.md): the first byte decides
the mode; msgpack mode reads one value per request and checks its shape
`[id, verb, args?]`; text mode cuts lines, enforces the line limit and hands each line to
`textmode` for its grammar. It also encodes replies and errors for the connection's mode.

It must never touch a socket, an event loop or a clock, and never judge what a request
means (unknown verbs, argument names and values): that is the server's and the core's
job; in msgpack mode it checks the shape and the id range only, so the hot path stays one
unpack and a few type checks per request (text mode also checks how deep a line's JSON
nests: msgpack mode leaves that to where values may nest, parameters and schemas). It must
never raise on bad input either: whatever a client sends becomes a `BadInput` event.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import msgpack

from . import textmode
from .errors import BrokerError, ErrorCode
from .schema import MAX_NESTING, unencodable
from .textmode import TEXT_USAGE

__all__ = ["TEXT_USAGE", "BadInput", "Mode", "Request", "ServerCodec"]

#: Request ids are 0 to 2^63-1 (protocol.md, msgpack mode).
MAX_ID = (1 << 63) - 1

#: First bytes of a msgpack array (fixarray, array 16, array 32): they select msgpack mode.
_MSGPACK_FIRST_BYTES = frozenset([*range(0x90, 0xA0), 0xDC, 0xDD])


#: Replies of every connection are packed by this one Packer: a pack is synchronous and
#: leaves it empty (it resets on a failure too), and a Packer per connection would cost each
#: idle connection its buffer. It and UNPACKERS assume what the server does: every
#: ServerCodec of a process is used from one thread, its event loop's.
_PACKER = msgpack.Packer(use_bin_type=True)


class UnpackerPool:
    """Unpackers lent to connections while they have bytes of an unfinished value.

    A msgpack Unpacker costs ~45 KB (its parse stack is part of the object, plus its
    buffer), so one held by every idle connection would make 10,000 parked agents cost
    450 MB. A connection takes one when bytes arrive and gives it back once every byte fed
    to it formed a whole value: an Unpacker in that state holds no bytes and no parse
    state, as good as new. At most `keep` are kept (one that read a large value keeps its
    grown buffer, so the bound matters)."""

    def __init__(self, keep: int = 16) -> None:
        self._keep = keep
        self._free: dict[int, list[Any]] = {}

    def take(self, max_frame: int) -> Any:
        free = self._free.get(max_frame)
        if free:
            return free.pop()
        return msgpack.Unpacker(
            raw=False, strict_map_key=False, use_list=True, max_buffer_size=max_frame
        )

    def idle(self, max_frame: int) -> int:
        """How many Unpackers for `max_frame` wait to be lent."""
        return len(self._free.get(max_frame, ()))

    def give(self, max_frame: int, unpacker: Any) -> None:
        free = self._free.setdefault(max_frame, [])
        if len(free) < self._keep:
            free.append(unpacker)


#: The pool of every ServerCodec in this process (all of them run on one event loop).
UNPACKERS = UnpackerPool()


class Mode(enum.Enum):
    MSGPACK = "msgpack"
    TEXT = "text"


@dataclass(slots=True)
class Request:
    """A request that could be read. `verb` is upper-cased; the server checks it."""

    id: int | None  # msgpack: the client's id; text mode: None
    verb: str
    args: dict[str, Any]  # named arguments, the same names in both modes


@dataclass(slots=True)
class BadInput:
    """A request that could not be read; the server replies with `error`."""

    id: int | None
    verb: str | None
    error: BrokerError
    fatal: bool  # True: reply, then close the connection (framing is lost)


def _type_name(value: Any) -> str:
    names = {dict: "map", list: "array", str: "str", bytes: "bin", bool: "bool"}
    names |= {int: "int", float: "float", type(None): "nil"}
    return names.get(type(value), "ext")


def _bad_shape(obj: Any) -> BadInput:
    """The BadInput for a well-formed msgpack value that is not `[id, verb, args?]`,
    with whatever id and verb could be read from it, so the client can match the reply."""
    if type(obj) is not list:
        problem = f"got a {_type_name(obj)}"
        return BadInput(None, None, _shape_error(problem), False)
    rid = obj[0] if obj and type(obj[0]) is int else None
    verb = obj[1].upper() if len(obj) > 1 and type(obj[1]) is str else None
    if not 2 <= len(obj) <= 3:
        problem = f"got an array of {len(obj)} items"
    elif rid is None:
        problem = f"the id is a {_type_name(obj[0])}, not an int"
    elif not 0 <= rid <= MAX_ID:
        problem = "the id is out of range 0 to 2^63-1"
    elif verb is None:
        problem = f"the verb is a {_type_name(obj[1])}, not a str"
    else:
        problem = f"args is a {_type_name(obj[2])}, not a map"
    return BadInput(rid, verb, _shape_error(problem), False)


def _shape_error(problem: str) -> BrokerError:
    return BrokerError(ErrorCode.BAD_REQUEST, f"a request is an array [id, verb, args?]; {problem}")


def _too_deep(rid: int | None, verb: str, problem: str) -> BadInput:
    message = f"{problem} in the arguments"
    return BadInput(rid, verb, BrokerError(ErrorCode.BAD_REQUEST, message), False)


def _unpack_failure(exc: Exception, max_frame: int) -> BrokerError:
    """What a msgpack exception means for the client. All of them are fatal: after one,
    the Unpacker's position in the stream can no longer be trusted."""
    if isinstance(exc, msgpack.StackError):
        return BrokerError(ErrorCode.MALFORMED, "a msgpack value nested too deeply")
    if isinstance(exc, msgpack.FormatError):
        return BrokerError(ErrorCode.MALFORMED, "bytes that are not valid msgpack")
    if isinstance(exc, UnicodeDecodeError):
        return BrokerError(ErrorCode.MALFORMED, "a msgpack str that is not valid UTF-8")
    if isinstance(exc, TypeError):  # a list or map used as a map key
        return BrokerError(ErrorCode.MALFORMED, f"a msgpack map key that cannot be a key: {exc}")
    # The Unpacker refuses an array, map or ext header announcing more than the buffer
    # limit as soon as it reads it (plain ValueError "N exceeds max_..._len"): such a value
    # cannot fit. It checks a str or bin header's length only once the whole body is
    # buffered, which a body over the limit never is: those are answered too_large by the
    # room check in `_msgpack_events`, once max_frame bytes of the value have arrived
    # (never more are buffered, so reading that far costs no more than a legal frame).
    if "exceeds max_" in str(exc):
        return BrokerError(ErrorCode.TOO_LARGE, f"a msgpack value larger than {max_frame} bytes")
    return BrokerError(ErrorCode.MALFORMED, f"invalid msgpack: {exc}")


class ServerCodec:
    """One connection's codec. Feed it with `receive_data`, collect `next_events`.

    There is no end-of-input event: a connection that closes mid-frame or mid-line has
    nobody left to answer, so its unfinished bytes are simply dropped with the codec.
    """

    __slots__ = (
        "_buf",
        "_dead",
        "_fed",
        "_frame_start",
        "_lines",
        "_max_frame",
        "_pending",
        "_skipping",
        "_unpacker",
        "mode",
    )

    def __init__(self, max_frame: int = 1 << 20) -> None:
        if max_frame < 1:
            raise ValueError("max_frame must be at least 1 byte")
        self.mode: Mode | None = None
        self._max_frame = max_frame
        self._dead = False  # a fatal event was emitted: yield nothing more
        # msgpack mode. The Unpacker's buffer is bounded by max_frame, so bytes it cannot
        # take yet wait in `_pending` (zero-copy views) until values are drained. It is
        # borrowed from UNPACKERS while bytes are buffered (None between requests).
        self._unpacker: Any = None
        self._pending: list[memoryview] = []  # not a deque: that costs 760 bytes per connection
        # Offsets in the borrowed Unpacker's stream (its tell()): bytes fed to it so far,
        # and where the first unfinished value starts.
        self._fed = 0
        self._frame_start = 0
        # text mode: the unfinished line, and complete lines (or too_large) to parse.
        self._buf = bytearray()
        self._lines: list[bytearray | BadInput] = []
        self._skipping = False  # inside an oversize line: drop bytes up to its newline

    # Input -------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        if self._dead or not data:
            return
        if self.mode is None:
            self._choose_mode(data[0])
        if self.mode is Mode.MSGPACK:
            self._receive_msgpack(data)
        else:
            self._receive_text(data)

    def _choose_mode(self, first: int) -> None:
        if first in _MSGPACK_FIRST_BYTES:
            self.mode = Mode.MSGPACK
        else:
            self.mode = Mode.TEXT

    def next_events(self) -> list[Request | BadInput]:
        """Every complete event received so far, in order; [] if none."""
        if self._dead:
            return []
        if self.mode is Mode.MSGPACK:
            return self._msgpack_events()
        if self.mode is Mode.TEXT:
            return self._text_events()
        return []

    # msgpack mode ------------------------------------------------------------------

    def _receive_msgpack(self, data: bytes) -> None:
        if self._unpacker is None:
            self._unpacker = unpacker = UNPACKERS.take(self._max_frame)
            self._fed = self._frame_start = unpacker.tell()
        room = self._max_frame - (self._fed - self._frame_start)
        if not self._pending and len(data) <= room:
            # The usual case: the chunk fits, the Unpacker copies it once.
            self._unpacker.feed(data)
            self._fed += len(data)
            return
        # Keep a view, not a copy, of bytes; copy anything mutable the caller may reuse.
        view = memoryview(data if isinstance(data, bytes) else bytes(data))
        self._pending.append(view)
        self._feed()

    def _feed(self) -> None:
        """Move pending bytes into the Unpacker while the unfinished value has room.

        The room is counted from the start of the unfinished value, not from what the
        Unpacker still buffers: it consumes array and map items as they arrive, so its
        own buffer limit alone would let a value of many small items grow without bound.
        """
        pending = self._pending
        while pending:
            room = self._max_frame - (self._fed - self._frame_start)
            if room <= 0:
                return
            chunk = pending[0]
            if len(chunk) <= room:
                del pending[0]
            else:
                pending[0] = chunk[room:]
                chunk = chunk[:room]
            self._unpacker.feed(chunk)
            self._fed += len(chunk)

    def _msgpack_events(self) -> list[Request | BadInput]:
        events: list[Request | BadInput] = []
        if self._unpacker is None:
            return events  # no byte is buffered
        while True:
            self._drain(events)
            if self._dead:
                break
            # Every complete value is out, so the bytes after `_frame_start` belong to one
            # unfinished value; if it already fills the limit, it is over it.
            if self._fed - self._frame_start >= self._max_frame:
                self._fatal(
                    events,
                    BrokerError(
                        ErrorCode.TOO_LARGE, f"a msgpack value larger than {self._max_frame} bytes"
                    ),
                )
                break
            if not self._pending:
                break
            self._feed()
        if self._fed == self._frame_start and not self._pending and not self._dead:
            # Every byte fed formed a whole value: give the Unpacker back until more come.
            UNPACKERS.give(self._max_frame, self._unpacker)
            self._unpacker = None
        return events

    def _drain(self, events: list[Request | BadInput]) -> None:
        """Append every complete value in the Unpacker to `events`.

        The hot path: one unpack, one shape check and one `tell` per request.
        """
        unpacker = self._unpacker
        tell = unpacker.tell
        append = events.append
        start = self._frame_start
        try:
            for obj in unpacker:
                start = tell()
                if type(obj) is list:
                    n = len(obj)
                    if n == 3:
                        rid, verb, args = obj
                        if (
                            type(rid) is int
                            and type(verb) is str
                            and type(args) is dict
                            and 0 <= rid <= MAX_ID
                        ):
                            # No depth check here (the hot path): the only args that
                            # may nest are parameters (requests.new_command checks them)
                            # and schemas (schema.from_wire); elsewhere a map or list
                            # where a scalar belongs is refused with a bounded message.
                            append(Request(rid, verb.upper(), args))
                            continue
                    elif n == 2:
                        rid, verb = obj
                        if type(rid) is int and type(verb) is str and 0 <= rid <= MAX_ID:
                            append(Request(rid, verb.upper(), {}))
                            continue
                append(_bad_shape(obj))
        except (ValueError, TypeError) as exc:  # msgpack's errors derive from these
            self._fatal(events, _unpack_failure(exc, self._max_frame))
            return
        self._frame_start = start

    def _fatal(self, events: list[Request | BadInput], error: BrokerError) -> None:
        events.append(BadInput(None, None, error, True))
        self._dead = True
        self._pending.clear()
        self._unpacker = None  # frees its buffer; nothing is read after a fatal event

    # text mode ---------------------------------------------------------------------

    def _receive_text(self, data: bytes) -> None:
        data = bytes(data) if isinstance(data, memoryview) else data
        if self._skipping:
            newline = data.find(b"\n")
            if newline < 0:
                return
            data = data[newline + 1 :]
            self._skipping = False
        buf = self._buf
        search = len(buf)  # the bytes already buffered hold no newline
        buf += data
        start = 0
        while (newline := buf.find(b"\n", search)) >= 0:
            self._lines.append(buf[start:newline])
            start = search = newline + 1
        if start:
            del buf[:start]
        # An unfinished line may still end in "\r" that does not count; past that it can
        # only grow, so answer now and drop the rest of it as it comes.
        if len(buf) > self._max_frame + 1:
            self._lines.append(self._line_too_large())
            buf.clear()
            self._skipping = True

    def _line_too_large(self) -> BadInput:
        error = BrokerError(
            ErrorCode.TOO_LARGE, f"a line longer than {self._max_frame} bytes; skipped"
        )
        return BadInput(None, None, error, False)

    def _text_events(self) -> list[Request | BadInput]:
        lines, self._lines = self._lines, []
        events: list[Request | BadInput] = []
        for line in lines:
            if isinstance(line, BadInput):
                events.append(line)
                continue
            if line.endswith(b"\r"):
                del line[-1:]
            if len(line) > self._max_frame:
                events.append(self._line_too_large())
            elif line and not line.isspace():
                verb, result = textmode.parse_line(line)
                if isinstance(result, BrokerError):
                    events.append(BadInput(None, verb, result, False))
                else:
                    assert verb is not None  # parse_line pairs a None verb with an error
                    # Counted from the args map, as for a msgpack request's parameters
                    # (requests.new_command): a line nests as deep as its request.
                    problem = unencodable(result, MAX_NESTING)
                    if problem is not None:
                        events.append(_too_deep(None, verb, problem))
                    else:
                        events.append(Request(None, verb, result))
        return events

    # Output ------------------------------------------------------------------------

    def encode_reply(self, req: Request, kind: str, body: Any) -> bytes:
        """The reply to `req`: `kind` is "ok" (body: the verb's result) or "empty"."""
        if self.mode is Mode.MSGPACK:
            packed: bytes = _PACKER.pack([req.id, kind, body])
            return packed
        if self.mode is Mode.TEXT:
            return textmode.encode_reply(req.verb, kind, body)
        raise RuntimeError("no reply before the first byte decided the mode")

    def encode_error(self, req_id: int | None, verb: str | None, err: BrokerError) -> bytes:
        if self.mode is Mode.MSGPACK:
            packed: bytes = _PACKER.pack([req_id, "error", err.to_wire()])
            return packed
        if self.mode is Mode.TEXT:
            return textmode.encode_error(err)
        raise RuntimeError("no reply before the first byte decided the mode")
