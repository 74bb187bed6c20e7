"""What cannot run without a cloud account, checked by a user who has one: the tiny job launched on
the cheapest GPU of one cloud through SkyPilot, for real, with a hard cap of $0.50, then SkyPilot
asked whether anything of ours is left.

    pip install 'qlora-launch[sky]' && sky check aws
    python benchmarks/sky_real_cloud.py --cloud aws            # on demand
    python benchmarks/sky_real_cloud.py --cloud aws --spot     # spot (may be preempted: the run moves on)

It prints one table: the cloud, the machine the plan chose, its catalog $/h, the run's phases and
wall time, its $ (catalog price x uptime), the run's status, and the clusters with our prefix
that SkyPilot still lists afterwards (must be none). It also checks that autodown was armed on the
cluster while it ran (`sky status` shows the autostop minutes and "down"). Exit 0 only when the
run is done, cost under the cap, and nothing is left.

Not run in the test suite (it rents a real machine); the README quotes what users measured."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from launcher.providers.sky_task import CLUSTER_PREFIX  # noqa: E402

CAP_USD = 0.50


def tiny_gpu_job(folder: Path, cloud: str, spot: bool) -> Path:
    """The embedded tiny job, trained on the GPU, renting on `cloud` only, capped at CAP_USD."""
    config = yaml.safe_load((ROOT / "configs" / "tiny-cpu.yaml").read_text())
    base = ROOT / "configs"
    config["model"]["base"] = str((base / config["model"]["base"]).resolve())
    config["data"]["path"] = str((base / config["data"]["path"]).resolve())
    config["train"]["device"] = "auto"
    config["resources"] = {"providers": [cloud], "interruptible": spot, "max_total_usd": CAP_USD,
                           "sky": {"clouds": [cloud], "idle_minutes": 5}}
    path = folder / "tiny-gpu.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def our_clusters() -> list[dict]:
    import sky

    records = sky.get(sky.status([f"{CLUSTER_PREFIX}*"], refresh=sky.StatusRefreshMode.FORCE))
    return [{"name": r.name, "status": str(r.status.value), "autostop": r.autostop, "to_down": r.to_down}
            for r in records]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cloud", default="aws", help="a cloud `sky check` shows enabled (aws, gcp, lambda, ...)")
    parser.add_argument("--spot", action="store_true", help="rent spot (default: on demand)")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="sky-real-"))
    config = tiny_gpu_job(folder, args.cloud, args.spot)
    plan = json.loads(subprocess.run([sys.executable, "-m", "launcher", "plan", "--config", str(config), "--json"],
                                     capture_output=True, text=True, check=True).stdout)
    chosen = plan["offers"][plan["choice"]]
    seen_while_running: list[dict] = []

    def watch() -> None:  # autodown armed while the cluster is up
        while not done.is_set():
            try:
                seen_while_running.extend(our_clusters())
            except Exception:  # noqa: BLE001  (a status call can fail mid-launch; the next one counts)
                pass
            done.wait(30)

    done = threading.Event()
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    start = time.time()
    run = subprocess.run([sys.executable, "-m", "launcher", "--config", str(config), "--yes",
                          "--runs-dir", str(folder / "runs")], text=True)
    wall = time.time() - start
    done.set()
    report = json.loads(subprocess.run([sys.executable, "-m", "launcher", "status", "--json"],
                                       capture_output=True, text=True).stdout or "{}")
    status = {"status": (report.get("run") or {}).get("status"), "spent_usd": report.get("spent_usd")}
    left = our_clusters()
    armed = [c for c in seen_while_running if c["to_down"] and c["autostop"] and c["autostop"] > 0]
    spent = status["spent_usd"]
    rows = [("cloud", args.cloud), ("machine", f"{chosen['instance_type']} in {chosen['region']} "
                                               f"({'spot' if args.spot else 'on demand'})"),
            ("catalog $/h", f"{chosen['usd_per_hour']:.3f}"), ("launch exit code", str(run.returncode)),
            ("run status", str(status.get("status"))), ("wall time", f"{wall / 60:.1f} min"),
            ("$ (catalog x uptime)", f"{spent}"), ("autodown seen armed", "yes" if armed else "NO"),
            ("our clusters left", ", ".join(c["name"] for c in left) or "none")]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    ok = run.returncode == 0 and not left and armed and (spent is None or float(spent) < CAP_USD)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
