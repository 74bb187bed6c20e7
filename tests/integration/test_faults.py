"""The fault matrix (issue 15), each fault injected for real on the fake Vast.ai (real sshd, real
rsync, the tiny job trained for real): what a fault must never do is lose a complete checkpoint,
use a partial one, leave an instance billing or a record that disagrees with the bill. Each test
reports its row to tests/integration/fault_table.py (benchmarks/faults.py prints the table).

Faults tested elsewhere, and reported from there: preemption, API 429s, an instance that never
comes up and a lost create reply (test_vast.py), the budget (test_budget.py), a dropped SSH
connection, a killed runner and a killed launcher (test_launch_ssh.py), SIGKILL while writing a
checkpoint (test_runner_training.py)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable

import pytest

from tests.fakes.vast_api import FakeVast
from tests.integration import fault_table
from tests.integration.conftest import STEPS_60, VastLauncher, output_of
from tests.integration.test_vast import assert_spent_matches, job, machines_of
from tests.helpers import ROOT, processes_naming, tiny_job, train_losses


@pytest.fixture
def reference_losses(reference_losses_60) -> dict[int, float]:
    return reference_losses_60


def status_file(vast: FakeVast, instance_id: int, record) -> Path:
    """The runner's status.json on that instance (run folders are laid out alike on every instance)."""
    return vast.instances[instance_id].home / Path(record.remote_dir).relative_to(
        vast.instances[int(record.target.split(":")[1])].home) / "status.json"


def changes(vast: FakeVast) -> list[dict]:
    """The calls that rent, change or destroy an instance (everything but looks)."""
    return [r for r in vast.requests if r["method"] in ("PUT", "POST", "DELETE") and "/bundles" not in r["path"]]


def test_a_host_cut_off_while_the_api_says_running_is_released_and_the_run_recovers(
        vast_launcher: VastLauncher, vast: FakeVast, reference_losses):
    """sshd dies on the instance; the API goes on saying running (and billing). After
    QLORA_LAUNCH_UNREACHABLE_S of silence the launcher destroys it and resumes on the next offer."""
    launcher = vast_launcher
    proc = launcher.start("--config", str(job(launcher.folder / "job.yaml")), "--yes", QLORA_LAUNCH_UNREACHABLE_S="6")
    try:
        record = launcher.wait_for(lambda r: (r.pulled_step or 0) >= 20 and (r.step or 0) >= 25, timeout=240)
        first = int(record.target.split(":")[1])
        cut_at = time.time()
        vast.stop_sshd(first)
        assert vast.instances[first].actual_status == "running"
        out, _ = proc.communicate(timeout=400)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-4000:]
    (record,) = launcher.records()
    assert record.status == "done" and record.target != f"vast:{first}"
    assert f"vast:{first} was unreachable" in out
    assert train_losses(Path(record.run_dir)) == pytest.approx(reference_losses, abs=1e-5)
    machines = machines_of(launcher, record.id)
    assert [m["end_reason"] for m in machines] == ["unreachable", "done"]
    assert vast.instances[first].destroyed_at - cut_at < 60
    assert_spent_matches(machines, vast)
    fault_table.report("host cut off (sshd dead, API says running)", "vast", recovered=True, end_state=record.status,
                       steps_redone=fault_table.steps_redone(fault_table.status_step(status_file(vast, first, record)),
                                                          Path(record.run_dir)),
                       billed_usd=vast.billed_usd(), orphans=len(vast.alive()),
                       recover_s=fault_table.recover_s(Path(record.run_dir), cut_at))


def test_a_second_launcher_on_a_followed_run_is_told_and_touches_nothing(vast_launcher: VastLauncher,
                                                                         vast: FakeVast, reference_losses):
    launcher = vast_launcher
    proc = launcher.start("--config", str(job(launcher.folder / "job.yaml")), "--yes")
    try:
        record = launcher.wait_for(lambda r: (r.step or 0) >= 5, timeout=240)
        changes_before = changes(vast)
        for command in ("attach", "resume"):
            second = launcher.run(command, record.id, timeout=60)
            assert second.returncode == 2, output_of(second)
            assert f"run {record.id} is already followed by another launcher (pid {proc.pid}" in second.stderr
            assert f"launch logs -f {record.id}" in second.stderr and "Traceback" not in output_of(second)
        assert changes(vast) == changes_before  # nothing rented, stopped or destroyed
        out, _ = proc.communicate(timeout=400)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-4000:]
    (record,) = launcher.records()
    assert record.status == "done" and len(vast.instances) == 1
    assert train_losses(Path(record.run_dir)) == pytest.approx(reference_losses, abs=1e-5)
    assert_spent_matches(machines_of(launcher, record.id), vast)
    fault_table.report("two launchers attached at once", "vast", recovered=True, end_state=record.status,
                       steps_redone=0, billed_usd=vast.billed_usd(), orphans=len(vast.alive()))


