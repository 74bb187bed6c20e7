"""The provider contract: what every target (local, your own SSH box, Vast.ai, the SkyPilot
clouds, Kaggle) implements. Small on purpose, like SkyPilot's per-cloud provision modules and
dstack's Compute: offers, provision, state, terminate, plus `reconnect` so a run record alone
is enough to find the machine again after the launcher died."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Optional

from launcher.remote import Machine

MachineState = Literal["starting", "running", "stopped", "preempted", "gone", "unknown"]


class ProviderError(Exception):
    """A provider could not do what was asked; nothing is left billing. The message says why."""


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


class Provider(ABC):
    name: str
    owns_machines: bool = False  # False: your box; terminate() leaves it running
    log: Callable[[str], None] = staticmethod(lambda text: None)  # warnings for the user (the reporter's)

    @abstractmethod
    def offers(self, need: Need, usd_per_hour: float = 0.0) -> list[Offer]:
        """Priced machines available now that satisfy `need`."""

    @abstractmethod
    def provision(self, offer: Offer, spec: MachineSpec) -> Machine:
        """Return a machine that runs commands, or raise ProviderError / remote.Unreachable
        leaving nothing billed behind."""

    @abstractmethod
    def reconnect(self, target: str, spec: MachineSpec) -> Machine:
        """The machine a run record names, for attach, resume, pull and down."""

    @abstractmethod
    def state(self, machine: Machine) -> MachineState:
        """starting | running | stopped | preempted | gone | unknown; never raises for a vanished machine."""

    @abstractmethod
    def terminate(self, machine: Machine) -> None:
        """Stop paying for the machine. Idempotent: safe twice and on a machine already gone."""

    def default_workdir(self) -> str:
        return "~/qlora-launch"


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
