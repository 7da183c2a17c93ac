"""sa-emulation: the `emulation` agent, running qemu VMs from definitions it writes.

Actions: ``write_config(id, vm)``, ``remove_config(id)``, ``start(id)``, ``stop(id)``,
``shutdown(id, [wait])``. The rooms: `config` (what a VM is), `qemu` (its files, argv and
unit), `qmp` (talking to its monitor), `supervisor` (who keeps qemu running), `service`
(the actions themselves). This module puts them in an agent and a console script.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from agents.emulation.config import VM_PARAM, VMConfig
from agents.emulation.service import DEFAULT_IMAGES_DIR, DEFAULT_STATE_DIR, Emulation
from agents.emulation.supervisor import (
    ProcessSupervisor,
    Supervisor,
    SystemdSupervisor,
    choose_supervisor,
)
from spinbroker.agent import Agent, agent_main
from spinbroker.schema import Float, Str

__all__ = [
    "RESOURCE",
    "Emulation",
    "ProcessSupervisor",
    "Supervisor",
    "SystemdSupervisor",
    "VMConfig",
    "build_agent",
    "main",
]

RESOURCE = "emulation"


def build_agent(emulation: Emulation, ttr: float | None = 60.0) -> Agent:
    agent = Agent(RESOURCE, ttr=ttr)
    vm_id = Str(min_length=1, max_length=64, description="the VM's id")
    agent.add_action("write_config", emulation.write_config, params={"id": vm_id, "vm": VM_PARAM})
    agent.add_action("remove_config", emulation.remove_config, params={"id": vm_id})
    agent.add_action("start", emulation.start, params={"id": vm_id})
    agent.add_action("stop", emulation.stop, params={"id": vm_id})
    agent.add_action(
        "shutdown",
        emulation.shutdown,
        params={"id": vm_id, "wait": Float(default=0.0, minimum=0.0, maximum=3600.0)},
    )
    return agent


def main(argv: Sequence[str] | None = None) -> int:
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--state-dir",
            type=Path,
            default=DEFAULT_STATE_DIR,
            help="where VM definitions, monitors, pid and log files live (default: %(default)s)",
        )
        parser.add_argument(
            "--images-dir",
            type=Path,
            default=DEFAULT_IMAGES_DIR,
            help="where relative image paths are found, as sa-host-path's base dir "
            "(default: %(default)s)",
        )
        parser.add_argument(
            "--supervisor",
            choices=["auto", "systemd", "process"],
            default="auto",
            help="systemd --user, the built-in process supervisor, or auto (systemd when "
            "a user manager answers; default)",
        )
        parser.add_argument("--qemu", default=None, help="the qemu-system-x86_64 to run")
        parser.add_argument(
            "--stop-timeout",
            type=float,
            default=30.0,
            help="seconds between SIGTERM and SIGKILL when stopping a VM (default: %(default)s)",
        )

    def build(args: argparse.Namespace) -> Agent:
        state_dir: Path = args.state_dir.expanduser()
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        emulation = Emulation(
            state_dir,
            choose_supervisor(args.supervisor, grace=args.stop_timeout),
            images_dir=args.images_dir,
            qemu=args.qemu,
            stop_timeout=args.stop_timeout,
        )
        return build_agent(emulation)

    return agent_main("sa-emulation: the emulation agent (qemu VMs)", build, add_arguments, argv)
