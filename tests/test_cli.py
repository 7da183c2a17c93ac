"""The `spinbroker` command: argument parsing and value typing, output for people and for
scripts, `serve` and `wal` delegation, and the protocol.md walkthrough as real processes.

Client subcommands run in-process in a worker thread (main() starts its own event loop)
against a real server in the test's loop; the walkthrough runs `python -m spinbroker`.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import sys
import tempfile
import types
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from spinbroker.cli import (
    DEFAULT_ADDR,
    EXIT_EMPTY,
    EXIT_ERROR,
    EXIT_OK,
    EXIT_USAGE,
    UsageError,
    client_address,
    format_command,
    format_counts,
    format_stats,
    format_status,
    main,
    parse_args,
    parse_params,
    parse_value,
)
from spinbroker.client import CommandStatus, DeliveredCommand, PackageStatus
from spinbroker.config import DEFAULT_PORT, Limits, ServerConfig

# --------------------------------------------------------------------------- values


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("50", 50),
        ("-3", -3),
        ("1.5", 1.5),
        ("true", True),
        ("false", False),
        ("null", None),
        ("test", "test"),
        ("test.raw", "test.raw"),
        ('"a b"', "a b"),
        ('"50"', "50"),
        ("", ""),
        ("01", "01"),
        ("NaN", "NaN"),
        ("Infinity", "Infinity"),
        ("[1, 2]", [1, 2]),
        ('{"Name": "vm1", "Memory": 512}', {"Name": "vm1", "Memory": 512}),
        ("{not json", "{not json"),
    ],
)
def test_parse_value_is_json_else_the_text(text: str, value: Any) -> None:
    parsed = parse_value(text)
    assert parsed == value
    assert type(parsed) is type(value)


@pytest.mark.parametrize("text", ["1e400", "-1e400", "[1, 1e400]", '{"a": {"b": -1E999}}'])
def test_parse_value_refuses_numbers_that_overflow(text: str) -> None:
    """Audit h6: `x=1e400` was stored as inf, and `next --json` then printed `Infinity`."""
    with pytest.raises(UsageError, match="must be finite"):
        parse_value(text)


def test_an_overflowing_parameter_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["message", "add", "P", "r", "a", "x=1e400"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "parameter 'x': 1e400 is out of range" in err
    assert "Traceback" not in err


def test_parse_params() -> None:
    assert parse_params(["path=test", "image_size=50", "eq=a=b", "vm={}"]) == {
        "path": "test",
        "image_size": 50,
        "eq": "a=b",
        "vm": {},
    }


@pytest.mark.parametrize(
    ("items", "complaint"),
    [(["noequals"], "key=value"), (["=v"], "key=value"), (["a=1", "a=2"], "twice")],
)
def test_parse_params_refuses(items: list[str], complaint: str) -> None:
    with pytest.raises(UsageError, match=complaint):
        parse_params(items)


# --------------------------------------------------------------------------- parsing


def test_add_takes_params_and_deps_in_any_order() -> None:
    args = parse_args(
        [
            "message",
            "add",
            "PKG",
            "storage",
            "create_image",
            "volume_path=test",
            "--dep",
            "D1",
            "image_size=50",
            "--dep",
            "D2",
            'vm={"Name": "vm1"}',
        ]
    )
    assert (args.package, args.resource, args.action) == ("PKG", "storage", "create_image")
    assert args.parameters == {"volume_path": "test", "image_size": 50, "vm": {"Name": "vm1"}}
    assert args.dep == ["D1", "D2"]
    assert args.json is False


def test_add_with_a_bad_parameter_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["message", "add", "P", "r", "a", "oops"]) == EXIT_USAGE
    assert "expected key=value" in capsys.readouterr().err


def test_complete_joins_its_reason_and_reads_the_delivery() -> None:
    args = parse_args(["message", "complete", "C", "false", "disk", "--delivery", "2", "full"])
    assert (args.command, args.success, args.delivery) == ("C", False, 2)
    assert " ".join(args.reason) == "disk full"
    ok = parse_args(["message", "complete", "C", "TRUE"])
    assert (ok.success, ok.reason, ok.delivery) == (True, [], None)


@pytest.mark.parametrize(
    ("words", "reason", "delivery", "as_json"),
    [
        (["disk", "full", "-ENOSPC"], "disk full -ENOSPC", None, False),
        (["--delivery", "1", "exit", "code", "-1"], "exit code -1", 1, False),
        (["-1"], "-1", None, False),
        (["rc=-9", "--json", "killed"], "rc=-9 killed", None, True),
        (["--delivery=3", "-v", "--verbose"], "-v --verbose", 3, False),
        (["--del", "4", "--dry-run", "--", "x"], "--dry-run x", 4, False),
        (["--delivery", "-2", "x"], "x", -2, False),
        (["--", "--json", "--delivery", "5", "-h"], "--json --delivery 5 -h", None, False),
        (["a", "--", "b", "--", "c"], "a b -- c", None, False),
        (["--", "a", "--", "b"], "a -- b", None, False),
    ],
)
def test_complete_reason_words_are_taken_as_typed(
    words: list[str], reason: str, delivery: int | None, as_json: bool
) -> None:
    """Audit h6: every leftover word starting with '-' was an unrecognized option, so
    `complete C false disk full -ENOSPC` exited 2."""
    args = parse_args(["message", "complete", "C", "false", *words])
    assert (" ".join(args.reason), args.delivery, args.json) == (reason, delivery, as_json)


def test_complete_options_among_the_reason_are_still_checked(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["message", "complete", "C", "false", "x", "--delivery"]) == EXIT_USAGE
    assert "expected one argument" in capsys.readouterr().err
    assert main(["message", "complete", "C", "false", "x", "--delivery", "two"]) == EXIT_USAGE
    assert "invalid int value: 'two'" in capsys.readouterr().err
    assert main(["message", "complete", "C", "false", "x", "--help"]) == EXIT_OK
    assert "[REASON ...]" in capsys.readouterr().out
    args = parse_args(["message", "complete", "C", "false", "x", "--socket", "/s", "y"])
    assert (args.socket, args.reason) == ("/s", ["x", "y"])
    args = parse_args(["message", "complete", "C", "--json", "--delivery", "2", "true", "-x"])
    assert (args.success, args.json, args.delivery, args.reason) == (True, True, 2, ["-x"])
    args = parse_args(["message", "complete", "C", "--", "false", "--json"])
    assert (args.success, args.json, args.reason) == (False, False, ["--json"])
    args = parse_args(["message", "complete", "--", "-C", "false", "--json"])
    assert (args.command, args.success, args.json, args.reason) == ("-C", False, False, ["--json"])
    assert main(["message", "complete", "C", "--json"]) == EXIT_USAGE
    assert "required: true|false" in capsys.readouterr().err
    assert main(["message", "complete"]) == EXIT_USAGE
    assert "required: CMD, true|false" in capsys.readouterr().err


def test_next_leases_for_five_minutes_by_default() -> None:
    args = parse_args(["message", "next", "storage"])
    assert (args.resource, args.timeout, args.ttr) == ("storage", None, 300.0)
    args = parse_args(["message", "next", "storage", "--timeout", "0", "--ttr", "2.5", "--json"])
    assert (args.timeout, args.ttr, args.json) == (0.0, 2.5, True)


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["message"],
        ["frobnicate"],
        ["message", "complete", "C", "maybe"],
        ["message", "status"],
        ["message", "next", "r", "--timeout", "-1"],
        ["message", "next", "r", "--ttr", "0"],
        ["message", "enqueue", "P", "extra"],
        ["ping", "--bogus"],
        ["serve", "--fsync", "sometimes"],
        ["serve", "--addr", "127.0.0.1:1", "--no-tcp"],
        ["serve", "--max-frame", "0"],
        ["wal", "look", "/tmp"],
    ],
)
def test_bad_usage_exits_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == EXIT_USAGE
    assert "usage:" in capsys.readouterr().err


def test_help_and_version_exit_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == EXIT_OK
    assert "message" in capsys.readouterr().out
    assert main(["--version"]) == EXIT_OK
    assert capsys.readouterr().out.startswith("spinbroker ")


def test_fsync_off_is_documented_as_unsafe(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--help"]) == EXIT_OK
    text = " ".join(capsys.readouterr().out.split())
    assert "off: never fsync, for tests and benchmarks only" in text
    assert "a crash loses acknowledged data" in text


# --------------------------------------------------------------------------- addresses


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        (["ping"], {}, DEFAULT_ADDR),
        (["ping"], {"SPINBROKER_ADDR": "unix:/run/sb.sock"}, "unix:/run/sb.sock"),
        (["ping"], {"SPINBROKER_ADDR": "/run/sb.sock"}, "unix:/run/sb.sock"),
        (["ping"], {"SPINBROKER_ADDR": "10.0.0.1:7878"}, "10.0.0.1:7878"),
        (["ping", "--addr", "h:1"], {"SPINBROKER_ADDR": "/env.sock"}, "h:1"),
        (["--addr", "h:1", "ping"], {}, "h:1"),
        (["ping", "--socket", "x.sock"], {"SPINBROKER_ADDR": "h:1"}, "unix:x.sock"),
        (["--socket", "/s", "message", "new"], {}, "unix:/s"),
    ],
)
def test_client_address_precedence(argv: list[str], env: dict[str, str], expected: str) -> None:
    assert client_address(parse_args(argv), env) == expected


def test_default_address_is_the_default_data_dir_socket() -> None:
    assert DEFAULT_ADDR == "unix:spinbroker-data/spinbroker.sock"


def test_address_mistakes_are_usage_errors(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["ping", "--socket", "/s", "--addr", "h:1"]) == EXIT_USAGE
    assert "not both" in capsys.readouterr().err
    assert main(["ping", "--addr", "nohost"]) == EXIT_USAGE
    assert "--addr" in capsys.readouterr().err
    monkeypatch.setenv("SPINBROKER_ADDR", "nonsense")
    assert main(["ping"]) == EXIT_USAGE
    assert "SPINBROKER_ADDR" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--socket", "", "ping"], ["ping", "--socket", ""]])
def test_an_empty_socket_path_is_a_usage_error(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Audit h6: `--socket ''` raised ValueError out of main() (a traceback)."""
    assert main(argv) == EXIT_USAGE
    assert "--socket: empty socket path" in capsys.readouterr().err


