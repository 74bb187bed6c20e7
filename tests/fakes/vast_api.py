"""A fake of the Vast.ai REST API on 127.0.0.1, faithful to the shapes the vastai 1.9.1 SDK
sends and reads (../shared/PROVIDERS.md; vastai/api/{client,offers,instances,keys}.py).

Its offers come from a SkyPilot vast catalog (`v8/vast/vms.csv`); its instances are real
machines you can SSH into: each gets its own OpenSSH server on loopback, started as this user,
whose sessions live in the instance's own folder (HOME is set there) with the variables Vast
puts in a container (CONTAINER_ID, CONTAINER_API_KEY: an instance-scoped key). It bills each
instance by the second at its $/h while it runs (and its disk while stopped), can preempt an
instance (SIGTERM to every process of the instance, SIGKILL after a grace; SSH stops answering;
actual_status turns "stopped", as an outbid interruptible instance does on Vast), can make an
instance vanish (the host went away), can fail the next N calls with 429 or 500, and says which
instances are still alive.

Run on its own for manual trials and benchmarks:

    python -m tests.fakes.vast_api --port 8765 --catalog catalogs/v8/vast/vms.csv

then `VAST_URL=http://127.0.0.1:8765 VAST_API_KEY=fake-key launch plan --providers vast ...`.
"""

from __future__ import annotations

import argparse
import ast
import csv
import getpass
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Optional
from urllib.parse import parse_qs, urlsplit

from tests.fakes import serve_until_interrupted
from tests.sshd import free_port, run_sshd
from tests.tcp_proxy import TcpProxy

ACCOUNT_KEY = "fake-vast-account-key"
MIN_BID_SHARE = 0.55  # the fake's interruptible floor: 55 % of the on-demand price
STORAGE_USD_PER_GB_MONTH = 0.15
MARKER = "FAKE_VAST_INSTANCE"  # in the environment of every process of an instance


def vast_gpu_name(accelerator: str) -> str:
    """SkyPilot's AcceleratorName (spaces removed) back to Vast's gpu_name: RTX4090 -> RTX 4090."""
    name = re.sub(r"^RTX(PRO)?(?=[A-Z0-9])", lambda m: "RTX PRO " if m.group(1) else "RTX ", accelerator)
    return re.sub(r"^(RTX (?:PRO )?)(A)(\d)", r"\1\2\3", name)


@dataclass
class FakeOffer:
    id: int
    gpu_name: str
    num_gpus: int
    gpu_ram_mb: int  # per GPU
    dph_total: float
    geolocation: str
    cpu_cores: int
    cpu_ram_mb: int
    verified: bool = True
    reliability: float = 0.98
    direct_port_count: int = 20
    cuda_max_good: float = 12.8
    inet_down: float = 800.0
    disk_space: float = 500.0
    rented: bool = False

    @property
    def min_bid(self) -> float:
        return round(self.dph_total * MIN_BID_SHARE, 4)

    def as_json(self, storage_gb: float) -> dict[str, Any]:
        storage_dph = storage_gb * STORAGE_USD_PER_GB_MONTH / (30 * 24)
        return {
            "id": self.id, "ask_contract_id": self.id, "bundle_id": self.id, "machine_id": 1000 + self.id,
            "host_id": 2000 + self.id, "gpu_name": self.gpu_name, "num_gpus": self.num_gpus,
            "gpu_ram": self.gpu_ram_mb, "gpu_total_ram": self.gpu_ram_mb * self.num_gpus,
            "cpu_cores": self.cpu_cores, "cpu_cores_effective": self.cpu_cores, "cpu_ram": self.cpu_ram_mb,
            "dph_base": round(self.dph_total - storage_dph, 6), "dph_total": self.dph_total,
            "storage_cost": STORAGE_USD_PER_GB_MONTH, "min_bid": self.min_bid, "reliability": self.reliability,
            "reliability2": self.reliability, "verified": self.verified, "inet_down": self.inet_down,
            "inet_up": self.inet_down / 2, "cuda_max_good": self.cuda_max_good,
            "direct_port_count": self.direct_port_count, "disk_space": self.disk_space,
            "geolocation": self.geolocation, "hosting_type": 1, "rentable": not self.rented,
            "rented": self.rented, "external": False, "score": round(100 * self.reliability, 2),
            "driver_version": "570.124.06", "compute_cap": 890,
        }


