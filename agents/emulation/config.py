"""A VM's definition as `write_config` takes it: ``{Name, Cpus, Memory, Images, Ports, Accel}``.

The keys are those of the original spin registry (capitalised). The dataclasses check what
a type cannot say (a name's characters, a disk needing a volume, a port map's addresses) in
``__post_init__``; the agent framework turns their `ValueError` into the command's reason.
Pure: no IO.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spinbroker.schema import Dataclass, Int, Param, Str

NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
VM_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
ACCELERATORS = ("kvm:tcg", "kvm", "tcg")
MAX_CPUS = 255
MIN_MEMORY, MAX_MEMORY = 16, 1 << 20  # MiB


def check_vm_id(vm_id: str) -> str:
    if not VM_ID.fullmatch(vm_id):
        raise ValueError(
            f"id {vm_id!r} must be 1 to 64 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    return vm_id


@dataclass(frozen=True, slots=True)
class Image:
    """A disk or cdrom. A relative `path` is found under the images dir, inside `volume`
    when given (where sa-host-path keeps it); an absolute one is used as it is."""

    path: str = field(metadata={"key": "Path", "param": Str(min_length=1)})
    cdrom: bool = field(default=False, metadata={"key": "Cdrom"})
    volume: str | None = field(default=None, metadata={"key": "Volume"})

    def __post_init__(self) -> None:
        if not self.cdrom and not self.volume:
            raise ValueError(f"image {self.path!r}: a disk (Cdrom false) needs a Volume")
        if self.volume is not None and not _is_relative_name(self.volume):
            raise ValueError(
                f"image {self.path!r}: Volume {self.volume!r} must be a relative path "
                "without empty, '.' or '..' parts"
            )
        if not self.path.startswith("/") and not _is_relative_name(self.path):
            raise ValueError(f"image path {self.path!r} must not have an empty, '.' or '..' part")

    def resolve(self, images_dir: Path) -> Path:
        if self.path.startswith("/"):
            return Path(self.path)
        base = images_dir / self.volume if self.volume else images_dir
        return base / self.path

    def to_wire(self) -> dict[str, Any]:
        return {"Path": self.path, "Cdrom": self.cdrom, "Volume": self.volume}


def _is_relative_name(path: str) -> bool:
    return not path.startswith("/") and all(p not in ("", ".", "..") for p in path.split("/"))


@dataclass(frozen=True, slots=True)
class VMConfig:
    """One VM: `memory` in MiB; `ports` maps a guest TCP port to ``host-ip:port``."""

    name: str = field(metadata={"key": "Name", "param": Str(min_length=1, max_length=64)})
    cpus: int = field(metadata={"key": "Cpus", "param": Int(minimum=1, maximum=MAX_CPUS)})
    memory: int = field(
        metadata={"key": "Memory", "param": Int(minimum=MIN_MEMORY, maximum=MAX_MEMORY)}
    )
    images: list[Image] = field(default_factory=list, metadata={"key": "Images"})
    ports: dict[str, str] = field(default_factory=dict, metadata={"key": "Ports"})
    accel: str = field(default="kvm:tcg", metadata={"key": "Accel"})

    def __post_init__(self) -> None:
        if not NAME.fullmatch(self.name):
            raise ValueError(f"Name {self.name!r} must be 1 to 64 letters, digits, '_' or '-'")
        if self.accel not in ACCELERATORS:
            raise ValueError(f"Accel {self.accel!r} must be one of {', '.join(ACCELERATORS)}")
        for guest, host in self.ports.items():
            parse_forward(guest, host)

    def forwards(self) -> list[tuple[str, int, int]]:
        """(host ip, host port, guest port) for every entry of `ports`, by guest port."""
        pairs = (parse_forward(g, h) for g, h in self.ports.items())
        return sorted(pairs, key=lambda f: f[2])

    def to_wire(self) -> dict[str, Any]:
        return {
            "Name": self.name,
            "Cpus": self.cpus,
            "Memory": self.memory,
            "Images": [image.to_wire() for image in self.images],
            "Ports": dict(self.ports),
            "Accel": self.accel,
        }


def parse_forward(guest: str, host: str) -> tuple[str, int, int]:
    if not guest.isdigit() or not 1 <= int(guest) <= 65535:
        raise ValueError(f"Ports: guest port {guest!r} must be a number from 1 to 65535")
    address, sep, port = host.rpartition(":")
    try:
        ip = ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        raise ValueError(f"Ports: {host!r} for guest port {guest} must be ip:port") from None
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"Ports: {host!r} for guest port {guest} needs a port from 1 to 65535")
    if ip.version != 4:
        raise ValueError(f"Ports: {host!r}: user networking forwards IPv4 addresses only")
    return str(ip), int(port), int(guest)


#: The `vm` parameter of write_config: the structure travels in the announced schema; the
#: checks of `__post_init__` run in the agent.
VM_PARAM: Param = Dataclass(VMConfig, description="the VM: Name, Cpus, Memory (MiB), Images")
