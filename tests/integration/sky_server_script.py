"""The SkyPilot side of tests/integration/test_sky_server.py, run as its own process: the test sets
HOME, SKY_RUNTIME_DIR, SKYPILOT_API_SERVER_LOCAL_PORT (and the rest of the isolation) before this
imports `sky`, so the API server SkyPilot spawns from here inherits them.

    python tests/integration/sky_server_script.py RESULT.json

It starts the API server through our SkyServer, seeds the enabled clouds after the server's
on-boot check, plans `--gpu A10G` with our planner, asks SkyPilot's optimizer (through the server)
for the unpinned request, dry-runs our pinned task, lists the clusters and stops the server; then
starts one it gives up waiting for (timeout_s=0.5) and checks that stop_our_server stops it.
Everything it saw goes to RESULT.json, written after every step (a failure or a kill leaves what
was seen so far); the test makes the assertions. It never raises past main: an error is recorded
as "error" with its traceback, and the server we started is stopped in any case."""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

IMAGE_TAG = "skypilot:custom-gpu-ubuntu"
CLUSTER = "qlora-dryrun-test"
PORT = int(os.environ["SKYPILOT_API_SERVER_LOCAL_PORT"])
STARTED = time.monotonic()
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

result: dict[str, Any] = {"port": PORT}
OUT: Optional[Path] = None


def note(key: str, value: Any) -> Any:
    result[key] = value
    if OUT is not None:
        OUT.write_text(json.dumps(result, indent=1, default=str))
    print(f"[{time.monotonic() - STARTED:6.1f} s] {key}: {value}", flush=True)
    return value


def health() -> Optional[dict]:
    """What answers GET /api/health on the isolated port (plain http.client: no proxy, no SDK)."""
    connection = http.client.HTTPConnection("127.0.0.1", PORT, timeout=5)
    try:
        connection.request("GET", "/api/health")
        response = connection.getresponse()
        body = response.read().decode(errors="replace")
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = body[:200]
        return {"http_status": response.status, "body": parsed}
    except OSError:
        return None
    finally:
        connection.close()


def listening_pids() -> list[int]:
    import psutil

    return sorted({c.pid for c in psutil.net_connections(kind="tcp")
                   if c.laddr and c.laddr.port == PORT and c.status == psutil.CONN_LISTEN and c.pid})


def server_processes() -> list[int]:
    """SkyPilot API server processes on our port (as `sky api stop` finds them: by command line)."""
    import psutil

    found = []
    for process in psutil.process_iter(attrs=["pid", "cmdline"]):
        command = " ".join(process.info["cmdline"] or [])
        if "sky.server.server" in command and f"--port={PORT}" in command:
            found.append(process.info["pid"])
    return sorted(found)


def plain(text: str) -> str:
    return ANSI.sub("", text)


def chosen_row(text: str) -> Optional[dict]:
    """The optimizer table's chosen row: ' AWS (us-east-1)   g5.xlarge   4   16   A10G:1   1.01   ✔'."""
    for line in plain(text).splitlines():
        if "✔" not in line:
            continue
        cells = [cell for cell in re.split(r"\s{2,}", line.replace("✔", "").strip()) if cell]
        match = re.fullmatch(r"(\S+) \((\S+)\)", cells[0]) if cells else None
        if match and len(cells) >= 6:
            return {"cloud": match.group(1), "region": match.group(2), "instance_type": cells[1],
                    "gpus": cells[4], "cost": cells[5], "line": line.strip()}
    return None


