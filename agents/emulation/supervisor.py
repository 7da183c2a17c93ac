"""Who keeps a VM's qemu running: systemd --user where there is one, else this process.

Both supervisors run the same thing, the argv that write_config rendered, and answer the
same questions (`Supervisor`). `SystemdSupervisor` installs the rendered unit into the
user's unit dir and drives ``systemctl --user``. `ProcessSupervisor` spawns qemu itself in
its own session, with its output appended to the VM's log file and its pid in the VM's pid
file; it stops it with SIGTERM, then SIGKILL after a grace period. It finds a qemu started
by an earlier agent process through the pid file, and checks the pid still is that qemu
(its command line names the VM's monitor socket) before it signals anything.

A start is done when the monitor answers its QMP greeting; a qemu that exits first fails
the start with the end of its log. The exit of a process is awaited through a pidfd (an
event, no polling); only the monitor, which gives no event when it starts listening, is
probed, with growing pauses and a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Protocol

from agents.emulation.qemu import VMFiles, command_line
from agents.emulation.qmp import QMP, QMPError
from spinbroker.agent import ActionError

#: Pauses between probes of a monitor that is not listening yet: first, growth, longest.
PROBE_FIRST, PROBE_GROWTH, PROBE_LONGEST = 0.005, 2.0, 0.1
LOG_TAIL = 600


class Supervisor(Protocol):
    name: str

    async def install(self, files: VMFiles) -> None:
        """Makes the VM's (just written) definition known."""

    async def uninstall(self, files: VMFiles) -> None:
        """Forgets the VM's definition; the VM is not running."""

    async def start(self, files: VMFiles) -> None:
        """Starts qemu and returns once its monitor answers; `ActionError` if it fails."""

    async def stop(self, files: VMFiles) -> bool:
        """Stops qemu (SIGTERM, then SIGKILL after the grace); False if it was not running."""

    async def running(self, files: VMFiles) -> bool: ...

    async def wait_stopped(self, files: VMFiles, timeout: float) -> bool:
        """True once qemu is gone; False if it still runs after `timeout` seconds."""


# -- shared --------------------------------------------------------------------------------


async def probe_monitor(monitor: Path, timeout: float) -> bool:
    """True once the QMP monitor greets us; False if it does not within `timeout`."""
    deadline = time.monotonic() + timeout
    pause = PROBE_FIRST
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        try:
            qmp = await QMP.connect(monitor, timeout=min(left, 2.0))
        except QMPError:
            await asyncio.sleep(min(pause, max(deadline - time.monotonic(), 0)))
            pause = min(pause * PROBE_GROWTH, PROBE_LONGEST)
            continue
        await qmp.close()
        return True


