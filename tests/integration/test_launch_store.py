"""`launch` with checkpoints in an S3-compatible store (moto on loopback, credentials enforced):
the pre-flight refuses a bad store before anything is rented; a run's keys reach the runner and
nothing else (no file, no command line, no log, no run record); a run stopped on one machine
resumes on another from the store alone; `launch pull` falls back to the store when the machine
is gone; `runs` and `status` say where the newest checkpoint lives."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import pytest

from launcher.runs import RunStore
from tests.fakes.s3_server import S3Server
from tests.fakes.vast_api import ACCOUNT_KEY, FakeVast
from tests.helpers import ROOT, read_json, tiny_job, train_losses, uninterrupted_losses
from tests.integration.conftest import Launcher, output_of, ssh_args

STEPS = 40  # tiny_job: save_every 10
KEY_VAR, SECRET_VAR = "TEST_STORE_KEY", "TEST_STORE_SECRET"


@pytest.fixture(scope="module")
def s3() -> S3Server:
    server = S3Server().start()
    yield server
    server.stop()


def store_section(s3: S3Server, bucket: str, changes: Optional[dict] = None) -> dict:
    return {**{"kind": "s3", "bucket": bucket, "endpoint_url": s3.url, "region": "us-east-1", "prefix": "team/runs",
               "keep": 2, "access_key_env": KEY_VAR, "secret_key_env": SECRET_VAR}, **(changes or {})}


def store_job(path: Path, s3: S3Server, bucket: str, workdir: Path, **sections) -> Path:
    return tiny_job(path, storage=store_section(s3, bucket),
                    resources={"workdir": str(workdir), "python": sys.executable}, **sections)


class StoreLauncher(Launcher):
    s3: S3Server

    def env(self, **extra: str) -> dict[str, str]:
        return super().env(**{KEY_VAR: self.s3.access_key, SECRET_VAR: self.s3.secret_key, **extra})


@pytest.fixture
def launcher(tmp_path, s3) -> StoreLauncher:
    runner = StoreLauncher(tmp_path)
    runner.s3 = s3
    return runner


@pytest.fixture(scope="module")
def reference_losses(tmp_path_factory) -> dict[int, float]:
    folder = tmp_path_factory.mktemp("reference")
    return uninterrupted_losses(tiny_job(folder / "job.yaml"), folder / "out")


def files_under(*folders: Path) -> list[Path]:
    return [p for folder in folders if folder.exists() for p in folder.rglob("*") if p.is_file()]


# ---------------------------------------------------------------------------------------------
# pre-flight: one clear line, nothing rented
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def vast(tmp_path) -> FakeVast:
    fake = FakeVast(ROOT / "catalogs" / "v8" / "vast" / "vms.csv", tmp_path / "vast", loading_s=0.3).start()
    yield fake
    fake.stop()


@pytest.mark.parametrize("case, expected, code", [
    ("no such bucket", "storage.bucket: no bucket 'not-there' at http://127.0.0.1:", 3),
    ("wrong secret", "refused the keys from $TEST_STORE_KEY and $TEST_STORE_SECRET (SignatureDoesNotMatch)", 3),
    ("unknown key", "refused the keys from $TEST_STORE_KEY and $TEST_STORE_SECRET (InvalidAccessKeyId)", 3),
    ("unreachable", "storage.endpoint_url: cannot reach http://127.0.0.1:9 (EndpointConnectionError)", 8),
    ("keys not set", "storage.access_key_env/secret_key_env: TEST_STORE_SECRET not set here", 3),
])
def test_a_bad_store_is_refused_before_anything_is_rented(launcher, s3, vast, case, expected, code):
    bucket = s3.make_bucket(f"preflight-{case.replace(' ', '-')}")
    changes = {"no such bucket": {"bucket": "not-there"}, "unreachable": {"endpoint_url": "http://127.0.0.1:9"}}
    env = {"wrong secret": {SECRET_VAR: "not-the-secret"}, "unknown key": {KEY_VAR: "AKIANOTAKEY000000000"},
           "keys not set": {SECRET_VAR: ""}}
    config = tiny_job(launcher.folder / "job.yaml", storage=store_section(s3, bucket, changes.get(case)),
                      train={"device": "auto"}, resources={"providers": ["vast"], "python": sys.executable})
    proc = launcher.run("--config", str(config), "--yes", VAST_URL=vast.url, VAST_API_KEY=ACCOUNT_KEY,
                        **env.get(case, {}))
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == code, output_of(proc)[-3000:]
    assert len(errors) == 1 and expected in errors[0], errors
    assert vast.instances == {}  # nothing rented
    assert s3.secret_key not in output_of(proc)


# ---------------------------------------------------------------------------------------------
# a run with a store: the keys go nowhere but the runner's environment
# ---------------------------------------------------------------------------------------------


def command_lines_holding(secret: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            line = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if secret.encode() in line:
            found.append(line.replace(b"\0", b" ").decode(errors="replace"))
    return found


def test_the_keys_reach_the_runner_and_nothing_else(launcher, s3, reference_losses):
    bucket = s3.make_bucket("secrets-run")
    workdir = launcher.folder / "target-workdir"
    config = store_job(launcher.folder / "job.yaml", s3, bucket, workdir)
    proc = launcher.start("--config", str(config), "--yes")
    seen_on_command_lines: list[str] = []
    runner_env_has_keys = False
    while proc.poll() is None:
        seen_on_command_lines += command_lines_holding(s3.secret_key)
        for pid in Path("/proc").iterdir():
            try:
                if b"qlora_runner.py" in (pid / "cmdline").read_bytes():
                    runner_env_has_keys |= s3.secret_key.encode() in (pid / "environ").read_bytes()
            except OSError:
                continue
        time.sleep(0.2)
    out = proc.stdout.read()
    assert proc.returncode == 0, out[-4000:]
    assert seen_on_command_lines == []
    assert runner_env_has_keys  # the runner had them: it uploaded with them
    (record,) = launcher.records()
    assert record.status == "done" and record.stored_step == STEPS
    assert record.store_url == f"s3://{bucket}/team/runs/{record.id}/"
    assert train_losses(Path(record.run_dir)) == pytest.approx(reference_losses, abs=1e-5)  # the store changes nothing
    for secret in (s3.secret_key, s3.access_key):
        assert secret not in out
        leaks = [p for p in files_under(Path(record.run_dir), launcher.home, workdir) if secret.encode() in p.read_bytes()]
        assert leaks == []  # run folder, run records (SQLite), state dir, the target's synced files and logs
    keys = s3.keys(bucket, f"team/runs/{record.id}/")
    assert f"team/runs/{record.id}/adapter/adapter_model.safetensors" in keys
    assert f"team/runs/{record.id}/checkpoints/checkpoint-{STEPS}/qlora_complete.json" in keys

    runs = launcher.run("runs")
    assert f"{STEPS} here+store" in runs.stdout
    status = launcher.run("status", record.id)
    assert f"checkpoint-{STEPS} here; checkpoint-{STEPS} in s3://{bucket}/team/runs/{record.id}/" in status.stdout
    as_json = json.loads(launcher.run("status", record.id, "--json").stdout)
    assert as_json["live"]["checkpoints_in_store"] == [30, 40]  # keep: 2


# ---------------------------------------------------------------------------------------------
# resuming on another machine, from the store alone; pulling from it when the machine is gone
# ---------------------------------------------------------------------------------------------


def test_a_run_stopped_here_resumes_on_another_machine_from_the_store(launcher, s3, sshd, reference_losses):
    bucket = s3.make_bucket("moving-run")
    config = store_job(launcher.folder / "job.yaml", s3, bucket, launcher.folder / "here",
                       train={"max_steps": STEPS})
    first = launcher.start("--config", str(config), "--yes")
    try:
        record = launcher.wait_for(lambda r: r.stored_step is not None and r.stored_step >= 10, timeout=240)
        down = launcher.run("down", record.id)
        assert down.returncode == 0, output_of(down)
    finally:
        first.kill()
        first.wait(30)
    stopped = launcher.records()[0]
    assert stopped.status == "stopped" and stopped.stored_step >= 10
    run_dir = Path(stopped.run_dir)
    # The first machine is gone (its disk with it: the test sshd shares this machine's disk, and
    # the moved run keeps its workdir) and the laptop keeps nothing: the store is all there is.
    shutil.rmtree(launcher.folder / "here")
    for name in ("checkpoints", "metrics.jsonl", "base_eval.json"):
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()

    moved = launcher.run("resume", stopped.id, *ssh_args(sshd), timeout=400)
    out = output_of(moved)
    assert moved.returncode == 0, out[-4000:]
    assert f"the runner resumes from checkpoint-{stopped.stored_step} in s3://{bucket}/" in out
    record = launcher.records()[0]
    assert (record.status, record.provider, record.target) == ("done", "ssh", sshd.target)
    remote_log = Path(record.remote_dir, "runner.log").read_text()
    assert f"storage: downloading checkpoint-{stopped.stored_step} from s3://{bucket}/team/runs/{record.id}/" in remote_log
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))  # every step once, the first ones from the store's history
    assert losses == pytest.approx(reference_losses, abs=1e-4)
    assert "moved by `launch resume`" in (run_dir / "job.local.yaml").read_text()
    assert f"target: {sshd.target}" in (run_dir / "job.local.yaml").read_text()

    # The machine is gone (an address that no longer answers) and the laptop lost its files:
    # `launch pull` takes the newest checkpoint and the results from the store.
    for name in ("adapter", "checkpoints", "eval.json"):
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    store = RunStore(launcher.home / "runs.sqlite")
    store.update(record.id, target="ssh://nobody@127.0.0.1:9", machine_id="ssh://nobody@127.0.0.1:9")
    store.close()
    pulled = launcher.run("pull", record.id)
    assert pulled.returncode == 0, output_of(pulled)
    assert f"pulling from s3://{bucket}/team/runs/{record.id}/" in pulled.stdout
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert read_json(run_dir / "eval.json")["train_steps"] == STEPS
    assert (run_dir / "checkpoints" / f"checkpoint-{STEPS}" / "qlora_complete.json").is_file()
