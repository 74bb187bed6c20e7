"""Kaggle: free GPUs (T4 x2) in script kernels, within a weekly GPU quota and a 12 h session.

A Kaggle kernel has no shell of ours: the run goes up as a private dataset (runner, job.yaml,
local assets), starts as a pushed script kernel (cluster_templates/kaggle_kernel.py) and comes
back as the kernel's output. This module is the provider side: credentials, the settings
(resources.kaggle), the one offer Kaggle gives and how the plan weighs it; the client seam is
kaggle_client.py.

What the plan says about it, and why:
- One offer, T4 x2 (`NvidiaTeslaT4`, the GPU shape Kaggle gives now) at $0/h, interruptible
  (a session ends at its limit). P100 (`NvidiaTeslaP100`) is retired: Kaggle runs it on a T4
  anyway, so it is never offered and resources.kaggle.accelerator refuses it.
- The offer carries the account's remaining weekly GPU hours (Offer.hours_left, read from
  Kaggle's own quota call). A job whose estimated hours exceed them is not chosen: the row says
  "needs 26 h, 11 h left". A job longer than one session is fine: it continues in a new kernel
  version from its newest checkpoint, so only the quota bounds it; the plan's note says how many
  sessions it takes ("free: 18.5 h left this week").
- No credentials (or no [kaggle] extra): no offer at all, and `launch check` says where the
  credentials were looked for and how to set them up."""

from __future__ import annotations

import json
import math
from typing import Any, Callable, ClassVar, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

from launcher.paths import CLUSTER_TEMPLATES
from launcher.providers import kaggle_client
from launcher.providers.base import (
    Availability, MachineSpec, MachineState, NeedsCredentials, Need, Offer, Provider, ProviderContext, ProviderError,
    Provisioned,
)
from launcher.remote import Machine, RemoteError

KERNEL_TEMPLATE = CLUSTER_TEMPLATES / "kaggle_kernel.py"  # the kernel's script
MARKER_SLOT = "__QLORA_MARKER__"
SESSION_SLOT = "SESSION = {}"
MACHINE_PREFIX = "kaggle:"  # a run record's machine id: kaggle:<owner>/<kernel slug>
# The accelerators Kaggle gives script kernels for free: its machine shape -> (GPU, count, GB each).
ACCELERATORS: dict[str, tuple[str, int, float]] = {"NvidiaTeslaT4": ("T4", 2, 16.0)}
RETIRED = {"NvidiaTeslaP100": "retired: Kaggle runs it on a T4 (kaggle's _RETIRED_ACCELERATORS)"}
SESSION_LIMIT_H = 12.0  # Kaggle's longest GPU session (kaggle/cli.py)


def hours_text(hours: float) -> str:
    """"18.5 h", "26 h": a tenth of an hour at most, no trailing .0."""
    return f"{hours:.1f}".removesuffix(".0") + " h"


class KaggleSettings(BaseModel):
    """resources.kaggle: the accelerator, the session limit and our names on Kaggle."""

    model_config = ConfigDict(extra="forbid")

    accelerator: str = "NvidiaTeslaT4"  # the kernel's machine shape (T4 x2)
    session_limit_h: float = Field(SESSION_LIMIT_H, gt=0, le=SESSION_LIMIT_H)  # the kernel's session timeout
    # The kernel SIGTERMs the runner this long before the session limit, so it saves a checkpoint
    # and the output is written before Kaggle ends the session.
    stop_before_limit_minutes: float = Field(20.0, gt=0)
    # A kernel is pushed only when the week's GPU quota holds this much beyond the stop margin.
    min_session_minutes: float = Field(10.0, gt=0)
    slug_prefix: str = Field("qlora-launch", pattern=r"^[a-z0-9][a-z0-9-]{0,30}$")  # <prefix>-<run id>: dataset, kernel
    internet: bool = True  # pip needs it (new accounts: phone verification first)
    dataset_ready_timeout_s: float = Field(900.0, gt=0)  # a pushed dataset version until Kaggle reads it ready
    poll_s: float = Field(15.0, gt=0)  # how often the kernel's status is asked

    @field_validator("accelerator")
    @classmethod
    def _known(cls, value: str) -> str:
        if value in RETIRED:
            raise ValueError(f"{value} is {RETIRED[value]}; use NvidiaTeslaT4 (T4 x2)")
        if value not in ACCELERATORS:
            raise ValueError(f"{value!r} is not a Kaggle accelerator we run on; known: {', '.join(ACCELERATORS)}")
        return value

    @property
    def gpu(self) -> tuple[str, int, float]:
        return ACCELERATORS[self.accelerator]

    def slug(self, run_id: str) -> str:
        """The run's dataset and kernel slug (Kaggle: lowercase letters, digits, dashes; 50 at most)."""
        clean = "".join(c if c.isalnum() else "-" for c in run_id.lower()).strip("-")
        return f"{self.slug_prefix}-{clean}"[:50].rstrip("-")


