#!/usr/bin/env python3
"""What the S3 checkpoint store costs: moving a Mistral-7B-sized checkpoint, and the training
step with the runner's background upload on vs off. Against the loopback S3 server of the tests
(tests/fakes/s3_server.py: moto's S3, credentials enforced), started by this script as a process of
its own at nice 19: it stands for a remote service, which costs the training machine no CPU (at
normal priority, moto's Python competed for the 2 cores with the very run it served).

    python benchmarks/storage.py                                   # ~4-5 min on 2 cores
    python benchmarks/storage.py --json benchmarks/results/storage.json
    python benchmarks/storage.py --quick                           # 1 pair, 1 transfer repeat: ~1.5 min

1. Step time, upload on vs off. The real runner (tests.helpers.runner_command) on the tiny CPU
   config (tests.helpers.tiny_job) with train.max_steps = --steps, save_every = --save-every (small,
   so uploads overlap many steps), no validation before the end, no samples. Once with storage
   {kind: s3, bucket, endpoint_url: the server, region: us-east-1} and the store's keys in
   QLORA_S3_ACCESS_KEY_ID / QLORA_S3_SECRET_ACCESS_KEY, once with storage kind local; --pairs
   such pairs, the order alternating (on-off, off-on, ...). Step times come from metrics.jsonl:
   the "time" of each "train" event (taken after the optimizer step). The window starts at step
   --warmup's stamp (the first steps pay one-time start-up costs, seconds each, and come before
   any checkpoint) and runs to the last step; every interval in it counts, including those that
   hold a checkpoint save and an upload's start. Reported per side: the mean interval (window
   seconds / steps, pooled over the runs of a side), the median interval, and the mean of the
   intervals that hold a checkpoint. The claim checked: the upload slows the mean step by at most
   5% (PASS/FAIL on the pooled mean ratio). So that it cannot pass by not uploading, every "on"
   run must have every checkpoint it saved in the store: a "stored" event in metrics.jsonl and a
   PUT of its manifest seen by the server, for each checkpoint step, and the store's complete
   checkpoints at the end must be the newest storage.keep of them.
   Noise: per run, the CPU time the rest of the machine used (from /proc/stat, less the runner's
   own, the S3 server's and this process's) and, separately, the S3 server's (niced, but still on
   the same 2 cores, which a real remote store would not be). Before each pair the script waits
   (up to 2 min) for the host to be quiet, and a pair during which other processes took more than
   0.1 cores is run again (3 tries; the last is kept, and the report says so).

2. Checkpoint transfer. A folder laid out like the Trainer's checkpoint of
   configs/mistral-7b-qlora.yaml on Mistral-7B-v0.3, sizes computed, not guessed:
     adapter_model.safetensors  a real safetensors file: the peft tensor names and shapes of
                                lora.r on the config's target_modules (all-linear: q,k,v,o,gate,
                                up,down of the 32 layers, not lm_head; A is r x in, B is out x r),
                                fp32 (what peft saves in QLoRA: the trainable LoRA weights are fp32).
     optimizer.pt               torch.save of the real optimizer's state_dict after one step on
                                parameters of those shapes, then overwritten with random bytes of
                                that size. The config sets no optimizer, so "auto": paged_adamw_8bit
                                on CUDA (bitsandbytes AdamW, optim_bits 8, is_paged; 1 byte per state
                                plus a float per 256). A second case, "fp32 AdamW", is the same
                                checkpoint with train.optimizer adamw_torch (torch AdamW: 2 fp32
                                states per parameter).
     the small files            README.md, adapter_config.json, scheduler.pt, rng_state.pth,
                                training_args.bin: the sizes of the last checkpoint of this
                                script's own tiny runs (part 1); trainer_state.json and the run's
                                metrics.jsonl (uploaded with every checkpoint): their bytes per step
                                there times the Mistral run's steps (yahma/alpaca-cleaned's
                                examples from launcher/dataset_facts.json, the config's splits,
                                batch and accumulation), i.e. the run's last, largest checkpoint.
   Timed, --repeats times each, the median reported: sha256_of over the files alone (what
   hashing costs), CheckpointStore.upload_checkpoint (list, hash, multipart upload, history
   files, manifest), download_checkpoint (download, size and sha256 check, local manifest).
   The files were just written, so they are read from the page cache, as a just-saved checkpoint
   is. MiB/s = checkpoint MiB / seconds.

What it does not measure: a real network. Loopback moto measures our code's, boto3's and moto's
own overhead (moto is Python and keeps objects in memory); a real store is bounded by the link.
No GPU: the step-time part is the tiny CPU model, where a step is ~0.5 s and a checkpoint ~2 MB.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from child_process import process_cpu_s, run_child, wait_for_quiet_host  # noqa: E402  (benchmarks/, this script's folder)
from tests.fakes.s3_server import REGION, S3Server  # noqa: E402
from tests.helpers import load_runner_module, runner_command, tiny_job  # noqa: E402

runner = load_runner_module()

MISTRAL_CONFIG = ROOT / "configs" / "mistral-7b-qlora.yaml"
DATASET_FACTS = ROOT / "launcher" / "dataset_facts.json"
BUCKET = "storage-bench"
CLAIM = 0.05  # the upload may slow the mean training step by at most this share
BUSY_HOST_CORES = 0.1  # other processes' CPU above this (in cores) during a pair: the pair is run again
PAIR_ATTEMPTS = 3
QUIET_WAIT_S = 120  # before each pair, at most this long for the host to fall quiet
SERVER_NICE = 19  # the S3 server stands for a remote service: it must not take the runner's CPU
MIB = 1 << 20

# Mistral-7B-v0.3 (its config.json): 32 layers, hidden 4096, intermediate 14336, 32 query heads and
# 8 KV heads of 128. Each linear layer of a decoder layer as (peft's module path, in, out).
MISTRAL_LAYERS = 32
MISTRAL_LINEARS = {
    "q_proj": ("self_attn", 4096, 32 * 128),
    "k_proj": ("self_attn", 4096, 8 * 128),
    "v_proj": ("self_attn", 4096, 8 * 128),
    "o_proj": ("self_attn", 32 * 128, 4096),
    "gate_proj": ("mlp", 4096, 14336),
    "up_proj": ("mlp", 4096, 14336),
    "down_proj": ("mlp", 14336, 4096),
}
SMALL_FILES = ("README.md", "adapter_config.json", "scheduler.pt", "rng_state.pth", "training_args.bin")
PER_STEP_FILES = ("trainer_state.json",)  # grow with the step (log_history: one entry per step)


# ---------------------------------------------------------------------------------------------
# Part 1: step time with the background upload on vs off
# ---------------------------------------------------------------------------------------------


def self_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class RequestLog(list):
    """The server's request list, also written to a file line by line for the benchmark to read."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.file = path.open("a", buffering=1)
        self.lock = threading.Lock()

    def append(self, request: tuple[str, str, str]) -> None:
        super().append(request)
        with self.lock:
            self.file.write(json.dumps(request) + "\n")