def test_the_laptops_clock_jumping_moves_no_dollar(vast_launcher: VastLauncher, vast: FakeVast, reference_losses):
    """Two hours forward mid-run, then three back: under a cap that two hours of this machine
    would blow, the run ends done, its record matching what the fake billed."""
    launcher = vast_launcher
    offset = launcher.folder / "clock-offset"
    offset.write_text("0")
    config = job(launcher.folder / "job.yaml")
    proc = launcher.start("--config", str(config), "--yes", "--max-total", "0.05",
                          PYTHONPATH=f"{ROOT / 'tests' / 'clock_jump'}:{ROOT}",
                          QLORA_TEST_CLOCK_OFFSET_FILE=str(offset))
    try:
        launcher.wait_for(lambda r: (r.step or 0) >= 10, timeout=240)
        offset.write_text(str(2 * 3600))
        launcher.wait_for(lambda r: (r.step or 0) >= 35, timeout=240)
        offset.write_text(str(-3600))
        out, _ = proc.communicate(timeout=400)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-4000:]
    (record,) = launcher.records()
    assert record.status == "done" and "budget" not in out
    assert train_losses(Path(record.run_dir)) == pytest.approx(reference_losses, abs=1e-5)
    machines = machines_of(launcher, record.id)
    assert [m["end_reason"] for m in machines] == ["done"]
    assert_spent_matches(machines, vast)
    fault_table.report("the laptop's clock jumping (+2 h, then -3 h)", "vast", recovered=True, end_state=record.status,
                       steps_redone=0, billed_usd=vast.billed_usd(), orphans=len(vast.alive()))


