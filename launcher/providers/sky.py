"""The clouds through SkyPilot (AWS, GCP, Azure, Lambda, RunPod, DigitalOcean): we write no cloud
client of our own. An offer here is one row of SkyPilot's price catalog (its provider field is
the cloud); renting it launches a SkyPilot cluster pinned to that row, and the job then runs over
SSH through the same shell workspace as on every other target.

What users of SkyPilot lost money or hours on, and what this module does instead:
- A cluster whose setup failed stays up, billing, "kept for debugging": any exception after the
  launch call (setup failed, SSH never answered, Ctrl-C) downs the cluster before it is raised.
- Autodown not set, or set and firing under a running job (idleness is SkyPilot's job queue, a
  runner started over SSH is invisible to it): the cluster's own job is a keep-alive watchdog
  (cluster_templates/sky_task.yaml) and autostop is armed at launch with down=True.
- Requests stuck on an API server that does not answer: every call is bounded (sky_client.py).
- Catalog vs. billed price: our cost is the catalog price x uptime, and the summary says so.

SkyPilot is an extra (`pip install 'qlora-launch[sky]'`); without it the clouds are priced from
the shipped catalog snapshots and renting says how to install it."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

from launcher import catalog, clock
from launcher.paths import SHIPPED_CATALOGS
from launcher.providers import sky_client, sky_managed
from launcher.providers.base import (
    Availability, LabelledMachine, MachineSpec, MachineState, NeedsCredentials, Need, Offer, Provider,
    ProviderContext, ProviderError, Provisioned, Sweepable,
)
from launcher.providers.sky_task import CLUSTER_PREFIX, build_task, cluster_name, pinned_resources, task_config
from launcher.remote import Machine, SSHAddress, SSHMachine, SSHOptions, Unreachable
from launcher.runs import private_folder, state_dir

# The clouds this provider rents on, by SkyPilot's names. Vast.ai has a provider of its own (live
# offers, its own watchdog); Kubernetes, SSH node pools and Slurm have no price catalog.
SKY_CLOUDS = ("aws", "gcp", "azure", "lambda", "runpod", "do")
SINGLE_NODE_CLOUDS = ("runpod",)  # SkyPilot provisions one node there (and on Vast.ai)
TITLES = {"aws": "AWS", "gcp": "GCP", "azure": "Azure", "lambda": "Lambda", "runpod": "RunPod", "do": "DigitalOcean"}
# Where each cloud's credentials live, so a laptop with none is told at once, without importing
# SkyPilot (3 s) or asking the cloud (from each cloud's check_credentials in sky/clouds/).
CREDENTIAL_SOURCES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {  # cloud: (env vars, files)
    "aws": (("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI"),
            ("~/.aws/credentials", "~/.aws/config")),
    "gcp": (("GOOGLE_APPLICATION_CREDENTIALS",),
            ("~/.config/gcloud/application_default_credentials.json", "~/.config/gcloud/credentials.db")),
    "azure": ((), ("~/.azure/msal_token_cache.json",)),
    "lambda": ((), ("~/.lambda_cloud/lambda_keys",)),
    "runpod": (("RUNPOD_API_KEY",), ("~/.runpod/config.toml",)),
    "do": ((), ("~/.config/doctl/config.yaml",)),
}
TERMINATE_TRIES = 4


class SkySettings(BaseModel):
    """resources.sky: which clouds to rent on, and how a cluster is torn down."""

    model_config = ConfigDict(extra="forbid")

    clouds: list[str] = Field(default_factory=lambda: list(SKY_CLOUDS))
    # Autodown: the cluster is torn down (not stopped: a stopped cloud VM still bills its disk) this
    # long after its keep-alive job ends, i.e. after the run is over and the launcher has gone.
    idle_minutes: int = Field(10, ge=1)
    # The keep-alive job ends when no runner trains and the launcher has not looked in this long.
    watchdog_idle_minutes: float = Field(30.0, gt=0)
    image_id: Optional[str] = None  # None: SkyPilot's default GPU image for the cloud (CUDA, python3); or a VM image
    disk_gb: int = Field(100, ge=20)  # the node's disk: venv ~8 GB, model, checkpoints
    launch_timeout_s: float = Field(2400.0, gt=0)  # provisioning + SkyPilot's setup (it installs its runtime)
    ssh_timeout_s: float = Field(300.0, gt=0)  # up, but SSH silent this long: downed
    api_server_timeout_s: float = Field(120.0, gt=0)  # SkyPilot's API server must answer within this
    max_offers_tried: int = Field(3, ge=1)
    # Managed mode (`launch --managed`): the job runs as a SkyPilot managed job that SkyPilot's
    # controller recovers from preemptions itself; needs storage.kind: s3 (launcher/providers/sky_managed.py).
    managed: bool = False
    controller_usd_per_hour: Optional[float] = Field(None, ge=0)  # None: SkyPilot's default controller VM, priced
    managed_submit_timeout_s: float = Field(1800.0, gt=0)  # until the job is queued (a first controller: minutes)
    managed_start_timeout_s: float = Field(3600.0, gt=0)  # queued but never running this long: cancelled

    @field_validator("image_id")
    @classmethod
    def _vm_image(cls, image_id: Optional[str]) -> Optional[str]:
        if image_id and image_id.startswith("docker:"):
            # SkyPilot reaches a container through an SSH proxy command of its own; our SSH would land
            # on the VM outside it, and train there.
            raise ValueError(f"{image_id}: docker images are not supported (our SSH would reach the VM, not the "
                             "container); leave image_id unset for SkyPilot's GPU image, or give a VM image id")
        return image_id

    @field_validator("clouds")
    @classmethod
    def _known(cls, clouds: list[str]) -> list[str]:
        unknown = [c for c in clouds if c not in SKY_CLOUDS]
        if unknown:
            raise ValueError(f"{', '.join(unknown)}: not a cloud we rent on through SkyPilot; "
                             f"choose from {', '.join(SKY_CLOUDS)}")
        return clouds


class SkyMachine(SSHMachine):
    """The head node of a SkyPilot cluster; `address` None when it cannot be reached (gone)."""

    def __init__(self, cluster: str, address: Optional[SSHAddress], options: SSHOptions) -> None:
        super().__init__(address or SSHAddress(host="unreachable.invalid"), options)
        self.cluster = cluster
        self.name = machine_name(cluster)


def machine_name(cluster: str) -> str:
    return f"sky:{cluster}"


# ---------------------------------------------------------------------------------------------
# credentials, per cloud
# ---------------------------------------------------------------------------------------------


def local_credentials(cloud: str) -> Optional[str]:
    """Where this cloud's credentials were found here (an env var or a file), else None."""
    env_vars, files = credential_sources(cloud)
    for var in env_vars:
        if os.environ.get(var):
            return var
    for file in files:
        path = Path(file).expanduser()
        if path.is_file() and path.stat().st_size > 0:  # an empty file holds no credentials
            return file
    return None


