"""Your own SSH-reachable box (or one rented by hand): `--target ssh://user@host[:port]`,
`user@host` or an ~/.ssh/config alias. We did not rent it, so we never shut it down:
terminate() leaves the machine running (`launch down` stops the job on it)."""

from __future__ import annotations

from typing import Optional

from launcher.providers.base import MachineSpec, MachineState, Need, Offer, Provider, gpu_offer
from launcher.remote import Machine, RemoteError, SSHAddress, SSHMachine, SSHOptions, env_ssh_config


class SSHProvider(Provider):
    name = "ssh"

    def __init__(self, target: str, spec: Optional[MachineSpec] = None) -> None:
        self.address = SSHAddress.parse(target)  # ValueError with the fix for a malformed target
        self.spec = spec

    def offers(self, need: Need, usd_per_hour: float = 0.0) -> list[Offer]:
        """The box itself, with the GPUs its nvidia-smi lists (needs `spec` to reach it)."""
        if self.spec is None:
            return [Offer(provider="ssh", target=str(self.address), usd_per_hour=usd_per_hour)]
        return [gpu_offer("ssh", str(self.address), self.provision(Offer("ssh"), self.spec), usd_per_hour)]

    def provision(self, offer: Offer, spec: MachineSpec) -> Machine:
        machine = self._machine(spec)
        machine.ensure_connected()  # remote.Unreachable says why (refused, bad key, unknown host)
        return machine

    def reconnect(self, target: str, spec: MachineSpec) -> Machine:
        return self._machine(spec)

    def _machine(self, spec: MachineSpec) -> SSHMachine:
        return SSHMachine(self.address, SSHOptions(known_hosts=spec.known_hosts, control_dir=spec.control_dir,
                                                   identity=spec.identity, ssh_config=env_ssh_config()))

    def state(self, machine: Machine) -> MachineState:
        try:
            machine.run("true", timeout=30)
        except RemoteError:
            return "unknown"  # unreachable now; our own box may come back
        return "running"

    def terminate(self, machine: Machine) -> None:
        """Your box keeps running: we only close our shared connection."""
        machine.close()
