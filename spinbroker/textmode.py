"""The text-mode language: one request line in, named arguments out; a reply in, one line out.

This room holds the grammar a person types into `nc` (protocol.md, "Text mode"): the
tokenizer (`key=value`, JSON values that may contain spaces, `--flags`), one small parser
per verb that maps a line to the same args dict a msgpack client would send, `TEXT_USAGE`,
and the one-line rendering of replies and errors.

It works on one already-framed line at a time. It must never frame bytes, buffer, decide
the protocol mode, or know anything about the broker's state: framing and line limits live
in `codec.py`, meaning lives in the core. Errors are returned as values, never raised out.
It must never hand on a value msgpack cannot carry (JSON can spell a lone surrogate, an int
of any size, any depth), since everything a request holds may end up in the log.
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, NoReturn

from .errors import BrokerError, ErrorCode, shown
from .schema import INT_MAX, INT_MIN, MAX_NESTING, unencodable

#: One usage line per verb, in the order HELP lists them. Also appended to text-mode
#: `bad_request` messages so a person sees what was expected.
TEXT_USAGE: dict[str, str] = {
    "HELLO": "HELLO",
    "PING": "PING",
    "NEW": "NEW",
    "ADD": (
        "ADD <pkg> <resource> <action> [key=value ...] [--dep <id> ...]"
        " or ADD <pkg> [<json list of commands>]"
    ),
    "ENQUEUE": "ENQUEUE <pkg>",
    "SUBMIT": "SUBMIT [<json list of commands>]",
    "STATUS": "STATUS <id> [--commands]",
    "WAIT": "WAIT <pkg> [timeout]",
    "NEXT": "NEXT <resource> [timeout] [ttr]",
    "TOUCH": "TOUCH <cmd> [ttr] [--delivery N]",
    "COMPLETE": "COMPLETE <cmd> true|false [--delivery N] [reason ...]",
    "CANCEL": "CANCEL <pkg>",
    "ANNOUNCE": "ANNOUNCE <resource> <json schema>",
    "STATS": "STATS",
    "HELP": "HELP",
    "QUIT": "QUIT",
}

_JSON_START = frozenset('"{[')
_BLANK = re.compile(r"[ \t]*")
_WORD = re.compile(r"[^ \t]+")
_LITERALS: dict[str, Any] = {"true": True, "false": False, "null": None}
_JSON_INT = re.compile(r"-?[1-9][0-9]*")


def _reject_constant(name: str) -> NoReturn:
    # Python's json reads NaN and Infinity; they are not JSON and a person who types
    # `x=NaN` more likely means the string.
    raise ValueError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def _bad(message: str) -> BrokerError:
    return BrokerError(ErrorCode.BAD_REQUEST, message)


def _not_ascii(line: str, pos: int) -> BrokerError:
    return BrokerError(
        ErrorCode.MALFORMED,
        f"non-ASCII character {line[pos]!r} at column {pos + 1} outside a JSON string",
    )


def _check_ascii(text: str, line: str, offset: int) -> None:
    """Raise `malformed` if `text` (found at `offset` in `line`) is not ASCII."""
    if text.isascii():  # O(1) on CPython: the flag is stored in the string
        return
    for i, ch in enumerate(text):
        if not ch.isascii():
            raise _not_ascii(line, offset + i)


def _out_of_range(raw: str) -> BrokerError:
    return _bad(f"{shown(raw)} is outside the integer range -2^63 to 2^64-1")


def _bare(raw: str) -> Any:
    """A value typed without quotes: JSON if it parses (numbers, true/false/null), else
    the string itself, so `image_size=50` is 50 and `path=test` is "test"."""
    if raw in _LITERALS:
        return _LITERALS[raw]
    # Only a leading digit or minus can start a JSON number; skipping the rest avoids
    # paying for an exception on every ordinary word.
    if raw and raw[0] in "-0123456789":
        try:
            value = _DECODER.decode(raw)
        except ValueError:
            if _JSON_INT.fullmatch(raw):  # JSON, past Python's 4300-digit limit for ints
                raise _out_of_range(raw) from None
            return raw
        if type(value) is int and not INT_MIN <= value <= INT_MAX:
            raise _out_of_range(raw)
        return value
    return raw


@dataclass(slots=True)
class _Token:
    text: str  # the whole token as typed
    key: str | None  # the key of `key=value`, else None
    raw: str  # the value as typed (the text after `key=`, or the whole token)
    value: Any  # the decoded value when `quoted`; unused otherwise (see `_typed`)
    quoted: bool  # the value was a JSON value starting with `"`, `{` or `[`


def _typed(tok: _Token) -> Any:
    return tok.value if tok.quoted else _bare(tok.raw)


def _flag(tok: _Token) -> str | None:
    """`--name` or `--name=value` → "--name" (lower case); anything else → None."""
    name = tok.key if tok.key is not None else (None if tok.quoted else tok.raw)
    if name is not None and name.startswith("--"):
        return name.lower()
    return None


class _Cursor:
    """Reads one line token by token, so a verb can take the rest of it as typed."""

    __slots__ = ("line", "pos")

    def __init__(self, line: str) -> None:
        self.line = line
        self.pos = 0

    def _skip_blank(self) -> int:
        match = _BLANK.match(self.line, self.pos)
        assert match is not None  # `[ \t]*` always matches
        self.pos = match.end()
        return self.pos

    def peek_word(self) -> str | None:
        match = _WORD.match(self.line, self._skip_blank())
        return match.group() if match else None

    def next_word(self) -> str | None:
        """The next run of non-blank characters, as typed (no JSON)."""
        start = self._skip_blank()
        match = _WORD.match(self.line, start)
        if match is None:
            return None
        word = match.group()
        _check_ascii(word, self.line, start)
        self.pos = match.end()
        return word

    def rest(self) -> str:
        """Everything left on the line, as typed, without surrounding blanks."""
        start = self._skip_blank()
        rest = self.line[start:].rstrip(" \t")
        _check_ascii(rest, self.line, start)
        self.pos = len(self.line)
        return rest

    def next(self) -> _Token | None:
        line = self.line
        start = self._skip_blank()
        if start >= len(line):
            return None
        if line[start] in _JSON_START:
            value = self._json(start)
            text = line[start : self.pos]
            return _Token(text, None, text, value, True)
        match = _WORD.match(line, start)
        assert match is not None  # not at the end and not on a blank
        word = match.group()
        eq = word.find("=")
        vstart = start + eq + 1
        if eq > 0 and vstart < len(line) and line[vstart] in _JSON_START:
            _check_ascii(word[:eq], line, start)
            value = self._json(vstart)
            return _Token(line[start : self.pos], word[:eq], line[vstart : self.pos], value, True)
        _check_ascii(word, line, start)
        self.pos = match.end()
        if eq > 0:
            return _Token(word, word[:eq], word[eq + 1 :], None, False)
        return _Token(word, None, word, None, False)

    def _json(self, start: int) -> Any:
        line = self.line
        try:
            value, end = _DECODER.raw_decode(line, start)
        except json.JSONDecodeError as exc:
            # JSON only allows non-ASCII inside strings, so an error on such a character
            # means it stands outside one: the line is malformed, not just badly shaped.
            if exc.pos < len(line) and not line[exc.pos].isascii():
                raise _not_ascii(line, exc.pos) from None
            raise _bad(f"bad JSON at column {exc.pos + 1}: {exc.msg}") from None
        except ValueError as exc:  # NaN / Infinity, see _reject_constant
            raise _bad(f"bad JSON at column {start + 1}: {exc}") from None
        except RecursionError:  # the C scanner's own guard, some 900 levels down
            raise _bad(
                f"the JSON value at column {start + 1} holds maps and lists nested more than"
                f" {MAX_NESTING} levels deep"
            ) from None
        if end < len(line) and line[end] not in " \t":
            if not line[end].isascii():
                raise _not_ascii(line, end)
            raise _bad(f"unexpected {line[end]!r} right after a JSON value at column {end + 1}")
        problem = unencodable(value)
        if problem is not None:
            raise _bad(f"the JSON value at column {start + 1} holds {problem}")
        self.pos = end
        return value

    def end(self) -> None:
        tok = self.next()
        if tok is not None:
            raise _bad(f"unexpected {shown(tok.text)}")


# Argument helpers ----------------------------------------------------------------------


def _as_string(tok: _Token, what: str) -> str:
    """A string argument: as typed (so ids stay strings even if they look numeric), or a
    quoted JSON string."""
    if tok.quoted:
        if isinstance(tok.value, str) and tok.value:
            return tok.value
        raise _bad(f"expected {what} (a string), got {shown(tok.text)}")
    if not tok.raw:
        raise _bad(f"expected {what}, got {shown(tok.text)}")
    return tok.raw


def _positional(tok: _Token | None, what: str) -> str:
    if tok is None:
        raise _bad(f"missing {what}")
    if tok.key is not None:
        raise _bad(f"expected {what}, got {shown(tok.text)}")
    if _flag(tok) is not None:
        raise _bad(f"expected {what}, got option {shown(tok.text)}")
    return _as_string(tok, what)


def _number(tok: _Token, what: str) -> int | float:
    if tok.key is None:
        value = _typed(tok)
        if type(value) is int or type(value) is float:
            return value
    raise _bad(f"{what} must be a number of seconds, got {shown(tok.text)}")


def _flag_value(cur: _Cursor, tok: _Token) -> _Token:
    """The value of `--name value` or `--name=value`."""
    if tok.key is not None:
        return _Token(tok.text, None, tok.raw, tok.value, tok.quoted)
    value = cur.next()
    if value is None:
        raise _bad(f"{tok.text} needs a value")
    return value


def _delivery(cur: _Cursor, tok: _Token) -> int:
    value = _flag_value(cur, tok)
    number = _typed(value) if value.key is None else None
    if type(number) is not int:
        raise _bad(f"--delivery needs an integer, got {shown(value.text)}")
    return number


def _unexpected(tok: _Token) -> BrokerError:
    if _flag(tok) is not None:
        return _bad(f"unknown option {shown(tok.text)}")
    return _bad(f"unexpected {shown(tok.text)}")


# One parser per verb: the rest of the line → the args dict msgpack mode would carry ----


def _no_args(cur: _Cursor) -> dict[str, Any]:
    cur.end()
    return {}


def _package_only(cur: _Cursor) -> dict[str, Any]:
    args = {"package": _positional(cur.next(), "<pkg>")}
    cur.end()
    return args


def _add(cur: _Cursor) -> dict[str, Any]:
    package = _positional(cur.next(), "<pkg>")
    tok = cur.next()
    if tok is None:
        raise _bad("missing <resource> <action>, or a JSON list of commands")
    if tok.quoted and tok.key is None and isinstance(tok.value, list):
        cur.end()
        return {"package": package, "commands": tok.value}
    resource = _positional(tok, "<resource>")
    action = _positional(cur.next(), "<action>")
    parameters: dict[str, Any] = {}
    dependencies: list[str] = []
    while (tok := cur.next()) is not None:
        flag = _flag(tok)
        if flag == "--dep":
            dependencies.append(_as_string(_flag_value(cur, tok), "a command id after --dep"))
        elif flag is None and tok.key is not None:
            if tok.key in parameters:
                raise _bad(f"parameter {tok.key!r} given twice")
            parameters[tok.key] = _typed(tok)
        else:
            raise _bad(f"expected key=value or --dep <id>, got {shown(tok.text)}")
    return {
        "package": package,
        "resource": resource,
        "action": action,
        "parameters": parameters,
        "dependencies": dependencies,
    }


def _last_json(cur: _Cursor, kind: type, what: str) -> Any:
    """The line's last token: one JSON value of `kind` (list or dict)."""
    tok = cur.next()
    if tok is None or not (tok.quoted and tok.key is None and isinstance(tok.value, kind)):
        got = "nothing" if tok is None else shown(tok.text)
        raise _bad(f"expected {what}, got {got}")
    cur.end()
    return tok.value