def main() -> None:
    from launcher import planning
    from launcher.config import load
    from launcher.providers import sky_client, sky_task

    note("answers_before", health())

    # 1. Our SkyServer starts SkyPilot's API server on the isolated port, then reuses it.
    sky = sky_client.import_sky()
    from sky.client import sdk

    starts: list[float] = []
    real_start = sdk.api_start

    def counted_start(*args: Any, **kwargs: Any) -> Any:
        starts.append(time.monotonic())
        return real_start(*args, **kwargs)

    sdk.api_start = counted_start
    said: list[str] = []
    began = time.monotonic()
    sky = sky_client.SkyServer(timeout_s=90, log=said.append).ensure()
    note("first_ensure", {"seconds": round(time.monotonic() - began, 1), "api_start_calls": len(starts),
                          "started_here": sky_client.SkyServer._started_here, "said": said,
                          "port_env": os.environ.get(sky_client.PORT_ENV)})
    note("answers_after_start", health())
    note("listening_after_start", listening_pids())
    note("server_processes_after_start", server_processes())
    began = time.monotonic()
    sky_client.SkyServer(timeout_s=90, log=said.append).ensure()
    note("second_ensure", {"seconds": round(time.monotonic() - began, 1), "api_start_calls": len(starts),
                           "said": said})
    note("listening_after_second", listening_pids())
    note("server_processes_after_second", server_processes())

    # 2. The server's on-boot `sky check` first (it rewrites the enabled clouds), then the seed,
    # in the same state database (same HOME and SKY_RUNTIME_DIR as the server's).
    from sky import check, global_user_state, skypilot_config
    from sky.clouds.cloud import CloudCapability
    from sky.server import constants as server_constants

    began = time.monotonic()
    try:
        outcome = sky_client.bounded("the on-boot check", lambda: sky.get(server_constants.ON_BOOT_CHECK_REQUEST_ID), 120)
        boot = {"result": outcome}
    except Exception as e:  # noqa: BLE001  (no credentials: the check may end in an error; it has ended)
        boot = {"error": f"{type(e).__name__}: {sky_client.first_line(e)}"}
    statuses = sky.api_status([server_constants.ON_BOOT_CHECK_REQUEST_ID])
    boot.update(seconds=round(time.monotonic() - began, 1),
                status=[str(getattr(s, "status", s)) for s in statuses])
    workspace = skypilot_config.get_active_workspace()
    boot["enabled_after_check"] = [str(c) for c in global_user_state.get_cached_enabled_clouds(
        CloudCapability.COMPUTE, workspace)]
    note("boot_check", boot)
    global_user_state.set_allowed_clouds(check._get_workspace_allowed_clouds(workspace), workspace)
    global_user_state.set_enabled_clouds(["AWS"], CloudCapability.COMPUTE, workspace)
    note("enabled_seen_by_server", sky_client.bounded("enabled clouds", lambda: sky.get(sdk.enabled_clouds()), 60))

    # 3. (the test wrote $SKY_RUNTIME_DIR/.sky/catalogs/v8/aws/images.csv) 4. Our plan.
    config = load(ROOT / "configs" / "mistral-7b-qlora.yaml",
                  {"gpu": "A10G", "interruptible": False, "providers": ["aws"]})
    plan = planning.compute_plan(config, [], lambda text: None)
    offer = plan.rows[plan.choice].offer
    tied = [row.offer.region for row in plan.rows if row.fits and row.offer.instance_type == offer.instance_type
            and row.offer.usd_per_hour == offer.usd_per_hour and not row.offer.interruptible]
    note("plan", {"provider": offer.provider, "region": offer.region, "instance_type": offer.instance_type,
                  "usd_per_hour": offer.usd_per_hour, "gpu": offer.gpu, "gpu_count": offer.gpu_count,
                  "interruptible": offer.interruptible, "same_price_regions": tied})

    # 5. SkyPilot's optimizer, through the server, on the unpinned request.
    with sky.Dag() as dag:
        task = sky.Task(name="qlora-optimize-test", run="echo hi")
        task.set_resources(sky.Resources(infra="aws", accelerators={"A10G": 1}, use_spot=False, image_id=IMAGE_TAG))
    began = time.monotonic()
    stream = io.StringIO()
    sky_client.bounded("optimize", lambda: sky.stream_and_get(sky.optimize(dag), output_stream=stream), 120)
    text = stream.getvalue()
    chosen = chosen_row(text)
    if chosen:  # the table rounds to cents: SkyPilot's own exact price of what it chose
        chosen["usd_per_hour"] = sky.Resources(infra=f"aws/{chosen['region']}",
                                               instance_type=chosen["instance_type"]).get_cost(3600)
    note("optimize", {"seconds": round(time.monotonic() - began, 1), "chosen": chosen,
                      "output_tail": plain(text)[-3000:]})

    # 6. Our pinned task dry-runs through the server, with autodown armed as the provider arms it.
    from sky.skylet import autostop_lib

    # The dry run asks EC2 for the root device of the image our tag resolves to (the fake AMI of
    # images.csv): with no credentials boto's client creation is retried with backoff for ~45 s,
    # then SkyPilot uses its default, /dev/sda1. SkyPilot caches that answer in its kv cache (same
    # state folder as the server's): given here, so no boto call is made.
    from sky.adaptors import aws as aws_adaptor
    from sky.catalog import aws_catalog
    from sky.utils.db import kv_cache

    ami = aws_catalog.get_image_id_from_tag(IMAGE_TAG, offer.region)
    kv_cache.add_or_update_cache_entry(
        f"aws:ami:root_device_name:{aws_adaptor.get_workspace_profile()}:{offer.region}:{ami}", "/dev/sda1",
        time.time() + 3600)
    note("root_device_seeded", {"region": offer.region, "ami": ami})
    pinned = sky_task.build_task(sky, offer, workdir="~/qlora-launch", watchdog_idle_s=1800, disk_gb=100,
                                 image_id=IMAGE_TAG)
    began = time.monotonic()
    stream = io.StringIO()
    try:
        returned = sky_client.bounded("the dry run", lambda: sky.stream_and_get(
            sky.launch(pinned, cluster_name=CLUSTER, dryrun=True, idle_minutes_to_autostop=10, down=True,
                       wait_for=autostop_lib.AutostopWaitFor.JOBS), output_stream=stream), 180)
        error = None
    except Exception as e:  # noqa: BLE001  (recorded with what it streamed)
        returned, error = None, f"{type(e).__name__}: {e}"
    text = stream.getvalue()
    note("dryrun", {"seconds": round(time.monotonic() - began, 1), "error": error, "returned": repr(returned),
                    "finished": "Dryrun finished" in plain(text), "chosen": chosen_row(text),
                    "output_tail": plain(text)[-3000:]})

    clusters = sky_client.bounded("status", lambda: sky.get(sky.status()), 60)
    note("clusters_after", [getattr(c, "name", None) or c.get("name") for c in clusters])


