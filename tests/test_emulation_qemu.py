"""sa-emulation with the real emulator: a blank VM under the built-in supervisor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from agents.emulation import Emulation, ProcessSupervisor, build_agent
from agents.emulation.qmp import QMP

QEMU = shutil.which("qemu-system-x86_64")

pytestmark = pytest.mark.skipif(
    QEMU is None,
    reason="qemu-system-x86_64 is not installed (Debian: apt-get install qemu-system-x86)",
)


async def test_a_real_vm_starts_answers_qmp_shuts_down_and_stops(tmp_path: Path) -> None:
    images = tmp_path / "images"
    (images / "vol").mkdir(parents=True)
    with open(images / "vol" / "blank.raw", "wb") as f:
        f.truncate(64 << 20)  # no OS: the guest sits in the firmware, which is all we need
    supervisor = ProcessSupervisor(grace=5.0, ready_timeout=15.0)
    emu = Emulation(tmp_path / "state", supervisor, images_dir=images)
    agent = build_agent(emu)
    vm = {
        "Name": "blank",
        "Cpus": 1,
        "Memory": 64,
        "Accel": "tcg",
        "Images": [{"Path": "blank.raw", "Volume": "vol"}],
    }

    async def run(action: str, **params: object) -> str | None:
        outcome = await agent.execute(action, {"id": "t1", **params})
        assert outcome.success, outcome.reason
        return outcome.reason

    await run("write_config", vm=vm)
    files = emu.files("t1")
    argv = json.loads(files.argv.read_text())
    assert argv[0] == QEMU
    try:
        assert await run("start") == "VM t1 (blank) started"
        pid = supervisor.pid(files)
        assert pid is not None
        # the process runs exactly the command line that was written
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]
        assert cmdline == argv

        async with await QMP.connect(files.monitor) as qmp:
            assert qmp.greeting["version"]["qemu"]["major"] >= 2
            assert (await qmp.execute("query-status"))["status"] == "running"
            blocks = await qmp.execute("query-block")
            assert any(
                b.get("inserted", {}).get("file") == str(images / "vol" / "blank.raw")
                for b in blocks
            )

        # ACPI power button: acknowledged, but a guest without an OS does not act on it
        assert await run("shutdown") == "VM t1: power button pressed"
        outcome = await agent.execute("shutdown", {"id": "t1", "wait": 0.2})
        assert outcome.reason == "VM t1 still runs 0.2s after its power button was pressed"
        assert await emu.query_status("t1") == "running"

        assert await run("stop") == "VM t1 stopped"
        assert supervisor.pid(files) is None
        assert not files.pidfile.exists()
        assert "terminating on signal 15" in files.log.read_text()
    finally:
        await supervisor.stop(files)
    assert await run("remove_config") == "VM t1 removed"
    assert not files.dir.exists()