def serve_s3(requests_path: Path) -> None:
    """`--_serve-s3 FILE`: the test S3 server in this process at the lowest CPU priority, its
    endpoint and keys as one JSON line on stdout, every request appended to FILE, until stdin closes."""
    os.nice(SERVER_NICE)
    server = S3Server()
    server.requests = RequestLog(requests_path)
    server.start()
    print(json.dumps({"url": server.url, "access_key": server.access_key, "secret_key": server.secret_key}), flush=True)
    sys.stdin.read()
    server.stop()


class RemoteS3:
    """The test S3 server in a process of its own at nice 19: it stands for a remote service, which
    costs the training machine no CPU, so it must yield the 2 cores to the run it serves. The
    attributes of S3Server that this script uses."""

    def __init__(self, work: Path) -> None:
        self.requests_path = work / "s3-requests.jsonl"
        self.process = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--_serve-s3",
                                         str(self.requests_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        cwd=ROOT, text=True)
        hello = json.loads(self.process.stdout.readline() or "null")
        if hello is None:
            raise RuntimeError("the S3 server process exited before it served")
        self.url, self.access_key, self.secret_key = hello["url"], hello["access_key"], hello["secret_key"]

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def requests(self) -> list[tuple[str, str, str]]:
        return [tuple(json.loads(line)) for line in self.requests_path.read_text().splitlines() if line.strip()]

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.url, region_name=REGION, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key,
                            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        self.process.stdin.close()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@dataclass
