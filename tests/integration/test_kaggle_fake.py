"""The kaggle_fake Kaggle API (tests/fakes/kaggle_api.py) against the REAL client, kaggle 2.2.5 on
kagglesdk: every call the Kaggle provider will make goes through KaggleApi as the user's machine
would run it, with its LOCAL environment mapped to the kaggle_fake's port in-process. HOME,
KAGGLE_CONFIG_DIR and the client's upload-state folder are the test's own; no secret is printed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import requests

from tests.fakes import kaggle_api
from tests.fakes.kaggle_api import COMPLETE, KEY, RUNNING, TOKEN, USER, FakeKaggle, KernelVersion

SLUG = "qlora-run-abc123"






def client(kaggle_fake: FakeKaggle, config: Path):
    from kaggle.api.kaggle_api_extended import KaggleApi

    api = KaggleApi()
    api.config_dir, api.config = str(config), str(config / "kaggle.json")  # class attributes, read at import
    return kaggle_api.point_client_at(kaggle_fake.url, api)


def authenticated(kaggle_fake: FakeKaggle, config: Path):
    (config / "kaggle.json").write_text(json.dumps({"username": USER, "key": KEY}))
    (config / "kaggle.json").chmod(0o600)
    api = client(kaggle_fake, config)
    api.authenticate()
    return api


def auth_header(kaggle_fake: FakeKaggle, method: str) -> str:
    return next(r.headers.get("authorization", "") for r in kaggle_fake.requests if r.path.endswith("/" + method))


# ---- authentication -----------------------------------------------------------------------------


def test_an_access_token_is_introspected_then_sent_as_bearer(kaggle_fake, kaggle_home, monkeypatch, capsys):
    monkeypatch.setenv("KAGGLE_API_TOKEN", TOKEN)
    api = client(kaggle_fake, kaggle_home)
    api.authenticate()
    assert api.config_values["username"] == USER and api.config_values["auth_method"].endswith("ACCESS_TOKEN")
    api.quota_view()
    assert kaggle_fake.rpcs() == ["IntrospectToken", "GetAcceleratorQuotaStatistics"]
    assert kaggle_fake.requests[0].json() == {"token": TOKEN}
    assert auth_header(kaggle_fake, "GetAcceleratorQuotaStatistics") == f"Bearer {TOKEN}"
    assert TOKEN not in capsys.readouterr().out


@pytest.mark.parametrize("where", ["kaggle.json", "environment"])
def test_a_username_and_key_go_as_basic_auth(kaggle_fake, kaggle_home, monkeypatch, where):
    if where == "kaggle.json":
        (kaggle_home / "kaggle.json").write_text(json.dumps({"username": USER, "key": KEY}))
        (kaggle_home / "kaggle.json").chmod(0o600)
    else:
        monkeypatch.setenv("KAGGLE_USERNAME", USER)
        monkeypatch.setenv("KAGGLE_KEY", KEY)
    api = client(kaggle_fake, kaggle_home)
    api.authenticate()
    assert kaggle_fake.requests == []  # a key is not checked at authenticate(): the first call tells
    api.quota_view()
    assert auth_header(kaggle_fake, "GetAcceleratorQuotaStatistics").startswith("Basic ")


def test_a_wrong_key_is_refused_on_the_first_call(kaggle_fake, kaggle_home, monkeypatch):
    monkeypatch.setenv("KAGGLE_USERNAME", USER)
    monkeypatch.setenv("KAGGLE_KEY", "not-the-key")
    api = client(kaggle_fake, kaggle_home)
    api.authenticate()
    with pytest.raises(requests.HTTPError) as error:
        api.quota_view()
    assert error.value.response.status_code == 401 and str(error.value) == "Unauthenticated"
    # The kernel calls turn a 401/403 into a ValueError of their own ("Cannot access kernel ...").
    with pytest.raises(ValueError, match="Cannot access kernel"):
        api.kernels_status(f"{USER}/{SLUG}")


def test_no_credentials_or_a_dead_token_exit_the_process(kaggle_fake, kaggle_home, monkeypatch, capsys):
    """What the provider must catch (SystemExit) and turn into one line of its own."""
    with pytest.raises(SystemExit) as stop:
        client(kaggle_fake, kaggle_home).authenticate()
    assert stop.value.code == 1 and kaggle_fake.requests == []
    assert "Authentication required" in capsys.readouterr().out
    monkeypatch.setenv("KAGGLE_API_TOKEN", "KGAT_expired")
    with pytest.raises(SystemExit):
        client(kaggle_fake, kaggle_home).authenticate()
    assert kaggle_fake.rpcs() == ["IntrospectToken"]  # answered {"active": false}


# ---- quota --------------------------------------------------------------------------------------


def test_the_weekly_gpu_quota_reads_back(kaggle_fake, kaggle_home):
    kaggle_fake.gpu_time_used_s, kaggle_fake.gpu_total_s = 11.5 * 3600, 30 * 3600
    quota = authenticated(kaggle_fake, kaggle_home).quota_view()
    assert quota.gpu_quota.time_used == timedelta(hours=11.5)
    assert quota.gpu_quota.total_time_allowed == timedelta(hours=30)
    assert quota.quota_refresh_time.replace(microsecond=0) == kaggle_fake.quota_refresh.replace(tzinfo=None)


# ---- datasets -----------------------------------------------------------------------------------


def dataset_folder(path: Path, files: dict[str, bytes]) -> Path:
    path.mkdir(exist_ok=True)
    (path / "dataset-metadata.json").write_text(json.dumps(
        {"id": f"{USER}/{SLUG}", "title": "qlora run abc123", "licenses": [{"name": "CC0-1.0"}]}))
    for name, data in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    return path


def wait_ready(api, ref: str) -> None:
    deadline = time.monotonic() + 5
    while api.dataset_status(ref) != "ready":
        assert time.monotonic() < deadline, "dataset never ready"
        time.sleep(0.05)


def test_a_dataset_is_created_then_versioned_through_blob_uploads(kaggle_fake, kaggle_home):
    api = authenticated(kaggle_fake, kaggle_home)
    runner = os.urandom(3000)
    folder = dataset_folder(kaggle_home.parent / "ds", {"qlora_runner.py": runner, "job.yaml": b"model: tiny\n",
                                                        "assets/train.jsonl": b'{"text": "hi"}\n'})
    created = api.dataset_create_new(str(folder), public=False, quiet=True, dir_mode="zip")
    assert created.status == "ok" and not created.error
    dataset = kaggle_fake.datasets[f"{USER}/{SLUG}"]
    assert dataset.private and dataset.license_name == "CC0-1.0"
    assert set(dataset.files) == {"qlora_runner.py", "job.yaml", "assets.zip"}  # a subfolder goes as one zip
    assert dataset.files["qlora_runner.py"] == runner
    assert kaggle_fake.rpcs()[0] == "GetDatasetStatus"  # 404: only then does the client create
    puts = [r for r in kaggle_fake.requests if r.method == "PUT"]
    assert len(puts) == 3 and all(r.path.startswith("/upload/") for r in puts)
    wait_ready(api, f"{USER}/{SLUG}")

    again = api.dataset_create_new(str(folder), public=False, quiet=True, dir_mode="zip")
    assert again.status == "error" and "already in use" in again.error

    (folder / "job.yaml").write_bytes(b"model: tiny\nsteps: 4\n")
    versioned = api.dataset_create_version(str(folder), "config changed", quiet=True, dir_mode="zip")
    assert versioned.status == "ok"
    assert [v.notes for v in dataset.versions] == ["", "config changed"]
    assert dataset.files["job.yaml"] == b"model: tiny\nsteps: 4\n"
    wait_ready(api, f"{USER}/{SLUG}")


# ---- kernels ------------------------------------------------------------------------------------


def kernel_folder(path: Path, script: str = "print('hi')\n", **metadata) -> Path:
    path.mkdir(exist_ok=True)
    (path / "run.py").write_text(script)
    (path / "kernel-metadata.json").write_text(json.dumps({
        "id": f"{USER}/{SLUG}", "title": "qlora run abc123", "code_file": "run.py", "language": "python",
        "kernel_type": "script", "is_private": True, "enable_gpu": True, "enable_internet": True,
        "dataset_sources": [f"{USER}/{SLUG}"], "machine_shape": "NvidiaTeslaT4", **metadata}))
    return path


def wait_status(api, ref: str, timeout_s: float = 5.0) -> list[str]:
    seen, deadline = [], time.monotonic() + timeout_s
    while not seen or seen[-1] not in ("COMPLETE", "ERROR"):
        assert time.monotonic() < deadline, f"still {seen[-1]}"
        status = api.kernels_status(ref)
        seen.append(status.status.name)
        time.sleep(0.05)
    return seen


def test_a_gpu_kernel_is_pushed_runs_and_its_paged_output_comes_back(kaggle_fake, kaggle_home, tmp_path):
    api = authenticated(kaggle_fake, kaggle_home)
    api.dataset_create_new(str(dataset_folder(tmp_path / "ds", {"job.yaml": b"x: 1\n"})), quiet=True)
    kaggle_fake.outputs = {f"out/checkpoint-{i}/adapter_model.safetensors": os.urandom(1000 + i) for i in range(4)}
    kaggle_fake.outputs["out/metrics.jsonl"] = b'{"step": 4, "loss": 1.5}\n'
    kaggle_fake.log_lines = ["step 1 loss 2.0\n", "step 4 loss 1.5\n"]
    script = "import torch\nprint(torch.cuda.device_count())\n"

    pushed = api.kernels_push(str(kernel_folder(tmp_path / "k", script)), timeout="3600", acc="NvidiaTeslaT4")
    assert (pushed.error, pushed.version_number, pushed.invalid_dataset_sources) == ("", 1, [])
    version = kaggle_fake.kernel(f"{USER}/{SLUG}")
    assert (version.enable_gpu, version.enable_internet, version.machine_shape) == (True, True, "NvidiaTeslaT4")
    assert version.dataset_sources == [f"{USER}/{SLUG}"] and version.session_timeout_s == 3600
    assert version.script == script and version.request["isPrivate"] is True

    seen = wait_status(api, f"{USER}/{SLUG}")
    assert seen[0] in ("QUEUED", "RUNNING") and seen[-1] == "COMPLETE"
    assert api.kernels_status(f"{USER}/{SLUG}/1").status.name == "COMPLETE"  # by version: versionLabel "v1"

    target = tmp_path / "got"
    files, token = api.kernels_output(f"{USER}/{SLUG}", str(target), quiet=True)
    assert not token
    lists = [r.json() for r in kaggle_fake.requests if r.path.endswith("/ListKernelSessionOutput")]
    assert len(lists) == 3 and [bool(body.get("pageToken")) for body in lists] == [False, True, True]
    for name, data in kaggle_fake.outputs.items():
        assert (target / name).read_bytes() == data
    assert sorted(files) == sorted([str(target / n) for n in kaggle_fake.outputs] + [str(target / f"{SLUG}.log")])
    events = json.loads((target / f"{SLUG}.log").read_text())  # the log Kaggle persists: a JSON array
    assert [e["data"] for e in events] == kaggle_fake.log_lines and events[0]["stream_name"] == "stdout"

    assert json.loads(api.kernels_logs(f"{USER}/{SLUG}")) == events
    assert [e["data"] for e in api.kernels_logs_stream(f"{USER}/{SLUG}")] == kaggle_fake.log_lines  # the blob, when done


def test_the_log_streams_while_the_kernel_runs(kaggle_fake, kaggle_home, tmp_path):
    go, live = threading.Event(), []

    def executor(kaggle_fake: FakeKaggle, version: KernelVersion) -> None:
        version.set_status(RUNNING)
        version.log("step 1\n")
        live.append(go.wait(5))  # the test has read step 1 from the stream while the kernel runs
        version.log("step 2\n", "stderr")
        version.set_status(COMPLETE)

    kaggle_fake.executor = executor
    api = authenticated(kaggle_fake, kaggle_home)
    api.kernels_push(str(kernel_folder(tmp_path / "k", dataset_sources=[])))
    deadline = time.monotonic() + 5
    while kaggle_fake.kernel(f"{USER}/{SLUG}").status != RUNNING:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    got = []
    for event in api.kernels_logs_stream(f"{USER}/{SLUG}"):
        got.append((event["stream_name"], event["data"]))
        go.set()
    assert got == [("stdout", "step 1\n"), ("stderr", "step 2\n")] and live == [True]
    stream = next(r for r in kaggle_fake.requests if "/logs/stream/" in r.path)
    assert stream.path == f"/api/v1/kernels/logs/stream/{USER}/{SLUG}"


def test_the_executor_hook_can_run_the_pushed_script(kaggle_fake, kaggle_home, tmp_path):
    """What a later test does with the hook: the script really runs (here a trivial one), its
    stdout is the log, the files it writes under its working folder are the output."""

    def run_script(kaggle_fake: FakeKaggle, version: KernelVersion) -> None:
        working = tmp_path / "sandbox" / str(version.number) / "kaggle" / "working"
        working.mkdir(parents=True)
        version.set_status(RUNNING)
        done = subprocess.run([sys.executable, "-c", version.script], cwd=working, capture_output=True, text=True,
                              timeout=30)
        for line in done.stdout.splitlines(keepends=True):
            version.log(line)
        version.outputs.update({str(p.relative_to(working)): p.read_bytes() for p in working.rglob("*") if p.is_file()})
        version.set_status(COMPLETE if done.returncode == 0 else "ERROR", done.stderr[-200:])

    kaggle_fake.executor = run_script
    api = authenticated(kaggle_fake, kaggle_home)
    script = "from pathlib import Path\nPath('out').mkdir()\nPath('out/adapter.bin').write_bytes(b'w' * 10)\nprint('ok')\n"
    api.kernels_push(str(kernel_folder(tmp_path / "k", script, dataset_sources=[])))
    assert wait_status(api, f"{USER}/{SLUG}")[-1] == "COMPLETE"
    api.kernels_output(f"{USER}/{SLUG}", str(tmp_path / "got"))
    assert (tmp_path / "got" / "out" / "adapter.bin").read_bytes() == b"w" * 10
    assert [e["data"] for e in json.loads(api.kernels_logs(f"{USER}/{SLUG}"))] == ["ok\n"]

    failing = "raise SystemExit('no GPU: wanted 2 x Tesla T4')"
    assert api.kernels_push(str(kernel_folder(tmp_path / "k", failing, dataset_sources=[]))).version_number == 2
    assert wait_status(api, f"{USER}/{SLUG}")[-1] == "ERROR"
    assert "no GPU" in api.kernels_status(f"{USER}/{SLUG}").failure_message


def test_push_errors_come_back_in_the_reply(kaggle_fake, kaggle_home, tmp_path):
    """SaveKernel answers 200 with `error` or `invalid*Sources` set: the client returns them."""
    api = authenticated(kaggle_fake, kaggle_home)
    kaggle_fake.run_s = 0
    pushed = api.kernels_push(str(kernel_folder(tmp_path / "k", dataset_sources=[f"{USER}/missing-dataset"])))
    assert pushed.invalid_dataset_sources == [f"{USER}/missing-dataset"]
    kaggle_fake.push_error = "Phone verification is required to use GPUs"
    assert api.kernels_push(str(kernel_folder(tmp_path / "k"))).error == kaggle_fake.push_error
    kaggle_fake.wait_finished()
    assert len(kaggle_fake.kernels[f"{USER}/{SLUG}"]) == 1
