"""Typed reading of request arguments.

The codec turns bytes into `(verb, args)`; these helpers turn `args` into the typed values
the core takes, or raise `bad_request` naming the argument and what was expected. Pure: no
IO, no broker state. Both protocol modes arrive here with the same argument names.
"""

from __future__ import annotations

import math
from typing import Any

from .core import NewCommand
from .errors import BrokerError, ErrorCode, shown
from .schema import MAX_NESTING, unencodable


def _bad(message: str) -> BrokerError:
    return BrokerError(ErrorCode.BAD_REQUEST, message)


def string(args: dict[str, Any], name: str) -> str:
    value = args.get(name)
    if value is None:
        raise _bad(f"missing argument {name!r}")
    if not isinstance(value, str) or not value:
        raise _bad(f"argument {name!r} must be a non-empty string, not {shown(value)}")
    return value


def boolean(args: dict[str, Any], name: str, default: bool | None = None) -> bool:
    value = args.get(name, default)
    if value is None:
        raise _bad(f"missing argument {name!r}")
    if not isinstance(value, bool):
        raise _bad(f"argument {name!r} must be true or false, not {shown(value)}")
    return value


def seconds(args: dict[str, Any], name: str) -> float | None:
    """An optional non-negative duration in seconds (int or float)."""
    value = args.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad(f"argument {name!r} must be a number of seconds, not {shown(value)}")
    try:
        number = float(value)
    except OverflowError:  # an int past 1e308 (msgpack ints never are)
        number = math.inf
    if not math.isfinite(number) or number < 0:
        raise _bad(f"argument {name!r} must be a finite number >= 0, not {shown(value)}")
    return number


def positive_seconds(args: dict[str, Any], name: str) -> float | None:
    value = seconds(args, name)
    if value is not None and value <= 0:
        raise _bad(f"argument {name!r} must be > 0, not {shown(value)}")
    return value


def optional_int(args: dict[str, Any], name: str) -> int | None:
    value = args.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"argument {name!r} must be an integer, not {shown(value)}")
    return value


def optional_str(args: dict[str, Any], name: str) -> str | None:
    value = args.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _bad(f"argument {name!r} must be a string, not {shown(value)}")
    return value


def new_command(
    raw: Any, where: str = "", positions: bool = False, level: int | None = None
) -> NewCommand:
    """One command as ADD or SUBMIT carries it: resource, action, parameters, dependencies.
    With `positions`, a dependency may be an int (SUBMIT: an earlier command's position).
    `level` is where its parameters sit in the request's args (PARAMETERS_LEVEL in a list
    of commands, ONE_COMMAND_LEVEL when the args are the command)."""
    if not isinstance(raw, dict):
        raise _bad(f"{where}a command must be a map, not {shown(raw)}")
    resource = string(raw, "resource")
    action = string(raw, "action")
    parameters = raw.get("parameters")
    if parameters is None:
        parameters = {}
    elif not isinstance(parameters, dict):
        raise _bad(f"{where}parameters must be a map, not {shown(parameters)}")
    else:
        for value in parameters.values():
            if type(value) is dict or type(value) is list:  # only nested ones are walked
                _check_nesting(parameters, where, PARAMETERS_LEVEL if level is None else level)
                break
    deps = raw.get("dependencies")
    if deps is None:
        deps = []
    elif not isinstance(deps, list):
        raise _bad(f"{where}dependencies must be a list of command ids, not {shown(deps)}")
    for dep in deps:
        ok = isinstance(dep, str) or (
            positions and isinstance(dep, int) and not isinstance(dep, bool)
        )
        if not ok:
            what = "command ids or positions" if positions else "command ids"
            raise _bad(f"{where}dependencies must be {what}, not {shown(dep)}")
    return NewCommand(resource, action, parameters, deps)


#: Where parameters sit in a request's args: args (1), commands (2), a command (3), its
#: parameters (4). Requests may nest MAX_NESTING levels from the args map down.
PARAMETERS_LEVEL = 4
#: ... and in a one-command ADD, whose args are the command: args (1), parameters (2).
ONE_COMMAND_LEVEL = 2


def _check_nesting(parameters: dict[str, Any], where: str, level: int) -> None:
    problem = unencodable(parameters, MAX_NESTING - level + 1)
    if problem is None:
        return
    if problem.startswith("maps and lists nested"):
        problem = f"maps and lists nested more than {MAX_NESTING} levels deep in the arguments"
    raise _bad(f"{where}parameters hold {problem}")


def command_list(args: dict[str, Any], positions: bool) -> list[NewCommand]:
    raw = args.get("commands")
    if not isinstance(raw, list) or not raw:
        raise _bad("argument 'commands' must be a non-empty list of commands")
    return [new_command(c, f"command {i}: ", positions) for i, c in enumerate(raw)]