@dataclass
class FakeInstance:
    id: int
    offer: FakeOffer
    label: Optional[str]
    image: str
    disk: float
    bid: Optional[float]  # None: on-demand
    dph_total: float
    onstart: Optional[str]
    env: dict[str, str]
    api_key: str  # instance-scoped
    folder: Path
    created_at: float
    authorized_keys: list[str]
    actual_status: Optional[str] = None
    intended_status: str = "running"
    status_msg: Optional[str] = None
    ssh_port: Optional[int] = None  # the sshd's own port (the "direct" port)
    proxy_port: Optional[int] = None  # a forwarder to it (Vast's ssh proxy)
    sshd: Optional[subprocess.Popen] = None
    running_since: Optional[float] = None
    stopped_at: Optional[float] = None  # when it last stopped running (preempted, stopped, destroyed)
    billed_running_s: float = 0.0
    destroyed_at: Optional[float] = None
    vanished: bool = False
    marker: str = field(default_factory=lambda: secrets.token_hex(8))

    @property
    def home(self) -> Path:
        return self.folder / "root"

    def running_seconds(self, now: float) -> float:
        return self.billed_running_s + (now - self.running_since if self.running_since else 0.0)

    def billed_usd(self, now: Optional[float] = None) -> float:
        """GPU time at the instance's $/h while running, its disk while it exists."""
        now = now or time.time()
        end = self.destroyed_at or now
        disk = self.disk * STORAGE_USD_PER_GB_MONTH / (30 * 24 * 3600) * (end - self.created_at)
        storage_in_dph = self.disk * STORAGE_USD_PER_GB_MONTH / (30 * 24 * 3600) * self.running_seconds(end)
        return self.dph_total * self.running_seconds(end) / 3600 + disk - storage_in_dph

    def as_json(self, fake: "FakeVast") -> dict[str, Any]:
        o = self.offer
        direct = fake.broken_direct_port if fake.break_direct else self.ssh_port
        return {
            "id": self.id, "machine_id": 1000 + o.id, "bundle_id": o.id, "actual_status": self.actual_status,
            "intended_status": self.intended_status, "cur_state": self.intended_status,
            "next_state": self.intended_status, "label": self.label, "image_uuid": self.image,
            "image_runtype": "ssh_direc ssh_proxy", "onstart": self.onstart, "status_msg": self.status_msg,
            "extra_env": [[k, v] for k, v in self.env.items()], "public_ipaddr": "127.0.0.1",
            "ssh_host": "127.0.0.1" if self.proxy_port else None, "ssh_port": self.proxy_port, "ssh_idx": "1",
            "ports": {"22/tcp": [{"HostIp": "0.0.0.0", "HostPort": str(direct)}]} if direct and o.direct_port_count
            else {},
            "direct_port_count": o.direct_port_count, "start_date": self.created_at, "end_date": None,
            "uptime_mins": None, "gpu_name": o.gpu_name, "num_gpus": o.num_gpus, "gpu_ram": o.gpu_ram_mb,
            "gpu_totalram": o.gpu_ram_mb * o.num_gpus, "dph_total": self.dph_total, "dph_base": self.dph_total,
            "min_bid": o.min_bid, "is_bid": self.bid is not None, "disk_space": self.disk,
            "cuda_max_good": o.cuda_max_good, "geolocation": o.geolocation, "reliability2": o.reliability,
            "verified": o.verified, "inet_down": o.inet_down,
        }


def read_catalog(path: Path) -> list[FakeOffer]:
    """SkyPilot's vast vms.csv rows as offers; every few rows has a quality flaw a careful
    renter filters out (unverified, unreliable, no direct port, old CUDA, slow network, small disk)."""
    offers = []
    with path.open(newline="") as f:
        for i, row in enumerate(csv.DictReader(f)):
            if not row.get("AcceleratorName"):
                continue
            count = int(float(row["AcceleratorCount"]))
            info = ast.literal_eval(row["GpuInfo"]) if row.get("GpuInfo") else {"Gpus": [{"MemoryInfo": {"SizeInMiB": 0}}]}
            total_mib = float(info["Gpus"][0]["MemoryInfo"]["SizeInMiB"])
            offers.append(FakeOffer(
                id=100 + i, gpu_name=vast_gpu_name(row["AcceleratorName"]), num_gpus=count,
                gpu_ram_mb=int(total_mib / max(count, 1)), dph_total=float(row["Price"]),
                geolocation=", ".join((row.get("Region") or "Nowhere, XX").split(", ")[:2]),
                cpu_cores=int(float(row.get("vCPUs") or 8)), cpu_ram_mb=int(float(row.get("MemoryGiB") or 32) * 1024),
                verified=i % 7 != 3, reliability=0.80 if i % 5 == 4 else 0.98,
                direct_port_count=0 if i % 6 == 5 else 20, cuda_max_good=11.8 if i % 9 == 8 else 12.8,
                inet_down=40.0 if i % 8 == 7 else 800.0, disk_space=20.0 if i % 10 == 9 else 500.0,
            ))
    return offers


