"""The SkyPilot task and resources the sky provider builds, checked with SkyPilot's own classes and
catalog code (SkyPilot 0.14.1, reading the shipped catalog snapshots: tests/conftest.py), and the
cluster's keep-alive job run for real.

No cloud, no API server: sky.Task, sky.Resources and sky.catalog work in-process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import sky  # the [sky] extra: the README's test command and .ci/run install it  # noqa: E402

from launcher import catalog  # noqa: E402
from launcher.config import load  # noqa: E402
from launcher.paths import SHIPPED_CATALOGS  # noqa: E402
from launcher.providers.base import Offer  # noqa: E402
from launcher.providers.sky import SkySettings, sky_catalog_offers, snapshot_offers  # noqa: E402
from launcher.providers.sky_task import build_task, cluster_name, pinned_resources, task_config  # noqa: E402
from launcher import planning  # noqa: E402
from tests.helpers import ROOT  # noqa: E402

MISTRAL = ROOT / "configs" / "mistral-7b-qlora.yaml"


def plan_choice_for_a10g(spot: bool) -> Offer:
    """What `launch plan --config mistral-7b-qlora --gpu A10G --providers aws [--on-demand]` picks."""
    config = load(MISTRAL, {"gpu": "A10G", "interruptible": spot, "providers": ["aws"]})
    plan = planning.compute_plan(config, [], lambda text: None)
    assert plan.choice is not None
    return plan.rows[plan.choice].offer


def test_the_task_pins_skypilot_to_the_planned_offer():
    offer = plan_choice_for_a10g(spot=False)
    assert (offer.provider, offer.instance_type, offer.gpu) == ("aws", "g5.xlarge", "A10G")
    task = build_task(sky, offer, workdir="~/qlora-launch", watchdog_idle_s=1800, disk_gb=100, image_id=None)
    # SkyPilot's own parser accepts what we generate, and reads it back the same.
    again = sky.Task.from_yaml_config(task.to_yaml_config())
    for t in (task, again):
        (resources,) = t.resources
        assert str(resources.cloud) == "AWS" and resources.region == offer.region
        assert resources.instance_type == "g5.xlarge" and resources.accelerators == {"A10G": 1}
        assert resources.use_spot is False and resources.disk_size == 100
        assert t.num_nodes == 1
        assert t.envs["QLORA_WATCHDOG_ON_IDLE"] == "exit" and t.envs["QLORA_WATCHDOG_IDLE_S"] == "1800"
        assert all(Path(local).is_file() for local in t.file_mounts.values())
    # Priced by SkyPilot exactly as our plan priced it.
    assert task_cost(task) == pytest.approx(offer.usd_per_hour, abs=1e-9)


def test_a_spot_offer_and_several_nodes():
    offer = plan_choice_for_a10g(spot=True)
    task = build_task(sky, offer, workdir="/work", watchdog_idle_s=60, disk_gb=200, image_id=None, nodes=2)
    (resources,) = task.resources
    assert resources.use_spot is True and task.num_nodes == 2 and resources.disk_size == 200
    assert task.envs["QLORA_WORKDIR"] == "/work"
    assert task_cost(task) == pytest.approx(offer.usd_per_hour, abs=1e-9)


def task_cost(task) -> float:
    (resources,) = task.resources
    return resources.get_cost(3600)


@pytest.mark.parametrize("cloud", ["aws", "lambda"])
def test_every_offer_we_plan_with_is_priced_by_skypilot_as_we_price_it(cloud):
    ours = snapshot_offers(cloud, SHIPPED_CATALOGS)
    assert len(ours) > 300
    mismatched = []
    for offer in ours:
        resources = pinned_resources(sky, offer, disk_gb=100, image_id=None)
        if abs(resources.get_cost(3600) - offer.usd_per_hour) > 1e-9:
            mismatched.append((offer, resources.get_cost(3600)))
    assert mismatched == []
    # SkyPilot's catalog code lists the same offers from the same files (when it is installed,
    # the plan takes them from it: on a laptop with network its catalogs refresh themselves).
    key = lambda o: (o.region, o.instance_type, o.gpu, o.gpu_count, o.vram_gb, o.interruptible,  # noqa: E731
                     round(o.usd_per_hour, 6))
    assert sorted(map(key, sky_catalog_offers(cloud))) == sorted(map(key, ours))


@pytest.mark.parametrize("run_id", ["20261202-051900-tiny-cpu-ab12", "20261202-051900-deepseek-r1-distill-qwen-1.5b-qlora-9f3c",
                                    "20261202-051900-My_Job.v2-0a0a"])
def test_cluster_names_are_valid_for_skypilot_and_keep_the_run_apart(run_id):
    from sky.utils import common_utils

    name = cluster_name(run_id)
    common_utils.check_cluster_name_is_valid(name)  # raises on a name SkyPilot refuses
    assert name.startswith("qlora-") and len(name) <= 35
    assert name.endswith(run_id.rsplit("-", 1)[1]) and "20261202-051900" in name


def test_settings_refuse_a_cloud_we_do_not_rent_on_and_a_docker_image():
    with pytest.raises(ValueError, match="vast: not a cloud we rent on through SkyPilot"):
        SkySettings(clouds=["aws", "vast"])
    with pytest.raises(ValueError, match="docker images are not supported"):
        SkySettings(image_id="docker:nvcr.io/nvidia/pytorch:24.01-py3")


# ---- the keep-alive job, run for real --------------------------------------------------------------


def run_keep_alive(home: Path, idle_s: float, env_extra: dict | None = None) -> subprocess.Popen:
    config = task_config("~/qlora-launch", idle_s)
    for remote, local in config["file_mounts"].items():  # what SkyPilot's file mounts put on the node
        target = home / remote.removeprefix("~/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(Path(local).read_bytes())
    env = {"PATH": os.environ["PATH"], "HOME": str(home), **config["envs"], "SKYPILOT_NODE_RANK": "1",
           "SKYPILOT_NODE_IPS": "10.0.0.1\n10.0.0.2", "SKYPILOT_NUM_NODES": "2", "SKYPILOT_NUM_GPUS_PER_NODE": "8",
           **(env_extra or {})}
    return subprocess.Popen(["bash", "-c", config["run"]], env=env, cwd=home, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def test_the_keep_alive_job_writes_the_node_variables_and_ends_when_nothing_trains(tmp_path):
    job = run_keep_alive(tmp_path, idle_s=1)
    out, _ = job.communicate(timeout=30)
    assert job.returncode == 0, out
    assert "ending (the cluster's autostop follows)" in out
    node_env = (tmp_path / "qlora-launch" / ".node.env").read_text()
    shown = subprocess.run(["sh", "-c", f". {tmp_path}/qlora-launch/.node.env && "
                            "echo \"$SKYPILOT_NODE_RANK|$SKYPILOT_NUM_NODES|$SKYPILOT_NUM_GPUS_PER_NODE\" && "
                            "echo \"$SKYPILOT_NODE_IPS\" | head -n1"], capture_output=True, text=True)
    assert shown.stdout.split() == ["1|2|8", "10.0.0.1"], node_env
    assert (tmp_path / ".qlora-launch" / "guard.pid").read_text().strip().isdigit()


def test_the_keep_alive_job_runs_as_long_as_a_runner_trains(tmp_path):
    run_folder = tmp_path / "qlora-launch" / "runs" / "r1"  # where the launcher starts a runner
    run_folder.mkdir(parents=True)
    runner = run_folder / "qlora_runner.py"
    runner.write_text("import time\ntime.sleep(600)\n")
    training = subprocess.Popen([sys.executable, str(runner)], cwd=run_folder, start_new_session=True)
    job = run_keep_alive(tmp_path, idle_s=1)
    try:
        time.sleep(4)  # four idle windows: it would have ended without the runner
        assert job.poll() is None, "the keep-alive job ended while a runner trained: autodown would follow"
        training.send_signal(signal.SIGKILL)
        training.wait()
        out, _ = job.communicate(timeout=30)
        assert job.returncode == 0 and "ending" in out
    finally:
        for process in (training, job):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def test_catalog_rows_become_one_offer_per_region_at_the_cheapest_zone():
    rows = [r for r in catalog.read_rows("aws", SHIPPED_CATALOGS) if r.instance_type == "g5.xlarge"
            and r.region == "us-east-1"]
    assert len(rows) > 1  # one per availability zone in the file
    offers = [o for o in catalog.offers("aws", SHIPPED_CATALOGS) if o.instance_type == "g5.xlarge"
              and o.region == "us-east-1"]
    assert sorted(o.interruptible for o in offers) == [False, True]
    spot = next(o for o in offers if o.interruptible)
    assert spot.usd_per_hour == min(r.spot_usd_per_hour for r in rows if r.spot_usd_per_hour)
