"""The original spin example, run for real: a broker, its two agents and a qemu VM.

Run it with the project's Python (``.venv/bin/python tools/walkthrough.py``). It starts
``spinbroker serve``, ``sa-host-path`` and ``sa-emulation`` as separate processes in a work
dir, then does with the ``spinbroker message`` CLI what an API server would do: one package
that adds a volume, creates a raw image in it, writes a VM definition that uses the image
and starts the VM, each command depending on the one before; then it shows the state of
things, presses the VM's power button over QMP, and stops the VM by force when nothing has
answered the button after a grace period (the disk is blank: the VM sits in its BIOS, and
no OS hears the button).

Every process it starts is stopped before it exits, also after an error or Ctrl-C: the
agents, then any qemu left running in the work dir, then the broker. Every wait has a
deadline. The work dir is removed at the end unless ``--keep`` is given or something went
wrong (then its logs are worth reading).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType

#: Longest waits: for a process to say it is ready, for one CLI call, for a package.
READY_TIMEOUT = 20.0
CLI_TIMEOUT = 15.0
PACKAGE_TIMEOUT = 60.0
#: How long a process gets between SIGTERM and SIGKILL when the walkthrough cleans up.
STOP_TIMEOUT = 10.0
#: The CLI, run by this Python so that it is the spinbroker this Python imports.
SPINBROKER = (sys.executable, "-m", "spinbroker")
VM_ID = "1"
VM = {
    "Name": "vm1",
    "Cpus": 1,
    "Memory": 64,
    "Images": [{"Path": "test.raw", "Cdrom": False, "Volume": "test"}],
    "Accel": "tcg",
}


class WalkthroughError(Exception):
    """A step did not go as it should; the message says which and why."""


# -- processes -------------------------------------------------------------------------------


class Child:
    """A process the walkthrough started: its output goes to a log file, line by line, and
    `wait_for` blocks (with a deadline) until a line matches or the process ends."""

    def __init__(self, name: str, argv: Sequence[str], log: Path, env: dict[str, str]) -> None:
        self.name = name
        self.log = log
        self._lines: list[str] = []
        self._ended = False
        self._changed = threading.Condition()
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            text=True,
            errors="replace",
            # Its own session: Ctrl-C reaches only the walkthrough, which stops it in order.
            start_new_session=True,
        )
        self._pump = threading.Thread(target=self._read, name=f"{name}-output", daemon=True)
        self._pump.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with open(self.log, "a") as log:
            for line in self.proc.stdout:
                log.write(line)
                log.flush()
                with self._changed:
                    self._lines.append(line.rstrip("\n"))
                    self._changed.notify_all()
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    def wait_for(self, pattern: str, timeout: float = READY_TIMEOUT) -> str:
        """The first line matching `pattern`; WalkthroughError if the process ends first or
        says nothing of the kind within `timeout` seconds."""
        wanted = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            seen = 0
            while True:
                for line in self._lines[seen:]:
                    if wanted.search(line):
                        return line
                seen = len(self._lines)
                if self._ended:
                    status = self.proc.wait(STOP_TIMEOUT)
                    raise WalkthroughError(
                        f"{self.name} exited (status {status}) before saying /{pattern}/"
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WalkthroughError(f"{self.name} did not say /{pattern}/ in {timeout:g}s")
                self._changed.wait(left)

    def tail(self, count: int = 8) -> list[str]:
        with self._changed:
            return self._lines[-count:]

    def stop(self) -> str:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT; says how it ended."""
        how = "had exited"
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            how = "stopped (SIGTERM)"
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT)
                how = f"killed (SIGKILL, {STOP_TIMEOUT:g}s after SIGTERM)"
        self._pump.join(STOP_TIMEOUT)
        return f"{how}, status {self.proc.returncode}"


def program(script: str, module: str) -> list[str]:
    """The argv that runs a console script: the one next to this Python, else the module."""
    installed = Path(sys.executable).parent / script
    if installed.is_file() and os.access(installed, os.X_OK):
        return [str(installed)]
    return [sys.executable, "-c", f"import sys; from {module} import main; sys.exit(main())"]


