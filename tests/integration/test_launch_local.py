"""`launch --config` runs the job on the local target and reports what it produced."""

from __future__ import annotations

import subprocess
import sys

from launcher.runs import RunStore
from tests.helpers import ROOT, read_json, tiny_job


def launch(*args: str, cwd) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "COLUMNS": "120", "QLORA_LAUNCH_HOME": str(cwd / "home")}
    return subprocess.run([sys.executable, "-m", "launcher", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env)


def test_launch_runs_the_config_locally(tmp_path):
    config = tiny_job(tmp_path / "job.yaml", train={"max_steps": 20})
    proc = launch("--config", str(config), "--runs-dir", str(tmp_path / "runs"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert read_json(run_dir / "status.json")["phase"] == "done"
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert "fine-tuned" in proc.stdout and "base model" in proc.stdout  # the summary table
    (record,) = RunStore(tmp_path / "home" / "runs.sqlite").list()
    assert (record.id, record.status, record.exit_code, record.target) == (run_dir.name, "done", 0, "local")
    assert (record.step, record.total_steps) == (20, 20) and record.ended_at >= record.created_at


def test_launch_stops_on_a_config_error_before_running(tmp_path):
    config = tiny_job(tmp_path / "job.yaml", data={"splits": {"train": 0.9, "validation": 0.2, "test": 0.1}})
    proc = launch("--config", str(config), "--runs-dir", str(tmp_path / "runs"), cwd=tmp_path)
    assert proc.returncode == 3
    assert "data.splits.train: train + validation + test must add up to 1" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()
