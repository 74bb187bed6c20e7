"""A stand-in for SkyPilot's client SDK (the `sky` module as the sky provider calls it), whose
clusters are real sshd's on 127.0.0.1, for what cannot run here: a real cloud launch.

The task and resources the provider builds are SkyPilot's own classes (sky.Task, sky.Resources)
and are checked with SkyPilot's own code: the pinned resources must price, through SkyPilot's
catalog, at the $/h of the offer. Only the API server's requests are faked: launch, exec,
status (with the SSH credentials SkyPilot 0.14 returns), down, api_cancel, get, stream_and_get,
and the managed jobs' jobs.launch/queue_v2/cancel/tail_logs (FakeJobs: the controller, here).

A launched cluster runs the task's run command for real (the keep-alive watchdog of
cluster_templates/sky_task.yaml) in the cluster's own HOME, with SkyPilot's node variables.
Faults: fail_launch (SkyPilot raises as a failed setup does; the cluster stays, INIT, as
SkyPilot keeps it "for debugging"), break_ssh (up, but nothing answers SSH), hang_launch (the
launch never returns), preempt(name) (the cloud took the spot nodes back)."""

from __future__ import annotations

import contextlib
import fnmatch
import getpass
import itertools
import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import sky
from sky import exceptions

from tests.fakes.vast_api import _kill_instance, _marked_pids, _reap
from tests.sshd import free_port, keygen, run_sshd

MARKER = "FAKE_VAST_INSTANCE"  # the same marker the fake Vast.ai uses: its process helpers find them


@dataclass
class FakeNode:
    """One node of a cluster: its own HOME and sshd on 127.0.0.1."""

    folder: Path
    marker: str  # what the fake Vast.ai's process helpers find the node's processes by
    sshd: Optional[subprocess.Popen] = None
    port: int = 0

    @property
    def home(self) -> Path:
        return self.folder / "home"


@dataclass
class FakeCluster:
    name: str
    folder: Path
    task: Any
    autostop: dict[str, Any]
    status: Any = sky.ClusterStatus.INIT
    ever_up: bool = False
    nodes: list[FakeNode] = field(default_factory=list)
    jobs: list[subprocess.Popen] = field(default_factory=list)
    launched_at: float = field(default_factory=time.time)

    @property
    def home(self) -> Path:
        return self.nodes[0].home

    @property
    def marker(self) -> str:
        return f"sky-{self.name}"

    @property
    def resources(self) -> Any:
        return next(iter(self.task.resources))