class Output:
    """The launcher's output, read as it comes (a thread), so a test can act on a phase line."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.text = ""
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            self.text += line

    def rest(self, proc: subprocess.Popen, timeout: float) -> str:
        proc.wait(timeout=timeout)
        self._thread.join(timeout=10)
        return self.text


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def slow_link(folder: Path, kb_per_s: int = 100) -> str:
    """A PATH for the launcher on which rsync is the real rsync, copying checkpoints at
    `kb_per_s` (a checkpoint of the tiny job is about 2 MB: a pull then takes seconds)."""
    shim = folder / "slow-link"
    shim.mkdir()
    rsync = shutil.which("rsync")
    (shim / "rsync").write_text(f'#!/bin/sh\ncase "$*" in *"/checkpoints/checkpoint-"*) '
                                f'exec {rsync} --bwlimit={kb_per_s} "$@";; esac\nexec {rsync} "$@"\n')
    (shim / "rsync").chmod(0o755)
    return f"{shim}:{os.environ.get('PATH', '/usr/bin:/bin')}"


def complete_local_checkpoints(record) -> list[int]:
    from launcher.checkpoints import LocalCheckpoints

    return LocalCheckpoints(Path(record.run_dir)).steps()


def local_checkpoint_folders(record) -> list[str]:
    folder = Path(record.run_dir) / "checkpoints"
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("checkpoint-")) if folder.is_dir() else []


BEFORE_THE_RUNNER = ["the create call", "the image pull", "bootstrap"]


@pytest.mark.parametrize("waiting_on", BEFORE_THE_RUNNER)
def test_ctrl_c_before_the_runner_starts_releases_the_machine_and_says_so(vast_launcher: VastLauncher,
                                                                           vast: FakeVast, waiting_on):
    """Nothing of the job is on the machine yet: Ctrl-C destroys it (a create whose reply had not
    come is found by its label), the run is recorded interrupted, nothing is left billing."""
    launcher = vast_launcher
    if waiting_on == "the create call":
        vast.create_reply_delay_s = 30
    elif waiting_on == "the image pull":
        vast.loading_s = 60
    proc = launcher.start("--config", str(job(launcher.folder / "job.yaml")), "--yes")
    output = Output(proc)
    try:
        if waiting_on == "bootstrap":
            wait_until(lambda: "bootstrapping the target" in output.text, 240, "the bootstrap phase")
        else:
            wait_until(lambda: bool(vast.instances) and vast.instances[min(vast.instances)].actual_status != "running",
                       60, "an instance being created")
            time.sleep(0.5)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out = output.rest(proc, timeout=60)
        took = time.monotonic() - sent
    finally:
        proc.kill()
    assert proc.returncode == 130, out[-3000:]
    assert took < 15, f"{took:.1f} s from Ctrl-C to the exit"
    (record,) = launcher.records()
    assert record.status == "interrupted" and f"interrupted: run {record.id} is interrupted; nothing is running" in out
    assert len(vast.instances) == 1 and vast.alive() == []
    machines = machines_of(launcher, record.id)
    if machines:
        assert [m["end_reason"] for m in machines] == ["interrupted"]
        assert_spent_matches(machines, vast)
    else:  # never came up: the fake billed its disk for seconds only
        instance = vast.instances[min(vast.instances)]
        assert vast.billed_usd() < instance.dph_total / 3600
    fault_table.report(f"Ctrl-C while waiting on {waiting_on}", "vast", recovered=True, end_state=record.status,
                       steps_redone=0, billed_usd=vast.billed_usd(), orphans=len(vast.alive()))


def test_ctrl_c_during_a_pull_detaches_and_attach_finishes_without_the_half_copy(vast_launcher: VastLauncher,
                                                                                 vast: FakeVast, reference_losses):
    launcher = vast_launcher
    path = slow_link(launcher.folder)
    proc = launcher.start("--config", str(job(launcher.folder / "job.yaml")), "--yes", PATH=path)
    output = Output(proc)
    try:
        record = launcher.wait_for(lambda r: r.status == "running", timeout=240)
        wait_until(lambda: bool(processes_naming("--bwlimit", str(launcher.runs_dir))), 240, "a checkpoint pull")
        time.sleep(1.0)  # a part of the checkpoint is here
        proc.send_signal(signal.SIGINT)
        out = output.rest(proc, timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, out[-3000:]
    assert f"detached: run {record.id} is still running on {record.target}" in out
    wait_until(lambda: not processes_naming("--bwlimit", str(launcher.runs_dir)), 10, "the rsync to end")
    (record,) = launcher.records()
    assert record.status == "running" and vast.alive() == [int(record.target.split(":")[1])]
    assert local_checkpoint_folders(record) == [f"checkpoint-{s}" for s in complete_local_checkpoints(record)]
    attached = launcher.run("attach", record.id, timeout=400)
    assert attached.returncode == 0, output_of(attached)[-3000:]
    (record,) = launcher.records()
    assert record.status == "done" and vast.alive() == []
    assert train_losses(Path(record.run_dir)) == pytest.approx(reference_losses, abs=1e-5)
    assert_spent_matches(machines_of(launcher, record.id), vast)
    fault_table.report("Ctrl-C during a checkpoint pull, then attach", "vast", recovered=True,
                       end_state=record.status, steps_redone=0, billed_usd=vast.billed_usd(),
                       orphans=len(vast.alive()))


def test_rsync_killed_mid_pull_takes_no_half_checkpoint_and_the_run_goes_on(vast_launcher: VastLauncher,
                                                                            vast: FakeVast, reference_losses):
    launcher = vast_launcher
    proc = launcher.start("--config", str(job(launcher.folder / "job.yaml")), "--yes", PATH=slow_link(launcher.folder))
    try:
        wait_until(lambda: bool(processes_naming("--bwlimit", str(launcher.runs_dir))), 240, "a checkpoint pull")
        time.sleep(1.0)
        killed = processes_naming("--bwlimit", str(launcher.runs_dir))
        for pid in killed:
            os.kill(pid, signal.SIGKILL)
        (record,) = launcher.records()
        half = Path(record.run_dir) / "checkpoints"
        out, _ = proc.communicate(timeout=400)
    finally:
        proc.kill()
    assert killed and proc.returncode == 0, out[-4000:]
    assert "not pulled this time" in out
    (record,) = launcher.records()
    assert record.status == "done" and vast.alive() == []
    assert local_checkpoint_folders(record) == [f"checkpoint-{s}" for s in complete_local_checkpoints(record)]
    assert complete_local_checkpoints(record)[-1] == 60 and half.is_dir()
    assert train_losses(Path(record.run_dir)) == pytest.approx(reference_losses, abs=1e-5)
    assert_spent_matches(machines_of(launcher, record.id), vast)
    fault_table.report("rsync killed mid-pull", "vast", recovered=True, end_state=record.status, steps_redone=0,
                       billed_usd=vast.billed_usd(), orphans=len(vast.alive()))


@pytest.fixture
def small_disk(tmp_path) -> Path:
    """A 64 MB tmpfs the test can fill (the target's disk, for the disk-full fault)."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.strip()}): the disk-full fault needs root with "
                    "CAP_SYS_ADMIN, which this machine does not give")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(disk: Path, leave_bytes: int) -> Path:
    """Take all but `leave_bytes` of `disk` (as another process's files would)."""
    filler = disk / "filler"
    free = shutil.disk_usage(disk).free
    with filler.open("wb") as f:
        os.posix_fallocate(f.fileno(), 0, max(0, free - leave_bytes))
    return filler


