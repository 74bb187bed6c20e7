"""Your own SSH-reachable box (or one rented by hand): `--target ssh://user@host[:port]`,
`user@host` or an ~/.ssh/config alias. We did not rent it, so we never shut it down:
terminate() leaves the machine running (`launch down` stops the job on it)."""

from __future__ import annotations

from typing import Optional

from launcher.providers.base import (
    MachineSpec, MachineState, Need, Offer, Provider, ProviderContext, ProviderError, Provisioned, gpu_offer,
)
from launcher.remote import Machine, RemoteError, SSHAddress, SSHMachine, SSHOptions, env_ssh_config


class SSHProvider(Provider):
    name = "ssh"
    title = "your SSH box"

    def __init__(self, target: Optional[str] = None, spec: Optional[MachineSpec] = None) -> None:
        self.target = target  # as the user wrote it: what the run record names the box by
        self.address = SSHAddress.parse(target) if target else None  # ValueError with the fix when malformed
        self.spec = spec

    @classmethod
    def from_context(cls, context: ProviderContext) -> "SSHProvider":
        return cls(context.address)

    def offers(self, need: Need, usd_per_hour: float = 0.0) -> list[Offer]:
        """The box itself, with the GPUs its nvidia-smi lists (needs `spec` to reach it)."""
        address = str(self._address())
        if self.spec is None:
            return [Offer(provider="ssh", target=address, usd_per_hour=usd_per_hour)]
        return [gpu_offer("ssh", address, self.provision(Offer("ssh"), self.spec).machine, usd_per_hour)]

    def provision(self, offer: Offer, spec: MachineSpec) -> Provisioned:
        self._address()
        machine = self._machine(self.target, spec)
        machine.ensure_connected()  # remote.Unreachable says why (refused, bad key, unknown host)
        return Provisioned(machine, self.target, offer.usd_per_hour)

    def reconnect(self, machine_id: str, spec: MachineSpec) -> Machine:
        return self._machine(machine_id, spec)

    def _address(self) -> SSHAddress:
        if self.address is None:
            raise ProviderError("no SSH box named: pass --target ssh://user@host[:port] (or resources.target)")
        return self.address

    def _machine(self, address: Optional[str], spec: MachineSpec) -> SSHMachine:
        return SSHMachine(SSHAddress.parse(address), SSHOptions(
            known_hosts=spec.known_hosts, control_dir=spec.control_dir, identity=spec.identity,
            ssh_config=env_ssh_config()))

    def state(self, machine: Machine) -> MachineState:
        try:
            machine.run("true", timeout=30)
        except RemoteError:
            return "unknown"  # unreachable now; our own box may come back
        return "running"

    def terminate(self, machine: Machine) -> None:
        """Your box keeps running: we only close our shared connection."""
        machine.close()