class FakeSky:
    """Used as SkyProvider(client=FakeSky(...)). Attributes the provider reads from `sky`."""

    StatusRefreshMode = sky.StatusRefreshMode
    Task = sky.Task
    Resources = sky.Resources
    ClusterStatus = sky.ClusterStatus

    def __init__(self, folder: Path, *, fail_launch: Optional[str] = None, break_ssh: bool = False,
                 hang_launch: bool = False) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.fail_launch, self.break_ssh, self.hang_launch = fail_launch, break_ssh, hang_launch
        self.clusters: dict[str, FakeCluster] = {}
        self.calls: list[tuple[str, Any]] = []  # (call, cluster or request): what the provider asked for
        self.key = keygen(folder / "sky-key") if not (folder / "sky-key").exists() else folder / "sky-key"
        self._requests: dict[str, Any] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.cancelled: list[str] = []
        self.jobs = FakeJobs(self, folder / "managed-jobs")

    # ---- requests -----------------------------------------------------------------------------

    def _request(self, call: str, subject: Any, work: Any) -> str:
        rid = f"req-{next(self._ids)}"
        self.calls.append((call, subject))
        self._requests[rid] = work
        return rid

    def get(self, request_id: str) -> Any:
        return self._requests.pop(request_id)()

    def stream_and_get(self, request_id: str, output_stream: Any = None, **_: Any) -> Any:
        if output_stream is not None:
            output_stream.write(f"fake SkyPilot: request {request_id}\n")
        return self.get(request_id)

    def api_cancel(self, request_id: Any) -> str:
        self.cancelled.append(str(request_id))
        return self._request("api_cancel", request_id, lambda: [str(request_id)])

    # ---- clusters -----------------------------------------------------------------------------

    def launch(self, task: Any, cluster_name: str, idle_minutes_to_autostop: Optional[int] = None,
               down: bool = False, wait_for: Any = None, retry_until_up: bool = False, **_: Any) -> str:
        autostop = {"idle_minutes": idle_minutes_to_autostop, "down": down, "wait_for": wait_for}
        return self._request("launch", cluster_name, lambda: self._launch(task, cluster_name, autostop))

    def _launch(self, task: Any, name: str, autostop: dict[str, Any]) -> tuple[int, Any]:
        resources = next(iter(task.resources))
        # SkyPilot's own pricing of the pinned resources: an instance type it does not know raises here.
        resources.get_cost(3600)
        cluster = FakeCluster(name, self.folder / name, task, autostop)
        cluster.nodes = [FakeNode(cluster.folder / f"node{i}", f"sky-{name}") for i in range(task.num_nodes)]
        for node in cluster.nodes:
            node.home.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self.clusters[name] = cluster
        if self.hang_launch:
            while name in self.clusters:
                time.sleep(0.05)
            raise exceptions.ClusterSetUpError("the launch was torn down")
        if self.fail_launch:
            raise exceptions.ClusterSetUpError(f"Failed to set up SkyPilot runtime on cluster: {self.fail_launch}")
        for node in cluster.nodes:
            for remote, local in (task.file_mounts or {}).items():  # SkyPilot rsyncs them to each node
                target = node.home / remote.removeprefix("~/")
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(local, target)
            node.port = free_port()
            if not self.break_ssh:
                node.sshd, _ = run_sshd(node.folder, [Path(f"{self.key}.pub").read_text()], node.port,
                                        session_env={"HOME": str(node.home)}, process_env={MARKER: node.marker})
        cluster.status, cluster.ever_up = sky.ClusterStatus.UP, True
        self._run_job(cluster, task)
        return 1, None

    def _run_job(self, cluster: FakeCluster, task: Any) -> None:
        """The task's run command on every node, with SkyPilot's node variables (all on 127.0.0.1)."""
        gpus = next(iter((cluster.resources.accelerators or {"none": 0}).values()))
        for rank, node in enumerate(cluster.nodes):
            env = {"PATH": os.environ.get("PATH", ""), "HOME": str(node.home), MARKER: node.marker,
                   **{k: str(v) for k, v in (task.envs or {}).items()},
                   "SKYPILOT_NODE_RANK": str(rank), "SKYPILOT_NODE_IPS": "\n".join("127.0.0.1" for _ in cluster.nodes),
                   "SKYPILOT_NUM_NODES": str(len(cluster.nodes)), "SKYPILOT_NUM_GPUS_PER_NODE": str(int(gpus))}
            log = open(node.folder / "job.log", "a")
            cluster.jobs.append(subprocess.Popen(["bash", "-c", task.run], cwd=node.home, env=env, stdout=log,
                                                 stderr=subprocess.STDOUT, start_new_session=True))

    def exec(self, task: Any, cluster_name: str, **_: Any) -> str:
        def work() -> tuple[int, Any]:
            cluster = self.clusters.get(cluster_name)
            if cluster is None or cluster.status != sky.ClusterStatus.UP:
                raise exceptions.ClusterNotUpError(f"cluster {cluster_name!r} is not up")
            self._run_job(cluster, task)
            return len(cluster.jobs), None

        return self._request("exec", cluster_name, work)

    def status(self, cluster_names: Optional[list[str]] = None, refresh: Any = None,
               _include_credentials: bool = False, **_: Any) -> str:
        def work() -> list[Any]:
            names = cluster_names or ["*"]
            return [self._record(c, _include_credentials) for c in list(self.clusters.values())
                    if any(fnmatch.fnmatch(c.name, pattern) for pattern in names)]

        return self._request("status", cluster_names, work)

    def _record(self, cluster: FakeCluster, credentials: bool) -> Any:
        up = cluster.ever_up  # SkyPilot's handle: cached_external_ips/ports, head first
        handle = SimpleNamespace(cached_external_ips=["127.0.0.1" for _ in cluster.nodes] if up else None,
                                 cached_external_ssh_ports=[n.port for n in cluster.nodes] if up else None,
                                 ssh_user=None, launched_resources=cluster.resources)
        record = SimpleNamespace(name=cluster.name, status=cluster.status, handle=handle,
                                 cluster_ever_up=cluster.ever_up, autostop=cluster.autostop["idle_minutes"],
                                 to_down=cluster.autostop["down"], credentials=None)
        if credentials:
            record.credentials = {"ssh_user": getpass.getuser(), "ssh_private_key": str(self.key),
                                  "ssh_private_key_content": None}
        return record

    def down(self, cluster_name: str, purge: bool = False, **_: Any) -> str:
        def work() -> None:
            with self._lock:
                cluster = self.clusters.pop(cluster_name, None)
            if cluster is None:
                raise exceptions.ClusterDoesNotExist(f"Cluster {cluster_name!r} does not exist.")
            self._kill(cluster)

        return self._request("down", cluster_name, work)

    # ---- faults and checks --------------------------------------------------------------------

    def preempt(self, cluster_name: str) -> None:
        """The cloud took the spot node back: SkyPilot's refreshed status drops the cluster."""
        cluster = self.clusters.pop(cluster_name)
        self._kill(cluster)

    def _kill(self, cluster: FakeCluster) -> None:
        for node in cluster.nodes:
            _kill_instance(node, grace_s=2.0)  # type: ignore[arg-type]
            _reap(node)  # type: ignore[arg-type]
        for job in cluster.jobs:
            try:
                job.wait(timeout=5)
            except subprocess.TimeoutExpired:
                job.kill()

    def alive(self) -> list[str]:
        """Clusters that would still bill, and processes of any cluster still running."""
        return sorted(self.clusters) + [f"pid {p}" for c in self.folder.iterdir() if c.is_dir()
                                        for p in _marked_pids(f"sky-{c.name}")] + self.jobs.live() + [
            f"pid {p}" for j in self.jobs.jobs.values() for p in _marked_pids(j.marker)]

    def stop(self) -> None:
        for name in list(self.clusters):
            self._kill(self.clusters.pop(name))
        self.jobs.stop()

    def launched(self) -> list[str]:
        return [subject for call, subject in self.calls if call == "launch"]

    def downed(self) -> list[str]:
        return [subject for call, subject in self.calls if call == "down"]


