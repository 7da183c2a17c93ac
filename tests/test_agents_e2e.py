"""The agents end to end: a broker, sa-host-path and sa-emulation as separate processes,
driven with the `spinbroker message` CLI as subprocesses, as a person or a script would.

What only real processes show: the files and the qemu a package leaves behind (or not), a
command redelivered to a fresh agent after its first agent was SIGKILLed in the middle of
it, the broker refusing at ADD what the real agent's announced schema does not allow, and
the README's example agent doing what the README says. Nothing here sleeps to synchronise:
each wait is on a log line, a process exit or a WAIT reply, with a deadline.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
QEMU = shutil.which("qemu-system-x86_64")
SPINBROKER = (sys.executable, "-m", "spinbroker")
GIB = 1 << 30
#: Deadlines: a process saying it is ready, one CLI call, one package.
READY = 20.0
CLI = 15.0
PACKAGE = 30.0

pytestmark = pytest.mark.timeout(60)


class Proc:
    """A process whose output (stdout and stderr) is read line by line by a thread, so
    that a test can wait, with a deadline, for the line that says what it waits for."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        env: dict[str, str],
        stdin: int | None = subprocess.DEVNULL,
    ) -> None:
        self.name = name
        self.lines: list[str] = []
        self._ended = False
        self._changed = threading.Condition()
        self.proc = subprocess.Popen(
            argv,
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            text=True,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    def wait_for(self, pattern: str, timeout: float = READY) -> re.Match[str]:
        wanted = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            seen = 0
            while True:
                for line in self.lines[seen:]:
                    if found := wanted.search(line):
                        return found
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if self._ended or left <= 0:
                    why = "ended" if self._ended else f"said nothing of it in {timeout:g}s"
                    log = "\n".join(self.lines[-20:])
                    pytest.fail(f"{self.name} {why} before /{pattern}/; its output:\n{log}")
                self._changed.wait(left)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, SIGKILL if it is still there after `timeout`; its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self._reader.join(timeout)
        return self.proc.returncode


@dataclass
class Cluster:
    """A broker and the two agents, each its own process, in one directory."""

    root: Path
    env: dict[str, str]
    images: Path
    state: Path
    procs: list[Proc]

    def start(self, name: str, argv: Sequence[str], ready: str, **kw: int | None) -> Proc:
        proc = Proc(name, argv, self.env, **kw)
        self.procs.append(proc)
        proc.wait_for(ready)
        return proc

    def cli(self, *args: str, status: int = 0) -> subprocess.CompletedProcess[str]:
        """Runs ``spinbroker ARGS`` and checks its exit status."""
        done = subprocess.run(
            [*SPINBROKER, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=CLI + PACKAGE,
            check=False,
        )
        assert done.returncode == status, (args, done.returncode, done.stdout, done.stderr)
        return done

    def out(self, *args: str) -> str:
        return self.cli(*args).stdout.strip()

    def add(self, package: str, resource: str, action: str, *params: str) -> str:
        return self.out("message", "add", package, resource, action, *params)

    def wait(self, package: str) -> dict[str, Any]:
        """WAIT (with a deadline) until the package is finished; then its status with its
        commands, in the state WAIT said."""
        waited = json.loads(
            self.out("message", "wait", package, "--timeout", f"{PACKAGE:g}", "--json")
        )
        assert waited["finished"], waited
        status: dict[str, Any] = json.loads(
            self.out("message", "status", package, "--commands", "--json")
        )
        assert status["state"] == waited["state"], (waited, status)
        return status

    def run_package(self, package: str) -> dict[str, Any]:
        self.cli("message", "enqueue", package)
        return self.wait(package)

    def command(self, command: str) -> dict[str, Any]:
        status: dict[str, Any] = json.loads(self.out("message", "status", command, "--json"))
        return status

    def pid(self, name: str) -> int:
        return next(p.proc.pid for p in self.procs if p.name == name)


def _python_script(source: str, path: Path) -> list[str]:
    path.write_text(source)
    return [sys.executable, str(path)]


def _console(script: str, module: str) -> list[str]:
    installed = Path(sys.executable).parent / script
    if installed.is_file():
        return [str(installed)]
    return [sys.executable, "-c", f"import sys; from {module} import main; sys.exit(main())"]


def _qemu_processes(under: Path) -> list[int]:
    """Pids of live processes whose command line names a path under `under`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rpartition(")")[2].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z" and b"qemu" in cmdline and str(under).encode() in cmdline:
            found.append(int(entry.name))
    return found


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    # A short root: a VM's monitor socket path must fit in 107 bytes.
    root = tmp_path_factory.mktemp("e2e")
    env = {**os.environ, "SPINBROKER_ADDR": f"unix:{root / 'broker' / 'spinbroker.sock'}"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    c = Cluster(root, env, root / "images", root / "emulation", [])
    try:
        c.start(
            "broker",
            [*SPINBROKER, "serve", "--data-dir", str(root / "broker"), "--no-tcp"],
            r"\bready\b",
        )
        c.start(
            "sa-host-path",
            [*_console("sa-host-path", "agents.host_path"), "--base-dir", str(c.images)],
            r"connected; serving storage",
        )
        emulation = ["--state-dir", str(c.state), "--images-dir", str(c.images)]
        emulation += ["--supervisor", "process", "--stop-timeout", "5"]
        c.start(
            "sa-emulation",
            [*_console("sa-emulation", "agents.emulation"), *emulation],
            r"connected; serving emulation",
        )
        yield c
    finally:
        for proc in reversed(c.procs):
            proc.stop()
        for pid in _qemu_processes(root):  # a failed test may leave its VM running
            os.kill(pid, signal.SIGKILL)


# -- a VM's whole life in one package --------------------------------------------------------


@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")
def test_a_package_makes_a_volume_an_image_and_a_vm_that_runs_and_stops(cluster: Cluster) -> None:
    c = cluster
    vm = {
        "Name": "e2e",
        "Cpus": 1,
        "Memory": 64,
        "Images": [{"Path": "disk.raw", "Cdrom": False, "Volume": "vol1"}],
        "Accel": "tcg",  # KVM, where there is one, may not take -cpu max (nested hosts)
    }
    pkg = c.out("message", "new")
    vol = c.add(pkg, "storage", "add_volume", "path=vol1")
    img = c.add(
        pkg, "storage", "create_image", "volume_path=vol1", "image_name=disk.raw",
        "image_size=2", "--dep", vol,
    )  # fmt: skip
    cfg = c.add(pkg, "emulation", "write_config", "id=e2e", f"vm={json.dumps(vm)}", "--dep", img)
    run = c.add(pkg, "emulation", "start", "id=e2e", "--dep", cfg)
    down = c.add(pkg, "emulation", "shutdown", "id=e2e", "--dep", run)
    stop = c.add(pkg, "emulation", "stop", "id=e2e", "--dep", down)

    status = c.run_package(pkg)

    assert status["state"] == "succeeded", status
    notes = {s["id"]: s["reason"] for s in status["commands"]}
    assert notes[run] == "VM e2e (e2e) started"
    assert notes[down] == "VM e2e: power button pressed"  # QMP reached the running qemu
    assert notes[stop] == "VM e2e stopped"

    image = c.images / "vol1" / "disk.raw"
    assert image.stat().st_size == 2 * GIB
    assert image.stat().st_blocks * 512 <= 1 << 20, "the image is not sparse"

    vm_dir = c.state / "vms" / "e2e"
    argv = json.loads((vm_dir / "qemu.argv").read_text())
    assert argv[0] == QEMU
    assert argv[argv.index("-m") : argv.index("-m") + 2] == ["-m", "64M"]
    assert f"file={image},format=raw,if=virtio,media=disk" in argv
    unit = (vm_dir / "spin-vm-e2e.service").read_text()
    assert f"ExecStart={QEMU} " in unit and "accel=tcg" in unit
    assert json.loads((vm_dir / "vm.json").read_text())["Images"][0]["Path"] == "disk.raw"

    # The qemu really ran (the start line is the agent's, the last line qemu's own, written
    # as the SIGTERM of stop reached it) and is gone now.
    log = (vm_dir / "qemu.log").read_text().splitlines()
    assert log[0].startswith("--- ") and f"starting: {QEMU} " in log[0]
    assert f"terminating on signal 15 from pid {c.pid('sa-emulation')} " in log[-1], log
    assert not (vm_dir / "qemu.pid").exists()
    assert _qemu_processes(c.state) == []


# -- a command survives the agent that was running it ----------------------------------------

GATE_AGENT = textwrap.dedent(
    """\
    import sys

    from spinbroker.agent import Agent, CommandContext, agent_main


    def build(args):
        agent = Agent("gate")

        @agent.action()
        def hold(name: str, ctx: CommandContext) -> str:
            print(f"holding {name} at delivery {ctx.delivery}", file=sys.stderr, flush=True)
            word = sys.stdin.readline().strip()  # the test decides when it is done
            return f"{name} released by {word!r} at delivery {ctx.delivery}"

        return agent


    sys.exit(agent_main("holds each command until a line comes on stdin", build))
    """
)


def test_a_command_whose_agent_is_killed_runs_again_on_a_fresh_agent(
    cluster: Cluster, tmp_path: Path
) -> None:
    c = cluster
    # --ttr 0: the lease belongs to the connection, so the kill hands the command back at once.
    gate = [*_python_script(GATE_AGENT, tmp_path / "gate_agent.py"), "--ttr", "0"]
    first = c.start("gate-1", gate, r"connected; serving gate", stdin=subprocess.PIPE)

    pkg = c.out("message", "new")
    vol = c.add(pkg, "storage", "add_volume", "path=redelivered")
    hold = c.add(pkg, "gate", "hold", "name=vm-disk", "--dep", vol)
    img = c.add(
        pkg, "storage", "create_image", "volume_path=redelivered", "image_name=after.raw",
        "image_size=1", "--dep", hold,
    )  # fmt: skip
    c.cli("message", "enqueue", pkg)

    first.wait_for(r"holding vm-disk at delivery 1$")
    assert c.command(hold)["state"] == "leased"
    first.proc.send_signal(signal.SIGKILL)
    assert first.proc.wait(CLI) == -signal.SIGKILL
    assert c.command(img)["state"] == "waiting"  # nothing after it ran

    second = c.start("gate-2", gate, r"connected; serving gate", stdin=subprocess.PIPE)
    second.wait_for(r"holding vm-disk at delivery 2$")
    assert second.proc.stdin is not None
    second.proc.stdin.write("go\n")
    second.proc.stdin.flush()

    assert c.wait(pkg)["state"] == "succeeded"
    held = c.command(hold)
    assert held["delivery"] == 2
    assert held["reason"] == "vm-disk released by 'go' at delivery 2"
    assert (c.images / "redelivered" / "after.raw").stat().st_size == GIB
    assert second.stop() == 0


# -- the broker refuses at ADD what the real agents' schemas do not allow ---------------------


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (
            ["storage", "create_image", "volume_path=v", "image_name=i.raw"],
            "storage create_image: required parameter 'image_size' is missing",
        ),
        (
            ["storage", "create_image", "volume_path=v", "image_name=i.raw", "image_size=0"],
            "storage create_image: parameter 'image_size': 0 is less than the minimum 1",
        ),
        (
            ["storage", "create_image", "volume_path=v", "image_name=i", "image_size=big"],
            "storage create_image: parameter 'image_size': expected int, got str 'big'",
        ),
        (
            ["emulation", "write_config", "id=x", 'vm={"Name": "x", "Cpus": 1}'],
            "emulation write_config: required parameter 'vm.Memory' is missing",
        ),
        (
            ["storage", "format_disk", "path=v"],
            "storage format_disk: unknown action 'format_disk' (known: add_volume, copy_image, "
            "create_image, delete_image, remove_volume)",
        ),
    ],
    ids=["missing", "below-minimum", "not-an-int", "nested-field-missing", "unknown-action"],
)
def test_the_broker_refuses_at_add_what_the_announced_schema_does_not_allow(
    cluster: Cluster, command: list[str], message: str
) -> None:
    pkg = cluster.out("message", "new")
    refused = cluster.cli("message", "add", pkg, *command, status=1)
    assert refused.stdout == ""
    assert refused.stderr.startswith(f"spinbroker: invalid_command: {message}"), refused.stderr
    # Nothing was added: the package is still open and empty.
    empty = cluster.cli("message", "enqueue", pkg, status=1)
    assert empty.stderr.startswith("spinbroker: empty_package"), empty.stderr


# -- the README's example agent --------------------------------------------------------------


def _readme_agent() -> str:
    """The Python block of README.md's "## Agents" section that runs `agent_main`."""
    readme = (ROOT / "README.md").read_text()
    section = readme.partition("\n## Agents\n")[2].partition("\n## ")[0]
    for block in re.findall(r"```python\n(.*?)```", section, re.S):
        if "agent_main(" in block:
            return str(block)
    pytest.fail("README.md has no example agent (a python block with agent_main) under ## Agents")


def test_the_readme_example_agent_works(cluster: Cluster, tmp_path: Path) -> None:
    c = cluster
    agent = c.start(
        "sa-greeter",
        _python_script(_readme_agent(), tmp_path / "sa_greeter.py"),
        r"connected; serving greeter",
    )
    pkg = c.out("message", "new")
    hello = c.add(pkg, "greeter", "greet", "name=Ada", "times=2")
    refused = c.cli("message", "add", pkg, "greeter", "greet", "name=Ada", "times=11", status=1)
    assert refused.stderr == (
        "spinbroker: invalid_command: greeter greet: parameter 'times': "
        "11 is more than the maximum 10\n"
    )
    nobody = c.add(pkg, "greeter", "greet", "name=nobody")

    status = c.run_package(pkg)

    assert status["state"] == "failed"
    assert c.command(hello)["reason"] == "hello Ada, hello Ada"
    failed = c.command(nobody)
    assert (failed["state"], failed["reason"]) == ("failed", "nobody there")
    assert agent.stop() == 0


# -- tools/walkthrough.py --------------------------------------------------------------------


@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")
def test_the_walkthrough_runs_and_leaves_nothing_behind(tmp_path: Path) -> None:
    workdir = tmp_path / "walk"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    walkthrough = [sys.executable, str(ROOT / "tools" / "walkthrough.py")]
    done = subprocess.run(
        [*walkthrough, "--workdir", str(workdir), "--grace", "0.2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=45,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "QMP query-status: running" in out
    assert "reason: VM 1: power button pressed" in out
    assert "still running after 0.2s" in out
    assert "reason: VM 1 stopped" in out
    assert re.search(r"qemu pid \d+ is gone; qemu.log ends: .*terminating on signal 15", out)
    for name in ("sa-emulation", "sa-host-path", "broker"):
        assert re.search(rf"^   {name} \(pid \d+\): stopped \(SIGTERM\), status 0$", out, re.M)
    assert not workdir.exists()
    assert _qemu_processes(workdir) == []