def _submit(cur: _Cursor) -> dict[str, Any]:
    return {"commands": _last_json(cur, list, "a JSON list of commands")}


def _announce(cur: _Cursor) -> dict[str, Any]:
    resource = _positional(cur.next(), "<resource>")
    return {"resource": resource, "schema": _last_json(cur, dict, "a JSON schema map")}


def _status(cur: _Cursor) -> dict[str, Any]:
    args: dict[str, Any] = {"id": _positional(cur.next(), "<id>"), "commands": False}
    while (tok := cur.next()) is not None:
        if _flag(tok) != "--commands" or tok.key is not None:
            raise _unexpected(tok)
        args["commands"] = True
    return args


def _wait(cur: _Cursor) -> dict[str, Any]:
    args: dict[str, Any] = {"package": _positional(cur.next(), "<pkg>")}
    if (tok := cur.next()) is not None:
        args["timeout"] = _number(tok, "timeout")
    cur.end()
    return args


def _next(cur: _Cursor) -> dict[str, Any]:
    args: dict[str, Any] = {"resource": _positional(cur.next(), "<resource>")}
    if (tok := cur.next()) is not None:
        args["timeout"] = _number(tok, "timeout")
        if (tok := cur.next()) is not None:
            args["ttr"] = _number(tok, "ttr")
    cur.end()
    return args


