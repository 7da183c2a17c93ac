"""The built-in process supervisor, driving a stand-in qemu that speaks enough QMP."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from agents.emulation import Emulation, ProcessSupervisor, build_agent
from agents.emulation.config import VM_PARAM, VMConfig
from spinbroker.agent import ActionError

FAKE_QEMU = """\
import json, os, signal, socket, sys

mode = os.environ.get("FAKE_QEMU", "ok")
path = None
for flag, value in zip(sys.argv, sys.argv[1:]):
    if flag == "-chardev" and value.startswith("socket,"):
        for option in value.replace(",,", "\\0").split(","):
            if option.startswith("path="):
                path = option[5:].replace("\\0", ",")
print("fake qemu, mode", mode, flush=True)
if mode == "exit":
    print("qemu-system-x86_64: Could not open '/x': No such file or directory", flush=True)
    sys.exit(1)
if mode == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if mode == "silent":
    while True:
        signal.pause()
server = socket.socket(socket.AF_UNIX)
server.bind(path)
server.listen(1)


def send(stream, message):
    stream.write(json.dumps(message).encode() + b"\\r\\n")
    stream.flush()


while True:
    conn, _ = server.accept()
    stream = conn.makefile("rwb")
    send(stream, {"QMP": {"version": {}, "capabilities": []}})
    for line in stream:
        request = json.loads(line)
        command = request["execute"]
        if command == "system_powerdown":
            send(stream, {"event": "POWERDOWN"})
        result = {"status": "running"} if command == "query-status" else {}
        send(stream, {"return": result, "id": request.get("id")})
        if command == "system_powerdown" and mode == "ok":
            print("guest powered off", flush=True)
            sys.exit(0)
    conn.close()
"""


@pytest.fixture
def fake_qemu(tmp_path: Path) -> str:
    script = tmp_path / "fake-qemu"
    script.write_text(f"#!{sys.executable}\n{FAKE_QEMU}")
    script.chmod(0o755)
    return str(script)


@pytest.fixture
def supervisor() -> ProcessSupervisor:
    return ProcessSupervisor(grace=5.0, kill_wait=5.0, ready_timeout=10.0)


@pytest.fixture
async def emu(tmp_path: Path, fake_qemu: str, supervisor: ProcessSupervisor) -> Emulation:
    emu = Emulation(tmp_path / "state", supervisor, qemu=fake_qemu, images_dir=tmp_path)
    vm: VMConfig = VM_PARAM.check({"Name": "fake", "Cpus": 1, "Memory": 64}, "vm")
    await emu.write_config("v", vm)
    return emu


async def test_start_and_stop(emu: Emulation, supervisor: ProcessSupervisor) -> None:
    files = emu.files("v")
    assert await emu.start("v") == "VM v (fake) started"
    pid = supervisor.pid(files)
    assert pid is not None
    assert files.pidfile.read_text() == f"{pid}\n"
    assert await emu.query_status("v") == "running"
    assert await emu.start("v") == "VM v is already running"
    with pytest.raises(ActionError, match="already running"):
        await supervisor.start(files)
    assert await emu.stop("v") == "VM v stopped"
    assert supervisor.pid(files) is None
    assert not files.pidfile.exists()
    assert not files.monitor.exists()
    log = files.log.read_text()
    assert log.startswith("--- ")
    assert "fake qemu, mode ok" in log


async def test_an_agent_restart_finds_and_stops_its_vm(
    emu: Emulation, supervisor: ProcessSupervisor
) -> None:
    await emu.start("v")
    files = emu.files("v")
    pid = supervisor.pid(files)
    later = ProcessSupervisor(grace=5.0)  # a new agent process knows no children
    assert await later.running(files)
    assert later.pid(files) == pid
    assert await later.stop(files)
    assert await supervisor.wait_stopped(files, 5.0)
    assert not await later.running(files)


async def test_shutdown_waits_for_the_guest_to_power_off(emu: Emulation) -> None:
    await emu.start("v")
    assert await emu.shutdown("v", wait=5.0) == "VM v shut down"
    assert await emu.stop("v") == "VM v was not running"
    assert "guest powered off" in emu.files("v").log.read_text()


async def test_a_qemu_that_exits_fails_the_start_with_its_log(
    emu: Emulation, supervisor: ProcessSupervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_QEMU", "exit")
    with pytest.raises(ActionError) as info:
        await emu.start("v")
    assert str(info.value) == (
        "qemu exited with status 1: fake qemu, mode exit | "
        "qemu-system-x86_64: Could not open '/x': No such file or directory"
    )
    assert not emu.files("v").pidfile.exists()
    assert not await supervisor.running(emu.files("v"))


async def test_a_qemu_that_ignores_sigterm_is_killed_after_the_grace(
    emu: Emulation, supervisor: ProcessSupervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_QEMU", "stubborn")
    supervisor.grace = 0.3
    await emu.start("v")
    started = time.monotonic()
    assert await emu.stop("v") == "VM v stopped"
    assert time.monotonic() - started >= 0.3
    assert not await supervisor.running(emu.files("v"))


async def test_a_qemu_whose_monitor_never_answers_is_stopped(
    emu: Emulation, supervisor: ProcessSupervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_QEMU", "silent")
    supervisor.ready_timeout = 0.3
    with pytest.raises(ActionError, match=r"did not answer on its monitor within 0.3s"):
        await emu.start("v")
    assert not await supervisor.running(emu.files("v"))


async def test_a_stale_pid_file_never_signals_a_stranger(
    emu: Emulation, supervisor: ProcessSupervisor
) -> None:
    files = emu.files("v")
    files.pidfile.write_text(f"{os.getpid()}\n")  # alive, but not this VM's qemu
    assert not await supervisor.running(files)
    assert await emu.stop("v") == "VM v was not running"
    assert not files.pidfile.exists()
    files.pidfile.write_text("not a pid\n")
    assert not await supervisor.running(files)


async def test_a_missing_qemu_fails_the_start(tmp_path: Path) -> None:
    emu = Emulation(tmp_path / "state", ProcessSupervisor(), qemu=str(tmp_path / "no-qemu"))
    agent = build_agent(emu)
    vm = {"Name": "x", "Cpus": 1, "Memory": 64}
    assert (await agent.execute("write_config", {"id": "v", "vm": vm})).success
    outcome = await agent.execute("start", {"id": "v"})
    assert outcome.reason == f"cannot run {tmp_path}/no-qemu: No such file or directory"
