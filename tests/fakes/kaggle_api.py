"""A fake of Kaggle's API, as much of it as the official client (kaggle 2.2.5 on kagglesdk 0.1.38)
uses to run a script kernel on a GPU: authentication, the weekly GPU quota, private datasets with
their blob uploads, kernel pushes, status, output (paged) and logs, on 127.0.0.1. Every request is
recorded; datasets keep their bytes and kernels their pushed metadata, so a test reads what the
client sent.

The wire is kagglesdk's (kagglesdk/kaggle_http_client.py): `POST <base>/v1/<service>/<Method>`,
a camelCase JSON body, a JSON reply; errors are a non-2xx status with `{"code", "message"}`.
`<base>` is `/api` outside PROD; both `/api/v1/...` and `/v1/...` are served.
  POST .../security.OAuthService/IntrospectToken            {token} -> {active, username}
  POST .../kernels.KernelsApiService/GetAcceleratorQuotaStatistics  {} -> {quotaRefreshTime,
                                                             gpuQuota: {timeUsed, totalTimeAllowed, ..}}
  POST .../datasets.DatasetApiService/GetDatasetStatus      {ownerSlug, datasetSlug} -> {status} | 404
  POST .../blobs.BlobApiService/StartBlobUpload             {type, name, contentLength} -> {token, createUrl}
  PUT  /upload/<token>                                      the bytes (createUrl: on this server)
  POST .../datasets.DatasetApiService/CreateDataset         {ownerSlug, slug, title, licenseName,
                                                             isPrivate, files: [{token}]} -> {ref, url, status}
  POST .../datasets.DatasetApiService/CreateDatasetVersion  {ownerSlug, datasetSlug, body: {versionNotes,
                                                             files}} -> {ref, url, status}
  POST .../kernels.KernelsApiService/SaveKernel             {slug, newTitle, text, language, kernelType,
                                                             datasetDataSources, enableGpu, enableInternet,
                                                             machineShape, sessionTimeoutSeconds, ..}
                                                             -> {ref, url, versionNumber, error?,
                                                             invalidDatasetSources?}
  POST .../kernels.KernelsApiService/GetKernelSessionStatus {userName, kernelSlug, versionLabel?}
                                                             -> {status, failureMessage?}
  POST .../kernels.KernelsApiService/ListKernelSessionOutput {userName, kernelSlug, pageSize, pageToken,
                                                             versionLabel?} -> {files: [{url, fileName}],
                                                             log, nextPageToken}
  GET  /output/<owner>/<slug>/<version>/<file name>         an output file (the "signed URL"; no auth)
  GET  .../v1/kernels/logs/stream/<owner>/<slug>            the log: Server-Sent Events while the
                                                             session runs (`data: {stream_name, time,
                                                             data}` .. `data: END_OF_LOG`), the log blob
                                                             (a JSON array of those events) once done

Auth, as Kaggle's: `Authorization: Basic <username:key>` (kaggle.json, KAGGLE_USERNAME/KAGGLE_KEY)
or `Bearer <token>` (KAGGLE_API_TOKEN, ~/.kaggle/access_token); anything else is 401 on every call
but IntrospectToken, which answers `{"active": false}` for a token it does not know (RFC 7662), so
the client falls back to a key and, with none, exits. A kernel or dataset of another user is 403
("Permission 'kernels.get' was denied", what Kaggle answers for a wrong or private slug).

Kernels. A push records the metadata (KernelVersion.request) and starts the version QUEUED; what
it then does is `FakeKaggle.executor(fake, version)`, run in a thread of its own. The default,
`scripted`, waits `queue_s`, goes RUNNING, writes `fake.log_lines` to the log one by one, waits
`run_s`, sets `fake.outputs` (name -> bytes) as the version's output and goes COMPLETE. `Sandbox(root)`
really runs `version.script` on the CPU in a folder laid out as /kaggle/input and /kaggle/working
and enforces the session timeout and the weekly quota (the version killed, ERROR); a test may also
swap in its own executor and drive the version through `set_status`, `log` and `outputs`. Output is listed `output_page_size` files a page (2 by default, whatever page size the
client asks for) so that paging is exercised. GPU kernels add their running time, times
`quota_seconds_per_second`, to the quota's `timeUsed`; `gpu_time_used_s`/`gpu_total_s` are the
quota a test sets. `running()` lists the versions not finished yet: a test that leaves one fails.

Pointing the real client at it. The client has no URL setting: KaggleApi picks its environment from
its `args` (`--local` when KAGGLE_API_ENVIRONMENT=LOCALHOST *at import*, a class attribute), and
kagglesdk looks the environment's endpoint up in `kagglesdk.kaggle_env._env_to_endpoint` each time
a client is built. So, in-process and before any call:

    kagglesdk.kaggle_env._env_to_endpoint[KaggleEnv.LOCAL] = fake.url   # http://127.0.0.1:PORT
    api = KaggleApi(); api.args = ["--local"]                           # see point_client_at()

LOCAL adds the `/api` prefix, which this server accepts. The alternative, KAGGLE_API_ENVIRONMENT=
LOCALHOST with http_proxy=http://127.0.0.1:PORT, needs the variable before `import kaggle` (its
`args` are read at class definition), sends every other plain-HTTP request of the process through
the fake too, and breaks on a machine whose no_proxy covers localhost; the in-process mapping has
none of that and is what the tests use. `import kaggle` (the package) authenticates at import;
import `kaggle.api.kaggle_api_extended` with HOME/KAGGLE_CONFIG_DIR already isolated, and note that
KaggleApi's `config_dir`/`config` are class attributes read at import too: set them per instance.
Our launcher's documented setting is QLORA_LAUNCH_KAGGLE_URL=http://127.0.0.1:PORT, mapped the same
way by the provider.

    python -m tests.fakes.kaggle_api --port P [--username U --key K] [--token T]    # manual trials
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.fakes.http_json import JSONHandler, Recorded
from typing import Any, Callable, Optional

USER, KEY, TOKEN = "tester", "key-" + "0" * 28, "KGAT_" + "1" * 32  # the tests' account


def with_key(config: Path, key: str = KEY) -> None:
    """The test account's legacy kaggle.json in the client's config folder (KAGGLE_CONFIG_DIR)."""
    (config / "kaggle.json").write_text(json.dumps({"username": USER, "key": key}))
    (config / "kaggle.json").chmod(0o600)


# KernelWorkerStatus (kagglesdk/kernels/types/kernels_enums.py), by name as kagglesdk serialises them.
QUEUED, RUNNING, COMPLETE, ERROR = "QUEUED", "RUNNING", "COMPLETE", "ERROR"
CANCEL_REQUESTED, CANCEL_ACKNOWLEDGED = "CANCEL_REQUESTED", "CANCEL_ACKNOWLEDGED"
FINISHED = {COMPLETE, ERROR, CANCEL_ACKNOWLEDGED}
LOG_END = "END_OF_LOG"  # the stream's last event (KaggleApi._LOG_STREAM_END_SENTINEL)


class FakeError(Exception):
    """An error reply: `status` and Kaggle's `{"code", "message"}` body."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message




