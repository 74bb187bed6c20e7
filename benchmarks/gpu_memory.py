#!/usr/bin/env python3
"""Peak GPU memory and tokens/s of the real runner with real 4-bit QLoRA, against launcher.estimate.

    python benchmarks/gpu_memory.py                       # every ready config, then the variants
    python benchmarks/gpu_memory.py --steps 20 --json results.json --budget-s 480
    python benchmarks/gpu_memory.py --case mistral-7b-qlora.yaml:2048:4:gc   # CONFIG:SEQ:MICRO_BATCH:gc|nogc
    python benchmarks/gpu_memory.py --smoke               # the plumbing on the CPU, tiny shapes
    python benchmarks/gpu_memory.py --report benchmarks/results/gpu_memory_*.json
                                          # saved measurements against today's estimate, no GPU

Needs a CUDA GPU, the runner's requirements and no network. Each case runs
runner/qlora_runner.py as a user would (a child process, the config's own LoRA, precision,
optimizer and gradient checkpointing) with three changes that leave the memory of a training
step as it is:
  model      the config's base model built with random weights from launcher/model_facts.json
             (its shapes are what memory and speed depend on, not its values), saved as
             safetensors and quantized to NF4 by the runner on load. The tokenizer is the tiny
             one of configs/tiny/model: its ids are a subset of every model's vocabulary, and the
             logits still span the model's own vocabulary.
  data       synthetic instruction examples, each longer than data.max_length, so every
             sequence is cut to exactly max_length: the worst case the estimate plans for.
  schedule   train.max_steps = --steps with grad_accum 1 (accumulation changes neither the
             peak nor tokens/s), no validation or test split, no samples.

Measured per case:
  device peak GB   the most GPU memory in use, read through NVML every 10 ms from this process
                   (which never touches CUDA), less what was in use before the child started:
                   CUDA context, allocator reserve and all. It is what has to fit on the card,
                   and what launcher.estimate's VRAM figure predicts.
  alloc / resv GB  the runner's torch.cuda.max_memory_allocated / max_memory_reserved
                   (metrics.jsonl's gpu_mem_gb / gpu_reserved_gb at the last step).
  tokens/s         the median of the runner's per-step tokens_per_s after the first 3 steps.
  est              launcher.estimate for the same job: VRAM (GB) and tokens/s on the GPU NVML
                   names (the uncalibrated model: launcher/estimate.py's docstring).
A large card is generous: PyTorch's allocator reserves more when memory is plentiful, so the
device peak here is at most what a 24 GB card would show, never less.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from launcher import estimate, gpus  # noqa: E402  (after the path: runs from a checkout)

RUNNER = ROOT / "runner" / "qlora_runner.py"
TINY_TOKENIZER = ROOT / "configs" / "tiny" / "model"
READY_CONFIGS = ("deepseek-r1-distill-qwen-1.5b-qlora.yaml", "mistral-7b-qlora.yaml", "llama-3.1-8b-qlora.yaml")
WORDS = ("dog cat horse cow duck sheep goat donkey lion tiger bear fox wolf owl frog fish bird mouse legs "
         "lives house farm forest river says moo quack baa bray roar howl hoot grass meat seeds small big").split()
WARMUP_STEPS = 3
# Tiny shapes for --smoke: the script's plumbing on a CPU in seconds.
SMOKE_FACTS = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512, "tie_word_embeddings": False}


@dataclass
class Case:
    config: str  # file name under configs/
    seq_len: int
    micro_batch: int
    gradient_checkpointing: bool
    note: str = "as configured"

    @property
    def name(self) -> str:
        return f"{self.config.removesuffix('-qlora.yaml')} s{self.seq_len} b{self.micro_batch} gc{int(self.gradient_checkpointing)}"


@dataclass
class Result:
    case: Case
    ok: bool
    est_vram_gb: float
    est_tokens_per_s: Optional[float] = None
    device_peak_gb: Optional[float] = None
    alloc_gb: Optional[float] = None
    reserved_gb: Optional[float] = None
    tokens_per_s: Optional[float] = None
    steps: int = 0
    wall_s: float = 0.0
    error: Optional[str] = None
    gpu: Optional[str] = None

    @property
    def ratio(self) -> Optional[float]:
        return self.est_vram_gb / self.device_peak_gb if self.device_peak_gb else None


def read_job(config: str) -> dict[str, Any]:
    """A ready config (a file name under configs/) as the YAML says it."""
    return yaml.safe_load((ROOT / "configs" / config).read_text())


def cases_for(configs: list[str]) -> list[Case]:
    """Each config as it ships first (what the estimate test checks), then the variants that move
    the estimate's other terms: twice the sequence length, and no gradient checkpointing."""
    base, variants = [], []
    for name in configs:
        job = read_job(name)
        seq, batch = job["data"]["max_length"], job["train"]["micro_batch_size"]
        gc = job["train"]["gradient_checkpointing"]
        base.append(Case(name, seq, batch, gc))
        variants.append(Case(name, 2 * seq, batch, gc, "twice the sequence length"))
        if gc:
            variants.append(Case(name, seq, batch, False, "no gradient checkpointing"))
    return base + variants