def test_json_nested_past_the_parser_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """Audit h6: `x=[[[...` 1,000 deep raised RecursionError out of main()."""
    deep = "[" * 1000 + "]" * 1000
    with pytest.raises(UsageError, match="nested too deeply"):
        parse_value(deep)
    assert main(["message", "add", "P", "r", "a", f"x={deep}"]) == EXIT_USAGE
    assert "parameter 'x': nested too deeply" in capsys.readouterr().err


def test_no_broker_is_an_error_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--socket", str(tmp_path / "absent.sock"), "ping"]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "cannot connect to unix:" in err
    assert "Traceback" not in err


# --------------------------------------------------------------------------- serve and wal


@pytest.fixture
def fake_server(monkeypatch: pytest.MonkeyPatch) -> list[ServerConfig]:
    """`spinbroker.server.run` replaced: records the config it is given."""
    configs: list[ServerConfig] = []

    def run(config: ServerConfig) -> int:
        configs.append(config)
        return 7

    monkeypatch.setitem(sys.modules, "spinbroker.server", types.SimpleNamespace(run=run))
    return configs


def test_serve_defaults(fake_server: list[ServerConfig]) -> None:
    assert main(["serve"]) == 7
    (config,) = fake_server
    assert config == ServerConfig()
    assert config.tcp == ("127.0.0.1", DEFAULT_PORT)