def stop() -> None:
    """7. Our server stopped: nothing answers on the port, no server process left."""
    from launcher.providers import sky_client

    if not sky_client.SkyServer._started_here:
        note("stop", "not started by us: nothing to stop")
        return
    began = time.monotonic()
    sky_client.stop_our_server()
    deadline = time.monotonic() + 15
    while (listening_pids() or server_processes()) and time.monotonic() < deadline:
        time.sleep(0.3)
    note("stop", {"seconds": round(time.monotonic() - began, 1), "started_here": sky_client.SkyServer._started_here,
                  "answers": health(), "listening": listening_pids(), "server_processes": server_processes()})


def start_given_up() -> None:
    """8. A start we gave up waiting for (timeout_s too short for it) is still ours: stopped by
    stop_our_server (at exit in the launcher) once SkyPilot's own start ends, not left running."""
    from launcher.providers import sky_client
    from launcher.providers.base import ProviderError

    began = time.monotonic()
    try:
        sky_client.SkyServer(timeout_s=0.5).ensure()
        error = None
    except ProviderError as e:
        error = sky_client.first_line(e)
    note("start_given_up", {"seconds": round(time.monotonic() - began, 1), "error": error,
                            "started_here": sky_client.SkyServer._started_here})
    began = time.monotonic()
    sky_client.stop_our_server()  # waits for SkyPilot's start to end (its creation lock), then stops it
    deadline = time.monotonic() + 15
    while (listening_pids() or server_processes()) and time.monotonic() < deadline:
        time.sleep(0.3)
    note("stop_after_given_up", {"seconds": round(time.monotonic() - began, 1), "answers": health(),
                                 "listening": listening_pids(), "server_processes": server_processes()})


if __name__ == "__main__":
    OUT = Path(sys.argv[1])
    try:
        main()
    except BaseException:  # noqa: BLE001  (recorded for the test, then the server is stopped)
        note("error", traceback.format_exc())
    finally:
        try:
            stop()
            if "error" not in result:
                start_given_up()
        except BaseException:  # noqa: BLE001
            note("stop_error", traceback.format_exc())
    note("total_seconds", round(time.monotonic() - STARTED, 1))
