"""launcher/estimate.py: the architecture arithmetic is checked against transformers and peft
themselves (models built on the meta device: no weights, no download), and against the
published parameter counts; the VRAM and time models behave as their formulas say, and come
within 20 % of the peaks and speeds our runner measured on GPUs (benchmarks/results/)."""

from __future__ import annotations

import json

import pytest

import yaml

from launcher import estimate
from launcher.gpus import resolve
from tests.helpers import ROOT, TINY_MODEL

# Parameter counts as published on each model's hub page (safetensors metadata).
PUBLISHED_PARAMS = {
    "mistralai/Mistral-7B-v0.3": 7_248_023_552,
    "meta-llama/Llama-3.1-8B-Instruct": 8_030_261_248,
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": 1_777_088_000,
}


@pytest.mark.parametrize("base", sorted(PUBLISHED_PARAMS))
def test_parameter_counts_match_the_published_ones(base):
    assert estimate.model_facts(base).total_params == PUBLISHED_PARAMS[base]


def _meta_model(config: dict):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.for_model(**config)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config)


@pytest.mark.parametrize("base", sorted(PUBLISHED_PARAMS) + ["tiny"])
def test_counts_match_the_model_transformers_builds(base):
    config = (json.loads((TINY_MODEL / "config.json").read_text()) if base == "tiny"
              else json.loads(estimate.FACTS_FILE.read_text())[base])
    facts = estimate.ModelFacts.from_config(config)
    model = _meta_model(config)
    assert sum(p.numel() for p in model.parameters()) == facts.total_params
    import torch

    linear = sum(m.weight.numel() for name, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and name != "lm_head")
    assert linear == facts.linear_params  # exactly what bitsandbytes quantizes


