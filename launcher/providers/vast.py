"""Vast.ai: live offers, instances rented from them, reached over SSH.

What users of other tools lost money or hours on, and what this module does instead:
- A mangled reply is an error, never "no instances" (vast_api.VastBadReply).
- Create is idempotent: one offer at a time, and before any retry the run's label
  (`qlora-launch:<run-id>`) is looked up, so a lost reply never rents a second machine.
- The SSH key is on the account before the instance is created (and attached to it after).
- A stalled image pull is told apart from a slow one by its progress (status_msg), not a fixed
  timeout; an instance that never answers SSH (direct port, then the proxy) is destroyed.
- Any failure after create destroys the instance before the error is raised.
- The real $/h is read back from the instance; above the quote, the caller is warned.
- The instance carries a watchdog (cluster_templates/idle_watchdog.py, its on-start command)
  that stops it when no job runs and the launcher has not looked in for a while.

Settings (resources.vast in the job YAML) hold the quality filters and the timeouts."""

from __future__ import annotations

import base64
import gzip
import io
import os
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

from pydantic import BaseModel, ConfigDict, Field

from launcher import clock
from launcher.paths import CLUSTER_TEMPLATES, RUNNER_REQUIREMENTS
from launcher.providers.base import (
    LABEL_PREFIX, Availability, LabelledMachine, MachineSpec, MachineState, NeedsCredentials, Need, Offer, Provider,
    ProviderContext, ProviderError, Provisioned, Restartable, Sweepable, label_for,
)
from launcher.providers.vast_api import (
    KEY_FILES, VastAPI, VastAuthError, VastBadReply, VastError, VastRateLimited, VastServerError, api_key_source,
)
from launcher.remote import USER_SSH_KEYS, Machine, SSHAddress, SSHMachine, SSHOptions, Unreachable, shell_path
from launcher.runs import state_dir

WATCHDOG = CLUSTER_TEMPLATES / "idle_watchdog.py"  # with QLORA_WATCHDOG_ON_IDLE=stop-vast (its default)
BOOTSTRAP = CLUSTER_TEMPLATES / "bootstrap.sh"
REQUIREMENTS = RUNNER_REQUIREMENTS
ONSTART_LIMIT = 4048  # characters Vast accepts in `onstart`
# Vast containers log in as root; the fake's instances are sshd's run as the test's own user.
SSH_USER_ENV = "QLORA_LAUNCH_VAST_SSH_USER"
POLL_ENV = "QLORA_LAUNCH_VAST_POLL_S"  # how often a starting instance is looked at (tests: fast)
TERMINATE_TRIES = 5


def target_for(instance_id: int) -> str:
    return f"vast:{instance_id}"


def instance_id_of(machine_id: str) -> int:
    """The instance id of a run record's machine id ("123"; records of older launchers: "vast:123")."""
    try:
        return int(machine_id.removeprefix("vast:"))
    except ValueError:
        raise ProviderError(f"{machine_id!r} is not a Vast.ai instance id") from None


class VastSettings(BaseModel):
    """resources.vast: what a Vast.ai machine must be worth renting, and how long to wait for one."""

    model_config = ConfigDict(extra="forbid")

    image: str = "pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime"  # python3 + CUDA; the venv brings our torch
    verified_only: bool = True  # hosts Vast has verified
    min_reliability: float = Field(0.90, ge=0, le=1)
    direct_port: bool = True  # a direct SSH port (the proxy is slower and drops long transfers)
    min_cuda: float = Field(12.8, gt=0)  # the newest CUDA the host driver supports; our torch wheels need 12.8
    min_inet_down_mbps: float = Field(100.0, ge=0)  # model and pip downloads
    disk_gb: float = Field(60.0, gt=0)  # the instance's disk (venv ~8 GB, model, checkpoints)
    pull_stall_s: float = Field(600.0, gt=0)  # image pull with no progress this long: next offer
    boot_timeout_s: float = Field(1800.0, gt=0)  # not running after this long even with progress: next offer
    ssh_timeout_s: float = Field(300.0, gt=0)  # running but SSH silent this long: next offer
    max_offers_tried: int = Field(3, ge=1)  # offers tried per launch or recovery before giving up
    watchdog_idle_minutes: float = Field(30.0, gt=0)  # no job and no launcher this long: the instance stops itself


