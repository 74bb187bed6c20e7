"""On a rented machine: when no job runs here and the launcher has not looked in for
QLORA_WATCHDOG_IDLE_S, the machine must stop billing (a vanished laptop must not leave a GPU on).
What "stop" is depends on the provider (QLORA_WATCHDOG_ON_IDLE):

- `stop-vast` (Vast.ai, started by the instance's on-start: Vast has no autostop): stop the
  instance through Vast's API. Stopped, not destroyed: the disk keeps the results until `launch
  pull` / `launch down` fetches them (a stopped instance bills its disk only, cents a day). It
  uses the instance-scoped key Vast puts in the container (CONTAINER_API_KEY, CONTAINER_ID),
  never the user's account key.
- `exit` (a SkyPilot cluster, where this is the SkyPilot job's run command): just end. SkyPilot's
  autostop counts idleness by its own job queue, and a runner we start over SSH is not in it; this
  job is, for as long as the runner trains or the launcher looks in. Once it ends, the cluster's
  autodown tears the cluster down after resources.sky.idle_minutes.

Standard library only: it runs before any venv exists."""

import json
import os
import sys
import time
import urllib.request
from pathlib import Path

WORKDIR = Path(os.path.expanduser(os.environ.get("QLORA_WORKDIR", "~/qlora-launch")))
SEEN = WORKDIR / ".launcher-seen"  # touched by the launcher at every look
IDLE_S = float(os.environ.get("QLORA_WATCHDOG_IDLE_S", "1800"))
URL = os.environ.get("QLORA_VAST_URL", "https://console.vast.ai").rstrip("/")
ON_IDLE = os.environ.get("QLORA_WATCHDOG_ON_IDLE", "stop-vast")  # stop-vast | exit
PID_FILE = os.environ.get("QLORA_WATCHDOG_PID_FILE")  # written so the launcher can tell this one runs
# Only a job keeps the instance up past the idle time: a venv build (the on-start's, or the
# launcher's, which touches SEEN as it starts) that hangs must not keep a GPU billing forever.
BUSY = (b"qlora_runner.py",)


def busy() -> bool:
    """A runner of ours runs here: its command line names the runner and it runs in our workdir
    (a process whose folder cannot be read counts too: better billing on than a killed job)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if any(word in cmdline for word in BUSY) and _in_workdir(entry):
                return True
    return False


def _in_workdir(entry: Path) -> bool:
    try:
        cwd = Path(os.readlink(entry / "cwd"))
    except OSError:
        return True
    return cwd == WORKDIR.resolve() or WORKDIR.resolve() in cwd.parents


def stop_instance() -> bool:
    instance, key = os.environ.get("CONTAINER_ID"), os.environ.get("CONTAINER_API_KEY")
    if not instance or not key:
        print("watchdog: no CONTAINER_ID / CONTAINER_API_KEY here; cannot stop the instance", flush=True)
        return True  # nothing we can do; do not spin
    request = urllib.request.Request(f"{URL}/api/v0/instances/{instance}/", method="PUT",
                                     data=json.dumps({"state": "stopped"}).encode(),
                                     headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return 200 <= reply.status < 300
    except OSError as e:
        print(f"watchdog: stopping failed ({e}); trying again", flush=True)
        return False


def main() -> int:
    started = time.time()
    poll = max(1.0, min(60.0, IDLE_S / 4))
    if PID_FILE:
        Path(PID_FILE).expanduser().parent.mkdir(parents=True, exist_ok=True)
        Path(PID_FILE).expanduser().write_text(str(os.getpid()))
    what = "ends" if ON_IDLE == "exit" else "stops this instance"
    print(f"watchdog: {what} after {IDLE_S:.0f} s without a job and without the launcher", flush=True)
    while True:
        time.sleep(poll)
        try:
            seen = SEEN.stat().st_mtime
        except OSError:
            seen = started
        idle = time.time() - max(seen, started)
        if idle > IDLE_S and not busy():
            if ON_IDLE == "exit":
                print(f"watchdog: idle {idle:.0f} s with no job running: ending (the cluster's autostop follows)",
                      flush=True)
                return 0
            print(f"watchdog: idle {idle:.0f} s with no job running: stopping the instance", flush=True)
            if stop_instance():
                return 0


if __name__ == "__main__":
    sys.exit(main())
