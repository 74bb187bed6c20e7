"""`launch --gpu A10G` on AWS through the sky provider, end to end, with SkyPilot's SDK replaced by
the stand-in of tests/fakes/sky_sdk.py (clusters are real sshd's on 127.0.0.1, one per node): the
real planner picks the g5 offer, the real lifecycle rents it, prepares the node over SSH, uploads,
starts the tiny job (a real model trained on the CPU, in the node's own HOME), follows it, pulls
the results and tears the cluster down. With resources.nodes: 2 the job trains data parallel on
two "nodes" for real: two accelerate ranks over gloo on loopback, rank 0 on the head writing the
run's files, each node started from its own node file. In-process, so the SDK can be swapped."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from launcher import job, planning
from launcher.config import load
from launcher.providers import sky as sky_provider
from launcher.providers import sky_client
from launcher.providers.base import Availability
from launcher.runs import RunStore
from tests.fakes.sky_sdk import FakeSky
from tests.helpers import tiny_job


@pytest.fixture
def fake(tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_LAUNCH_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(job, "POLL_S", 0.2)
    monkeypatch.setattr(job, "plot_losses", lambda path: None)  # matplotlib: not what this tests
    monkeypatch.setattr(sky_provider, "cloud_availability",
                        lambda cloud: Availability(cloud == "aws", f"{cloud}: as the test account says"))
    sky = FakeSky(tmp_path / "sky")
    monkeypatch.setattr(sky_client.SkyServer, "ensure", lambda self: sky)  # the SDK, as if a server answered
    yield sky
    left = sky.alive()
    sky.stop()
    assert left == [], f"clusters or their processes left at the end of the test: {left}"


def launch_on_aws(tmp_path: Path, **resources) -> tuple[job.Session, job.Outcome, RunStore]:
    config = load(tiny_job(tmp_path / "job.yaml", train={"max_steps": 12, "save_every": 6, "eval_every": 6},
                           resources={"gpu": "A10G", "providers": ["aws"], "interruptible": False,
                                      "python": sys.executable, "sky": {"clouds": ["aws"], "ssh_timeout_s": 30},
                                      **resources}))
    store = RunStore(tmp_path / "home" / "runs.sqlite")
    plan = planning.compute_plan(config, [], lambda text: None, renting=True)
    chosen = plan.candidates[0]
    assert chosen.provider == "aws" and chosen.instance_type.startswith("g5.")  # A10G: AWS's g5 family
    session = job.create_run(config, tmp_path / "runs", store, planned_provider=chosen.provider)
    outcome = job.launch(session, job.SilentReporter(), candidates=plan.candidates)
    return session, outcome, store


def test_launch_rents_the_planned_g5_trains_pulls_and_tears_the_cluster_down(fake, tmp_path):
    session, outcome, store = launch_on_aws(tmp_path)
    record = store.get(session.record.id)
    assert (record.status, record.exit_code, outcome.exit_code) == ("done", 0, 0), record.error
    assert record.provider == "sky" and record.machine_id.startswith("qlora-")
    assert store.machines(record.id)[0].gpu == "A10G"  # g5.xlarge on demand: the cheapest whole job
    assert fake.launched() == [record.machine_id] and fake.downed() == [record.machine_id]
    (machine,) = store.machines(record.id)
    assert machine.usd_per_hour == 1.006  # g5.xlarge on demand in the catalog: the cost is catalog x uptime
    run_dir = Path(record.run_dir)
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["event"] == "train"]
    assert steps == list(range(1, 13))


def test_two_nodes_train_data_parallel_with_rank_0_on_the_head(fake, tmp_path):
    session, outcome, store = launch_on_aws(tmp_path, nodes=2)
    record = store.get(session.record.id)
    assert (record.status, record.exit_code, outcome.exit_code) == ("done", 0, 0), record.error
    run_dir = Path(record.run_dir)
    train = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["event"] == "train"]
    assert [event["step"] for event in train] == list(range(1, 13))  # rank 0 alone wrote them, once each
    log = (run_dir / "runner.log").read_text()
    assert "data parallel: 2 ranks on 2 node(s)" in log
    (cluster,) = [c for c in fake.folder.iterdir() if c.is_dir() and c.name.startswith("qlora-")]
    worker = cluster / "node1" / "home" / "qlora-launch"
    assert (worker / ".node.env").read_text().count("SKYPILOT_NODE_RANK=1") == 1
    # The worker trained too (its own node file, its own copy of the checkpoints), but wrote no history.
    worker_run = worker / "runs" / record.id
    assert (worker_run / "checkpoints").is_dir() and not (worker_run / "metrics.jsonl").exists()


def test_a_preempted_spot_cluster_is_downed_and_the_run_resumes_on_the_next_offer(fake, tmp_path):
    import threading
    import time

    def preempt_after_a_checkpoint() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            for name, cluster in list(fake.clusters.items()):
                done = list(cluster.home.glob("qlora-launch/runs/*/checkpoints/checkpoint-6/*.json"))
                if done:
                    time.sleep(1.0)  # the launcher pulls it within a look or two
                    fake.preempt(name)
                    return
            time.sleep(0.1)

    watcher = threading.Thread(target=preempt_after_a_checkpoint, daemon=True)
    watcher.start()
    session, outcome, store = launch_on_aws(tmp_path, interruptible=True)
    watcher.join(timeout=5)
    record = store.get(session.record.id)
    assert (record.status, record.exit_code, outcome.exit_code) == ("done", 0, 0), record.error
    first, second = store.machines(record.id)
    assert first.end_reason in ("preempted", "gone") and second.end_reason == "done"
    assert first.region != second.region or first.usd_per_hour <= second.usd_per_hour  # the next offer
    assert len(fake.launched()) == 2 and len(set(fake.downed())) == 1 and len(fake.downed()) >= 1
    run_dir = Path(record.run_dir)
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["event"] == "train"]
    assert steps == list(range(1, 13))  # resumed from the checkpoint: every step once