# ---------------------------------------------------------------------------------------------
# the pieces of a case
# ---------------------------------------------------------------------------------------------


def parse_case(text: str) -> Case:
    """CONFIG:SEQ:MICRO_BATCH:gc|nogc, e.g. mistral-7b-qlora.yaml:2048:4:gc."""
    try:
        config, seq, batch, gc = text.split(":")
        if gc not in ("gc", "nogc") or not (ROOT / "configs" / config).is_file():
            raise ValueError
        return Case(config, int(seq), int(batch), gc == "gc", "chosen")
    except ValueError:
        raise argparse.ArgumentTypeError(f"--case {text!r}: want CONFIG:SEQ:MICRO_BATCH:gc|nogc with CONFIG a file "
                                         "under configs/, e.g. mistral-7b-qlora.yaml:2048:4:gc") from None


def model_facts_dict(base: str, smoke: bool) -> dict[str, Any]:
    return dict(SMOKE_FACTS) if smoke else json.loads(estimate.FACTS_FILE.read_text())[base]


def make_model(facts: dict[str, Any], dest: Path, device: str, max_len: int) -> None:
    """A random-weight model of the given shapes, saved with the tiny tokenizer (child process:
    this process must not hold a CUDA context while it measures)."""
    script = f"""
import json, sys, torch
from transformers import AutoConfig, AutoModelForCausalLM
facts = json.loads(sys.argv[1])
config = AutoConfig.for_model(facts.pop("model_type"), **facts)
with torch.device({device!r}):
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
model.save_pretrained(sys.argv[2])
"""
    subprocess.run([sys.executable, "-c", script, json.dumps(facts), str(dest)], check=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY_TOKENIZER / name, dest / name)
    tok_config = json.loads((dest / "tokenizer_config.json").read_text())
    tok_config["model_max_length"] = max_len  # no length warning; the runner cuts at max_length itself
    (dest / "tokenizer_config.json").write_text(json.dumps(tok_config))


def write_data(path: Path, examples: int, seq_len: int, seed: int = 0) -> None:
    """Examples longer than seq_len tokens (a word is at least one token), so each is cut to seq_len."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(examples):
            output = " ".join(rng.choice(WORDS) for _ in range(seq_len + 16))
            f.write(json.dumps({"instruction": f"Tell me about animal {i}.", "input": "", "output": output}) + "\n")


def write_job(case: Case, model_dir: Path, data_file: Path, dest: Path, steps: int, device: str,
              kernels: str = "none") -> None:
    job = read_job(case.config)
    job["model"]["base"] = str(model_dir)
    job["data"] = {"path": str(data_file), "format": "instruction", "max_length": case.seq_len, "packing": False,
                   "splits": {"train": 1.0, "validation": 0.0, "test": 0.0}}
    job["train"].pop("epochs", None)
    job["train"].update(max_steps=steps, grad_accum=1, micro_batch_size=case.micro_batch, save_every=10 * steps,
                        eval_every=10 * steps, gradient_checkpointing=case.gradient_checkpointing, device=device,
                        kernels=kernels)
    job["eval"] = {"samples": 0}
    dest.write_text(yaml.safe_dump(job, sort_keys=False))


class GPUMemoryWatch:
    """The GPU's used memory through NVML, polled on a thread; peak over a baseline."""

    def __init__(self, interval_s: float = 0.01) -> None:
        try:
            import pynvml  # nvidia-ml-py: NVML, no CUDA context in this process
        except ImportError:
            raise SystemExit("benchmarks/gpu_memory.py reads GPU memory through NVML: pip install nvidia-ml-py") from None

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(int(os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]))
        self.name = pynvml.nvmlDeviceGetName(self._handle)
        self.name = self.name.decode() if isinstance(self.name, bytes) else self.name
        self.interval_s = interval_s
        self._peak = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.baseline = 0

    def used(self) -> int:
        return self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used

    def __enter__(self) -> "GPUMemoryWatch":
        self.baseline = self._peak = self.used()
        self._stop.clear()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, self.used())
            time.sleep(self.interval_s)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()

    @property
    def peak_gb(self) -> float:
        return (self._peak - self.baseline) / 1e9