class VastMachine(SSHMachine):
    """An SSH machine that is a Vast.ai instance; `address` is None when it cannot be reached
    (stopped, gone): state() and terminate() still work on it."""

    def __init__(self, instance_id: int, address: Optional[SSHAddress], options: SSHOptions) -> None:
        super().__init__(address or SSHAddress(host="unreachable.invalid"), options)
        self.instance_id = instance_id
        self.name = f"vast:{instance_id}"


class VastProvider(Provider, Restartable, Sweepable, NeedsCredentials):
    name = "vast"
    title = "Vast.ai"
    rents_machines = True
    settings_model = VastSettings

    def __init__(self, settings: Optional[VastSettings] = None, api: Optional[VastAPI] = None,
                 log: Callable[[str], None] = lambda text: None, workdir: Optional[str] = None,
                 prebuild_venv: bool = True, min_disk_gb: Optional[float] = None) -> None:
        self.settings = settings or VastSettings()
        self._api = api
        self.log = log
        self.workdir = workdir or self.default_workdir()  # where the watchdog looks for the launcher's visits
        self.prebuild_venv = prebuild_venv  # False when the job names its own python (resources.python)
        self.min_disk_gb = min_disk_gb  # resources.disk_gb: what the job says it needs free

    @classmethod
    def from_context(cls, context: ProviderContext) -> "VastProvider":
        r = context.resources
        return cls(context.settings, log=context.log, workdir=r.workdir if r else None,
                   prebuild_venv=not (r and r.python), min_disk_gb=r.disk_gb if r else None)

    @classmethod
    def can_rent(cls, offer: Offer) -> bool:
        return offer.offer_id is not None  # a live offer; the catalog's rows only price

    @property
    def max_offers_tried(self) -> int:
        return self.settings.max_offers_tried

    @classmethod
    def availability(cls) -> Availability:
        source = api_key_source()
        if source:
            return Availability(True, f"API key from {source}")
        return Availability(False, f"no API key (looked in VAST_API_KEY, {', '.join(KEY_FILES)})",
                            "export VAST_API_KEY=... (https://cloud.vast.ai/manage-keys/) or `vastai set api-key KEY`")

    @property
    def api(self) -> VastAPI:
        if self._api is None:
            self._api = VastAPI()  # VastAuthError says how to set the key
        return self._api

    def default_workdir(self) -> str:
        return "~/qlora-launch"

    # ---- offers -----------------------------------------------------------------------------

    def query(self, need: Need, kind: str) -> dict[str, Any]:
        """The search filter: the quality floors of resources.vast, the job's memory, disk and caps."""
        s = self.settings
        q: dict[str, Any] = {"external": {"eq": False}, "rentable": {"eq": True}, "rented": {"eq": False},
                             "reliability": {"gte": s.min_reliability}, "cuda_max_good": {"gte": s.min_cuda},
                             "inet_down": {"gte": s.min_inet_down_mbps}, "disk_space": {"gte": self.disk_gb(need)}}
        if s.verified_only:
            q["verified"] = {"eq": True}
        if s.direct_port:
            q["direct_port_count"] = {"gte": 1}
        if need.min_vram_gb:
            q["gpu_total_ram"] = {"gte": round(need.min_vram_gb * 1000)}  # MB, as the CLI converts
        if need.gpu_count and need.gpu:
            q["num_gpus"] = {"eq": need.gpu_count}
        if need.max_usd_per_hour is not None:
            q["dph_total" if kind == "on-demand" else "min_bid"] = {"lte": need.max_usd_per_hour}
        q.update(order=[["dph_total" if kind == "on-demand" else "min_bid", "asc"]], type=kind, limit=400,
                 allocated_storage=self.disk_gb(need))
        return q

    def disk_gb(self, need: Need) -> float:
        """The instance's disk: resources.vast.disk_gb, or more when the job asks for more."""
        return max(self.settings.disk_gb, need.disk_gb or 0.0, self.min_disk_gb or 0.0)

    def offers(self, need: Need, usd_per_hour: float = 0.0) -> list[Offer]:
        """Live offers, on demand and interruptible (at the minimum bid) unless `need` says which."""
        kinds = {None: ("on-demand", "bid"), False: ("on-demand",), True: ("bid",)}[need.interruptible]
        found = []
        for kind in kinds:
            for row in self.api.search_offers(self.query(need, kind)):
                try:
                    bid = kind == "bid"
                    found.append(Offer(
                        provider="vast", region=row.get("geolocation"), gpu=str(row["gpu_name"]),
                        gpu_count=int(row["num_gpus"]), vram_gb=round(float(row["gpu_ram"]) / 1024, 1),
                        usd_per_hour=float(row["min_bid"] if bid else row["dph_total"]), interruptible=bid,
                        instance_type=f"offer {row['id']}", offer_id=int(row["id"])))
                except (KeyError, TypeError, ValueError):
                    raise VastBadReply(f"search offers: an offer without the fields we read: {row!r:.200}") from None
        return found

    # ---- provisioning -----------------------------------------------------------------------

    def provision(self, offer: Offer, spec: MachineSpec) -> Provisioned:
        """Rent `offer`, wait until SSH answers; on any failure the instance is destroyed first."""
        if offer.offer_id is None:
            raise ProviderError("a Vast.ai offer without its offer id (catalog offers cannot be rented; "
                                "set VAST_API_KEY for live offers)")
        identity, public_key = launcher_key(spec.identity)
        self._register_key(public_key)
        try:
            instance_id = self._create(offer, spec, public_key)
        except KeyboardInterrupt:
            # Ctrl-C while the create call was out: it may have rented the machine all the same.
            made = self._labelled_live(label_for(spec.run_id))
            if made is not None:
                self._destroy_quietly(made, "interrupted while it was being created")
            raise
        try:
            row = self._wait_running(instance_id)
            running_since = clock.now()  # billing of the GPU starts about here
            self.api.attach_ssh_key(instance_id, public_key)
            machine = self._reach(instance_id, row, spec, identity)
            real = float(row.get("dph_total") or 0)
            if real > offer.usd_per_hour * 1.01 + 1e-9:
                self.log(f"instance {instance_id} costs ${real:.3f}/h, above the ${offer.usd_per_hour:.3f}/h quoted")
            return Provisioned(machine, str(instance_id), real or offer.usd_per_hour, running_since)
        except BaseException as e:
            self._destroy_quietly(instance_id, f"{type(e).__name__}: {e}")
            raise

    def _register_key(self, public_key: str) -> None:
        keys = self.api.ssh_keys()
        key_body = " ".join(public_key.split()[:2])
        if key_body not in repr(keys):
            self.api.add_ssh_key(public_key)

    def _create(self, offer: Offer, spec: MachineSpec, public_key: str) -> int:
        label = label_for(spec.run_id)
        existing = self._labelled_live(label)
        if existing is not None:
            return existing  # a previous try's create went through: never rent twice
        body = {
            "client_id": "me", "image": self.settings.image, "env": {"QLORA_VAST_URL": self.api.url},
            "price": offer.usd_per_hour if offer.interruptible else None, "disk": self.disk_gb(Need()),
            "label": label, "extra": None, "image_login": None,
            "onstart": onstart_command(self.settings, self.workdir, self.prebuild_venv),
            "python_utf8": False, "lang_utf8": False, "use_jupyter_lab": False, "jupyter_dir": None,
            "force": False, "cancel_unavail": True, "template_hash_id": None, "user": None,
            "runtype": "ssh_direc ssh_proxy",
        }
        delay = 1.0
        for attempt in range(4):
            try:
                return int(self.api.create_instance(offer.offer_id, body)["new_contract"])
            except (VastServerError, VastRateLimited, VastBadReply) as e:
                # The reply was lost or mangled: the instance may exist. Look before trying again.
                time.sleep(delay)
                delay *= 2
                existing = self._labelled_live(label)
                if existing is not None:
                    return existing
                if attempt == 3:
                    raise ProviderError(f"offer {offer.offer_id}: creating the instance failed: {e}") from None
        raise AssertionError("unreachable")

    def _labelled_live(self, label: str) -> Optional[int]:
        for row in self.api.instances():
            if row.get("label") == label and row.get("intended_status") != "stopped" and \
                    row.get("actual_status") not in ("stopped", "exited", "offline"):
                return int(row["id"])
        return None

    def _wait_running(self, instance_id: int) -> dict[str, Any]:
        """Until running with an SSH port. A pull that stops making progress (the same status
        for pull_stall_s) fails; a slow one that keeps moving may take up to boot_timeout_s."""
        s = self.settings
        start = last_change = time.monotonic()
        last_seen: Any = object()
        while True:
            row = self.api.instance(instance_id)
            if row is None:
                raise ProviderError(f"instance {instance_id} disappeared while starting")
            status = row.get("actual_status")
            has_ssh = row.get("ssh_port") or (row.get("ports") or {}).get("22/tcp")
            if status == "running" and has_ssh:
                return row
            if status in ("exited", "offline") or row.get("intended_status") == "stopped":
                raise ProviderError(f"instance {instance_id} failed to start ({status}: {row.get('status_msg')})")
            now = time.monotonic()
            seen = (status, row.get("status_msg"))
            if seen != last_seen:
                last_seen, last_change = seen, now
            elif now - last_change > s.pull_stall_s:
                raise ProviderError(f"instance {instance_id}: the image pull made no progress for "
                                    f"{s.pull_stall_s:.0f} s ({status}: {row.get('status_msg')})")
            if now - start > s.boot_timeout_s:
                raise ProviderError(f"instance {instance_id} not running after {s.boot_timeout_s:.0f} s")
            time.sleep(_poll_s())

    def _reach(self, instance_id: int, row: dict[str, Any], spec: MachineSpec, identity: Path) -> VastMachine:
        """The direct port first, then Vast's SSH proxy, until one answers or ssh_timeout_s."""
        deadline = time.monotonic() + self.settings.ssh_timeout_s
        while True:
            machine, last = first_answering(instance_id, ssh_addresses(row), ssh_options(spec, identity))
            if machine:
                return machine
            if time.monotonic() > deadline:
                raise ProviderError(f"instance {instance_id}: SSH did not answer within "
                                    f"{self.settings.ssh_timeout_s:.0f} s ({last})")
            time.sleep(_poll_s())
            row = self.api.instance(instance_id) or row  # the ports can change while it settles

    # ---- after provisioning -----------------------------------------------------------------

    def reconnect(self, machine_id: str, spec: MachineSpec) -> Machine:
        identity, _ = launcher_key(spec.identity)
        instance_id = instance_id_of(machine_id)
        try:
            row = self.api.instance(instance_id)
        except VastError:
            row = None
        addresses = ssh_addresses(row) if row and row.get("actual_status") == "running" else []
        machine, _ = first_answering(instance_id, addresses, ssh_options(spec, identity))
        return machine or VastMachine(instance_id, addresses[0] if addresses else None, ssh_options(spec, identity))

    def state(self, machine: Machine) -> MachineState:
        try:
            row = self.api.instance(_instance_of(machine))
        except VastError:
            return "unknown"
        return map_state(row)

    def restart(self, machine: Machine, spec: MachineSpec) -> Machine:
        """A stopped instance (the watchdog stopped it) started again, to pull what it holds."""
        instance_id = _instance_of(machine)
        self.api.set_state(instance_id, "running")
        row = self._wait_running(instance_id)
        identity, _ = launcher_key(spec.identity)
        return self._reach(instance_id, row, spec, identity)

    def terminate(self, machine: Machine) -> None:
        instance_id = _instance_of(machine)
        machine.close()
        self.destroy(instance_id)

    def destroy(self, instance_id: int) -> None:
        """Destroy and confirm it is gone; retried; an error says the instance may still bill."""
        delay, last = 1.0, None
        for _ in range(TERMINATE_TRIES):
            try:
                self.api.destroy_instance(instance_id)
                if self.api.instance(instance_id) is None:
                    return
                last = "it still shows up after the destroy"
            except VastAuthError:
                raise
            except VastError as e:
                last = str(e)
            time.sleep(delay)
            delay = min(delay * 2, 30)
        raise ProviderError(f"instance {instance_id} may still be billing: destroying it failed ({last}); run "
                            f"`launch down --all` or `vastai destroy instance {instance_id}`")

    def _destroy_quietly(self, instance_id: int, why: str) -> None:
        try:
            self.destroy(instance_id)
            self.log(f"instance {instance_id} destroyed ({why})")
        except (ProviderError, VastError) as e:
            self.log(str(e))

    def labelled_machines(self) -> list[LabelledMachine]:
        """Every instance of the account that carries our label, whoever launched it."""
        return [LabelledMachine(machine_id=str(row["id"]), name=target_for(row["id"]), label=str(row.get("label")),
                                status=str(row.get("actual_status")), usd_per_hour=float(row.get("dph_total") or 0))
                for row in self.api.instances() if str(row.get("label") or "").startswith(LABEL_PREFIX)]

    def destroy_machine(self, machine_id: str) -> None:
        self.destroy(instance_id_of(machine_id))