def credential_sources(cloud: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    env_vars, files = CREDENTIAL_SOURCES.get(cloud, ((), ()))
    if cloud == "aws":  # boto reads these files from where these variables say, when they are set
        files = (os.environ.get("AWS_SHARED_CREDENTIALS_FILE", files[0]), os.environ.get("AWS_CONFIG_FILE", files[1]))
    return env_vars, files


@functools.lru_cache(maxsize=None)
def cloud_availability(cloud: str) -> Availability:
    """Whether SkyPilot can rent on `cloud` from here: its own check_credentials (no API server),
    asked only when credentials are there at all. Cached for the process."""
    title = TITLES.get(cloud, cloud)
    if not sky_client.installed():
        return Availability(False, "not enabled: SkyPilot is not installed here", sky_client.INSTALL_HINT)
    source = local_credentials(cloud)
    if source is None:
        env_vars, files = credential_sources(cloud)
        where = ", ".join(env_vars + files)
        return Availability(False, f"not enabled: no {title} credentials here (looked in {where})",
                            f"set up {title}'s credentials, then run `sky check {cloud}`")
    try:
        sky = sky_client.import_sky()
        from sky.clouds import cloud as cloud_lib

        ok, reason = sky.CLOUD_REGISTRY.from_str(cloud).check_credentials(cloud_lib.CloudCapability.COMPUTE)
    except Exception as e:  # noqa: BLE001  (a cloud's check can fail in many ways: a missing SDK extra...)
        ok, reason = False, f"{type(e).__name__}: {e}"
    if ok:
        return Availability(True, f"{title}: enabled (credentials from {source})")
    return Availability(False, f"not enabled: {sky_client.first_line(reason)}", f"run `sky check {cloud}`")


def enabled_clouds(clouds: tuple[str, ...] = SKY_CLOUDS) -> list[str]:
    return [c for c in clouds if cloud_availability(c).usable]


# ---------------------------------------------------------------------------------------------
# offers: SkyPilot's catalog code when it is installed (its catalogs refresh themselves with a
# network), else the shipped snapshots
# ---------------------------------------------------------------------------------------------


def snapshot_offers(cloud: str, folder: Optional[Path] = None) -> list[Offer]:
    """The cloud's offers from the shipped catalog snapshot, priced as SkyPilot prices them."""
    folder = folder or catalog.catalog_dir() or SHIPPED_CATALOGS
    return catalog.offers(cloud, folder) if (folder / "v8" / cloud / "vms.csv").is_file() else []


def sky_catalog_offers(cloud: str) -> list[Offer]:
    """Every GPU instance of `cloud` in every region, as SkyPilot's catalog prices it."""
    sky_client.import_sky()
    from sky import catalog as sky_catalog

    listed = sky_catalog.list_accelerators(gpus_only=True, clouds=cloud, all_regions=True, require_price=True)
    return [offer for infos in listed.values() for info in infos for offer in catalog.market_offers(
        cloud, info.region, info.instance_type, info.accelerator_name, int(info.accelerator_count),
        _gb(info.device_memory), info.price, info.spot_price)]


def _gb(value: Any) -> Optional[float]:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return round(number, 2) if number == number and number > 0 else None


# ---------------------------------------------------------------------------------------------
# the provider
# ---------------------------------------------------------------------------------------------


class SkyProvider(Provider, Sweepable, NeedsCredentials):
    name = "sky"
    title = "SkyPilot clouds"
    rents_machines = True
    settings_model = SkySettings
    markets = SKY_CLOUDS
    price_source = "catalog"  # SkyPilot's cost report is catalog x uptime too; the cloud's bill is the truth

    def __init__(self, settings: Optional[SkySettings] = None, log: Callable[[str], None] = lambda text: None,
                 workdir: Optional[str] = None, nodes: int = 1, client: Any = None) -> None:
        self.settings = settings or SkySettings()
        self.log = log
        self.workdir = workdir or self.default_workdir()
        self.nodes = nodes
        self._client = client  # tests: a stand-in for the `sky` module; else SkyPilot through its API server

    @classmethod
    def from_context(cls, context: ProviderContext) -> "SkyProvider":
        r = context.resources
        return cls(context.settings, log=context.log, workdir=r.workdir if r else None,
                   nodes=(getattr(r, "nodes", None) or 1) if r else 1)

    @classmethod
    def can_rent(cls, offer: Offer) -> bool:
        return offer.provider in SKY_CLOUDS and cloud_availability(offer.provider).usable

    @classmethod
    def availability(cls) -> Availability:
        if not sky_client.installed():
            return Availability(False, "SkyPilot is not installed", sky_client.INSTALL_HINT)
        enabled = enabled_clouds()
        if enabled:
            return Availability(True, "enabled: " + ", ".join(TITLES[c] for c in enabled))
        return Availability(False, "no cloud enabled (each is listed below)", "`sky check` says what each needs")

    @classmethod
    def sweep_availability(cls) -> Availability:
        """SkyPilot lists our clusters from its own state, whatever the clouds' credentials say now."""
        if not sky_client.installed():
            return Availability(False, "SkyPilot is not installed here, so no cluster was launched from here",
                                sky_client.INSTALL_HINT, matters=False)
        return Availability(True, "SkyPilot's cluster list")

    @classmethod
    def market_availability(cls) -> dict[str, Availability]:
        return {cloud: cloud_availability(cloud) for cloud in SKY_CLOUDS}

    @classmethod
    def spans_nodes(cls, market: str) -> bool:
        return market in SKY_CLOUDS and market not in SINGLE_NODE_CLOUDS

    @classmethod
    def run_label(cls, run_id: str) -> str:
        return cluster_name(run_id)  # a cluster's name is its label: `sky status` lists ours by the prefix

    @property
    def max_offers_tried(self) -> int:
        return self.settings.max_offers_tried

    @property
    def sky(self) -> Any:
        if self._client is None:
            self._client = sky_client.SkyServer(self.settings.api_server_timeout_s, self.log).ensure()
        return self._client

    # ---- offers -----------------------------------------------------------------------------

    def clouds(self) -> list[str]:
        """The clouds of resources.sky.clouds this job can run on (managed: those that can mount its files)."""
        return [c for c in self.settings.clouds if not self.settings.managed or c in sky_managed.MANAGED_CLOUDS]

    @classmethod
    def plan_markets(cls, resources: Any) -> Optional[tuple[str, ...]]:
        """Managed mode keeps the plan on the clouds that can run a managed job."""
        settings = getattr(resources, "sky", None)
        return sky_managed.MANAGED_CLOUDS if settings is not None and settings.managed else None

    @classmethod
    def job_problem(cls, config: Any) -> Optional[str]:
        settings = config.resources.sky
        if settings.managed and not config.storage.enabled:
            return (f"{config.path.name}: resources.sky.managed (--managed) needs a checkpoint store: every restart of "
                    "a managed job begins on an empty disk and resumes from it; set storage.kind: s3 with "
                    "storage.bucket (README: checkpoints in S3-compatible storage), or drop --managed")
        if settings.managed and (config.resources.nodes or 1) > 1:
            return (f"{config.path.name}: resources.sky.managed (--managed) trains on one node (several GPUs of it "
                    f"are fine); resources.nodes is {config.resources.nodes}: drop --managed or set nodes: 1")
        return None

    @classmethod
    def plan_note(cls, resources: Any, offer: Offer, hours: Optional[float]) -> Optional[str]:
        settings = getattr(resources, "sky", None)
        if settings is None or not settings.managed or offer.provider not in SKY_CLOUDS:
            return None
        return sky_managed.controller_note(offer.provider, settings.controller_usd_per_hour, offer.usd_per_hour, hours)

    def offers(self, need: Need, usd_per_hour: float = 0.0) -> list[Offer]:
        """The enabled clouds' GPU offers (every region, both markets), priced by SkyPilot's
        catalog when it is installed, else by the shipped snapshots; multi-node jobs only where
        SkyPilot can make several nodes. The planner does the fitting. (A cloud not enabled here
        keeps its shipped snapshot in the plan, marked as not rentable: no catalog download for it.)"""
        out: list[Offer] = []
        for cloud in self.clouds():
            if (self.nodes > 1 and cloud in SINGLE_NODE_CLOUDS) or not cloud_availability(cloud).usable:
                continue
            try:
                found = sky_catalog_offers(cloud) if sky_client.installed() else snapshot_offers(cloud)
            except Exception as e:  # noqa: BLE001  (no network for a first download, a catalog SkyPilot lacks)
                found = snapshot_offers(cloud)
                self.log(f"{TITLES[cloud]}: SkyPilot's catalog unavailable ({sky_client.first_line(e)}); "
                         + ("priced from the shipped snapshot" if found else "not priced"))
            out += [o for o in found if _matches(o, need)]
        return out

    # ---- provisioning -----------------------------------------------------------------------

    def provision(self, offer: Offer, spec: MachineSpec) -> Provisioned:
        """Launch a cluster pinned to `offer`, with autodown armed; wait until its head answers SSH.
        Any failure after the launch call downs the cluster before the error is raised."""
        if offer.provider not in SKY_CLOUDS:
            raise ProviderError(f"{offer.provider} is not a cloud we rent on through SkyPilot")
        if self.nodes > 1 and offer.provider in SINGLE_NODE_CLOUDS:
            raise ProviderError(f"{TITLES[offer.provider]} cannot make several nodes (resources.nodes: {self.nodes})")
        if self.settings.managed:
            return self._provision_managed(offer, spec)
        sky = self.sky
        cluster = cluster_name(spec.run_id)
        task = build_task(sky, offer, workdir=self.workdir, watchdog_idle_s=self.settings.watchdog_idle_minutes * 60,
                          disk_gb=self.settings.disk_gb, image_id=self.settings.image_id, nodes=self.nodes)
        log_path = state_dir() / "sky" / f"{cluster}.log"
        self.log(f"SkyPilot is launching {cluster} ({offer.instance_type} in {offer.region}); its output: {log_path}")
        request = None
        try:
            request = sky_client.bounded("the launch request", lambda: sky.launch(
                task, cluster_name=cluster, idle_minutes_to_autostop=self.settings.idle_minutes, down=True,
                wait_for=_wait_for_jobs(), retry_until_up=False), self.settings.api_server_timeout_s)
            sink = sky_client.LineSink(log_path)
            try:
                sky_client.bounded("the launch", lambda: sky.stream_and_get(request, output_stream=sink),
                                   self.settings.launch_timeout_s)
            finally:
                sink.close()
            running_since = clock.now()
            machine = self._reach(cluster, spec)
            # The catalog's price is per machine: every node of the cluster bills it.
            return Provisioned(machine, cluster, offer.usd_per_hour * self.nodes, running_since)
        except BaseException as e:
            if request is not None:
                self._cancel_quietly(request)
            self._down_quietly(cluster, f"{type(e).__name__}: {e}")
            raise

    def _provision_managed(self, offer: Offer, spec: MachineSpec) -> Provisioned:
        """Nothing is rented yet: the managed job is submitted at the workspace's start, and
        SkyPilot's controller rents its cluster (again after each preemption). The offer is kept
        here for that start, also for a resume from another launcher process."""
        if self.nodes > 1:
            raise ProviderError("managed mode trains on one node (several GPUs of it are fine); for several nodes "
                                "leave resources.sky.managed (--managed) off")
        job = sky_managed.ManagedJob(cluster_name(spec.run_id))
        private_folder(offer_file(spec.run_id).parent)
        offer_file(spec.run_id).write_text(json.dumps(dataclasses.asdict(offer)))
        _, controller = sky_managed.controller_usd_per_hour(offer.provider, self.settings.controller_usd_per_hour)
        return Provisioned(job, job.machine_id, offer.usd_per_hour + controller, clock.now())

    def _reach(self, cluster: str, spec: MachineSpec) -> SkyMachine:
        deadline = time.monotonic() + self.settings.ssh_timeout_s
        last: Optional[Exception] = None
        while True:
            machine = self._machine(cluster, spec)
            if machine.address.host != "unreachable.invalid":
                try:
                    machine.ensure_connected()
                    return machine
                except Unreachable as e:
                    last = e
            if time.monotonic() > deadline:
                raise ProviderError(f"{cluster}: SSH did not answer within {self.settings.ssh_timeout_s:.0f} s "
                                    f"({last or 'SkyPilot reports no address'})")
            time.sleep(5)

    def _record(self, cluster: str, refresh: bool = False, credentials: bool = False) -> Optional[Any]:
        """SkyPilot's status record of the cluster, None when it has none."""
        sky = self.sky
        kwargs: dict[str, Any] = {"refresh": sky.StatusRefreshMode.FORCE} if refresh else {}
        if credentials:
            kwargs["_include_credentials"] = True  # the SSH user and key (a private option: version pinned)
        records = sky_client.bounded("the cluster status",
                                     lambda: sky.get(sky.status([cluster], **kwargs)), 300 if refresh else 120)
        return next((r for r in records if sky_managed.field_of(r, "name") == cluster), None)

    def _machine(self, cluster: str, spec: MachineSpec) -> SkyMachine:
        return self._machines(cluster, spec)[0]

    def _machines(self, cluster: str, spec: MachineSpec) -> list[SkyMachine]:
        """The cluster's nodes, head first, over the SSH details SkyPilot reports (one unreachable
        machine when it reports none)."""
        record = self._record(cluster, credentials=True)
        handle = sky_managed.field_of(record, "handle") if record is not None else None
        hosts = list(getattr(handle, "cached_external_ips", None) or [])
        if record is None or not hosts:
            return [SkyMachine(cluster, None, SSHOptions(known_hosts=spec.known_hosts, control_dir=spec.control_dir))]
        ports = list(getattr(handle, "cached_external_ssh_ports", None) or [])
        credentials = sky_managed.field_of(record, "credentials") or {}
        options = SSHOptions(known_hosts=spec.known_hosts, control_dir=spec.control_dir,
                             identity=_identity_file(cluster, credentials))
        user = credentials.get("ssh_user") or getattr(handle, "ssh_user", None)
        machines = []
        for index, host in enumerate(hosts):
            port = ports[index] if index < len(ports) else (ports[0] if ports else 22)
            machine = SkyMachine(cluster, SSHAddress(host=str(host), user=user, port=int(port or 22)), options)
            if index:
                machine.name = f"{machine.name}:node{index}"
            machines.append(machine)
        return machines

    # ---- after provisioning -----------------------------------------------------------------

    def reconnect(self, machine_id: str, spec: MachineSpec) -> Machine:
        job_name = sky_managed.job_name_of(machine_id)
        if job_name is not None:
            return sky_managed.ManagedJob(job_name)
        try:
            return self._machine(machine_id, spec)
        except ProviderError:
            return SkyMachine(machine_id, None, SSHOptions(known_hosts=spec.known_hosts, control_dir=spec.control_dir))

    def state(self, machine: Machine) -> MachineState:
        """SkyPilot's status, refreshed from the cloud: a spot cluster the cloud took back is gone
        (or INIT, abnormal, after it was up) and counts as preempted. A managed job is not lost to a
        preemption (SkyPilot's controller recovers it); only a cancelled one is gone: resuming it
        submits a new job (and opens a new billing segment)."""
        if isinstance(machine, sky_managed.ManagedJob):
            try:
                record = sky_managed.managed_record(self.sky, machine.job_name, None)
            except ProviderError:
                return "unknown"
            return "gone" if sky_managed.status_of(record) == "CANCELLED" else "running"
        try:
            record = self._record(_cluster_of(machine), refresh=True)
        except ProviderError:
            return "unknown"
        return map_state(record)

    def terminate(self, machine: Machine) -> None:
        if isinstance(machine, sky_managed.ManagedJob):
            self.cancel_managed(machine.job_name)
            return
        machine.close()
        self.down(_cluster_of(machine))

    def down(self, cluster: str) -> None:
        """`sky down`, retried; a cluster SkyPilot does not know is already down."""
        sky = self.sky
        last = None
        for attempt in range(TERMINATE_TRIES):
            try:
                sky_client.bounded("the teardown", lambda: sky.get(sky.down(cluster)), 900)
                return
            except sky_client.SkyError as e:
                if e.kind == "ClusterDoesNotExist":
                    return
                last = e
            except ProviderError as e:  # no answer in time: try again
                last = e
            time.sleep(min(2 ** attempt, 15))
        raise ProviderError(f"cluster {cluster} may still be billing: tearing it down failed ({last}); run "
                            f"`sky down {cluster}` or `launch down --all`")

    def cancel_managed(self, job_name: str) -> None:
        """Cancel every live managed job of this name (SkyPilot then tears its cluster down)."""
        try:
            sky_managed.cancel(self.sky, [sky_managed.field_of(r, "job_id") for r in sky_managed.live_jobs(self.sky, job_name)])
        except ProviderError as e:
            raise ProviderError(f"managed job {job_name} may still be billing: cancelling it failed ({e}); run "
                                f"`sky jobs cancel -n {job_name}`") from None

    def _down_quietly(self, cluster: str, why: str) -> None:
        try:
            self.down(cluster)
            self.log(f"cluster {cluster} torn down ({why})")
        except ProviderError as e:
            self.log(str(e))

    def _cancel_quietly(self, request: Any) -> None:
        try:
            sky_client.bounded("cancelling the launch", lambda: self.sky.get(self.sky.api_cancel(request)), 60)
        except Exception:  # noqa: BLE001  (the down that follows is what matters)
            pass

    def labelled_machines(self) -> list[LabelledMachine]:
        """Every cluster of ours SkyPilot knows (by our name prefix), launched here or not."""
        sky = self.sky
        records = sky_client.bounded("the cluster list", lambda: sky.get(sky.status([f"{CLUSTER_PREFIX}*"])), 300)
        out = []
        for record in records:
            name = str(sky_managed.field_of(record, "name"))
            if name.startswith(CLUSTER_PREFIX):
                out.append(LabelledMachine(machine_id=name, name=machine_name(name), label=name,
                                           status=str(getattr(sky_managed.field_of(record, "status"), "value", "?")),
                                           usd_per_hour=_hourly(record)))
        for record in sky_managed.live_jobs(sky):
            name = str(sky_managed.field_of(record, "job_name"))
            if name.startswith(CLUSTER_PREFIX):
                job = sky_managed.ManagedJob(name)
                out.append(LabelledMachine(machine_id=job.machine_id, name=job.name, label=name,
                                           status=str(sky_managed.status_of(record)), usd_per_hour=0.0))
        return out

    def destroy_machine(self, machine_id: str) -> None:
        job_name = sky_managed.job_name_of(machine_id)
        if job_name is not None:
            self.cancel_managed(job_name)
        else:
            self.down(machine_id)

    def open_workspace(self, machine: Machine, run_id: str, workdir: Optional[str] = None,
                       run_folder: Optional[str] = None, config: Any = None) -> Any:
        from launcher.providers.sky_workspace import ClusterWorkspace, SkyWorkspace
        from launcher.workspace import ShellWorkspace

        if isinstance(machine, sky_managed.ManagedJob):
            return self.managed_workspace(machine, run_id, config)
        cluster = _cluster_of(machine)
        base = super().open_workspace(machine, run_id, workdir or self.workdir, run_folder)
        rearm = lambda: self.rearm_watchdog(cluster)  # noqa: E731
        if self.nodes == 1:
            return SkyWorkspace(base.machine, base.folder, rearm)
        options = machine.options  # type: ignore[attr-defined]  (a SkyMachine: how its head is reached)
        spec = MachineSpec(run_id, known_hosts=options.known_hosts, control_dir=options.control_dir)
        workers = self._machines(cluster, spec)[1:]
        if len(workers) != self.nodes - 1:
            raise ProviderError(f"cluster {cluster}: SkyPilot reports {len(workers) + 1} nodes, "
                                f"the job asks for {self.nodes} (resources.nodes)")
        # Each worker's folder resolved there (the same path on a real cluster: one image, one user).
        nodes = [base, *(ShellWorkspace.create(worker, workdir or self.workdir, run_id) for worker in workers)]
        return ClusterWorkspace(nodes, rearm)

    def managed_workspace(self, job: "sky_managed.ManagedJob", run_id: str, config: Any) -> Any:
        from launcher.providers.sky_managed_workspace import ManagedWorkspace

        def resources() -> Any:  # asked at a start only: a look needs no SkyPilot classes
            saved = offer_file(run_id)
            if not saved.is_file():
                raise ProviderError(f"run {run_id}: the offer it was planned on ({saved}) is gone; launch it again")
            offer = Offer(**json.loads(saved.read_text()))
            return pinned_resources(self.sky, offer, disk_gb=self.settings.disk_gb, image_id=self.settings.image_id,
                                    any_region=True)

        return ManagedWorkspace(lambda: self.sky, job, run_id, resources, config,
                                self.settings.managed_submit_timeout_s, self.settings.managed_start_timeout_s)

    def rearm_watchdog(self, cluster: str) -> None:
        """Submit the keep-alive job again (its earlier run ended: the run had ended, or the
        launcher was away) before a runner is started again on this cluster."""
        sky = self.sky
        task = sky.Task.from_yaml_config(task_config(self.workdir, self.settings.watchdog_idle_minutes * 60,
                                                     self.nodes))
        task.set_resources(sky.Resources())  # no GPU demand: never queued behind another job of the cluster
        sky_client.bounded("re-arming the keep-alive job", lambda: sky.get(sky.exec(task, cluster_name=cluster)), 300)


def offer_file(run_id: str) -> Path:
    """Where a managed run keeps the offer it was planned on (its job is submitted again on a resume)."""
    return state_dir() / "managed" / f"{run_id}.offer.json"


def map_state(record: Optional[Any]) -> MachineState:
    if record is None:
        return "gone"
    status = getattr(sky_managed.field_of(record, "status"), "value", sky_managed.field_of(record, "status"))
    if status == "UP":
        return "running"
    if status == "STOPPED":
        return "stopped"
    if status in ("INIT", "PENDING"):
        # INIT after the cluster was up: a node went away (a spot preemption) or ray died.
        return "preempted" if sky_managed.field_of(record, "cluster_ever_up") else "starting"
    if status == "AUTOSTOPPING":
        return "stopped"
    return "unknown"


def _matches(offer: Offer, need: Need) -> bool:
    if need.gpu_count and need.gpu and offer.gpu_count != need.gpu_count:
        return False
    if need.interruptible is not None and offer.interruptible != need.interruptible:
        return False
    return need.max_usd_per_hour is None or offer.usd_per_hour <= need.max_usd_per_hour


def _wait_for_jobs() -> Any:
    """Idleness by the job queue only: an interactive SSH session a user left open must not keep
    a GPU billing forever (SkyPilot's default also waits for SSH sessions with a terminal)."""
    from sky.skylet import autostop_lib

    return autostop_lib.AutostopWaitFor.JOBS


def _identity_file(cluster: str, credentials: dict[str, Any]) -> Optional[Path]:
    """The cluster's SSH key: SkyPilot's own file when it is on this machine, else its content
    written to a 0600 file of ours (a remote API server sends the content)."""
    path = credentials.get("ssh_private_key")
    if path and Path(path).expanduser().is_file():
        return Path(path).expanduser()
    content = credentials.get("ssh_private_key_content")
    if not content:
        return None
    key = state_dir() / "keys" / f"sky-{cluster}"
    key.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(content if content.endswith("\n") else content + "\n")
    return key


def _hourly(record: Any) -> float:
    try:
        return float(sky_managed.field_of(record, "handle").launched_resources.get_cost(3600))
    except Exception:  # noqa: BLE001  (a listing without resources still lists the cluster)
        return 0.0


def _cluster_of(machine: Machine) -> str:
    cluster = getattr(machine, "cluster", None)
    if cluster is None:
        raise ProviderError(f"{machine.name} is not a SkyPilot cluster")
    return str(cluster)
