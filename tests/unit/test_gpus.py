"""launcher/gpus.py: every name the markets use resolves to one GPU with the right facts."""

from __future__ import annotations

import pytest

from launcher import catalog, gpus
from tests.helpers import ROOT

CATALOGS = ROOT / "catalogs" / "v8"


@pytest.mark.parametrize("name, expected", [
    ("A10G", "A10G"), ("a10g", "A10G"), ("RTX4090", "RTX4090"), ("RTX 4090", "RTX4090"), ("4090", "RTX4090"),
    ("NVIDIA GeForce RTX 4090", "RTX4090"), ("RTX_4090", "RTX4090"), ("A100-80GB", "A100-80GB-SXM"),
    ("A100 SXM4 80GB", "A100-80GB-SXM"), ("A100", "A100-40GB"), ("H100", "H100 SXM"), ("H100 SXM", "H100 SXM"),
    ("h100-nvl", "H100 NVL"), ("T4", "T4"), ("Tesla T4", "T4"), ("P100", "P100"), ("RTXA6000", "RTX A6000"),
    ("RTX6000-Ada", "RTX 6000 Ada"), ("RTX6000", "Quadro RTX 6000"), ("L40S", "L40S"), ("V100", "V100-16GB"),
])
def test_market_names_resolve(name, expected):
    assert gpus.resolve(name).name == expected


def test_an_unknown_name_lists_near_matches():
    with pytest.raises(gpus.UnknownGPU, match=r"unknown GPU 'A10X'; did you mean A10.*\(known: T4, P100"):
        gpus.resolve("A10X")
    with pytest.raises(gpus.UnknownGPU, match=r"unknown GPU 'RTX 4909'; did you mean RTX4090"):
        gpus.resolve("RTX 4909")


@pytest.mark.parametrize("text, name, count", [("A10G", "A10G", 1), ("A10G:2", "A10G", 2), ("h100:8", "H100 SXM", 8)])
def test_gpu_requests_carry_a_count(text, name, count):
    gpu, n = gpus.parse_request(text)
    assert (gpu.name, n) == (name, count)


@pytest.mark.parametrize("text", ["A10G:0", "A10G:two", "A10G:-1"])
def test_a_bad_count_says_how_to_write_one(text):
    with pytest.raises(ValueError, match="as in A10G:2"):
        gpus.parse_request(text)


def test_no_alias_names_two_gpus_and_the_facts_are_sane():
    gpus._index()  # raises on an alias claimed twice
    for gpu in gpus.GPUS:
        assert 6 <= gpu.vram_gb <= 200 and 10 <= gpu.tflops_dense <= 2500 and 250 <= gpu.mem_bandwidth_gbs <= 8000
        assert gpu.source
    assert not gpus.resolve("T4").bf16 and gpus.resolve("A10G").bf16
    assert not gpus.resolve("MI300X").cuda and gpus.resolve("P100").cuda


@pytest.mark.parametrize("cloud", ["aws", "lambda", "vast"])
def test_every_gpu_in_the_real_catalogs_is_known(cloud):
    """Each catalog row's GPU resolves, and its memory per GPU (catalog.py's per-cloud reading)
    is the table's. Vast files variants under one name (an RTX 3060 Ti 8 GB as RTX3060, an H100
    NVL 94 GB as H100): there only the name has to resolve, and offers use the row's memory."""
    rows = list(catalog.read_rows(cloud, CATALOGS.parent))
    assert rows
    for row in rows:
        gpu = gpus.resolve(row.gpu_name)
        assert row.vram_gb_per_gpu is not None and (row.usd_per_hour is None or row.usd_per_hour > 0), row
        if cloud != "vast":
            assert row.vram_gb_per_gpu == pytest.approx(gpu.vram_gb, rel=0.1), (row, gpu)
    if cloud == "vast":  # the per-GPU reading of Vast's summed memory gives real card sizes
        sizes = {round(r.vram_gb_per_gpu) for r in rows if r.gpu_name == "RTX4090"}
        assert sizes == {24, 48}  # Vast's hosts rent 48 GB RTX 4090 conversions too
        assert {round(r.vram_gb_per_gpu) for r in rows if r.gpu_name == "H200"} == {140}


def test_catalog_prices_and_spot():
    aws = [r for r in catalog.read_rows("aws", CATALOGS.parent) if r.instance_type == "g5.xlarge"]
    assert aws and all(r.gpu_name == "A10G" and r.gpu_count == 1 and r.spot_usd_per_hour for r in aws)
    vast = list(catalog.read_rows("vast", CATALOGS.parent))
    assert all(r.spot_usd_per_hour is None for r in vast)  # Vast's catalog has no spot prices