def test_disk_full_on_the_target_while_saving_fails_clearly_keeps_the_checkpoints_and_resumes(
        launcher, sshd, small_disk: Path, reference_losses):
    from tests.integration.conftest import ssh_args

    config = tiny_job(launcher.folder / "job.yaml", train=STEPS_60,
                      resources={"workdir": str(small_disk / "remote"), "disk_gb": 0.02})  # the job needs ~15 MB
    proc = launcher.start("--config", str(config), *ssh_args(sshd), "--yes")
    try:
        record = launcher.wait_for(lambda r: (r.pulled_step or 0) >= 10, timeout=240)
        filler = fill(small_disk, leave_bytes=400 * 1024)  # a checkpoint is about 2 MB
        out, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 7, out[-3000:]
    (record,) = launcher.records()
    reached = fault_table.status_step(Path(record.remote_dir) / "status.json")
    assert record.status == "failed" and "disk full at step" in out and "then `launch resume`" in out
    assert "internal error" not in out and not (Path(record.remote_dir) / "checkpoints" / ".incoming").exists()
    here = complete_local_checkpoints(record)
    assert here and local_checkpoint_folders(record) == [f"checkpoint-{s}" for s in here]
    filler.unlink()  # the user frees space
    resumed = launcher.run("resume", record.id, timeout=300)
    assert resumed.returncode == 0, output_of(resumed)[-3000:]
    (record,) = launcher.records()
    assert record.status == "done"
    assert train_losses(Path(record.run_dir)) == pytest.approx(reference_losses, abs=1e-5)
    fault_table.report("disk full on the target while saving, then resume", "ssh", recovered=True,
                       end_state="failed (exit 7), resumed: done",
                       steps_redone=fault_table.steps_redone(reached, Path(record.run_dir)))


def test_api_500s_when_the_machine_is_released_are_retried_until_it_is_destroyed(vast_launcher: VastLauncher,
                                                                                 vast: FakeVast, reference_losses):
    """The provider's API fails (HTTP 500) for the first calls after the run's last steps: the
    release that comes then is retried until the destroy goes through, and the record ends when
    the billing did."""
    launcher = vast_launcher
    proc = launcher.start("--config", str(job(launcher.folder / "job.yaml")), "--yes")
    try:
        launcher.wait_for(lambda r: (r.step or 0) >= 50, timeout=240)
        vast.fail_next(7, 500)  # more than one call's retries: a whole destroy attempt fails too
        out, _ = proc.communicate(timeout=400)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-4000:]
    (record,) = launcher.records()
    assert record.status == "done" and vast.alive() == [] and not vast.failures
    assert train_losses(Path(record.run_dir)) == pytest.approx(reference_losses, abs=1e-5)
    deletes = [r for r in vast.requests if r["method"] == "DELETE"]
    assert len(deletes) > 5, f"the outage did not reach the destroy: {len(deletes)} DELETE calls"  # failed, retried
    machines = machines_of(launcher, record.id)
    assert [m["end_reason"] for m in machines] == ["done"]
    assert_spent_matches(machines, vast)
    fault_table.report("provider API 500s at release", "vast", recovered=True, end_state=record.status,
                       steps_redone=0, billed_usd=vast.billed_usd(), orphans=len(vast.alive()))
