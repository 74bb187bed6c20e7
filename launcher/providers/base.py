"""The provider contract: what every target (local, your own SSH box, Vast.ai, the SkyPilot
clouds, Kaggle) implements. Small on purpose, like SkyPilot's per-cloud provision modules and
dstack's Compute: offers, provision, state, terminate, plus `reconnect` so a run record alone is
enough to find the machine again after the launcher died.

Optional abilities are mixins (dstack's `ComputeWith*`), found with isinstance, never by name:
- Restartable: start a machine that stopped (an idle watchdog stopped it) again;
- Sweepable: list and destroy every machine labelled by us (`launch down --all`);
- NeedsCredentials: say whether the provider is usable here, and the fix when it is not.

Every error a provider raises is a ProviderError (its client's errors included), so the
lifecycle and the renting loop catch one family."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, Optional

from launcher import clock
from launcher.remote import Machine

# "idle": ready and billing nothing, running nothing of ours (a Kaggle kernel between sessions): not lost.
MachineState = Literal["starting", "running", "idle", "stopped", "preempted", "gone", "unknown"]
LOST_STATES = ("preempted", "gone", "stopped")  # a rented machine in these no longer runs the job
LABEL_PREFIX = "qlora-launch:"  # every machine we rent is labelled with this and the run id


class ProviderError(Exception):
    """A provider could not do what was asked; nothing is left billing. The message says why."""


class CredentialsError(ProviderError):
    """The provider refuses us or has no credentials here: trying another of its offers is pointless."""


class OutOfQuota(ProviderError):
    """A free provider's quota is spent (Kaggle's weekly GPU hours): the run stops, resumable when
    it refreshes or now elsewhere; the message says when and how."""


def label_for(run_id: str) -> str:
    return f"{LABEL_PREFIX}{run_id}"


@dataclass(frozen=True)
class Need:
    """What the job needs from a machine; live searches filter on it, the planner ranks the rest."""

    gpu: Optional[str] = None
    gpu_count: int = 1
    disk_gb: Optional[float] = None
    max_usd_per_hour: Optional[float] = None
    interruptible: Optional[bool] = None  # None: either market
    min_vram_gb: Optional[float] = None  # all GPUs together


@dataclass(frozen=True)
class Offer:
    """One priced machine, from a provider's live search, a price catalog, or your own box.
    Units are in the field names; vram_gb is per GPU, as the market states it."""

    provider: str  # local | ssh | vast | aws | lambda | ...
    region: Optional[str] = None
    gpu: Optional[str] = None  # the market's (or nvidia-smi's) name; None: no GPU
    gpu_count: int = 0
    vram_gb: Optional[float] = None
    usd_per_hour: float = 0.0
    interruptible: bool = False
    instance_type: Optional[str] = None
    target: Optional[str] = None  # what --target says to reach it (own boxes)
    offer_id: Optional[int] = None  # the provider's id to rent it by (live offers only)
    # Hours the account may still run it (a free weekly quota: Kaggle); None: no such bound. The
    # planner does not choose it for a job estimated to take longer.
    hours_left: Optional[float] = None

    @property
    def gpu_summary(self) -> Optional[str]:
        """"RTX 4090", or "2x RTX 4090": how run records name a machine's GPUs."""
        return f"{self.gpu_count}x {self.gpu}" if self.gpu_count > 1 else self.gpu


@dataclass(frozen=True)
class MachineSpec:
    """How to reach the machine for one run: per-run files live under the state directory."""

    run_id: str
    known_hosts: Path
    control_dir: Path
    identity: Optional[Path] = None


@dataclass(frozen=True)
class Provisioned:
    """What `provision` rented (or reached): the machine, the provider's id for it (what a run
    record keeps to find it again), the real $/h (what the provider bills, not the quote), and
    when it came up (billing starts about then)."""

    machine: Machine
    machine_id: str
    usd_per_hour: float = 0.0
    started_at: float = field(default_factory=clock.now)


