"""On a rented Vast.ai instance, started by its on-start command: Vast has no autostop, so when no
job runs here and the launcher has not looked in for QLORA_WATCHDOG_IDLE_S, this stops the
instance itself (a vanished laptop must not leave a GPU billing). Stopped, not destroyed: the
disk keeps the results until `launch pull` / `launch down` fetches them (a stopped instance
bills its disk only, cents a day).

It uses the instance-scoped key Vast puts in the container (CONTAINER_API_KEY, CONTAINER_ID),
never the user's account key. Standard library only: it runs before any venv exists."""

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
# Only a job keeps the instance up past the idle time: a venv build (the on-start's, or the
# launcher's, which touches SEEN as it starts) that hangs must not keep a GPU billing forever.
BUSY = (b"qlora_runner.py",)


def busy() -> bool:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if any(word in cmdline for word in BUSY):
                return True
    return False


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
    print(f"watchdog: stops this instance after {IDLE_S:.0f} s without a job and without the launcher", flush=True)
    while True:
        time.sleep(poll)
        try:
            seen = SEEN.stat().st_mtime
        except OSError:
            seen = started
        idle = time.time() - max(seen, started)
        if idle > IDLE_S and not busy():
            print(f"watchdog: idle {idle:.0f} s with no job running: stopping the instance", flush=True)
            if stop_instance():
                return 0


if __name__ == "__main__":
    sys.exit(main())