class StepRun:
    side: str  # "on" (storage s3) or "off" (storage local)
    pair: int
    name: str  # its run folder under the work folder, and its run name in the store
    steps: int  # intervals in the window
    window_s: float
    mean_step_ms: float
    median_step_ms: float
    checkpoint_step_ms: float  # mean of the intervals that hold a checkpoint save (and upload start)
    other_step_ms: float  # mean of the others
    wall_s: float
    runner_cpu_s: float
    server_cpu_cores: float  # the S3 server's process during the run, in cores
    other_cpu_cores: float  # everything else on the host, in cores
    checkpoints: list[int] = field(default_factory=list)
    stored: list[int] = field(default_factory=list)  # "stored" events
    manifests_put: list[int] = field(default_factory=list)  # manifest PUTs the server saw
    store_complete_at_end: list[int] = field(default_factory=list)
    all_stored: bool = True


def measure_child(command: list[str], env: dict[str, str], log_path: Path,
                  server: RemoteS3) -> tuple[float, float, float, float]:
    """Run to completion: (wall s, the child's CPU s, the server's CPU cores, others' CPU cores)."""
    self_before, server_before = self_cpu_s(), process_cpu_s(server.pid)
    usage = run_child(command, log_path, env)
    server_s = process_cpu_s(server.pid) - server_before
    others = max(0.0, usage.host_busy_s - usage.cpu_s - server_s - (self_cpu_s() - self_before))
    return usage.wall_s, usage.cpu_s, server_s / usage.wall_s, others / usage.wall_s


def step_window(events: list[dict[str, Any]], warmup: int, save_every: int) -> dict[str, float]:
    train = {e["step"]: e["time"] for e in events if e["event"] == "train"}
    last = max(train)
    missing = [s for s in range(warmup, last + 1) if s not in train]
    if missing or last <= warmup + 1:
        raise RuntimeError(f"train events missing for steps {missing[:5]} (or too few steps: {last})")
    # Interval k -> k+1 holds whatever ran after step k's log: its save (k % save_every == 0).
    intervals = {k: train[k + 1] - train[k] for k in range(warmup, last)}
    at_checkpoint = [v for k, v in intervals.items() if k % save_every == 0]
    others = [v for k, v in intervals.items() if k % save_every != 0]
    window = train[last] - train[warmup]
    return {"steps": len(intervals), "window_s": window, "mean_step_ms": 1000 * window / len(intervals),
            "median_step_ms": 1000 * statistics.median(intervals.values()),
            "checkpoint_step_ms": 1000 * statistics.fmean(at_checkpoint) if at_checkpoint else math.nan,
            "other_step_ms": 1000 * statistics.fmean(others)}


def one_step_run(server: RemoteS3, work: Path, side: str, pair: int, attempt: int, args: argparse.Namespace) -> StepRun:
    name = f"steps-{side}-{pair}" + (f"-again{attempt}" if attempt > 1 else "")
    out = work / name
    storage = ({"kind": "s3", "bucket": BUCKET, "endpoint_url": server.url, "region": REGION}
               if side == "on" else {"kind": "local"})
    job = tiny_job(work / f"{name}.yaml", train={"max_steps": args.steps, "save_every": args.save_every,
                                                 "eval_every": args.steps},
                   eval={"samples": 0}, storage=storage)
    env = {k: v for k, v in os.environ.items() if k not in (runner.S3_KEY_ENV, runner.S3_SECRET_ENV)}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if side == "on":
        env.update({runner.S3_KEY_ENV: server.access_key, runner.S3_SECRET_ENV: server.secret_key})
    wall, child_cpu, server_cores, other_cores = measure_child(runner_command(job, out), env, work / f"{name}.log",
                                                                server)
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    run = StepRun(side, pair, name, wall_s=wall, runner_cpu_s=child_cpu, server_cpu_cores=server_cores,
                  other_cpu_cores=other_cores, **step_window(events, args.warmup, args.save_every))
    run.checkpoints = sorted({e["step"] for e in events if e["event"] == "checkpoint"})
    if side == "on":
        run.stored = sorted({e["step"] for e in events if e["event"] == "stored"})
        prefix = f"/{BUCKET}/qlora-launch/{name}/checkpoints/"
        manifest_puts = [path[len(prefix):] for method, path, _ in server.requests
                         if method == "PUT" and path.startswith(prefix) and path.endswith("/" + runner.MANIFEST)]
        run.manifests_put = sorted({int(runner.CHECKPOINT_RE.match(p.split("/")[0]).group(1)) for p in manifest_puts})
        store = runner.CheckpointStore(runner.StorageSection(**storage), name, client=server.client())
        run.store_complete_at_end = store.complete_steps()
        keep = runner.StorageSection().keep
        run.all_stored = (bool(run.checkpoints) and run.stored == run.checkpoints == run.manifests_put
                          and run.store_complete_at_end == run.checkpoints[-keep:])
    return run


