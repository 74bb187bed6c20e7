"""Ctrl-C acts at once, whatever the launcher waits on: `launch` is run as a subprocess (its
real main(), with one command swapped for a wait of the kind the lifecycle does: a command on
the target, an rsync, a `tail -F` of a run's file), SIGINTed while it waits, and must exit 130
within a few seconds with its output pipe closed (no process of ours left holding it), and
leave none of the processes it started behind. Both with SIGINT as a terminal leaves it and
with SIGINT ignored, as every background job of a non-interactive shell starts (a CI script's
`pytest &`): Python keeps an inherited SIG_IGN, and the launcher then never saw Ctrl-C at all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT

LIMIT_S = 3.0  # from SIGINT to exit and end of output; generous for a loaded 2-core machine

DRIVER = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from launcher import cli
    from launcher.remote import LocalMachine

    mode, folder = sys.argv[1], Path(sys.argv[2])

    def wait(*args):
        machine = LocalMachine()
        print("waiting", flush=True)
        if mode == "run":  # a command on the target that takes long, with a child of its own
            machine.run(f"sleep 61 & echo $! >> {folder}/pids; echo $$ >> {folder}/pids; sleep 61", timeout=120)
        elif mode == "get":  # an rsync that takes long (a fake one, with a child of its own)
            machine.get(str(folder / "nothing"), folder / "copy")
        else:  # following a run's file
            for _ in machine.follow(str(folder / "metrics.jsonl")):
                pass
        return 0

    cli.COMMAND_FUNCTIONS["runs"] = wait
    sys.exit(cli.main(["runs"]))
""")

FAKE_RSYNC = """#!/bin/sh
sleep 62 &
echo $! >> "{folder}/pids"
echo $$ >> "{folder}/pids"
exec sleep 62
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _tails_of(path: Path) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(b"tail") and str(path).encode() in argv:
                found.append(int(entry.name))
    return found


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads processes from /proc (Linux)")
@pytest.mark.parametrize("inherited", ["default", "ignored"])
@pytest.mark.parametrize("mode", ["run", "get", "follow"])
def test_ctrl_c_ends_the_wait_at_once_and_leaves_nothing_running(tmp_path: Path, mode: str, inherited: str):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "rsync").write_text(FAKE_RSYNC.format(folder=tmp_path))
    (bin_dir / "rsync").chmod(0o755)
    (tmp_path / "driver.py").write_text(DRIVER)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "QLORA_LAUNCH_HOME": str(tmp_path / "home"),
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}"}
    proc = subprocess.Popen([sys.executable, str(tmp_path / "driver.py"), mode, str(tmp_path)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=_ignore_sigint if inherited == "ignored" else None)
    started: list[int] = []
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "waiting"
        deadline = time.monotonic() + 30  # until the wait has really begun (its processes are there)
        while not started and time.monotonic() < deadline:
            time.sleep(0.05)
            started = _started_by(mode, tmp_path)
        time.sleep(0.3)
        assert started and all(map(_alive, started))

        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=20)  # (the bound is asserted below; this only stops a hang)
        except subprocess.TimeoutExpired:
            pytest.fail("the launcher had not exited (or its output had not ended) 20 s after SIGINT")
        took = time.monotonic() - sent
        assert proc.returncode == 130, err
        assert "interrupted" in err
        assert took < LIMIT_S, f"exit and end of output {took:.1f} s after SIGINT"
        deadline = time.monotonic() + LIMIT_S
        while any(map(_alive, started)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [pid for pid in started if _alive(pid)], "left running after Ctrl-C"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in started:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _started_by(mode: str, folder: Path) -> list[int]:
    """The processes the wait started: the tail of the followed file, or what the command or
    the fake rsync recorded (itself and its child), once both are there."""
    if mode == "follow":
        return _tails_of(folder / "metrics.jsonl")
    pids = (folder / "pids").read_text().split() if (folder / "pids").is_file() else []
    return [int(p) for p in pids] if len(pids) == 2 else []
