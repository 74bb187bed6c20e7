"""cluster_templates/bootstrap.sh as the launcher runs it on a target: a venv keyed by the hash
of the requirements, built once and reused; no GPU -> a clear stop unless the job is CPU-only;
a real 4-bit layer proves the stack before any model is downloaded."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, tiny_job
from tests.integration.conftest import Launcher

BOOTSTRAP = ROOT / "cluster_templates" / "bootstrap.sh"


def bootstrap(workdir: Path, requirements: Path, device: str, python: str = "") -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(workdir), "QLORA_WORKDIR": str(workdir),
           "QLORA_REQUIREMENTS": str(requirements), "QLORA_DEVICE": device}
    if python:
        env["QLORA_PYTHON"] = python
    return subprocess.run(["sh", str(BOOTSTRAP)], capture_output=True, text=True, env=env, timeout=600)


def test_venv_is_built_once_per_requirements_hash_and_reused(tmp_path):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("# nothing to install: the test checks the venv's life cycle, not pip\n")
    first = bootstrap(tmp_path / "work", requirements, "cpu")
    venvs = [p for p in (tmp_path / "work" / "venvs").iterdir() if p.is_dir()]
    assert len(venvs) == 1 and (venvs[0] / ".qlora-ready").is_file()
    assert "building venv" in first.stdout
    ready = (venvs[0] / ".qlora-ready").stat().st_mtime_ns
    second = bootstrap(tmp_path / "work", requirements, "cpu")
    assert "reusing venv" in second.stdout and (venvs[0] / ".qlora-ready").stat().st_mtime_ns == ready
    # Without the runner's packages the stack check stops it, saying what is missing.
    assert second.returncode == 13
    assert "cannot import torch" in second.stderr and "stack check failed" in second.stderr
    requirements.write_text("# changed requirements: a new venv\n")
    bootstrap(tmp_path / "work", requirements, "cpu")
    assert len([p for p in (tmp_path / "work" / "venvs").iterdir() if p.is_dir()]) == 2


def test_a_half_built_venv_is_rebuilt(tmp_path):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("# none\n")
    bootstrap(tmp_path / "work", requirements, "cpu")
    (venv,) = [p for p in (tmp_path / "work" / "venvs").iterdir() if p.is_dir()]
    (venv / ".qlora-ready").unlink()  # as if pip had been killed half way
    again = bootstrap(tmp_path / "work", requirements, "cpu")
    assert "building venv" in again.stdout and (venv / ".qlora-ready").is_file()


def test_stack_check_runs_a_real_4bit_layer_and_reports_versions(tmp_path):
    proc = bootstrap(tmp_path / "work", ROOT / "runner" / "requirements.txt", "cpu", python=sys.executable)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.splitlines()[-1].removeprefix("QLORA_BOOTSTRAP "))
    assert report["device"] == "cpu" and report["python"] == sys.executable
    assert report["matmul_4bit_max_error"] < 0.05
    from importlib.metadata import version

    assert report["versions"]["torch"] == version("torch")
    assert report["versions"]["bitsandbytes"] == version("bitsandbytes")


@pytest.mark.skipif(shutil.which("nvidia-smi", path="/usr/bin:/bin") is not None,
                    reason="this machine has an NVIDIA driver; the test needs one without")
def test_a_gpu_job_on_a_machine_without_a_gpu_stops_in_bootstrap(tmp_path):
    proc = bootstrap(tmp_path / "work", ROOT / "runner" / "requirements.txt", "cuda", python=sys.executable)
    assert proc.returncode == 12
    assert "nvidia-smi not found" in proc.stderr and "set train.device: cpu" in proc.stderr


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has an NVIDIA driver")
def test_launch_reports_the_bootstrap_failure_and_records_it(launcher: Launcher):
    config = tiny_job(launcher.folder / "job.yaml", train={"device": "auto"})
    proc = launcher.run("--config", str(config), "--yes", "--python", sys.executable)
    assert proc.returncode == 7
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert "nvidia-smi not found" in line and "train.device: cpu" in line
    (record,) = launcher.records()
    assert record.status == "failed" and "nvidia-smi" in record.error and record.pid is None
    assert not os.path.exists(Path(record.remote_dir) / "status.json")  # the runner never started