def test_serve_flags_build_the_config(fake_server: list[ServerConfig], tmp_path: Path) -> None:
    argv = [
        "serve",
        "--data-dir",
        str(tmp_path),
        "--socket",
        "/tmp/x.sock",
        "--addr",
        "0.0.0.0:0",
        "--fsync",
        "batch",
        "--fsync-interval-ms",
        "5",
        "--max-frame",
        "2048",
        "--max-commands",
        "10",
        "--max-parameter-bytes",
        "100",
        "--max-connections",
        "3",
        "--max-inflight",
        "4",
        "--package-ttl",
        "60",
        "--retention",
        "120.5",
        "--max-deliveries",
        "2",
        "--log-level",
        "debug",
    ]
    assert main(argv) == 7
    (config,) = fake_server
    assert config.data_dir == tmp_path
    assert config.socket_path == Path("/tmp/x.sock")
    assert config.tcp == ("0.0.0.0", 0)
    assert (config.fsync, config.fsync_interval_ms, config.log_level) == ("batch", 5.0, "debug")
    assert config.limits == Limits(
        max_frame=2048,
        max_commands_per_package=10,
        max_parameter_bytes=100,
        max_connections=3,
        max_inflight=4,
        package_ttl=60.0,
        retention=120.5,
        max_deliveries=2,
    )