def map_state(row: Optional[dict[str, Any]]) -> MachineState:
    """Vast's actual_status as ours; anything unknown is `unknown`, never a KeyError."""
    if row is None:
        return "gone"
    status = row.get("actual_status")
    if status == "running":
        return "running"
    if status in (None, "created", "loading", "rebooting"):
        return "starting"
    if status == "stopped":
        # Outbid (it wants to run) or a host that went away: preempted. Stopped by us or the
        # watchdog (intended_status stopped): stopped.
        return "preempted" if row.get("intended_status") == "running" else "stopped"
    if status == "offline":
        return "preempted"
    if status in ("exited", "frozen"):
        return "stopped"
    return "unknown"


def ssh_addresses(row: Optional[dict[str, Any]]) -> list[SSHAddress]:
    """The direct port first (when mapped), then Vast's SSH proxy."""
    row = row or {}
    user = os.environ.get(SSH_USER_ENV, "root")
    out = []
    mapped = (row.get("ports") or {}).get("22/tcp") or []
    if mapped and row.get("public_ipaddr"):
        out.append(SSHAddress(host=str(row["public_ipaddr"]).strip(), user=user, port=int(mapped[0]["HostPort"])))
    if row.get("ssh_host") and row.get("ssh_port"):
        out.append(SSHAddress(host=str(row["ssh_host"]).strip(), user=user, port=int(row["ssh_port"])))
    return out


