"""Renting machines for a run: the market (live offers where a provider has a live search, the
catalogs elsewhere), trying the planned offers in order until one is up, recording every rented
machine of a run with its $/h and time, and picking the next offer after a preemption.

Only Vast.ai can be rented so far (the SkyPilot clouds come with their provider); catalog rows
of the other clouds are priced in `launch plan` but never chosen by `launch`."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from launcher import offers as planning
from launcher.config import LaunchConfig
from launcher.providers import provider_for
from launcher.providers.base import MachineSpec, Need, Offer, ProviderError
from launcher.providers.vast import VastMachine, VastProvider, target_for
from launcher.providers.vast_api import VastAuthError, VastError, api_key
from launcher.remote import RemoteError
from launcher.runs import MachineRecord, RunRecord, RunStore

RENTABLE = ("vast",)
PLAN_FILE = "plan.json"  # in the run folder: what a recovery needs to pick the next offer


class NothingRented(Exception):
    """No offer could be rented; the message lists each offer tried and why it failed."""


def vast_is_configured() -> bool:
    """A key is there (or a test server): live Vast.ai offers replace the catalog's."""
    return api_key() is not None


def live_need(need: planning.JobNeed, constraints: planning.Constraints) -> Need:
    """The provider-side filter for a job: enough memory over all GPUs, the caps, the market
    (the disk comes from resources, which the provider holds)."""
    return Need(gpu=constraints.gpu.name if constraints.gpu else None, gpu_count=constraints.gpu_count or 1,
                max_usd_per_hour=constraints.max_usd_per_hour,
                interruptible=constraints.interruptible,
                min_vram_gb=round(need.vram_gb / planning.VRAM_MARGIN, 2))


def market(config: LaunchConfig, need: planning.JobNeed, constraints: planning.Constraints,
           warn: Callable[[str], None]) -> list[Offer]:
    """Every offer to plan with: the catalogs, with Vast.ai's rows replaced by its live offers
    when a key is set. A live search that fails is a warning; the catalog stays in its place."""
    catalog = planning.catalog_offers()
    if not vast_is_configured() or (constraints.providers and "vast" not in constraints.providers):
        return catalog
    try:
        live = provider_for("vast", config.resources).offers(live_need(need, constraints))
    except VastError as e:
        warn(f"Vast.ai live offers unavailable ({e}); Vast.ai priced from the catalog")
        return catalog
    return [o for o in catalog if o.provider != "vast"] + live


@dataclass(frozen=True)
class SavedPlan:
    """What picking the next offer after a preemption needs, kept in the run folder."""

    gpu: Optional[str]
    gpu_count: Optional[int]
    interruptible: Optional[bool]
    max_usd_per_hour: Optional[float]
    max_total_usd: Optional[float]
    tried_offers: list[int]

    def save(self, run_dir: Path) -> None:
        (run_dir / PLAN_FILE).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, run_dir: Path) -> "SavedPlan":
        try:
            return cls(**json.loads((run_dir / PLAN_FILE).read_text()))
        except (OSError, ValueError, TypeError):
            return cls(None, None, None, None, None, [])

    def constraints(self) -> planning.Constraints:
        from launcher.gpus import resolve

        return planning.Constraints(gpu=resolve(self.gpu) if self.gpu else None, gpu_count=self.gpu_count,
                                    providers=RENTABLE, interruptible=self.interruptible,
                                    max_usd_per_hour=self.max_usd_per_hour, max_total_usd=self.max_total_usd)


def save_plan(run_dir: Path, constraints: planning.Constraints) -> None:
    SavedPlan(gpu=constraints.gpu.name if constraints.gpu else None, gpu_count=constraints.gpu_count,
              interruptible=constraints.interruptible, max_usd_per_hour=constraints.max_usd_per_hour,
              max_total_usd=constraints.max_total_usd, tried_offers=[]).save(run_dir)


def rent(store: RunStore, run_id: str, run_dir: Path, provider: VastProvider, candidates: list[Offer],
         spec: MachineSpec, phase: Callable[[str], None], warn: Callable[[str], None]) -> tuple[VastMachine, Offer]:
    """Rent the first candidate that comes up (at most resources.vast.max_offers_tried), record it
    as the run's machine. Each failure is logged with why; nothing failed is left billing."""
    saved = SavedPlan.load(run_dir)
    tried: list[str] = []
    for offer in candidates:
        # An offer is a machine, listed once per market: a machine that failed is not tried again.
        if offer.offer_id in saved.tried_offers:
            continue
        if len(tried) >= provider.settings.max_offers_tried:
            break
        what = (f"offer {offer.offer_id}: {offer.gpu_count}x {offer.gpu} in {offer.region or '?'} at "
                f"${offer.usd_per_hour:.3f}/h ({'interruptible' if offer.interruptible else 'on-demand'})")
        phase(f"renting {what}")
        saved.tried_offers.append(offer.offer_id)
        saved.save(run_dir)
        try:
            machine = provider.provision(offer, spec)
        except VastAuthError:
            raise
        except (ProviderError, VastError, RemoteError) as e:
            warn(f"{what} failed: {e}")
            tried.append(f"{what}: {e}")
            continue
        assert isinstance(machine, VastMachine)
        store.add_machine(MachineRecord(run_id=run_id, target=target_for(machine.instance_id), provider="vast",
                                        usd_per_hour=machine.usd_per_hour or offer.usd_per_hour,
                                        started_at=machine.running_since or time.time(), gpu=offer.gpu_summary,
                                        region=offer.region))
        return machine, offer
    if not tried:
        raise NothingRented("no offer left to rent: every fitting offer was tried already; "
                            "`launch plan` shows the market now")
    raise NothingRented("no offer could be rented; tried:\n  " + "\n  ".join(tried))


def next_candidates(config: LaunchConfig, run_dir: Path, warn: Callable[[str], None]) -> list[Offer]:
    """The fitting offers for a recovery, cheapest whole job first, from a fresh live search."""
    saved = SavedPlan.load(run_dir)
    constraints = saved.constraints()
    need = planning.job_need(config)
    rows, _ = planning.plan(market(config, need, constraints, warn), need, constraints)
    return [p.offer for p in rows if p.fits and p.offer.offer_id is not None]


def spent(store: RunStore, run_id: str, now: Optional[float] = None) -> Optional[float]:
    """$ of a run's rented machines so far; None when it rented none (own boxes)."""
    machines = store.machines(run_id)
    return sum(m.usd(now) for m in machines) if machines else None


def run_usd(store: RunStore, record: RunRecord, now: Optional[float] = None) -> float:
    """$ of a run so far: its rented machines over their lifetimes; on an own box, the $/h the
    user gave over the runner's time (finished segments plus the one running now)."""
    rented = spent(store, record.id, now)
    if rented is not None:
        return rented
    return (record.usd_per_hour or 0.0) * record.runner_seconds(now) / 3600


def machines_json(store: RunStore, run_id: str) -> list[dict[str, Any]]:
    now = time.time()
    return [{**asdict(m), "seconds": round(m.seconds(now), 1), "usd": round(m.usd(now), 6)}
            for m in store.machines(run_id)]