# ---------------------------------------------------------------------------------------------
# managed jobs (sky.jobs): the controller, on this machine
# ---------------------------------------------------------------------------------------------


@dataclass
class FakeManagedJob:
    job_id: int
    name: str
    task: Any
    folder: Path
    status: Any = sky.jobs.ManagedJobStatus.PENDING
    recovery_count: int = 0
    failure_reason: Optional[str] = None
    process: Optional[subprocess.Popen] = None
    submitted_at: float = field(default_factory=time.time)
    end_at: Optional[float] = None

    @property
    def log(self) -> Path:
        return self.folder / "job.log"

    @property
    def home(self) -> Path:
        return self.folder / f"node{self.recovery_count}" / "home"

    @property
    def marker(self) -> str:
        return f"sky-job-{self.job_id}"


class FakeJobs:
    """sky.jobs as the managed mode calls it: launch, queue_v2, cancel, tail_logs. A job runs as
    SkyPilot's controller runs it: on a new "cluster" (a fresh HOME here) the file mounts are
    copied, `setup` runs, then `run`, with the task's envs and secrets in the environment.
    preempt(job_id) is a spot preemption the controller recovers from: the node is killed and
    its disk gone, and setup and run start again on a new one (RECOVERING, recovery_count + 1)."""

    def __init__(self, sky_fake: "FakeSky", folder: Path) -> None:
        self.sky_fake = sky_fake
        self.folder = folder
        self.jobs: dict[int, FakeManagedJob] = {}
        self._ids = itertools.count(1)
        self.launched_tasks: list[Any] = []
        self.no_capacity = False  # jobs stay PENDING, as a first launch with no capacity does (retried forever)

    def launch(self, task: Any, name: Optional[str] = None, **_: Any) -> str:
        return self.sky_fake._request("jobs.launch", name, lambda: self._launch(task, name or "job"))

    def _launch(self, task: Any, name: str) -> tuple[list[int], Any]:
        next(iter(task.resources)).get_cost(3600)  # SkyPilot prices what it will rent: unknown types raise
        job = FakeManagedJob(next(self._ids), name, task, self.folder / f"job-{len(self.jobs) + 1}")
        job.folder.mkdir(parents=True, exist_ok=True)
        self.jobs[job.job_id] = job
        self.launched_tasks.append(task)
        if not self.no_capacity:
            self._start(job)
        return [job.job_id], None

    def _start(self, job: FakeManagedJob) -> None:
        home = job.home
        home.mkdir(parents=True, exist_ok=True)
        for remote, local in (job.task.file_mounts or {}).items():
            target = home / remote.removeprefix("~/")
            target.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if Path(local).is_dir() else shutil.copy2)(local, target)
        env = {"PATH": os.environ.get("PATH", ""), "HOME": str(home), MARKER: job.marker,
               **{k: str(v) for k, v in (job.task.envs or {}).items()},
               **{k: v.get_secret_value() for k, v in (job.task.secrets or {}).items()},
               "SKYPILOT_MANAGED_JOB_ID": str(job.job_id), "SKYPILOT_NODE_RANK": "0", "SKYPILOT_NUM_NODES": "1"}
        script = (f"( {job.task.setup or 'true'}\n) || exit 200\n" f"{job.task.run}")
        with job.log.open("a") as log:
            job.process = subprocess.Popen(["bash", "-c", script], cwd=home, env=env, stdout=log,
                                           stderr=subprocess.STDOUT, start_new_session=True)
        job.status = sky.jobs.ManagedJobStatus.RUNNING
        process = job.process
        threading.Thread(target=self._watch, args=(job, process), daemon=True).start()

    def _watch(self, job: FakeManagedJob, process: subprocess.Popen) -> None:
        code = process.wait()
        if job.process is not process or job.status in (sky.jobs.ManagedJobStatus.RECOVERING,
                                                         sky.jobs.ManagedJobStatus.CANCELLED):
            return  # preempted (a new node runs it) or cancelled
        job.end_at = time.time()
        if code == 0:
            job.status = sky.jobs.ManagedJobStatus.SUCCEEDED
        elif code == 200:
            job.status, job.failure_reason = sky.jobs.ManagedJobStatus.FAILED_SETUP, "setup failed"
        else:
            job.status, job.failure_reason = sky.jobs.ManagedJobStatus.FAILED, f"the run exited with {code}"

    def queue_v2(self, refresh: bool, skip_finished: bool = False, all_users: bool = False,
                 job_ids: Optional[list[int]] = None, name_match: Optional[str] = None, fields: Any = None,
                 **_: Any) -> str:
        def work() -> tuple[list[Any], int, dict[str, int], int]:
            if not self.jobs:  # SkyPilot: no jobs controller yet (sky/jobs/server/core.py, queue)
                raise exceptions.ClusterNotUpError("No in-progress managed jobs.")
            records = [SimpleNamespace(job_id=j.job_id, job_name=j.name, status=j.status,
                                       recovery_count=j.recovery_count, failure_reason=j.failure_reason,
                                       submitted_at=j.submitted_at, end_at=j.end_at)
                       for j in self.jobs.values()
                       if (not job_ids or j.job_id in job_ids) and (not name_match or name_match in j.name)]
            return records, len(records), {}, len(self.jobs)

        return self.sky_fake._request("jobs.queue_v2", name_match, work)

    def cancel(self, name: Optional[str] = None, job_ids: Optional[list[int]] = None, **_: Any) -> str:
        def work() -> None:
            for job_id in job_ids or []:
                job = self.jobs.get(job_id)
                if job is None or job.status.is_terminal():
                    continue
                job.status = sky.jobs.ManagedJobStatus.CANCELLED  # SkyPilot: the run stopped, the cluster down
                job.end_at = time.time()
                self._kill(job, grace_s=60.0)

        return self.sky_fake._request("jobs.cancel", job_ids, work)

    def tail_logs(self, name: Optional[str] = None, job_id: Optional[int] = None, follow: bool = True,
                  output_stream: Any = None, **_: Any) -> Optional[int]:
        job = self.jobs[job_id] if job_id else None
        if job is None:
            return 102  # JobExitCode.NOT_FOUND
        offset = 0
        while True:
            text = job.log.read_text() if job.log.exists() else ""
            if len(text) > offset:
                output_stream.write(text[offset:])
                offset = len(text)
            if not follow:
                return None
            if job.status.is_terminal():
                return 0 if job.status == sky.jobs.ManagedJobStatus.SUCCEEDED else 100
            time.sleep(0.2)

    def preempt(self, job_id: int) -> None:
        """The cloud took the spot node back: the controller relaunches setup and run on a new node."""
        job = self.jobs[job_id]
        job.status = sky.jobs.ManagedJobStatus.RECOVERING
        self._kill(job, grace_s=0.0)
        job.recovery_count += 1
        self._start(job)

    def _kill(self, job: FakeManagedJob, grace_s: float) -> None:
        process = job.process
        if process is None or process.poll() is not None:
            return
        try:
            os.killpg(process.pid, signal.SIGTERM if grace_s else signal.SIGKILL)
            process.wait(timeout=grace_s or 10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)

    def live(self) -> list[str]:
        return [f"managed job {j.job_id} {j.status.value}" for j in self.jobs.values() if not j.status.is_terminal()]

    def stop(self) -> None:
        for job in self.jobs.values():
            self._kill(job, grace_s=0.0)