def wait_exit(pid: int, timeout: float) -> bool:
    """True once process `pid` has exited (or is a zombie), False after `timeout` seconds.

    Waits on a pidfd, which becomes readable when the process exits: no polling, and it
    works for a process that is not our child.
    """
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    except OSError:  # a kernel without pidfds: look at /proc until the deadline
        return _poll_exit(pid, time.monotonic() + timeout)
    try:
        readable, _, _ = select.select([fd], [], [], timeout)
        return bool(readable)
    finally:
        os.close(fd)


def _poll_exit(pid: int, deadline: float) -> bool:
    while _alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def end_process(pid: int) -> str:
    """SIGTERM, then SIGKILL after STOP_TIMEOUT, for a process that is not our child."""
    try:
        os.kill(pid, signal.SIGTERM)
        if wait_exit(pid, STOP_TIMEOUT):
            return "stopped (SIGTERM)"
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return "had exited"
    wait_exit(pid, STOP_TIMEOUT)
    return f"killed (SIGKILL, {STOP_TIMEOUT:g}s after SIGTERM)"


def vm_processes(state_dir: Path) -> dict[int, str]:
    """Live qemu processes of VMs in `state_dir`: their command line names a monitor socket
    in it. Found in /proc rather than through pid files, so none is missed."""
    found: dict[int, str] = {}
    needle = f"path={state_dir}/vms/".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(needle in arg.replace(b",,", b",") for arg in argv) and _alive(int(entry.name)):
            found[int(entry.name)] = os.path.basename(argv[0].decode(errors="replace"))
    return found


def qemu_pid(vm_dir: Path) -> int | None:
    """The pid of the VM's qemu, if it runs (the pid file names it and it is that qemu)."""
    try:
        pid = int((vm_dir / "qemu.pid").read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, ValueError, IndexError):
        return None
    if state == "Z" or str(vm_dir / "qmp.sock").encode() not in cmdline:
        return None
    return pid


def qmp_status(monitor: Path, timeout: float = 5.0) -> str:
    """QMP ``query-status`` of a VM, through the emulation agent's own QMP client."""
    import asyncio

    from agents.emulation.qmp import QMPError, run_command

    try:
        status = asyncio.run(run_command(monitor, "query-status", timeout=timeout))
    except QMPError as exc:
        return f"unknown ({exc})"
    return str(status.get("status"))


# -- the walkthrough -------------------------------------------------------------------------


