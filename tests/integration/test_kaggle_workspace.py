"""The Kaggle workspace against the fake Kaggle API through the real client: the run's dataset
put (versioned only when its content changed), the kernel pushed with the plan's settings, its
script (cluster_templates/kaggle_kernel.py) really run by the fake's executor on the CPU in a
sandbox laid out as a Kaggle session, its status looked at, its metrics streamed and its output
fetched into the run folder."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from launcher import config as launch_config
from launcher.providers.base import MachineSpec, Need
from launcher.providers.kaggle import KaggleProvider
from tests.fakes.kaggle_api import COMPLETE, ERROR, RUNNING, FakeKaggle, KernelVersion
from tests.helpers import tiny_job, train_losses, uninterrupted_losses
from tests.unit import test_kaggle_provider as provider_tests
from tests.unit.test_kaggle_provider import USER, with_key

fake, kaggle_home = provider_tests.fake, provider_tests.kaggle_home  # the fixtures: the fake on the real client


def run_script(sandbox: Path, gpus: str = "Tesla T4,Tesla T4"):
    """An executor that runs the pushed script as Kaggle would: the attached datasets under
    kaggle/input/datasets/<owner>/<slug>/, an empty kaggle/working/, stdout as the log."""

    def execute(fake: FakeKaggle, version: KernelVersion) -> None:
        root = sandbox / f"v{version.number}"
        for ref in version.dataset_sources:
            folder = root / "kaggle" / "input" / "datasets" / ref
            folder.mkdir(parents=True)
            for name, data in fake.datasets[ref].files.items():
                (folder / name).write_bytes(data)
        working = root / "kaggle" / "working"
        working.mkdir(parents=True)
        version.set_status(RUNNING)
        env = {**os.environ, "QLORA_KAGGLE_ROOT": str(root), "QLORA_KAGGLE_SKIP_PIP": "1",
               "QLORA_KAGGLE_FAKE_GPUS": gpus}
        proc = subprocess.Popen([sys.executable, "-c", version.script], cwd=working, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for line in proc.stdout:
            version.log(line)
        code = proc.wait()
        version.outputs.update({str(p.relative_to(working)): p.read_bytes() for p in working.rglob("*") if p.is_file()})
        version.set_status(COMPLETE if code == 0 else ERROR, "" if code == 0 else f"exit code {code}")

    return execute


def workspace(tmp_path, config_path):
    provider = KaggleProvider()
    spec = MachineSpec(run_id="r-ws", known_hosts=tmp_path / "kh", control_dir=tmp_path)
    got = provider.provision(provider.offers(Need())[0], spec)
    config = launch_config.load(config_path)
    return provider.open_workspace(got.machine, "r-ws", config=config), config


def ws_slug(run_dir: Path) -> str:
    from launcher.providers.kaggle import KaggleSettings

    return KaggleSettings().slug(run_dir.name)


def wait_ended(ws, timeout_s: float = 300):
    deadline = time.monotonic() + timeout_s
    while True:
        seen = ws.look(1)
        if not seen.running:
            return seen
        assert time.monotonic() < deadline, "the kernel never ended"
        time.sleep(0.3)


def test_a_run_goes_up_as_a_dataset_runs_as_a_kernel_and_comes_back(fake, kaggle_home, tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_LAUNCH_HOME", str(tmp_path / "home"))
    with_key(kaggle_home)
    job = tiny_job(tmp_path / "job.yaml", train={"max_steps": 8, "save_every": 2, "eval_every": 8})
    fake.executor = run_script(tmp_path / "sandbox")
    ws, config = workspace(tmp_path, job)
    ws.upload(config)
    dataset = fake.datasets[f"{USER}/qlora-launch-r-ws"]
    assert dataset.private and "job.yaml" in dataset.files and "qlora-launch-r-ws.json" in dataset.files
    assert any(name.endswith("-model.tar") for name in dataset.files)  # a folder asset as one tar
    ws.upload(config)
    assert len(dataset.versions) == 1  # same content: no new version

    streamed: list[str] = []
    done = threading.Event()
    assert ws.start("python3", resume=False) == 1
    version = fake.kernel(f"{USER}/qlora-launch-r-ws")
    assert (version.enable_gpu, version.enable_internet, version.machine_shape) == (True, True, "NvidiaTeslaT4")
    assert version.session_timeout_s == 12 * 3600 and version.dataset_sources == [f"{USER}/qlora-launch-r-ws"]
    reader = threading.Thread(target=lambda: streamed.extend(
        line for line in ws.stream("metrics.jsonl", stop=done.is_set) if line))
    reader.start()
    seen = wait_ended(ws)
    done.set()
    reader.join(timeout=10)
    assert seen.exit_code == 0, (seen.status, version.log_text()[-3000:])
    assert seen.complete_steps and seen.complete_steps[-1] == 8  # the runner keeps the newest few
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    ws.fetch_results(run_dir)
    assert (run_dir / "adapter").is_dir() and train_losses(run_dir) == uninterrupted_losses(job, tmp_path / "alone")
    ws.fetch_checkpoint(8, tmp_path / "ck8")
    assert any((tmp_path / "ck8").iterdir())
    assert any('"event": "train"' in line for line in streamed)


def test_no_gpu_stops_the_kernel_in_seconds_and_says_so(fake, kaggle_home, tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_LAUNCH_HOME", str(tmp_path / "home"))
    with_key(kaggle_home)
    job = tiny_job(tmp_path / "job.yaml", train={"max_steps": 8})
    fake.executor = run_script(tmp_path / "sandbox", gpus="")
    ws, config = workspace(tmp_path, job)
    ws.upload(config)
    started = time.monotonic()
    ws.start("python3", resume=False)
    seen = wait_ended(ws, 60)
    assert time.monotonic() - started < 30
    assert seen.exit_code == 7 and "no GPU" in seen.status["error"] and "planned for 2x T4" in seen.status["error"]


def test_a_push_refused_for_phone_verification_is_one_line(fake, kaggle_home, tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_LAUNCH_HOME", str(tmp_path / "home"))
    with_key(kaggle_home)
    fake.push_error = "Phone verification is required to use GPUs"
    ws, config = workspace(tmp_path, tiny_job(tmp_path / "job.yaml"))
    ws.upload(config)
    with pytest.raises(Exception, match="Phone verification.*verify your phone number"):
        ws.start("python3", resume=False)


def test_launch_runs_the_tiny_job_on_the_fake_kaggle_end_to_end(fake, kaggle_home, tmp_path, monkeypatch):
    """`launch` as a user runs it (in-process), the provider registered for this test only."""
    from rich.console import Console

    from launcher import cli, providers

    monkeypatch.setitem(providers.PROVIDERS, KaggleProvider.name, KaggleProvider)
    monkeypatch.setenv("QLORA_LAUNCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with_key(kaggle_home)
    fake.gpu_time_used_s = 11.5 * 3600
    fake.executor = run_script(tmp_path / "sandbox")
    job = tiny_job(tmp_path / "job.yaml", train={"max_steps": 8, "save_every": 2, "eval_every": 8},
                   resources={"providers": ["kaggle"]})
    out, err = Console(width=300, record=True), Console(width=300, record=True)
    code = cli.main(["--config", str(job), "--yes", "--runs-dir", str(tmp_path / "runs")], console=out, errors=err)
    text = out.export_text() + err.export_text()
    assert code == 0, text[-4000:]
    assert "18.5 h left this week" in text  # the plan's note on the free offer it chose
    (run_dir,) = list((tmp_path / "runs").iterdir())
    assert fake.rpcs().count("SaveKernel") == 1 and fake.kernel(f"{USER}/{ws_slug(run_dir)}").status == COMPLETE
    assert (run_dir / "adapter").is_dir()
    assert train_losses(run_dir) == uninterrupted_losses(job, tmp_path / "alone")