class ApiFailure(Exception):
    def __init__(self, status: int, body: dict[str, Any], headers: Optional[dict[str, str]] = None) -> None:
        super().__init__(status)
        self.status, self.body, self.headers = status, body, headers or {}


class FakeVast:
    """The fake service: `start()`, then point VAST_URL at `url`; `stop()` destroys everything."""

    def __init__(self, catalog: Path, folder: Path, *, loading_s: float = 0.3, api_key: str = ACCOUNT_KEY,
                 price_drift: float = 0.0) -> None:
        self.offers = {o.id: o for o in read_catalog(catalog)}
        self.folder = folder
        self.loading_s = loading_s
        self.api_key = api_key
        self.price_drift = price_drift  # an instance's real $/h = the quote x (1 + drift)
        self.instances: dict[int, FakeInstance] = {}
        self.account_keys: list[dict[str, Any]] = []
        self.requests: list[dict[str, Any]] = []  # method, path, body, authorization present
        self.failures: list[tuple[int, Optional[float]]] = []  # the next calls' (status, Retry-After)
        self.break_ssh = False  # new instances' SSH never answers
        self.stall_pull = False  # new instances stay "loading" with no progress
        self.break_direct = False  # the direct port is closed: only the proxy works
        self.mangle_instance_list = False  # GET instances answers with a body of an unknown shape
        self.lose_create_replies = 0  # the next creates rent the machine, then answer 502 (a lost reply)
        self.create_reply_delay_s = 0.0  # creates rent the machine, then answer this much later
        self.broken_direct_port = free_port()
        self._next_id = 5000
        self._lock = threading.RLock()
        self._server: Optional[ThreadingHTTPServer] = None

    # ---- service ----------------------------------------------------------------------------

    def start(self, port: int = 0) -> "FakeVast":
        self.folder.mkdir(parents=True, exist_ok=True)
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _serve(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else {}
                except ValueError:
                    body = None
                try:
                    status, reply, headers = 200, fake.handle(method, self.path, body,
                                                              self.headers.get("Authorization")), {}
                except ApiFailure as e:
                    status, reply, headers = e.status, e.body, e.headers
                data = reply if isinstance(reply, bytes) else json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._serve("GET")

            def do_POST(self) -> None:
                self._serve("POST")

            def do_PUT(self) -> None:
                self._serve("PUT")

            def do_DELETE(self) -> None:
                self._serve("DELETE")

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        for instance in list(self.instances.values()):
            self._destroy(instance)
        if self._server:
            self._server.shutdown()
            self._server.server_close()

    # ---- what tests ask ---------------------------------------------------------------------

    def alive(self) -> list[int]:
        """Instances not destroyed (a stopped one is alive: Vast bills its disk)."""
        return [i.id for i in self.instances.values() if i.destroyed_at is None and not i.vanished]

    def billed_usd(self, instance_id: Optional[int] = None) -> float:
        now = time.time()
        chosen = [self.instances[instance_id]] if instance_id is not None else list(self.instances.values())
        return sum(i.billed_usd(now) for i in chosen)

    def fail_next(self, count: int, status: int = 429, retry_after: Optional[float] = None) -> None:
        with self._lock:
            self.failures.extend([(status, retry_after)] * count)

    def preempt(self, instance_id: int, grace_s: float = 2.0) -> None:
        """As an outbid interruptible instance: its processes get SIGTERM, then SIGKILL after
        `grace_s`; SSH stops answering; actual_status becomes "stopped" (its disk is kept)."""
        instance = self.instances[instance_id]
        with self._lock:
            self._stop_running(instance, "stopped")
            instance.status_msg = "stopped: outbid"  # intended_status stays running: it waits for its bid
        _kill_instance(instance, grace_s)
        _reap(instance)

    def vanish(self, instance_id: int) -> None:
        """The host went away with the instance: it no longer shows up anywhere."""
        instance = self.instances[instance_id]
        with self._lock:
            self._stop_running(instance, "offline")
            instance.vanished = True
            instance.destroyed_at = time.time()
        _kill_instance(instance, 0.0)
        _reap(instance)

    def stop_sshd(self, instance_id: int) -> None:
        """The host is cut off while the API still says running (and bills): its sshd and every
        open SSH session die; what runs detached on it (the runner) goes on, unreachable."""
        instance = self.instances[instance_id]
        if instance.sshd is not None and instance.sshd.poll() is None:
            for pid in [instance.sshd.pid, *_descendants(instance.sshd.pid)]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        _reap(instance)

    # ---- the API ----------------------------------------------------------------------------

    def handle(self, method: str, raw_path: str, body: Any, authorization: Optional[str]) -> Any:
        parts = urlsplit(raw_path)
        path, query = parts.path, parse_qs(parts.query)
        with self._lock:
            self.requests.append({"method": method, "path": path, "body": body, "auth": authorization is not None,
                                  "time": time.time()})
            if self.failures:
                status, retry_after = self.failures.pop(0)
                headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
                raise ApiFailure(status, {"success": False, "error": "rate_limited" if status == 429 else
                                          "server_error", "msg": "injected by the fake"}, headers)
        if path == "/api/v0/gpu_names/unique/":
            return {"gpu_names": sorted({o.gpu_name for o in self.offers.values()})}
        scope = self._authorize(authorization)
        self.requests[-1]["scope"] = "account" if scope is None else f"instance {scope}"
        if body is None:
            raise ApiFailure(400, {"success": False, "error": "invalid_json", "msg": "request body is not JSON"})
        routes = [
            ("GET", r"/api/v0/users/current/?", lambda: self._user()),
            ("POST", r"/api/v0/bundles/?", lambda: self._search(body)),
            ("PUT", r"/api/v0/asks/(\d+)/", lambda i: self._create_maybe_lost(int(i), body, scope)),
            ("GET", r"/api/v1/instances/", lambda: self._list_v1(query, scope)),
            ("GET", r"/api/v0/instances/?", lambda: self._list_v0(scope)),
            ("GET", r"/api/v0/instances/(\d+)/", lambda i: self._show(int(i), scope)),
            ("PUT", r"/api/v0/instances/(\d+)/", lambda i: self._manage(int(i), body, scope)),
            ("DELETE", r"/api/v0/instances/(\d+)/", lambda i: self._destroy_call(int(i), scope)),
            ("PUT", r"/api/v0/instances/bid_price/(\d+)/", lambda i: self._change_bid(int(i), body, scope)),
            ("POST", r"/api/v0/instances/(\d+)/ssh/", lambda i: self._attach_ssh(int(i), body, scope)),
            ("GET", r"/api/v0/ssh/?", lambda: self._account_only(scope) or self.account_keys),
            ("POST", r"/api/v0/ssh/?", lambda: self._add_key(body, scope)),
        ]
        for route_method, pattern, action in routes:
            match = re.fullmatch(pattern, path)
            if match and route_method == method:
                with self._lock:
                    reply = action(*match.groups())
                if pattern.startswith(r"/api/v0/asks"):
                    time.sleep(self.create_reply_delay_s)  # rented already; the reply is slow to come
                return reply
        raise ApiFailure(404, {"success": False, "error": "not_found", "msg": f"{method} {path}"})

    def _authorize(self, authorization: Optional[str]) -> Optional[int]:
        """None: the account key; an instance id: that instance's scoped key."""
        token = (authorization or "").removeprefix("Bearer ").strip()
        if token and token == self.api_key:
            return None
        for instance in self.instances.values():
            if token and token == instance.api_key and instance.destroyed_at is None:
                return instance.id
        raise ApiFailure(401, {"success": False, "error": "invalid_user_key", "msg": "Invalid user key"})

    def _account_only(self, scope: Optional[int]) -> None:
        if scope is not None:
            raise ApiFailure(403, {"success": False, "error": "forbidden", "msg": "instance keys cannot do this"})

    def _own(self, instance_id: int, scope: Optional[int]) -> FakeInstance:
        if scope is not None and scope != instance_id:
            raise ApiFailure(403, {"success": False, "error": "forbidden", "msg": "not this instance's key"})
        instance = self.instances.get(instance_id)
        if instance is None or instance.destroyed_at is not None:
            raise ApiFailure(404, {"success": False, "error": "no_such_instance",
                                   "msg": f"Instance {instance_id} not found."})
        return instance

    def _user(self) -> dict[str, Any]:
        return {"id": 1, "username": "fake", "email": "fake@example.invalid", "balance": 100.0, "credit": 100.0}

    def _search(self, q: dict[str, Any]) -> dict[str, Any]:
        kind = q.get("type", "on-demand")
        storage = float(q.get("allocated_storage") or 5.0)
        rows = [o.as_json(storage) for o in self.offers.values()]
        for field_name, condition in q.items():
            if field_name in ("order", "type", "limit", "allocated_storage", "disable_bundling"):
                continue
            if not isinstance(condition, dict):
                raise ApiFailure(400, {"success": False, "error": "invalid_request", "msg": f"bad filter {field_name}"})
            rows = [r for r in rows if _matches(r.get(field_name), condition)]
        if kind == "bid":
            for r in rows:
                r["dph_total"] = r["min_bid"]  # what an interruptible rental costs at the floor
        for column, direction in reversed(q.get("order") or [["score", "desc"]]):
            rows.sort(key=lambda r: (r.get(column) is None, r.get(column) or 0), reverse=direction == "desc")
        return {"offers": rows[: int(q.get("limit") or 64)]}

    def _create_maybe_lost(self, offer_id: int, body: dict[str, Any], scope: Optional[int]) -> dict[str, Any]:
        reply = self._create(offer_id, body, scope)
        if self.lose_create_replies:
            self.lose_create_replies -= 1
            raise ApiFailure(502, {"success": False, "error": "bad_gateway", "msg": "upstream timed out"})
        return reply

    def _create(self, offer_id: int, body: dict[str, Any], scope: Optional[int]) -> dict[str, Any]:
        self._account_only(scope)
        offer = self.offers.get(offer_id)
        if offer is None or offer.rented:
            raise ApiFailure(400, {"success": False, "error": "no_such_ask",
                                   "msg": f"Offer {offer_id} is no longer available."})
        if not body.get("image"):
            raise ApiFailure(400, {"success": False, "error": "invalid_args", "msg": "image is required"})
        price = body.get("price")
        if price is not None and float(price) < offer.min_bid:
            raise ApiFailure(400, {"success": False, "error": "bid_too_low", "msg": f"min bid is {offer.min_bid}"})
        self._next_id += 1
        quote = float(price) if price is not None else offer.dph_total
        env = {k: str(v) for k, v in (body.get("env") or {}).items() if not k.startswith("-p ")}
        instance = FakeInstance(
            id=self._next_id, offer=offer, label=body.get("label"), image=body["image"],
            disk=float(body.get("disk") or 10), bid=float(price) if price is not None else None,
            dph_total=round(quote * (1 + self.price_drift), 6), onstart=body.get("onstart"), env=env,
            api_key=secrets.token_hex(16), folder=self.folder / f"instance-{self._next_id}", created_at=time.time(),
            authorized_keys=[k["public_key"] for k in self.account_keys], status_msg="Pulling image: 0%")
        offer.rented = True
        self.instances[instance.id] = instance
        threading.Thread(target=self._boot, args=(instance,), daemon=True).start()
        return {"success": True, "new_contract": instance.id, "instance_api_key": instance.api_key}

    def _boot(self, instance: FakeInstance) -> None:
        """Image pull (loading_s, progress in status_msg), then sshd and the on-start command."""
        steps = 5
        for n in range(1, steps + 1):
            time.sleep(self.loading_s / steps)
            with self._lock:
                if instance.destroyed_at is not None:
                    return
                instance.actual_status = "loading"
                if not self.stall_pull:
                    instance.status_msg = f"Pulling image: {100 * n // steps}%"
        if self.stall_pull:
            return  # stays loading with the same message, forever
        with self._lock:
            if instance.destroyed_at is not None:
                return
            self._run(instance)

    def _run(self, instance: FakeInstance) -> None:
        instance.home.mkdir(parents=True, exist_ok=True)
        instance.ssh_port = instance.ssh_port or free_port()
        if not self.break_ssh:
            instance.sshd = _start_sshd(instance)
            if instance.proxy_port is None:
                instance.proxy_port = TcpProxy(instance.ssh_port).port  # Vast's SSH proxy
        else:
            instance.proxy_port = free_port()  # ports are reported, nothing answers on them
        instance.actual_status, instance.intended_status = "running", "running"
        instance.status_msg = "success, running"
        instance.running_since = time.time()
        if instance.onstart and not self.break_ssh:
            log = open(instance.folder / "onstart.log", "a")
            subprocess.Popen(["sh", "-c", instance.onstart], cwd=instance.home, stdout=log, stderr=subprocess.STDOUT,
                             env=_instance_env(instance), start_new_session=True)

    def _stop_running(self, instance: FakeInstance, status: str) -> None:
        if instance.running_since is not None:
            instance.stopped_at = time.time()
            instance.billed_running_s += instance.stopped_at - instance.running_since
            instance.running_since = None
        instance.actual_status = status

    def _instances_for(self, scope: Optional[int]) -> list[FakeInstance]:
        return [i for i in self.instances.values() if i.destroyed_at is None and (scope is None or i.id == scope)]

    def _list_v1(self, query: dict[str, list[str]], scope: Optional[int]) -> Any:
        if self.mangle_instance_list:
            return {"result": "ok"}  # a shape nobody documented: the client must not read it as "none"
        rows = sorted(self._instances_for(scope), key=lambda i: i.id)
        after = int(query.get("after_token", ["0"])[0] or 0)
        limit = int(query.get("limit", ["25"])[0])
        rows = [i for i in rows if i.id > after]
        page, rest = rows[:limit], rows[limit:]
        return {"success": True, "instances": [i.as_json(self) for i in page], "instances_found": len(page),
                "total_instances": len(rows), "next_token": str(page[-1].id) if rest else None}

    def _list_v0(self, scope: Optional[int]) -> Any:
        if self.mangle_instance_list:
            return b""
        return {"instances": [i.as_json(self) for i in sorted(self._instances_for(scope), key=lambda i: i.id)]}

    def _show(self, instance_id: int, scope: Optional[int]) -> dict[str, Any]:
        if scope is not None and scope != instance_id:
            raise ApiFailure(403, {"success": False, "error": "forbidden", "msg": "not this instance's key"})
        instance = self.instances.get(instance_id)
        if instance is None or instance.destroyed_at is not None:
            return {"instances": None}
        return {"instances": instance.as_json(self)}

    def _manage(self, instance_id: int, body: dict[str, Any], scope: Optional[int]) -> dict[str, Any]:
        instance = self._own(instance_id, scope)
        if "label" in body:
            self._account_only(scope)
            instance.label = body["label"]
        state = body.get("state")
        if state == "stopped" and instance.actual_status == "running":
            self._stop_running(instance, "stopped")
            instance.intended_status = "stopped"
            _kill_instance(instance, 2.0)
            _reap(instance)
        elif state == "running" and instance.actual_status in ("stopped", "exited"):
            if instance.bid is not None and instance.bid < instance.offer.min_bid:
                instance.intended_status = "running"  # waits for a higher bid
            else:
                self._run(instance)
        return {"success": True}

    def _change_bid(self, instance_id: int, body: dict[str, Any], scope: Optional[int]) -> dict[str, Any]:
        instance = self._own(instance_id, scope)
        instance.bid = float(body["price"])
        return {"success": True}

    def _destroy_call(self, instance_id: int, scope: Optional[int]) -> dict[str, Any]:
        self._destroy(self._own(instance_id, scope))
        return {"success": True}

    def _destroy(self, instance: FakeInstance) -> None:
        with self._lock:
            if instance.destroyed_at is not None:
                return
            self._stop_running(instance, "exited")
            instance.destroyed_at = time.time()
            if instance.status_msg != "stopped: outbid":
                instance.offer.rented = False  # the machine is free again (an outbidder keeps it)
        _kill_instance(instance, 0.0)
        _reap(instance)

    def _attach_ssh(self, instance_id: int, body: dict[str, Any], scope: Optional[int]) -> dict[str, Any]:
        instance = self._own(instance_id, scope)
        key = (body.get("ssh_key") or "").strip()
        if key and key not in instance.authorized_keys:
            instance.authorized_keys.append(key)
            if instance.sshd:
                (instance.folder / "authorized_keys").write_text("\n".join(instance.authorized_keys) + "\n")
        return {"success": True}

    def _add_key(self, body: dict[str, Any], scope: Optional[int]) -> dict[str, Any]:
        self._account_only(scope)
        key = (body.get("ssh_key") or "").strip()
        if not key.startswith(("ssh-", "ecdsa-")):
            raise ApiFailure(400, {"success": False, "error": "invalid_key", "msg": "not an SSH public key"})
        entry = {"id": len(self.account_keys) + 1, "public_key": key, "created_at": time.time()}
        self.account_keys.append(entry)
        return {"success": True, "key": entry}


def _matches(value: Any, condition: dict[str, Any]) -> bool:
    """Vast's filter operators; numbers arrive as strings (vastai/api/query.py)."""
    for op, expected in condition.items():
        if op in ("in", "notin"):
            hit = value in expected or str(value) in [str(e) for e in expected]
            if hit != (op == "in"):
                return False
            continue
        left, right = _coerce(value), _coerce(expected)
        try:
            ok = {"eq": left == right, "neq": left != right, "lt": left < right, "lte": left <= right,
                  "gt": left > right, "gte": left >= right}[op]
        except TypeError:
            return False
        except KeyError:
            raise ApiFailure(400, {"success": False, "error": "invalid_request", "msg": f"unknown operator {op}"})
        if not ok:
            return False
    return True


def _coerce(value: Any) -> Any:
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, str):
        if value.lower() in ("true", "false"):
            return value.lower() == "true"
        try:
            return float(value)
        except ValueError:
            return value
    return float(value) if isinstance(value, (int, float)) else value