def read_metrics(run_dir: Path) -> tuple[list[dict[str, Any]], Optional[str]]:
    metrics = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    status = run_dir / "status.json"
    error = json.loads(status.read_text()).get("error") if status.exists() else None
    return [r for r in records if r.get("event") == "train"], error


def estimate_for(case: Case, facts: dict[str, Any], gpu_name: Optional[str],
                 kernels: str = "none") -> tuple[float, Optional[float]]:
    job = read_job(case.config)
    model_facts = estimate.ModelFacts.from_config(facts)
    lora = job["lora"]
    vram = estimate.estimate_vram(model_facts, micro_batch=case.micro_batch, seq_len=case.seq_len, lora_r=lora["r"],
                                  lora_dropout=lora.get("dropout", 0.05),
                                  gradient_checkpointing=case.gradient_checkpointing,
                                  double_quant=job["model"].get("double_quant", True), fused_loss=kernels != "none")
    try:
        gpu = gpus.resolve(gpu_name) if gpu_name else None
    except gpus.UnknownGPU:
        gpu = None
    tokens_per_s = estimate.model_tokens_per_s(model_facts, gpu, case.micro_batch, case.seq_len,
                                               case.gradient_checkpointing) if gpu else None
    return vram.total_gb, tokens_per_s


def run_case(case: Case, model_dir: Path, work: Path, steps: int, device: str, watch: Optional[GPUMemoryWatch],
             facts: dict[str, Any], timeout_s: float, kernels: str = "none") -> Result:
    est_vram, est_tps = estimate_for(case, facts, watch.name if watch else None, kernels)
    result = Result(case, ok=False, est_vram_gb=est_vram, est_tokens_per_s=est_tps, gpu=watch.name if watch else "cpu")
    case_dir = work / case.name.replace(" ", "_")
    case_dir.mkdir(parents=True)
    data_file = case_dir / "data.jsonl"
    write_data(data_file, steps * case.micro_batch + case.micro_batch, case.seq_len)
    job_file = case_dir / "job.yaml"
    write_job(case, model_dir, data_file, job_file, steps, device, kernels)
    run_dir = case_dir / "run"
    started = time.time()
    cmd = [sys.executable, str(RUNNER), "--config", str(job_file), "--out", str(run_dir)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        with watch or contextlib.nullcontext():
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        result.error = f"timed out after {timeout_s:.0f} s"
        return result
    result.wall_s = round(time.time() - started, 1)
    result.device_peak_gb = round(watch.peak_gb, 3) if watch else None
    train, status_error = read_metrics(run_dir)
    result.steps = len(train)
    if proc.returncode != 0 or not train:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-6:]
        result.error = f"runner exit {proc.returncode}: {status_error or ' | '.join(tail)}"
        return result
    last = train[-1]
    result.alloc_gb, result.reserved_gb = last.get("gpu_mem_gb"), last.get("gpu_reserved_gb")
    rates = [r["tokens_per_s"] for r in train[WARMUP_STEPS:]] or [r["tokens_per_s"] for r in train]
    result.tokens_per_s = round(statistics.median(rates), 1)
    result.ok = True
    return result


# ---------------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------------


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(results: list[Result]) -> None:
    print(f"\n{'case':<42} {'est GB':>7} {'peak GB':>8} {'est/peak':>8} {'alloc':>6} {'resv':>6} "
          f"{'tok/s':>7} {'est tok/s':>9}  note")
    for r in results:
        print(f"{r.case.name:<42} {r.est_vram_gb:>7.2f} {_fmt(r.device_peak_gb, '8.2f'):>8} {_fmt(r.ratio, '8.2f'):>8} "
              f"{_fmt(r.alloc_gb, '6.2f'):>6} {_fmt(r.reserved_gb, '6.2f'):>6} {_fmt(r.tokens_per_s, '7.0f'):>7} "
              f"{_fmt(r.est_tokens_per_s, '9.0f'):>9}  {r.case.note}{'' if r.ok else '  FAILED: ' + str(r.error)}")
    if results:
        print(f"GPU: {results[0].gpu}; peak = NVML device memory in use less the idle baseline; "
              "alloc/resv = torch max_memory_allocated/reserved")


