"""The runner's checkpoint store, against a real S3-compatible server on loopback (moto, with
credentials enforced) through the real boto3: every checkpoint uploaded with its manifest last,
rotation, a runner killed mid-upload, and a resume into an empty folder from the store."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.fakes.s3_server import S3Server
from tests.helpers import load_runner_module, runner_command, tiny_job, train_losses

STEPS = 40  # tiny_job: save_every 10
runner = load_runner_module()


@pytest.fixture(scope="module")
def s3() -> S3Server:
    server = S3Server().start()
    yield server
    server.stop()


def store_job(path: Path, s3: S3Server, bucket: str, **storage) -> Path:
    return tiny_job(path, storage={"kind": "s3", "bucket": bucket, "endpoint_url": s3.url, "region": "us-east-1",
                                   "prefix": "runs", **storage})


def keys_env(s3: S3Server, **extra: str) -> dict[str, str]:
    return {**os.environ, runner.S3_KEY_ENV: s3.access_key, runner.S3_SECRET_ENV: s3.secret_key, **extra}


def run(config: Path, out: Path, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(runner_command(config, out, *extra), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    return proc


@pytest.fixture(scope="module")
def uninterrupted(s3, tmp_path_factory) -> Path:
    """A whole run with the store, keep 2: its outputs, and the losses the others must match."""
    root = tmp_path_factory.mktemp("whole")
    bucket = s3.make_bucket("whole-run")
    run(store_job(root / "job.yaml", s3, bucket, keep=2), root / "run-a", keys_env(s3))
    return root / "run-a"


def manifest_puts(s3: S3Server, run_name: str) -> list[int]:
    return [int(path.split("checkpoint-")[1].split("/")[0])
            for method, path, _ in s3.requests_for(f"/runs/{run_name}/checkpoints/", "PUT")
            if path.endswith("/" + runner.MANIFEST)]


def test_every_checkpoint_is_uploaded_with_its_manifest_last(s3, uninterrupted):
    assert manifest_puts(s3, "run-a") == [10, 20, 30, 40]
    puts = [path for method, path, _ in s3.requests_for("/runs/run-a/", "PUT")]
    for step in (10, 20, 30, 40):
        mine = [i for i, path in enumerate(puts) if f"/checkpoint-{step}/" in path]
        assert puts[mine[-1]].endswith(runner.MANIFEST)  # the manifest is the checkpoint's last write
        assert len(mine) >= 6  # adapter, optimizer, scheduler, RNG, trainer state, ... then the manifest
    # What the store holds is what the local checkpoint holds, byte for byte (by the manifest's sha256).
    manifest = json.loads(s3.read("whole-run", f"runs/run-a/checkpoints/checkpoint-40/{runner.MANIFEST}"))
    local = uninterrupted / "checkpoints" / "checkpoint-40"
    assert set(manifest["files"]) == {str(p.relative_to(local)) for p in local.rglob("*")
                                      if p.is_file() and p.name != runner.MANIFEST}
    for name, digest in manifest["sha256"].items():
        assert runner.sha256_of(local / name) == digest
        assert manifest["files"][name] == (local / name).stat().st_size


def test_the_store_keeps_the_newest_two_and_the_results(s3, uninterrupted):
    keys = s3.keys("whole-run", "runs/run-a/")
    steps = sorted({int(k.split("checkpoint-")[1].split("/")[0]) for k in keys if "/checkpoint-" in k})
    assert steps == [30, 40]  # keep: 2; 10 and 20 deleted, each only after a newer manifest was in place
    for old in (10, 20):
        deleted = [i for i, r in enumerate(s3.requests) if r[0] == "DELETE" and f"checkpoint-{old}/" in r[1]]
        newer_manifest = s3.requests.index(next(r for r in s3.requests if r[0] == "PUT" and
                                                f"checkpoint-{old + 20}/{runner.MANIFEST}" in r[1]))
        assert deleted and deleted[0] > newer_manifest
    for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "eval.json", "samples.jsonl",
                 "metrics.jsonl", "base_eval.json", "status.json"):
        assert f"runs/run-a/{name}" in keys
    assert json.loads(s3.read("whole-run", "runs/run-a/status.json"))["phase"] == "done"
    assert s3.read("whole-run", "runs/run-a/eval.json") == (uninterrupted / "eval.json").read_bytes()
    status = json.loads((uninterrupted / "status.json").read_text())
    assert (status["stored_step"], status["store"]) == (40, "s3://whole-run/runs/run-a/")


def test_killed_mid_upload_leaves_no_manifest_and_a_resume_from_the_store_matches(s3, uninterrupted, tmp_path):
    bucket = s3.make_bucket("killed-run")
    config = store_job(tmp_path / "job.yaml", s3, bucket, keep=3)
    out = tmp_path / "run-b"
    # checkpoint-20's upload stops at its RNG state, after its adapter and optimizer went up.
    hold = s3.hold("/runs/run-b/checkpoints/checkpoint-20/rng_state.pth")
    proc = subprocess.Popen(runner_command(config, out), env=keys_env(s3), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        assert hold.arrived.wait(240), "the upload of checkpoint-20 never reached its RNG state"
        proc.send_signal(signal.SIGKILL)  # the machine dies in the middle of the upload
        proc.wait(30)
    finally:
        proc.kill()
        hold.release()
    store = runner.CheckpointStore(runner.from_dict(runner.StorageSection, {
        "kind": "s3", "bucket": bucket, "endpoint_url": s3.url, "region": "us-east-1", "prefix": "runs"}, "storage"),
        "run-b", client=s3.client())
    keys = s3.keys(bucket, "runs/run-b/checkpoints/checkpoint-20/")
    assert any(k.endswith("adapter_model.safetensors") for k in keys)  # half uploaded...
    assert not any(k.endswith(runner.MANIFEST) for k in keys)  # ...and never taken for complete
    assert store.complete_steps() == [10]

    # A new machine: an empty folder, the same run name. It resumes from checkpoint-10, not 20.
    fresh = tmp_path / "elsewhere" / "run-b"
    proc = run(config, fresh, keys_env(s3), "--resume", "auto")
    assert "downloading checkpoint-10" in proc.stdout and "resuming from checkpoint-10" in proc.stdout
    reference = train_losses(uninterrupted)
    resumed = train_losses(fresh)
    assert sorted(resumed) == list(range(1, STEPS + 1))  # the store's metrics.jsonl came with the checkpoint
    assert max(abs(resumed[s] - reference[s]) for s in range(1, STEPS + 1)) < 1e-4, (resumed, reference)
    assert json.loads((fresh / "eval.json").read_text())["test_loss"] == pytest.approx(
        json.loads((uninterrupted / "eval.json").read_text())["test_loss"], abs=1e-4)
    # The resumed run completed checkpoint-20 properly this time, and the leftovers are gone.
    assert store.complete_steps() == [20, 30, 40]


def test_a_fresh_run_refuses_a_name_the_store_already_holds(s3, uninterrupted, tmp_path):
    config = store_job(tmp_path / "job.yaml", s3, "whole-run")
    proc = subprocess.run(runner_command(config, tmp_path / "run-a"), env=keys_env(s3), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == runner.EXIT_USAGE, proc.stderr[-2000:]
    assert "s3://whole-run/runs/run-a/ already holds checkpoints" in proc.stderr
    assert not (tmp_path / "run-a" / "checkpoints").exists() or not any((tmp_path / "run-a" / "checkpoints").iterdir())


def test_a_damaged_store_copy_is_refused(s3, uninterrupted, tmp_path):
    """The manifest's sha256 is checked on the way down: a changed file is an error, not a resume."""
    bucket = s3.make_bucket("damaged-run")
    client = s3.client()
    for key in s3.keys("whole-run", "runs/run-a/checkpoints/checkpoint-40/"):
        body = s3.read("whole-run", key)
        if key.endswith("scheduler.pt"):
            body = body[:-1] + bytes([body[-1] ^ 1])  # same size, one bit flipped
        client.put_object(Bucket=bucket, Key=key, Body=body)
    config = store_job(tmp_path / "job.yaml", s3, bucket)
    proc = subprocess.run(runner_command(config, tmp_path / "run-a", "--resume", "auto"), env=keys_env(s3),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == runner.EXIT_ENVIRONMENT, proc.stderr[-2000:]
    assert "checkpoint-40/scheduler.pt does not match its manifest" in proc.stderr
    assert not (tmp_path / "run-a" / "checkpoints" / "checkpoint-40").exists()


def test_unreachable_store_on_resume_is_one_clear_error(tmp_path, s3):
    config = tiny_job(tmp_path / "job.yaml", storage={"kind": "s3", "bucket": "any-bucket", "region": "us-east-1",
                                                      "endpoint_url": "http://127.0.0.1:9"})
    proc = subprocess.run(runner_command(config, tmp_path / "out", "--resume", "auto"), env=keys_env(s3),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == runner.EXIT_ENVIRONMENT
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("qlora_runner: storage error: cannot read s3://any-bucket/qlora-launch/out/")
    assert "storage.kind: local" in line
    shutil.rmtree(tmp_path / "out", ignore_errors=True)
