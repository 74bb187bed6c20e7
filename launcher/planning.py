"""One planning path, for `launch plan`, for `launch` without a target, and for the recovery
after a preemption: the job's need, the constraints (resources.*, which the flags override),
the market (catalogs, with live offers where a provider searches live and is usable here), every
offer ranked by the estimated cost of the whole job (offers.py), and the candidates `launch`
may rent, cheapest first. Failures are typed errors with the fix in their message; rendering
is cli_plan.py's."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from launcher import offers as ranking
from launcher.config import ConfigError, LaunchConfig
from launcher.distributed import topology_for
from launcher.errors import EXIT_NO_OFFER, EXIT_USAGE
from launcher.estimate import UnknownModel
from launcher.gpus import UnknownGPU, parse_request
from launcher.providers import PROVIDERS, markets_of, provider_named, rentable, renter_of
from launcher.providers.base import Need, Offer, ProviderError, availability
from launcher.runs import MeasuredSpeed

ANY_GPU = "any"  # --gpu any: drop a config's pinned GPU


class PlanError(Exception):
    """Planning could not give what was asked; the message says what to change."""

    exit_code = EXIT_USAGE


class NothingFits(PlanError):
    """No offer can hold the job under the constraints; the message names the nearest miss."""

    exit_code = EXIT_NO_OFFER


class NothingRentable(PlanError):
    """Offers fit, but none on a provider that can rent from here."""


@dataclass(frozen=True)
class Plan:
    need: ranking.JobNeed
    constraints: ranking.Constraints
    rows: list[ranking.PlannedOffer]  # every offer considered, fitting ones first, cheapest whole job first
    choice: Optional[int]  # index of the cheapest fitting offer in rows; None: nothing fits
    mode_notes: tuple[str, ...] = ()  # the chosen offer's provider on how this job runs there (a controller's cost)

    @property
    def candidates(self) -> list[Offer]:
        """The fitting offers `launch` can rent, in plan order."""
        return [p.offer for p in self.rows if p.fits and can_rent(p.offer)]

    @property
    def notes(self) -> list[str]:
        """Why the fitting offers `launch` cannot rent are so, per market, cheapest first (a cloud
        without credentials: SkyPilot's reason and `sky check <cloud>`), at most MAX_NOTES."""
        return [*self.mode_notes, *unrentable_notes(self.rows)]

    def as_json(self) -> dict[str, Any]:
        out = ranking.plan_json(self.rows, self.choice, self.need)
        for row, planned in zip(out["offers"], self.rows):
            row["rentable"] = can_rent(planned.offer)
        out["notes"] = self.notes
        return out


MAX_NOTES = 4


def can_rent(offer: Offer) -> bool:
    """Whether `launch` can rent this offer from here (its provider rents, and this offer is one it can)."""
    provider = renter_of(offer.provider)
    return provider is not None and provider.rents_machines and provider.can_rent(offer)


def market_line(market: str) -> Optional[str]:
    """Why a market cannot be rented from here, with the fix ("aws: not enabled: ...; run `sky
    check aws`"); None when it can, or when nothing of ours rents it."""
    provider = renter_of(market)
    if provider is None or not provider.rents_machines:
        return None
    found = provider.market_availability().get(market) or availability(provider)
    if found.usable:
        return None
    return f"{market}: {found.detail}" + (f"; {found.fix}" if found.fix else "")


def unrentable_notes(rows: Sequence[ranking.PlannedOffer]) -> list[str]:
    notes: list[str] = []
    seen: set[str] = set()
    for planned in rows:
        market = planned.offer.provider
        if not planned.fits or market in seen or planned.offer.target is not None or can_rent(planned.offer):
            continue
        seen.add(market)
        line = market_line(market)
        if line:
            notes.append(line)
        if len(notes) == MAX_NOTES:
            break
    return notes


def expand_providers(names: Optional[Sequence[str]]) -> Optional[tuple[str, ...]]:
    """resources.providers with each registered provider's markets added (`sky`: aws, gcp, ...)."""
    if not names:
        return None
    out: list[str] = []
    for name in names:
        out += [m for m in markets_of(name) if m not in out]
    return tuple(out)


def example_tokens(config: LaunchConfig) -> Optional[list[int]]:
    """Each local training example's length in tokens, as preflight counts them (None: hub data)."""
    from launcher.preflight import PreflightReport, check_data

    report = PreflightReport()
    check_data(report, config)
    return report.example_tokens


def constraints_for(resources: Any) -> ranking.Constraints:
    """The constraints of a job: resources.* as loaded (the flags are overrides of these keys)."""
    gpu_text = resources.gpu if resources.gpu and resources.gpu.lower() != ANY_GPU else None
    try:
        gpu, count = parse_request(gpu_text) if gpu_text else (None, None)
    except (UnknownGPU, ValueError) as e:
        raise PlanError(str(e)) from None
    named_count = count if gpu_text and ":" in gpu_text else None
    if named_count and resources.gpus and named_count != resources.gpus:
        raise ConfigError(f"resources.gpu asks for {named_count} GPUs ({resources.gpu}) and resources.gpus for "
                          f"{resources.gpus}: say it once (e.g. --gpu {gpu_text.split(':')[0]}:{resources.gpus})")
    topology = topology_for(resources)
    return ranking.Constraints(
        gpu=gpu, gpu_count=named_count or resources.gpus,
        providers=restricted_providers(resources),
        interruptible=resources.interruptible, max_usd_per_hour=resources.max_price,
        max_total_usd=resources.max_total_usd, data_parallel=topology.processes > 1, nodes=topology.nodes,
        multi_node_markets=multi_node_markets() if topology.nodes > 1 else None)


def known_providers(names: Optional[Sequence[str]]) -> None:
    """PlanError naming the known providers (and the nearest) for a name none of them answers to."""
    known = list(dict.fromkeys([*PROVIDERS, *(m for cls in PROVIDERS.values() for m in cls.markets)]))
    for name in names or []:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise PlanError(f"resources.providers: {name!r} is not a provider we know; {hint}known: {', '.join(known)}")


def restricted_providers(resources: Any) -> Optional[tuple[str, ...]]:
    """resources.providers (expanded), narrowed to the markets a provider's mode allows
    (resources.sky.managed: the clouds that run managed jobs)."""
    known_providers(resources.providers)
    asked = expand_providers(resources.providers)
    for cls in PROVIDERS.values():
        allowed = cls.plan_markets(resources)
        if allowed is None:
            continue
        narrowed = tuple(m for m in (asked or allowed) if m in allowed)
        if not narrowed:
            raise PlanError(f"resources.providers {', '.join(resources.providers)}: none of them runs this job the way "
                            f"resources.{cls.name} asks (these do: {', '.join(allowed)}); change one of the two "
                            "(e.g. drop --managed)")
        asked = narrowed
    return asked


def mode_notes(config: LaunchConfig, plan: Plan) -> Plan:
    """The plan with its chosen offer's provider's word on it (managed mode: the controller's cost)."""
    if plan.choice is None:
        return plan
    chosen = plan.rows[plan.choice]
    provider = renter_of(chosen.offer.provider)
    note = provider.plan_note(config.resources, chosen.offer, chosen.est_hours) if provider else None
    return dataclasses.replace(plan, mode_notes=(note,)) if note else plan


def multi_node_markets() -> frozenset[str]:
    """The markets where several machines can be rented to train together (SkyPilot's clouds but RunPod)."""
    return frozenset(m for name, cls in PROVIDERS.items() for m in markets_of(name) if cls.spans_nodes(m))


def live_need(need: ranking.JobNeed, constraints: ranking.Constraints) -> Need:
    """The provider-side filter of a live search: enough memory over all GPUs, the caps, the
    market (the disk comes from resources, which the provider holds)."""
    return Need(gpu=constraints.gpu.name if constraints.gpu else None, gpu_count=constraints.gpu_count or 1,
                max_usd_per_hour=constraints.max_usd_per_hour, interruptible=constraints.interruptible,
                min_vram_gb=round(need.vram_gb / ranking.VRAM_MARGIN, 2))


def market(config: LaunchConfig, need: ranking.JobNeed, constraints: ranking.Constraints,
           warn: Callable[[str], None], *, renting: bool = False,
           named: Optional[tuple[str, ...]] = None) -> list[Offer]:
    """Every offer to plan with: the catalogs, with a renting provider's rows replaced by its live
    offers when it is usable here. A live search that fails is a warning and the catalog stays;
    an unusable provider the user asked for (or `launch` would rent on) is named, with `launch check`."""
    found = ranking.catalog_offers()
    for name in rentable():
        covered = markets_of(name)
        if constraints.providers and not set(covered) & set(constraints.providers):
            continue
        provider_class = PROVIDERS[name]
        usable = availability(provider_class)
        if not usable.usable:
            asked = [m for m in covered if named and m in named]  # by the user (resources.providers)
            # A provider without a catalog (Kaggle) is simply absent from the plan: named only when asked for.
            priced = any(o.provider in covered for o in found)
            if asked or (renting and priced):
                for market in [m for m in asked if m != name] or [name]:
                    line = market_line(market) if market != name else None
                    where = "priced from its catalog, not rentable" if priced else "not in this plan"
                    warn(line or f"{provider_class.title} is not usable here ({usable.detail}); {where}: "
                         "`launch check` says how to set it up")
            continue
        try:
            live = provider_named(name, config.resources, log=warn).offers(live_need(need, constraints))
        except ProviderError as e:
            warn(f"{provider_class.title} live offers unavailable ({e}); priced from its catalog")
            continue
        replaced = set(covered) if not provider_class.markets else {o.provider for o in live}
        found = [o for o in found if o.provider not in replaced] + live
    return found


def _once(warn: Callable[[str], None]) -> Callable[[str], None]:
    said: set[str] = set()

    def warn_once(text: str) -> None:
        if text not in said:
            said.add(text)
            warn(text)

    return warn_once


def compute_plan(config: LaunchConfig, measured: Sequence[MeasuredSpeed], warn: Callable[[str], None], *,
                 example_tokens: Optional[list[int]] = None, extra_offers: Sequence[Offer] = (),
                 renting: bool = False) -> Plan:
    """The plan of a job. `renting`: for `launch` (and a recovery), the market is restricted to the
    providers that can rent (those asked for among them), and a plan with no fitting rentable
    offer raises (NothingFits, NothingRentable) before anything is spent."""
    constraints = constraints_for(config.resources)
    warn = _once(warn)  # the market may be asked twice (rentable, then everything): each warning once
    try:
        need = ranking.job_need(config, example_tokens)
    except UnknownModel as e:
        raise ConfigError(str(e)) from None
    if need.lengths_warning:
        warn(need.lengths_warning)
    if not renting:
        rows, choice = _rank(config, need, constraints, measured, warn, extra_offers)
        return mode_notes(config, Plan(need, constraints, rows, choice))
    asked = constraints.providers
    only_rentable = tuple(p for p in (asked or rentable()) if p in rentable()) or asked
    rental = _with_providers(constraints, only_rentable)
    rows, choice = _rank(config, need, rental, measured, warn, (), renting=True, named=asked)
    plan = Plan(need, rental, rows, choice)
    if not rows:  # nothing where we can rent: what the whole market offers says what to do
        rows, choice = _rank(config, need, constraints, measured, warn, ())
        plan = Plan(need, constraints, rows, choice)
    if plan.choice is None:
        raise NothingFits(ranking.no_fit_message(plan.rows, need))
    if not plan.candidates:
        raise NothingRentable(unrentable_message(plan))
    return mode_notes(config, plan)


AS_CONSTRAINED: Any = object()  # _rank's `named` default: the constraints' providers are the user's


def _rank(config: LaunchConfig, need: ranking.JobNeed, constraints: ranking.Constraints,
          measured: Sequence[MeasuredSpeed], warn: Callable[[str], None], extra: Sequence[Offer],
          renting: bool = False, named: Any = AS_CONSTRAINED
          ) -> tuple[list[ranking.PlannedOffer], Optional[int]]:
    """`named`: the providers the user asked for (by default, the constraints' own)."""
    found = market(config, need, constraints, warn, renting=renting,
                   named=constraints.providers if named is AS_CONSTRAINED else named) + list(extra)
    return ranking.plan(found, need, constraints, list(measured))


def _with_providers(c: ranking.Constraints, providers: Optional[tuple[str, ...]]) -> ranking.Constraints:
    return dataclasses.replace(c, providers=providers)


def unrentable_message(plan: Plan) -> str:
    """The plan's pick cannot be rented from here: say where renting works and what to do now."""
    assert plan.choice is not None
    best = plan.rows[plan.choice]
    o = best.offer
    unusable = [PROVIDERS[name] for name in rentable() if not availability(PROVIDERS[name]).usable]
    renter = renter_of(o.provider)
    if (renter is not None and renter.rents_machines) or unusable:
        how = "`launch check` says how to set up " + ", ".join(p.title for p in unusable or [renter])  # type: ignore[list-item]
    else:
        how = f"try --providers {','.join(rentable())}"
    why = "".join(f"\n  {line}" for line in plan.notes)
    return (f"the plan picks {o.gpu_count}x {o.gpu} on {o.provider} ({'spot' if o.interruptible else 'on-demand'}, "
            f"${o.usd_per_hour:.3f}/h, est. ${best.est_total_usd:.2f} in all), but it cannot be rented from here "
            f"({how}); to train now pass --target ssh://you@your-gpu-box (or local){why}")