@dataclass(frozen=True)
class LabelledMachine:
    """A machine the provider's own listing shows with our label (Sweepable)."""

    machine_id: str
    name: str  # how the run records and the user name it, e.g. vast:123
    label: str
    status: str
    usd_per_hour: float = 0.0


@dataclass(frozen=True)
class Availability:
    """Whether a provider can be used here; when not, `fix` says exactly what to do."""

    usable: bool
    detail: str  # what was found (never a secret): "key from VAST_API_KEY", "no key in ..."
    fix: Optional[str] = None
    # For a sweep: False when nothing of ours can be there (the provider's client was never
    # installed here, so nothing was rented through it from here): a note, not an error.
    matters: bool = True


@dataclass(frozen=True)
class ProviderContext:
    """What a provider is built from: the job's resources (None outside a job: `launch check`,
    `launch down --all`), its own settings (resources.<name>, validated by its settings_model),
    the address a user named (own boxes), and where its warnings go."""

    resources: Optional[Any] = None
    settings: Optional[Any] = None
    address: Optional[str] = None
    log: Callable[[str], None] = lambda text: None


class Provider(ABC):
    """One kind of target. `rents_machines`: we rent (and must release) its machines; False: the
    machine is yours and terminate() leaves it running."""

    name: ClassVar[str]
    title: ClassVar[str]  # how a person names it: "Vast.ai"
    rents_machines: ClassVar[bool] = False
    settings_model: ClassVar[Optional[type]] = None  # a pydantic model: resources.<name> in the job YAML
    # The offer providers (markets) it rents besides its own name: the SkyPilot provider rents the
    # offers of aws, gcp, lambda, ... (an Offer's `provider` is the market a person recognises).
    markets: ClassVar[tuple[str, ...]] = ()
    # Where a rented machine's $/h comes from: "billed" (what the provider says it charges for that
    # machine) or "catalog" (a price list: the cloud's own bill may differ); summaries say which.
    price_source: ClassVar[str] = "billed"
    log: Callable[[str], None] = staticmethod(lambda text: None)  # warnings for the user (the reporter's)

    @classmethod
    def from_context(cls, context: ProviderContext) -> "Provider":
        """Build the provider for a job (or for a command outside one)."""
        return cls()

    @classmethod
    def can_rent(cls, offer: Offer) -> bool:
        """Whether provision() can rent this offer (a renting provider may rent only its live offers)."""
        return cls.rents_machines

    @classmethod
    def spans_nodes(cls, market: str) -> bool:
        """Whether several machines of `market` can be rented to train one job together."""
        return False

    @classmethod
    def plan_markets(cls, resources: Any) -> Optional[tuple[str, ...]]:
        """The only markets this job may be planned on, when a setting of this provider's asks for
        a way of running that only some can give (SkyPilot's managed jobs); None: no restriction."""
        return None

    @classmethod
    def job_problem(cls, config: Any) -> Optional[str]:
        """What in this job's file keeps this provider's settings from working (a setting that needs
        another section), as a line naming the keys and the fix; None when nothing does."""
        return None

    @classmethod
    def plan_note(cls, resources: Any, offer: Offer, hours: Optional[float]) -> Optional[str]:
        """A line for the plan about renting `offer` the way this job asks (a cost beside the GPU)."""
        return None

    @classmethod
    def market_availability(cls) -> dict[str, Availability]:
        """Per market (see `markets`): whether it can be rented from here; `launch check` lists each."""
        return {}

    @property
    def max_offers_tried(self) -> int:
        """Offers of this provider tried per launch or recovery before giving up."""
        return 3

    @abstractmethod
    def offers(self, need: Need, usd_per_hour: float = 0.0) -> list[Offer]:
        """Priced machines available now that satisfy `need`."""

    @abstractmethod
    def provision(self, offer: Offer, spec: MachineSpec) -> Provisioned:
        """Rent (or reach) the machine of `offer`; returns once it runs commands. Raises
        ProviderError (or remote.Unreachable for a box that does not answer), leaving nothing
        billed behind."""

    @abstractmethod
    def reconnect(self, machine_id: str, spec: MachineSpec) -> Machine:
        """The machine a run record names (its machine_id), for attach, resume, pull and down.
        Never raises for a machine that is gone: state() then says so."""

    @abstractmethod
    def state(self, machine: Machine) -> MachineState:
        """starting | running | stopped | preempted | gone | unknown; never raises for a vanished machine."""

    @abstractmethod
    def terminate(self, machine: Machine) -> None:
        """Stop paying for the machine. Idempotent: safe twice and on a machine already gone."""

    def default_workdir(self) -> str:
        return "~/qlora-launch"

    def open_workspace(self, machine: Machine, run_id: str, workdir: Optional[str] = None,
                       run_folder: Optional[str] = None, config: Any = None) -> Any:
        """The run's workspace on `machine`: the shell one (a folder reached over a shell) unless
        a provider says otherwise. `run_folder`: the one a run record names (reopening). `config`:
        the job as launched (a LaunchConfig; None when its file no longer loads), for a workspace
        that reads the run from elsewhere than its machine (the checkpoint store)."""
        from launcher.workspace import ShellWorkspace

        if run_folder:
            return ShellWorkspace(machine, run_folder)
        return ShellWorkspace.create(machine, workdir or self.default_workdir(), run_id)