def test_serve_unix_only(fake_server: list[ServerConfig]) -> None:
    assert main(["serve", "--no-tcp", "--fsync", "off"]) == 7
    assert fake_server[0].tcp is None
    assert fake_server[0].fsync == "off"


def test_serve_wants_host_port_for_addr(
    fake_server: list[ServerConfig], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--addr", "unix:/x.sock"]) == EXIT_USAGE
    assert "--socket" in capsys.readouterr().err
    assert fake_server == []


def test_wal_delegates_to_the_wal_inspector(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []

    def wal_main(argv: list[str]) -> int:
        calls.append(argv)
        return 5

    monkeypatch.setitem(sys.modules, "spinbroker.wal.inspect", types.SimpleNamespace(main=wal_main))
    assert main(["wal", "inspect", "/d", "--records"]) == 5
    assert main(["wal", "inspect", "--records", "/d"]) == 5
    assert main(["wal", "repair", "/d"]) == 5
    assert main(["wal", "--help"]) == 5
    assert calls == [
        ["inspect", "/d", "--records"],
        ["inspect", "--records", "/d"],
        ["repair", "/d"],
        ["--help"],
    ]


def test_wal_inspect_for_real(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("spinbroker.wal.inspect")
    assert main(["wal", "inspect", "--records", str(tmp_path)]) == EXIT_OK
    assert "segments: 0" in capsys.readouterr().out
    assert main(["wal", "inspect", "--help"]) == EXIT_OK
    assert "--records" in capsys.readouterr().out


# --------------------------------------------------------------------------- output for people

PACKAGE = PackageStatus(
    id="p1",
    state="failed",
    finished=True,
    causer="c1",
    reason="disk full",
    counts={"staged": 0, "succeeded": 2, "failed": 1, "cancelled": 1},
)


def test_format_status_of_a_package() -> None:
    ok = PackageStatus("p1", "succeeded", True, None, None, {"succeeded": 4, "failed": 0})
    assert format_status(ok) == "succeeded (finished)\ncommands: 4 succeeded"
    assert format_status(PACKAGE).splitlines() == [
        "failed (finished)",
        "commands: 2 succeeded, 1 failed, 1 cancelled",
        "causer: c1",
        "reason: disk full",
    ]
    running = PackageStatus("p1", "pending", False, None, None, {"ready": 1, "leased": 1})
    assert format_status(running).splitlines()[0] == "pending"


def test_format_status_of_a_command_and_a_listing() -> None:
    cmd = CommandStatus("c2", "p1", "emulation", "start", "cancelled", "dependency c1 failed", 0)
    assert format_status(cmd).splitlines() == [
        "cancelled",
        "command c2: emulation start, package p1, delivery 0",
        "reason: dependency c1 failed",
    ]
    listed = format_status(
        PackageStatus("p1", "pending", False, None, None, {"ready": 1}, commands=(cmd,))
    )
    assert listed.splitlines()[-1] == "  c2  emulation start  cancelled  dependency c1 failed"


def test_format_counts_of_nothing() -> None:
    assert format_counts({"staged": 0}) == "no commands"


def test_format_command() -> None:
    cmd = DeliveredCommand("c1", "p1", "storage", "add_volume", {"path": "test"}, (), 1, 300.0)
    text = format_command(cmd)
    assert text.splitlines()[0] == "id           c1"
    assert 'parameters   {"path": "test"}' in text
    assert "dependencies none" in text
    assert "lease        300 s" in text


def test_format_stats() -> None:
    stats = {
        "resources": {"storage": {"ready": 2, "waiting": 1, "leased": 0, "agents": 3}},
        "totals": {
            "ready": 2,
            "waiting": 1,
            "leased": 0,
            "agents": 3,
            "packages": 1,
            "commands": 3,
        },
        "connections": 4,
    }
    assert format_stats(stats).splitlines() == [
        "resource    ready  waiting   leased   agents",
        "storage         2        1        0        3",
        "total           2        1        0        3",
        "packages 1, commands 3, connections 4",
    ]
    stats["log"] = {
        "fsync": "always",
        "appended_lsn": 12,
        "durable_lsn": 11,
        "syncs": 4,
        "synced_records": 10,
        "sync_seconds": 0.002,
        "max_sync_ms": 1.25,
        "snapshots": 1,
        "snapshot_lsn": 8,
        "snapshot_fork_ms": 3.5,
        "snapshot_seconds": 0.2,
    }
    assert format_stats(stats).splitlines()[-1] == (
        "log: fsync always, lsn 12 (durable 11), 4 syncs of 2.5 records, 0.50 ms mean, "
        "1.2 ms max; 1 snapshots (last at lsn 8, fork 3.5 ms)"
    )


# --------------------------------------------------------------------------- against a broker


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory: a Unix socket path must fit in 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="sbc-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def broker(short_dir: Path) -> AsyncIterator[Any]:
    server_module = pytest.importorskip("spinbroker.server")
    config = ServerConfig(data_dir=short_dir / "data", socket=short_dir / "sb.sock", tcp=None)
    server = server_module.Server(config)
    await server.start()
    yield server
    await server.stop()


class Cli:
    """Runs main() in a worker thread, so the broker in this loop keeps serving."""

    def __init__(self, socket: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.socket = socket
        self.capsys = capsys

    async def __call__(self, *argv: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        code = await asyncio.to_thread(main, ["--socket", str(self.socket), *argv])
        out, err = self.capsys.readouterr()
        return code, out, err

    async def ok(self, *argv: str) -> str:
        code, out, err = await self(*argv)
        assert code == EXIT_OK, (argv, code, err)
        return out.strip()

    async def json(self, *argv: str) -> Any:
        out = await self.ok(*argv, "--json")
        assert len(out.splitlines()) == 1, out
        return json.loads(out)


@pytest.fixture
def cli(broker: Any, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(broker.socket_path, capsys)


async def test_cli_json_shapes(cli: Cli) -> None:
    package = (await cli.json("message", "new"))["package"]
    first = (await cli.json("message", "add", package, "storage", "add_volume", "path=test"))[
        "command"
    ]
    assert (await cli.json("message", "enqueue", package)) == {"commands": [first]}

    cmd = await cli.json("message", "next", "storage", "--timeout", "0")
    assert {"id", "resource", "action", "parameters", "dependencies", "delivery"} <= set(cmd)
    assert (cmd["id"], cmd["parameters"], cmd["delivery"], cmd["ttr"]) == (
        first,
        {"path": "test"},
        1,
        300.0,
    )
    assert (await cli.json("message", "complete", first, "true")) == {
        "command": first,
        "state": "succeeded",
    }
    status = await cli.json("message", "status", package)
    assert {"state", "finished", "causer", "reason"} <= set(status)
    assert (status["state"], status["finished"], status["causer"]) == ("succeeded", True, None)
    waited = await cli.json("message", "wait", package, "--timeout", "5")
    assert waited == status
    cstatus = await cli.json("message", "status", first)
    assert (cstatus["kind"], cstatus["state"]) == ("command", "succeeded")
    listed = await cli.json("message", "status", package, "--commands")
    assert [c["id"] for c in listed["commands"]] == [first]


async def test_cli_values_keep_their_types(cli: Cli) -> None:
    package = await cli.ok("message", "new")
    await cli.ok(
        "message",
        "add",
        package,
        "emulation",
        "write_config",
        "id=1",
        'vm={"Name": "vm1", "Memory": 512, "Disks": ["a.raw"]}',
        "flag=true",
        "name=vm1",
        'quoted="42"',
    )
    await cli.ok("message", "enqueue", package)
    cmd = await cli.json("message", "next", "emulation", "--timeout", "0")
    assert cmd["parameters"] == {
        "id": 1,
        "vm": {"Name": "vm1", "Memory": 512, "Disks": ["a.raw"]},
        "flag": True,
        "name": "vm1",
        "quoted": "42",
    }


def _strict_json(text: str) -> Any:
    def refuse(constant: str) -> Any:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


async def test_cli_json_is_strict_even_for_non_finite_values(broker: Any, cli: Cli) -> None:
    """Audit h6: a non-finite float another client put in the parameters (msgpack carries
    it) came out of `next --json` as `Infinity`, which is not JSON."""
    from spinbroker.client import Client

    async with await Client.connect(broker.socket_path) as client:
        await client.submit(
            [{"resource": "inf", "action": "a", "parameters": {"x": math.inf, "y": [-math.inf]}}]
        )
    code, out, err = await cli("message", "next", "inf", "--timeout", "0", "--json")
    assert code == EXIT_OK, err
    assert len(out.splitlines()) == 1
    assert _strict_json(out)["parameters"] == {"x": "Infinity", "y": ["-Infinity"]}
    assert "2 non-finite number(s) shown as strings" in err


async def test_cli_empty_and_errors(cli: Cli) -> None:
    code, out, err = await cli("message", "next", "idle", "--timeout", "0", "--json")
    assert (code, out) == (EXIT_EMPTY, "")
    assert "timed out" in err

    package = await cli.ok("message", "new")
    await cli.ok("message", "add", package, "slow", "a")
    await cli.ok("message", "enqueue", package)
    code, out, err = await cli("message", "wait", package, "--timeout", "0")
    assert (code, out) == (EXIT_EMPTY, "")

    code, out, err = await cli("message", "status", "00000000-0000-0000-0000-000000000000")
    assert (code, out) == (EXIT_ERROR, "")
    assert err.startswith("spinbroker: not_found: ")

    code, _, err = await cli("message", "enqueue", package)
    assert code == EXIT_ERROR
    assert "not_open" in err


@pytest.mark.parametrize(
    "param",
    [
        'x="\\ud800"',  # a JSON escape for a lone surrogate
        "x=\udcff",  # how Python decodes the byte 0xff in argv
    ],
)
async def test_cli_text_that_is_not_unicode_is_an_error(cli: Cli, param: str) -> None:
    """Audit h6: a lone surrogate raised UnicodeEncodeError out of main() (a traceback)."""
    package = await cli.ok("message", "new")
    code, out, err = await cli("message", "add", package, "r", "a", param)
    assert (code, out) == (EXIT_ERROR, "")
    assert err.startswith("spinbroker: cannot send that request: ")
    assert "surrogates not allowed" in err


async def test_cli_failure_reads_well(cli: Cli) -> None:
    package = await cli.ok("message", "new")
    first = await cli.ok("message", "add", package, "storage", "add_volume", "path=test")
    await cli.ok("message", "add", package, "storage", "create_image", "--dep", first)
    await cli.ok("message", "enqueue", package)
    taken = await cli.ok("message", "next", "storage", "--timeout", "0")
    assert taken.splitlines()[0] == f"id           {first}"
    assert await cli.ok("message", "complete", first, "false", "disk", "full") == "failed"
    status = (await cli.ok("message", "status", package)).splitlines()
    assert status == [
        "failed (finished)",
        "commands: 1 failed, 1 cancelled",
        f"causer: {first}",
        "reason: disk full",
    ]


async def test_cli_reason_keeps_words_that_start_with_a_dash(cli: Cli) -> None:
    package = await cli.ok("message", "new")
    first = await cli.ok("message", "add", package, "storage", "add_volume", "path=test")
    await cli.ok("message", "enqueue", package)
    taken = await cli.json("message", "next", "storage", "--timeout", "0")
    completed = await cli.json(
        "message", "complete", first, "false", "--delivery", "1", "exit", "code", "-1"
    )
    assert completed == {"command": first, "state": "failed"}
    assert taken["delivery"] == 1
    status = await cli.json("message", "status", first)
    assert status["reason"] == "exit code -1"


async def test_cli_cancel_stats_ping_touch(cli: Cli) -> None:
    package = await cli.ok("message", "new")
    for action in ("a", "b", "c"):
        await cli.ok("message", "add", package, "later", action)
    await cli.ok("message", "enqueue", package)
    taken = await cli.json("message", "next", "later", "--timeout", "0", "--ttr", "30")
    assert await cli.ok("message", "touch", taken["id"], "--ttr", "60") == "leased for 60 s"
    stats = await cli.json("stats")
    assert stats["resources"]["later"]["ready"] == 2
    assert (await cli.ok("stats")).splitlines()[0].split() == [
        "resource",
        "ready",
        "waiting",
        "leased",
        "agents",
    ]
    assert await cli.ok("message", "cancel", package) == "cancelled 2 commands"
    assert (await cli.ok("ping")).startswith("pong from unix:")
    assert (await cli.json("ping"))["pong"] is True


# --------------------------------------------------------------------------- real processes


async def run_cli(env: dict[str, str], *argv: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "spinbroker",
        *argv,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_walkthrough_as_processes(broker: Any) -> None:
    """protocol.md's session, each step a `python -m spinbroker` process."""
    env = {**os.environ, "SPINBROKER_ADDR": f"unix:{broker.socket_path}"}

    async def ok(*argv: str) -> str:
        code, out, err = await run_cli(env, *argv)
        assert code == EXIT_OK, (argv, code, err)
        return out.strip()

    package = await ok("message", "new")
    volume = await ok("message", "add", package, "storage", "add_volume", "path=test")
    image = await ok(
        "message",
        "add",
        package,
        "storage",
        "create_image",
        "volume_path=test",
        "image_name=test.raw",
        "image_size=50",
        "--dep",
        volume,
    )
    vm = '{"Name": "vm1", "Memory": 512, "Disks": [{"Path": "test/test.raw"}]}'
    config = await ok("message", "add", package, "emulation", "write_config", "id=1", f"vm={vm}")
    start = await ok("message", "add", package, "emulation", "start", "id=1", "--dep", config)
    assert (await ok("message", "enqueue", package)).splitlines() == [volume, image, config, start]

    expected = [
        ("storage", volume, "add_volume", {"path": "test"}),
        (
            "storage",
            image,
            "create_image",
            {"volume_path": "test", "image_name": "test.raw", "image_size": 50},
        ),
        ("emulation", config, "write_config", {"id": 1, "vm": json.loads(vm)}),
        ("emulation", start, "start", {"id": 1}),
    ]
    for resource, command, action, parameters in expected:
        taken = json.loads(await ok("message", "next", resource, "--timeout", "0", "--json"))
        assert (taken["id"], taken["action"], taken["parameters"]) == (command, action, parameters)
        if command == volume:
            code, _, _ = await run_cli(env, "message", "next", "storage", "--timeout", "0")
            assert code == EXIT_EMPTY  # create_image waits on add_volume
        assert await ok("message", "complete", command, "true") == "succeeded"

    assert (await ok("message", "status", package)).splitlines() == [
        "succeeded (finished)",
        "commands: 4 succeeded",
    ]


async def test_serve_as_a_process(short_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`spinbroker serve` runs the real server until SIGTERM, then exits 0."""
    pytest.importorskip("spinbroker.server")
    socket = short_dir / "serve.sock"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "spinbroker",
        "serve",
        "--data-dir",
        str(short_dir / "data"),
        "--socket",
        str(socket),
        "--no-tcp",
        "--fsync",
        "off",
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    try:
        async with asyncio.timeout(10):
            log = b""
            while b" ready" not in log:  # the server logs its readiness once it listens
                line = await proc.stderr.readline()
                assert line, f"serve exited early: {log.decode()}"
                log += line
        code = await asyncio.to_thread(main, ["--socket", str(socket), "ping"])
        assert code == EXIT_OK, capsys.readouterr().err
    finally:
        if proc.returncode is None:
            proc.terminate()
    assert await proc.wait() == 0
    assert not socket.exists()


async def test_serve_started_with_stdio_closed_stops_cleanly(tmp_path: Path) -> None:
    """A broker started with its standard input closed (`0<&-`, some supervisors) once
    aborted when it stopped: the event loop's epoll descriptor took fd 0, and libuv refuses
    to close a descriptor below 3. `serve` now opens /dev/null on any of 0-2 found closed."""
    serve = [sys.executable, "-m", "spinbroker", "serve", "--data-dir", str(tmp_path / "d")]
    proc = await asyncio.create_subprocess_exec(
        "sh",
        "-c",
        'exec "$@" 0<&-',  # as a shell closes it (uvloop's spawn runs no preexec_fn)
        "sh",
        *serve,
        "--no-tcp",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        async with asyncio.timeout(30):
            while b" ready " not in (line := await proc.stderr.readline()):
                assert line, "the broker exited before it was ready"
        proc.terminate()
        async with asyncio.timeout(30):
            rest = await proc.stderr.read()
            assert await proc.wait() == 0, rest.decode(errors="replace")
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
