"""The `spinbroker` command: run a broker, talk to one, look at its log.

`main(argv)` returns the exit status: 0 ok, 1 error (the message on stderr), 2 usage,
3 empty (NEXT or WAIT timed out). Client subcommands open one connection with `Client`;
`serve` and `wal` import their modules lazily so that a client never loads the server.
With `--json` a subcommand prints exactly one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from spinbroker import __version__
from spinbroker.client import (
    Client,
    ClientError,
    CommandStatus,
    ConnectionLost,
    DeliveredCommand,
    PackageStatus,
    format_address,
    parse_address,
    to_json_value,
)
from spinbroker.config import DEFAULT_DATA_DIR, SOCKET_NAME, Limits, ServerConfig

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_EMPTY = 3

ENV_ADDR = "SPINBROKER_ADDR"
DEFAULT_ADDR = f"unix:{DEFAULT_DATA_DIR / SOCKET_NAME}"
DEFAULT_NEXT_TTR = 300.0

COUNT_ORDER = ("staged", "waiting", "ready", "leased", "succeeded", "failed", "cancelled")

ClientHandler = Callable[[Client, argparse.Namespace], Awaitable[int]]


class UsageError(Exception):
    """Bad arguments found after argparse: reported like argparse's own, exit status 2."""


# --------------------------------------------------------------------------- values


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON value")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # `1e400`: a JSON number, but past what a float holds
        raise UsageError(f"{text} is out of range (a number must be finite)")
    return value


def parse_value(text: str) -> Any:
    """A parameter value: JSON if it parses (`50`, `true`, `{...}`), else the text itself.

    Raises UsageError for JSON whose numbers overflow to infinity (`1e400`): neither the
    broker's text mode nor --json output can carry them; and for JSON nested deeper than
    the parser's recursion guard (some 900 levels; the broker takes 100).
    """
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:
        raise UsageError("nested too deeply (the broker takes 100 levels)") from None
    except ValueError:
        return text


def parse_params(items: Sequence[str]) -> dict[str, Any]:
    """`["key=value", ...]` as a parameter map; a key given twice is an error."""
    params: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"parameter {item!r}: expected key=value")
        if key in params:
            raise UsageError(f"parameter {key!r} given twice")
        try:
            params[key] = parse_value(value)
        except UsageError as exc:
            raise UsageError(f"parameter {key!r}: {exc}") from None
    return params


def parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _positive(convert: Callable[[str], float]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
        return value

    return parse


positive_int = _positive(int)
positive_float = _positive(float)


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 0 or value != value:
        raise argparse.ArgumentTypeError(f"must be zero or more: {text!r}")
    return value


# --------------------------------------------------------------------------- parser


def _connection_options(defaults: Any) -> argparse.ArgumentParser:
    """--socket/--addr, accepted before or after the subcommand.

    The copies on the subcommands default to SUPPRESS so that they never overwrite what was
    given before the subcommand.
    """
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("broker address")
    group.add_argument(
        "--socket",
        metavar="PATH",
        default=defaults,
        help="the broker's Unix socket",
    )
    group.add_argument(
        "--addr",
        metavar="HOST:PORT",
        default=defaults,
        help=f"the broker's TCP address (also ${ENV_ADDR}: unix:/path or host:port; "
        f"default {DEFAULT_ADDR})",
    )
    return parent


def _json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _add_serve_parser(subparsers: Any) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="run a broker",
        description="Run a broker until SIGINT or SIGTERM.",
    )
    serve.set_defaults(run=_serve, parser=serve)
    serve.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        metavar="DIR",
        help=f"where the log and snapshots live (default {DEFAULT_DATA_DIR})",
    )
    serve.add_argument(
        "--socket",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help=f"Unix socket to listen on (default DIR/{SOCKET_NAME})",
    )
    tcp = serve.add_mutually_exclusive_group()
    tcp.add_argument(
        "--addr",
        metavar="HOST:PORT",
        default=argparse.SUPPRESS,
        help="TCP address to listen on (default 127.0.0.1:7878; port 0 picks a free one)",
    )
    tcp.add_argument("--no-tcp", action="store_true", help="listen on the Unix socket only")
    serve.add_argument(
        "--fsync",
        choices=("always", "batch", "off"),
        default="always",
        help="always: fsync before every acknowledgement (group commit, the default); "
        "batch: fsync at least every --fsync-interval-ms; "
        "off: never fsync, for tests and benchmarks only: a crash loses acknowledged data",
    )
    serve.add_argument(
        "--fsync-interval-ms",
        type=positive_float,
        default=10.0,
        metavar="N",
        help="with --fsync batch: the longest time between two fsyncs (default 10)",
    )
    durability = ServerConfig()
    serve.add_argument(
        "--segment-size",
        type=positive_int,
        default=durability.segment_size,
        metavar="BYTES",
        help=f"roll to a new log segment past this size (default {durability.segment_size})",
    )
    serve.add_argument(
        "--snapshot-every",
        type=positive_int,
        default=durability.snapshot_every,
        metavar="N",
        help=f"snapshot after N records (default {durability.snapshot_every})",
    )
    serve.add_argument(
        "--snapshot-interval",
        type=positive_float,
        default=durability.snapshot_interval,
        metavar="S",
        help="... or after S seconds if anything changed "
        f"(default {durability.snapshot_interval:g}); also at clean shutdown",
    )
    defaults = Limits()
    limits = serve.add_argument_group("limits")
    for flag, convert, default, text in (
        ("--max-frame", positive_int, defaults.max_frame, "bytes per frame or line"),
        (
            "--max-commands",
            positive_int,
            defaults.max_commands_per_package,
            "commands per package",
        ),
        (
            "--max-parameter-bytes",
            positive_int,
            defaults.max_parameter_bytes,
            "msgpack-encoded parameter bytes per command",
        ),
        ("--max-connections", positive_int, defaults.max_connections, "open connections"),
        ("--max-inflight", positive_int, defaults.max_inflight, "in-flight requests per conn"),
        (
            "--package-ttl",
            positive_float,
            defaults.package_ttl,
            "seconds a package may stay open",
        ),
        (
            "--retention",
            positive_float,
            defaults.retention,
            "seconds finished packages are remembered",
        ),
        ("--max-deliveries", positive_int, defaults.max_deliveries, "deliveries per command"),
    ):
        metavar = "S" if convert is positive_float else "N"
        shown = f"{default:g}" if isinstance(default, float) else str(default)
        limits.add_argument(flag, type=convert, metavar=metavar, help=f"{text} (default {shown})")
    serve.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="info",
        help="default info",
    )


