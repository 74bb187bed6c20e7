"""Targets the launcher can run a job on, one module each, all implementing base.Provider.

PROVIDERS maps a target kind to its class; `provider_for(target)` picks one from --target."""

from __future__ import annotations

from typing import Any, Callable, Optional

from launcher.providers.base import Offer, Provider, ProviderError
from launcher.providers.local import LocalProvider
from launcher.providers.ssh import SSHProvider
from launcher.providers.vast import VastProvider

PROVIDERS: dict[str, type[Provider]] = {"local": LocalProvider, "ssh": SSHProvider, "vast": VastProvider}


def provider_for(target: str, resources: Optional[Any] = None,
                 log: Callable[[str], None] = lambda text: None) -> Provider:
    """`local`, `vast` (not rented yet) or `vast:<instance id>`, `ssh://user@host[:port]`,
    `user@host` or an ~/.ssh/config alias. `resources`: the job's, for the rented providers' settings."""
    if target == "local":
        return LocalProvider()
    if target == "vast" or target.startswith("vast:"):
        return VastProvider(resources.vast if resources else None, log=log,
                            workdir=resources.workdir if resources else None,
                            prebuild_venv=not (resources and resources.python),
                            min_disk_gb=resources.disk_gb if resources else None)
    return SSHProvider(target)


__all__ = ["PROVIDERS", "Offer", "Provider", "ProviderError", "provider_for"]
