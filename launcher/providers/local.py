"""The local target: this machine, through the same lifecycle as a remote one."""

from __future__ import annotations

from launcher.providers.base import MachineSpec, MachineState, Need, Offer, Provider, Provisioned, gpu_offer
from launcher.remote import LocalMachine, Machine
from launcher.runs import state_dir

MACHINE_ID = "local"


class LocalProvider(Provider):
    name = "local"
    title = "this machine"

    def offers(self, need: Need, usd_per_hour: float = 0.0) -> list[Offer]:
        return [gpu_offer("local", "local", LocalMachine(), usd_per_hour)]

    def provision(self, offer: Offer, spec: MachineSpec) -> Provisioned:
        return Provisioned(LocalMachine(), MACHINE_ID, offer.usd_per_hour)

    def reconnect(self, machine_id: str, spec: MachineSpec) -> Machine:
        return LocalMachine()

    def state(self, machine: Machine) -> MachineState:
        return "running"

    def terminate(self, machine: Machine) -> None:
        """Nothing to stop paying for."""

    def default_workdir(self) -> str:
        # Beside the run records, so QLORA_LAUNCH_HOME keeps everything of a test in one place.
        return str(state_dir() / "local-target")