def step_pair(server: RemoteS3, work: Path, pair: int, args: argparse.Namespace) -> list[StepRun]:
    """One on/off pair, run again (up to PAIR_ATTEMPTS) when other processes took the CPU meanwhile:
    on 2 cores a busy neighbour makes torch's threads wait, and a step takes many times longer."""
    for attempt in range(1, PAIR_ATTEMPTS + 1):
        wait_for_quiet_host(BUSY_HOST_CORES, QUIET_WAIT_S)
        runs = []
        for side in (("on", "off") if pair % 2 else ("off", "on")):
            run = one_step_run(server, work, side, pair, attempt, args)
            runs.append(run)
            print(f"pair {pair}/{args.pairs} upload {side:3}  mean step {run.mean_step_ms:6.1f} ms  median "
                  f"{run.median_step_ms:6.1f} ms  at checkpoints {run.checkpoint_step_ms:6.1f} ms  wall "
                  f"{run.wall_s:5.1f} s  server {run.server_cpu_cores:.2f} cores  "
                  f"others {run.other_cpu_cores:.2f} cores"
                  + (f"  stored {len(run.stored)}/{len(run.checkpoints)} checkpoints" if side == "on" else ""),
                  file=sys.stderr, flush=True)
        if max(r.other_cpu_cores for r in runs) <= BUSY_HOST_CORES:
            break
        if attempt < PAIR_ATTEMPTS:
            print(f"pair {pair}: other processes used CPU meanwhile; running it again", file=sys.stderr, flush=True)
    return runs


def step_benchmark(server: RemoteS3, work: Path, args: argparse.Namespace) -> list[StepRun]:
    return [run for pair in range(1, args.pairs + 1) for run in step_pair(server, work, pair, args)]


def summarize_steps(runs: list[StepRun], args: argparse.Namespace) -> dict[str, Any]:
    side = {s: [r for r in runs if r.side == s] for s in ("on", "off")}

    def pooled_mean(rs: list[StepRun]) -> float:
        return 1000 * sum(r.window_s for r in rs) / sum(r.steps for r in rs)

    def spread(values: list[float]) -> float:  # (max - min) / median
        return (max(values) - min(values)) / statistics.median(values) if len(values) > 1 else 0.0

    stats = {s: {"mean_step_ms": pooled_mean(rs),
                 "median_step_ms": statistics.median(r.median_step_ms for r in rs),
                 "checkpoint_step_ms": statistics.fmean(r.checkpoint_step_ms for r in rs),
                 "other_step_ms": statistics.fmean(r.other_step_ms for r in rs),
                 "per_run_mean_step_ms": [r.mean_step_ms for r in rs],
                 "per_run_spread": spread([r.mean_step_ms for r in rs])} for s, rs in side.items()}
    pairs = sorted({r.pair for r in runs})
    pair_ratios = [next(r for r in side["on"] if r.pair == p).mean_step_ms /
                   next(r for r in side["off"] if r.pair == p).mean_step_ms for p in pairs]
    mean_ratio = stats["on"]["mean_step_ms"] / stats["off"]["mean_step_ms"]
    # What one checkpoint's upload adds to training, spread over its save_every steps.
    per_checkpoint_ms = (stats["on"]["mean_step_ms"] - stats["off"]["mean_step_ms"]) * args.save_every
    all_stored = all(r.all_stored for r in side["on"])
    return {
        "config": "tests.helpers.tiny_job (configs/tiny-cpu.yaml)", "max_steps": args.steps,
        "save_every": args.save_every, "warmup_steps_skipped": args.warmup, "pairs": args.pairs,
        "sides": stats, "mean_ratio_on_over_off": mean_ratio,
        "median_ratio_on_over_off": stats["on"]["median_step_ms"] / stats["off"]["median_step_ms"],
        "checkpoint_interval_ratio": stats["on"]["checkpoint_step_ms"] / stats["off"]["checkpoint_step_ms"],
        "per_pair_mean_ratio": pair_ratios, "every_checkpoint_stored": all_stored,
        "upload_cost_per_checkpoint_ms": per_checkpoint_ms,
        "save_every_for_claim": math.ceil(per_checkpoint_ms / (CLAIM * stats["off"]["mean_step_ms"]))
        if per_checkpoint_ms > 0 else args.save_every,
        "claim": f"upload slows the mean step by <= {CLAIM:.0%}",
        "verdict": "PASS" if all_stored and mean_ratio <= 1 + CLAIM else "FAIL",
        "runs": [asdict(r) for r in runs],
    }