def log_tail(log: Path, limit: int = LOG_TAIL) -> str:
    """The end of the last run's part of a VM log (after its last ``---`` line), on one line."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    starts = [i for i, line in enumerate(lines) if line.startswith("--- ")]
    if starts:
        lines = lines[starts[-1] + 1 :]
    tail = " | ".join(line.strip() for line in lines if line.strip()) or "(nothing logged)"
    return tail if len(tail) <= limit else "..." + tail[-limit:]


def write_atomic(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)


# -- the built-in process supervisor -------------------------------------------------------


class ProcessSupervisor:
    """Runs qemu as a child of this process (own session, pid file, log file)."""

    name = "process"

    def __init__(
        self, grace: float = 10.0, kill_wait: float = 5.0, ready_timeout: float = 15.0
    ) -> None:
        self.grace = grace
        self.kill_wait = kill_wait
        self.ready_timeout = ready_timeout
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    async def install(self, files: VMFiles) -> None:
        return None  # it runs files.argv as it is at start

    async def uninstall(self, files: VMFiles) -> None:
        files.pidfile.unlink(missing_ok=True)

    async def running(self, files: VMFiles) -> bool:
        return self.pid(files) is not None

    def pid(self, files: VMFiles) -> int | None:
        """The pid of the VM's qemu if it is running, else None."""
        try:
            pid = int(files.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if self._is_vm_process(pid, files) else None

    async def start(self, files: VMFiles) -> None:
        if self.pid(files) is not None:
            raise ActionError(f"VM {files.vm_id} is already running")
        argv = json.loads(files.argv.read_text())
        files.monitor.unlink(missing_ok=True)
        with open(files.log, "ab") as log:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(f"--- {stamp} starting: {command_line(argv)}\n".encode())
            log.flush()
            try:
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=files.dir,
                    start_new_session=True,
                )
            except OSError as exc:
                raise ActionError(f"cannot run {argv[0]}: {exc.strerror or exc}") from None
        self._children[proc.pid] = proc
        write_atomic(files.pidfile, f"{proc.pid}\n")
        exited = asyncio.ensure_future(_wait_exit(proc.pid, self.ready_timeout))
        probe = asyncio.ensure_future(probe_monitor(files.monitor, self.ready_timeout))
        try:
            await asyncio.wait({exited, probe}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (exited, probe):
                task.cancel()
        if probe.done() and not probe.cancelled() and probe.result():
            return
        status = proc.poll()
        if status is None:
            await self.stop(files)
            raise ActionError(
                f"qemu did not answer on its monitor within {self.ready_timeout:g}s "
                f"and was stopped: {log_tail(files.log)}"
            )
        self._forget(proc.pid, files)
        raise ActionError(f"qemu exited with status {status}: {log_tail(files.log)}")

    async def stop(self, files: VMFiles) -> bool:
        pid = self.pid(files)
        if pid is None:
            files.pidfile.unlink(missing_ok=True)
            return False
        with _pidfd(pid) as fd:
            if fd is not None and not self._is_vm_process(pid, files):
                return False  # it exited, and the pid may already be someone else's
            _send(pid, fd, signal.SIGTERM)
            if not await _wait_exit(pid, self.grace, fd):
                _send(pid, fd, signal.SIGKILL)
                if not await _wait_exit(pid, self.kill_wait, fd):
                    raise ActionError(f"qemu (pid {pid}) did not exit after SIGKILL")
        self._forget(pid, files)
        return True

    async def wait_stopped(self, files: VMFiles, timeout: float) -> bool:
        pid = self.pid(files)
        if pid is None:
            return True
        if not await _wait_exit(pid, timeout):
            return False
        self._forget(pid, files)
        return True

    def _forget(self, pid: int, files: VMFiles) -> None:
        child = self._children.pop(pid, None)
        if child is not None:
            child.wait()  # it has exited: this only reaps it
        files.pidfile.unlink(missing_ok=True)
        files.monitor.unlink(missing_ok=True)

    def _is_vm_process(self, pid: int, files: VMFiles) -> bool:
        child = self._children.get(pid)
        if child is not None:
            return child.poll() is None
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
        if stat.rpartition(")")[2].split()[:1] == ["Z"]:
            return False
        return f"path={files.monitor}".encode() in cmdline.replace(b",,", b",")


@contextlib.contextmanager
def _pidfd(pid: int) -> Iterator[int | None]:
    """A pidfd for `pid`, None where the kernel has none; ProcessLookupError passes as None."""
    try:
        fd = os.pidfd_open(pid)
    except (OSError, AttributeError):
        yield None
        return
    try:
        yield fd
    finally:
        os.close(fd)


def _send(pid: int, fd: int | None, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        if fd is not None:
            signal.pidfd_send_signal(fd, sig)
        else:
            os.kill(pid, sig)


async def _wait_exit(pid: int, timeout: float, fd: int | None = None) -> bool:
    """True once `pid` has exited (zombies count), False after `timeout` seconds."""
    if fd is None:
        with _pidfd(pid) as own:
            if own is None:
                return await _poll_exit(pid, timeout)
            return await _wait_exit(pid, timeout, own)
    loop = asyncio.get_running_loop()
    gone: asyncio.Future[None] = loop.create_future()
    loop.add_reader(fd, _settle, gone)
    try:
        async with asyncio.timeout(timeout):
            await gone
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def _poll_exit(pid: int, timeout: float) -> bool:
    """For kernels without pidfds (and a pid already gone): bounded polling of /proc."""
    deadline = time.monotonic() + timeout
    pause = PROBE_FIRST
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[:1]
        except OSError:
            return True
        if state == ["Z"]:
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(pause)
        pause = min(pause * PROBE_GROWTH, PROBE_LONGEST)


# -- systemd --user ------------------------------------------------------------------------

Runner = Callable[[list[str]], Awaitable[tuple[int, str]]]


async def run_program(argv: list[str]) -> tuple[int, str]:
    """Runs a program; its exit status and its output (stdout and stderr together)."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode(errors="replace").strip()


def user_unit_dir() -> Path:
    config = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
    return Path(config) / "systemd" / "user"


def systemd_user_available() -> bool:
    """True if ``systemctl --user`` reaches a running user manager."""
    systemctl = shutil.which("systemctl")
    if systemctl is None:
        return False
    try:
        done = subprocess.run(
            [systemctl, "--user", "show-environment"],
            capture_output=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


class SystemdSupervisor:
    """Runs the VM's unit under the user's systemd; systemd kills it on stop."""

    name = "systemd"

    def __init__(
        self,
        unit_dir: Path | None = None,
        ready_timeout: float = 15.0,
        run: Runner = run_program,
    ) -> None:
        self.unit_dir = unit_dir or user_unit_dir()
        self.ready_timeout = ready_timeout
        self._run = run

    async def _systemctl(self, *args: str) -> tuple[int, str]:
        return await self._run(["systemctl", "--user", *args])

    async def _must(self, *args: str) -> None:
        status, out = await self._systemctl(*args)
        if status != 0:
            raise ActionError(f"systemctl --user {' '.join(args)} failed: {out or status}")

    async def install(self, files: VMFiles) -> None:
        self.unit_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self.unit_dir / files.unit_name, files.unit.read_text())
        await self._must("daemon-reload")

    async def uninstall(self, files: VMFiles) -> None:
        (self.unit_dir / files.unit_name).unlink(missing_ok=True)
        await self._must("daemon-reload")

    async def running(self, files: VMFiles) -> bool:
        status, _ = await self._systemctl("is-active", "--quiet", files.unit_name)
        return status == 0

    async def start(self, files: VMFiles) -> None:
        files.monitor.unlink(missing_ok=True)
        await self._must("start", files.unit_name)
        if await probe_monitor(files.monitor, self.ready_timeout):
            return
        _, state = await self._systemctl("is-active", files.unit_name)
        if state == "active":
            await self._must("stop", files.unit_name)
            state = "stopped after it did not answer"
        raise ActionError(
            f"qemu did not answer on its monitor within {self.ready_timeout:g}s "
            f"(unit {state}): {log_tail(files.log)}"
        )

    async def stop(self, files: VMFiles) -> bool:
        was_running = await self.running(files)
        await self._must("stop", files.unit_name)
        files.monitor.unlink(missing_ok=True)
        return was_running

    async def wait_stopped(self, files: VMFiles, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        pause = PROBE_FIRST
        while await self.running(files):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            await asyncio.sleep(min(pause, left))
            pause = min(pause * PROBE_GROWTH, PROBE_LONGEST * 5)
        return True


def choose_supervisor(kind: str, grace: float = 10.0) -> Supervisor:
    """``systemd``, ``process``, or ``auto`` (systemd when a user manager answers)."""
    if kind == "auto":
        kind = "systemd" if systemd_user_available() else "process"
    if kind == "systemd":
        return SystemdSupervisor()
    if kind == "process":
        return ProcessSupervisor(grace=grace)
    raise ValueError(f"unknown supervisor {kind!r}: auto, systemd or process")
