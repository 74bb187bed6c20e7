"""The launcher end to end over a real sshd on 127.0.0.1, on the tiny config, and the same
flow on the local target: launch -> progress -> checkpoints pulled mid-run -> adapter back ->
record done; a killed launcher re-attaches; a killed runner resumes with the same losses; a
dropped SSH connection does not stop the stream; a bad target fails before anything starts."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Optional

import pytest

from launcher.remote import SSHAddress, SSHMachine, SSHOptions
from tests.helpers import read_json, tiny_job, train_losses
from tests.integration import fault_table
from tests.integration.conftest import STEPS_60, Launcher, output_of, runner_step, ssh_args

STEPS = STEPS_60["max_steps"]  # long enough (several seconds) for the mid-run events the tests provoke


def job(path: Path, remote: Path, train: Optional[dict] = None) -> Path:
    return tiny_job(path, train={**STEPS_60, **(train or {})},
                    resources={"workdir": str(remote)})


@pytest.fixture
def reference_losses(reference_losses_60) -> dict[int, float]:
    return reference_losses_60


def target_args(kind: str, sshd) -> list[str]:
    return ssh_args(sshd) if kind == "ssh" else ["--target", "local", "--python", sys.executable]


def test_full_flow_over_ssh(launcher: Launcher, sshd, reference_losses):
    config = job(launcher.folder / "job.yaml", launcher.folder / "remote")
    proc = launcher.run("--config", str(config), *ssh_args(sshd), "--yes")
    out = output_of(proc)
    assert proc.returncode == 0, out[-4000:]
    (record,) = launcher.records()
    assert (record.status, record.exit_code, record.step, record.total_steps) == ("done", 0, STEPS, STEPS)
    assert record.target == sshd.target and record.provider == "ssh"
    run_dir = Path(record.run_dir)
    # Results came back over SSH: adapter, eval, samples, metrics, log, plot.
    for name in ("adapter/adapter_model.safetensors", "eval.json", "samples.jsonl", "metrics.jsonl", "runner.log",
                 "loss.png"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert train_losses(run_dir) == pytest.approx(reference_losses, abs=1e-5)
    # Checkpoints were pulled while training went on: the first one landed here before the
    # runner's last status write, and the newest three (storage.keep_checkpoints) are kept.
    pulled = sorted(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("checkpoint-*"))
    assert pulled[-1] == STEPS and len(pulled) <= 3
    first_pull = out.index("pulled checkpoint-")
    assert first_pull < out.index(f"step {STEPS}/{STEPS}"), out
    # The progress lines carry the figures the user watches.
    assert f"step {STEPS}/{STEPS}  loss" in out and "tok/s  ETA" in out and "$0.00" in out
    assert "fine-tuned" in out and "base model" in out  # the summary table
    # The data went to the content-addressed store on the target, the run folder holds the rest.
    remote_run = Path(record.remote_dir)
    assert remote_run.parent.parent == (launcher.folder / "remote").resolve()
    assert len(list((launcher.folder / "remote" / "assets").iterdir())) == 2  # the model and the data


def test_second_launch_sends_no_data_again(launcher: Launcher, sshd):
    config = job(launcher.folder / "job.yaml", launcher.folder / "remote", train={"max_steps": 2})
    first = launcher.run("--config", str(config), *ssh_args(sshd), "--yes", "--detach")
    assert first.returncode == 0, output_of(first)
    stamps = {p: p.stat().st_mtime_ns for p in (launcher.folder / "remote" / "assets").rglob("*")}
    second = launcher.run("--config", str(config), *ssh_args(sshd), "--yes", "--detach")
    assert second.returncode == 0, output_of(second)
    assert {p: p.stat().st_mtime_ns for p in (launcher.folder / "remote" / "assets").rglob("*")} == stamps
    for record in launcher.records():  # let both finish
        assert launcher.run("attach", record.id).returncode == 0


def kill_runner_mid_run(launcher: Launcher, args: list[str], when) -> tuple:
    """Launch, wait until `when(record)` holds while running, kill -9 the runner (not the
    launcher), and let the launcher see it: (record, launcher process, its output)."""
    proc = launcher.start(*args, "--yes")
    record = launcher.wait_for(lambda r: r.status == "running" and when(r))
    os.kill(read_json(Path(record.remote_dir) / "status.json")["pid"], signal.SIGKILL)
    out, _ = proc.communicate(timeout=120)
    return record, proc, out


@pytest.mark.parametrize("kind", ["ssh", "local"])
def test_killed_launcher_then_attach_finishes_the_job(launcher: Launcher, sshd, reference_losses, kind):
    config = job(launcher.folder / "job.yaml", launcher.folder / "remote")
    proc = launcher.start("--config", str(config), *target_args(kind, sshd), "--yes")
    record = launcher.wait_for(lambda r: r.status == "running" and runner_step(r.remote_dir) >= 15)
    proc.kill()  # kill -9: no chance to tidy up
    proc.wait()
    # The record still says running: the runner is detached and goes on without the launcher.
    assert launcher.records()[0].status == "running"
    attached = launcher.run("attach", record.id)
    assert attached.returncode == 0, output_of(attached)
    record = launcher.records()[0]
    assert (record.status, record.step) == ("done", STEPS)
    assert (Path(record.run_dir) / "adapter" / "adapter_model.safetensors").is_file()
    assert train_losses(Path(record.run_dir)) == pytest.approx(reference_losses, abs=1e-5)
    fault_table.report("launcher SIGKILL, then attach", kind, recovered=True, end_state=record.status,
                       steps_redone=0)


@pytest.mark.parametrize("kind, command", [("ssh", "resume"), ("local", "attach")])
def test_killed_runner_then_resume_gives_the_same_losses(launcher: Launcher, sshd, reference_losses, kind, command):
    """`resume`, and `attach`, which resumes a runner it finds dead."""
    config = job(launcher.folder / "job.yaml", launcher.folder / "remote")
    record, proc, out = kill_runner_mid_run(launcher, ["--config", str(config), *target_args(kind, sshd)],
                                            lambda r: runner_step(r.remote_dir) >= 25)
    assert proc.returncode == 137, out[-3000:]
    reached = fault_table.status_step(Path(record.remote_dir) / "status.json")
    record = launcher.records()[0]
    assert record.status == "interrupted" and "launch resume" in record.error
    assert f"launch resume {record.id}" in out
    resumed = launcher.run(command, record.id)
    assert resumed.returncode == 0, output_of(resumed)
    record = launcher.records()[0]
    assert (record.status, record.step) == ("done", STEPS)
    assert train_losses(Path(record.run_dir)) == pytest.approx(reference_losses, abs=1e-5)
    fault_table.report(f"runner SIGKILL mid-run, then {command}", kind, recovered=True, end_state=record.status,
                       steps_redone=fault_table.steps_redone(reached, Path(record.run_dir)))


def test_resume_puts_back_the_checkpoint_a_wiped_target_lost(launcher: Launcher, sshd, reference_losses):
    config = job(launcher.folder / "job.yaml", launcher.folder / "remote")
    record, _, _ = kill_runner_mid_run(launcher, ["--config", str(config), *ssh_args(sshd)],
                                       lambda r: (r.pulled_step or 0) >= 20)
    pulled = launcher.records()[0].pulled_step
    # The target loses the whole run folder (a new disk, a wiped box): only our copy is left.
    import shutil

    shutil.rmtree(record.remote_dir)
    resumed = launcher.run("resume", record.id)
    assert resumed.returncode == 0, output_of(resumed)
    assert f"pushing checkpoint-{pulled} back" in resumed.stdout
    events = [json.loads(line) for line in (Path(record.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "resume"] == [pulled]
    record = launcher.records()[0]
    assert (record.status, record.step) == ("done", STEPS)
    # Nothing was lost: the history before the checkpoint travelled back with it.
    assert train_losses(Path(record.run_dir)) == pytest.approx(reference_losses, abs=1e-5)


def test_streaming_survives_a_dropped_connection(launcher: Launcher, sshd, reference_losses):
    config = job(launcher.folder / "job.yaml", launcher.folder / "remote")
    proc = launcher.start("--config", str(config), *ssh_args(sshd), "--yes")
    record = launcher.wait_for(lambda r: r.status == "running" and runner_step(r.remote_dir) >= 5)
    machine = SSHMachine(SSHAddress.parse(sshd.target), SSHOptions(
        known_hosts=launcher.home / "known_hosts" / record.id, control_dir=launcher.home / "ssh",
        identity=sshd.client_key))
    master = machine.master_pid()
    assert master is not None
    os.kill(master, signal.SIGKILL)  # every multiplexed session, the log stream included, drops
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out[-3000:]
    assert f"step {STEPS}/{STEPS}" in out  # the stream went on after the drop
    assert machine.master_pid() not in (None, master)  # through a new shared connection
    machine.close()
    record = launcher.records()[0]
    assert record.status == "done"
    assert train_losses(Path(record.run_dir)) == pytest.approx(reference_losses, abs=1e-5)
    fault_table.report("SSH connection dropped mid-stream", "ssh", recovered=True, end_state=record.status,
                       steps_redone=0)


def test_unreachable_host_fails_in_preflight(launcher: Launcher, sshd):
    from tests.sshd import free_port

    config = job(launcher.folder / "job.yaml", launcher.folder / "remote")
    target = f"ssh://{sshd.user}@127.0.0.1:{free_port()}"
    proc = launcher.run("--config", str(config), "--target", target, "--identity", str(sshd.client_key), "--yes")
    assert proc.returncode == 8
    (line,) = proc.stderr.strip().splitlines()
    assert "cannot connect" in line and "Connection refused" in line and "check the host and port" in line
    assert not (launcher.folder / "remote").exists()  # nothing was started anywhere
    assert launcher.records()[0].status == "failed"


def test_a_key_the_target_refuses_fails_in_preflight(launcher: Launcher, sshd):
    from tests.sshd import keygen

    config = job(launcher.folder / "job.yaml", launcher.folder / "remote")
    stranger = keygen(launcher.folder / "stranger")
    proc = launcher.run("--config", str(config), "--target", sshd.target, "--identity", str(stranger), "--yes")
    assert proc.returncode == 8
    (line,) = proc.stderr.strip().splitlines()
    assert "Permission denied" in line and "authorized_keys" in line
    assert not (launcher.folder / "remote").exists()


def test_an_ssh_config_alias_is_a_target(launcher: Launcher, sshd):
    ssh_config = launcher.folder / "ssh_config"
    ssh_config.write_text(f"Host tiny-gpu-box\n  HostName 127.0.0.1\n  Port {sshd.port}\n  User {sshd.user}\n"
                          f"  IdentityFile {sshd.client_key}\n")
    config = job(launcher.folder / "job.yaml", launcher.folder / "remote", train={"max_steps": 4})
    proc = launcher.run("--config", str(config), "--target", "tiny-gpu-box", "--python", sys.executable, "--yes",
                        "--detach", QLORA_LAUNCH_SSH_CONFIG=str(ssh_config))
    assert proc.returncode == 0, output_of(proc)
    (record,) = launcher.records()
    assert record.target == "tiny-gpu-box" and record.status == "running"
    logs = launcher.run("logs", record.id, "-f", QLORA_LAUNCH_SSH_CONFIG=str(ssh_config))
    assert logs.returncode == 0 and logs.stdout.splitlines()[-1].endswith("done"), output_of(logs)
    assert "step 4/4" in logs.stdout
    attached = launcher.run("attach", record.id, QLORA_LAUNCH_SSH_CONFIG=str(ssh_config))
    assert attached.returncode == 0, output_of(attached)
    assert launcher.records()[0].status == "done"
    pulled = json.loads(launcher.run("pull", record.id, "--json", QLORA_LAUNCH_SSH_CONFIG=str(ssh_config)).stdout)
    assert pulled["checkpoints"] == [4]


def test_preflight_warns_about_examples_longer_than_max_length(launcher: Launcher, sshd):
    data = launcher.folder / "data.jsonl"
    long_answer = " ".join(["A cat says meow."] * 40)
    data.write_text(json.dumps({"instruction": "Describe a cat.", "output": long_answer}) + "\n"
                    + "".join(json.dumps({"instruction": f"Say {i}.", "output": f"{i}"}) + "\n" for i in range(20)))
    config = tiny_job(launcher.folder / "job.yaml", data={"path": str(data)}, train={"max_steps": 1},
                      resources={"workdir": str(launcher.folder / "remote")})
    proc = launcher.run("--config", str(config), *ssh_args(sshd), "--yes", "--detach")
    assert proc.returncode == 0, output_of(proc)
    (warning,) = [line for line in proc.stderr.splitlines() if "longer than" in line]
    assert "1 of 21 examples are longer than data.max_length=64 tokens" in warning
    assert "21 examples" in proc.stdout  # the plan shows the count
    assert launcher.run("attach", launcher.records()[0].id).returncode == 0


def test_plan_includes_the_ssh_target_with_what_it_has(launcher: Launcher, sshd):
    config = tiny_job(launcher.folder / "job.yaml", resources={"providers": None})
    proc = launcher.run("plan", "--config", str(config), "--target", sshd.target, "--identity",
                        str(sshd.client_key), "--json")
    plan = json.loads(proc.stdout)
    (box,) = [o for o in plan["offers"] if o["provider"] == "ssh"]
    assert box["gpu"] is None and not box["fits"] and box["why_not"] == "no NVIDIA GPU"  # this sshd's machine
    assert plan["choice"] is not None and plan["offers"][plan["choice"]]["provider"] in ("vast", "aws", "lambda")
    refused = launcher.run("plan", "--config", str(config), "--target", f"ssh://{sshd.user}@127.0.0.1:1", "--json")
    assert refused.returncode == 0 and "left out of the plan" in refused.stderr
