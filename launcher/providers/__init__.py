"""Targets the launcher can run a job on, one module each, all implementing base.Provider.

PROVIDERS maps a target kind to its class; `provider_for(target)` picks one from --target."""

from __future__ import annotations

from launcher.providers.base import Offer, Provider, ProviderError
from launcher.providers.local import LocalProvider
from launcher.providers.ssh import SSHProvider

PROVIDERS: dict[str, type[Provider]] = {"local": LocalProvider, "ssh": SSHProvider}


def provider_for(target: str) -> Provider:
    """`local`, `ssh://user@host[:port]`, `user@host` or an ~/.ssh/config alias."""
    if target == "local":
        return LocalProvider()
    return SSHProvider(target)


__all__ = ["PROVIDERS", "Offer", "Provider", "ProviderError", "provider_for"]
