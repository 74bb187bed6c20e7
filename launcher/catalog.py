"""SkyPilot's price catalogs (`v8/<cloud>/vms.csv`), read as typed rows.

`QLORA_LAUNCH_CATALOG_DIR=<dir with v8/<cloud>/vms.csv>` names the folder (the repository's
catalogs/ holds real snapshots); nothing here touches the network.

The catalogs disagree on what GpuInfo's memory means, so each row's memory per GPU is worked out
per cloud (checked against the real files in tests/unit/test_gpus.py):
- aws and lambda: `Gpus[0].MemoryInfo.SizeInMiB` is one GPU's memory (lambda's
  `TotalGpuMemoryInMiB` is one GPU's too, aws's is the sum);
- vast: `Gpus[0].MemoryInfo.SizeInMiB` is the sum over the row's GPUs.
Vast also files variants under one name (an RTX 3060 Ti 8 GB as RTX3060, an H100 NVL as H100),
so a row's own memory, not the GPU table's, is what a job must fit in."""

from __future__ import annotations

import ast
import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from launcher.providers.base import Offer

MEMORY_IS_SUMMED = {"vast"}  # clouds whose GpuInfo memory is the row's total


@dataclass(frozen=True)
class CatalogRow:
    cloud: str
    instance_type: str
    gpu_name: str  # the catalog's AcceleratorName
    gpu_count: int
    vram_gb_per_gpu: Optional[float]  # None when the row does not say
    usd_per_hour: Optional[float]  # None: no on-demand price (aws lists some capacity-block-only types)
    spot_usd_per_hour: Optional[float]  # None: no spot market for this row
    region: Optional[str]


def catalog_dir() -> Optional[Path]:
    value = os.environ.get("QLORA_LAUNCH_CATALOG_DIR")
    return Path(value).expanduser() if value else None


def read_rows(cloud: str, folder: Path) -> Iterator[CatalogRow]:
    """GPU rows of `folder/v8/<cloud>/vms.csv` (CPU-only rows are skipped)."""
    path = folder / "v8" / cloud / "vms.csv"
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            name = (row.get("AcceleratorName") or "").strip()
            if not name:
                continue
            count = int(float(row["AcceleratorCount"]))
            yield CatalogRow(
                cloud=cloud, instance_type=row["InstanceType"], gpu_name=name, gpu_count=count,
                vram_gb_per_gpu=_memory_per_gpu_gb(cloud, row.get("GpuInfo") or "", count),
                usd_per_hour=_price(row.get("Price")), spot_usd_per_hour=_price(row.get("SpotPrice")),
                region=row.get("Region") or None,
            )


def region_rows(cloud: str, folder: Path) -> list[CatalogRow]:
    """One row per instance type and region, as SkyPilot prices a launch pinned to a region: the
    cheapest of its zones (aws lists each availability zone with its own spot price)."""
    best: dict[tuple[str, Optional[str]], CatalogRow] = {}
    for row in read_rows(cloud, folder):
        key = (row.instance_type, row.region)
        seen = best.get(key)
        if seen is None:
            best[key] = row
            continue
        best[key] = CatalogRow(
            cloud=cloud, instance_type=row.instance_type, gpu_name=row.gpu_name, gpu_count=row.gpu_count,
            vram_gb_per_gpu=seen.vram_gb_per_gpu or row.vram_gb_per_gpu,
            usd_per_hour=_lowest(seen.usd_per_hour, row.usd_per_hour),
            spot_usd_per_hour=_lowest(seen.spot_usd_per_hour, row.spot_usd_per_hour), region=row.region)
    return list(best.values())


def offers(cloud: str, folder: Path) -> list[Offer]:
    """The cloud's GPU offers: each instance type and region once on demand, and once as spot
    where it is sold so."""
    return [offer for row in region_rows(cloud, folder) for offer in market_offers(
        cloud, row.region, row.instance_type, row.gpu_name, row.gpu_count, row.vram_gb_per_gpu,
        row.usd_per_hour, row.spot_usd_per_hour)]


def market_offers(cloud: str, region: Optional[str], instance_type: str, gpu: str, gpu_count: int,
                  vram_gb: Optional[float], usd_per_hour: Optional[float],
                  spot_usd_per_hour: Optional[float]) -> list[Offer]:
    """One machine of a price list as offers: once on demand, once as spot, each where it is sold
    so (a price that is missing, zero or NaN is not)."""
    return [Offer(provider=cloud, region=region, gpu=gpu, gpu_count=gpu_count, vram_gb=vram_gb,
                  usd_per_hour=float(price), interruptible=spot, instance_type=instance_type)
            for price, spot in ((usd_per_hour, False), (spot_usd_per_hour, True))
            if price and price == price and price > 0]


def _lowest(a: Optional[float], b: Optional[float]) -> Optional[float]:
    prices = [p for p in (a, b) if p is not None]
    return min(prices) if prices else None


def _memory_per_gpu_gb(cloud: str, gpu_info: str, count: int) -> Optional[float]:
    try:
        info = ast.literal_eval(gpu_info) if gpu_info else None
        mib = float(info["Gpus"][0]["MemoryInfo"]["SizeInMiB"])
    except (ValueError, SyntaxError, KeyError, IndexError, TypeError):
        return None
    if cloud in MEMORY_IS_SUMMED:
        mib /= max(count, 1)
    return round(mib / 1024, 2)


def _price(value: Optional[str]) -> Optional[float]:
    """A positive price, or None: empty cells and vast's SpotPrice 0.00 mean "not sold so"."""
    try:
        price = float(value) if value else 0.0
    except ValueError:
        return None
    return price if price > 0 else None
