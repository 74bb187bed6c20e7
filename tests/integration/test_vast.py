"""The Vast.ai provider end to end against the fake Vast.ai API (tests/fakes/vast_api.py), whose
instances are real sshd's on loopback, with `launch` run as a user runs it: live offers in the
plan, a whole run on a rented instance, preemption mid-run -> resumed on another offer with
the same losses and the $ the fake billed, 429s, a lost create reply, an instance whose SSH
never answers, a stalled image pull, `down --all` finding an orphan, a mangled instance list.
Every test ends with no instance alive on the fake (the fixture fails the test otherwise)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fakes.vast_api import ACCOUNT_KEY, FakeVast
from tests.helpers import ROOT, processes_naming, tiny_job, train_losses
from tests.integration import fault_table
from tests.integration.conftest import STEPS_60, Launcher, VastLauncher, output_of

STEPS = STEPS_60["max_steps"]


@pytest.fixture
def launcher(vast_launcher: VastLauncher) -> VastLauncher:
    return vast_launcher


def job(path: Path, **vast_settings) -> Path:
    settings = {"ssh_timeout_s": 5, "pull_stall_s": 3, "max_offers_tried": 2, **vast_settings}
    return tiny_job(path, train=STEPS_60,
                    resources={"python": sys.executable, "providers": ["vast"], "vast": settings})


@pytest.fixture
def reference_losses(reference_losses_60) -> dict[int, float]:
    return reference_losses_60


def test_plan_shows_the_live_offers_worth_renting(launcher: VastLauncher, vast: FakeVast):
    proc = launcher.run("plan", "--config", str(job(launcher.folder / "job.yaml")), "--providers", "vast", "--json")
    assert proc.returncode == 0, output_of(proc)
    plan = json.loads(proc.stdout)
    live = [o for o in plan["offers"] if o["provider"] == "vast"]
    ids = {int(o["instance_type"].split()[-1]) for o in live}
    assert live and ids <= set(vast.offers)
    # The quality floors held: no unverified, unreliable, proxy-only, old-CUDA, slow or small host.
    for offer_id in ids:
        o = vast.offers[offer_id]
        assert o.verified and o.reliability >= 0.9 and o.direct_port_count > 0 and o.cuda_max_good >= 12.8
        assert o.inet_down >= 100 and o.disk_space >= 60
    flawed = [o for o in vast.offers.values() if not o.verified or o.reliability < 0.9]
    assert flawed and not ids & {o.id for o in flawed}
    # Both markets, interruptible at the minimum bid.
    spot = [o for o in live if o["interruptible"]]
    assert spot and all(o["usd_per_hour"] == vast.offers[int(o["instance_type"].split()[-1])].min_bid for o in spot)
    assert plan["offers"][plan["choice"]]["fits"]


def test_a_whole_run_on_a_rented_instance(launcher: VastLauncher, vast: FakeVast, reference_losses):
    vast.fail_next(2, 429, retry_after=0.1)  # rate limited first: retried, then fine
    proc = launcher.run("--config", str(job(launcher.folder / "job.yaml")), "--yes")
    out = output_of(proc)
    assert proc.returncode == 0, out[-4000:]
    (record,) = launcher.records()
    assert record.status == "done" and record.provider == "vast" and record.target.startswith("vast:")
    instance = vast.instances[int(record.target.split(":")[1])]
    assert instance.label == f"qlora-launch:{record.id}" and instance.destroyed_at is not None
    assert train_losses(Path(record.run_dir)) == pytest.approx(reference_losses, abs=1e-5)
    assert (Path(record.run_dir) / "adapter" / "adapter_model.safetensors").is_file()
    # The watchdog went on with the instance, holding the instance's own key, not the account's.
    assert "watchdog" in (instance.home / ".qlora-launch" / "watchdog.log").read_text()
    assert instance.onstart and ACCOUNT_KEY not in instance.onstart
    # One machine, billed as the fake billed it, shown in the summary.
    store_machines = machines_of(launcher, record.id)
    assert [m["end_reason"] for m in store_machines] == ["done"]
    assert "machines" in out and record.target in out
    assert_spent_matches(store_machines, vast)
    # The key never lands in the run folder, the run records or the launcher's state directory.
    for folder in (Path(record.run_dir), launcher.home):
        for path in folder.rglob("*"):
            if path.is_file():
                assert ACCOUNT_KEY.encode() not in path.read_bytes(), path
    fault_table.report("provider API 429s", "vast", recovered=True, end_state=record.status, steps_redone=0,
                       billed_usd=vast.billed_usd(), orphans=len(vast.alive()))


def test_preemption_resumes_on_another_offer_with_the_same_losses(launcher: VastLauncher, vast: FakeVast,
                                                                  reference_losses):
    proc, out, first, preempted_at = preempt_mid_run(launcher, vast, pulled=20, step=25)
    assert proc.returncode == 0, out[-4000:]
    (record,) = launcher.records()
    assert record.status == "done" and record.target != f"vast:{first}"
    assert "preempted" in out
    assert train_losses(Path(record.run_dir)) == pytest.approx(reference_losses, abs=1e-5)
    machines = machines_of(launcher, record.id)
    assert [m["end_reason"] for m in machines] == ["preempted", "done"]
    assert machines[0]["ended_at"] - preempted_at < 60  # noticed within a minute
    # The stopped instance was destroyed (Vast bills a stopped one's disk), and so was the second.
    assert vast.instances[first].destroyed_at is not None
    assert_spent_matches(machines, vast)
    reached = fault_table.status_step(vast.instances[first].home / Path(record.remote_dir).relative_to(
        vast.instances[int(record.target.split(":")[1])].home) / "status.json")
    fault_table.report("instance preempted", "vast", recovered=True, end_state=record.status,
                       steps_redone=fault_table.steps_redone(reached, Path(record.run_dir)),
                       billed_usd=vast.billed_usd(), orphans=len(vast.alive()),
                       recover_s=fault_table.recover_s(Path(record.run_dir), preempted_at))


def test_no_recover_stops_at_preempted_and_resume_moves_on(launcher: VastLauncher, vast: FakeVast,
                                                            reference_losses):
    proc, out, first, _ = preempt_mid_run(launcher, vast, "--no-recover", pulled=10, step=15)
    assert proc.returncode == 143, out[-3000:]
    (record,) = launcher.records()
    assert record.status == "preempted" and f"launch resume {record.id}" in record.error
    assert vast.alive() == []  # the stopped instance was destroyed all the same
    resumed = launcher.run("resume", record.id, timeout=300)
    assert resumed.returncode == 0, output_of(resumed)[-3000:]
    (record,) = launcher.records()
    assert record.status == "done" and record.target != f"vast:{first}"
    assert train_losses(Path(record.run_dir)) == pytest.approx(reference_losses, abs=1e-5)
    assert [m["end_reason"] for m in machines_of(launcher, record.id)] == ["preempted", "done"]


def test_a_lost_create_reply_never_rents_twice(launcher: VastLauncher, vast: FakeVast):
    vast.lose_create_replies = 1
    proc = launcher.run("--config", str(job(launcher.folder / "job.yaml"), ), "--yes", "--detach")
    assert proc.returncode == 0, output_of(proc)[-3000:]
    creates = [r for r in vast.requests if r["method"] == "PUT" and r["path"].startswith("/api/v0/asks/")]
    assert len(creates) == 1 and len(vast.instances) == 1  # found by its label, not created again
    (record,) = launcher.records()
    down = launcher.run("down", record.id)
    assert down.returncode == 0, output_of(down)
    assert vast.alive() == []
    fault_table.report("create reply lost (502 after renting)", "vast", recovered=True,
                       end_state="one instance rented, stopped by down",
                       orphans=len(vast.alive()))


def test_a_closed_direct_port_falls_back_to_the_proxy_and_a_price_above_the_quote_warns(launcher: VastLauncher,
                                                                                        vast: FakeVast):
    vast.break_direct = True  # the direct port is reported but closed: only Vast's proxy answers
    vast.price_drift = 0.2  # the instance costs 20 % more than its offer said
    proc = launcher.run("--config", str(job(launcher.folder / "job.yaml")), "--yes", "--on-demand", "--detach")
    out = output_of(proc)
    assert proc.returncode == 0, out[-3000:]
    (record,) = launcher.records()
    instance = vast.instances[int(record.target.split(":")[1])]
    assert f"costs ${instance.dph_total:.3f}/h, above the ${instance.offer.dph_total:.3f}/h quoted" in out
    (machine,) = machines_of(launcher, record.id)
    assert machine["usd_per_hour"] == pytest.approx(instance.dph_total)  # what it really costs is what counts
    status = launcher.run("status", record.id, "--json")
    assert status.returncode == 0, output_of(status)
    shown = json.loads(status.stdout)
    assert shown["live"]["machine_state"] == "running" and shown["machines"][0]["end_reason"] is None
    down = launcher.run("down", record.id)
    assert down.returncode == 0, output_of(down)
    assert launcher.records()[0].status in ("stopped", "done") and instance.destroyed_at is not None
    after = json.loads(launcher.run("status", record.id, "--json").stdout)
    assert after["live"]["machine_state"] == "gone" and after["machines"][0]["end_reason"] == "stopped"


@pytest.mark.parametrize("fault", ["ssh never answers", "image pull stalls"])
def test_an_instance_that_never_comes_up_is_destroyed_and_the_next_offer_tried(launcher: VastLauncher,
                                                                                vast: FakeVast, fault):
    if fault == "ssh never answers":
        vast.break_ssh = True
    else:
        vast.stall_pull = True
    proc = launcher.run("--config", str(job(launcher.folder / "job.yaml", ssh_timeout_s=2, pull_stall_s=1.5)),
                        "--yes", timeout=120)
    out = output_of(proc)
    assert proc.returncode == 8, out[-3000:]
    assert len(vast.instances) == 2, out[-3000:]  # max_offers_tried: 2, each logged with why it failed
    reason = "SSH did not answer" if fault == "ssh never answers" else "made no progress"
    assert out.count(reason) >= 2 and "no offer could be rented" in out
    assert vast.alive() == []
    billed = vast.billed_usd()
    time.sleep(1)
    assert vast.billed_usd() == billed  # nothing billed after
    (record,) = launcher.records()
    assert record.status == "failed"
    fault_table.report(f"provision fails after create ({fault})", "vast", recovered=True, end_state="failed, exit 8",
                       billed_usd=billed, orphans=len(vast.alive()))


def test_down_all_finds_an_orphan_and_a_mangled_list_is_not_nothing(launcher: VastLauncher, vast: FakeVast):
    orphan = vast.handle("PUT", f"/api/v0/asks/{min(vast.offers)}/", {"image": "img", "label": "qlora-launch:lost"},
                         f"Bearer {ACCOUNT_KEY}")["new_contract"]
    vast.mangle_instance_list = True
    mangled = launcher.run("down", "--all")
    assert mangled.returncode == 8 and "nothing was destroyed" in output_of(mangled)
    assert vast.alive() == [orphan]
    vast.mangle_instance_list = False
    proc = launcher.run("down", "--all")
    assert proc.returncode == 0, output_of(proc)
    assert f"vast:{orphan}: destroyed (unknown to the run records)" in proc.stdout
    assert vast.alive() == []


def test_the_watchdog_stops_an_idle_instance_with_the_instance_key(vast: FakeVast):
    from launcher.providers.vast import VastSettings
    from launcher.providers.vast import onstart_command

    body = {"image": "img", "label": "qlora-launch:idle", "env": {"QLORA_VAST_URL": vast.url},
            "onstart": onstart_command(VastSettings(watchdog_idle_minutes=0.05), "~/qlora-launch",
                                       prebuild_venv=False)}
    made = vast.handle("PUT", f"/api/v0/asks/{min(vast.offers)}/", body, f"Bearer {ACCOUNT_KEY}")["new_contract"]
    instance = vast.instances[made]
    deadline = time.monotonic() + 30
    while instance.actual_status != "stopped" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert (instance.actual_status, instance.intended_status) == ("stopped", "stopped")
    (stop,) = [r for r in vast.requests if r["method"] == "PUT" and r["path"] == f"/api/v0/instances/{made}/"]
    assert stop["body"] == {"state": "stopped"} and stop["scope"] == f"instance {made}"  # never the account key
    vast.handle("DELETE", f"/api/v0/instances/{made}/", {}, f"Bearer {ACCOUNT_KEY}")


def test_the_on_start_builds_the_venv_at_boot_for_the_launchers_bootstrap_to_reuse(tmp_path):
    """The on-start as an instance runs it: unpacked, watchdog up, the venv built with the exact
    requirements file the launcher sends later, so its bootstrap finds it ready."""
    from launcher.providers.vast import VastSettings
    from launcher.providers.vast import onstart_command

    requirements = tmp_path / "requirements.txt"
    requirements.write_text("# nothing to install: the test checks where the venv lands, not pip\n")
    command = onstart_command(VastSettings(), "~/qlora-launch", True, requirements)
    home = tmp_path / "home"
    home.mkdir()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home)}
    subprocess.run(["sh", "-c", command], env=env, check=True, timeout=60)
    try:
        deadline = time.monotonic() + 120
        ready = list((home / "qlora-launch" / "venvs").glob("*/.qlora-ready"))
        while not ready and time.monotonic() < deadline:
            time.sleep(0.2)
            ready = list((home / "qlora-launch" / "venvs").glob("*/.qlora-ready"))
        assert ready, (home / ".qlora-launch" / "bootstrap.log").read_text()
        assert "watchdog: stops this instance" in (home / ".qlora-launch" / "watchdog.log").read_text()
        # The launcher's bootstrap later, with the same requirements: the venv is reused.
        later = subprocess.run(["sh", str(ROOT / "cluster_templates" / "bootstrap.sh")], capture_output=True,
                               text=True, timeout=120, env={**env, "QLORA_WORKDIR": str(home / "qlora-launch"),
                                                            "QLORA_REQUIREMENTS": str(requirements),
                                                            "QLORA_VENV_ONLY": "1"})
        assert later.returncode == 0 and "reusing venv" in later.stdout, later.stdout + later.stderr
    finally:
        subprocess.run(["pkill", "-f", str(home / ".qlora-launch" / "idle_watchdog.py")])


def test_the_fake_speaks_the_real_vastai_sdk(vast: FakeVast, tmp_path):
    """The fake is checked against the vastai SDK itself: search, create, show, destroy."""
    script = (
        "import json, sys\n"
        "from vastai import VastAI\n"
        f"v = VastAI(api_key={ACCOUNT_KEY!r}, server_url={vast.url!r})\n"
        "offers = v.search_offers(query='gpu_name=RTX_4090 reliability>0.9 num_gpus=1', order='dph_total')\n"
        "print(json.dumps({'offers': [[o['id'], o['gpu_name'], o['dph_total']] for o in offers]}))\n"
        "made = v.create_instance(id=offers[0]['id'], image='img', disk=20, label='sdk')\n"
        "print(json.dumps({'made': made}))\n"
        "rows = v.show_instances()\n"
        "print(json.dumps({'shown': [[r['id'], r['label'], r['actual_status']] for r in rows]}))\n"
        "print(json.dumps({'destroyed': v.destroy_instance(id=rows[0]['id'])}))\n"
    )
    env = {**os.environ, "VAST_URL": vast.url, "VASTAI_NO_UPDATE_CHECK": "1", "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    offers = next(x["offers"] for x in lines if "offers" in x)
    assert offers and all(name == "RTX 4090" for _, name, _ in offers)
    assert [p for _, _, p in offers] == sorted(p for _, _, p in offers)
    made = next(x["made"] for x in lines if "made" in x)
    shown = next(x["shown"] for x in lines if "shown" in x)
    assert shown == [[made["new_contract"], "sdk", shown[0][2]]]
    assert vast.alive() == []


def preempt_mid_run(launcher: VastLauncher, vast: FakeVast, *args: str, pulled: int,
                    step: int) -> tuple[subprocess.Popen, str, int, float]:
    """Launch, preempt the instance once checkpoint `pulled` is here and the runner is at `step`,
    wait for the launcher to end: (process, its output, the first instance, when it was preempted)."""
    proc = launcher.start("--config", str(job(launcher.folder / "job.yaml")), "--yes", *args)
    try:
        record = launcher.wait_for(lambda r: (r.pulled_step or 0) >= pulled and (r.step or 0) >= step, timeout=240)
        first = int(record.target.split(":")[1])
        preempted_at = time.time()
        vast.preempt(first)
        out, _ = proc.communicate(timeout=400)
    finally:
        proc.kill()
    return proc, out, first, preempted_at


def machines_of(launcher: Launcher, run_id: str) -> list[dict]:
    from launcher.runs import RunStore

    store = RunStore(launcher.home / "runs.sqlite")
    try:
        return [m.__dict__ for m in store.machines(run_id)]
    finally:
        store.close()


def assert_spent_matches(machines: list[dict], vast: FakeVast) -> None:
    """The run's $ (each machine's $/h over the time the launcher saw it running) against what
    the fake billed each instance: within a second's worth, plus, for a preempted machine, the
    time it took the launcher to notice (it counts until it knows, never less than was billed)."""
    for m in machines:
        instance = vast.instances[int(m["target"].split(":")[1])]
        ours = m["usd_per_hour"] * (m["ended_at"] - m["started_at"]) / 3600
        billed = instance.billed_usd()
        second = instance.dph_total / 3600
        if m["end_reason"] == "preempted":
            noticed = m["ended_at"] - instance.stopped_at
            assert billed - second <= ours <= billed + second * (1 + noticed), (ours, billed, noticed)
        else:
            assert ours == pytest.approx(billed, abs=second), (ours, billed)


@pytest.mark.parametrize("stop_with", [signal.SIGINT, signal.SIGTERM])
def test_the_fake_run_by_hand_keeps_its_instances_in_a_temporary_folder_and_removes_it(tmp_path, stop_with):
    """`python -m tests.fakes.vast_api` as the README shows: nothing in the current folder, and
    its instances' folder and processes gone once it is stopped."""
    import urllib.request

    from tests.sshd import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tests.fakes.vast_api", "--port", str(port), "--catalog",
                             str(ROOT / "catalogs" / "v8" / "vast" / "vms.csv")], cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, text=True)
    try:
        folder = Path(proc.stdout.readline().rsplit("instances in ", 1)[1].strip())

        def call(method: str, path: str, body: dict) -> dict:
            request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                             data=json.dumps(body).encode(),
                                             headers={"Authorization": f"Bearer {ACCOUNT_KEY}",
                                                      "Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=30) as reply:
                return json.loads(reply.read())

        offer = call("POST", "/api/v0/bundles/", {"limit": 1})["offers"][0]["id"]
        made = call("PUT", f"/api/v0/asks/{offer}/", {"image": "img", "label": "by-hand"})["new_contract"]
        deadline = time.monotonic() + 30
        while call("GET", f"/api/v0/instances/{made}/", {})["instances"]["actual_status"] != "running":
            assert time.monotonic() < deadline, "the instance never came up"
            time.sleep(0.1)
        assert folder.is_dir() and not folder.is_relative_to(tmp_path) and processes_naming(str(folder))
        proc.send_signal(stop_with)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.wait()
    assert not folder.exists() and not processes_naming(str(folder))
    assert list(tmp_path.iterdir()) == []  # nothing in the folder it was started from
