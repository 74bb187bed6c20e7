"""`launch --managed`: the job as a SkyPilot managed job, end to end, with SkyPilot's SDK replaced by
the stand-in of tests/fakes/sky_sdk.py (FakeJobs plays the jobs controller on this machine: it
copies the task's file mounts to a fresh HOME, runs setup and run with the task's envs and
secrets, and on a preemption starts both again on an empty "node") and checkpoints in a real
S3-compatible store (moto on loopback, keys enforced). The real planner, lifecycle and runner
(the tiny model, trained for real on the CPU) do the rest. In-process, so the SDK can be swapped."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import pytest

from launcher import job, planning
from launcher.config import load
from launcher.paths import runner_module
from launcher.providers import sky as sky_provider
from launcher.providers import sky_client, sky_managed_workspace
from launcher.providers.base import Availability
from launcher.runs import RunStore
from tests.fakes.s3_server import S3Server
from tests.fakes.sky_sdk import FakeSky
from tests.helpers import tiny_job, train_losses, uninterrupted_losses

KEY_VAR, SECRET_VAR = "TEST_MANAGED_KEY", "TEST_MANAGED_SECRET"
STEPS, SAVE_EVERY = 12, 4


@pytest.fixture(scope="module")
def s3() -> S3Server:
    server = S3Server().start()
    yield server
    server.stop()


@pytest.fixture
def fake(tmp_path, monkeypatch, s3):
    monkeypatch.setenv("QLORA_LAUNCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv(KEY_VAR, s3.access_key)
    monkeypatch.setenv(SECRET_VAR, s3.secret_key)
    monkeypatch.setattr(job, "POLL_S", 0.3)
    monkeypatch.setattr(sky_managed_workspace, "START_POLL_S", 0.2)
    monkeypatch.setattr(job, "plot_losses", lambda path: None)  # matplotlib: not what this tests
    monkeypatch.setattr(sky_provider, "cloud_availability",
                        lambda cloud: Availability(cloud in ("aws", "runpod"), f"{cloud}: as the test account says"))
    sky = FakeSky(tmp_path / "sky")
    monkeypatch.setattr(sky_client.SkyServer, "ensure", lambda self: sky)  # the SDK, as if a server answered
    yield sky
    left = sky.alive()
    sky.stop()
    assert left == [], f"managed jobs, clusters or their processes left at the end of the test: {left}"


@pytest.fixture(scope="module")
def reference_losses(tmp_path_factory) -> dict[int, float]:
    folder = tmp_path_factory.mktemp("reference")
    config = tiny_job(folder / "job.yaml", train={"max_steps": STEPS, "save_every": SAVE_EVERY, "eval_every": 6})
    return uninterrupted_losses(config, folder / "out")


def managed_job(tmp_path: Path, s3: S3Server, bucket: str, **resources) -> Path:
    return tiny_job(tmp_path / "job.yaml", train={"max_steps": STEPS, "save_every": SAVE_EVERY, "eval_every": 6},
                    storage={"kind": "s3", "bucket": bucket, "endpoint_url": s3.url, "region": "us-east-1",
                             "access_key_env": KEY_VAR, "secret_key_env": SECRET_VAR, "keep": 2},
                    resources={"gpu": "A10G", "providers": ["sky"], "interruptible": True, "python": sys.executable,
                               "sky": {"clouds": ["aws", "runpod"], "managed": True}, **resources})


def start_managed(tmp_path: Path, s3: S3Server, bucket: str, detach: bool = False,
                  **resources) -> tuple[job.Session, job.Outcome, RunStore]:
    config = load(managed_job(tmp_path, s3, bucket, **resources))
    store = RunStore(tmp_path / "home" / "runs.sqlite")
    plan = planning.compute_plan(config, [], lambda text: None, renting=True)
    session = job.create_run(config, tmp_path / "runs", store, planned_provider=plan.candidates[0].provider)
    outcome = job.launch(session, job.SilentReporter(), candidates=plan.candidates, detach=detach)
    return session, outcome, store


def wait_for_stored(s3: S3Server, bucket: str, step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not any(k.endswith(f"checkpoint-{step}/{runner_module().MANIFEST}") for k in s3.keys(bucket)):
        assert time.monotonic() < deadline, f"checkpoint-{step} never reached the store: {s3.keys(bucket)}"
        time.sleep(0.2)


def test_the_plan_offers_only_clouds_that_run_managed_jobs_and_prices_the_controller(fake, tmp_path, s3):
    config = load(managed_job(tmp_path, s3, "plan-only", gpu="T4", providers=None))
    plan = planning.compute_plan(config, [], lambda text: None)
    markets = {row.offer.provider for row in plan.rows}
    assert markets and markets <= set(sky_provider.sky_managed.MANAGED_CLOUDS), markets  # no RunPod, no Vast.ai
    chosen = plan.rows[plan.choice].offer
    (note,) = plan.mode_notes
    assert note.startswith("managed: SkyPilot's jobs controller (m6i.xlarge, $0.192/h)"), note
    # A spot T4 costs less an hour than the controller VM: the plan says so.
    assert chosen.usd_per_hour < 0.192 and "it costs more than the GPU" in note, (chosen, note)
    assert note in plan.as_json()["notes"]


def test_a_managed_job_trains_survives_a_preemption_from_the_store_and_is_pulled_from_it(
        fake, tmp_path, s3, reference_losses):
    bucket = s3.make_bucket("managed-run")

    def preempt_after_the_first_stored_checkpoint() -> None:
        wait_for_stored(s3, bucket, SAVE_EVERY)
        (managed,) = fake.jobs.jobs.values()
        fake.jobs.preempt(managed.job_id)

    watcher = threading.Thread(target=preempt_after_the_first_stored_checkpoint, daemon=True)
    watcher.start()
    session, outcome, store = start_managed(tmp_path, s3, bucket)
    watcher.join(timeout=5)
    record = store.get(session.record.id)
    assert (record.status, record.exit_code, outcome.exit_code) == ("done", 0, 0), record.error
    assert record.provider == "sky" and record.machine_id == f"managed:{sky_provider.cluster_name(record.id)}"
    assert fake.launched() == []  # no cluster of ours: SkyPilot's controller rents the job's
    (managed,) = fake.jobs.jobs.values()
    assert managed.recovery_count == 1 and managed.status.value == "SUCCEEDED"
    # Recovered in any region of the planned cloud, with the planned instance and market.
    resources = next(iter(managed.task.resources))
    assert (str(resources.cloud).lower(), resources.region, resources.use_spot) == ("aws", None, True)
    assert resources.instance_type.startswith("g5.")
    # The second node started on an empty disk and resumed from the store: the losses are the
    # uninterrupted run's, and the history pulled here has every step once.
    run_dir = Path(record.run_dir)
    assert train_losses(run_dir) == pytest.approx(reference_losses, abs=1e-5)
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["event"] == "train"]
    assert steps == list(range(1, STEPS + 1))
    assert (run_dir / "adapter" / "adapter_config.json").is_file() and (run_dir / "eval.json").is_file()
    second_log = (managed.folder / "job.log").read_text()
    assert "--resume auto" in second_log or "from the store" in second_log
    assert record.stored_step == STEPS and record.pulled_step == STEPS
    # The controller bills beside the GPU: the run's $/h is both.
    (machine,) = store.machines(record.id)
    assert machine.usd_per_hour == pytest.approx(resources.get_cost(3600) + 0.192, abs=1e-3)
    # The store's keys went as the task's secrets: in the job's environment, not in its YAML.
    task_yaml = json.dumps(managed.task.to_yaml_config(use_user_specified_yaml=True))
    assert s3.secret_key not in task_yaml and s3.secret_key not in json.dumps(managed.task.envs)
    assert any(value.get_secret_value() == s3.secret_key for value in managed.task.secrets.values())


def test_pull_and_down_reach_a_managed_job_and_resume_submits_a_new_one_from_the_store(fake, tmp_path, s3,
                                                                               reference_losses):
    bucket = s3.make_bucket("managed-down")
    session, outcome, store = start_managed(tmp_path, s3, bucket, detach=True)
    assert outcome.detached
    wait_for_stored(s3, bucket, SAVE_EVERY)
    # Another launcher process: `launch pull` reads the job's checkpoints from the store.
    pulled = job.pull(job.open_session(store, session.record.id), job.SilentReporter())
    assert pulled and pulled[-1] >= SAVE_EVERY
    reopened = job.open_session(store, session.record.id)
    stopped = job.down(reopened, job.SilentReporter())
    assert stopped.status == "stopped", stopped.error
    (first,) = fake.jobs.jobs.values()
    assert first.status.value == "CANCELLED" and fake.jobs.live() == []
    assert stopped.stored_step and stopped.stored_step >= SAVE_EVERY

    outcome = job.resume(job.open_session(store, session.record.id), job.SilentReporter())
    record = store.get(session.record.id)
    assert (record.status, outcome.exit_code) == ("done", 0), record.error
    first, second = sorted(fake.jobs.jobs.values(), key=lambda j: j.job_id)
    assert second.status.value == "SUCCEEDED" and second.name == first.name
    assert train_losses(Path(record.run_dir)) == pytest.approx(reference_losses, abs=1e-5)
    assert len(store.machines(record.id)) == 2  # the resumed job bills a segment of its own


def test_a_job_skypilot_cannot_start_is_cancelled_after_the_wait(fake, tmp_path, s3):
    fake.jobs.no_capacity = True
    bucket = s3.make_bucket("managed-no-capacity")
    with pytest.raises(job.JobError, match="SkyPilot did not start the managed job within") as failure:
        start_managed(tmp_path, s3, bucket, sky={"clouds": ["aws"], "managed": True, "managed_start_timeout_s": 2})
    assert failure.value.exit_code == 8 and "cancelled" in str(failure.value)
    (record,) = RunStore(tmp_path / "home" / "runs.sqlite").list()
    assert (record.status, record.exit_code) == ("failed", 8), record.error
    (waiting,) = fake.jobs.jobs.values()
    assert waiting.status.value == "CANCELLED" and fake.jobs.live() == []


def test_managed_mode_without_a_store_is_refused_before_anything(tmp_path, monkeypatch, capsys):
    from launcher.cli import main

    monkeypatch.setenv("QLORA_LAUNCH_HOME", str(tmp_path / "home"))
    config = tiny_job(tmp_path / "job.yaml", train={"device": "auto"},
                      resources={"gpu": "A10G", "providers": ["sky"]})
    launched: list[str] = []
    monkeypatch.setattr(sky_client.SkyServer, "ensure", lambda self: launched.append("server") or None)
    code = main(["--config", str(config), "--managed", "--yes"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 3 and launched == [], errors
    assert len(errors) == 1 and "resources.sky.managed (--managed) needs a checkpoint store" in errors[0], errors
