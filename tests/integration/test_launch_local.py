"""`launch` on the local target: the same lifecycle as over SSH, without SSH; Ctrl-C detaches
and says so; `down` stops the job with a checkpoint; the run commands read the records."""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

from tests.helpers import TINY_MODEL, read_json, tiny_job, train_losses
from tests.integration.conftest import Launcher, output_of, runner_step


def test_launch_runs_the_config_locally(launcher: Launcher):
    config = tiny_job(launcher.folder / "job.yaml", train={"max_steps": 20})
    proc = launcher.run("--config", str(config), "--yes")
    assert proc.returncode == 0, output_of(proc)[-3000:]
    (record,) = launcher.records()
    run_dir = Path(record.run_dir)
    assert run_dir.parent == launcher.runs_dir
    assert read_json(run_dir / "status.json")["phase"] == "done"
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert "fine-tuned" in proc.stdout and "base model" in proc.stdout  # the summary table
    assert (record.status, record.exit_code, record.target, record.provider) == ("done", 0, "local", "local")
    assert (record.step, record.total_steps) == (20, 20) and record.ended_at >= record.created_at
    # What later plans calibrate with: the model, the run's measured throughput and its shape.
    assert record.model == str(TINY_MODEL) and record.tokens_per_s > 0
    assert (record.micro_batch, record.gradient_checkpointing) == (16, False) and record.gradient_checkpointing is False
    assert record.seq_tokens == read_json(run_dir / "status.json")["train_seq_tokens"] > 0
    # The local target keeps its working folder beside the run records (QLORA_LAUNCH_HOME).
    assert Path(record.remote_dir).is_relative_to(launcher.home / "local-target")
    listed = json.loads(launcher.run("runs", "--json").stdout)
    assert [(r["id"], r["status"]) for r in listed] == [(record.id, "done")]
    status = json.loads(launcher.run("status", record.id, "--json").stdout)
    assert status["run"]["step"] == 20 and status["live"] == {}
    logs = launcher.run("logs", record.id)
    assert logs.returncode == 0 and "done" in logs.stdout.splitlines()[-1]


def test_launch_stops_on_a_config_error_before_running(launcher: Launcher):
    config = tiny_job(launcher.folder / "job.yaml", data={"splits": {"train": 0.9, "validation": 0.2, "test": 0.1}})
    proc = launcher.run("--config", str(config), "--yes")
    assert proc.returncode == 3
    assert "data.splits.train: train + validation + test must add up to 1" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not launcher.runs_dir.exists() and launcher.records() == []


def test_flags_override_resources_and_are_validated(launcher: Launcher):
    config = tiny_job(launcher.folder / "job.yaml")
    proc = launcher.run("--config", str(config), "--usd-per-hour", "-1", "--yes")
    assert proc.returncode == 3
    (line,) = proc.stderr.strip().splitlines()
    assert "resources.usd_per_hour (from --usd-per-hour): must be >= 0" in line


def test_preflight_reports_every_data_problem_before_anything_starts(launcher: Launcher):
    data = launcher.folder / "data.jsonl"
    data.write_text('{"instruction": "Say hi", "output": "hi"}\n{"instruction": "Say bye"}\n')
    config = tiny_job(launcher.folder / "job.yaml", data={"path": str(data)}, model={"base": str(launcher.folder)})
    proc = launcher.run("--config", str(config), "--yes")
    assert proc.returncode == 4  # the data error's class wins: it is reported first
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2
    assert "data.path: example 2 has no field 'output'" in lines[0]
    assert f"model.base: {launcher.folder} has no config.json" in lines[1]
    assert launcher.records() == []  # a typo here creates no run record


def test_ctrl_c_detaches_then_down_stops_with_a_checkpoint_then_resume_finishes(launcher: Launcher):
    config = tiny_job(launcher.folder / "job.yaml", train={"max_steps": 150, "save_every": 50})
    proc = launcher.start("--config", str(config), "--yes", "--python", sys.executable)
    record = launcher.wait_for(lambda r: r.status == "running" and runner_step(r.remote_dir) >= 5)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert f"run {record.id} is still running on local; `launch attach {record.id}` follows it, " \
           f"`launch down {record.id}` stops it" in out
    assert launcher.records()[0].status == "running"  # the record says what is still running
    step_then = runner_step(record.remote_dir)
    # And it is: the job did not notice Ctrl-C and takes its next step (~0.1 s each on an idle
    # 2-core machine; up to seconds when other jobs share the cores, hence a deadline, not a sleep).
    deadline = time.monotonic() + 60
    while runner_step(record.remote_dir) <= step_then and time.monotonic() < deadline:
        time.sleep(0.2)
    assert runner_step(record.remote_dir) > step_then

    down = launcher.run("down", record.id)
    assert down.returncode == 0, output_of(down)
    record = launcher.records()[0]
    assert record.status == "stopped" and record.exit_code == 143  # SIGTERM: the runner checkpointed
    stopped_at = read_json(Path(record.remote_dir) / "status.json")["step"]
    assert record.pulled_step == stopped_at and record.step == stopped_at
    assert (Path(record.run_dir) / "checkpoints" / f"checkpoint-{stopped_at}").is_dir()
    assert launcher.run("down", record.id).returncode == 0  # idempotent

    resumed = launcher.run("resume", record.id, timeout=600)
    assert resumed.returncode == 0, output_of(resumed)[-3000:]
    record = launcher.records()[0]
    assert (record.status, record.step) == ("done", 150)
    assert sorted(train_losses(Path(record.run_dir))) == list(range(1, 151))


def test_unknown_run_is_a_usage_error(launcher: Launcher):
    proc = launcher.run("status", "no-such-run")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: no run 'no-such-run' in the run records; `launch runs` lists them"


def test_preflight_stops_on_too_little_disk_and_missing_tools(launcher: Launcher):
    config = tiny_job(launcher.folder / "job.yaml", resources={"disk_gb": 1e9})
    proc = launcher.run("--config", str(config), "--yes")
    assert proc.returncode == 8
    (line,) = proc.stderr.strip().splitlines()
    assert "GB free under" in line and "the job needs about 1000000000.0 GB" in line
    no_tools = launcher.run("--config", str(config), "--yes", PATH=str(launcher.folder / "empty-bin"))
    assert no_tools.returncode == 7
    assert "`rsync` is not installed here; install it" in no_tools.stderr