def test_lora_count_matches_peft_all_linear():
    from peft import LoraConfig, get_peft_model

    config = json.loads((TINY_MODEL / "config.json").read_text())
    model = get_peft_model(_meta_model(config), LoraConfig(r=8, target_modules="all-linear"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == estimate.ModelFacts.from_config(config).lora_params(8)


def vram(**overrides):
    args = dict(micro_batch=2, seq_len=1024, lora_r=16, lora_dropout=0.05, gradient_checkpointing=True)
    return estimate.estimate_vram(estimate.model_facts("mistralai/Mistral-7B-v0.3"), **{**args, **overrides})


def test_vram_grows_with_batch_and_length_and_shrinks_with_checkpointing():
    base = vram().total_gb
    assert vram(micro_batch=4).total_gb > base and vram(seq_len=2048).total_gb > base
    assert vram(gradient_checkpointing=False).total_gb > base + 10  # a 7B model's activations without it
    assert vram(lora_r=64).lora_gb == pytest.approx(4 * vram().lora_gb)
    # Double quantization saves 0.373 bit per quantized weight (the QLoRA paper's figure).
    facts = estimate.model_facts("mistralai/Mistral-7B-v0.3")
    saved = vram(double_quant=False).weights_4bit_gb - vram().weights_4bit_gb
    assert saved == pytest.approx(facts.linear_params * 0.373 / 8 / 1e9)


def test_a_fused_loss_keeps_one_chunk_of_logits_and_the_hidden_states_gradient():
    """DeepSeek-R1-Distill-Qwen's 152k vocabulary at 2 x 1024 tokens: 3.7 GB of logits, their
    float copy and gradient with the model's own loss; at most two 256 MiB chunks and the last
    hidden states' gradient with ours or Liger's. Nothing else in the estimate changes."""
    facts = estimate.model_facts("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B")
    args = dict(micro_batch=2, seq_len=1024, lora_r=16, lora_dropout=0.05, gradient_checkpointing=True)
    full = estimate.estimate_vram(facts, **args)
    fused = estimate.estimate_vram(facts, fused_loss=True, **args)
    assert full.logits_gb == pytest.approx(3 * 2048 * 151_936 * 4 / 1e9) and full.logits_gb > 3.7
    assert fused.logits_gb == pytest.approx((2 * 256 * 2**20 + 2048 * facts.hidden_size * 2) / 1e9)
    assert full.tensors_gb - fused.tensors_gb == pytest.approx(full.logits_gb - fused.logits_gb)
    tiny = estimate.estimate_vram(facts, fused_loss=True, **{**args, "micro_batch": 1, "seq_len": 64})
    assert tiny.logits_gb == pytest.approx((2 * 64 * 151_936 * 4 + 64 * facts.hidden_size * 2) / 1e9)  # under a chunk


def test_padding_free_batches_size_memory_by_their_tokens_and_time_by_no_padding(monkeypatch):
    # the same tokens as one row, and the row's mask: bool + a bf16 copy for the one layer checkpointing keeps
    assert vram(peak_tokens=900).activations_gb == pytest.approx(
        vram(micro_batch=1, seq_len=900).activations_gb + 900 ** 2 * 3 / 1e9)
    unkept = vram(peak_tokens=900, gradient_checkpointing=False).activations_gb
    assert unkept == pytest.approx(vram(micro_batch=1, seq_len=900, gradient_checkpointing=False).activations_gb
                                   + 900 ** 2 * (1 + 2 * 32) / 1e9)  # every layer keeps its copy
    facts = estimate.model_facts("mistralai/Mistral-7B-v0.3")
    args = dict(tokens=10_000_000, seq_len=300.0, micro_batch=2, gradient_checkpointing=True)
    free = estimate.estimate_hours(facts, resolve("A10G"), 1, **args)
    padded = estimate.estimate_hours(facts, resolve("A10G"), 1, padded_seq_len=450.0, **args)
    assert free < padded < 1.5 * free  # the padding's FLOPs; the per-layer fixed costs stay per micro step
    assert estimate.estimate_hours(facts, resolve("A10G"), 1, padded_seq_len=300.0, **args) == pytest.approx(free)
    monkeypatch.setattr(estimate, "LAYER_PASS_OVERHEAD_S", 0.0)  # the FLOPs alone: rows a half longer
    flops_only = estimate.estimate_hours(facts, resolve("A10G"), 1, padded_seq_len=450.0, **args) / \
        estimate.estimate_hours(facts, resolve("A10G"), 1, **args)
    assert 1.5 < flops_only < 1.52  # (and attention's share grows with the row)
    # padding-free: one row of the micro batch, its attention over the whole row (SDPA's mask)
    packed = estimate.estimate_hours(facts, resolve("A10G"), 1, packed_rows=True, **args)
    assert packed / estimate.estimate_hours(facts, resolve("A10G"), 1, **args) == pytest.approx(
        estimate.training_flops(facts, 10_000_000, 600, True) / estimate.training_flops(facts, 10_000_000, 300, True))


def test_a_7b_qlora_job_fits_the_gpus_users_rent_for_it():
    """Mistral-7B, micro batch 2 x 1024 tokens, r 16, checkpointing: the QLoRA paper's point is
    that this fits a 16 GB T4 and a 24 GB A10G; without checkpointing it does not fit 24 GB."""
    assert vram().total_gb < 16
    assert vram(gradient_checkpointing=False).total_gb > 24


def test_hours_follow_the_gpu_and_a_measured_rate_wins():
    facts = estimate.model_facts("mistralai/Mistral-7B-v0.3")
    args = dict(tokens=10_000_000, seq_len=1024, micro_batch=2, gradient_checkpointing=True)
    a10g = estimate.estimate_hours(facts, resolve("A10G"), 1, **args)
    h100 = estimate.estimate_hours(facts, resolve("H100"), 1, **args)
    # Both compute-bound: the fixed per-layer part is the same on both, the FLOPs part scales with 1/TFLOP/s.
    flops = estimate.training_flops(facts, args["tokens"], 1024, True)
    assert (a10g - h100) * 3600 == pytest.approx(flops / estimate.EFFICIENCY / 1e12 * (1 / 70 - 1 / 989.5))
    fixed_s = -(-args["tokens"] // 2048) * 3 * facts.num_layers * estimate.LAYER_PASS_OVERHEAD_S
    assert h100 * 3600 == pytest.approx(flops / (989.5e12 * estimate.EFFICIENCY) + fixed_s)
    assert estimate.estimate_hours(facts, resolve("A10G"), 2, **args) == pytest.approx(a10g / 2)
    assert estimate.estimate_hours(facts, resolve("A10G"), 1, speed=2.0, **args) == pytest.approx(a10g / 2)
    assert estimate.model_tokens_per_s(facts, resolve("A10G"), 2, 1024, True) == pytest.approx(
        args["tokens"] / (a10g * 3600), rel=1e-3)
    assert estimate.estimate_usd(2.0, 1.5) == pytest.approx((2.0 + estimate.STARTUP_HOURS) * 1.5)


def test_memory_bandwidth_floors_the_time():
    facts = estimate.model_facts("mistralai/Mistral-7B-v0.3")
    fast_compute = resolve("H100")
    import dataclasses

    absurd = dataclasses.replace(fast_compute, tflops_dense=1e9)  # compute is free: bandwidth decides
    hours = estimate.estimate_hours(facts, absurd, 1, 1024 * 2 * 100, 1024, 2, True)
    floor = 100 * 3 * facts.linear_params * (0.5 + 4) / (absurd.mem_bandwidth_gbs * 1e9)
    fixed = 100 * 3 * facts.num_layers * estimate.LAYER_PASS_OVERHEAD_S
    assert hours * 3600 == pytest.approx(floor + fixed)


def test_an_unknown_hub_model_says_what_to_do():
    with pytest.raises(estimate.UnknownModel, match="use a local model folder, or one of: deepseek-ai"):
        estimate.model_facts("someone/unknown-model")
    assert estimate.model_facts("tiny/model", str(TINY_MODEL)).hidden_size == 128


def test_loaded_4bit_model_memory_matches_a_published_measurement():
    """The loaded-model part of the estimate against a published measurement: IBM's
    fms-acceleration A100 benchmark references (github.com/foundation-model-stack/fms-acceleration,
    scripts/benchmarks/refs/a100_80gb.csv) record torch_mem_alloc_in_bytes after loading
    mistralai/Mistral-7B-v0.1 in bitsandbytes NF4 with torch_dtype float16: 4,843,384,320 bytes
    (accelerated-peft-bnb) and 5,368,221,184 (baseline-peft-bnb). Our 4-bit weights (single
    quantization constants) plus the fp16 embeddings, head and norms must be within 20 % of both.
    The training peak in that file cannot be compared: its sequence lengths follow the data."""
    v01 = estimate.ModelFacts.from_config({
        "model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000})
    est = estimate.estimate_vram(v01, micro_batch=1, seq_len=1, lora_r=16, lora_dropout=0.0,
                                 gradient_checkpointing=True, double_quant=False)
    loaded_gb = est.weights_4bit_gb + v01.other_params * 2 / 1e9
    for measured in (4_843_384_320, 5_368_221_184):
        assert loaded_gb == pytest.approx(measured / 1e9, rel=0.20)


# Our runner, measured: benchmarks/gpu_memory.py ran runner/qlora_runner.py with real NF4 on
# random-weight models of the ready configs' shapes, every sequence filled to max_length.
# gpu_memory_h100.json: an H100 80GB HBM3 (torch 2.11 + CUDA 13.0, transformers 5.24.0, peft
# 0.21.2, bitsandbytes 0.50.2), the configs as shipped and three variants; the allocator
# reserve, CUDA context and time constants were fitted on these. gpu_memory_h200_heldout.json:
# an H200, five other micro batch x sequence length x checkpointing cases, estimated before
# they were measured. The device peak is NVML's memory in use less the idle baseline.
MEASURED = [(name, r) for name in ("gpu_memory_h100.json", "gpu_memory_h200_heldout.json")
            for r in json.loads((ROOT / "benchmarks" / "results" / name).read_text())]


def _estimate_for(case: dict) -> tuple[estimate.ModelFacts, estimate.VRAMEstimate]:
    job = yaml.safe_load((ROOT / "configs" / case["config"]).read_text())
    facts = estimate.model_facts(job["model"]["base"])
    return facts, estimate.estimate_vram(
        facts, micro_batch=case["micro_batch"], seq_len=case["seq_len"], lora_r=job["lora"]["r"],
        lora_dropout=job["lora"]["dropout"], gradient_checkpointing=case["gradient_checkpointing"])


def _case_id(item) -> str:
    name, r = item
    c = r["case"]
    return f"{name.split('_')[2].split('.')[0]}-{c['config'].split('-qlora')[0]}-s{c['seq_len']}-b{c['micro_batch']}-gc{int(c['gradient_checkpointing'])}"


@pytest.mark.parametrize("item", MEASURED, ids=_case_id)
def test_vram_estimate_is_within_20_percent_of_the_measured_peak(item):
    _, r = item
    assert r["ok"], r["error"]
    _, est = _estimate_for(r["case"])
    assert est.total_gb == pytest.approx(r["device_peak_gb"], rel=0.20)
    assert est.tensors_gb == pytest.approx(r["alloc_gb"], rel=0.20)  # the tensors alone, too


@pytest.mark.parametrize("item", MEASURED, ids=_case_id)
def test_time_estimate_is_within_25_percent_of_the_measured_speed(item):
    _, r = item
    c = r["case"]
    facts, _ = _estimate_for(c)
    modelled = estimate.model_tokens_per_s(facts, resolve(r["gpu"]), c["micro_batch"], c["seq_len"],
                                           c["gradient_checkpointing"])
    assert modelled == pytest.approx(r["tokens_per_s"], rel=0.25)


def test_every_ready_config_model_was_measured_at_its_sequence_length():
    """Each ready config's model, at its shipped max_length and checkpointing. (The DeepSeek config
    was measured at micro batch 4, 14.1 GB, and then moved to micro batch 2 to leave a 16 GB T4
    room: its shipped micro batch itself is estimated, not measured.)"""
    shipped = {p.name for p in (ROOT / "configs").glob("*-qlora.yaml")}
    measured = set()
    for _, r in MEASURED:
        job = yaml.safe_load((ROOT / "configs" / r["case"]["config"]).read_text())
        c = r["case"]
        if (c["seq_len"], c["gradient_checkpointing"]) == (job["data"]["max_length"], job["train"]["gradient_checkpointing"]):
            measured.add(c["config"])
    assert measured == shipped