def _touch(cur: _Cursor) -> dict[str, Any]:
    args: dict[str, Any] = {"command": _positional(cur.next(), "<cmd>")}
    while (tok := cur.next()) is not None:
        flag = _flag(tok)
        if flag == "--delivery" and "delivery" not in args:
            args["delivery"] = _delivery(cur, tok)
        elif flag is None and "ttr" not in args:
            args["ttr"] = _number(tok, "ttr")
        else:
            raise _unexpected(tok)
    return args


def _complete(cur: _Cursor) -> dict[str, Any]:
    command = _positional(cur.next(), "<cmd>")
    # The status and the reason are read as raw words: the reason is free text and must
    # not go through the JSON tokenizer (`disk {full` is a fine reason).
    status = cur.next_word()
    if status is None or status.lower() not in ("true", "false"):
        got = "nothing" if status is None else shown(status)
        raise _bad(f"the status must be true or false, got {got}")
    args: dict[str, Any] = {"command": command, "success": status.lower() == "true"}
    peek = (cur.peek_word() or "").lower()
    if peek == "--delivery" or peek.startswith("--delivery="):
        tok = cur.next()
        assert tok is not None  # peek saw a word
        args["delivery"] = _delivery(cur, tok)
    reason = cur.rest()
    if reason:
        args["reason"] = reason
    return args


