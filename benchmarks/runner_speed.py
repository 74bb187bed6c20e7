#!/usr/bin/env python3
"""Tokens/s, peak memory and MFU of the same QLoRA job four ways, on one GPU, in one run.

    python benchmarks/runner_speed.py                          # every ready config, both length mixes
    python benchmarks/runner_speed.py --configs mistral-7b-qlora.yaml --steps 30 --json speed.json
    python benchmarks/runner_speed.py --smoke                  # the plumbing on the CPU, tiny shapes

  (a) plain    a transformers Trainer + peft + bitsandbytes script written as the libraries' docs
               show (benchmarks/plain_trainer.py): padded micro batches, the model's own loss.
  (b) runner   our runner with train.kernels: none and data.packing: false: the runner as it
               shipped before it kept the logits out of memory.
  (c) fast     our runner as it ships: train.kernels auto (Liger's kernels when liger-kernel is
               installed, else our chunked loss) and data.packing auto (padding-free where a
               packed row costs fewer FLOPs than the padding it removes; the runner logs which).
  (d) unsloth  Unsloth's FastLanguageModel on the same job (plain_trainer.py --unsloth), where it
               installs; skipped with the reason where it does not.

Each config's shapes (model from launcher/model_facts.json with random weights, its LoRA, micro
batch, gradient checkpointing and max_length), as benchmarks/gpu_memory.py builds them, on two
length mixes: "max" (every sequence cut at max_length: no padding to save) and "mix" (lengths
drawn from the shipped statistics of the config's dataset for its model, benchmarks' stand-in
for real data, where padding costs). Measured per variant: tokens/s (the examples' own tokens,
the median step after the first 3), device peak GB (NVML, less the idle baseline) and MFU
(6 x parameters x tokens/s over the GPU's dense bf16 peak from launcher/gpus.py). The goal
(issue 16): (c) >= 1.5x (a)'s tokens/s at <= 0.75x its peak, and within 20 % of (d).

Needs a CUDA GPU, the runner's requirements, nvidia-ml-py, and for (c) at its best liger-kernel;
no network.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_memory as gm  # noqa: E402  (the model, data and NVML pieces)

from launcher import estimate, gpus  # noqa: E402

PLAIN = gm.ROOT / "benchmarks" / "plain_trainer.py"
DATASET_FACTS = gm.ROOT / "launcher" / "dataset_facts.json"


@dataclass(frozen=True)
class Variant:
    key: str
    what: str
    kind: str  # "plain", "runner" or "unsloth"
    kernels: str = "none"
    packing: Any = False


VARIANTS = (
    Variant("a", "plain Trainer + peft + bitsandbytes", "plain"),
    Variant("b", "our runner, kernels none, padded", "runner", "none", False),
    Variant("c", "our runner as shipped (kernels and packing auto)", "runner", "auto", "auto"),
    Variant("d", "Unsloth", "unsloth"),
)


@dataclass
class Row:
    config: str
    mix: str
    variant: str
    tokens_per_s: Optional[float] = None
    peak_gb: Optional[float] = None
    mfu: Optional[float] = None
    skipped: Optional[str] = None
    extra: dict = field(default_factory=dict)


def length_counts(config: str) -> list[tuple[int, int]]:
    """(length, examples) of the config's dataset for its model from the shipped statistics;
    alpaca-cleaned's for Mistral where the config's dataset has none (UltraChat)."""
    job = gm.read_job(config)
    datasets = json.loads(DATASET_FACTS.read_text())["datasets"]
    fallback = next(d for d in datasets if d["path"] == "yahma/alpaca-cleaned")["lengths"]["mistralai/Mistral-7B-v0.3"]
    for entry in datasets:
        if entry["path"] == job["data"]["path"] and entry.get("lengths"):
            return [tuple(c) for c in entry["lengths"].get(job["model"]["base"], fallback)["counts"]]
    return [tuple(c) for c in fallback["counts"]]


def write_mixed_data(path: Path, examples: int, seq_len: int, counts: list[tuple[int, int]], seed: int = 0) -> None:
    """Examples whose lengths follow `counts` (a word of gpu_memory.WORDS is about one token of the tiny tokenizer)."""
    rng = random.Random(seed)
    lengths, weights = zip(*counts)
    with path.open("w") as f:
        for i in range(examples):
            words = max(2, min(rng.choices(lengths, weights)[0], seq_len + 16) - 12)  # ~12 tokens of prompt
            output = " ".join(rng.choice(gm.WORDS) for _ in range(words))
            f.write(json.dumps({"instruction": f"Tell me about animal {i}.", "input": "", "output": output}) + "\n")


def run_child(cmd: list[str], watch: Optional[gm.GPUMemoryWatch], timeout_s: float) -> tuple[int, str, Optional[float]]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        with watch or gm.contextlib.nullcontext():
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return 124, f"timed out after {timeout_s:.0f} s", None
    tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-4:])
    return proc.returncode, tail, round(watch.peak_gb, 3) if watch else None


def median_rate(rates: list[float]) -> Optional[float]:
    rates = rates[gm.WARMUP_STEPS:] or rates
    return round(statistics.median(rates), 1) if rates else None


def measure(variant: Variant, job_file: Path, case_dir: Path, watch: Optional[gm.GPUMemoryWatch],
            timeout_s: float, cuda: bool) -> tuple[Optional[float], Optional[float], Optional[str]]:
    """(tokens/s, device peak GB, why it was skipped or failed)."""
    out = case_dir / variant.key
    if variant.kind == "unsloth":
        if not cuda:
            return None, None, "Unsloth needs a CUDA GPU"
        if importlib.util.find_spec("unsloth") is None:
            return None, None, "unsloth is not installed here (pip install unsloth)"
    if variant.kind == "runner":
        job = yaml.safe_load(job_file.read_text())
        job["train"]["kernels"], job["data"]["packing"] = variant.kernels, variant.packing
        job_file = case_dir / f"job-{variant.key}.yaml"
        job_file.write_text(yaml.safe_dump(job, sort_keys=False))
        cmd = [sys.executable, str(gm.RUNNER), "--config", str(job_file), "--out", str(out)]
    else:
        cmd = [sys.executable, str(PLAIN), str(job_file), str(out)] + (["--unsloth"] if variant.kind == "unsloth" else [])
    code, tail, peak = run_child(cmd, watch, timeout_s)
    if code != 0:
        return None, peak, f"exit {code}: {tail[-400:]}"
    if variant.kind == "runner":
        train, _ = gm.read_metrics(out)
        rates = [r["tokens_per_s"] for r in train]
    else:
        rates = [s["tokens_per_s"] for s in json.loads((out / "speed.json").read_text())["steps"]]
    return median_rate(rates), peak, None


def mfu(tokens_per_s: Optional[float], params: int, gpu: Optional[gpus.GPU]) -> Optional[float]:
    if not tokens_per_s or gpu is None:
        return None
    return round(6 * params * tokens_per_s / (gpu.tflops_dense * 1e12), 4)


def print_table(rows: list[Row], gpu_name: str) -> None:
    print(f"\n{'config':<34} {'mix':<4} {'variant':<52} {'tok/s':>8} {'vs (a)':>7} {'peak GB':>8} {'vs (a)':>7} {'MFU':>6}")
    for r in rows:
        base = next((b for b in rows if (b.config, b.mix) == (r.config, r.mix) and b.variant.startswith("(a)")), None)
        speed = r.tokens_per_s / base.tokens_per_s if base and base.tokens_per_s and r.tokens_per_s else None
        memory = r.peak_gb / base.peak_gb if base and base.peak_gb and r.peak_gb else None
        print(f"{r.config:<34} {r.mix:<4} {r.variant:<52} {gm._fmt(r.tokens_per_s, '8.0f'):>8} "
              f"{gm._fmt(speed, '7.2f'):>7} {gm._fmt(r.peak_gb, '8.2f'):>8} {gm._fmt(memory, '7.2f'):>7} "
              f"{gm._fmt(r.mfu, '6.3f'):>6}{'  ' + r.skipped if r.skipped else ''}")
    print(f"GPU: {gpu_name}. Goal: (c) >= 1.50x (a)'s tok/s, <= 0.75x its peak, within 20 % of (d)'s tok/s.")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--configs", nargs="+", default=list(gm.READY_CONFIGS), help="file names under configs/")
    parser.add_argument("--mixes", nargs="+", choices=("max", "mix"), default=["max", "mix"])
    parser.add_argument("--variants", nargs="+", choices=[v.key for v in VARIANTS], default=[v.key for v in VARIANTS])
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per variant (default 30)")
    parser.add_argument("--case-timeout-s", type=float, default=900)
    parser.add_argument("--json", type=Path, help="also write the rows here (after every variant)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the plumbing, measures nothing")
    args = parser.parse_args(argv)
    cuda = not args.smoke
    device = "cuda" if cuda else "cpu"
    watch = gm.GPUMemoryWatch() if cuda else None
    gpu_name = watch.name if watch else "cpu (smoke)"
    try:
        gpu = gpus.resolve(gpu_name) if cuda else None
    except gpus.UnknownGPU:
        gpu = None
    rows: list[Row] = []
    work = gm.scratch_dir(40)
    print(f"runner_speed: {gpu_name}, {args.steps} steps per variant, in {work}", flush=True)
    for config in args.configs:
        job = gm.read_job(config)
        facts = gm.model_facts_dict(job["model"]["base"], args.smoke)
        params = estimate.ModelFacts.from_config(facts).total_params
        seq = 64 if args.smoke else job["data"]["max_length"]
        case = gm.Case(config, seq, job["train"]["micro_batch_size"], job["train"]["gradient_checkpointing"])
        model_dir = work / config / "model"
        gm.make_model(facts, model_dir, device, seq)
        for mix in args.mixes:
            case_dir = work / config / mix
            case_dir.mkdir(parents=True)
            data_file = case_dir / "data.jsonl"
            examples = args.steps * case.micro_batch + case.micro_batch
            if mix == "max":
                gm.write_data(data_file, examples, seq)
            else:
                write_mixed_data(data_file, examples, seq, length_counts(config))
            job_file = case_dir / "job.yaml"
            gm.write_job(case, model_dir, data_file, job_file, args.steps, device)
            for variant in (v for v in VARIANTS if v.key in args.variants):
                started = time.time()
                rate, peak, why = measure(variant, job_file, case_dir, watch, args.case_timeout_s, cuda)
                row = Row(config, mix, f"({variant.key}) {variant.what}", rate, peak, mfu(rate, params, gpu), why,
                          {"wall_s": round(time.time() - started, 1)})
                rows.append(row)
                print(f"{config} {mix} ({variant.key}): {rate} tok/s, peak {peak} GB{'; ' + why if why else ''}", flush=True)
                if args.json:
                    args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    print_table(rows, gpu_name)
    gm.shutil.rmtree(work, ignore_errors=True)
    # every variant measured, but Unsloth where it cannot run (its skip is the table's answer)
    return 0 if all(r.tokens_per_s or r.variant.startswith("(d)") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
