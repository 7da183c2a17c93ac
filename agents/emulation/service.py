"""The emulation actions: a VM's definition on disk, and its life through a supervisor.

`Emulation` keeps each VM's files under ``<state dir>/vms/<id>/`` (see `VMFiles`) and
knows nothing of the broker. Starting, stopping and asking whether a VM runs go to the
`Supervisor`; the graceful shutdown goes to the VM itself, over QMP.

start, stop and shutdown are idempotent (a VM already in the wanted state is a success
with a note): a command delivered again after a lost lease must not fail a package.
write_config replaces a stopped VM's definition; it refuses while the VM runs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from agents.emulation.config import VM_PARAM, VMConfig, check_vm_id
from agents.emulation.qemu import (
    MAX_SOCKET_PATH,
    VMFiles,
    command_line,
    qemu_argv,
    render_unit,
)
from agents.emulation.qmp import QMPError, run_command
from agents.emulation.supervisor import Supervisor, write_atomic
from spinbroker.agent import ActionError
from spinbroker.schema import SchemaError

QEMU = "qemu-system-x86_64"
DEFAULT_STATE_DIR = Path("~/.config/spin/emulation")
DEFAULT_IMAGES_DIR = Path("~/.config/spin/images")


class Emulation:
    """The VMs of one state dir."""

    def __init__(
        self,
        state_dir: Path,
        supervisor: Supervisor,
        *,
        images_dir: Path = DEFAULT_IMAGES_DIR,
        qemu: str | None = None,
        stop_timeout: float = 30.0,
        qmp_timeout: float = 5.0,
    ) -> None:
        self.state_dir = state_dir.expanduser().absolute()
        self.images_dir = images_dir.expanduser().absolute()
        self.supervisor = supervisor
        self.qemu = qemu or shutil.which(QEMU) or QEMU
        self.stop_timeout = stop_timeout
        self.qmp_timeout = qmp_timeout

    def files(self, vm_id: str) -> VMFiles:
        try:
            check_vm_id(vm_id)
        except ValueError as exc:
            raise ActionError(str(exc)) from None
        return VMFiles.under(self.state_dir, vm_id)

    def definition(self, vm_id: str) -> VMConfig:
        """The VM's definition as written by write_config."""
        files = self._defined(vm_id)
        try:
            vm: VMConfig = VM_PARAM.check(json.loads(files.config.read_text()), "vm")
        except (OSError, ValueError, SchemaError) as exc:
            raise ActionError(f"VM {vm_id}: unreadable definition {files.config}: {exc}") from None
        return vm

    # -- the actions -----------------------------------------------------------------------

    async def write_config(self, id: str, vm: VMConfig) -> str:
        files = self.files(id)
        if files.config.exists() and await self.supervisor.running(files):
            raise ActionError(f"VM {id} is running: stop it before changing its definition")
        if len(str(files.monitor).encode()) > MAX_SOCKET_PATH:
            raise ActionError(
                f"the monitor socket path {files.monitor} is longer than {MAX_SOCKET_PATH} "
                "bytes: use a shorter state dir"
            )
        argv = qemu_argv(vm, files, self.qemu, self.images_dir)
        try:
            unit = render_unit(vm, files, argv, self.stop_timeout)
        except ValueError as exc:
            raise ActionError(str(exc)) from None
        files.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomic(files.config, json.dumps(vm.to_wire(), indent=2) + "\n")
        write_atomic(files.argv, json.dumps(argv) + "\n")
        write_atomic(files.cmdline, command_line(argv) + "\n")
        write_atomic(files.unit, unit)
        await self.supervisor.install(files)
        return f"VM {id} ({vm.name}) defined in {files.dir}"

    async def remove_config(self, id: str) -> str:
        files = self._defined(id)
        if await self.supervisor.running(files):
            raise ActionError(f"VM {id} is running: stop it before removing it")
        await self.supervisor.uninstall(files)
        shutil.rmtree(files.dir)
        return f"VM {id} removed"

    async def start(self, id: str) -> str:
        files = self._defined(id)
        if await self.supervisor.running(files):
            return f"VM {id} is already running"
        vm = self.definition(id)
        missing = [str(p) for i in vm.images if not (p := i.resolve(self.images_dir)).exists()]
        if missing:
            raise ActionError(f"VM {id}: missing image {', '.join(missing)}")
        await self.supervisor.start(files)
        return f"VM {id} ({vm.name}) started"

    async def stop(self, id: str) -> str:
        files = self._defined(id)
        if await self.supervisor.stop(files):
            return f"VM {id} stopped"
        return f"VM {id} was not running"

    async def shutdown(self, id: str, wait: float = 0.0) -> str:
        """Presses the VM's power button (ACPI, over QMP); with `wait`, waits for qemu to
        exit and fails if it still runs after that many seconds."""
        files = self._defined(id)
        if not await self.supervisor.running(files):
            return f"VM {id} is not running"
        try:
            await run_command(files.monitor, "system_powerdown", timeout=self.qmp_timeout)
        except QMPError as exc:
            raise ActionError(f"VM {id}: {exc}") from None
        if wait <= 0:
            return f"VM {id}: power button pressed"
        if not await self.supervisor.wait_stopped(files, wait):
            raise ActionError(f"VM {id} still runs {wait:g}s after its power button was pressed")
        return f"VM {id} shut down"

    async def query_status(self, id: str) -> str:
        """The run state QMP reports (``running``, ``paused``, ...)."""
        files = self._defined(id)
        try:
            status = await run_command(files.monitor, "query-status", timeout=self.qmp_timeout)
        except QMPError as exc:
            raise ActionError(f"VM {id}: {exc}") from None
        return str(status["status"])

    def _defined(self, vm_id: str) -> VMFiles:
        files = self.files(vm_id)
        if not files.config.exists():
            raise ActionError(f"no VM {vm_id}: write its config first")
        return files
