"""Ctrl-C while following a run over SSH (the test sshd on 127.0.0.1): the launcher detaches
at once, and what it started to follow the run ends with it (the ssh client of its `tail -F`,
and that tail on the target); the job itself goes on, and `launch down` then stops it.
(tests/unit/test_sigint.py holds each kind of wait to the same promise, locally.)"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from tests.helpers import processes_naming, tiny_job
from tests.integration.conftest import Launcher, output_of, runner_step, ssh_args

LIMIT_S = 5.0  # from SIGINT to the launcher's exit and the end of its output (generous: a loaded machine)


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads processes from /proc (Linux)")
def test_ctrl_c_over_ssh_detaches_at_once_and_ends_the_tail_on_both_sides(launcher: Launcher, sshd):
    config = tiny_job(launcher.folder / "job.yaml", train={"max_steps": 400, "save_every": 50, "eval_every": 100},
                      resources={"workdir": str(launcher.folder / "remote")})
    proc = launcher.start("--config", str(config), *ssh_args(sshd), "--yes")
    record = None
    try:
        record = launcher.wait_for(lambda r: r.status == "running" and runner_step(r.remote_dir) >= 3, timeout=300)
        metrics = f"{record.remote_dir}/metrics.jsonl"
        deadline = time.monotonic() + 30
        while len(processes_naming(metrics)) < 2 and time.monotonic() < deadline:  # our ssh, the tail there
            time.sleep(0.1)
        assert len(processes_naming(metrics)) >= 2, "no tail of metrics.jsonl over ssh"

        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        took = time.monotonic() - sent
        assert proc.returncode == 130, out[-2000:]
        assert f"run {record.id} is still running on {record.target}" in out
        assert took < LIMIT_S, f"exit and end of output {took:.1f} s after SIGINT"
        deadline = time.monotonic() + LIMIT_S
        while processes_naming(metrics) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not processes_naming(metrics), "the tail (or its ssh) outlived the launcher"
        assert launcher.records()[0].status == "running"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if record is not None:
            down = launcher.run("down", record.id)
            assert down.returncode == 0, output_of(down)