_PARSERS: dict[str, Callable[[_Cursor], dict[str, Any]]] = {
    "HELLO": _no_args,
    "PING": _no_args,
    "NEW": _no_args,
    "ADD": _add,
    "ENQUEUE": _package_only,
    "SUBMIT": _submit,
    "STATUS": _status,
    "WAIT": _wait,
    "NEXT": _next,
    "TOUCH": _touch,
    "COMPLETE": _complete,
    "CANCEL": _package_only,
    "ANNOUNCE": _announce,
    "STATS": _no_args,
    "HELP": _no_args,
    "QUIT": _no_args,
}


def _scan_for_malformed(cur: _Cursor) -> None:
    """An unknown verb's arguments are not read, but non-ASCII outside JSON strings is
    still `malformed`, as for every other line."""
    try:
        while cur.next() is not None:
            pass
    except BrokerError as err:
        if err.code is ErrorCode.MALFORMED:
            raise
        # Anything else (broken JSON) is for the verb to judge; an unknown verb has none.


def parse_line(line: bytes | bytearray) -> tuple[str | None, dict[str, Any] | BrokerError]:
    """One line, without its line ending and not blank → (VERB, args) or (VERB, error).

    The verb is None only when even it could not be read (not ASCII). A verb that is not
    in `TEXT_USAGE` gives `(VERB, {})`: the server answers `unknown_verb`.
    """
    try:
        # ASCII is a subset of UTF-8; non-ASCII is allowed only inside JSON strings,
        # which the tokenizer checks character by character.
        text = line.decode("ascii") if line.isascii() else line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, BrokerError(
            ErrorCode.MALFORMED,
            f"byte 0x{line[exc.start]:02x} at column {exc.start + 1}"
            " is not ASCII (nor UTF-8 inside a JSON string)",
        )
    cur = _Cursor(text)
    try:
        word = cur.next_word()
    except BrokerError as err:
        return None, err
    if word is None:
        return None, _bad("empty line")  # the codec drops blank lines before this
    verb = word.upper()
    parser = _PARSERS.get(verb)
    try:
        if parser is None:
            if not text.isascii():
                _scan_for_malformed(cur)
            return verb, {}
        return verb, parser(cur)
    except BrokerError as err:
        if err.code is ErrorCode.BAD_REQUEST:
            return verb, _bad(f"{err.message}; usage: {TEXT_USAGE[verb]}")
        return verb, err