class KaggleKernel(Machine):
    """The run record's machine for a Kaggle run: a script kernel, with no shell of ours."""

    def __init__(self, owner: str, slug: str) -> None:
        super().__init__()
        self.owner, self.slug = owner, slug
        self.name = f"kaggle:{owner}/{slug}"

    @property
    def ref(self) -> str:
        return f"{self.owner}/{self.slug}"

    @property
    def machine_id(self) -> str:
        return f"{MACHINE_PREFIX}{self.ref}"

    def command(self, remote_command: str) -> list[str]:
        raise RemoteError(f"{self.name} is a Kaggle kernel: it has no shell (its log: `kaggle kernels logs {self.ref}`)")


def kernel_of(machine_id: str) -> KaggleKernel:
    owner, _, slug = machine_id.removeprefix(MACHINE_PREFIX).partition("/")
    if not owner or not slug:
        raise ProviderError(f"{machine_id!r} is not a Kaggle kernel (kaggle:<owner>/<slug>)")
    return KaggleKernel(owner, slug)


# KernelWorkerStatus names (kagglesdk/kernels/types/kernels_enums.py) as machine states. A kernel
# that ended (or was stopped on kaggle.com) is idle, not a lost machine: how the runner ended is
# what the workspace's look() reads, and a new version can always be pushed.
STATES: dict[str, MachineState] = {
    "QUEUED": "starting", "NEW_SCRIPT": "starting", "RUNNING": "running", "CANCEL_REQUESTED": "running",
    "COMPLETE": "idle", "ERROR": "idle", "CANCEL_ACKNOWLEDGED": "idle",
}


class KaggleProvider(Provider, NeedsCredentials):
    name = "kaggle"
    title = "Kaggle"
    rents_machines = True  # a kernel we start: it uses the account's quota until it ends
    settings_model: ClassVar[Optional[type]] = KaggleSettings

    def __init__(self, settings: Optional[KaggleSettings] = None, api: Optional[Any] = None,
                 log: Callable[[str], None] = lambda text: None) -> None:
        self.settings = settings or KaggleSettings()
        self._api = api
        self.log = log

    @classmethod
    def from_context(cls, context: ProviderContext) -> "KaggleProvider":
        return cls(context.settings, log=context.log)

    @classmethod
    def can_rent(cls, offer: Offer) -> bool:
        return offer.provider == cls.name

    @property
    def max_offers_tried(self) -> int:
        return 1  # one offer: another try would push the same kernel

    @classmethod
    def availability(cls) -> Availability:
        if not kaggle_client.installed():
            return Availability(False, "the Kaggle client is not installed", kaggle_client.INSTALL, matters=False)
        source = kaggle_client.credential_source()
        if source:
            return Availability(True, source)
        return Availability(False, f"no credentials (looked in {', '.join(kaggle_client.places())})",
                            kaggle_client.SETUP)

    @property
    def api(self) -> Any:
        if self._api is None:
            self._api = kaggle_client.connect()
        return self._api

    @property
    def username(self) -> str:
        return kaggle_client.username(self.api)

    def quota(self) -> kaggle_client.Quota:
        return kaggle_client.quota(self.api)

    # ---- offers and the plan ----------------------------------------------------------------

    def offers(self, need: Need, usd_per_hour: float = 0.0) -> list[Offer]:
        """The free accelerator, with the week's GPU hours left; none without usable credentials
        or when `need` rules it out (another GPU, more GPUs or memory, an on-demand machine)."""
        if not self.availability().usable:
            return []
        gpu, count, vram_gb = self.settings.gpu
        if need.interruptible is False or need.gpu_count > count or (need.min_vram_gb or 0) > count * vram_gb:
            return []
        if need.gpu and not _same_gpu(need.gpu, gpu):
            return []
        left = self.quota().left_h
        return [Offer(provider=self.name, region=None, gpu=gpu, gpu_count=count, vram_gb=vram_gb, usd_per_hour=0.0,
                      interruptible=True, instance_type=self.settings.accelerator, hours_left=round(left, 2))]

    @classmethod
    def plan_note(cls, resources: Any, offer: Offer, hours: Optional[float]) -> Optional[str]:
        """The chosen free offer: the quota left and, for a job longer than a session, how many."""
        if offer.provider != cls.name:
            return None
        settings = getattr(resources, cls.name, None) or KaggleSettings()
        line = "kaggle: free" + (f": {hours_text(offer.hours_left)} left this week" if offer.hours_left is not None
                                 else "")
        if hours is not None:
            line += f"; the job needs ~{hours_text(hours)}"
            sessions = session_count(hours, settings)
            if sessions > 1:
                line += (f", {sessions} sessions of {hours_text(settings.session_limit_h)} (each continues from the "
                         "newest checkpoint)")
        return line

    # ---- the kernel as the run record's machine -----------------------------------------------

    def provision(self, offer: Offer, spec: MachineSpec) -> Provisioned:
        """The run's kernel, named (nothing is pushed here: the workspace's start pushes it). Fails
        before anything is pushed when the credentials are refused or the quota is spent."""
        left = self.quota().left_h
        if left <= 0:
            raise ProviderError("Kaggle: no weekly GPU quota left; " + self.quota_refresh_line())
        kernel = KaggleKernel(self.username, self.settings.slug(spec.run_id))
        return Provisioned(kernel, kernel.machine_id, 0.0)

    def quota_refresh_line(self) -> str:
        return (f"it refreshes {self.quota().refresh_text()}; to go on now on a paid GPU: "
                "`launch resume RUN --providers vast`")

    def open_workspace(self, machine: Machine, run_id: str, workdir: Optional[str] = None,
                       run_folder: Optional[str] = None, config: Any = None) -> Any:
        """The run as a dataset and a kernel on Kaggle (kaggle_workspace.py)."""
        from launcher.providers.kaggle_workspace import KaggleWorkspace

        if not isinstance(machine, KaggleKernel):
            raise ProviderError(f"{machine.name} is not a Kaggle kernel")
        if run_folder and "/runs/" in run_folder:
            run_id = run_folder.rsplit("/runs/", 1)[1]
        return KaggleWorkspace(lambda: self.api, machine, run_id, self.settings, config)

    def reconnect(self, machine_id: str, spec: MachineSpec) -> Machine:
        return kernel_of(machine_id)

    def state(self, machine: Machine) -> MachineState:
        return STATES.get(str(self._status_name(machine)), "unknown")

    def _status_name(self, machine: Machine) -> Optional[str]:
        """The kernel's KernelWorkerStatus name; None when Kaggle does not answer for it."""
        ref = getattr(machine, "ref", None)
        if ref is None:
            return None
        try:
            reply = kaggle_client.guarded("the kernel's status", lambda: self.api.kernels_status(ref))
        except ProviderError:  # 401 and 403 read alike here (never pushed, or refused): not "gone"
            return None
        return getattr(getattr(reply, "status", None), "name", None)

    def terminate(self, machine: Machine) -> None:
        """Kaggle's API has no call that stops a running kernel: it ends by itself (the script's
        own stop before the session limit, or the session timeout). Nothing bills: nothing to do."""
        if self._status_name(machine) in ("QUEUED", "NEW_SCRIPT", "RUNNING"):
            self.log(f"{machine.name}: Kaggle's API cannot stop a running kernel; it ends at its session limit "
                     f"({hours_text(self.settings.session_limit_h)}), or stop it on kaggle.com (it costs nothing)")


