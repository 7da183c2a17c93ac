"""sa-emulation without qemu: VM definitions, argv and unit rendering, QMP, the actions."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from agents import emulation
from agents.emulation import Emulation, SystemdSupervisor, build_agent
from agents.emulation.config import VM_PARAM, Image, VMConfig, parse_forward
from agents.emulation.qemu import VMFiles, qemu_argv, qemu_value, render_unit, systemd_quote
from agents.emulation.qmp import QMP, QMPError, run_command
from agents.emulation.supervisor import log_tail
from spinbroker.agent import ActionError, Agent
from spinbroker.schema import SchemaError

VM: dict[str, Any] = {
    "Name": "web-1",
    "Cpus": 2,
    "Memory": 1024,
    "Images": [
        {"Path": "disk.raw", "Volume": "vol"},
        {"Path": "/isos/install.iso", "Cdrom": True},
    ],
}


def vm_config(**changes: Any) -> VMConfig:
    config: VMConfig = VM_PARAM.check({**VM, **changes}, "vm")
    return config


def vm_problem(**changes: Any) -> str:
    with pytest.raises(SchemaError) as info:
        vm_config(**changes)
    return info.value.message


# -- the VM definition -------------------------------------------------------------------------


def test_vm_definition_is_parsed_into_dataclasses() -> None:
    vm = vm_config(Ports={"22": "127.0.0.1:2222"})
    assert vm == VMConfig(
        name="web-1",
        cpus=2,
        memory=1024,
        images=[Image("disk.raw", False, "vol"), Image("/isos/install.iso", True, None)],
        ports={"22": "127.0.0.1:2222"},
        accel="kvm:tcg",
    )
    assert VM_PARAM.check(vm.to_wire(), "vm") == vm


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"Name": "a b"}, "Name 'a b' must be 1 to 64 letters"),
        ({"Name": ""}, "length 0 is less than the minimum 1"),
        ({"Cpus": 0}, "parameter 'vm.Cpus': 0 is less than the minimum 1"),
        ({"Cpus": "2"}, "parameter 'vm.Cpus': expected int, got str '2'"),
        ({"Memory": 8}, "parameter 'vm.Memory': 8 is less than the minimum 16"),
        ({"Images": [{"Path": "x.raw"}]}, "a disk (Cdrom false) needs a Volume"),
        ({"Images": [{"Path": "x", "Volume": "../up"}]}, "Volume '../up' must be a relative"),
        ({"Images": [{"Path": "../x", "Volume": "v"}]}, "image path '../x' must not have"),
        ({"Images": [{"Volume": "v"}]}, "required parameter 'vm.Images[0].Path' is missing"),
        ({"Images": [{"Path": "x", "Volume": "v", "Size": 1}]}, "unknown parameter"),
        ({"Accel": "hvf"}, "Accel 'hvf' must be one of kvm:tcg, kvm, tcg"),
        ({"Ports": {"ssh": "127.0.0.1:22"}}, "guest port 'ssh' must be a number"),
        ({"Ports": {"22": "localhost:2222"}}, "must be ip:port"),
        ({"Ports": {"22": "127.0.0.1"}}, "must be ip:port"),
        ({"Ports": {"22": "127.0.0.1:99999"}}, "needs a port from 1 to 65535"),
        ({"Ports": {"22": "[::1]:2222"}}, "IPv4 addresses only"),
        ({"Color": "red"}, "unknown parameter 'vm.Color'"),
    ],
)
def test_vm_definition_problems(changes: dict[str, Any], problem: str) -> None:
    assert problem in vm_problem(**changes)


def test_port_forwards() -> None:
    assert parse_forward("22", "127.0.0.1:2222") == ("127.0.0.1", 2222, 22)
    vm = vm_config(Ports={"80": "0.0.0.0:8080", "22": "127.0.0.1:2222"})
    assert vm.forwards() == [("127.0.0.1", 2222, 22), ("0.0.0.0", 8080, 80)]


def test_image_paths_resolve_under_the_images_dir() -> None:
    images = Path("/srv/images")
    assert Image("d.raw", False, "vol").resolve(images) == Path("/srv/images/vol/d.raw")
    assert Image("i.iso", True).resolve(images) == Path("/srv/images/i.iso")
    assert Image("/abs/i.iso", True).resolve(images) == Path("/abs/i.iso")


# -- rendering ---------------------------------------------------------------------------------

FILES = VMFiles.under(Path("/state"), "7")


def test_qemu_argv_is_exact() -> None:
    vm = vm_config(Ports={"22": "127.0.0.1:2222"}, Accel="tcg")
    argv = qemu_argv(vm, FILES, "/usr/bin/qemu-system-x86_64", Path("/images"))
    assert argv == [
        "/usr/bin/qemu-system-x86_64",
        "-name",
        "web-1",
        "-nodefaults",
        "-no-user-config",
        "-machine",
        "accel=tcg",
        "-cpu",
        "max",
        "-smp",
        "2",
        "-m",
        "1024M",
        "-display",
        "none",
        "-chardev",
        "socket,id=qmp,path=/state/vms/7/qmp.sock,server=on,wait=off",
        "-mon",
        "chardev=qmp,mode=control",
        "-chardev",
        "file,id=console,path=/state/vms/7/console.log",
        "-serial",
        "chardev:console",
        "-nic",
        "user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:2222-:22",
        "-drive",
        "file=/images/vol/disk.raw,format=raw,if=virtio,media=disk",
        "-drive",
        "file=/isos/install.iso,format=raw,if=ide,media=cdrom,readonly=on",
    ]


def test_qemu_values_escape_commas() -> None:
    assert qemu_value("/a,b/c") == "/a,,b/c"
    files = VMFiles.under(Path("/st,ate"), "1")
    argv = qemu_argv(vm_config(Images=[]), files, "qemu", Path("/i"))
    assert "socket,id=qmp,path=/st,,ate/vms/1/qmp.sock,server=on,wait=off" in argv


@pytest.mark.parametrize(
    ("arg", "quoted"),
    [
        ("-m", "-m"),
        ("accel=kvm:tcg", "accel=kvm:tcg"),
        ("/a b/c", '"/a b/c"'),
        ('say "hi"', '"say \\"hi\\""'),
        ("back\\slash", '"back\\\\slash"'),
        ("100%", '"100%%"'),
        ("$HOME", '"$$HOME"'),
        ("", '""'),
        (";", '";"'),
    ],
)
def test_systemd_quote(arg: str, quoted: str) -> None:
    assert systemd_quote(arg) == quoted


def test_systemd_quote_refuses_line_breaks() -> None:
    with pytest.raises(ValueError, match="line break"):
        systemd_quote("a\nb")


def test_unit_is_exact() -> None:
    vm = vm_config(Images=[])
    argv = ["/usr/bin/qemu-system-x86_64", "-name", "web-1", "-drive", "file=/a b/c.raw"]
    assert render_unit(vm, FILES, argv, stop_timeout=20) == (
        "[Unit]\n"
        "Description=spin VM 7 (web-1)\n"
        "\n"
        "[Service]\n"
        "Type=simple\n"
        'ExecStart=/usr/bin/qemu-system-x86_64 -name web-1 -drive "file=/a b/c.raw"\n'
        "WorkingDirectory=/state/vms/7\n"
        "StandardOutput=append:/state/vms/7/qemu.log\n"
        "StandardError=inherit\n"
        "KillMode=mixed\n"
        "KillSignal=SIGTERM\n"
        "TimeoutStopSec=20\n"
        "SendSIGKILL=yes\n"
        "Restart=no\n"
        "\n"
        "[Install]\n"
        "WantedBy=default.target\n"
    )


def test_unit_escapes_specifiers_in_paths() -> None:
    files = VMFiles.under(Path("/st%ate"), "1")
    unit = render_unit(vm_config(Images=[]), files, ["/q"])
    assert "WorkingDirectory=/st%%ate/vms/1\n" in unit


def test_log_tail_shows_the_last_run(tmp_path: Path) -> None:
    log = tmp_path / "qemu.log"
    assert log_tail(log) == "(no log)"
    log.write_text("--- 1 starting: q\nold error\n--- 2 starting: q\nnew error\n  line two\n")
    assert log_tail(log) == "new error | line two"
    log.write_text("--- 3 starting: q\n")
    assert log_tail(log) == "(nothing logged)"
    log.write_text("x" * 1000)
    assert log_tail(log, limit=10) == "..." + "x" * 10


# -- QMP against a scripted monitor ------------------------------------------------------------

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any]


@contextlib.asynccontextmanager
async def monitor(path: Path, script: Script) -> AsyncIterator[None]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await script(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_unix_server(handle, str(path))
    try:
        yield
    finally:
        server.close()
        await server.wait_closed()


def send(writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
    writer.write(json.dumps(message).encode() + b"\r\n")


async def qmp_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    send(writer, {"QMP": {"version": {"qemu": {"major": 7}}, "capabilities": []}})
    while line := await reader.readline():
        request = json.loads(line)
        rid, command = request.get("id"), request["execute"]
        if command == "system_powerdown":
            send(writer, {"event": "POWERDOWN", "timestamp": {}})
            send(writer, {"return": {}, "id": rid})
        elif command in ("qmp_capabilities", "query-status"):
            result = {"status": "running"} if command == "query-status" else {}
            send(writer, {"id": "someone-else", "return": {}})
            send(writer, {"return": result, "id": rid})
        else:
            desc = f"The command {command} has not been found"
            send(writer, {"error": {"class": "CommandNotFound", "desc": desc}, "id": rid})


async def test_qmp_session(tmp_path: Path) -> None:
    sock = tmp_path / "m.sock"
    async with monitor(sock, qmp_server):
        async with await QMP.connect(sock) as qmp:
            assert qmp.greeting["version"]["qemu"]["major"] == 7
            assert await qmp.execute("query-status") == {"status": "running"}
            assert await qmp.execute("system_powerdown") == {}
            assert [e["event"] for e in qmp.events] == ["POWERDOWN"]
            with pytest.raises(QMPError, match="frob: CommandNotFound: The command frob"):
                await qmp.execute("frob", {"x": 1})
        assert await run_command(sock, "query-status") == {"status": "running"}


async def test_qmp_refuses_what_is_not_qmp(tmp_path: Path) -> None:
    sock = tmp_path / "m.sock"

    async def not_qmp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b'{"hello": 1}\n')
        await writer.drain()

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 smtp ready\n")
        await writer.drain()

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        return None

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    for script, message in [
        (not_qmp, "not a QMP greeting"),
        (garbage, "not JSON"),
        (hang_up, "closed the connection"),
        (silent, "no answer from the monitor within 0.05s"),
    ]:
        async with monitor(sock, script):
            with pytest.raises(QMPError, match=message):
                await QMP.connect(sock, timeout=0.05)
        sock.unlink(missing_ok=True)


async def test_qmp_without_a_monitor(tmp_path: Path) -> None:
    with pytest.raises(QMPError, match="cannot reach the QMP monitor"):
        await QMP.connect(tmp_path / "none.sock")


# -- the actions, with a supervisor that only records ----------------------------------------


class FakeSupervisor:
    name = "fake"

    def __init__(self) -> None:
        self.running_ids: set[str] = set()
        self.calls: list[tuple[str, str]] = []

    async def install(self, files: VMFiles) -> None:
        self.calls.append(("install", files.vm_id))

    async def uninstall(self, files: VMFiles) -> None:
        self.calls.append(("uninstall", files.vm_id))

    async def start(self, files: VMFiles) -> None:
        self.calls.append(("start", files.vm_id))
        self.running_ids.add(files.vm_id)

    async def stop(self, files: VMFiles) -> bool:
        self.calls.append(("stop", files.vm_id))
        was = files.vm_id in self.running_ids
        self.running_ids.discard(files.vm_id)
        return was

    async def running(self, files: VMFiles) -> bool:
        return files.vm_id in self.running_ids

    async def wait_stopped(self, files: VMFiles, timeout: float) -> bool:
        return files.vm_id not in self.running_ids


@pytest.fixture
def supervisor() -> FakeSupervisor:
    return FakeSupervisor()


@pytest.fixture
def emu(tmp_path: Path, supervisor: FakeSupervisor) -> Emulation:
    images = tmp_path / "images"
    (images / "vol").mkdir(parents=True)
    (images / "vol" / "disk.raw").write_bytes(b"")
    return Emulation(tmp_path / "state", supervisor, images_dir=images, qemu="/usr/bin/qemu")


@pytest.fixture
def agent(emu: Emulation) -> Agent:
    return build_agent(emu)


VM_ON_DISK = {**VM, "Images": [{"Path": "disk.raw", "Volume": "vol"}]}


async def test_write_config_writes_the_definition(agent: Agent, emu: Emulation) -> None:
    outcome = await agent.execute("write_config", {"id": 7, "vm": VM_ON_DISK})
    assert outcome.success, outcome
    files = emu.files("7")
    assert json.loads(files.config.read_text()) == {
        **VM_ON_DISK,
        "Images": [{"Path": "disk.raw", "Cdrom": False, "Volume": "vol"}],
        "Ports": {},
        "Accel": "kvm:tcg",
    }
    argv = json.loads(files.argv.read_text())
    assert argv == qemu_argv(emu.definition("7"), files, "/usr/bin/qemu", emu.images_dir)
    assert files.cmdline.read_text().startswith("/usr/bin/qemu -name web-1 -nodefaults")
    assert files.unit.name == "spin-vm-7.service"
    assert "ExecStart=/usr/bin/qemu -name web-1 " in files.unit.read_text()


async def test_write_config_replaces_a_stopped_vm_and_refuses_a_running_one(
    agent: Agent, emu: Emulation, supervisor: FakeSupervisor
) -> None:
    assert (await agent.execute("write_config", {"id": "a", "vm": VM_ON_DISK})).success
    outcome = await agent.execute("write_config", {"id": "a", "vm": {**VM_ON_DISK, "Cpus": 4}})
    assert outcome.success
    assert emu.definition("a").cpus == 4
    supervisor.running_ids.add("a")
    outcome = await agent.execute("write_config", {"id": "a", "vm": {**VM_ON_DISK, "Cpus": 1}})
    assert outcome.reason == "VM a is running: stop it before changing its definition"
    assert emu.definition("a").cpus == 4


async def test_bad_requests_fail_with_reasons(agent: Agent) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"id": "../x", "vm": VM_ON_DISK}, "id '../x' must be 1 to 64 letters"),
        ({"id": "a"}, "write_config: required parameter 'vm' is missing"),
        ({"id": "a", "vm": {**VM, "Cpus": 0}}, "parameter 'vm.Cpus': 0 is less than"),
        ({"id": "a", "vm": []}, "parameter 'vm': expected map, got list"),
    ]
    for params, reason in cases:
        outcome = await agent.execute("write_config", params)
        assert not outcome.success
        assert outcome.reason is not None
        assert reason in outcome.reason, outcome.reason


async def test_lifecycle_is_idempotent(agent: Agent, supervisor: FakeSupervisor) -> None:
    async def run(action: str, **params: Any) -> str | None:
        outcome = await agent.execute(action, {"id": "v", **params})
        assert outcome.success, outcome
        return outcome.reason

    await run("write_config", vm=VM_ON_DISK)
    assert await run("start") == "VM v (web-1) started"
    assert await run("start") == "VM v is already running"
    assert await run("stop") == "VM v stopped"
    assert await run("stop") == "VM v was not running"
    assert await run("shutdown") == "VM v is not running"
    assert await run("remove_config") == "VM v removed"
    assert supervisor.calls == [
        ("install", "v"),
        ("start", "v"),
        ("stop", "v"),
        ("stop", "v"),
        ("uninstall", "v"),
    ]


async def test_actions_on_an_unknown_vm_fail(agent: Agent) -> None:
    for action in ("start", "stop", "shutdown", "remove_config"):
        outcome = await agent.execute(action, {"id": "ghost"})
        assert outcome.reason == "no VM ghost: write its config first"


async def test_remove_config_refuses_a_running_vm(agent: Agent, emu: Emulation) -> None:
    await agent.execute("write_config", {"id": "v", "vm": VM_ON_DISK})
    await agent.execute("start", {"id": "v"})
    outcome = await agent.execute("remove_config", {"id": "v"})
    assert outcome.reason == "VM v is running: stop it before removing it"
    assert emu.files("v").dir.exists()


async def test_start_needs_the_images(agent: Agent, emu: Emulation) -> None:
    vm = {**VM, "Images": [{"Path": "gone.raw", "Volume": "vol"}]}
    await agent.execute("write_config", {"id": "v", "vm": vm})
    outcome = await agent.execute("start", {"id": "v"})
    assert outcome.reason == f"VM v: missing image {emu.images_dir}/vol/gone.raw"


async def test_shutdown_presses_the_power_button(
    agent: Agent, emu: Emulation, supervisor: FakeSupervisor
) -> None:
    await agent.execute("write_config", {"id": "v", "vm": VM_ON_DISK})
    supervisor.running_ids.add("v")
    async with monitor(emu.files("v").monitor, qmp_server):
        outcome = await agent.execute("shutdown", {"id": "v"})
        assert outcome.reason == "VM v: power button pressed"
        outcome = await agent.execute("shutdown", {"id": "v", "wait": 1})
        assert outcome.reason == "VM v still runs 1s after its power button was pressed"
        assert await emu.query_status("v") == "running"
    outcome = await agent.execute("shutdown", {"id": "v"})
    assert outcome.reason is not None
    assert outcome.reason.startswith("VM v: cannot reach the QMP monitor")


async def test_monitor_path_too_long(tmp_path: Path, supervisor: FakeSupervisor) -> None:
    emu = Emulation(tmp_path / ("x" * 120), supervisor)
    with pytest.raises(ActionError, match="longer than 107 bytes"):
        await emu.write_config("v", vm_config())


def test_schema_names_the_actions(agent: Agent) -> None:
    wire = agent.schema.to_wire()["actions"]
    assert sorted(wire) == ["remove_config", "shutdown", "start", "stop", "write_config"]
    assert sorted(wire["write_config"]["parameters"]) == ["id", "vm"]
    assert wire["shutdown"]["parameters"]["wait"]["default"] == 0.0


# -- systemd, with systemctl recorded ----------------------------------------------------------


async def test_systemd_supervisor_drives_systemctl(tmp_path: Path) -> None:
    calls: list[list[str]] = []
    active: set[str] = set()

    async def systemctl(argv: list[str]) -> tuple[int, str]:
        calls.append(argv)
        verb, unit = argv[2], argv[-1]
        if verb == "start":
            active.add(unit)
        elif verb == "stop":
            active.discard(unit)
        elif verb == "is-active":
            return (0, "active") if unit in active else (3, "inactive")
        return 0, ""

    systemd = SystemdSupervisor(unit_dir=tmp_path / "units", ready_timeout=0.05, run=systemctl)
    emu = Emulation(tmp_path / "state", systemd, qemu="/usr/bin/qemu")
    await emu.write_config("9", vm_config(Images=[]))
    installed = tmp_path / "units" / "spin-vm-9.service"
    assert installed.read_text() == emu.files("9").unit.read_text()
    with pytest.raises(ActionError, match=r"within 0.05s \(unit stopped after it did not"):
        await emu.start("9")
    assert not active
    assert await emu.stop("9") == "VM 9 was not running"
    await emu.remove_config("9")
    assert not installed.exists()
    verbs = [argv[2:] for argv in calls]
    assert verbs == [
        ["daemon-reload"],
        ["is-active", "--quiet", "spin-vm-9.service"],
        ["start", "spin-vm-9.service"],
        ["is-active", "spin-vm-9.service"],
        ["stop", "spin-vm-9.service"],
        ["is-active", "--quiet", "spin-vm-9.service"],
        ["stop", "spin-vm-9.service"],
        ["is-active", "--quiet", "spin-vm-9.service"],
        ["daemon-reload"],
    ]
    assert all(argv[:2] == ["systemctl", "--user"] for argv in calls)


async def test_systemd_failures_are_reported(tmp_path: Path) -> None:
    async def broken(argv: list[str]) -> tuple[int, str]:
        return 1, "Failed to connect to bus: No medium found"

    systemd = SystemdSupervisor(unit_dir=tmp_path / "units", run=broken)
    emu = Emulation(tmp_path / "state", systemd)
    with pytest.raises(ActionError, match="daemon-reload failed: Failed to connect to bus"):
        await emu.write_config("1", vm_config(Images=[]))


def test_main_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        emulation.main(["--help"])
    out = capsys.readouterr().out
    for flag in ("--state-dir", "--supervisor", "--images-dir", "--broker"):
        assert flag in out