# ---------------------------------------------------------------------------------------------
# Part 2: a Mistral-7B-sized checkpoint up and down
# ---------------------------------------------------------------------------------------------


def lora_tensors(config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """peft's adapter tensor names and shapes for the config's lora section on Mistral-7B."""
    r, targets = config["lora"]["r"], config["lora"]["target_modules"]
    names = list(MISTRAL_LINEARS) if targets == "all-linear" else [t for t in targets if t in MISTRAL_LINEARS]
    if not names:
        raise SystemExit(f"lora.target_modules {targets!r} names none of Mistral's linear layers")
    shapes = {}
    for layer in range(MISTRAL_LAYERS):
        for name in names:
            group, n_in, n_out = MISTRAL_LINEARS[name]
            base = f"base_model.model.model.layers.{layer}.{group}.{name}"
            shapes[f"{base}.lora_A.weight"] = (r, n_in)
            shapes[f"{base}.lora_B.weight"] = (n_out, r)
    return shapes


def mistral_steps(config: dict[str, Any]) -> int:
    """Optimizer steps of the config's whole run (the last checkpoint's step)."""
    facts = json.loads(DATASET_FACTS.read_text())["datasets"]
    examples = next(d["examples"] for d in facts if d["path"] == config["data"]["path"])
    splits = config["data"]["splits"]
    train = examples - runner._split_size(examples, splits["validation"]) - runner._split_size(examples, splits["test"])
    t = config["train"]
    return math.ceil(t.get("epochs", 1) * (math.ceil(train / t["micro_batch_size"]) // t["grad_accum"]))


def write_random(path: Path, size: int) -> None:
    with path.open("wb") as f:
        left = size
        while left:
            chunk = min(left, 8 * MIB)
            f.write(os.urandom(chunk))
            left -= chunk


def optimizer_state_bytes(shapes: dict[str, tuple[int, int]], kind: str, scratch: Path) -> int:
    """The size of optimizer.pt: torch.save of the real optimizer's state_dict after one step."""
    import torch

    params = [torch.nn.Parameter(torch.zeros(shape)) for shape in shapes.values()]
    for p in params:
        p.grad = torch.zeros_like(p)
    if kind == "paged_adamw_8bit":  # transformers' mapping: bitsandbytes AdamW, optim_bits 8, is_paged
        import warnings

        import bitsandbytes as bnb

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "paged optimizers are not supported on CPU": same state layout
            optimizer = bnb.optim.AdamW(params, lr=2e-4, optim_bits=8, is_paged=True)
            optimizer.step()
    else:
        optimizer = torch.optim.AdamW(params, lr=2e-4)
        optimizer.step()
    target = scratch / f"optimizer-{kind}.pt"
    torch.save(optimizer.state_dict(), target)
    size = target.stat().st_size
    target.unlink()
    return size


def build_checkpoint(folder: Path, small: dict[str, int], per_step: dict[str, float], optimizer_kind: str,
                     shapes: dict[str, tuple[int, int]], steps: int) -> dict[str, int]:
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    save_file({name: torch.randn(shape, generator=generator) for name, shape in shapes.items()},
              str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    write_random(folder / "optimizer.pt", optimizer_state_bytes(shapes, optimizer_kind, folder.parent))
    for name, size in small.items():
        write_random(folder / name, size)
    for name, bytes_per_step in per_step.items():
        write_random(folder / name, round(bytes_per_step * steps))
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir())}


@dataclass
class Transfer:
    case: str
    optimizer: str
    files: dict[str, int]
    history_bytes: int  # metrics.jsonl, uploaded with the checkpoint
    hash_s: list[float] = field(default_factory=list)
    upload_s: list[float] = field(default_factory=list)
    download_s: list[float] = field(default_factory=list)

    @property
    def mib(self) -> float:
        return sum(self.files.values()) / MIB


def transfer_benchmark(server: RemoteS3, work: Path, small: dict[str, int], per_step: dict[str, float],
                       history_per_step: float, args: argparse.Namespace) -> dict[str, Any]:
    config = yaml.safe_load(MISTRAL_CONFIG.read_text())
    shapes = lora_tensors(config)
    lora_params = sum(a * b for a, b in shapes.values())
    steps = mistral_steps(config)
    storage = runner.StorageSection(kind="s3", bucket=BUCKET, endpoint_url=server.url, region=REGION)
    os.environ[runner.S3_KEY_ENV], os.environ[runner.S3_SECRET_ENV] = server.access_key, server.secret_key
    cases = [("as configured", "paged_adamw_8bit"), ("fp32 AdamW", "adamw_torch")][:1 if args.quick else 2]
    results = []
    for case, optimizer_kind in cases:
        case_dir = work / f"transfer-{optimizer_kind}"
        run = runner.RunDir(case_dir / "run")
        run.root.mkdir(parents=True)
        history = round(history_per_step * steps)
        write_random(run.metrics_path, history)
        folder = case_dir / "source" / f"checkpoint-{steps}"
        files = build_checkpoint(folder, small, per_step, optimizer_kind, shapes, steps)
        result = Transfer(case, optimizer_kind, files, history)
        for repeat in range(args.repeats):
            started = time.perf_counter()
            for path in sorted(folder.iterdir()):
                runner.sha256_of(path)
            result.hash_s.append(time.perf_counter() - started)
            store = runner.CheckpointStore(storage, f"transfer-{optimizer_kind}-{repeat}")  # s3_client, as the runner
            started = time.perf_counter()
            if not store.upload_checkpoint(steps, folder, run):
                raise RuntimeError("upload_checkpoint found the checkpoint already stored")
            result.upload_s.append(time.perf_counter() - started)
            dest = case_dir / f"download-{repeat}" / f"checkpoint-{steps}"
            dest.parent.mkdir()
            started = time.perf_counter()
            store.download_checkpoint(steps, dest)
            result.download_s.append(time.perf_counter() - started)
            got = {p.name: p.stat().st_size for p in dest.iterdir() if p.name != runner.MANIFEST}
            if got != result.files:
                raise RuntimeError(f"the downloaded checkpoint differs: {got} vs {result.files}")
            shutil.rmtree(dest.parent)
            keys = store.keys_under("")  # moto keeps objects in memory: free them for the next repeat
            for i in range(0, len(keys), 1000):
                store.client.delete_objects(Bucket=BUCKET, Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]]})
            print(f"transfer {case:13} repeat {repeat + 1}/{args.repeats}: {result.mib:.1f} MiB  hash "
                  f"{result.hash_s[-1]:.2f} s  upload {result.upload_s[-1]:.2f} s  "
                  f"download {result.download_s[-1]:.2f} s",
                  file=sys.stderr, flush=True)
        shutil.rmtree(case_dir)
        results.append(result)
    return {
        "model": "mistralai/Mistral-7B-v0.3", "config": str(MISTRAL_CONFIG.relative_to(ROOT)),
        "lora_r": config["lora"]["r"], "target_modules": config["lora"]["target_modules"],
        "lora_tensors": len(shapes), "lora_parameters": lora_params, "run_steps": steps,
        "repeats": args.repeats,
        "cases": [{**asdict(r), "mib": r.mib,
                   "median_hash_s": statistics.median(r.hash_s), "median_upload_s": statistics.median(r.upload_s),
                   "median_download_s": statistics.median(r.download_s),
                   "upload_mib_s": r.mib / statistics.median(r.upload_s),
                   "download_mib_s": r.mib / statistics.median(r.download_s),
                   "hash_mib_s": r.mib / statistics.median(r.hash_s)} for r in results],
    }


