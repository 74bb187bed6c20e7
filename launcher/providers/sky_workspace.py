"""Workspaces on a SkyPilot cluster: the shell workspace on its head, plus what SkyPilot's
autodown needs, and, for a cluster of several nodes, the same run folder on every node.

Before a runner starts, the cluster's keep-alive job (cluster_templates/sky_task.yaml) must be
running, or the autodown, which sees only SkyPilot's job queue, would tear the cluster down under
the runner. At launch it is the task's run command; when a run is started again later (resume
after a crash, within the autodown window), it may have ended, and is submitted again.

Several nodes (resources.nodes): every node gets the environment, the job and any checkpoint
pushed back, and starts its runner (each reads its rank and the head's address from its own node
file); rank 0, on the head, writes the run's files, so looks, streams and fetches read the head."""

from __future__ import annotations

import shlex
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, TypeVar

from launcher.config import LaunchConfig
from launcher.distributed import Topology
from launcher.remote import Machine
from launcher.workspace import Look, ShellWorkspace, Workspace

GUARD_PID_FILE = "~/.qlora-launch/guard.pid"  # the keep-alive watchdog writes its pid there
JOB_PID_FILE = ".job.pid"  # in a worker's run folder: the job started there, for signal()

T = TypeVar("T")


class SkyWorkspace(ShellWorkspace):
    """The run folder on a one-node cluster's head."""

    def __init__(self, machine: Machine, folder: str, rearm: Callable[[], None]) -> None:
        super().__init__(machine, folder)
        self.rearm = rearm

    def start(self, python: str, *, resume: bool, topology: Topology = Topology(),
              env: Optional[Mapping[str, str]] = None) -> int:
        if not keep_alive_running(self):
            self.rearm()
        return super().start(python, resume=resume, topology=topology, env=env)

    def keep_alive_running(self) -> bool:
        return keep_alive_running(self)


def keep_alive_running(node: ShellWorkspace) -> bool:
    check = f'pid=$(cat {GUARD_PID_FILE} 2>/dev/null) && kill -0 "$pid" 2>/dev/null && echo yes || echo no'
    return node.machine.run(check, check=False, timeout=60).stdout.strip().endswith("yes")


class ClusterWorkspace(Workspace):
    """One run folder on each node of a cluster, head first; writes go to every node, reads to the head."""

    def __init__(self, nodes: list[ShellWorkspace], rearm: Callable[[], None]) -> None:
        assert nodes, "a cluster has a head"
        self.nodes = nodes
        self.head = nodes[0]
        self.folder = self.head.folder
        self.rearm = rearm

    def _each(self, work: Callable[[ShellWorkspace], T]) -> list[T]:
        """work() on every node at once (a venv build or an upload takes as long on 8 nodes as on 1)."""
        with ThreadPoolExecutor(max_workers=len(self.nodes)) as pool:
            return list(pool.map(work, self.nodes))

    def prepare(self, config: LaunchConfig) -> str:
        return self._each(lambda node: node.prepare(config))[0]

    def upload(self, config: LaunchConfig) -> None:
        self._each(lambda node: node.upload(config))

    def start(self, python: str, *, resume: bool, topology: Topology = Topology(),
              env: Optional[Mapping[str, str]] = None) -> int:
        if not all(self._each(keep_alive_running)):
            self.rearm()
        jobs = self._each(lambda node: node.start(python, resume=resume, topology=topology, env=env))
        for node, job in zip(self.nodes[1:], jobs[1:]):
            node.machine.run(f"echo {job} > {shlex.quote(f'{node.folder}/{JOB_PID_FILE}')}", timeout=60)
        return jobs[0]

    def look(self, job: Optional[int]) -> Look:
        return self.head.look(job)

    def stream(self, name: str, *, stop: Callable[[], bool], start_line: int = 0) -> Iterator[str]:
        return self.head.stream(name, stop=stop, start_line=start_line)

    def read(self, name: str) -> str:
        return self.head.read(name)

    def fetch_results(self, local_dir: Path) -> None:
        self.head.fetch_results(local_dir)

    def fetch_checkpoint(self, step: int, into: Path) -> None:
        self.head.fetch_checkpoint(step, into)

    def push_checkpoint(self, checkpoint: Path, step: int, history: list[Path]) -> None:
        self._each(lambda node: node.push_checkpoint(checkpoint, step, history))

    def signal(self, job: int, signal_name: str) -> None:
        """Every node's runner: a stop reaches all ranks at once (each also hears of it from the others)."""
        self.head.signal(job, signal_name)
        for node in self.nodes[1:]:
            pid = node.read(JOB_PID_FILE).strip()
            if pid.isdigit():
                node.signal(int(pid), signal_name)
