"""The Kaggle workspace against the kaggle_fake Kaggle API through the real client: the run's dataset
put (versioned only when its content changed), the kernel pushed with the plan's settings, its
script (cluster_templates/kaggle_kernel.py) really run by the kaggle_fake's executor on the CPU in a
sandbox laid out as a Kaggle session, its status looked at, its metrics streamed and its output
fetched into the run folder."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import yaml

from launcher import config as launch_config
from launcher.providers.base import MachineSpec, Need
from launcher.providers.kaggle import KaggleProvider
from tests.fakes.kaggle_api import COMPLETE, KEY, USER, Sandbox, with_key
from tests.helpers import tiny_job, train_losses, uninterrupted_losses


def run_script(sandbox: Path, gpus: str = "Tesla T4,Tesla T4") -> Sandbox:
    """The kaggle_fake's executor that really runs the pushed script (kaggle_api.Sandbox)."""
    return Sandbox(sandbox, gpus)


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


def test_a_run_goes_up_as_a_dataset_runs_as_a_kernel_and_comes_back(kaggle_fake, kaggle_home, tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_LAUNCH_HOME", str(tmp_path / "home"))
    with_key(kaggle_home)
    job = tiny_job(tmp_path / "job.yaml", train={"max_steps": 8, "save_every": 2, "eval_every": 8})
    kaggle_fake.executor = run_script(tmp_path / "sandbox")
    ws, config = workspace(tmp_path, job)
    ws.upload(config)
    dataset = kaggle_fake.datasets[f"{USER}/qlora-launch-r-ws"]
    assert dataset.private and "job.yaml" in dataset.files and "qlora-launch-r-ws.json" in dataset.files
    assert any(name.endswith("-model.tar") for name in dataset.files)  # a folder asset as one tar
    ws.upload(config)
    assert len(dataset.versions) == 1  # same content: no new version

    streamed: list[str] = []
    done = threading.Event()
    assert ws.start("python3", resume=False) == 1
    version = kaggle_fake.kernel(f"{USER}/qlora-launch-r-ws")
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
    logged = []
    for line in ws.stream("runner.log", stop=lambda: False):  # `launch logs -f`: the other lines
        if not line:
            break  # the stream of an ended kernel ends
        logged.append(line)
    assert "qlora-launch: GPUs: Tesla T4, Tesla T4" in logged and not any("QLORA_METRIC" in ln for ln in logged)


def test_the_kernel_gets_no_store_and_no_key_in_its_dataset(kaggle_fake, kaggle_home, tmp_path, monkeypatch):
    """Kaggle has no secret channel to a kernel: the job goes up without its `storage` section,
    and the store's keys (set here, as the launcher would read them) are in no file of the dataset."""
    monkeypatch.setenv("QLORA_LAUNCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("STORE_KEY_ID", "AKIA-KAGGLE-TEST-ID")
    monkeypatch.setenv("STORE_SECRET", "kaggle-test-secret-value")
    with_key(kaggle_home)
    job = tiny_job(tmp_path / "job.yaml", storage={"kind": "s3", "bucket": "runs", "endpoint_url": "http://127.0.0.1:9",
                                                    "access_key_env": "STORE_KEY_ID", "secret_key_env": "STORE_SECRET"})
    ws, config = workspace(tmp_path, job)
    ws.upload(config)
    files = kaggle_fake.datasets[f"{USER}/qlora-launch-r-ws"].files
    assert "storage" not in yaml.safe_load(files["job.yaml"].decode())
    for name, data in files.items():
        assert b"AKIA-KAGGLE-TEST-ID" not in data and b"kaggle-test-secret-value" not in data, name


def test_no_gpu_stops_the_kernel_in_seconds_and_says_so(kaggle_fake, kaggle_home, tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_LAUNCH_HOME", str(tmp_path / "home"))
    with_key(kaggle_home)
    job = tiny_job(tmp_path / "job.yaml", train={"max_steps": 8})
    kaggle_fake.executor = run_script(tmp_path / "sandbox", gpus="")
    ws, config = workspace(tmp_path, job)
    ws.upload(config)
    started = time.monotonic()
    ws.start("python3", resume=False)
    seen = wait_ended(ws, 60)
    assert time.monotonic() - started < 30
    assert seen.exit_code == 7 and "no GPU" in seen.status["error"] and "planned for 2x T4" in seen.status["error"]


def test_a_push_refused_for_phone_verification_is_one_line(kaggle_fake, kaggle_home, tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_LAUNCH_HOME", str(tmp_path / "home"))
    with_key(kaggle_home)
    kaggle_fake.push_error = "Phone verification is required to use GPUs"
    ws, config = workspace(tmp_path, tiny_job(tmp_path / "job.yaml"))
    ws.upload(config)
    with pytest.raises(Exception, match="Phone verification.*verify your phone number"):
        ws.start("python3", resume=False)


def launch_cli(tmp_path, *args: str) -> tuple[int, str]:
    """`launch ARGS` as a user runs it (in-process, so the kaggle_fake's client mapping holds)."""
    from rich.console import Console

    from launcher import cli

    out, err = Console(width=300, record=True), Console(width=300, record=True)
    runs_dir = ["--runs-dir", str(tmp_path / "runs")] if args[0].startswith("--") else []  # `launch` itself
    code = cli.main([*args, *runs_dir], console=out, errors=err)
    return code, out.export_text() + err.export_text()


@pytest.fixture
def on_kaggle(kaggle_fake, kaggle_home, tmp_path, monkeypatch):
    """The launcher's state under tmp_path, the test account's key set."""
    monkeypatch.setenv("QLORA_LAUNCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with_key(kaggle_home)
    return kaggle_fake


def test_launch_runs_the_tiny_job_on_the_fake_kaggle_end_to_end(on_kaggle, tmp_path):
    kaggle_fake = on_kaggle
    kaggle_fake.gpu_time_used_s = 11.5 * 3600
    kaggle_fake.executor = run_script(tmp_path / "sandbox")
    job = tiny_job(tmp_path / "job.yaml", train={"max_steps": 8, "save_every": 2, "eval_every": 8},
                   resources={"providers": ["kaggle"]})
    code, text = launch_cli(tmp_path, "--config", str(job), "--yes")
    assert code == 0, text[-4000:]
    assert "18.5 h left this week" in text  # the plan's note on the free offer it chose
    (run_dir,) = list((tmp_path / "runs").iterdir())
    assert kaggle_fake.rpcs().count("SaveKernel") == 1 and kaggle_fake.kernel(f"{USER}/{ws_slug(run_dir)}").status == COMPLETE
    assert (run_dir / "adapter").is_dir()
    assert train_losses(run_dir) == uninterrupted_losses(job, tmp_path / "alone")
    # The account's key: in no output, no file of the run folder or the launcher's state, nothing sent up.
    assert KEY not in text
    for folder in (run_dir, tmp_path / "home"):
        for path in folder.rglob("*"):
            assert not path.is_file() or KEY.encode() not in path.read_bytes(), path
    sent = [data for dataset in kaggle_fake.datasets.values() for data in dataset.files.values()]
    assert sent and not any(KEY.encode() in data for data in sent)
    assert not any(KEY in version.script for versions in kaggle_fake.kernels.values() for version in versions)


def timed_losses(job: Path, out: Path) -> tuple[dict[int, float], float]:
    started = time.monotonic()
    losses = uninterrupted_losses(job, out)
    return losses, time.monotonic() - started


STOP_BEFORE_S = 40.0  # the kernel's stop margin in these tests: the runner's SIGTERM-to-exit fits in it


def sessions_job(tmp_path: Path, train: dict, fraction: float) -> tuple[dict[int, float], Path]:
    """The runner's own losses for `train`, and the job on Kaggle whose sessions end (the
    script's SIGTERM) at `fraction` of that run's time."""
    expected, alone_s = timed_losses(tiny_job(tmp_path / "alone.yaml", train=train), tmp_path / "alone")
    session_s = alone_s * fraction + STOP_BEFORE_S
    job = tiny_job(tmp_path / "job.yaml", train=train, resources={"providers": ["kaggle"], "kaggle": {
        "session_limit_h": session_s / 3600, "stop_before_limit_minutes": STOP_BEFORE_S / 60}})
    return expected, job


def test_a_run_cut_by_the_session_limit_continues_in_new_versions_to_the_same_losses(on_kaggle, tmp_path):
    """Each session ends (the script's SIGTERM) at about 0.6 of the runner's own run: the launcher
    pulls the checkpoint, republishes it as the dataset's seed and pushes a new kernel version,
    until done; every step trained once, the losses of an uninterrupted run."""
    kaggle_fake = on_kaggle
    sandbox = run_script(tmp_path / "sandbox")
    kaggle_fake.executor = sandbox
    expected, job = sessions_job(tmp_path, {"max_steps": 120, "save_every": 4, "eval_every": 120}, 0.6)
    code, text = launch_cli(tmp_path, "--config", str(job), "--yes")
    assert code == 0, text[-4000:]
    (run_dir,) = list((tmp_path / "runs").iterdir())
    versions = kaggle_fake.kernels[f"{USER}/{ws_slug(run_dir)}"]
    assert len(versions) >= 2 and "continuing in a new session from checkpoint-" in text, text[-3000:]
    assert sandbox.kills == []  # every session ended by the script's own stop, none by Kaggle's clock
    assert len(kaggle_fake.datasets[f"{USER}/{ws_slug(run_dir)}"].versions) == len(versions)  # one seed per new session
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["event"] == "train"]
    assert steps == sorted(set(steps)) == list(range(1, 121))
    assert train_losses(run_dir) == pytest.approx(expected, abs=1e-5)
    assert (run_dir / "adapter").is_dir() and kaggle_fake.running() == []


def test_the_quota_running_out_mid_run_stops_it_resumable_and_it_finishes_elsewhere(on_kaggle, tmp_path):
    """The week's quota holds about half the run: the kernel stops the runner before it runs out
    (a checkpoint), the run is `stopped` with when the quota refreshes and how to go on; `launch
    resume RUN --target local` finishes it from the pulled checkpoint, to the uninterrupted losses."""
    kaggle_fake = on_kaggle
    kaggle_fake.executor = run_script(tmp_path / "sandbox")
    train = {"max_steps": 60, "save_every": 4, "eval_every": 60}
    expected, alone_s = timed_losses(tiny_job(tmp_path / "alone.yaml", train=train), tmp_path / "alone")
    kaggle_fake.quota_seconds_per_second = 1.0
    kaggle_fake.gpu_time_used_s = 20 * 3600.0
    kaggle_fake.gpu_total_s = kaggle_fake.gpu_time_used_s + alone_s * 0.5 + STOP_BEFORE_S
    job = tiny_job(tmp_path / "job.yaml", train=train, resources={"providers": ["kaggle"], "kaggle": {
        "stop_before_limit_minutes": STOP_BEFORE_S / 60, "min_session_minutes": 0.05}})
    code, text = launch_cli(tmp_path, "--config", str(job), "--yes")
    (run_dir,) = list((tmp_path / "runs").iterdir())
    record = launch_cli(tmp_path, "status", run_dir.name, "--json")[1]
    assert code == 143, text[-4000:]
    assert "quota ran out at step" in text and "launch resume" in text and "--providers vast" in text
    assert '"status": "stopped"' in record
    assert list(run_dir.glob("checkpoints/checkpoint-*")), "the checkpoint came home"
    assert len(kaggle_fake.kernels[f"{USER}/{ws_slug(run_dir)}"]) == 1 and kaggle_fake.running() == []

    code, text = launch_cli(tmp_path, "resume", run_dir.name, "--target", "local")
    assert code == 0, text[-4000:]
    assert train_losses(run_dir) == pytest.approx(expected, abs=1e-5)


def test_a_spent_quota_refuses_the_next_session_and_stops_the_run(on_kaggle, tmp_path):
    """A session cut by its limit, and meanwhile the account's other notebooks used up the week's
    quota: no new version is pushed; the run is stopped (resumable), not failed."""
    kaggle_fake = on_kaggle
    sandbox = run_script(tmp_path / "sandbox")

    def then_the_quota_is_gone(kaggle_fake, version) -> None:
        sandbox(kaggle_fake, version)
        kaggle_fake.gpu_time_used_s = kaggle_fake.gpu_total_s

    kaggle_fake.executor = then_the_quota_is_gone
    _, job = sessions_job(tmp_path, {"max_steps": 60, "save_every": 4, "eval_every": 60}, 0.5)
    code, text = launch_cli(tmp_path, "--config", str(job), "--yes")
    (run_dir,) = list((tmp_path / "runs").iterdir())
    assert code == 143, text[-4000:]
    assert "weekly GPU quota is spent" in text and "--providers vast" in text
    assert len(kaggle_fake.kernels[f"{USER}/{ws_slug(run_dir)}"]) == 1 and kaggle_fake.running() == []
    assert '"status": "stopped"' in launch_cli(tmp_path, "status", run_dir.name, "--json")[1]
    assert list(run_dir.glob("checkpoints/checkpoint-*")), "the checkpoint came home"


def test_down_on_a_running_kernel_says_it_cannot_stop_it_and_attach_finishes_the_run(on_kaggle, tmp_path):
    """`launch down` cannot stop a kernel (no such call): it returns at once, says so, and the run is
    stopped; the kernel ends by itself, and `launch resume` then finds it ended and takes its results."""
    kaggle_fake = on_kaggle
    kaggle_fake.executor = run_script(tmp_path / "sandbox")
    job = tiny_job(tmp_path / "job.yaml", train={"max_steps": 30, "save_every": 5, "eval_every": 30},
                   resources={"providers": ["kaggle"]})
    code, text = launch_cli(tmp_path, "--config", str(job), "--yes", "--detach")
    assert code == 0, text[-3000:]
    (run_dir,) = list((tmp_path / "runs").iterdir())
    started = time.monotonic()
    code, text = launch_cli(tmp_path, "down", run_dir.name)
    assert code == 0 and time.monotonic() - started < 30, text[-3000:]
    assert "cannot stop a running kernel" in text
    assert '"status": "stopped"' in launch_cli(tmp_path, "status", run_dir.name, "--json")[1]
    kaggle_fake.wait_finished(180)
    assert kaggle_fake.running() == []
    code, text = launch_cli(tmp_path, "resume", run_dir.name)
    assert code == 0, text[-3000:]
    assert (run_dir / "adapter").is_dir() and len(kaggle_fake.kernels[f"{USER}/{ws_slug(run_dir)}"]) == 1
    assert train_losses(run_dir) == uninterrupted_losses(job, tmp_path / "alone")
