"""The sky provider through a REAL local SkyPilot API server (skypilot 0.14.1), offline: our
SkyServer starts SkyPilot's server on a port of this test's own and reuses it; with the enabled
clouds seeded after the server's on-boot `sky check` and an AWS images file of our own, SkyPilot's
optimizer given the unpinned request (`--gpu A10G` on AWS, on demand) chooses the same cloud,
region and instance type as our plan, and our pinned task dry-runs through the server; nothing
is left: no cluster, no server process (also of a start we gave up waiting for).

Isolation: a fresh HOME and SKY_RUNTIME_DIR (the shipped catalogs seeded, no .meta/ files, so no
catalog is fetched), a free port, no cloud credentials, no telemetry, SkyPilot's PyPI version
check answered from its cache. What SkyPilot would otherwise fetch or ask AWS for is given: an
aws/images.csv with our image tag, an empty aws/instance_quota_mapping.csv, and (by the script)
the root device of the fake AMI in SkyPilot's kv cache. The SkyPilot side runs in a subprocess
(tests/integration/sky_server_script.py) whose environment is set before `import sky`, so the
server it spawns inherits it. Every Python process of that tree loads a sitecustomize that refuses
(and logs) any connection or name lookup to anything but loopback: the test fails on any."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import pytest

from tests.helpers import ROOT

SCRIPT = Path(__file__).with_name("sky_server_script.py")
IMAGE_TAG = "skypilot:custom-gpu-ubuntu"  # what sky_server_script.py passes as image_id

# Loaded by every Python process started with this PYTHONPATH (the script, the API server, its
# workers): a connection or a name lookup that leaves loopback is logged and refused.
NETGUARD = r'''
import ipaddress, os, socket, sys

_LOG = os.environ.get("QLORA_TEST_NETGUARD_LOG")
_LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", socket.gethostname()}


def _loopback(host):
    if host is None:
        return True
    host = host.decode() if isinstance(host, bytes) else str(host)
    if host.lower() in _LOCAL_NAMES or host == "":
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def _refuse(event, where):
    if _LOG:
        with open(_LOG, "a") as f:
            f.write(f"pid {os.getpid()} ({' '.join(sys.argv)[:120]}): {event} {where!r}\n")
    raise OSError(f"qlora-launch test: network access outside loopback refused: {event} {where!r}")


def _hook(event, args):
    if event == "socket.connect":
        sock, address = args
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _loopback(address[0]):
            _refuse(event, address)
    elif event in ("socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex", "socket.gethostbyaddr"):
        if not _loopback(args[0]):
            _refuse(event, args[0])


sys.addaudithook(_hook)
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def queue_manager_port(api_port: int) -> int:
    """The port SkyPilot's server derives from ours for its request-queue manager, by SkyPilot's
    own code (sky/server/requests/queues/mp_queue.py reads SKYPILOT_API_SERVER_LOCAL_PORT)."""
    from sky.server.requests.queues import mp_queue
    saved = os.environ.get("SKYPILOT_API_SERVER_LOCAL_PORT")
    os.environ["SKYPILOT_API_SERVER_LOCAL_PORT"] = str(api_port)
    try:
        return mp_queue.get_queue_manager_port()
    finally:
        if saved is None:
            del os.environ["SKYPILOT_API_SERVER_LOCAL_PORT"]
        else:
            os.environ["SKYPILOT_API_SERVER_LOCAL_PORT"] = saved


def free_api_server_port(candidates: Iterable[int] | None = None) -> int:
    """A free port whose derived queue-manager port is free too: the server refuses to start
    when that one is taken ("port ... is already in use"), and a random ephemeral port maps into
    50000-59999 where other processes' ephemeral ports live (a CI run failed so)."""
    candidates = candidates if candidates is not None else (free_port() for _ in range(50))
    for port in candidates:
        if bindable(port) and bindable(queue_manager_port(port)):
            return port
    raise AssertionError("no free port whose SkyPilot queue-manager port is free too")


def write_images_catalog(runtime: Path) -> list[str]:
    """$SKY_RUNTIME_DIR/.sky/catalogs/v8/aws/images.csv, as sky/catalog/data_fetchers/fetch_aws.py
    writes it (Tag, Region, OS, OSVersion, ImageId, CreationDate), with our tag in every region of
    the AWS catalog and a fake AMI id: the tag resolves from the file, no boto call is made (a tag
    missing from it makes SkyPilot re-download the file)."""
    aws = runtime / ".sky" / "catalogs" / "v8" / "aws"
    with (aws / "vms.csv").open(newline="") as f:
        regions = sorted({row["Region"] for row in csv.DictReader(f)})
    lines = ["Tag,Region,OS,OSVersion,ImageId,CreationDate"]
    lines += [f"{IMAGE_TAG},{region},ubuntu,22.04,ami-0{i:016x},20250101" for i, region in enumerate(regions)]
    (aws / "images.csv").write_text("\n".join(lines) + "\n")
    return regions