class Walkthrough:
    """The steps, the processes they started, and what they print."""

    def __init__(self, workdir: Path, grace: float, interrupts: Interrupts) -> None:
        self.workdir = workdir
        self.grace = grace
        self.interrupts = interrupts
        self.data_dir = workdir / "broker"
        self.images = workdir / "images"
        self.state = workdir / "emulation"
        self.logs = workdir / "logs"
        self.socket = self.data_dir / "spinbroker.sock"
        self.env = {**os.environ, "SPINBROKER_ADDR": f"unix:{self.socket}"}
        self.env.pop("PYTHONSTARTUP", None)
        self.children: list[Child] = []
        self.ids: dict[str, str] = {}

    # -- printing --------------------------------------------------------------------------

    def shown(self, text: str) -> str:
        """`text` with the work dir written as $W."""
        return text.replace(str(self.workdir), "$W")

    @staticmethod
    def step(number: int, title: str) -> None:
        print(f"\n{number}. {title}", flush=True)

    def say(self, text: str = "") -> None:
        for line in text.splitlines() or [""]:
            print(f"   {self.shown(line)}", flush=True)

    def out(self, text: str) -> None:
        for line in text.rstrip("\n").splitlines():
            print(f"     {self.shown(line)}", flush=True)

    # -- the programs ------------------------------------------------------------------------

    def start(self, name: str, argv: list[str], shown: str, ready: str) -> Child:
        self.say(f"$ {shown}")
        with self.interrupts.held():  # a Ctrl-C now must not lose the process
            child = Child(name, argv, self.logs / f"{name}.log", self.env)
            self.children.append(child)
        line = child.wait_for(ready)
        self.out(f"[pid {child.pid}] {line.split(': ', 1)[-1]}")
        return child

    def cli(self, *args: str, name: str | None = None, timeout: float = CLI_TIMEOUT) -> str:
        """Runs ``spinbroker ARGS``, shown with $names for the ids; its stdout. With
        `name`, shown as ``name=$(spinbroker ...)`` and its output remembered as $name."""
        words = [self._variable(a) for a in args]
        command = "spinbroker " + " ".join(words)
        self.say(f"$ {name}=$({command})" if name else f"$ {command}")
        argv = [*SPINBROKER, *args]
        try:
            done = subprocess.run(
                argv, env=self.env, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:
            raise WalkthroughError(f"{command} did not answer in {timeout:g}s") from None
        if done.returncode != 0:
            raise WalkthroughError(f"{command} exited {done.returncode}: {done.stderr.strip()}")
        output = done.stdout.strip()
        if name:
            self.ids[name] = output
        self.out(output)
        return output

    def _variable(self, word: str) -> str:
        for name, value in self.ids.items():
            if word == value:
                return f"${name}"
        if word.startswith("vm="):
            return f"vm='{word[3:]}'"
        return shlex.quote(word)

    # -- the steps ---------------------------------------------------------------------------

    def run(self) -> None:
        for directory in (self.logs, self.images, self.state):
            directory.mkdir(parents=True, exist_ok=True)
        print(f"W={self.workdir}   # the work dir; logs in $W/logs", flush=True)
        self.start_programs()
        self.create_and_start()
        vm_dir = self.show_status()
        self.shutdown(vm_dir)

    def start_programs(self) -> None:
        self.step(1, "Start the broker and one agent per resource, each its own process")
        self.start(
            "broker",
            [*SPINBROKER, "serve", "--data-dir", str(self.data_dir), "--no-tcp"],
            "spinbroker serve --data-dir $W/broker --no-tcp &",
            r"\bready\b",
        )
        self.say(f"$ export SPINBROKER_ADDR=unix:{self.socket}")
        self.start(
            "sa-host-path",
            [*program("sa-host-path", "agents.host_path"), "--base-dir", str(self.images)],
            "sa-host-path --base-dir $W/images &",
            r"connected; serving storage",
        )
        flags = ["--state-dir", str(self.state), "--images-dir", str(self.images)]
        flags += ["--supervisor", "process", "--stop-timeout", "5"]
        self.start(
            "sa-emulation",
            [*program("sa-emulation", "agents.emulation"), *flags],
            self.shown(" ".join(["sa-emulation", *flags, "&"])),
            r"connected; serving emulation",
        )

    def create_and_start(self) -> None:
        self.step(2, "One package: volume -> image -> VM definition -> start, each --dep the last")
        self.cli("message", "new", name="pkg")
        pkg = self.ids["pkg"]
        self.cli("message", "add", pkg, "storage", "add_volume", "path=test", name="vol")
        self.cli(
            "message",
            "add",
            pkg,
            "storage",
            "create_image",
            "volume_path=test",
            "image_name=test.raw",
            "image_size=1",
            "--dep",
            self.ids["vol"],
            name="img",
        )
        vm = json.dumps(VM, separators=(",", ":"))
        self.cli(
            "message",
            "add",
            pkg,
            "emulation",
            "write_config",
            f"id={VM_ID}",
            f"vm={vm}",
            "--dep",
            self.ids["img"],
            name="cfg",
        )
        self.cli(
            "message",
            "add",
            pkg,
            "emulation",
            "start",
            f"id={VM_ID}",
            "--dep",
            self.ids["cfg"],
            name="run",
        )
        self.cli("message", "enqueue", pkg)
        self.say("# the agents take the commands in dependency order; WAIT returns when done")
        self.wait_package(pkg)

    def wait_package(self, pkg: str) -> None:
        timeout = f"{PACKAGE_TIMEOUT:g}"
        status = self.cli(
            "message", "wait", pkg, "--timeout", timeout, timeout=PACKAGE_TIMEOUT + 10
        )
        if not status.startswith("succeeded"):
            listing = self.cli("message", "status", pkg, "--commands")
            raise WalkthroughError(f"package {pkg} did not succeed:\n{listing}")

    def show_status(self) -> Path:
        self.step(3, "Status: the package, the files the agents wrote, the running VM")
        self.cli("message", "status", self.ids["pkg"], "--commands")
        image = self.images / "test" / "test.raw"
        size = image.stat()
        self.say(
            f"image    $W/images/test/test.raw: {size.st_size / (1 << 30):g} GiB, "
            f"{size.st_blocks * 512 // 1024} KiB allocated (sparse)"
        )
        vm_dir = self.state / "vms" / VM_ID
        files = ", ".join(sorted(p.name for p in vm_dir.iterdir()))
        self.say(f"VM dir   $W/emulation/vms/{VM_ID}: {files}")
        argv = json.loads((vm_dir / "qemu.argv").read_text())
        self.say(f"qemu     {' '.join(argv[:3])} ... ({len(argv)} arguments, see qemu.cmdline)")
        pid = qemu_pid(vm_dir)
        if pid is None:
            raise WalkthroughError("the VM's qemu is not running after start succeeded")
        self.say(f"running  qemu pid {pid}; QMP query-status: {qmp_status(vm_dir / 'qmp.sock')}")
        console = (vm_dir / "console.log").stat().st_size
        self.say(f"console  {console} bytes: a blank disk has no OS, the VM sits in its BIOS")
        return vm_dir

    def shutdown(self, vm_dir: Path) -> None:
        pid = qemu_pid(vm_dir)
        assert pid is not None
        self.step(4, "Graceful: press the power button (QMP system_powerdown)")
        self.say("# a new package; its command depends on the start of the first one")
        self.cli("message", "new", name="pkg2")
        self.cli(
            "message",
            "add",
            self.ids["pkg2"],
            "emulation",
            "shutdown",
            f"id={VM_ID}",
            "--dep",
            self.ids["run"],
            name="down",
        )
        self.cli("message", "enqueue", self.ids["pkg2"])
        self.wait_package(self.ids["pkg2"])
        self.cli("message", "status", self.ids["down"])
        self.say(f"# waiting up to {self.grace:g}s for qemu (pid {pid}) to exit by itself ...")
        if wait_exit(pid, self.grace):
            self.say("qemu exited: the guest powered off")
            return
        self.say(f"still running after {self.grace:g}s: no OS answers the button")

        self.step(5, "Forced: stop (SIGTERM, SIGKILL after --stop-timeout)")
        self.cli("message", "new", name="pkg3")
        self.cli(
            "message",
            "add",
            self.ids["pkg3"],
            "emulation",
            "stop",
            f"id={VM_ID}",
            "--dep",
            self.ids["down"],
            name="halt",
        )
        self.cli("message", "enqueue", self.ids["pkg3"])
        self.wait_package(self.ids["pkg3"])
        self.cli("message", "status", self.ids["halt"])
        if not wait_exit(pid, STOP_TIMEOUT):
            raise WalkthroughError(f"qemu (pid {pid}) still runs after stop succeeded")
        log = (vm_dir / "qemu.log").read_text().splitlines()
        self.say(f"qemu pid {pid} is gone; qemu.log ends: {log[-1] if log else '(empty)'}")

    # -- cleaning up -------------------------------------------------------------------------

    def clean_up(self) -> None:
        """Stops the agents, then whatever else still runs in the work dir (a VM left
        running: VMs outlive their agent on purpose), then the broker."""
        agents = [c for c in self.children if c.name != "broker"]
        broker = [c for c in self.children if c.name == "broker"]
        for child in reversed(agents):
            self.say(f"{child.name} (pid {child.pid}): {child.stop()}")
        for pid, name in sorted(vm_processes(self.state).items()):
            self.say(f"{name} (pid {pid}): {end_process(pid)}")
        for child in broker:
            self.say(f"{child.name} (pid {child.pid}): {child.stop()}")

    def show_logs(self) -> None:
        for child in self.children:
            print(f"--- last lines of {self.shown(str(child.log))}", file=sys.stderr)
            for line in child.tail():
                print(f"    {line}", file=sys.stderr)


class Interrupts:
    """Ctrl-C, SIGTERM and SIGHUP end the walkthrough through its clean-up (as
    KeyboardInterrupt), but not inside `held()`: there, one waits for the block's end, so
    that starting a process and recording it for the clean-up is one step."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self._holding = False
        self._pending: str | None = None

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self._holding:
            self._pending = name
            return
        raise KeyboardInterrupt(name)

    def install(self) -> None:
        for sig in self.SIGNALS:
            signal.signal(sig, self._on_signal)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        self._holding = True
        try:
            yield
        finally:
            self._holding = False
            pending, self._pending = self._pending, None
            if pending is not None:
                raise KeyboardInterrupt(pending)

    def ignore(self) -> None:
        """From now on the signals are ignored: the clean-up runs to its end."""
        for sig in self.SIGNALS:
            signal.signal(sig, signal.SIG_IGN)


def make_workdir(given: Path | None) -> Path:
    if given is None:
        return Path(tempfile.mkdtemp(prefix="spin-walkthrough-"))
    workdir = given.expanduser().absolute()
    if workdir.exists() and any(workdir.iterdir()):
        raise WalkthroughError(f"{workdir} is not empty: give a new or empty --workdir")
    workdir.mkdir(parents=True, exist_ok=True)
    return workdir


def non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"must be from 0 to 3600: {text!r}")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Run the original spin example for real: a broker, sa-host-path, "
        "sa-emulation and a qemu VM, driven with the spinbroker CLI."
    )
    parser.add_argument("--keep", action="store_true", help="leave the work dir in place")
    parser.add_argument(
        "--workdir",
        type=Path,
        help="a new or empty directory to work in (default: a fresh temporary one)",
    )
    parser.add_argument(
        "--grace",
        type=non_negative,
        default=5.0,
        metavar="S",
        help="seconds to wait for the VM to power off before stopping it (default %(default)s)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if importlib.util.find_spec("spinbroker") is None:
        print(
            "walkthrough: this Python cannot import spinbroker; run it with the project's: "
            ".venv/bin/python tools/walkthrough.py",
            file=sys.stderr,
        )
        return 1
    if shutil.which("qemu-system-x86_64") is None:
        print("walkthrough: qemu-system-x86_64 is not installed", file=sys.stderr)
        return 1
    try:
        workdir = make_workdir(args.workdir)
    except (OSError, WalkthroughError) as exc:
        print(f"walkthrough: {exc}", file=sys.stderr)
        return 2
    interrupts = Interrupts()
    walk = Walkthrough(workdir, args.grace, interrupts)
    status, keep = 0, args.keep
    try:
        interrupts.install()
        walk.run()
    except KeyboardInterrupt as exc:
        print(f"\ninterrupted ({str(exc) or 'SIGINT'}): cleaning up", file=sys.stderr, flush=True)
        status = 130
    except (WalkthroughError, OSError, ValueError) as exc:
        print(f"\nwalkthrough failed: {walk.shown(str(exc))}", file=sys.stderr, flush=True)
        walk.show_logs()
        status, keep = 1, True
    finally:
        # A second Ctrl-C must not cut the clean-up short and leave processes behind.
        interrupts.ignore()
        Walkthrough.step(6, "Clean up: the agents, any VM left, then the broker")
        walk.clean_up()
    if keep:
        walk.say(f"kept {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
        walk.say(f"removed {workdir}")
    return status


if __name__ == "__main__":
    sys.exit(main())
