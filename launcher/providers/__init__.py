"""Targets the launcher can run a job on, one module each, all implementing base.Provider.

PROVIDERS is the registry: a new provider is a module and one line here. Everything else is
computed from it: which providers can rent (`rentable()`), which have settings in the job YAML
(resources.<name>, each provider's `settings_model`), which can be swept by `launch down --all`,
and what `launch check` lists."""

from __future__ import annotations

from typing import Any, Callable, Optional

from launcher.providers.base import Offer, Provider, ProviderContext, ProviderError, Sweepable
from launcher.providers.kaggle import KaggleProvider
from launcher.providers.local import LocalProvider
from launcher.providers.sky import SkyProvider
from launcher.providers.ssh import SSHProvider
from launcher.providers.vast import VastProvider

PROVIDERS: dict[str, type[Provider]] = {
    LocalProvider.name: LocalProvider,
    SSHProvider.name: SSHProvider,
    VastProvider.name: VastProvider,
    SkyProvider.name: SkyProvider,
    KaggleProvider.name: KaggleProvider,
}


def renter_of(market: str) -> Optional[type[Provider]]:
    """The provider that rents an offer of `market` (an Offer's provider: vast, aws, lambda, ...)."""
    if market in PROVIDERS:
        return PROVIDERS[market]
    return next((cls for cls in PROVIDERS.values() if market in cls.markets), None)


def renter_name(market: str) -> str:
    """The registry name of the provider renting `market` (the market itself when none does)."""
    cls = renter_of(market)
    return cls.name if cls is not None else market


def markets_of(name: str) -> tuple[str, ...]:
    """The offer providers a registered provider covers: its own name and its markets."""
    cls = PROVIDERS.get(name)
    return (name, *cls.markets) if cls is not None else (name,)


def rentable() -> tuple[str, ...]:
    """The providers `launch` can rent machines on."""
    return tuple(name for name, cls in PROVIDERS.items() if cls.rents_machines)


def sweepable() -> tuple[str, ...]:
    """The providers whose labelled machines `launch down --all` can list and destroy."""
    return tuple(name for name, cls in PROVIDERS.items() if issubclass(cls, Sweepable))


def settings_models() -> dict[str, type]:
    """resources.<name> -> the settings model of each provider that has one."""
    return {name: cls.settings_model for name, cls in PROVIDERS.items() if cls.settings_model is not None}


def provider_named(name: str, resources: Optional[Any] = None, address: Optional[str] = None,
                   log: Callable[[str], None] = lambda text: None) -> Provider:
    """Build a registered provider from the job's resources (its settings: resources.<name>)."""
    try:
        cls = PROVIDERS[name]
    except KeyError:
        raise ProviderError(f"unknown provider {name!r}; known: {', '.join(PROVIDERS)}") from None
    settings = getattr(resources, name, None) if resources is not None and cls.settings_model else None
    return cls.from_context(ProviderContext(resources=resources, settings=settings, address=address, log=log))


def provider_for_target(target: str, resources: Optional[Any] = None) -> Provider:
    """The provider of a machine named with --target: `local`, else an SSH address or alias."""
    if target == LocalProvider.name:
        return provider_named(LocalProvider.name, resources)
    return provider_named(SSHProvider.name, resources, address=target)


__all__ = ["PROVIDERS", "Offer", "Provider", "ProviderError", "markets_of", "provider_named", "provider_for_target",
           "rentable", "renter_name", "renter_of", "settings_models", "sweepable"]
