"""The provider contract (launcher/providers/base.py), one test run against every registered
provider: `local`, `ssh` (the test sshd), `vast` (VastProvider over the fake Vast.ai API, whose
instances are real sshd's), `sky` (SkyProvider over a stand-in of SkyPilot's SDK whose clusters
are real sshd's: tests/fakes/sky_sdk.py), `kaggle` (KaggleProvider over the fake Kaggle API
through the real client: a kernel, no shell) and the in-memory provider of the lifecycle's tests.

For each: offers have the Offer shape and units; provision returns a Provisioned whose machine_id
reconnect() finds again; state says running for a live machine and never raises for a vanished
one; terminate is idempotent and safe on a vanished machine; a Sweepable provider lists what it
rented for a run by the run's label. A provider added to the registry without a fixture here
fails `test_every_registered_provider_is_held_to_the_contract`. Nothing is left billing: the fake
Vast.ai and the memory cloud end every test with no machine alive."""

from __future__ import annotations

import getpass
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pytest

from launcher.providers import PROVIDERS, provider_for_target, provider_named
from launcher.providers.base import (
    MachineSpec, Need, Offer, Provider, Provisioned, Sweepable,
)
from launcher.providers.vast import POLL_ENV, SSH_USER_ENV, VastProvider, VastSettings
from launcher.providers.vast_api import VastAPI
from launcher.remote import Machine
from launcher.providers import sky as sky_provider
from launcher.providers.base import Availability
from tests.fakes.memory_provider import MemoryCloud, MemoryProvider, memory_offer
from tests.fakes.sky_sdk import FakeSky
from tests.fakes.vast_api import ACCOUNT_KEY, FakeVast
from tests.helpers import ROOT
from tests.sshd import SSHServer, free_port, keygen

CATALOG = ROOT / "catalogs" / "v8" / "vast" / "vms.csv"
MACHINE_STATES = ("starting", "running", "idle", "stopped", "preempted", "gone", "unknown")


@dataclass
class Contract:
    """One provider under the contract, with what only its test knows how to do."""

    provider: Provider
    spec: MachineSpec
    need: Need
    # Make the provisioned machine disappear behind the provider's back (the host went away);
    # returns the machine to ask about. None: this machine cannot vanish (it is this one).
    vanish: Optional[Callable[[Provisioned], Machine]]
    # Whether a command runs on the machine (a shell); False: the provider's state must say running.
    answers: Callable[[Machine], bool]
    # What the provider bills for, as its fake counts it (nothing billed after a test); None: own boxes.
    alive: Optional[Callable[[], list]] = None
    # A machine that is only a name until its workspace starts something there (a Kaggle kernel:
    # the workspace's start pushes it): make it run. None: provision brings it up.
    bring_up: Optional[Callable[[Provisioned], None]] = None
    # The provider has no call that ends the machine (Kaggle: a kernel ends by itself, and bills
    # nothing): after terminate it must have ended within this many seconds. None: terminate ends it.
    ends_by_itself_s: Optional[float] = None


def shell_answers(machine: Machine) -> bool:
    return machine.run("echo contract", timeout=60).stdout.strip() == "contract"


def spec_for(tmp_path: Path, run_id: str, identity: Optional[Path] = None) -> MachineSpec:
    return MachineSpec(run_id=run_id, known_hosts=tmp_path / "known_hosts" / run_id, control_dir=tmp_path / "ssh",
                       identity=identity)


@pytest.fixture
def local_contract(tmp_path, monkeypatch) -> Contract:
    monkeypatch.setenv("QLORA_LAUNCH_HOME", str(tmp_path / "home"))
    return Contract(provider_named("local"), spec_for(tmp_path, "contract-local"), Need(), None, shell_answers)