def _instance_env(instance: FakeInstance) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL")}, **instance.env,
            "HOME": str(instance.home), "CONTAINER_ID": str(instance.id), "CONTAINER_API_KEY": instance.api_key,
            MARKER: instance.marker}


def _start_sshd(instance: FakeInstance) -> subprocess.Popen:
    """The instance's own sshd; its sessions get the container's variables (HOME included)."""
    env = _instance_env(instance)
    process, _ = run_sshd(instance.folder, instance.authorized_keys, instance.ssh_port,
                          session_env={k: v for k, v in env.items() if k != "PATH"},
                          process_env={MARKER: instance.marker})
    return process


def _marked_pids(marker: str) -> list[int]:
    needle = f"{MARKER}={marker}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _instance_pids(instance: FakeInstance) -> list[int]:
    """Every process of an instance: what carries its marker in its environment (SSH sessions and
    whatever they started, detached or not), and its sshd with every child of it (sshd rewrites its
    own environment as it renames itself, so the listener and the per-connection sshd's carry no
    marker to find)."""
    pids = set(_marked_pids(instance.marker))
    if instance.sshd is not None and instance.sshd.poll() is None:
        pids |= {instance.sshd.pid, *_descendants(instance.sshd.pid)}
    return sorted(pids)


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_instance(instance: FakeInstance, grace_s: float) -> None:
    """Every process of the instance, as a container stop: TERM (SSH stops answering at once,
    open connections drop), then KILL after `grace_s`."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 0.0)):
        for pid in _instance_pids(instance):
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + wait
        while wait and time.monotonic() < deadline and _marked_pids(instance.marker):
            time.sleep(0.05)


def _reap(instance: FakeInstance) -> None:
    """Our own child (the sshd) is gone: collect it, so it does not linger as a zombie."""
    if instance.sshd is not None:
        try:
            instance.sshd.wait(timeout=5)
        except subprocess.TimeoutExpired:
            instance.sshd.kill()
        instance.sshd = None


def main() -> None:
    parser = argparse.ArgumentParser(description="A fake Vast.ai API with real SSH-reachable instances.")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--catalog", type=Path, required=True, help="SkyPilot vast vms.csv")
    parser.add_argument("--folder", type=Path, default=None,
                        help="where instances live (default: a temporary folder, removed when the fake stops; "
                             "a folder given here is kept)")
    parser.add_argument("--api-key", default=ACCOUNT_KEY)
    args = parser.parse_args()
    folder = args.folder.resolve() if args.folder else Path(tempfile.mkdtemp(prefix="fake-vast-"))
    fake = FakeVast(args.catalog, folder, api_key=args.api_key).start(args.port)
    print(f"fake Vast.ai API on {fake.url} (user {getpass.getuser()}); VAST_API_KEY={args.api_key}; "
          f"instances in {folder}", flush=True)

    def stop() -> None:
        fake.stop()  # every instance destroyed: its processes killed
        if args.folder is None:
            shutil.rmtree(folder, ignore_errors=True)

    serve_until_interrupted(stop)


if __name__ == "__main__":
    main()