def first_answering(instance_id: int, addresses: list[SSHAddress],
                    options: SSHOptions) -> tuple[Optional[VastMachine], Optional[Exception]]:
    """The instance connected at the first address that answers, else None and the last error."""
    last: Optional[Exception] = None
    for address in addresses:
        machine = VastMachine(instance_id, address, options)
        try:
            machine.ensure_connected()
            return machine, None
        except Unreachable as e:
            last = e
    return None, last


def ssh_options(spec: MachineSpec, identity: Path) -> SSHOptions:
    return SSHOptions(known_hosts=spec.known_hosts, control_dir=spec.control_dir, identity=identity)


def launcher_key(identity: Optional[Path]) -> tuple[Path, str]:
    """(private key, public key text): the one given, else the user's own, else one made for the
    launcher in the state directory."""
    candidates = [identity] if identity else [Path(key).expanduser() for key in USER_SSH_KEYS]
    for private in candidates:
        public = Path(f"{private}.pub")
        if private.is_file() and public.is_file():
            return private, public.read_text().strip()
    if identity:
        raise ProviderError(f"{identity}: the SSH key or its .pub file is missing; Vast.ai needs the public half")
    private = state_dir() / "keys" / "vast_ed25519"
    if not private.is_file():
        private.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "qlora-launch", "-f", str(private)],
                       check=True)
    return private, Path(f"{private}.pub").read_text().strip()


