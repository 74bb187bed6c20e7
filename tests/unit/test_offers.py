"""Planning: the choice is the cheapest whole job among offers that can hold it, on generated
markets and on the real catalogs in catalogs/."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launcher import config as launch_config
from launcher import estimate, offers
from launcher.catalog import read_rows
from launcher.gpus import GPUS, resolve
from launcher.runs import MeasuredSpeed
from tests.helpers import ROOT

READY = ["mistral-7b-qlora", "llama-3.1-8b-qlora", "deepseek-r1-distill-qwen-1.5b-qlora"]


def need_of(name: str) -> offers.JobNeed:
    return offers.job_need(launch_config.load(ROOT / "configs" / f"{name}.yaml"))


def ready_config_with(tmp_path: Path, name: str, section: str, **values) -> Path:
    """A copy of a ready config with `values` set in `section` (its paths are hub ids: no folder to move)."""
    job = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
    job[section].update(values)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def random_market(rng: random.Random, size: int) -> list[offers.Offer]:
    cuda = [g for g in GPUS if g.cuda]
    market = []
    for _ in range(size):
        gpu = rng.choice(cuda)
        market.append(offers.Offer(provider=rng.choice(["vast", "aws", "lambda"]), region=None, gpu=gpu.name,
                                   gpu_count=rng.choice([1, 1, 1, 2, 4]), vram_gb=gpu.vram_gb,
                                   usd_per_hour=round(rng.uniform(0.05, 12), 3), interruptible=rng.random() < 0.5))
    return market


@pytest.mark.parametrize("seed", range(40))
def test_the_choice_is_the_cheapest_fitting_whole_job(seed):
    rng = random.Random(seed)
    need = need_of(rng.choice(READY))
    market = random_market(rng, rng.randint(1, 60))
    cap = rng.choice([None, 1.0, 3.0])
    rows, choice = offers.plan(market, need, offers.Constraints(max_usd_per_hour=cap))
    assert len(rows) == len(market)  # every offer appears, fitting or not
    feasible = [offers.evaluate(o, need) for o in market]
    feasible = [p for p in feasible if p.fits and (cap is None or p.offer.usd_per_hour <= cap)]
    if not feasible:
        assert choice is None
        return
    best = min(p.est_total_usd for p in feasible)  # brute force
    assert choice == 0 and rows[0].fits and rows[0].est_total_usd == pytest.approx(best)
    assert all(p.est_total_usd >= best - 1e-9 for p in rows if p.fits)


@pytest.mark.parametrize("name", READY)
def test_the_real_catalogs_give_a_sensible_plan(name):
    need = need_of(name)
    rows, choice = offers.plan(offers.catalog_offers(ROOT / "catalogs"), need, offers.Constraints())
    assert choice == 0
    chosen = rows[0]
    per_gpu = chosen.offer.vram_gb * chosen.offer.gpu_count
    assert need.vram_gb <= per_gpu * offers.VRAM_MARGIN
    assert 0 < chosen.est_hours < 200 and 0 < chosen.est_total_usd < 100
    # Nothing that fits is cheaper, and the near misses say why they miss.
    assert all(p.est_total_usd >= chosen.est_total_usd for p in rows if p.fits)
    assert all(p.why_not for p in rows if not p.fits)


def test_asking_for_a10g_finds_the_aws_g5_offers():
    need = need_of("mistral-7b-qlora")
    rows, choice = offers.plan(offers.catalog_offers(ROOT / "catalogs"), need,
                               offers.Constraints(gpu=resolve("A10G")))
    catalog_rows = [r for r in read_rows("aws", ROOT / "catalogs") if r.gpu_name == "A10G"]
    # One offer per instance type, region and market: a region's zones are one offer at the
    # cheapest zone's price, as SkyPilot prices a launch pinned to that region.
    markets = {(r.instance_type, r.region, spot) for r in catalog_rows
               for spot, price in ((False, r.usd_per_hour), (True, r.spot_usd_per_hour)) if price}
    assert len(rows) == len(markets) > 0
    cheapest_spot = min(r.spot_usd_per_hour for r in catalog_rows if r.spot_usd_per_hour)
    assert min(p.offer.usd_per_hour for p in rows if p.offer.interruptible) == cheapest_spot
    assert {p.offer.provider for p in rows} == {"aws"}
    assert all(p.offer.instance_type.startswith("g5.") for p in rows)
    assert choice == 0 and rows[0].fits


def test_more_gpus_hold_more_but_do_not_go_faster(tmp_path):
    # with the full logits (train.kernels: none) Llama-3.1-8B needs more than one T4's 16 GB
    need = offers.job_need(launch_config.load(ready_config_with(tmp_path, "llama-3.1-8b-qlora", "train", kernels="none")))
    one = offers.evaluate(offers.Offer("x", None, "T4", 1, 16, 0.5, False), need)
    two = offers.evaluate(offers.Offer("x", None, "T4", 2, 16, 1.0, False), need)
    assert not one.fits and two.fits and two.est_hours == pytest.approx(one.est_hours)


def test_keeping_the_logits_out_of_memory_puts_llama_8b_on_a_t4(tmp_path):
    """The ready config's fused loss (train.kernels: auto) frees 3 x 2048 tokens x 128k x 4 B of
    logits: the 16 GB T4 that held it only at micro batch 1 now holds it as it is."""
    fused = need_of("llama-3.1-8b-qlora")
    full = offers.job_need(launch_config.load(ready_config_with(tmp_path, "llama-3.1-8b-qlora", "train", kernels="none")))
    t4 = offers.Offer("x", None, "T4", 1, 16, 0.5, False)
    assert fused.fused_loss and not full.fused_loss
    assert offers.evaluate(t4, fused).fits and not offers.evaluate(t4, full).fits
    assert full.vram_gb - fused.vram_gb > 2.5


def test_a_measured_speed_calibrates_the_model_on_that_gpu_only():
    need = need_of("mistral-7b-qlora")
    a10g = offers.Offer("aws", None, "A10G", 1, 24, 1.0, False)
    # A record without its shape (written before the launcher kept it): its tokens/s is this job's.
    planned = offers.evaluate(a10g, need, [MeasuredSpeed("NVIDIA A10G", 2000.0)])
    assert planned.calibrated and planned.est_hours == pytest.approx(need.tokens / 2000 / 3600, rel=1e-3)
    assert not offers.evaluate(a10g, need, [MeasuredSpeed("NVIDIA L4", 2000.0)]).calibrated
    assert not offers.evaluate(a10g, need).calibrated


def test_a_speed_measured_at_one_shape_carries_over_to_another():
    """A step's fixed costs make tokens/s grow with the tokens per step: a run at 2 x 256 tokens
    that ran at 1.5x the model's speed for its shape predicts 1.5x the model's speed at 2 x 1024,
    not its own tokens/s."""
    config = launch_config.load(ROOT / "configs" / "mistral-7b-qlora.yaml")
    need = offers.job_need(config, example_tokens=[1024] * 1000)  # micro batch 2, every sequence at 1024 tokens
    a10g = offers.Offer("aws", None, "A10G", 1, 24, 1.0, False)
    gpu = resolve("A10G")
    short = estimate.model_tokens_per_s(need.facts, gpu, 2, 256.0, True)
    full = estimate.model_tokens_per_s(need.facts, gpu, 2, 1024.0, True)
    assert full > 1.5 * short  # what the H100 showed: speed grows with the tokens per step
    measured = [MeasuredSpeed("NVIDIA A10G", 1.5 * short, micro_batch=2, seq_tokens=256.0, gradient_checkpointing=True)]
    planned = offers.evaluate(a10g, need, measured)
    assert planned.calibrated
    assert need.tokens / (planned.est_hours * 3600) == pytest.approx(1.5 * full, rel=1e-3)
    # several runs: the median of their factors
    measured += [MeasuredSpeed("NVIDIA A10G", 1.0 * full, 2, 1024.0, True), MeasuredSpeed("NVIDIA A10G", 3.0 * full, 2, 1024.0, True)]
    assert need.tokens / (offers.evaluate(a10g, need, measured).est_hours * 3600) == pytest.approx(1.5 * full, rel=1e-3)


def test_short_local_examples_mean_more_steps(tmp_path):
    """Steps, and their fixed costs, follow the mean example length, not max_length."""
    config = launch_config.load(ROOT / "configs" / "mistral-7b-qlora.yaml")
    short = offers.job_need(config, example_tokens=[200] * 1000)
    assert short.seq_tokens == 200 and short.tokens == 1000 * 200 * 0.98
    assert offers.job_need(config, example_tokens=[5000] * 10).seq_tokens == 1024  # cut at max_length
    gpu = resolve("A10G")
    at_mean = estimate.estimate_hours(short.facts, gpu, 1, short.tokens, 200, 2, True)
    a10g = offers.Offer("aws", None, "A10G", 1, 24, 1.0, False)
    assert offers.evaluate(a10g, short).est_hours == pytest.approx(at_mean)
    assert at_mean > estimate.estimate_hours(short.facts, gpu, 1, short.tokens, 1024, 2, True)


def launch_plan(tmp_path, *args: str) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "QLORA_LAUNCH_HOME": str(tmp_path / "home"),
           "QLORA_LAUNCH_CATALOG_DIR": str(ROOT / "catalogs"), "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "launcher", "plan", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_plan_json_lists_every_row_of_the_gpu_and_marks_the_choice(tmp_path):
    proc = launch_plan(tmp_path, "--config", str(ROOT / "configs" / "mistral-7b-qlora.yaml"), "--gpu", "A10G",
                       "--json")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert set(plan) == {"need", "offers", "choice", "notes"}
    assert plan["need"]["vram_gb"] > 5 and plan["need"]["tokens"] > 0
    chosen = plan["offers"][plan["choice"]]
    assert chosen["fits"] and chosen["gpu"] == "A10G"
    keys = {"provider", "region", "gpu", "gpu_count", "vram_gb", "usd_per_hour", "interruptible", "est_hours",
            "est_total_usd", "fits"}
    assert all(keys <= set(o) for o in plan["offers"])
    fitting = [o["est_total_usd"] for o in plan["offers"] if o["fits"]]
    assert chosen["est_total_usd"] == min(fitting)


def test_no_fitting_offer_is_a_clear_error_naming_the_near_miss(tmp_path):
    config = ready_config_with(tmp_path, "llama-3.1-8b-qlora", "train", kernels="none")
    proc = launch_plan(tmp_path, "--config", str(config), "--gpu", "T4", "--on-demand")
    assert proc.returncode == 9
    error = proc.stderr.strip().splitlines()[-1]
    assert "no offer can hold this job" in error and "cheapest near miss is 1x T4 on aws" in error
    assert "smaller train.micro_batch_size" in error
    unknown = launch_plan(tmp_path, "--config", str(ROOT / "configs" / "tiny-cpu.yaml"), "--gpu", "A10X")
    assert unknown.returncode == 2 and "did you mean A10" in unknown.stderr


def test_a_price_cap_miss_suggests_raising_the_cap(tmp_path):
    proc = launch_plan(tmp_path, "--config", str(ROOT / "configs" / "mistral-7b-qlora.yaml"), "--gpu", "H100",
                       "--max-price", "0.5")
    assert proc.returncode == 9
    assert "above the $0.50/h cap. Try a higher --max-price" in proc.stderr


def test_launch_on_a_gpu_only_the_catalog_rents_says_so_and_starts_nothing(tmp_path):
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "QLORA_LAUNCH_HOME": str(tmp_path / "home"),
           "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-m", "launcher", "--config", str(ROOT / "configs" / "mistral-7b-qlora.yaml"),
                           "--gpu", "A10G", "--runs-dir", str(tmp_path / "runs")], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 2
    assert "the plan picks 1x A10G on aws" in proc.stderr and "cannot be rented from here" in proc.stderr
    assert "--target ssh://" in proc.stderr
    from launcher.runs import RunStore

    assert not (tmp_path / "runs").exists() and RunStore(tmp_path / "home" / "runs.sqlite").list() == []


def test_plan_prices_the_target_with_the_gpus_its_nvidia_smi_lists(tmp_path):
    """nvidia-smi cannot run here: a stand-in prints what it prints on a 2x A10G box."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "nvidia-smi"
    fake.write_text("#!/bin/sh\nprintf 'NVIDIA A10G, 23028\\nNVIDIA A10G, 23028\\n'\n")
    fake.chmod(0o755)
    config = ROOT / "configs" / "llama-3.1-8b-qlora.yaml"
    env = {"PYTHONPATH": str(ROOT), "PATH": f"{bin_dir}:/usr/bin:/bin", "QLORA_LAUNCH_HOME": str(tmp_path / "home"),
           "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "launcher", "plan", "--config", str(config), "--target", "local",
                           "--usd-per-hour", "0.4", "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    (local,) = [o for o in plan["offers"] if o["provider"] == "local"]
    assert (local["gpu"], local["gpu_count"], local["vram_gb"], local["usd_per_hour"]) == ("NVIDIA A10G", 2, 22.5, 0.4)
    assert local["fits"] and local["est_total_usd"] == pytest.approx((local["est_hours"] + 0.25) * 0.4, rel=1e-3)


# ---- data parallel: the job asked for several GPUs or nodes -------------------------------------


def test_asked_for_gpus_train_data_parallel_one_model_each_and_faster():
    need = need_of("mistral-7b-qlora")  # ~9.4 GB: fits one A10G
    one = offers.evaluate(offers.Offer("aws", "r", "A10G", 1, 22.35, 1.0, False), need)
    four = offers.evaluate(offers.Offer("aws", "r", "A10G", 4, 22.35, 5.0, False), need, data_parallel=True)
    assert four.fits
    assert four.est_hours == pytest.approx(one.est_hours / (4 * offers.DATA_PARALLEL_EFFICIENCY))
    assert four.est_total_usd == pytest.approx(estimate.estimate_usd(four.est_hours, 5.0))
    # Each rank holds the whole model: the GPUs' memory is not summed.
    big = need_of("llama-3.1-8b-qlora")  # ~16.6 GB
    t4s = offers.evaluate(offers.Offer("aws", "r", "T4", 4, 15.0, 1.0, False), big, data_parallel=True)
    assert not t4s.fits and "per GPU (each holds the model)" in t4s.why_not
    spread = offers.evaluate(offers.Offer("aws", "r", "T4", 4, 15.0, 1.0, False), big)  # not asked: spread
    assert spread.fits


def test_several_nodes_bill_each_node_and_rent_only_where_nodes_can_be_made():
    need = need_of("mistral-7b-qlora")
    two = offers.evaluate(offers.Offer("aws", "r", "A10G", 1, 22.35, 1.0, False), need, data_parallel=True, nodes=2)
    one = offers.evaluate(offers.Offer("aws", "r", "A10G", 1, 22.35, 1.0, False), need)
    assert two.est_hours == pytest.approx(one.est_hours / (2 * offers.MULTI_NODE_EFFICIENCY))
    assert two.est_total_usd == pytest.approx(estimate.estimate_usd(two.est_hours, 2.0))
    c = offers.Constraints(data_parallel=True, nodes=2, multi_node_markets=frozenset({"aws", "lambda"}))
    market = [offers.Offer("aws", "r", "A10G", 1, 22.35, 1.0, False), offers.Offer("runpod", "r", "A10G", 1, 22.35, 0.5,
                                                                                      False),
              offers.Offer("vast", "r", "A10G", 1, 22.35, 0.2, False)]
    rows, choice = offers.plan(market, need, c)
    assert rows[choice].offer.provider == "aws"
    assert {p.offer.provider: p.why_not for p in rows if not p.fits} == {
        "runpod": "one machine only, 2 nodes asked for", "vast": "one machine only, 2 nodes asked for"}
