"""Running one benchmark child process and measuring it, shared by the benchmarks that time the
runner in a child (runner_overhead.py, storage.py): the child's own rusage, reaped with os.wait4
(RUSAGE_CHILDREN would hold the maximum RSS over every child waited for so far), a watchdog that
kills a child that hangs, and the host's busy CPU time from /proc/stat, so a caller can say how
much of the machine other processes took meanwhile."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
CHILD_TIMEOUT_S = 600


@dataclass
class ChildUsage:
    wall_s: float
    cpu_s: float  # the child's user + system
    peak_rss_mib: float  # the child's alone
    host_busy_s: float  # CPU seconds the host was busy meanwhile: every process, hypervisor steal included


def host_busy_cpu_s() -> float:
    """CPU seconds since boot that the host's CPUs were busy or, in a VM, stolen by the hypervisor
    (/proc/stat): either way not available to a benchmark that wants every core."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of another running process (/proc/PID/stat), e.g. a server child."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def run_child(command: list[str], log_path: Path, env: Optional[dict[str, str]] = None,
              timeout_s: float = CHILD_TIMEOUT_S) -> ChildUsage:
    """Run `command` (in the repository root, output to log_path) to completion and measure it;
    RuntimeError with the log's tail when it exits non-zero."""
    started, busy_before = time.monotonic(), host_busy_cpu_s()
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        watchdog = threading.Timer(timeout_s, process.kill)
        watchdog.start()
        try:
            _, status, usage = os.wait4(process.pid, 0)
        finally:
            watchdog.cancel()
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait again
    wall = time.monotonic() - started
    if process.returncode != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-20:])
        raise RuntimeError(f"{Path(command[1]).name} exited with {process.returncode}:\n{tail}")
    # Linux reports ru_maxrss in KiB.
    return ChildUsage(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, host_busy_cpu_s() - busy_before)


def wait_for_quiet_host(busy_cores: float, max_wait_s: float, sample_s: float = 3.0) -> float:
    """Wait (up to max_wait_s) until the host's busy CPU over `sample_s` is below busy_cores, so a
    timed child does not start in the middle of someone else's job; returns the last sample, in cores."""
    deadline = time.monotonic() + max_wait_s
    while True:
        before = host_busy_cpu_s()
        time.sleep(sample_s)
        cores = (host_busy_cpu_s() - before) / sample_s
        if cores < busy_cores or time.monotonic() >= deadline:
            return cores
