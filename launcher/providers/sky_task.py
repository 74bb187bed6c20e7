"""The SkyPilot task of a cluster: cluster_templates/sky_task.yaml with its resources pinned to
the offer the plan chose, so SkyPilot rents exactly what we priced (its optimizer is left one
choice). Pure functions over the `sky` module: the tests check the result with SkyPilot's own
classes and catalog."""

from __future__ import annotations

import re
from typing import Any, Optional

import yaml

from launcher.paths import CLUSTER_TEMPLATES
from launcher.providers.base import Offer

TEMPLATE = CLUSTER_TEMPLATES / "sky_task.yaml"
CLUSTER_PREFIX = "qlora-"  # every cluster we launch: `launch down --all` lists them by it
# SkyPilot's rule for cluster names (sky/utils/common_utils.py check_cluster_name_is_valid):
# lowercase letters, digits and dashes, starting with a letter; some clouds cap the length.
MAX_CLUSTER_NAME = 35


def cluster_name(run_id: str) -> str:
    """qlora-<run id>, in SkyPilot's alphabet; the run id's tail (time and random part) kept."""
    body = re.sub(r"[^a-z0-9-]+", "-", run_id.lower()).strip("-")
    name = f"{CLUSTER_PREFIX}{body}"
    if len(name) > MAX_CLUSTER_NAME:
        # The date-time and the random suffix tell runs apart; the config's stem is cut from the middle.
        parts = body.split("-")
        head, tail = "-".join(parts[:2]), parts[-1]
        name = f"{CLUSTER_PREFIX}{head}-{tail}"[:MAX_CLUSTER_NAME]
    return name.rstrip("-")


def task_config(workdir: str, watchdog_idle_s: float, nodes: int = 1) -> dict[str, Any]:
    """The template as a dict, with our environment and the file mounts made absolute."""
    config = yaml.safe_load(TEMPLATE.read_text())
    config["envs"] = {**config.get("envs", {}), "QLORA_WORKDIR": workdir,
                      "QLORA_WATCHDOG_IDLE_S": str(int(watchdog_idle_s))}
    config["file_mounts"] = {remote: str(CLUSTER_TEMPLATES / local) for remote, local in config["file_mounts"].items()}
    if nodes > 1:
        config["num_nodes"] = nodes
    return config


def pinned_resources(sky: Any, offer: Offer, *, disk_gb: int, image_id: Optional[str], any_region: bool = False) -> Any:
    """sky.Resources of exactly this offer: cloud and region, instance type, its GPUs, its market.
    `any_region`: the region left open (a managed job's recovery may then come back in another)."""
    infra = f"{offer.provider}/{offer.region}" if offer.region and not any_region else offer.provider
    return sky.Resources(infra=infra, instance_type=offer.instance_type,
                         accelerators={str(offer.gpu): offer.gpu_count or 1}, use_spot=offer.interruptible,
                         disk_size=disk_gb, image_id=image_id)


def build_task(sky: Any, offer: Offer, *, workdir: str, watchdog_idle_s: float, disk_gb: int,
               image_id: Optional[str], nodes: int = 1) -> Any:
    task = sky.Task.from_yaml_config(task_config(workdir, watchdog_idle_s, nodes))
    task.set_resources(pinned_resources(sky, offer, disk_gb=disk_gb, image_id=image_id))
    return task
