"""The local target: this machine, through the same lifecycle as a remote one."""

from __future__ import annotations

from launcher.providers.base import MachineSpec, MachineState, Need, Offer, Provider, gpu_offer
from launcher.remote import LocalMachine, Machine
from launcher.runs import state_dir


class LocalProvider(Provider):
    name = "local"

    def offers(self, need: Need, usd_per_hour: float = 0.0) -> list[Offer]:
        return [gpu_offer("local", "local", LocalMachine(), usd_per_hour)]

    def provision(self, offer: Offer, spec: MachineSpec) -> Machine:
        return LocalMachine()

    def reconnect(self, target: str, spec: MachineSpec) -> Machine:
        return LocalMachine()

    def state(self, machine: Machine) -> MachineState:
        return "running"

    def terminate(self, machine: Machine) -> None:
        """Nothing to stop paying for."""

    def default_workdir(self) -> str:
        # Beside the run records, so QLORA_LAUNCH_HOME keeps everything of a test in one place.
        return str(state_dir() / "local-target")