def onstart_command(settings: VastSettings, workdir: str, prebuild_venv: bool = True,
                    requirements: Path = REQUIREMENTS) -> str:
    """The instance's on-start (it runs at every start of the container): unpack our files, start
    the watchdog and, unless the job brings its own python, build the runner's venv at once, so
    pip runs while the launcher still waits for SSH and syncs the data; the launcher's bootstrap
    then finds it ready (or waits on its lock). Packed with gzip+base64: Vast caps on-start at
    4048 characters; comment lines of the shell script are dropped to fit."""
    files = {"idle_watchdog.py": compact_python(WATCHDOG.read_text()), "requirements.txt": requirements.read_text()}
    if prebuild_venv:
        files["bootstrap.sh"] = "\n".join(line for n, line in enumerate(BOOTSTRAP.read_text().splitlines())
                                          if n == 0 or not line.lstrip().startswith("#")) + "\n"
    packed = base64.b64encode(_tar_gz(files)).decode()
    folder = "$HOME/.qlora-launch"
    work = shell_path(workdir).replace("~", "$HOME", 1) if workdir.startswith("~") else shell_path(workdir)
    command = (f"mkdir -p {folder} && echo {packed} | base64 -d | tar xz -C {folder} && "
               f"(QLORA_WATCHDOG_IDLE_S={int(settings.watchdog_idle_minutes * 60)} QLORA_WORKDIR={work} "
               f"nohup python3 {folder}/idle_watchdog.py >> {folder}/watchdog.log 2>&1 &)")
    if prebuild_venv:
        command += (f"; (QLORA_WORKDIR={work} QLORA_REQUIREMENTS={folder}/requirements.txt QLORA_VENV_ONLY=1 "
                    f"nohup sh {folder}/bootstrap.sh >> {folder}/bootstrap.log 2>&1 &)")
    if len(command) > ONSTART_LIMIT:
        if prebuild_venv:  # the venv is then built over SSH, as on any target
            return onstart_command(settings, workdir, False, requirements)
        raise ProviderError(f"the on-start command is {len(command)} characters, over Vast's {ONSTART_LIMIT}")
    return command


def compact_python(source: str) -> str:
    """The same program without its docstrings and comments (ast round trip): what fits Vast's
    on-start limit. The file in cluster_templates/ keeps its documentation."""
    import ast

    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and \
                isinstance(getattr(body[0], "value", None), ast.Constant) and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]  # type: ignore[attr-defined]
    return ast.unparse(tree) + "\n"


def _tar_gz(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=9, mtime=0) as zipped:
        with tarfile.open(fileobj=zipped, mode="w") as tar:
            for name, text in files.items():
                data = text.encode()
                info = tarfile.TarInfo(name)
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _instance_of(machine: Machine) -> int:
    instance_id = getattr(machine, "instance_id", None)
    if instance_id is None:
        raise ProviderError(f"{machine.name} is not a Vast.ai instance")
    return int(instance_id)


def _poll_s() -> float:
    return float(os.environ.get(POLL_ENV, "3"))