def marker_name(run_id: str) -> str:
    """The file in the run's dataset that the kernel script globs for (and reads its plan from)."""
    return f"qlora-launch-{KaggleSettings().slug(run_id).removeprefix('qlora-launch-')}.json"


def kernel_plan(run_id: str, settings: KaggleSettings) -> dict[str, Any]:
    """The marker file's content: what the kernel checks and when it stops (kaggle_kernel.py)."""
    gpu, count, _ = settings.gpu
    return {"run_id": run_id, "gpu_name": gpu, "gpu_count": count, "runner": "qlora_runner.py", "config": "job.yaml",
            "requirements": "requirements.txt", "session_limit_s": round(settings.session_limit_h * 3600),
            "stop_before_s": round(settings.stop_before_limit_minutes * 60)}


def kernel_script(run_id: str, session: Optional[dict[str, float]] = None) -> str:
    """cluster_templates/kaggle_kernel.py with the run's marker file name and this push's session
    (the quota left: the script stops the runner before it runs out) filled in."""
    text = KERNEL_TEMPLATE.read_text()
    assert MARKER_SLOT in text and SESSION_SLOT in text
    text = text.replace(MARKER_SLOT, marker_name(run_id), 1)
    return text.replace(SESSION_SLOT, f"SESSION = {json.dumps(session or {})}", 1)


def session_count(hours: float, settings: KaggleSettings) -> int:
    """Sessions a job of `hours` takes: each ends stop_before_limit_minutes before the limit."""
    per_session = max(settings.session_limit_h - settings.stop_before_limit_minutes / 60, 0.1)
    return max(1, math.ceil(hours / per_session - 1e-9))


def _same_gpu(asked: str, gpu: str) -> bool:
    from launcher.gpus import UnknownGPU, resolve

    try:
        return resolve(asked) is resolve(gpu)
    except UnknownGPU:
        return False
