"""What a VM's definition turns into: the files of a VM, its qemu argv, its systemd unit.

Pure apart from `VMFiles` naming paths: rendering reads and writes nothing, so tests
compare the output with literal text.

A VM's files live in ``<state dir>/vms/<id>/``: ``vm.json`` (the definition as given),
``qemu.argv`` (the exact argv, JSON), ``qemu.cmdline`` (the same, shell-quoted, for a
person), ``spin-vm-<id>.service`` (the systemd user unit that runs it), and at run time
``qmp.sock`` (the QMP monitor), ``qemu.pid``, ``qemu.log`` (qemu's own output) and
``console.log`` (the guest's serial console).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from agents.emulation.config import VMConfig

#: sun_path holds 108 bytes, the last one a NUL.
MAX_SOCKET_PATH = 107
UNIT_PREFIX = "spin-vm-"


@dataclass(frozen=True, slots=True)
class VMFiles:
    """The paths of one VM's files."""

    vm_id: str
    dir: Path

    @classmethod
    def under(cls, state_dir: Path, vm_id: str) -> VMFiles:
        return cls(vm_id, state_dir / "vms" / vm_id)

    @property
    def unit_name(self) -> str:
        return f"{UNIT_PREFIX}{self.vm_id}.service"

    @property
    def config(self) -> Path:
        return self.dir / "vm.json"

    @property
    def argv(self) -> Path:
        return self.dir / "qemu.argv"

    @property
    def cmdline(self) -> Path:
        return self.dir / "qemu.cmdline"

    @property
    def unit(self) -> Path:
        return self.dir / self.unit_name

    @property
    def monitor(self) -> Path:
        return self.dir / "qmp.sock"

    @property
    def pidfile(self) -> Path:
        return self.dir / "qemu.pid"

    @property
    def log(self) -> Path:
        return self.dir / "qemu.log"

    @property
    def console(self) -> Path:
        return self.dir / "console.log"


def qemu_value(text: str) -> str:
    """`text` as one value of a qemu ``key=value,...`` option: commas are doubled."""
    return text.replace(",", ",,")


def qemu_argv(vm: VMConfig, files: VMFiles, qemu: str, images_dir: Path) -> list[str]:
    """The exact command line that runs `vm`: headless, QMP on a Unix socket, user network."""
    argv = [
        qemu,
        "-name",
        vm.name,
        "-nodefaults",
        "-no-user-config",
        "-machine",
        f"accel={vm.accel}",
        "-cpu",
        "max",
        "-smp",
        str(vm.cpus),
        "-m",
        f"{vm.memory}M",
        "-display",
        "none",
        "-chardev",
        f"socket,id=qmp,path={qemu_value(str(files.monitor))},server=on,wait=off",
        "-mon",
        "chardev=qmp,mode=control",
        "-chardev",
        f"file,id=console,path={qemu_value(str(files.console))}",
        "-serial",
        "chardev:console",
        "-nic",
        _nic(vm),
    ]
    for image in vm.images:
        path = qemu_value(str(image.resolve(images_dir)))
        if image.cdrom:
            drive = f"file={path},format=raw,if=ide,media=cdrom,readonly=on"
        else:
            drive = f"file={path},format=raw,if=virtio,media=disk"
        argv += ["-drive", drive]
    return argv


def _nic(vm: VMConfig) -> str:
    nic = "user,model=virtio-net-pci"
    for host_ip, host_port, guest_port in vm.forwards():
        nic += f",hostfwd=tcp:{host_ip}:{host_port}-:{guest_port}"
    return nic


def command_line(argv: list[str]) -> str:
    """The argv as one shell line a person can paste."""
    return shlex.join(argv)


_SYSTEMD_PLAIN = re.compile(r"[A-Za-z0-9_@+=:,./-]+")


def systemd_quote(arg: str) -> str:
    """One ExecStart argument: ``%`` and ``$`` escaped, quoted when it has to be."""
    if "\n" in arg or "\r" in arg:
        raise ValueError(f"a unit cannot hold an argument with a line break: {arg!r}")
    escaped = arg.replace("%", "%%").replace("$", "$$")
    if _SYSTEMD_PLAIN.fullmatch(arg):
        return escaped
    escaped = escaped.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _systemd_path(path: Path) -> str:
    """A path as a whole setting's value: no quoting there, only specifiers escaped."""
    text = str(path)
    if "\n" in text:
        raise ValueError(f"a unit cannot hold a path with a line break: {text!r}")
    return text.replace("%", "%%")


def render_unit(vm: VMConfig, files: VMFiles, argv: list[str], stop_timeout: float = 30.0) -> str:
    """The systemd user unit that runs the VM: SIGTERM to stop, SIGKILL after the timeout.

    A graceful shutdown is not the unit's stop: it is the `shutdown` action (ACPI power
    button over QMP), after which qemu exits by itself.
    """
    exec_start = " ".join(systemd_quote(arg) for arg in argv)
    return (
        "[Unit]\n"
        f"Description=spin VM {files.vm_id} ({vm.name})\n"
        "\n"
        "[Service]\n"
        "Type=simple\n"
        f"ExecStart={exec_start}\n"
        f"WorkingDirectory={_systemd_path(files.dir)}\n"
        f"StandardOutput=append:{_systemd_path(files.log)}\n"
        "StandardError=inherit\n"
        "KillMode=mixed\n"
        "KillSignal=SIGTERM\n"
        f"TimeoutStopSec={stop_timeout:g}\n"
        "SendSIGKILL=yes\n"
        "Restart=no\n"
        "\n"
        "[Install]\n"
        "WantedBy=default.target\n"
    )