def small_file_sizes(step_runs: list[StepRun], work: Path) -> tuple[dict[str, int], dict[str, float], float]:
    """From the last "off" run's last checkpoint: the small files' sizes, the per-step files' bytes
    per step, and metrics.jsonl's bytes per step."""
    last = [r for r in step_runs if r.side == "off"][-1]
    out = work / last.name
    step = last.checkpoints[-1]
    folder = out / "checkpoints" / f"checkpoint-{step}"
    small = {name: (folder / name).stat().st_size for name in SMALL_FILES}
    per_step = {name: (folder / name).stat().st_size / step for name in PER_STEP_FILES}
    return small, per_step, (out / "metrics.jsonl").stat().st_size / step


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


def why_failed(s: dict[str, Any]) -> str:
    """What a FAIL failed on: the step time, or a store that did not get every checkpoint (the
    uploader skips one that has storage.keep newer ones waiting, when uploads fall behind)."""
    if s["verdict"] == "PASS" or s["every_checkpoint_stored"]:
        return ""  # a FAIL on the step time alone: the figures above say it
    slow = s["mean_ratio_on_over_off"] > 1 + CLAIM
    missed = [f"{len(r['stored'])} of {len(r['checkpoints'])}" for r in s["runs"] if r["side"] == "on"]
    return (f"; {'and ' if slow else 'the step time is within it, but '}not every checkpoint reached the store "
            f"(stored per on run: {', '.join(missed)}): uploads fell behind the saves and the uploader skipped "
            "the ones with storage.keep newer ones waiting")


