"""The runner's folder on a target, as the run lifecycle sees it.

A Workspace is everything job.py does to a run on its target, in the lifecycle's words: prepare
the environment, upload the job, start the runner detached, look at it, stream its metrics,
fetch its results, fetch or push a checkpoint, stop it with a grace period. job.py talks to a
Workspace and a Provider only, never to a shell.

ShellWorkspace is the one for every machine with a shell (local, your SSH box, Vast.ai, later
SkyPilot clusters): a folder <workdir>/runs/<run-id>/ driven over remote.Machine (OpenSSH and
rsync). A target without a shell (a Kaggle kernel: pushed, polled, its output downloaded)
brings a Workspace of its own through Provider.open_workspace."""

from __future__ import annotations

import json
import shlex
import shutil
import sys
import tempfile
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

from launcher import sync
from launcher.config import LaunchConfig
from launcher.distributed import NODE_ENV_NAME, Topology, runner_command, runner_environment
from launcher.errors import EXIT_ENVIRONMENT
from launcher.paths import CLUSTER_TEMPLATES, RUNNER_FILE, RUNNER_REQUIREMENTS, runner_module
from launcher.remote import Machine, RemoteError, shell_path

EXIT_CODE_FILE = "exit_code"
REMOTE_CONFIG = "job.yaml"  # what the runner reads on the target
SEEN_FILE = ".launcher-seen"  # in the workdir, touched at every look: a rented instance's watchdog reads it
BOOTSTRAP_FILES = (CLUSTER_TEMPLATES / "bootstrap.sh", CLUSTER_TEMPLATES / "stack_check.py", RUNNER_REQUIREMENTS)
# What stays on the target when results are fetched: checkpoints come one by one, the rest is ours.
NOT_RESULTS = ("checkpoints", ".*.tmp", RUNNER_FILE.name)

WorkspaceError = RemoteError  # a step on the target failed (unreachable, a command or transfer failed)


class PrepareFailed(Exception):
    """The target's environment cannot run the runner (no GPU, a broken CUDA stack, pip failed)."""

    exit_code = EXIT_ENVIRONMENT


@dataclass(frozen=True)
class Look:
    """One look at the job on the target."""

    exit_code: Optional[int]  # None while running (or when it died without writing one)
    alive: bool
    complete_steps: list[int]  # complete checkpoints there
    status: dict[str, Any]  # the runner's status.json
    # A session that ended by the provider's clock (the runner stopped with a checkpoint first):
    # "session_limit" -> the lifecycle continues in a new session on the same machine; "quota" ->
    # the run stops, resumable (status.json's "error" says when the quota refreshes). None: not so.
    session_end: Optional[str] = None

    @property
    def running(self) -> bool:
        return self.alive and self.exit_code is None


class Workspace(ABC):
    """One run's folder on its target. `folder` is what the run record keeps to reopen it."""

    folder: str
    # Whether signal() reaches the runner (`launch down` waits for its checkpoint). False: the
    # target has no way to stop it (a Kaggle kernel ends by itself).
    stoppable: bool = True

    @abstractmethod
    def prepare(self, config: LaunchConfig) -> str:
        """Make the environment ready (bootstrap, GPU stack check); the python the runner uses.
        Raises PrepareFailed with the target's own reason."""

    @abstractmethod
    def upload(self, config: LaunchConfig) -> None:
        """Put the job there: its local assets (once per content), the job config, the runner."""

    @abstractmethod
    def start(self, python: str, *, resume: bool, topology: Topology = Topology(),
              env: Optional[Mapping[str, str]] = None) -> int:
        """Start the runner detached (fresh, or `--resume auto`), with one rank per GPU of
        `topology` (launcher/distributed.py); the job's id for look/stop. `env`: variables for the
        runner's environment only (the store's keys): never on a command line, in a file or a log."""

    @abstractmethod
    def look(self, job: Optional[int]) -> Look:
        """Phase, step, alive, exit code and complete checkpoints, in one round trip."""

    @abstractmethod
    def stream(self, name: str, *, stop: Callable[[], bool], start_line: int = 0) -> Iterator[str]:
        """Lines appended to the run's file `name` as they are written (metrics.jsonl,
        runner.log); "" now and then when nothing came, so the caller can do other work.
        Survives dropped connections; ends when stop() is true."""

    @abstractmethod
    def read(self, name: str) -> str:
        """The run's file `name` as it is now ("" when absent)."""

    @abstractmethod
    def fetch_results(self, local_dir: Path) -> None:
        """Everything of the run but its checkpoints (adapter, eval, samples, metrics, logs, status)."""

    @abstractmethod
    def fetch_checkpoint(self, step: int, into: Path) -> None:
        """Copy checkpoint-<step> into `into` (resumable: a second call continues a cut copy)."""

    @abstractmethod
    def push_checkpoint(self, checkpoint: Path, step: int, history: list[Path]) -> None:
        """Put a local checkpoint back as checkpoint-<step>, marked complete only once whole,
        with the run's history files (metrics.jsonl, base_eval.json) beside it."""

    @abstractmethod
    def signal(self, job: int, signal_name: str) -> None:
        """TERM: the runner checkpoints and exits 143; KILL: it is gone."""

    def run_tool(self, script: Path, args: list[str], python: str, timeout: float = 3600) -> str:
        """Run a one-file tool (runner/merge_adapter.py: stdlib-only at import) in the run's folder
        with the run's python, to the end; its stdout. A failure raises WorkspaceError with the
        tool's last line. Optional: a target without a shell says so."""
        from launcher.errors import UsageError

        raise UsageError(f"running {script.name} in the run's folder is not supported on this target "
                         f"({type(self).__name__}); run the command here, without --remote")


