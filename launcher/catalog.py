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