def format_report(summary: dict[str, Any]) -> str:
    s, t, host = summary["steps"], summary["transfer"], summary["host"]
    on, off = s["sides"]["on"], s["sides"]["off"]
    runs = s["runs"]
    server_on = statistics.fmean(r["server_cpu_cores"] for r in runs if r["side"] == "on")
    server_off = statistics.fmean(r["server_cpu_cores"] for r in runs if r["side"] == "off")
    lines = [
        (f"storage benchmark on loopback moto S3 ({host['cpus_usable']} usable CPUs, python {host['python']}, "
         f"boto3 {host['boto3']}, moto {host['moto']}); the S3 server in a process of its own at nice "
         f"{SERVER_NICE}, standing for a remote service"),
        "",
        (f"1. training step, background upload on vs off: tiny CPU config, {s['max_steps']} steps, save_every "
         f"{s['save_every']}, window steps {s['warmup_steps_skipped']}-{s['max_steps']}, {s['pairs']} pair(s), "
         "order alternating"),
        f"{'':34}{'upload on':>12}{'off':>12}{'on/off':>9}",
    ]
    for label, key in (("mean step (ms, all intervals)", "mean_step_ms"), ("median step (ms)", "median_step_ms"),
                       ("mean at a checkpoint (ms)", "checkpoint_step_ms"), ("mean elsewhere (ms)", "other_step_ms")):
        lines.append(f"{label:34}{on[key]:>12.1f}{off[key]:>12.1f}{on[key] / off[key]:>9.3f}")
    lines += [
        f"per run mean step (ms): on {' '.join(f'{x:.1f}' for x in on['per_run_mean_step_ms'])}; "
        f"off {' '.join(f'{x:.1f}' for x in off['per_run_mean_step_ms'])}",
        f"per pair on/off: {' '.join(f'{x:.3f}' for x in s['per_pair_mean_ratio'])}; run-to-run spread "
        f"(max-min)/median: on {on['per_run_spread']:.1%}, off {off['per_run_spread']:.1%}",
        (f"CPU during the runs: the S3 server (its own process) {server_on:.2f} cores on average in the on runs, "
         f"{server_off:.2f} in the off; "
         f"other processes up to {max(r['other_cpu_cores'] for r in runs):.2f} cores"),
        "checkpoints in the store (on runs; stored events / manifest PUTs / saved): " + ", ".join(
            f"{len(r['stored'])}/{len(r['manifests_put'])}/{len(r['checkpoints'])}" for r in runs if r["side"] == "on")
        + ("  all uploaded" if s["every_checkpoint_stored"] else "  NOT ALL UPLOADED"),
        (f"{s['verdict']}: {s['claim']}: the mean step is {s['mean_ratio_on_over_off'] - 1:+.1%} with the upload "
         f"(median step {s['median_ratio_on_over_off'] - 1:+.1%})" + why_failed(s)),
    ]
    lines.append(f"the upload's cost: {s['upload_cost_per_checkpoint_ms']:.0f} ms of training time per checkpoint "
                 f"(mean step difference x save_every; {on['checkpoint_step_ms'] - off['checkpoint_step_ms']:+.0f} ms "
                 f"in the interval holding the save, {on['other_step_ms'] - off['other_step_ms']:+.1f} ms in each "
                 "other one); "
                 f"at this step time it stays within {CLAIM:.0%} from save_every >= {s['save_every_for_claim']}")
    noise = max(on["per_run_spread"], off["per_run_spread"])
    if noise > CLAIM:
        ratios = s["per_pair_mean_ratio"]
        side_of_claim = ("every pair is above" if min(ratios) > 1 + CLAIM else
                         "every pair is within" if max(ratios) <= 1 + CLAIM else "the pairs fall on both sides of")
        lines.append(f"NOISY: runs of the same side differ by up to {noise:.0%} of their median, more than the "
                     f"{CLAIM:.0%} claimed; a difference that small is not resolved by {s['pairs']} pair(s) "
                     f"({side_of_claim} {1 + CLAIM:.2f}: on/off {min(ratios):.3f}..{max(ratios):.3f})")
    if max(r["other_cpu_cores"] for r in runs) > 0.1:
        lines.append("NOTE: other processes used CPU during the runs (shared host): step times are noisier "
                     "than on an idle machine")
    lines += [
        "",
        (f"2. checkpoint transfer: {t['config']} on {t['model']}: LoRA r={t['lora_r']} on {t['target_modules']}, "
         f"{t['lora_tensors']} tensors, {t['lora_parameters']:,} parameters; the checkpoint at step {t['run_steps']} "
         f"(the run's last); median of {t['repeats']}"),
    ]
    for c in t["cases"]:
        files = ", ".join(f"{name} {size / MIB:.2f}" for name, size in sorted(c["files"].items(), key=lambda x: -x[1]))
        lines.append(f"  {c['case']} (optimizer {c['optimizer']}): {c['mib']:.1f} MiB: {files} MiB; "
                     f"+ metrics.jsonl {c['history_bytes'] / MIB:.2f} MiB")
    lines.append(f"{'':34}{'MiB':>8}{'hash s':>9}{'upload s':>10}{'MiB/s':>8}{'download s':>12}{'MiB/s':>8}")
    for c in t["cases"]:
        lines.append(f"{c['case']:34}{c['mib']:>8.1f}{c['median_hash_s']:>9.2f}{c['median_upload_s']:>10.2f}"
                     f"{c['upload_mib_s']:>8.1f}{c['median_download_s']:>12.2f}{c['download_mib_s']:>8.1f}")
    lines += [
        "  upload = list + sha256 + multipart upload + history + manifest; download = download + size/sha256 check;",
        "  hash = sha256_of over the files alone (inside both). Loopback moto: this measures our code's, boto3's and",
        "  moto's overhead on this CPU, not a real network; a real store is bounded by the machine's link.",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="train.max_steps of each tiny run (default 60)")
    parser.add_argument("--save-every", type=int, default=5, help="train.save_every of the tiny runs (default 5)")
    parser.add_argument("--warmup", type=int, default=5, help="the step the timed window starts at (default 5)")
    parser.add_argument("--pairs", type=int, default=3, help="on/off pairs of tiny runs, order alternating (default 3)")
    parser.add_argument("--repeats", type=int, default=3, help="transfers of each checkpoint (default 3)")
    parser.add_argument("--quick", action="store_true", help="1 pair of 30 steps, 1 transfer, the configured case only")
    parser.add_argument("--json", type=Path, help="also write the results here, e.g. benchmarks/results/storage.json")
    parser.add_argument("--_serve-s3", type=Path, help=argparse.SUPPRESS)  # the server's own process (RemoteS3)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.pairs, args.repeats = 30, 1, 1
    if not (1 <= args.warmup < args.steps - 1 and args.pairs >= 1 and args.repeats >= 1 and args.save_every >= 1):
        parser.error("need 1 <= --warmup < --steps - 1, --pairs >= 1, --repeats >= 1, --save-every >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    import boto3
    import moto

    args = parse_args(argv)
    if args._serve_s3:
        serve_s3(args._serve_s3)
        return 0
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="storage-bench-") as tmp:
        work = Path(tmp)
        server = RemoteS3(work)
        try:
            server.make_bucket(BUCKET)
            step_runs = step_benchmark(server, work, args)
            steps = summarize_steps(step_runs, args)
            small, per_step, history_per_step = small_file_sizes(step_runs, work)
            transfer = transfer_benchmark(server, work, small, per_step, history_per_step, args)
        finally:
            server.stop()
    summary = {
        "host": {"cpu_count": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
                 "python": platform.python_version(), "boto3": boto3.__version__, "moto": moto.__version__,
                 "load_avg_1m_before": round(load_before, 2)},
        "steps": steps, "transfer": transfer, "seconds": round(time.monotonic() - started, 1),
        "command": "python benchmarks/storage.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    print(format_report(summary))
    print(f"\n(whole benchmark: {summary['seconds']:.0f} s)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    return 0 if steps["every_checkpoint_stored"] else 1


if __name__ == "__main__":
    sys.exit(main())