def _add_message_parsers(subparsers: Any, conn: argparse.ArgumentParser) -> None:
    message = subparsers.add_parser("message", help="packages and commands")
    verbs = message.add_subparsers(dest="verb", metavar="VERB", required=True)

    def verb(name: str, handler: ClientHandler, help: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = verbs.add_parser(name, parents=[conn], help=help)
        p.set_defaults(run=_run_client, handler=handler, parser=p)
        return p

    p = verb("new", _new, "create a package; prints its id")
    _json_option(p)

    p = verb("add", _add, "add a command to an open package; prints its id")
    p.add_argument("package", metavar="PKG")
    p.add_argument("resource", metavar="RESOURCE")
    p.add_argument("action", metavar="ACTION")
    p.add_argument(
        "params",
        nargs="*",
        default=[],  # optional: without a default argparse calls it required in errors
        metavar="key=value",
        help="a parameter; the value is JSON if it parses (50, true, {...}), else a string",
    )
    p.add_argument(
        "--dep",
        action="append",
        default=[],
        metavar="ID",
        help="a command that must succeed first (repeatable)",
    )
    p.set_defaults(trailing="params")
    _json_option(p)

    p = verb("enqueue", _enqueue, "enqueue a package; prints its command ids")
    p.add_argument("package", metavar="PKG")
    _json_option(p)

    p = verb("status", _status, "status of a package or a command")
    p.add_argument("id", metavar="PKG|CMD")
    p.add_argument("--commands", action="store_true", help="list a package's commands")
    _json_option(p)

    p = verb("wait", _wait, "wait until a package is finished")
    p.add_argument("package", metavar="PKG")
    p.add_argument("--timeout", type=non_negative_float, metavar="S", help="give up after S s")
    _json_option(p)

    p = verb("next", _next, "take the next ready command of a resource")
    p.add_argument("resource", metavar="RESOURCE")
    p.add_argument("--timeout", type=non_negative_float, metavar="S", help="give up after S s")
    p.add_argument(
        "--ttr",
        type=positive_float,
        default=DEFAULT_NEXT_TTR,
        metavar="S",
        help=f"lease time in seconds, so another process may COMPLETE "
        f"(default {DEFAULT_NEXT_TTR:g})",
    )
    _json_option(p)

    # The reason is free text: `disk full -ENOSPC`, `exit code -1`. Every word is taken as
    # typed (REMAINDER: a positional CMD or true|false would swallow a `--` after it), and
    # parse_args (_complete_words) hands the options of `complete` among them to `options`.
    options = argparse.ArgumentParser(add_help=False, parents=[conn], exit_on_error=False)
    options.add_argument("--delivery", type=int, metavar="N", help="refuse if redelivered since N")
    _json_option(options)
    p = verbs.add_parser(
        "complete",
        parents=[options],
        help="finish a command taken with next",
        usage="%(prog)s [-h] [--socket PATH] [--addr HOST:PORT]\n"
        "       [--delivery N] [--json] CMD true|false [REASON ...]",
    )
    p.set_defaults(run=_run_client, handler=_complete, parser=p, complete_options=options)
    p.add_argument(
        "words",
        nargs=argparse.REMAINDER,
        metavar="CMD true|false [REASON ...]",
        help="the command, whether it succeeded, then why: the words that follow, joined "
        "as typed, '-1' and '-ENOSPC' too; --delivery, --json, --socket and --addr among "
        "them are options; every word after '--' is not",
    )

    p = verb("touch", _touch, "extend the lease of a command taken with next")
    p.add_argument("command", metavar="CMD")
    p.add_argument("--ttr", type=positive_float, metavar="S", help="new lease time")
    p.add_argument("--delivery", type=int, metavar="N", help="refuse if redelivered since N")
    _json_option(p)

    p = verb("cancel", _cancel, "cancel what has not run yet of a package")
    p.add_argument("package", metavar="PKG")
    _json_option(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spinbroker",
        description="spinbroker: a message broker for finite-state-machine work across agents.",
        parents=[_connection_options(None)],
    )
    parser.add_argument("--version", action="version", version=f"spinbroker {__version__}")
    subparsers = parser.add_subparsers(dest="subcommand", metavar="COMMAND", required=True)
    conn = _connection_options(argparse.SUPPRESS)

    _add_serve_parser(subparsers)
    _add_message_parsers(subparsers, conn)

    for name, handler, text in (
        ("stats", _stats, "queue and connection counts"),
        ("ping", _ping, "check that the broker answers"),
    ):
        p = subparsers.add_parser(name, parents=[conn], help=text)
        p.set_defaults(run=_run_client, handler=handler, parser=p)
        _json_option(p)

    # Everything after `wal` goes to its own parser (spinbroker/wal/inspect.py), --help
    # included: `spinbroker wal inspect --help` lists inspect's options.
    wal = subparsers.add_parser(
        "wal",
        help="inspect or repair a data directory's log (`wal inspect|repair DATADIR`)",
        add_help=False,
    )
    wal.add_argument("rest", nargs=argparse.REMAINDER)
    wal.set_defaults(run=_wal, parser=wal)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse `argv`; raises SystemExit(2) on bad usage, as argparse does."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Options may come between a subcommand's trailing words (`add P r a x=1 --dep D y=2`):
    # argparse hands back the words after an option as unknown; they belong to `trailing`.
    if args.run is _wal:  # its own parser reads everything after `wal` (see build_parser)
        args.rest = [*args.rest, *extra]
        return args
    complete_options: argparse.ArgumentParser | None = getattr(args, "complete_options", None)
    if complete_options is not None:
        _complete_words(args, complete_options)
    trailing = getattr(args, "trailing", None)
    if trailing is not None:
        words = [w for w in extra if not w.startswith("-")]
        extra = [w for w in extra if w.startswith("-")]
        setattr(args, trailing, [*getattr(args, trailing), *words])
    if extra:
        args.parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.run is _run_client and args.handler is _add:
        try:
            args.parameters = parse_params(args.params)
        except UsageError as exc:
            args.parser.error(str(exc))
    return args


def _complete_words(args: argparse.Namespace, options: argparse.ArgumentParser) -> None:
    """Read `complete`'s words: its options, then CMD, true|false and the reason.

    A word is an option if argparse would read it as one of `options` (`--json`,
    `--delivery N`, `--delivery=N`, a unique abbreviation such as `--del N`, `--socket`,
    `--addr`, and `-h`/`--help`); of the other words, even those starting with '-', and of
    all words after the first `--`, the first is CMD, the second true|false and the rest
    the reason, in order.
    """
    known = options._option_string_actions  # every option string of `options`
    words: list[str] = args.words
    plain: list[str] = []
    option_words: list[str] = []
    i = 0
    while i < len(words):
        word = words[i]
        i += 1
        if word == "--":
            plain.extend(words[i:])
            break
        if word == "-h" or (len(word) >= 3 and "--help".startswith(word)):
            args.parser.print_help()
            args.parser.exit()
        name, has_value, _ = word.partition("=")
        matches = [option for option in known if option.startswith(name)]
        if name in known:
            matches = [name]
        if not name.startswith("--") or len(name) < 3 or len(matches) != 1:
            plain.append(word)
            continue
        if known[matches[0]].nargs != 0 and not has_value and i < len(words):
            word = f"{matches[0]}={words[i]}"  # its value, whatever it looks like (`-1`)
            i += 1
        option_words.append(word)
    try:
        options.parse_args(option_words, namespace=args)
    except argparse.ArgumentError as exc:
        args.parser.error(str(exc))
    if len(plain) < 2:
        missing = ", ".join(["CMD", "true|false"][len(plain) :])
        args.parser.error(f"the following arguments are required: {missing}")
    args.command = plain[0]
    try:
        args.success = parse_bool(plain[1])
    except argparse.ArgumentTypeError as exc:
        args.parser.error(f"argument true|false: {exc}")
    args.reason = plain[2:]


def client_address(args: argparse.Namespace, environ: Any = None) -> str:
    """The broker address: --socket, else --addr, else $SPINBROKER_ADDR, else the default."""
    environ = os.environ if environ is None else environ
    socket, addr = getattr(args, "socket", None), getattr(args, "addr", None)
    if socket is not None and addr is not None:
        raise UsageError("give --socket or --addr, not both")
    if socket is not None:
        if not socket:
            raise UsageError("--socket: empty socket path")
        return f"unix:{socket}"
    candidate, source = (addr, "--addr") if addr is not None else (environ.get(ENV_ADDR), ENV_ADDR)
    if not candidate:
        return DEFAULT_ADDR
    try:
        return format_address(parse_address(candidate))
    except ValueError as exc:
        raise UsageError(f"{source}: {exc}") from None


# --------------------------------------------------------------------------- output


def _finite_json(value: Any) -> tuple[Any, int]:
    """`value` with every non-finite float made a string ("Infinity", "-Infinity", "NaN"),
    and how many there were: strict JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return ("NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"), 1
    if isinstance(value, dict):
        count = 0
        out: dict[str, Any] = {}
        for key, item in value.items():
            out[key], n = _finite_json(item)
            count += n
        return out, count
    if isinstance(value, list):
        pairs = [_finite_json(item) for item in value]
        return [item for item, _ in pairs], sum(n for _, n in pairs)
    return value, 0


def _print_json(value: Any) -> None:
    """One line of strict JSON (RFC 8259). A non-finite number (another client may have put
    one in a command's parameters over msgpack) is printed as a string, with a warning on
    stderr: failing instead would leave a command NEXT has just leased unusable."""
    finite, replaced = _finite_json(to_json_value(value))
    if replaced:
        _error(f"warning: {replaced} non-finite number(s) shown as strings in the JSON output")
    print(json.dumps(finite, separators=(",", ":"), allow_nan=False))


def _emit(args: argparse.Namespace, as_json: Any, text: str) -> None:
    """Print `as_json` as one JSON object with --json, else `text` for a person."""
    if args.json:
        _print_json(as_json)
    else:
        print(text)


def _compact(value: Any) -> str:
    return json.dumps(to_json_value(value), separators=(", ", ": "))


def format_counts(counts: dict[str, int]) -> str:
    known = [f"{counts[s]} {s}" for s in COUNT_ORDER if counts.get(s)]
    other = [f"{n} {s}" for s, n in sorted(counts.items()) if s not in COUNT_ORDER and n]
    return ", ".join(known + other) or "no commands"


def format_status(status: PackageStatus | CommandStatus) -> str:
    """A status for a person: the state first, then what explains it."""
    if isinstance(status, CommandStatus):
        lines = [
            status.state,
            f"command {status.id}: {status.resource} {status.action}, "
            f"package {status.package}, delivery {status.delivery}",
        ]
        if status.reason:
            lines.append(f"reason: {status.reason}")
        return "\n".join(lines)
    if status.finished:
        head = f"{status.state} (finished)"
    elif status.state in ("open", "pending"):
        head = status.state
    else:
        head = f"{status.state} (not finished yet)"
    lines = [head, f"commands: {format_counts(status.counts)}"]
    if status.causer:
        lines.append(f"causer: {status.causer}")
    if status.reason:
        lines.append(f"reason: {status.reason}")
    for c in status.commands or ():
        reason = f"  {c.reason}" if c.reason else ""
        lines.append(f"  {c.id}  {c.resource} {c.action}  {c.state}{reason}")
    return "\n".join(lines)


def format_command(command: DeliveredCommand) -> str:
    lease = "this connection" if command.ttr is None else f"{command.ttr:g} s"
    rows = (
        ("id", command.id),
        ("package", command.package),
        ("resource", command.resource),
        ("action", command.action),
        ("parameters", _compact(command.parameters)),
        ("dependencies", ", ".join(command.dependencies) or "none"),
        ("delivery", str(command.delivery)),
        ("lease", lease),
    )
    return "\n".join(f"{name:<13}{value}" for name, value in rows)


def format_stats(stats: dict[str, Any]) -> str:
    columns = ("ready", "waiting", "leased", "agents")
    resources: dict[str, dict[str, int]] = stats.get("resources") or {}
    width = max([len("resource"), len("total"), *(len(r) for r in resources)])
    header = f"{'resource':<{width}}" + "".join(f"{c:>9}" for c in columns)
    lines = [header]
    for name in sorted(resources):
        row = resources[name]
        lines.append(f"{name:<{width}}" + "".join(f"{row.get(c, 0):>9}" for c in columns))
    totals: dict[str, int] = stats.get("totals") or {}
    lines.append(f"{'total':<{width}}" + "".join(f"{totals.get(c, 0):>9}" for c in columns))
    lines.append(
        f"packages {totals.get('packages', 0)}, commands {totals.get('commands', 0)}, "
        f"connections {stats.get('connections', 0)}"
    )
    wal: dict[str, Any] | None = stats.get("log")
    if wal:
        lines.append(format_log_stats(wal))
    return "\n".join(lines)


def format_log_stats(wal: dict[str, Any]) -> str:
    """One line: how durable the log is and what its syncs and snapshots cost."""
    syncs = wal.get("syncs", 0)
    line = f"log: fsync {wal.get('fsync')}, lsn {wal.get('appended_lsn')}"
    line += f" (durable {wal.get('durable_lsn')}), {syncs} syncs"
    if syncs:
        per_sync = wal.get("synced_records", 0) / syncs
        mean_ms = wal.get("sync_seconds", 0.0) * 1000 / syncs
        line += f" of {per_sync:.1f} records, {mean_ms:.2f} ms mean"
        line += f", {wal.get('max_sync_ms', 0.0):.1f} ms max"
    if "snapshots" in wal:
        line += f"; {wal['snapshots']} snapshots (last at lsn {wal.get('snapshot_lsn')}"
        line += f", fork {wal.get('snapshot_fork_ms', 0.0):.1f} ms)"
    return line


# --------------------------------------------------------------------------- client commands


async def _new(client: Client, args: argparse.Namespace) -> int:
    package = await client.new()
    _emit(args, {"package": package}, package)
    return EXIT_OK


async def _add(client: Client, args: argparse.Namespace) -> int:
    command = await client.add(
        args.package, args.resource, args.action, args.parameters, args.dep or None
    )
    _emit(args, {"command": command}, command)
    return EXIT_OK


async def _enqueue(client: Client, args: argparse.Namespace) -> int:
    commands = await client.enqueue(args.package)
    _emit(args, {"commands": commands}, "\n".join(commands))
    return EXIT_OK


async def _status(client: Client, args: argparse.Namespace) -> int:
    status = await client.status(args.id, commands=args.commands)
    _emit(args, status.to_json(), format_status(status))
    return EXIT_OK


async def _wait(client: Client, args: argparse.Namespace) -> int:
    status = await client.wait(args.package, timeout=args.timeout)
    if status is None:
        print(f"spinbroker: package {args.package} not finished yet (timed out)", file=sys.stderr)
        return EXIT_EMPTY
    _emit(args, status.to_json(), format_status(status))
    return EXIT_OK


async def _next(client: Client, args: argparse.Namespace) -> int:
    command = await client.next(args.resource, timeout=args.timeout, ttr=args.ttr)
    if command is None:
        print(f"spinbroker: no command ready for {args.resource} (timed out)", file=sys.stderr)
        return EXIT_EMPTY
    _emit(args, command.to_json(), format_command(command))
    return EXIT_OK


async def _complete(client: Client, args: argparse.Namespace) -> int:
    reason = " ".join(args.reason) or None
    state = await client.complete(args.command, args.success, reason, delivery=args.delivery)
    _emit(args, {"command": args.command, "state": state}, state)
    return EXIT_OK


async def _touch(client: Client, args: argparse.Namespace) -> int:
    ttr = await client.touch(args.command, ttr=args.ttr, delivery=args.delivery)
    held = "a connection lease (no ttr)" if ttr is None else f"leased for {ttr:g} s"
    _emit(args, {"command": args.command, "ttr": ttr}, held)
    return EXIT_OK


async def _cancel(client: Client, args: argparse.Namespace) -> int:
    cancelled = await client.cancel(args.package)
    plural = "" if cancelled == 1 else "s"
    _emit(
        args,
        {"package": args.package, "cancelled": cancelled},
        f"cancelled {cancelled} command{plural}",
    )
    return EXIT_OK


async def _stats(client: Client, args: argparse.Namespace) -> int:
    stats = await client.stats()
    _emit(args, stats, format_stats(stats))
    return EXIT_OK


async def _ping(client: Client, args: argparse.Namespace) -> int:
    started = time.perf_counter()
    await client.ping()
    elapsed_ms = (time.perf_counter() - started) * 1000
    text = f"pong from {format_address(client.address)} in {elapsed_ms:.2f} ms"
    _emit(args, {"pong": True, "ms": round(elapsed_ms, 3)}, text)
    return EXIT_OK


async def _client_session(address: str, handler: ClientHandler, args: argparse.Namespace) -> int:
    try:
        client = await Client.connect(address)
    except (OSError, TimeoutError) as exc:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        _error(f"cannot connect to {address}: {detail or 'timed out'} (is the broker running?)")
        return EXIT_ERROR
    async with client:
        return await handler(client, args)


def _run_client(args: argparse.Namespace) -> int:
    address = client_address(args)
    try:
        return asyncio.run(_client_session(address, args.handler, args))
    except ClientError as exc:
        _error(str(exc))
    except ConnectionLost as exc:
        _error(f"{address}: {exc}")
    except (TypeError, OverflowError) as exc:  # a value msgpack cannot carry
        _error(f"cannot send that request: {exc}")
    except UnicodeEncodeError as exc:  # a lone surrogate: `x="\ud800"`, or undecodable argv
        bad = exc.object[exc.start : exc.end]
        _error(f"cannot send that request: {bad!r} is not valid text ({exc.reason})")
    return EXIT_ERROR


# --------------------------------------------------------------------------- serve, wal


def server_config(args: argparse.Namespace) -> ServerConfig:
    """The ServerConfig that `serve` flags describe."""
    limit_flags = {
        "max_frame": args.max_frame,
        "max_commands_per_package": args.max_commands,
        "max_parameter_bytes": args.max_parameter_bytes,
        "max_connections": args.max_connections,
        "max_inflight": args.max_inflight,
        "package_ttl": args.package_ttl,
        "retention": args.retention,
        "max_deliveries": args.max_deliveries,
    }
    limits = Limits(**{k: v for k, v in limit_flags.items() if v is not None})
    config = ServerConfig(
        data_dir=args.data_dir,
        limits=limits,
        fsync=args.fsync,
        fsync_interval_ms=args.fsync_interval_ms,
        segment_size=args.segment_size,
        snapshot_every=args.snapshot_every,
        snapshot_interval=args.snapshot_interval,
        log_level=args.log_level,
    )
    socket = getattr(args, "socket", None)
    if socket is not None:
        config.socket = Path(socket)
    if args.no_tcp:
        config.tcp = None
    elif getattr(args, "addr", None) is not None:
        config.tcp = _listen_address(args.addr)
    return config


def _listen_address(text: str) -> tuple[str, int]:
    try:
        address = parse_address(text)
    except ValueError as exc:
        raise UsageError(f"--addr: {exc}") from None
    if address[0] != "tcp":
        raise UsageError(f"--addr {text!r}: expected HOST:PORT (use --socket for a Unix socket)")
    return address[1], address[2]


def _serve(args: argparse.Namespace) -> int:
    config = server_config(args)
    from spinbroker.server import run

    return run(config)


def _wal(args: argparse.Namespace) -> int:
    from spinbroker.wal.inspect import main as wal_main

    result: int = wal_main(args.rest)
    return result


# --------------------------------------------------------------------------- main


def _error(message: str) -> None:
    print(f"spinbroker: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as exc:  # argparse: --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except UsageError as exc:
        args.parser.print_usage(sys.stderr)
        print(f"{args.parser.prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exc:  # a delegate's own argparse (wal)
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    except KeyboardInterrupt:
        return 130
