"""The shell workspace on a SkyPilot cluster's head, plus one duty: before a runner starts, the
cluster's keep-alive job (cluster_templates/sky_task.yaml) must be running, or SkyPilot's
autodown, which sees only its own job queue, would tear the cluster down under the runner. At
launch it is the task's run command; when a run is started again later (resume after a crash,
within the autodown window), it may have ended and is submitted again."""

from __future__ import annotations

from typing import Callable

from launcher.distributed import Topology
from launcher.remote import Machine
from launcher.workspace import ShellWorkspace

GUARD_PID_FILE = "~/.qlora-launch/guard.pid"  # the keep-alive watchdog writes its pid there


class SkyWorkspace(ShellWorkspace):
    def __init__(self, machine: Machine, folder: str, rearm: Callable[[], None]) -> None:
        super().__init__(machine, folder)
        self.rearm = rearm

    def start(self, python: str, *, resume: bool, topology: Topology = Topology()) -> int:
        if not self.keep_alive_running():
            self.rearm()
        return super().start(python, resume=resume, topology=topology)

    def keep_alive_running(self) -> bool:
        check = f'pid=$(cat {GUARD_PID_FILE} 2>/dev/null) && kill -0 "$pid" 2>/dev/null && echo yes || echo no'
        return self.machine.run(check, check=False, timeout=60).stdout.strip().endswith("yes")
