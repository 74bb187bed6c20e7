"""The sky provider over a stand-in of SkyPilot's SDK whose clusters are real sshd's on 127.0.0.1
(tests/fakes/sky_sdk.py): a real cloud launch cannot run here. The task it is given is SkyPilot's
own Task and Resources, priced by SkyPilot's catalog code; the keep-alive job runs for real.

What is checked: autodown is armed at launch (down, after resources.sky.idle_minutes, by the job
queue only); the head is reached over the SSH details SkyPilot reports; any failure after the
launch call (setup failed, SSH silent, Ctrl-C) is followed by a down, and nothing is left;
teardown is idempotent; a preempted spot cluster reads as lost; `launch down --all`'s listing
finds our clusters by name prefix and nobody else's; a runner started again re-arms the
keep-alive job when it had ended."""

from __future__ import annotations

import _thread
import threading
import time
from pathlib import Path

import pytest

from launcher.providers.base import LOST_STATES, MachineSpec, Offer, ProviderError
from launcher.providers.sky import SkyProvider, SkySettings, snapshot_offers
from launcher.providers.sky_task import cluster_name
from launcher.providers.sky_workspace import SkyWorkspace
from tests.fakes.sky_sdk import FakeSky
from tests.helpers import ROOT


@pytest.fixture
def fake(tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_LAUNCH_HOME", str(tmp_path / "home"))
    sky = FakeSky(tmp_path / "sky")
    yield sky
    left = sky.alive()
    sky.stop()
    assert left == [], f"clusters or their processes left at the end of the test: {left}"


def a10g(spot: bool = False) -> Offer:
    return next(o for o in snapshot_offers("aws", ROOT / "catalogs") if o.instance_type == "g5.xlarge"
                and o.region == "us-east-1" and o.interruptible == spot)


def spec_for(tmp_path: Path, run_id: str) -> MachineSpec:
    return MachineSpec(run_id=run_id, known_hosts=tmp_path / "known_hosts" / run_id, control_dir=tmp_path / "ssh")


def provider_over(sky: FakeSky, **settings) -> tuple[SkyProvider, list[str]]:
    said: list[str] = []
    provider = SkyProvider(SkySettings(**{"ssh_timeout_s": 20, **settings}), log=said.append, client=sky)
    return provider, said


def test_a_launch_arms_autodown_reaches_the_head_and_tears_down_once(fake, tmp_path):
    provider, said = provider_over(fake, idle_minutes=7)
    spec = spec_for(tmp_path, "20261202-060000-tiny-ab12")
    rented = provider.provision(a10g(), spec)
    name = cluster_name(spec.run_id)
    assert rented.machine_id == name and rented.machine.name == f"sky:{name}"
    assert rented.usd_per_hour == a10g().usd_per_hour  # the catalog price: what SkyPilot's cost report uses too
    cluster = fake.clusters[name]
    assert cluster.autostop["idle_minutes"] == 7 and cluster.autostop["down"] is True
    assert cluster.autostop["wait_for"].value == "jobs"
    assert rented.machine.run("echo $HOME", timeout=30).stdout.strip() == str(cluster.home)
    assert provider.state(rented.machine) == "running"
    again = provider.reconnect(name, spec)
    assert again.run("echo again", timeout=30).stdout.strip() == "again"
    # The keep-alive job runs on the head (it is what SkyPilot's autostop sees).
    workspace = provider.open_workspace(rented.machine, spec.run_id)
    assert isinstance(workspace, SkyWorkspace)
    deadline = time.monotonic() + 10
    while not workspace.keep_alive_running() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert workspace.keep_alive_running()
    assert (cluster.home / "qlora-launch" / ".node.env").read_text().count("export SKYPILOT_") == 4
    assert any("its output:" in line for line in said)
    provider.terminate(rented.machine)
    provider.terminate(again)  # twice: a cluster SkyPilot does not know is down already
    assert fake.clusters == {} and fake.downed() == [name, name]
    assert provider.state(rented.machine) == "gone"


@pytest.mark.parametrize("fault", ["setup", "ssh"])
def test_any_failure_after_the_launch_call_is_followed_by_a_down(fake, tmp_path, fault):
    if fault == "setup":
        fake.fail_launch = "ray failed to start"
    else:
        fake.break_ssh = True
    provider, said = provider_over(fake, ssh_timeout_s=2)
    spec = spec_for(tmp_path, f"20261202-060000-tiny-{fault}")
    with pytest.raises(ProviderError) as failed:
        provider.provision(a10g(), spec)
    name = cluster_name(spec.run_id)
    assert fake.launched() == [name] and fake.downed() == [name]
    assert fake.clusters == {}  # SkyPilot kept it "for debugging"; we did not
    expected = "Failed to set up SkyPilot runtime" if fault == "setup" else "SSH did not answer"
    assert expected in str(failed.value)
    assert any(f"cluster {name} torn down" in line for line in said)


def test_ctrl_c_while_skypilot_launches_cancels_the_request_and_downs_the_cluster(fake, tmp_path):
    fake.hang_launch = True
    provider, _ = provider_over(fake)
    spec = spec_for(tmp_path, "20261202-060000-tiny-ctrlc")
    threading.Timer(1.0, _thread.interrupt_main).start()  # the user's Ctrl-C, in the main thread
    with pytest.raises(KeyboardInterrupt):
        provider.provision(a10g(), spec)
    name = cluster_name(spec.run_id)
    assert fake.cancelled and fake.downed() == [name] and fake.clusters == {}


def test_a_preempted_spot_cluster_reads_as_lost(fake, tmp_path):
    provider, _ = provider_over(fake)
    rented = provider.provision(a10g(spot=True), spec_for(tmp_path, "20261202-060000-tiny-spot"))
    fake.preempt(rented.machine_id)
    assert provider.state(rented.machine) in LOST_STATES
    provider.terminate(rented.machine)  # what the recovery does next: safe on a cluster already gone


def test_the_sweep_lists_our_clusters_by_prefix_known_here_or_not(fake, tmp_path):
    provider, _ = provider_over(fake)
    ours = provider.provision(a10g(), spec_for(tmp_path, "20261202-060000-tiny-mine"))
    other_laptop = SkyProvider(SkySettings(ssh_timeout_s=20), client=fake)  # another launcher, same account
    theirs = other_laptop.provision(a10g(), spec_for(tmp_path, "20261202-060001-tiny-theirs"))
    own = fake.Task(run="sleep 1")  # the user's own cluster, launched with `sky launch`: not ours
    own.set_resources(fake.Resources(infra="aws/us-east-1", instance_type="g5.xlarge"))
    fake.get(fake.launch(own, cluster_name="my-dev-box"))
    listed = {m.machine_id: m for m in provider.labelled_machines()}
    assert set(listed) == {ours.machine_id, theirs.machine_id}
    assert listed[ours.machine_id].name == ours.machine.name and listed[ours.machine_id].status == "UP"
    assert listed[ours.machine_id].usd_per_hour == pytest.approx(a10g().usd_per_hour)
    for machine_id in listed:
        provider.destroy_machine(machine_id)
    fake.get(fake.down("my-dev-box"))
    assert fake.clusters == {}


def test_starting_a_runner_again_rearms_the_keep_alive_job(fake, tmp_path):
    provider, _ = provider_over(fake, watchdog_idle_minutes=0.02)  # 1.2 s: it ends soon without a runner
    spec = spec_for(tmp_path, "20261202-060000-tiny-rearm")
    rented = provider.provision(a10g(), spec)
    workspace = provider.open_workspace(rented.machine, spec.run_id)
    cluster = fake.clusters[rented.machine_id]
    cluster.jobs[0].wait(timeout=30)  # the launch's keep-alive job ended: nothing trained, nobody looked
    assert not workspace.keep_alive_running()
    workspace.machine.run(f"mkdir -p {workspace.folder}", timeout=30)
    workspace.start("sleep 5; echo", resume=False)  # a runner started again on this cluster
    assert [call for call, _ in fake.calls].count("exec") == 1
    provider.terminate(rented.machine)
