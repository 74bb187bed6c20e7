"""Renting machines for a run: the planned candidates tried in order until one is up, every
rented machine of a run recorded with its real $/h and time, and a run's $ from them.

Which offers to try comes from planning.py (the same plan for `launch` and for a recovery);
which provider rents each offer comes from the registry (the offer's provider)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Optional

from launcher import clock
from launcher.providers import provider_named, renter_name
from launcher.providers.base import CredentialsError, MachineSpec, Offer, Provider, ProviderError, Provisioned
from launcher.remote import RemoteError
from launcher.runs import MachineRecord, RunRecord, RunStore

TRIED_FILE = "plan.json"  # in the run folder: the offers this run tried (a failed one is not tried again)


class NothingRented(ProviderError):
    """No offer could be rented; the message lists each offer tried and why it failed."""


def offer_key(offer: Offer) -> str:
    """An offer's identity across searches: its id where the provider has one, else what it is."""
    if offer.offer_id is not None:
        return f"{offer.provider}:{offer.offer_id}"
    return f"{offer.provider}:{offer.instance_type}:{offer.region}:{'spot' if offer.interruptible else 'on-demand'}"


def tried_offers(run_dir: Path) -> list[str]:
    try:
        saved = json.loads((run_dir / TRIED_FILE).read_text())
    except (OSError, ValueError):
        return []
    return [str(t) for t in saved.get("tried", [])] if isinstance(saved, dict) else []


def _save_tried(run_dir: Path, tried: list[str], renting: Optional[str] = None) -> None:
    (run_dir / TRIED_FILE).write_text(json.dumps({"tried": tried, "renting": renting}, indent=1))


def may_rent_again(run_dir: Path) -> None:
    """The run's machine was released on purpose (`launch down`, the budget), not lost: its offer
    may be rented again when the run resumes (a failed or lost one is never tried twice)."""
    try:
        saved = json.loads((run_dir / TRIED_FILE).read_text())
    except (OSError, ValueError):
        return
    renting = saved.get("renting") if isinstance(saved, dict) else None
    if renting:
        _save_tried(run_dir, [t for t in tried_offers(run_dir) if t != renting])


def describe(offer: Offer) -> str:
    what = f"offer {offer.offer_id}" if offer.offer_id is not None else offer.instance_type or offer.provider
    return (f"{what}: {offer.gpu_count}x {offer.gpu} on {offer.provider} in {offer.region or '?'} at "
            f"${offer.usd_per_hour:.3f}/h ({'interruptible' if offer.interruptible else 'on-demand'})")


def rent(store: RunStore, run_id: str, run_dir: Path, candidates: list[Offer], resources: Any, spec: MachineSpec,
         phase: Callable[[str], None], warn: Callable[[str], None]) -> tuple[Provider, Provisioned, Offer]:
    """Rent the first candidate that comes up (at most max_offers_tried per provider), record it
    as the run's machine. Each failure is logged with why; nothing failed is left billing."""
    tried = tried_offers(run_dir)
    attempts: dict[str, int] = {}
    failures: list[str] = []
    providers: dict[str, Provider] = {}
    for offer in candidates:
        # An offer is a machine, listed once per market: a machine that failed is not tried again.
        if offer_key(offer) in tried:
            continue
        renter = renter_name(offer.provider)  # aws, lambda, ...: the SkyPilot provider rents them
        provider = providers.get(renter) or provider_named(renter, resources, log=warn)
        providers[renter] = provider
        if attempts.get(offer.provider, 0) >= provider.max_offers_tried:  # per market: one cloud failing is not all
            continue
        attempts[offer.provider] = attempts.get(offer.provider, 0) + 1
        phase(f"renting {describe(offer)}")
        tried.append(offer_key(offer))
        _save_tried(run_dir, tried)
        try:
            rented = provider.provision(offer, spec)
        except CredentialsError:
            raise
        except (ProviderError, RemoteError) as e:
            warn(f"{describe(offer)} failed: {e}")
            failures.append(f"{describe(offer)}: {e}")
            continue
        store.add_machine(MachineRecord(run_id=run_id, target=rented.machine.name, provider=provider.name,
                                        usd_per_hour=rented.usd_per_hour, started_at=rented.started_at,
                                        gpu=offer.gpu_summary, region=offer.region))
        _save_tried(run_dir, tried, renting=offer_key(offer))
        return provider, rented, offer
    if not failures:
        raise NothingRented("no offer left to rent: every fitting offer was tried already; "
                            "`launch plan` shows the market now")
    raise NothingRented("no offer could be rented; tried:\n  " + "\n  ".join(failures))


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
    now = clock.now()
    return [{**asdict(m), "seconds": round(m.seconds(now), 1), "usd": round(m.usd(now), 6)}
            for m in store.machines(run_id)]