class ShellWorkspace(Workspace):
    """<workdir>/runs/<run-id>/ on a machine with a POSIX shell."""

    def __init__(self, machine: Machine, folder: str) -> None:
        self.machine = machine
        self.folder = folder
        self.workdir = folder.rsplit("/runs/", 1)[0]

    @classmethod
    def create(cls, machine: Machine, workdir: str, run_id: str) -> "ShellWorkspace":
        """The workspace of a new run (or one moved to a new machine): the workdir resolved there."""
        return cls(machine, f"{resolve_workdir(machine, workdir)}/runs/{run_id}")

    # ---- prepare ----------------------------------------------------------------------------

    def prepare(self, config: LaunchConfig) -> str:
        """Run cluster_templates/bootstrap.sh on the target; returns the python the runner uses."""
        bin_dir = f"{self.workdir}/bin"
        with tempfile.TemporaryDirectory() as staging:
            for file in BOOTSTRAP_FILES:
                shutil.copy2(file, Path(staging) / file.name)
            self.machine.put(Path(staging), bin_dir)  # one transfer for the three files
        env = {"QLORA_WORKDIR": self.workdir, "QLORA_REQUIREMENTS": f"{bin_dir}/requirements.txt",
               "QLORA_DEVICE": "cpu" if config.job.train.device == "cpu" else "cuda"}
        python = config.resources.python
        if python is None and self.machine.is_this_machine and _has_runner_packages():
            python = sys.executable  # the local target trains in the launcher's own environment when it can
        if python:
            env["QLORA_PYTHON"] = python
        line = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        seen = shlex.quote(f"{self.workdir}/{SEEN_FILE}")  # a rented instance's watchdog: the launcher is here
        result = self.machine.run(f"touch {seen}; {line} sh {shlex.quote(bin_dir)}/bootstrap.sh", check=False,
                                  timeout=3600)
        report = next((ln for ln in result.stdout.splitlines() if ln.startswith("QLORA_BOOTSTRAP ")), None)
        if result.returncode != 0 or report is None:
            errors = [ln for ln in (result.stderr + result.stdout).splitlines() if ln.strip()]
            reason = next((ln for ln in reversed(errors) if ln.startswith("bootstrap: error:")),
                          errors[-1] if errors else "")
            detail = next((ln for ln in errors if ln.startswith("stack check:")), "")
            raise PrepareFailed(f"{self.machine.name}: {reason.removeprefix('bootstrap: error: ')}"
                                + (f" ({detail})" if detail else ""))
        return json.loads(report.removeprefix("QLORA_BOOTSTRAP "))["python"]

    def upload(self, config: LaunchConfig) -> None:
        placed = sync.sync_assets(self.machine, self.workdir, sync.local_assets(config))
        self.machine.run(f"mkdir -p {shlex.quote(self.folder)}/checkpoints")
        with tempfile.TemporaryDirectory() as staging:
            (Path(staging) / REMOTE_CONFIG).write_text(sync.remote_config(config, placed))
            shutil.copy2(RUNNER_FILE, Path(staging) / RUNNER_FILE.name)
            self.machine.put(Path(staging), self.folder)

    # ---- run --------------------------------------------------------------------------------

    def start(self, python: str, *, resume: bool, topology: Topology = Topology(),
              env: Optional[Mapping[str, str]] = None) -> int:
        args = ["--config", REMOTE_CONFIG, "--out", ".", *(["--resume", "auto"] if resume else [])]
        settings = {"PYTHONUNBUFFERED": "1", **runner_environment(topology)}  # not secret: on the command line
        # `export` first: a multi-node command line starts by reading the node's file (`. file && ...`).
        command = (f"export {' '.join(f'{k}={shlex.quote(v)}' for k, v in settings.items())}; "
                   + runner_command(python, args, topology, node_env_file=f"{self.workdir}/{NODE_ENV_NAME}"))
        return self.machine.start(command, cwd=self.folder, exit_code_file=EXIT_CODE_FILE, env=env)

    def look(self, job: Optional[int]) -> Look:
        d = shlex.quote(self.folder)
        # No job yet means nothing was started (`kill -0 0` would ask about our own process group).
        alive_check = f"kill -0 {job} 2>/dev/null" if job else "false"
        # Liveness first, then the exit code: the wrapper writes exit_code before it exits, so a
        # wrapper seen dead has written it by the time we read it (the other order has a window).
        # Touching the workdir's SEEN_FILE tells a rented instance's watchdog the launcher is about.
        out = self.machine.run(
            f"mkdir -p {d} && cd {d} && touch ../../{SEEN_FILE} && ({alive_check} && echo alive || echo dead) && "
            f"echo --- && (cat {EXIT_CODE_FILE} 2>/dev/null || echo none) && echo --- && "
            f"for c in checkpoints/checkpoint-*; do [ -f \"$c/{runner_module().MANIFEST}\" ] && echo \"$c\"; done; "
            f"echo --- && (cat status.json 2>/dev/null || echo '{{}}')", timeout=60).stdout
        alive, code, checkpoints, status = (part.strip() for part in out.split("---\n", 3))
        steps = sorted(int(line.rsplit("-", 1)[1]) for line in checkpoints.splitlines() if line.strip())
        try:
            status_json = json.loads(status or "{}")
        except ValueError:
            status_json = {}
        return Look(exit_code=int(code) if code.lstrip("-").isdigit() else None, alive=alive == "alive",
                    complete_steps=steps, status=status_json)

    def stream(self, name: str, *, stop: Callable[[], bool], start_line: int = 0) -> Iterator[str]:
        return self.machine.follow(f"{self.folder}/{name}", start_line=start_line, stop=stop)

    def read(self, name: str) -> str:
        return self.machine.run(f"cat {shlex.quote(self.folder)}/{shlex.quote(name)} 2>/dev/null || true").stdout

    def signal(self, job: int, signal_name: str) -> None:
        self.machine.signal_job(job, signal_name)

    def run_tool(self, script: Path, args: list[str], python: str, timeout: float = 3600) -> str:
        self.machine.put(script, f"{self.folder}/{script.name}")
        command = (f"cd {shlex.quote(self.folder)} && PYTHONUNBUFFERED=1 {shlex.quote(python)} "
                   f"{shlex.quote(script.name)} {' '.join(map(shlex.quote, args))}")
        return self.machine.run(command, timeout=timeout).stdout

    # ---- files back and forth ---------------------------------------------------------------

    def fetch_results(self, local_dir: Path) -> None:
        self.machine.get(f"{self.folder}/", local_dir, exclude=NOT_RESULTS)

    def fetch_checkpoint(self, step: int, into: Path) -> None:
        self.machine.get(f"{self.folder}/checkpoints/checkpoint-{step}/", into)

    def push_checkpoint(self, checkpoint: Path, step: int, history: list[Path]) -> None:
        for path in history:
            self.machine.put(path, f"{self.folder}/{path.name}")
        root = f"{self.folder}/checkpoints"
        self.machine.put(checkpoint, f"{root}/.incoming/checkpoint-{step}")
        self.machine.run(f"cd {shlex.quote(root)} && rm -rf checkpoint-{step} && "
                         f"mv .incoming/checkpoint-{step} checkpoint-{step}")


def resolve_workdir(machine: Machine, workdir: str) -> str:
    """The workdir as an absolute path on the machine (`~` expanded there, by its shell)."""
    quoted = shell_path(workdir)
    out = machine.run(f"mkdir -p {quoted} && cd {quoted} && pwd -P", timeout=60).stdout.strip().splitlines()
    return out[-1]


def _has_runner_packages() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(n) for n in ("torch", "transformers", "peft", "bitsandbytes", "accelerate"))
