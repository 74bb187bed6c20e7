"""Managed mode's pieces, checked with SkyPilot's own classes where there are some: the task parses
as a sky.Task and keeps the store's keys out of its YAML; the runner line always resumes; the
controller's cost line; the checks a managed job must pass before anything is planned or rented."""

from __future__ import annotations

import sys

import pytest

from launcher import planning
from launcher.config import load
from launcher.distributed import Topology
from launcher.providers import sky_managed
from launcher.providers.base import Offer
from launcher.providers.sky import SkyProvider
from launcher.providers.sky_managed_workspace import runner_line, task_config
from launcher.providers.sky_task import pinned_resources
from tests.helpers import tiny_job

sky = pytest.importorskip("sky", reason="the [sky] extra is part of the test environment (.ci/run installs it)")

STORE = {"kind": "s3", "bucket": "ckpts", "endpoint_url": "http://127.0.0.1:9", "region": "us-east-1"}


def test_the_task_parses_keeps_its_secrets_out_of_its_yaml_and_always_resumes(tmp_path):
    line = runner_line(Topology())
    assert line == '"$QLORA_RUNNER_PYTHON" qlora_runner.py --config job.yaml --out . --resume auto'
    task = sky.Task.from_yaml_config(task_config("run-1", tmp_path, line, {"QLORA_DEVICE": "cuda"}))
    task.update_secrets({"QLORA_S3_SECRET_KEY": "s3cr3t-value"})
    assert task.envs["QLORA_RUN_ID"] == "run-1" and task.envs["QLORA_RUNNER_COMMAND"] == line
    assert task.file_mounts == {"~/qlora-launch/runs/run-1": str(tmp_path)}
    assert "s3cr3t-value" not in str(task.to_yaml_config(use_user_specified_yaml=True))
    assert "bootstrap.sh" in task.setup and "QLORA_METRIC" in task.run


def test_several_gpus_of_one_node_launch_through_accelerate_with_the_setup_python():
    line = runner_line(Topology(gpus_per_node=4, nodes=1))
    assert line.startswith("export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=")
    assert '"$QLORA_RUNNER_PYTHON" qlora_runner.py accelerate-launch' in line and "--num_processes 4" in line


def test_the_region_is_left_open_for_recovery_and_the_rest_is_the_offer():
    offer = Offer(provider="aws", region="us-east-2", gpu="A10G", gpu_count=1, usd_per_hour=0.36, interruptible=True,
                  instance_type="g5.2xlarge")
    resources = pinned_resources(sky, offer, disk_gb=100, image_id=None, any_region=True)
    assert (resources.region, resources.instance_type, resources.use_spot) == (None, "g5.2xlarge", True)
    assert str(resources.cloud).lower() == "aws" and resources.accelerators == {"A10G": 1}


def test_the_controller_line_says_when_it_costs_more_than_the_gpu():
    cheap = sky_managed.controller_note("aws", None, 0.063, 7.0)
    assert cheap == ("managed: SkyPilot's jobs controller (m6i.xlarge, $0.192/h) bills beside the GPU: ~$1.38 over "
                     "the 7.0 h job and the 10 min after; it costs more than the GPU ($0.063/h): without --managed "
                     "the laptop follows the run and recovers it, with no controller")
    dear = sky_managed.controller_note("gcp", None, 1.2, 2.0)
    assert "n2-standard-4, $0.194/h" in dear and "more than the GPU" not in dear
    free = sky_managed.controller_note("aws", 0.0, 0.063, 7.0)
    assert "$0.000/h" in free and "more than the GPU" not in free and "over the" not in free


def test_managed_needs_a_store_and_one_node(tmp_path):
    no_store = load(tiny_job(tmp_path / "a.yaml", resources={"sky": {"managed": True}}))
    assert "resources.sky.managed (--managed) needs a checkpoint store" in SkyProvider.job_problem(no_store)
    nodes = load(tiny_job(tmp_path / "b.yaml", storage=STORE, resources={"sky": {"managed": True}, "nodes": 2}))
    assert "trains on one node" in SkyProvider.job_problem(nodes)
    fine = load(tiny_job(tmp_path / "c.yaml", storage=STORE, resources={"sky": {"managed": True}}))
    assert SkyProvider.job_problem(fine) is None


def test_the_managed_flag_sets_the_sky_section_and_narrows_the_providers(tmp_path):
    path = tiny_job(tmp_path / "job.yaml", storage=STORE, resources={"sky": {"clouds": ["aws"]},
                                                                       "providers": ["sky"], "python": sys.executable})
    config = load(path, {"sky.managed": True})
    assert config.resources.sky.managed and config.resources.sky.clouds == ["aws"]  # the section kept, one key set
    assert planning.restricted_providers(config.resources) == sky_managed.MANAGED_CLOUDS
    moved = load(path, {"sky.managed": True, "providers": ["vast", "runpod"]})
    with pytest.raises(planning.PlanError, match="resources.providers vast, runpod: none of them runs this job the way resources.sky asks"):
        planning.restricted_providers(moved.resources)


@pytest.mark.parametrize("status, code", [("SUCCEEDED", 0), ("CANCELLED", 143), ("FAILED_SETUP", 7),
                                          ("FAILED_NO_RESOURCE", 8), ("FAILED", 1)])
def test_every_ended_status_of_skypilot_has_an_exit_code(status, code):
    assert sky.jobs.ManagedJobStatus(status).is_terminal()
    assert sky_managed.ENDED[status] == code
    assert {s.value for s in sky.jobs.ManagedJobStatus.terminal_statuses()} == set(sky_managed.ENDED)
