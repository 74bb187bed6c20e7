"""Run a job on this machine: the runner in a child process, its output on our terminal.

The local target of the next milestone (providers/local.py) grows out of this; for now it is
the whole launch path: make a run folder, start the runner, wait, report."""

from __future__ import annotations

import importlib.util
import json
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from launcher.paths import RUNNER_FILE
from launcher.runs import RunRecord, RunStore

RUNNER_PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "datasets", "accelerate")


class LocalTargetError(Exception):
    """The local target cannot run the job; the message says how to fix it."""


@dataclass
class RunResult:
    run_dir: Path
    exit_code: int
    status: dict[str, Any]
    evaluation: Optional[dict[str, Any]]
    samples: list[dict[str, Any]]


def new_run_id(config: Path) -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{config.stem}-{secrets.token_hex(2)}"


def check_runner_packages() -> None:
    missing = [name for name in RUNNER_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise LocalTargetError(
            f"the local target trains in this Python, which lacks {', '.join(missing)}: "
            "pip install -e '.[runner]' -c constraints/cpu.txt (CPU) or pip install -r runner/requirements.txt"
        )


def run_locally(config: Path, runs_dir: Path, store: RunStore, debug: bool = False) -> RunResult:
    """Train `config` on this machine into runs_dir/<run-id>/ and return what it produced; the
    run record follows each transition. Ctrl-C reaches the runner too (same process group):
    it saves a checkpoint and exits 130."""
    check_runner_packages()
    run_id = new_run_id(config)
    run_dir = runs_dir / run_id
    run_dir.mkdir(parents=True)
    store.create(RunRecord(id=run_id, config_path=str(config), run_dir=str(run_dir), target="local"))
    command = [sys.executable, str(RUNNER_FILE), "--config", str(config), "--out", str(run_dir)]
    if debug:
        command.append("--debug")
    child = subprocess.Popen(command)
    store.update(run_id, status="running")
    try:
        exit_code = child.wait()
    except KeyboardInterrupt:
        # The runner got the same SIGINT and is saving a checkpoint: wait for it to finish.
        exit_code = _wait_after_interrupt(child)
    result = collect(run_dir, exit_code)
    store.update(run_id, status=run_status(exit_code), exit_code=exit_code, ended_at=time.time(),
                 step=result.status.get("step"), total_steps=result.status.get("total_steps"),
                 error=result.status.get("error"))
    return result


def run_status(exit_code: int) -> str:
    """The runner's exit code as a run record status."""
    return {0: "done", 143: "preempted", 130: "interrupted"}.get(exit_code, "failed")


def _wait_after_interrupt(child: subprocess.Popen) -> int:
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not orphan it
    try:
        return child.wait()
    finally:
        signal.signal(signal.SIGINT, previous)


def collect(run_dir: Path, exit_code: int) -> RunResult:
    return RunResult(
        run_dir=run_dir,
        exit_code=exit_code,
        status=_read_json(run_dir / "status.json") or {},
        evaluation=_read_json(run_dir / "eval.json"),
        samples=_read_jsonl(run_dir / "samples.jsonl"),
    )


def _read_json(path: Path) -> Optional[dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return []
