"""One launcher follows a run at a time. Two followers of one run would both pull into its
folder, both recover a lost machine (two machines rented for one run) and both release it; the
second `launch attach` / `launch resume` is told who follows instead.

An flock on a file per run in the state directory: the kernel drops it when its holder exits,
however it exits (a launcher killed with SIGKILL leaves no stale lock for `launch attach`).
It guards the launchers of this laptop's state directory only: a launcher on another laptop
keeps records of its own."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from pathlib import Path
from typing import Iterator

from launcher import clock
from launcher.errors import EXIT_USAGE
from launcher.runs import private_folder, state_dir


class AlreadyFollowed(Exception):
    exit_code = EXIT_USAGE


def lock_path(run_id: str) -> Path:
    return state_dir() / "following" / f"{run_id}.lock"


@contextlib.contextmanager
def following(run_id: str) -> Iterator[None]:
    """Hold the run's follow lock for the block, or AlreadyFollowed naming its holder."""
    path = lock_path(run_id)
    private_folder(path.parent)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AlreadyFollowed(f"run {run_id} is already followed by {_holder(path)}; watch it with "
                                  f"`launch logs -f {run_id}`, or stop that launcher first (Ctrl-C detaches "
                                  f"it), then `launch attach {run_id}`") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "since": clock.now()}).encode())
        yield
    finally:
        os.close(fd)  # releases the lock


def _holder(path: Path) -> str:
    try:
        held = json.loads(path.read_text())
        since = time.strftime("%H:%M:%S", time.localtime(held["since"]))
        return f"another launcher (pid {held['pid']}, since {since})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another launcher"