def processes_of(runtime: Path, port: int) -> dict[int, str]:
    """Processes left by this test: any whose environment names our runtime folder, and any
    SkyPilot API server on our port (pgrep, as `sky api stop` finds them, by command line)."""
    found: dict[int, str] = {}
    marker = f"SKY_RUNTIME_DIR={runtime}".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            if marker in environ:
                found[int(proc.name)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
    pgrep = shutil.which("pgrep")
    if pgrep:
        out = subprocess.run([pgrep, "-af", f"sky.server.server.*--port={port}"], capture_output=True, text=True)
        for line in out.stdout.splitlines():
            pid, _, command = line.partition(" ")
            if pid.isdigit() and int(pid) != os.getpid():
                found.setdefault(int(pid), command)
    return found


def tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError as e:
        return f"({path}: {e})"


def test_a_real_local_api_server_chooses_what_our_plan_chooses_and_dry_runs_our_pinned_task(tmp_path):
    home, runtime, state = tmp_path / "home", tmp_path / "sky-runtime", tmp_path / "qlora-home"
    home.mkdir()
    shutil.copytree(ROOT / "catalogs" / "v8", runtime / ".sky" / "catalogs" / "v8")
    assert (runtime / ".sky" / "catalogs" / "v8" / "common" / "accelerators.csv").is_file()
    regions = write_images_catalog(runtime)
    # Read by SkyPilot's quota check before it provisions (sky/catalog/aws_catalog.py, columns
    # InstanceType,OnDemandInstanceCode,SpotInstanceCode); not shipped, so it would be fetched. No
    # rows: no quota code known, so SkyPilot "tries provisioning anyway" without a boto call.
    (runtime / ".sky" / "catalogs" / "v8" / "aws" / "instance_quota_mapping.csv").write_text(
        "InstanceType,OnDemandInstanceCode,SpotInstanceCode\n")
    # Empty AWS files, not missing ones: SkyPilot's dry run raises FileNotFoundError for an
    # AWS_CONFIG_FILE that names no file (sky/clouds/aws.py _get_credentials_path).
    no_credentials, no_config = tmp_path / "no-aws-credentials", tmp_path / "no-aws-config"
    no_credentials.write_text("")
    no_config.write_text("")
    # SkyPilot's server asks PyPI for its latest version once a day (sky/server/version_check.py):
    # answered from its cache file instead, under the isolated HOME.
    (home / ".sky").mkdir()
    (home / ".sky" / "version_cache.json").write_text(json.dumps({"release_version": None, "cached_at": time.time()}))
    guard = tmp_path / "netguard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(NETGUARD)
    netlog = tmp_path / "netguard.log"
    port = free_api_server_port()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": f"{ROOT}{os.pathsep}{guard}", "QLORA_TEST_NETGUARD_LOG": str(netlog),
        "HOME": str(home), "SKY_RUNTIME_DIR": str(runtime), "SKYPILOT_API_SERVER_LOCAL_PORT": str(port),
        "QLORA_LAUNCH_HOME": str(state), "SKYPILOT_DISABLE_USAGE_COLLECTION": "1",
        "AWS_EC2_METADATA_DISABLED": "true", "AWS_SHARED_CREDENTIALS_FILE": str(no_credentials),
        "AWS_CONFIG_FILE": str(no_config), "HF_HUB_OFFLINE": "1",
        # The dry run builds SkyPilot's wheel for the node with `pip wheel --no-deps`: no index,
        # no pip self-check against PyPI.
        "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }
    result_file = tmp_path / "result.json"
    server_log = runtime / ".sky" / "api_server" / "server.log"
    output = ""
    began = time.monotonic()
    try:
        try:
            done = subprocess.run([sys.executable, str(SCRIPT), str(result_file)], cwd=ROOT, env=env,
                                  capture_output=True, text=True, timeout=300)
            output = done.stdout + done.stderr
        except subprocess.TimeoutExpired as e:
            output = f"(the script ran past 300 s and was killed)\n{e.stdout or ''}{e.stderr or ''}"
    finally:
        seconds = time.monotonic() - began
        left = processes_of(runtime, port)
        for pid in left:  # ours (our environment or our port): stopped, then reported below
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    r = json.loads(result_file.read_text()) if result_file.is_file() else {}

    def why() -> str:
        return (f"\n--- script output (last 6000 chars) ---\n{output[-6000:]}"
                f"\n--- {server_log} (tail) ---\n{tail(server_log)}"
                f"\n--- refused network access ---\n{tail(netlog) if netlog.exists() else '(none)'}")

    print(f"script took {seconds:.1f} s; result:\n{json.dumps(r, indent=1)[:6000]}")
    assert "error" not in r and "stop_error" not in r, f"the script failed:\n{r.get('error') or r.get('stop_error')}{why()}"
    assert "total_seconds" in r, f"the script did not finish{why()}"

    # 1. SkyServer starts SkyPilot's server on our port (nothing answered before), then reuses it.
    assert r["answers_before"] is None, f"something already answered on port {port}: {r['answers_before']}"
    first = r["first_ensure"]
    assert first["api_start_calls"] == 1 and first["started_here"] is True, f"{first}{why()}"
    assert first["port_env"] == str(port)
    health = r["answers_after_start"]
    assert health and health["http_status"] == 200 and health["body"].get("status") == "healthy", f"{health}{why()}"
    servers = r["server_processes_after_start"]
    assert len(r["listening_after_start"]) >= 1 and servers, (r["listening_after_start"], servers)
    second = r["second_ensure"]
    assert second["api_start_calls"] == 1, f"a second ensure() started another server: {second}"
    assert r["listening_after_second"] == r["listening_after_start"] and r["server_processes_after_second"] == servers

    # 2. The on-boot check has ended (with no credentials it enables nothing); the seed made after
    # it is what the server sees.
    boot = r["boot_check"]
    assert boot["status"] and all(s.rsplit(".", 1)[-1] in ("SUCCEEDED", "FAILED") for s in boot["status"]), boot
    assert "AWS" not in boot["enabled_after_check"], f"the on-boot check found AWS credentials here: {boot}"
    assert r["enabled_seen_by_server"] == ["aws"], f"the server sees {r['enabled_seen_by_server']} enabled{why()}"

    # 4. Our plan: g5.xlarge on AWS, on demand, $1.006/h.
    plan = r["plan"]
    assert (plan["provider"], plan["instance_type"], plan["usd_per_hour"], plan["interruptible"]) == \
        ("aws", "g5.xlarge", 1.006, False), plan
    assert plan["region"] in regions

    # 5. SkyPilot's optimizer, given the unpinned request, chooses exactly the plan's offer. Three
    # regions tie at $1.006 (us-east-1, us-east-2, us-west-2): SkyPilot keeps the first cheapest of
    # its candidates (a strict < in sky/optimizer.py), listed US regions first, each group by
    # (price, region name) (sky/catalog/aws_catalog.py get_region_zones_for_instance_type); our plan
    # keeps the catalog file's order among equals (a stable sort), which is by region name.
    chosen = r["optimize"]["chosen"]
    assert chosen, f"no chosen row in the optimizer's output:\n{r['optimize']['output_tail']}{why()}"
    assert (chosen["cloud"], chosen["region"], chosen["instance_type"], chosen["gpus"]) == \
        ("AWS", plan["region"], plan["instance_type"], "A10G:1"), f"SkyPilot chose {chosen}, our plan {plan}"
    assert chosen["usd_per_hour"] == pytest.approx(plan["usd_per_hour"]) and chosen["cost"] == f"{plan['usd_per_hour']:.2f}"

    # 6. Our pinned task dry-runs through the server and names the same machine; no cluster is left.
    dry = r["dryrun"]
    assert dry["error"] is None and dry["finished"], f"the dry run did not finish:\n{dry}{why()}"
    assert dry["chosen"] and (dry["chosen"]["region"], dry["chosen"]["instance_type"]) == \
        (plan["region"], plan["instance_type"]), f"{dry}{why()}"
    assert r["clusters_after"] == [], f"clusters left after a dry run: {r['clusters_after']}{why()}"

    # 7. stop_our_server() stopped it: nothing answers, no server process; nothing of ours is left.
    stop = r["stop"]
    assert isinstance(stop, dict) and stop["answers"] is None and stop["listening"] == [] and \
        stop["server_processes"] == [] and stop["started_here"] is False, f"{stop}{why()}"

    # 8. A start given up on (timeout_s=0.5) is still ours: stopped, not left running.
    given_up = r["start_given_up"]
    assert given_up["error"] and "did not answer starting its API server" in given_up["error"], given_up
    assert given_up["started_here"] is True, f"a server we spawned but gave up on is not marked ours: {given_up}"
    after = r["stop_after_given_up"]
    assert after["answers"] is None and after["listening"] == [] and after["server_processes"] == [], \
        f"{after}{why()}"
    assert left == {}, f"processes left after the test (killed now): {left}{why()}"
    assert not netlog.exists(), f"network access outside loopback was attempted (and refused):\n{tail(netlog)}{why()}"


def test_the_api_server_port_is_chosen_with_its_queue_manager_port_free():
    # SkyPilot's derivation as CI met it: 54519 -> 57950; the default port keeps the default.
    assert queue_manager_port(54519) == 57950 and queue_manager_port(46580) == 50011
    port = free_api_server_port()
    assert bindable(port) and bindable(queue_manager_port(port))
    with socket.socket() as held:  # a port whose queue-manager port is held is passed over
        held.bind(("127.0.0.1", next(p for p in range(50000, 60000) if bindable(p))))
        clash = next(p for p in range(20000, 30000) if queue_manager_port(p) == held.getsockname()[1])
        assert bindable(clash)
        other = free_api_server_port(candidates=[clash, port])
        assert other == port