@pytest.fixture
def ssh_contract(tmp_path, monkeypatch, sshd: SSHServer) -> Contract:
    monkeypatch.setenv("QLORA_LAUNCH_HOME", str(tmp_path / "home"))
    provider = provider_for_target(sshd.target)
    spec = spec_for(tmp_path, "contract-ssh", sshd.client_key)

    def vanish(provisioned: Provisioned) -> Machine:
        # Your own box cannot be made to vanish for the other tests' sake: the same provider
        # asked about a box that no longer answers (nothing listens at its address).
        return provider.reconnect(f"ssh://{sshd.user}@127.0.0.1:{free_port()}", spec)

    return Contract(provider, spec, Need(), vanish, shell_answers)


@pytest.fixture
def vast_contract(tmp_path, monkeypatch) -> Contract:
    monkeypatch.setenv("QLORA_LAUNCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv(SSH_USER_ENV, getpass.getuser())  # the fake's instances are sshd's run as us
    monkeypatch.setenv(POLL_ENV, "0.05")
    fake = FakeVast(CATALOG, tmp_path / "vast", loading_s=0.05).start()
    provider = VastProvider(VastSettings(ssh_timeout_s=30), api=VastAPI(ACCOUNT_KEY, fake.url))
    spec = spec_for(tmp_path, "contract-vast", keygen(tmp_path / "vast_ed25519"))

    def vanish(provisioned: Provisioned) -> Machine:
        fake.vanish(int(provisioned.machine_id))
        return provisioned.machine

    yield Contract(provider, spec, Need(interruptible=False, max_usd_per_hour=0.5), vanish, shell_answers, fake.alive)
    alive = fake.alive()
    fake.stop()
    assert alive == [], f"instances still alive on the fake Vast.ai at the end of the test: {alive}"


@pytest.fixture
def sky_contract(tmp_path, monkeypatch) -> Contract:
    monkeypatch.setenv("QLORA_LAUNCH_HOME", str(tmp_path / "home"))
    # The account: AWS enabled (there is no real credential to check here), the other clouds not.
    monkeypatch.setattr(sky_provider, "cloud_availability",
                        lambda cloud: Availability(cloud == "aws", f"{cloud}: as the test account says"))
    fake = FakeSky(tmp_path / "sky")
    provider = sky_provider.SkyProvider(sky_provider.SkySettings(clouds=["aws"], ssh_timeout_s=20), client=fake)

    def vanish(provisioned: Provisioned) -> Machine:
        fake.preempt(provisioned.machine_id)  # the cloud took the spot nodes back
        return provisioned.machine

    yield Contract(provider, spec_for(tmp_path, "20261202-000000-contract-sky"),
                   Need(gpu="A10G", interruptible=False, max_usd_per_hour=1.1), vanish, shell_answers, fake.alive)
    alive = fake.alive()
    fake.stop()
    assert alive == [], f"clusters still up on the fake SkyPilot at the end of the test: {alive}"


@pytest.fixture
def memory_contract(tmp_path, monkeypatch) -> Contract:
    cloud = MemoryCloud([memory_offer(1, 0.25), memory_offer(2, 0.0, interruptible=False, vram_gb=80.0)])
    provider = cloud.register(monkeypatch)()  # as the registry builds it

    def vanish(provisioned: Provisioned) -> Machine:
        cloud.set_state(provisioned.machine_id, "gone")
        return provisioned.machine

    def answers(machine: Machine) -> bool:
        known = cloud.machines.get(getattr(machine, "machine_id", ""))
        return machine is known and provider.state(machine) == "running"  # no shell: the same machine, running

    yield Contract(provider, spec_for(tmp_path, "contract-memory"), Need(), vanish, answers, cloud.alive)
    assert cloud.alive() == [], f"memory machines still alive at the end of the test: {cloud.alive()}"


@pytest.fixture
def kaggle_contract(tmp_path, monkeypatch, kaggle_fake, kaggle_home) -> Contract:
    from tests.fakes.kaggle_api import with_key

    monkeypatch.setenv("QLORA_LAUNCH_HOME", str(tmp_path / "home"))
    with_key(kaggle_home)
    kaggle_fake.run_s = 5.0  # the pushed kernel runs this long, then ends by itself
    provider = provider_named("kaggle")

    def bring_up(provisioned: Provisioned) -> None:
        kernel = provisioned.machine
        folder = tmp_path / "kernel"
        folder.mkdir(exist_ok=True)
        (folder / "run.py").write_text("print('contract')\n")
        (folder / "kernel-metadata.json").write_text(json.dumps({
            "id": kernel.ref, "title": "contract", "code_file": "run.py", "language": "python",
            "kernel_type": "script", "is_private": True, "enable_gpu": True, "enable_internet": False}))
        provider.api.kernels_push(str(folder))
        wait_until(lambda: provider.state(kernel) == "running", 10)

    def vanish(provisioned: Provisioned) -> Machine:
        kaggle_fake.wait_finished()
        kaggle_fake.kernels.pop(provisioned.machine.ref)  # deleted on kaggle.com
        return provisioned.machine

    def answers(machine: Machine) -> bool:  # no shell: the kernel runs
        return provider.state(machine) == "running"

    def alive() -> list[str]:
        return [f"kaggle:{ref.rsplit('/', 1)[0]}" for ref in kaggle_fake.running()]

    yield Contract(provider, spec_for(tmp_path, "contract-kaggle"), Need(), vanish, answers, alive,
                   bring_up=bring_up, ends_by_itself_s=20.0)


def wait_until(condition: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"not so after {timeout_s} s"
        time.sleep(0.05)


# The registry's names, each with the fixture that puts it under the contract; `memory` is the
# lifecycle tests' fake (registered by those tests), held to the same contract.
CONTRACT_FIXTURES = {"local": "local_contract", "ssh": "ssh_contract", "vast": "vast_contract",
                     "sky": "sky_contract", "kaggle": "kaggle_contract", "memory": "memory_contract"}
CLASSES = {**PROVIDERS, "memory": MemoryProvider}
SWEEPABLE = [name for name in CONTRACT_FIXTURES if issubclass(CLASSES[name], Sweepable)]


@pytest.fixture(params=list(CONTRACT_FIXTURES))
def contract(request) -> Contract:
    return request.getfixturevalue(CONTRACT_FIXTURES[request.param])


def test_every_registered_provider_is_held_to_the_contract():
    missing = sorted(set(PROVIDERS) - set(CONTRACT_FIXTURES))
    assert not missing, (f"providers without a contract fixture in {Path(__file__).name}: {missing}; add one "
                         "(its offers, a machine it can provision here, how that machine vanishes)")
    assert {"vast", "sky", "memory"} <= set(SWEEPABLE)


def first_offer(contract: Contract) -> Offer:
    found = contract.provider.offers(contract.need, 0.0)
    assert found, f"{contract.provider.name}: no offer for {contract.need}"
    return found[0]


def provision(contract: Contract) -> Provisioned:
    before = time.time()
    rented = contract.provider.provision(first_offer(contract), contract.spec)
    after = time.time()
    if contract.bring_up is not None:
        contract.bring_up(rented)
    assert isinstance(rented, Provisioned) and isinstance(rented.machine, Machine)
    assert isinstance(rented.machine_id, str) and rented.machine_id
    assert isinstance(rented.usd_per_hour, float) and rented.usd_per_hour >= 0
    assert before - 5 <= rented.started_at <= after + 1, "started_at: when the machine came up (about now)"
    return rented


def test_offers_have_the_offer_shape_and_units(contract: Contract):
    provider = contract.provider
    found = provider.offers(contract.need, 0.0)
    assert found
    for offer in found:
        assert isinstance(offer, Offer)
        assert offer.provider in (provider.name, *provider.markets)  # sky: the cloud (aws, lambda, ...)
        assert isinstance(offer.usd_per_hour, float) and math.isfinite(offer.usd_per_hour) and offer.usd_per_hour >= 0
        assert isinstance(offer.gpu_count, int) and offer.gpu_count >= 0
        assert isinstance(offer.interruptible, bool)
        if offer.gpu_count:
            assert isinstance(offer.gpu, str) and offer.gpu
        # Per GPU, as the market states it: between a small card and the biggest one made.
        assert offer.vram_gb is None or (isinstance(offer.vram_gb, float) and 2 <= offer.vram_gb <= 200), offer
        if offer.offer_id is not None:
            assert isinstance(offer.offer_id, int)
        if contract.need.max_usd_per_hour is not None:
            assert offer.usd_per_hour <= contract.need.max_usd_per_hour
        if contract.need.interruptible is not None:
            assert offer.interruptible == contract.need.interruptible
        assert type(provider).can_rent(offer) == provider.rents_machines


def test_provision_returns_what_reconnect_finds_and_terminate_is_idempotent(contract: Contract):
    provider = contract.provider
    rented = provision(contract)
    assert provider.state(rented.machine) == "running"
    assert contract.answers(rented.machine)
    # A new process knows the run record only: its machine_id finds the machine again.
    again = provider.reconnect(rented.machine_id, contract.spec)
    assert again.name == rented.machine.name
    assert provider.state(again) == "running" and contract.answers(again)
    provider.terminate(again)
    provider.terminate(rented.machine)  # twice (and through another handle) is fine
    if provider.rents_machines:
        if contract.ends_by_itself_s is not None:
            wait_until(lambda: provider.state(rented.machine) not in ("running", "starting"), contract.ends_by_itself_s)
        assert provider.state(rented.machine) not in ("running", "starting")  # we no longer pay for it
        assert rented.machine_id not in (contract.alive() if contract.alive else [])
    else:
        assert provider.state(rented.machine) == "running"  # your box: terminate leaves it running
        assert contract.answers(provider.reconnect(rented.machine_id, contract.spec))
        provider.terminate(rented.machine)


# The local machine is the launcher's own: it cannot vanish under it, so it has no such case.
VANISHABLE = [name for name in CONTRACT_FIXTURES if name != "local"]


@pytest.mark.parametrize("name", VANISHABLE)
def test_a_vanished_machine_is_gone_or_unknown_and_terminate_is_safe_on_it(name: str, request):
    contract: Contract = request.getfixturevalue(CONTRACT_FIXTURES[name])
    assert contract.vanish is not None
    provider = contract.provider
    rented = provision(contract)
    vanished = contract.vanish(rented)
    assert provider.state(vanished) in ("gone", "unknown")  # never raises
    # The run record's machine_id still reconnects (never raises); state says what became of it.
    found = provider.reconnect(rented.machine_id, contract.spec) if provider.rents_machines else vanished
    assert provider.state(found) in ("gone", "unknown")
    provider.terminate(vanished)
    provider.terminate(vanished)
    provider.terminate(found)
    assert provider.state(vanished) in MACHINE_STATES
    provider.terminate(rented.machine)
    if not provider.rents_machines:
        assert provider.state(rented.machine) == "running"  # the real box was never touched
        provider.terminate(rented.machine)  # (asking it opened our connection again)


@pytest.mark.parametrize("name", SWEEPABLE)
def test_sweepable_providers_list_the_machines_labelled_for_a_run(name: str, request):
    contract: Contract = request.getfixturevalue(CONTRACT_FIXTURES[name])
    provider = contract.provider
    assert isinstance(provider, Sweepable)
    rented = provision(contract)
    try:
        listed = {m.machine_id: m for m in provider.labelled_machines()}
        assert rented.machine_id in listed, listed
        mine = listed[rented.machine_id]
        assert mine.label == provider.run_label(contract.spec.run_id)
        assert mine.name == rented.machine.name and mine.usd_per_hour >= 0
        provider.destroy_machine(rented.machine_id)
        assert rented.machine_id not in {m.machine_id for m in provider.labelled_machines()}
        assert provider.state(rented.machine) in ("gone", "unknown")
    finally:
        provider.terminate(rented.machine)
