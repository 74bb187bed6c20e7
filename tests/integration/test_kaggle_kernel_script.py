"""The Kaggle kernel's script (cluster_templates/kaggle_kernel.py, as kernel_script() fills it in)
executed for real on the CPU, in a temp folder laid out as a Kaggle session (QLORA_KAGGLE_ROOT:
kaggle/input/datasets/<owner>/<slug>/ read by glob, kaggle/working/ written), with the tiny job,
pip skipped (QLORA_KAGGLE_SKIP_PIP) and the session's GPUs simulated (QLORA_KAGGLE_FAKE_GPUS).
Kaggle's own image, GPUs and pip cannot be reached from here."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher.paths import RUNNER_FILE, RUNNER_REQUIREMENTS
from launcher.providers.kaggle import KaggleSettings, kernel_plan, kernel_script, marker_name
from tests.helpers import read_json, tiny_job, train_losses, uninterrupted_losses

RUN_ID = "r-kernel"
T4X2 = "Tesla T4,Tesla T4"


def session(tmp_path: Path, config: Path, layout: str = "datasets/tester/qlora-launch-r-kernel", **plan) -> Path:
    """A Kaggle-like root: the run's dataset mounted under kaggle/input/<layout>/, the script beside."""
    root = tmp_path / "session"
    folder = root / "kaggle" / "input" / layout
    folder.mkdir(parents=True)
    shutil.copy2(RUNNER_FILE, folder / "qlora_runner.py")
    shutil.copy2(RUNNER_REQUIREMENTS, folder / "requirements.txt")
    shutil.copy2(config, folder / "job.yaml")
    (folder / marker_name(RUN_ID)).write_text(json.dumps({**kernel_plan(RUN_ID, KaggleSettings()), **plan}))
    (root / "kaggle" / "working").mkdir(parents=True, exist_ok=True)
    (root / "script.py").write_text(kernel_script(RUN_ID))
    return root


def run_kernel(root: Path, gpus: str = T4X2, timeout: float = 300, **env) -> subprocess.CompletedProcess:
    environment = {**os.environ, "QLORA_KAGGLE_ROOT": str(root), "QLORA_KAGGLE_SKIP_PIP": "1",
                   "QLORA_KAGGLE_FAKE_GPUS": gpus, **env}
    return subprocess.run([sys.executable, str(root / "script.py")], cwd=root / "kaggle" / "working", env=environment,
                          capture_output=True, text=True, timeout=timeout)


def status(root: Path) -> dict:
    return read_json(root / "kaggle" / "working" / "kernel_status.json")


@pytest.fixture
def job(tmp_path) -> Path:
    return tiny_job(tmp_path / "job.yaml", train={"max_steps": 8, "save_every": 2, "eval_every": 8})


def test_the_script_finds_its_files_by_glob_and_trains_to_the_end(tmp_path, job):
    root = session(tmp_path, job, layout="qlora-launch-r-kernel")  # the older mount layout
    done = run_kernel(root)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    out = root / "kaggle" / "working" / "out"
    assert (out / "adapter").is_dir() and read_json(out / "status.json")["phase"] == "done"
    assert status(root)["phase"] == "done" and status(root)["exit_code"] == 0
    assert "qlora-launch: GPUs: Tesla T4, Tesla T4" in done.stdout
    echoed = [json.loads(line.removeprefix("QLORA_METRIC ")) for line in done.stdout.splitlines()
              if line.startswith("QLORA_METRIC ")]
    assert {e["step"]: e["loss"] for e in echoed if e.get("event") == "train"} == train_losses(out)
    assert train_losses(out) == uninterrupted_losses(job, tmp_path / "alone")


@pytest.mark.parametrize("gpus, says", [("", "this session has no GPU"),
                                        ("Tesla P100-PCIE-16GB", "has 1x Tesla P100-PCIE-16GB"),
                                        ("Tesla T4", "has 1x Tesla T4")])
def test_the_wrong_gpus_stop_the_kernel_at_once(tmp_path, job, gpus, says):
    root = session(tmp_path, job)
    started = time.monotonic()
    done = run_kernel(root, gpus=gpus)
    assert time.monotonic() - started < 10
    assert done.returncode == 7
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("qlora-launch: error:"))
    assert says in line and "planned for 2x T4" in line
    assert status(root)["phase"] == "failed" and not (root / "kaggle" / "working" / "out").exists()


def test_missing_files_say_what_the_input_holds(tmp_path, job):
    root = session(tmp_path, job)
    (root / "script.py").write_text(kernel_script("another-run"))
    done = run_kernel(root)
    assert done.returncode == 2 and "qlora-launch-another-run.json) are not under" in done.stdout
    assert "datasets" in done.stdout


def test_the_session_limit_stops_the_runner_with_a_checkpoint_and_the_next_version_resumes(tmp_path):
    """SIGTERM before the limit: a checkpoint, exit 0, `stopped: session_limit`; the next kernel
    version (the same working folder here: the previous output) continues to the same losses."""
    job = tiny_job(tmp_path / "job.yaml", train={"max_steps": 40, "save_every": 2, "eval_every": 40})
    alone_started = time.monotonic()
    expected = uninterrupted_losses(job, tmp_path / "alone")
    alone_s = time.monotonic() - alone_started
    root = session(tmp_path, job, session_limit_s=round(alone_s * 0.5 + 40, 1), stop_before_s=40)
    first = run_kernel(root)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert status(root)["stopped"] == "session_limit" and status(root)["runner_exit_code"] == 143
    assert "SIGTERM to the runner" in first.stdout
    out = root / "kaggle" / "working" / "out"
    stopped_at = max(train_losses(out), default=0)
    assert 0 < stopped_at < 40 and list((out / "checkpoints").glob("checkpoint-*")), first.stdout[-2000:]

    (root / "kaggle" / "input" / "datasets" / "tester" / "qlora-launch-r-kernel" / marker_name(RUN_ID)).write_text(
        json.dumps(kernel_plan(RUN_ID, KaggleSettings())))  # the next version: a full session
    second = run_kernel(root)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    assert status(root)["phase"] == "done"
    assert train_losses(out) == pytest.approx(expected)
