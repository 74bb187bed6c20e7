"""Fixtures of the launcher's end-to-end tests: a real sshd on 127.0.0.1, and `launch` run as
the user runs it (a subprocess, so it can be killed like one)."""

from __future__ import annotations

import getpass
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

from launcher.runs import RunRecord, RunStore
from tests.fakes.vast_api import ACCOUNT_KEY, FakeVast
from tests.helpers import ROOT, tiny_job, uninterrupted_losses
from tests.sshd import SSHD, SSHServer, start_sshd


@pytest.fixture(scope="session")
def sshd(tmp_path_factory) -> SSHServer:
    if not Path(SSHD).exists():
        pytest.fail(f"{SSHD} is missing: the SSH target's tests need a real OpenSSH server "
                    "(apt install openssh-server rsync; .ci/run installs them)")
    server = start_sshd(tmp_path_factory.mktemp("sshd"))
    yield server
    server.stop()


@dataclass
class Launcher:
    """`launch` with its own state directory and runs folder, as a subprocess."""

    folder: Path

    @property
    def home(self) -> Path:
        return self.folder / "home"

    @property
    def runs_dir(self) -> Path:
        return self.folder / "runs"

    def env(self, **extra: str) -> dict[str, str]:
        return {"PYTHONPATH": str(ROOT), "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "COLUMNS": "200",
                "QLORA_LAUNCH_HOME": str(self.home), "HF_HUB_OFFLINE": "1", "HOME": os.environ.get("HOME", "/root"),
                **extra}

    def argv(self, *args: str) -> list[str]:
        command_first = args and not args[0].startswith("-")
        runs = [] if command_first else ["--runs-dir", str(self.runs_dir)]
        return [sys.executable, "-m", "launcher", *args, *runs]

    def run(self, *args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(*args), cwd=self.folder, capture_output=True, text=True, timeout=timeout,
                              env=self.env(**env))

    def start(self, *args: str, **env: str) -> subprocess.Popen:
        return subprocess.Popen(self.argv(*args), cwd=self.folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=self.env(**env))

    def records(self) -> list[RunRecord]:
        path = self.home / "runs.sqlite"
        if not path.exists():
            return []
        store = RunStore(path)
        try:
            return store.list()
        finally:
            store.close()

    def wait_for(self, condition: Callable[[RunRecord], bool], timeout: float = 120) -> RunRecord:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            records = self.records()
            if records and condition(records[0]):
                return records[0]
            if records and records[0].status in ("failed", "done", "stopped"):
                raise AssertionError(f"the run ended before the condition held: {records[0]}")
            time.sleep(0.2)
        raise AssertionError(f"timed out; the newest record is {self.records()[:1]}")


@pytest.fixture
def launcher(tmp_path) -> Launcher:
    return Launcher(tmp_path)


VAST_CATALOG = ROOT / "catalogs" / "v8" / "vast" / "vms.csv"
STEPS_60 = {"max_steps": 60, "save_every": 10, "eval_every": 20}  # the launcher tests' job: several seconds


@pytest.fixture(scope="session")
def reference_losses_60(tmp_path_factory) -> dict[int, float]:
    """The runner's own uninterrupted run of the tiny job with STEPS_60 (where it runs and what
    resources say change nothing in training): what every launched, faulted, resumed run of it
    must match at every step."""
    folder = tmp_path_factory.mktemp("reference-60")
    return uninterrupted_losses(tiny_job(folder / "job.yaml", train=STEPS_60), folder / "out")


@pytest.fixture
def vast(tmp_path) -> FakeVast:
    """The fake Vast.ai API; the test fails if it leaves an instance alive."""
    fake = FakeVast(VAST_CATALOG, tmp_path / "vast", loading_s=0.3).start()
    yield fake
    alive = fake.alive()
    fake.stop()
    assert alive == [], f"instances still alive on the fake Vast.ai at the end of the test: {alive}"


class VastLauncher(Launcher):
    """`launch` pointed at the fake through the vastai client's own settings."""

    fake: FakeVast

    def env(self, **extra: str) -> dict[str, str]:
        return super().env(**{"VAST_URL": self.fake.url, "VAST_API_KEY": ACCOUNT_KEY,
                               "QLORA_LAUNCH_VAST_SSH_USER": getpass.getuser(), "QLORA_LAUNCH_VAST_POLL_S": "0.2",
                               **extra})


@pytest.fixture
def vast_launcher(tmp_path, vast) -> VastLauncher:
    runner = VastLauncher(tmp_path)
    runner.fake = vast
    return runner


def ssh_args(server: SSHServer, *extra: str) -> list[str]:
    """--target and friends for the test sshd; the runner uses this test's own Python."""
    return ["--target", server.target, "--identity", str(server.client_key), "--python", sys.executable, *extra]


def output_of(proc: Any) -> str:
    return (proc.stdout or "") + (proc.stderr or "")


def runner_step(remote_dir: Optional[str]) -> int:
    """The runner's own step count, read from its status.json on the "remote" side."""
    import json

    try:
        return json.loads((Path(remote_dir) / "status.json").read_text()).get("step") or 0
    except (OSError, ValueError, TypeError):
        return 0