class Restartable(ABC):
    """A provider whose stopped machines can be started again (with their disk)."""

    @abstractmethod
    def restart(self, machine: Machine, spec: MachineSpec) -> Machine:
        """Start the stopped machine again and return it reachable; ProviderError if it cannot."""


class Sweepable(ABC):
    """A provider that can list every machine labelled by us, whoever launched it."""

    @classmethod
    def run_label(cls, run_id: str) -> str:
        """The label a run's machine carries in the provider's listing (Vast.ai: qlora-launch:<run id>)."""
        return label_for(run_id)

    @classmethod
    def sweep_availability(cls) -> Availability:
        """Whether its listing can be asked from here (by default: whether the provider is usable)."""
        return availability(cls)  # type: ignore[arg-type]

    @abstractmethod
    def labelled_machines(self) -> list[LabelledMachine]:
        """Every machine of the account with our label; a reply that cannot be read raises
        ProviderError, never an empty list."""

    @abstractmethod
    def destroy_machine(self, machine_id: str) -> None:
        """Destroy it and confirm it is gone; ProviderError says it may still bill."""


class NeedsCredentials(ABC):
    """A provider that needs an account here (a key, a token); without one it is not usable."""

    @classmethod
    @abstractmethod
    def availability(cls) -> Availability:
        """Whether credentials are there (where they were looked for), and the fix when not.
        Reads local files and the environment only: no network, never the secret itself."""


def availability(provider: type[Provider]) -> Availability:
    """Any provider's availability: one without an account to set up is always usable."""
    if issubclass(provider, NeedsCredentials):
        return provider.availability()
    return Availability(True, "nothing to set up")


def gpu_offer(provider: str, target: str, machine: Machine, usd_per_hour: float) -> Offer:
    """The offer of a machine we can already reach: its GPUs as its nvidia-smi lists them."""
    out = machine.run("nvidia-smi --query-gpu=name,memory.total --format=csv,noheader,nounits 2>/dev/null || true",
                      timeout=60).stdout
    gpus = [line.rsplit(",", 1) for line in out.strip().splitlines() if "," in line]
    if not gpus:
        return Offer(provider=provider, target=target, usd_per_hour=usd_per_hour)
    name, mib = gpus[0][0].strip(), float(gpus[0][1])
    return Offer(provider=provider, target=target, gpu=name, gpu_count=len(gpus), vram_gb=round(mib / 1024, 1),
                 usd_per_hour=usd_per_hour)