# Replies -----------------------------------------------------------------------------


#: Maps and lists deeper than this in a reply are shown as `TOO_DEEP`. Requests nest at most
#: MAX_NESTING levels, so only a value from a log written before that limit can be deeper
#: (msgpack reads 1024 levels), and rendering it whole would exhaust the recursion limit.
PLAIN_MAX_DEPTH = 2 * MAX_NESTING
TOO_DEEP = f"<nested more than {PLAIN_MAX_DEPTH} levels deep>"


def _plain(value: Any, depth: int = 0) -> Any:
    """`value` made of JSON types only: bytes as base64, non-str keys via str(),
    anything else JSON cannot carry (NaN, ext types, sets) via repr(), and maps and lists
    below PLAIN_MAX_DEPTH levels as `TOO_DEEP`."""
    kind = type(value)
    if kind is str or kind is int or kind is bool or value is None:
        return value
    if kind is float:
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, Enum):
        return _plain(value.value, depth)
    # Exact tuples only: a named tuple such as msgpack's ExtType is a value of its own.
    if isinstance(value, Mapping | list) or kind is tuple:
        if depth >= PLAIN_MAX_DEPTH:
            return TOO_DEEP
        if isinstance(value, Mapping):
            return {
                (k if isinstance(k, str) else str(k)): _plain(v, depth + 1)
                for k, v in value.items()
            }
        return [_plain(v, depth + 1) for v in value]
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return _plain(float(value), depth)
    return repr(value)


def to_json(value: Any) -> str:
    """Compact, ASCII-only JSON on one line."""
    return json.dumps(_plain(value), separators=(",", ":"), allow_nan=False)


def _line(text: str) -> bytes:
    # One reply is one line: a newline inside a message would be read as the next reply.
    text = text.replace("\r", " ").replace("\n", " ")
    return text.encode("ascii", "backslashreplace") + b"\n"


def encode_reply(verb: str, kind: str, body: Any) -> bytes:
    """The reply line to a successful request (`kind` "ok") or a timed-out one ("empty")."""
    if kind == "empty":
        return b"EMPTY\n"
    if kind != "ok":
        raise ValueError(f"unknown reply kind {kind!r}")
    if verb == "PING":
        return b"PONG\n"
    if verb == "QUIT":
        return b"OK bye\n"
    if verb == "HELP" and isinstance(body, list):
        return _line("OK " + "; ".join(str(usage) for usage in body))
    if isinstance(body, dict):
        if verb == "NEW" and "package" in body:
            return _line(f"OK {body['package']}")
        if verb == "ADD" and "command" in body:
            return _line(f"OK {body['command']}")
        if verb in ("ADD", "ENQUEUE") and "commands" in body:
            return _line("OK " + to_json(body["commands"]))
    if body is None:
        return b"OK\n"
    return _line("OK " + to_json(body))


def encode_error(err: BrokerError) -> bytes:
    return _line(f"ERR {err.code.value} {err.message}")