@dataclass
class DatasetVersion:
    number: int
    notes: str
    files: dict[str, bytes]
    ready_at: float  # time.monotonic() from which the status reads READY


@dataclass
class Dataset:
    owner: str
    slug: str
    title: str
    license_name: str
    private: bool
    versions: list[DatasetVersion] = field(default_factory=list)

    @property
    def ref(self) -> str:
        return f"{self.owner}/{self.slug}"

    @property
    def files(self) -> dict[str, bytes]:
        """The newest version's files."""
        return self.versions[-1].files


@dataclass
class KernelVersion:
    owner: str
    slug: str
    number: int
    request: dict[str, Any]  # the SaveKernel body, as the client sent it
    status: str = QUEUED
    failure_message: str = ""
    outputs: dict[str, bytes] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)  # the log: {stream_name, time, data}
    started: float = field(default_factory=time.monotonic)
    running_since: Optional[float] = None
    ended: Optional[float] = None
    cancel: threading.Event = field(default_factory=threading.Event)
    changed: threading.Condition = field(default_factory=threading.Condition)

    # ---- what the push asked for ------------------------------------------------------------

    @property
    def ref(self) -> str:
        return f"{self.owner}/{self.slug}/{self.number}"

    @property
    def script(self) -> str:
        return self.request.get("text", "")

    @property
    def enable_gpu(self) -> bool:
        return bool(self.request.get("enableGpu"))

    @property
    def enable_internet(self) -> bool:
        return bool(self.request.get("enableInternet"))

    @property
    def machine_shape(self) -> Optional[str]:
        return self.request.get("machineShape")

    @property
    def dataset_sources(self) -> list[str]:
        return list(self.request.get("datasetDataSources") or [])

    @property
    def session_timeout_s(self) -> Optional[int]:
        return self.request.get("sessionTimeoutSeconds")

    # ---- what an executor does with it --------------------------------------------------------

    def set_status(self, status: str, failure_message: str = "") -> None:
        with self.changed:
            if self.status in FINISHED:
                return
            now = time.monotonic()
            if status == RUNNING and self.running_since is None:
                self.running_since = now
            if status in FINISHED:
                self.ended = now
            self.status, self.failure_message = status, failure_message
            self.changed.notify_all()

    def log(self, data: str, stream_name: str = "stdout") -> None:
        with self.changed:
            self.events.append({"stream_name": stream_name, "time": round(time.monotonic() - self.started, 3),
                                "data": data})
            self.changed.notify_all()

    def log_text(self) -> str:
        """The log as Kaggle persists it (and ListKernelSessionOutput returns it): a JSON array."""
        with self.changed:
            return json.dumps(self.events)

    def gpu_seconds(self) -> float:
        if not self.enable_gpu or self.running_since is None:
            return 0.0
        return (self.ended or time.monotonic()) - self.running_since