def report(files: list[Path]) -> int:
    """Saved measurements, each file's own GPU, with the estimate as this checkout computes it."""
    for file in files:
        results = []
        for saved in json.loads(file.read_text()):
            case = Case(**saved["case"])
            job = read_job(case.config)
            est_vram, est_tps = estimate_for(case, model_facts_dict(job["model"]["base"], False), saved["gpu"])
            fields = {k: saved[k] for k in ("ok", "device_peak_gb", "alloc_gb", "reserved_gb", "tokens_per_s", "steps",
                                            "wall_s", "error", "gpu")}
            results.append(Result(case, est_vram_gb=est_vram, est_tokens_per_s=est_tps, **fields))
        print(f"\n{file}")
        print_table(results)
        vram = [r.ratio for r in results if r.ratio]
        speed = [r.est_tokens_per_s / r.tokens_per_s for r in results if r.tokens_per_s and r.est_tokens_per_s]
        print(f"estimate / measured: VRAM {min(vram):.2f}..{max(vram):.2f}, tokens/s {min(speed):.2f}..{max(speed):.2f}")
    return 0


def scratch_dir(need_gb: float) -> Path:
    """/dev/shm when it has room (writing and reading the weights at memory speed), else the temp dir."""
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > need_gb * 1e9:
        return Path(tempfile.mkdtemp(prefix="gpu_memory.", dir=shm))
    return Path(tempfile.mkdtemp(prefix="gpu_memory."))


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(READY_CONFIGS), help="file names under configs/")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per case (default 20)")
    parser.add_argument("--case", type=parse_case, action="append", dest="cases",
                        help="run these cases instead of the configs' own and their variants (repeatable)")
    parser.add_argument("--only-as-configured", action="store_true", help="skip the variants")
    parser.add_argument("--skip", nargs="+", default=[], metavar="TEXT",
                        help="skip the cases whose name contains TEXT (names as in the table, e.g. 'mistral-7b s2048')")
    parser.add_argument("--budget-s", type=float, default=None, help="start no case after this many seconds")
    parser.add_argument("--case-timeout-s", type=float, default=600)
    parser.add_argument("--json", type=Path, help="also write the results here (after every case)")
    parser.add_argument("--report", nargs="+", type=Path, metavar="JSON",
                        help="print saved results (--json files) with the estimates recomputed by today's code")
    parser.add_argument("--kernels", choices=("none", "auto", "liger"), default="none",
                        help="train.kernels for every case (default none: the model's own loss, as the "
                             "saved measurements behind the estimate's fit were made)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the plumbing, measures nothing")
    args = parser.parse_args(argv)

    if args.report:
        return report(args.report)
    device = "cpu" if args.smoke else "cuda"
    watch = None if args.smoke else GPUMemoryWatch()
    cases = args.cases or cases_for(args.configs)
    if args.only_as_configured:
        cases = [c for c in cases if c.note == "as configured"]
    cases = [c for c in cases if not any(text in c.name for text in args.skip)]
    os.environ["HF_HUB_OFFLINE"] = "1"  # never the hub: every model and file here is local
    if args.smoke:
        cases = [Case(c.config, 96, 2, c.gradient_checkpointing, c.note) for c in cases[:2]]
    started = time.time()
    results: list[Result] = []
    by_model: dict[str, list[Case]] = {}
    for case in cases:  # one model build per base model, models in the order of their first case
        by_model.setdefault(read_job(case.config)["model"]["base"], []).append(case)
    for base, model_cases in by_model.items():
        if args.budget_s and time.time() - started > args.budget_s:
            print(f"budget of {args.budget_s:.0f} s spent: {base} skipped", flush=True)
            continue
        facts = model_facts_dict(base, args.smoke)
        params_gb = estimate.ModelFacts.from_config(facts).total_params * 2 / 1e9
        work = scratch_dir(params_gb + 2)
        try:
            t0 = time.time()
            model_dir = work / "model"
            make_model(facts, model_dir, device, max(c.seq_len for c in model_cases))
            print(f"{base}: random-weight model built and saved in {time.time() - t0:.0f} s ({work})", flush=True)
            for case in model_cases:
                if args.budget_s and time.time() - started > args.budget_s:
                    print(f"budget of {args.budget_s:.0f} s spent: {case.name} skipped", flush=True)
                    continue
                result = run_case(case, model_dir, work, args.steps, device, watch, facts, args.case_timeout_s,
                                  args.kernels)
                results.append(result)
                print(f"{case.name}: {'ok' if result.ok else 'FAILED ' + str(result.error)} in {result.wall_s} s; "
                      f"peak {result.device_peak_gb} GB (est {result.est_vram_gb:.2f}), {result.tokens_per_s} tok/s",
                      flush=True)
                if args.json:
                    args.json.write_text(json.dumps([{**asdict(r), "ratio": r.ratio} for r in results], indent=1))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print_table(results)
    return 0 if results and all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