Executor = Callable[["FakeKaggle", KernelVersion], None]


def scripted(fake: "FakeKaggle", version: KernelVersion) -> None:
    """The default execution: QUEUED for `queue_s`, RUNNING with `log_lines` written, then `outputs`
    and COMPLETE after `run_s`; cancelled at once when the fake stops."""
    if version.cancel.wait(fake.queue_s):
        return
    version.set_status(RUNNING)
    for line in fake.log_lines:
        version.log(line)
    if version.cancel.wait(fake.run_s):
        return
    version.outputs.update(fake.outputs)
    version.set_status(COMPLETE)


class Sandbox:
    """An executor that really runs a pushed script kernel, on the CPU, as Kaggle would: the
    attached datasets (their newest version) under <root>/kaggle/input/datasets/<owner>/<slug>/,
    an empty <root>/kaggle/working/ (a version's output is what it holds at the end), stdout and
    stderr as the log; QLORA_KAGGLE_ROOT=<root> tells our kernel script the prefix, `gpus` what
    the session "has" (QLORA_KAGGLE_FAKE_GPUS, "" for none), and pip is skipped (this Python has
    the runner's packages). Kaggle's clocks are enforced: the version is killed (ERROR) at its
    session timeout (the push's, in seconds, so a test scales it down), or once the week's GPU
    quota is used up (`gpu_total_s`, counted at `quota_seconds_per_second`), or when the fake stops.
    `kills` records each as (version ref, why)."""

    def __init__(self, root: Path, gpus: str = "Tesla T4,Tesla T4") -> None:
        self.root, self.gpus = root, gpus
        self.kills: list[tuple[str, str]] = []

    def __call__(self, fake: "FakeKaggle", version: KernelVersion) -> None:
        root = self.root / f"{version.slug}-v{version.number}"
        for ref in version.dataset_sources:
            folder = root / "kaggle" / "input" / "datasets" / "/".join(ref.split("/")[:2])
            folder.mkdir(parents=True)
            for name, data in fake.datasets["/".join(ref.split("/")[:2])].files.items():
                (folder / name).write_bytes(data)
        working = root / "kaggle" / "working"
        working.mkdir(parents=True)
        version.set_status(RUNNING)
        env = {**os.environ, "QLORA_KAGGLE_ROOT": str(root), "QLORA_KAGGLE_SKIP_PIP": "1",
               "QLORA_KAGGLE_FAKE_GPUS": self.gpus}
        proc = subprocess.Popen([sys.executable, "-c", version.script], cwd=working, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        reader = threading.Thread(target=lambda: [version.log(line) for line in proc.stdout], daemon=True)
        reader.start()
        killed = ""
        while proc.poll() is None and not killed:
            killed = self._why_kill(fake, version)
            if killed:
                os.killpg(proc.pid, signal.SIGKILL)
                self.kills.append((version.ref, killed))
            else:
                time.sleep(0.1)
        code = proc.wait()
        reader.join(timeout=10)
        version.outputs.update({str(p.relative_to(working)): p.read_bytes() for p in working.rglob("*") if p.is_file()})
        if killed:
            version.set_status(ERROR, killed)
        else:
            version.set_status(COMPLETE if code == 0 else ERROR, "" if code == 0 else f"exit code {code}")

    @staticmethod
    def _why_kill(fake: "FakeKaggle", version: KernelVersion) -> str:
        if version.cancel.is_set():
            return "cancelled"
        limit = version.session_timeout_s
        if limit and version.running_since is not None and time.monotonic() - version.running_since > limit:
            return f"the session ran past its {limit} s limit"
        if version.enable_gpu and fake.quota_seconds_per_second and fake.gpu_used_s() >= fake.gpu_total_s:
            return "the weekly GPU quota is used up"
        return ""


def duration(seconds: float) -> str:
    """A protobuf Duration as JSON ("108000s", "1.5s"): kagglesdk's TimeDeltaSerializer reads it."""
    return f"{int(seconds)}s" if float(seconds).is_integer() else f"{seconds:.3f}s"


class FakeKaggle:
    def __init__(self, username: str = "tester", key: str = "test-key", token: Optional[str] = "test-token",
                 port: int = 0) -> None:
        self.keys = {username: key}  # username -> legacy API key
        self.tokens = {token: username} if token else {}  # access token -> username
        # The weekly GPU quota (Kaggle's is ~30 h, floating), in seconds; a test sets both.
        self.gpu_time_used_s = 0.0
        self.gpu_total_s = 30 * 3600.0
        self.quota_seconds_per_second = 0.0  # quota a running GPU kernel uses per wall second
        self.quota_refresh = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(days=3)
        # Kernels: the default execution (see `scripted`) and how output is paged.
        self.executor: Executor = scripted
        self.queue_s = 0.2
        self.run_s = 0.3
        self.log_lines: list[str] = ["hello from the fake kernel\n"]
        self.outputs: dict[str, bytes] = {}
        self.output_page_size = 2
        self.dataset_ready_s = 0.2  # a new dataset version reads READY after this
        self.push_error: Optional[str] = None  # SaveKernel answers {"error": push_error} (phone verification..)
        self.datasets: dict[str, Dataset] = {}
        self.kernels: dict[str, list[KernelVersion]] = {}  # "owner/slug" -> its versions, oldest first
        self.blobs: dict[str, dict[str, Any]] = {}  # upload token -> {name, length, data}
        self.requests: list[Recorded] = []
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", port), _handler(self))
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FakeKaggle":
        self.thread.start()
        return self

    def stop(self) -> None:
        for versions in list(self.kernels.values()):
            for version in versions:
                version.cancel.set()
        for thread in self.threads:
            thread.join(timeout=5)
        self.server.shutdown()
        self.server.server_close()

    # ---- what a test reads --------------------------------------------------------------------

    def routes(self) -> list[str]:
        """`METHOD path` of every request, in order (RPCs by their method name's path)."""
        return [f"{r.method} {r.path.split('?')[0]}" for r in self.requests]

    def rpcs(self) -> list[str]:
        """The RPC method names called, in order: ["IntrospectToken", "SaveKernel", ...]."""
        return [r.path.split("?")[0].rsplit("/", 1)[-1] for r in self.requests
                if r.method == "POST" and "/v1/" in r.path]

    def kernel(self, ref: str) -> KernelVersion:
        """A kernel's newest version ("owner/slug") or a given one ("owner/slug/N")."""
        owner, slug, *number = ref.split("/")
        versions = self.kernels[f"{owner}/{slug}"]
        return versions[int(number[0]) - 1] if number else versions[-1]

    def running(self) -> list[str]:
        """Every kernel version not finished yet, "owner/slug/N"."""
        with self.lock:
            return [v.ref for versions in self.kernels.values() for v in versions if v.status not in FINISHED]

    def wait_finished(self, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.running() and time.monotonic() < deadline:
            time.sleep(0.02)

    def gpu_used_s(self) -> float:
        with self.lock:
            versions = [v for vs in self.kernels.values() for v in vs]
        return self.gpu_time_used_s + self.quota_seconds_per_second * sum(v.gpu_seconds() for v in versions)

    # ---- the RPCs -----------------------------------------------------------------------------

    def user_for(self, authorization: str) -> Optional[str]:
        scheme, _, credentials = authorization.partition(" ")
        if scheme == "Bearer":
            return self.tokens.get(credentials)
        if scheme == "Basic":
            try:
                username, _, key = base64.b64decode(credentials).decode().partition(":")
            except ValueError:
                return None
            return username if username in self.keys and secrets.compare_digest(self.keys[username], key) else None
        return None

    def rpc(self, method: str, user: str, body: dict[str, Any]) -> dict[str, Any]:
        handler = getattr(self, f"_rpc_{method}", None)
        if handler is None:
            raise FakeError(404, f"Unknown method {method} (not in the fake)")
        return handler(user, body)

    def _rpc_GetAcceleratorQuotaStatistics(self, user: str, body: dict[str, Any]) -> dict[str, Any]:
        return {
            "quotaRefreshTime": self.quota_refresh.strftime("%Y-%m-%dT%H:%M:%S.000Z"),
            "gpuQuota": {"timeUsed": duration(self.gpu_used_s()), "timeReserved": "0s",
                         "totalTimeAllowed": duration(self.gpu_total_s), "minimumTimeAllowed": duration(self.gpu_total_s),
                         "isPayToScaleEnabled": False, "hasEverRun": bool(self.kernels)},
            "tpuQuota": {"timeUsed": "0s", "timeReserved": "0s", "totalTimeAllowed": duration(20 * 3600),
                         "minimumTimeAllowed": duration(20 * 3600)},
        }

    def _own(self, user: str, owner: str, what: str) -> None:
        if owner != user:
            raise FakeError(403, f"Permission '{what}' was denied")

    def _rpc_GetDatasetStatus(self, user: str, body: dict[str, Any]) -> dict[str, Any]:
        dataset = self.datasets.get(f"{body.get('ownerSlug')}/{body.get('datasetSlug')}")
        if dataset is None:
            raise FakeError(404, "Dataset not found")
        self._own(user, dataset.owner, "datasets.get")
        ready = time.monotonic() >= dataset.versions[-1].ready_at
        return {"status": "READY" if ready else "BLOBS_RECEIVED"}

    def _rpc_StartBlobUpload(self, user: str, body: dict[str, Any]) -> dict[str, Any]:
        if body.get("type") != "DATASET" or not body.get("name"):
            raise FakeError(400, "The fake takes DATASET blobs with a name")
        token = secrets.token_hex(12)
        with self.lock:
            self.blobs[token] = {"name": body["name"], "length": int(body.get("contentLength") or 0), "data": None,
                                 "user": user}
        return {"token": token, "createUrl": f"{self.url}/upload/{token}"}

    def _files(self, user: str, files: list[dict[str, Any]]) -> dict[str, bytes]:
        out = {}
        for item in files or []:
            blob = self.blobs.get(item.get("token", ""))
            if blob is None or blob["data"] is None or blob["user"] != user:
                raise FakeError(400, f"Unknown or incomplete upload token {item.get('token')!r}")
            out[blob["name"]] = blob["data"]
        return out

    def _rpc_CreateDataset(self, user: str, body: dict[str, Any]) -> dict[str, Any]:
        owner, slug = body.get("ownerSlug") or user, body.get("slug", "")
        self._own(user, owner, "datasets.create")
        ref = f"{owner}/{slug}"
        if ref in self.datasets:
            return {"status": "error", "error": f'The requested slug "{slug}" is already in use by a dataset.'}
        files = self._files(user, body.get("files", []))
        dataset = Dataset(owner, slug, body.get("title", ""), body.get("licenseName", ""), body.get("isPrivate", False))
        dataset.versions.append(DatasetVersion(1, "", files, time.monotonic() + self.dataset_ready_s))
        with self.lock:
            self.datasets[ref] = dataset
        return {"ref": ref, "url": f"{self.url}/datasets/{ref}", "status": "ok"}

    def _rpc_CreateDatasetVersion(self, user: str, body: dict[str, Any]) -> dict[str, Any]:
        dataset = self.datasets.get(f"{body.get('ownerSlug')}/{body.get('datasetSlug')}")
        if dataset is None:
            raise FakeError(404, "Dataset not found")
        self._own(user, dataset.owner, "datasets.update")
        version_body = body.get("body") or {}
        files = self._files(user, version_body.get("files", []))
        with self.lock:
            dataset.versions.append(DatasetVersion(len(dataset.versions) + 1, version_body.get("versionNotes", ""),
                                                   files, time.monotonic() + self.dataset_ready_s))
        return {"ref": dataset.ref, "url": f"{self.url}/datasets/{dataset.ref}", "status": "ok"}

    def _rpc_SaveKernel(self, user: str, body: dict[str, Any]) -> dict[str, Any]:
        owner, _, slug = (body.get("slug") or "").partition("/")
        if not slug:
            raise FakeError(400, "The fake takes pushes by slug (owner/slug)")
        self._own(user, owner, "kernels.create")
        if self.push_error:
            return {"error": self.push_error}
        invalid = [s for s in body.get("datasetDataSources") or [] if "/".join(s.split("/")[:2]) not in self.datasets]
        key = f"{owner}/{slug}"
        with self.lock:
            versions = self.kernels.setdefault(key, [])
            version = KernelVersion(owner, slug, len(versions) + 1, body)
            versions.append(version)
        thread = threading.Thread(target=self._execute, args=(version,), daemon=True, name=f"kaggle {version.ref}")
        self.threads.append(thread)
        thread.start()
        reply: dict[str, Any] = {"ref": f"/code/{key}", "url": f"{self.url}/code/{key}", "versionNumber": version.number,
                                 "kernelId": 1000 + list(self.kernels).index(key)}
        if invalid:
            reply["invalidDatasetSources"] = invalid
        return reply

    def _execute(self, version: KernelVersion) -> None:
        try:
            self.executor(self, version)
        except Exception as error:  # the executor's own failure: the kernel fails, as a broken session would
            version.set_status(ERROR, f"fake executor failed: {error!r}")
        if version.cancel.is_set():
            version.set_status(CANCEL_ACKNOWLEDGED)

    def _version(self, user: str, body: dict[str, Any]) -> KernelVersion:
        key = f"{body.get('userName')}/{body.get('kernelSlug')}"
        versions = self.kernels.get(key)
        if not versions or body.get("userName") != user:
            raise FakeError(403, "Permission 'kernels.get' was denied")
        label = body.get("versionLabel") or ""
        if not label:
            return versions[-1]
        number = int(label.lstrip("v")) if label.lstrip("v").isdigit() else 0
        if not 1 <= number <= len(versions):
            raise FakeError(404, f"Kernel version {label} not found")
        return versions[number - 1]

    def _rpc_GetKernelSessionStatus(self, user: str, body: dict[str, Any]) -> dict[str, Any]:
        version = self._version(user, body)
        reply = {"status": version.status}
        if version.failure_message:
            reply["failureMessage"] = version.failure_message
        return reply

    def _rpc_ListKernelSessionOutput(self, user: str, body: dict[str, Any]) -> dict[str, Any]:
        version = self._version(user, body)
        done = version.status in FINISHED
        names = sorted(version.outputs) if done else []  # output appears when the session ends
        size = min(int(body.get("pageSize") or 20), self.output_page_size)
        token = body.get("pageToken") or ""
        start = int(base64.urlsafe_b64decode(token.encode()).decode()) if token else 0
        page = names[start:start + size]
        reply: dict[str, Any] = {
            "files": [{"fileName": name, "url": f"{self.url}/output/{version.owner}/{version.slug}/{version.number}/"
                                                f"{urllib.parse.quote(name)}"} for name in page],
            "log": version.log_text() if done else "",
        }
        if start + size < len(names):
            reply["nextPageToken"] = base64.urlsafe_b64encode(str(start + size).encode()).decode()
        return reply


def _handler(served: FakeKaggle) -> type[BaseHTTPRequestHandler]:
    fake = served

    class Handler(JSONHandler):
        fake = served

        def _error(self, status: int, message: str) -> None:
            self._send(status, {"code": status, "message": message})

        def _path(self) -> str:
            path = self.path.split("?")[0]
            return path[len("/api"):] if path.startswith("/api/") else path

        # ---- routes -----------------------------------------------------------------------

        def do_POST(self) -> None:
            body = self._body()
            self._record(body)
            parts = self._path().split("/")  # "", "v1", service, method
            if len(parts) != 4 or parts[1] != "v1":
                return self._error(404, f"No route {self.path}")
            try:
                request = json.loads(body or b"{}")
            except json.JSONDecodeError:
                return self._error(400, "The body is not JSON")
            method = parts[3]
            if method == "IntrospectToken":  # the token is in the body; no other auth needed
                username = fake.tokens.get(request.get("token", ""))
                return self._send(200, {"active": True, "username": username} if username else {"active": False})
            user = fake.user_for(self.headers.get("Authorization", ""))
            if user is None:
                return self._error(401, "Unauthenticated")
            try:
                self._send(200, fake.rpc(method, user, request))
            except FakeError as error:
                self._error(error.status, error.message)

        def do_PUT(self) -> None:
            body = self._body()
            self._record(body)
            parts = self._path().split("/")
            blob = fake.blobs.get(parts[2]) if len(parts) == 3 and parts[1] == "upload" else None
            if blob is None:
                return self._send(404, b"", content_type="text/plain")
            if blob["length"] and len(body) != blob["length"]:
                return self._send(400, b"length differs from StartBlobUpload's contentLength", content_type="text/plain")
            blob["data"] = body
            self._send(200, {"ok": True})

        def do_GET(self) -> None:
            self._record(b"")
            parts = self._path().split("/")
            if len(parts) >= 6 and parts[1] == "output":  # /output/owner/slug/N/name...
                return self._output(parts[2], parts[3], int(parts[4]), urllib.parse.unquote("/".join(parts[5:])))
            if len(parts) == 7 and parts[1:4] == ["v1", "kernels", "logs"] and parts[4] == "stream":
                return self._log_stream(parts[5], parts[6])
            self._error(404, f"No route {self.path}")

        def _output(self, owner: str, slug: str, number: int, name: str) -> None:
            versions = fake.kernels.get(f"{owner}/{slug}") or []
            data = versions[number - 1].outputs.get(name) if 1 <= number <= len(versions) else None
            if data is None:
                return self._send(404, b"", content_type="text/plain")
            self._send(200, data, content_type="application/octet-stream",
                       headers={"Last-Modified": formatdate(usegmt=True)})

        def _log_stream(self, owner: str, slug: str) -> None:
            user = fake.user_for(self.headers.get("Authorization", ""))
            if user is None:
                return self._error(401, "Unauthenticated")
            label = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query).get("versionLabel", [""])[0]
            try:
                version = fake._version(user, {"userName": owner, "kernelSlug": slug, "versionLabel": label})
            except FakeError as error:
                return self._error(error.status, error.message)
            if version.status in FINISHED:  # the persisted blob
                return self._send(200, version.log_text().encode(), content_type="application/json")
            # Chunked, one chunk an event: urllib3 hands a chunked body over chunk by chunk, where a
            # close-delimited one would sit in the client's 512-byte iter_lines buffer.
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()

            def chunk(text: str) -> None:
                data = text.encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()

            sent = 0
            while True:
                with version.changed:
                    while sent == len(version.events) and version.status not in FINISHED:
                        version.changed.wait(0.5)
                    events, done = version.events[sent:], version.status in FINISHED
                for event in events:
                    chunk(f"data: {json.dumps(event)}\n\n")
                sent += len(events)
                if done:
                    chunk(f"data: {LOG_END}\n\n")
                    self.wfile.write(b"0\r\n\r\n")
                    self.wfile.flush()
                    return

    return Handler


def point_client_at(url: str, api: Any) -> Any:
    """Map the real client's LOCAL environment to `url` and make `api` (a KaggleApi) use it: what
    the provider does with QLORA_LAUNCH_KAGGLE_URL. Process-wide for kagglesdk's LOCAL endpoint."""
    from kagglesdk.kaggle_env import KaggleEnv, _env_to_endpoint

    _env_to_endpoint[KaggleEnv.LOCAL] = url.rstrip("/")
    api.args = ["--local"]
    return api


def main() -> None:
    parser = argparse.ArgumentParser(description="A fake Kaggle API (kaggle 2.2.5's RPCs) on 127.0.0.1.")
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--username", default="tester")
    parser.add_argument("--key", default="test-key")
    parser.add_argument("--token", default=None, help="an access token it also accepts")
    args = parser.parse_args()
    fake = FakeKaggle(username=args.username, key=args.key, token=args.token, port=args.port).start()
    print(f"fake Kaggle API on {fake.url} (user {args.username}); QLORA_LAUNCH_KAGGLE_URL={fake.url}", flush=True)
    try:
        fake.thread.join()
    except KeyboardInterrupt:
        fake.stop()


if __name__ == "__main__":
    main()
