#!/usr/bin/env python3
"""How much the QLoRA runner costs over a plain peft training loop, on the tiny CPU config.

    python benchmarks/runner_overhead.py          # 200 steps, 3 repeats, a table: ~2 min on 2 idle cores
    python benchmarks/runner_overhead.py --steps 60 --repeats 5 --json

Each repeat runs two child processes, one after the other, runner first:

    runner  runner/qlora_runner.py --config JOB --out DIR, as a user would run it, on
            configs/tiny-cpu.yaml with train.max_steps = --steps and save_every / eval_every
            past the last step (so no checkpoint or validation pass falls inside the timed steps;
            the runner's forced save and evaluation at the last step come after the last
            timestamp). Its steps and tokens come from DIR/metrics.jsonl.
    plain   this script again (--_plain), a hand-written loop on the same model and data:
            the runner's own load_config / load_tokenizer / prepare_data / collate /
            keep_cpu_4bit_kernel_fixed, BitsAndBytesConfig (the config's quant type, double
            quant, compute dtype float32), prepare_model_for_kbit_training (no gradient
            checkpointing), get_peft_model with the config's LoraConfig, torch.optim.AdamW with
            the config's lr and weight decay, the config's LR schedule, gradient clipping at
            train.max_grad_norm, shuffled batches of micro_batch_size (a new permutation each
            epoch, the short last batch kept, as the Trainer does).

What is measured, per child:
    steps/s, tokens/s   over optimizer steps warmup+1 .. steps, from the wall-clock timestamp
                        taken after each optimizer step (the runner's "time" field, written at the
                        Trainer's per-step log; the loop's own time.time()). Tokens are non-padding
                        input tokens (attention_mask), what the runner's tokens_per_s counts; for
                        the runner they are rebuilt as tokens_per_s x the step's interval.
    median step ms      the median interval between consecutive steps in the same window.
    peak RSS            ru_maxrss of that child alone (os.wait4 on its pid), the whole process:
                        for the runner that includes its evaluation, generation and saving.
    process wall s      the child's whole life (imports, load, data, training, eval, saves).
The overhead is runner time per step over plain time per step, minus one: (plain/runner steps/s) - 1.

What it does not measure: model load, data preparation, evaluation and saving time (only the
process wall column sees them), GPU behaviour (CPU only: the config's device is cpu), or the same
batch order (the Trainer's sampler and the loop's permutation differ; same data, same batch size,
same epoch structure; the token counts show any difference in batch lengths). Inside the timed
window the runner does everything it normally does per step: the Trainer's loop, the metrics.jsonl
append, the status.json rewrite (with fsync) and the progress line; that is the overhead measured.

On 2 CPU cores the results are only as quiet as the machine: another busy process makes torch's
OpenMP threads spin, and a step can take 100x longer. The CPU time other processes took during
each child (from /proc/stat, hypervisor steal included) is printed, with a warning above 0.1 cores.
Repeats alternate runner and plain, and the medians are reported.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from child_process import ROOT, run_child  # benchmarks/, this script's folder

RUNNER_FILE = ROOT / "runner" / "qlora_runner.py"
TINY_CONFIG = ROOT / "configs" / "tiny-cpu.yaml"
BUSY_HOST_CORES = 0.1  # other processes' CPU above this (in cores) makes the timings suspect

# One step's record, the same for both sides: (step, wall-clock time after the step, tokens).
StepRecord = tuple[int, float, float]


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------


@dataclass
class Throughput:
    steps: int  # optimizer steps in the timed window
    seconds: float
    tokens: int
    steps_per_s: float
    tokens_per_s: float
    median_step_ms: float


@dataclass
class ProcessUsage:
    """One child process's whole life, and what the rest of the machine did meanwhile."""

    peak_rss_mib: float
    wall_s: float
    cpu_s: float  # user + system
    other_cpu_cores: float  # CPU time of all other processes (and VM steal) over wall_s, in cores


@dataclass
class ChildRun:
    """One child process: its timed window and its process usage."""

    side: str  # "runner" or "plain"
    throughput: Throughput
    process: ProcessUsage
    final_loss: float  # the last step's training loss: both sides should end near each other
    window_events: list[str]  # non-train events (saves, evals) that fell inside the timed window


def window_throughput(records: list[StepRecord], warmup: int) -> Throughput:
    """Steps and tokens per second over steps warmup+1 .. last, timed from step `warmup`'s stamp."""
    by_step = {step: (t, tokens) for step, t, tokens in records}
    last = max(by_step)
    if warmup < 1 or last <= warmup + 1:
        raise ValueError(f"need at least 2 steps after {warmup} warm-up steps, got {last} steps")
    missing = [s for s in range(warmup, last + 1) if s not in by_step]
    if missing:
        raise ValueError(f"steps {missing[:5]} have no record; cannot time the window")
    times = [by_step[s][0] for s in range(warmup, last + 1)]
    intervals = [b - a for a, b in itertools.pairwise(times)]
    seconds = times[-1] - times[0]
    steps = last - warmup
    tokens = sum(by_step[s][1] for s in range(warmup + 1, last + 1))
    return Throughput(steps, seconds, round(tokens), steps / seconds, tokens / seconds,
                      1000 * statistics.median(intervals))


def runner_records(metrics_path: Path) -> tuple[list[StepRecord], list[dict[str, Any]], float]:
    """(train steps, other events, last loss) from the runner's metrics.jsonl. A train record's tokens
    are its tokens_per_s times the time since the previous train record (the runner's own definition)."""
    events = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [e for e in events if e["event"] == "train"]
    records: list[StepRecord] = []
    previous: float | None = None
    for e in train:
        tokens = e["tokens_per_s"] * (e["time"] - previous) if previous is not None else 0.0
        records.append((e["step"], e["time"], tokens))
        previous = e["time"]
    return records, [e for e in events if e["event"] != "train"], train[-1]["loss"]


def events_inside(events: list[dict[str, Any]], records: list[StepRecord], warmup: int) -> list[str]:
    start = next(t for step, t, _ in records if step == warmup)
    end = records[-1][1]
    return [f"{e['event']}@{e.get('step', '?')}" for e in events if "time" in e and start < e["time"] < end]


# ---------------------------------------------------------------------------------------------
# Child processes
# ---------------------------------------------------------------------------------------------


def write_job(path: Path, steps: int, settings: dict[str, Any] | None = None) -> Path:
    """The tiny config with absolute paths, `steps` optimizer steps and no save or eval before the end,
    and `settings` ("section.key" -> value, from --set) over it."""
    config = yaml.safe_load(TINY_CONFIG.read_text())
    for section, key in (("model", "base"), ("data", "path")):
        config[section][key] = str((TINY_CONFIG.parent / config[section][key]).resolve())
    config["train"].update(max_steps=steps, save_every=steps + 1, eval_every=steps + 1)
    config["eval"].update(samples=2, max_new_tokens=12)  # outside the timed window; keeps runs short
    for dotted, value in (settings or {}).items():
        section, key = dotted.split(".", 1)
        config.setdefault(section, {})[key] = value
    path.write_text(yaml.safe_dump(config))
    return path


def run_child_measured(command: list[str], log_path: Path) -> ProcessUsage:
    """Run `command` to completion: its own peak RSS, wall and CPU time, and the others' CPU meanwhile."""
    usage = run_child(command, log_path)
    other = max(0.0, usage.host_busy_s - usage.cpu_s) / usage.wall_s
    return ProcessUsage(usage.peak_rss_mib, usage.wall_s, usage.cpu_s, other)


def measure_runner(job: Path, work: Path, warmup: int) -> ChildRun:
    out = work / "runner-out"
    usage = run_child_measured([sys.executable, str(RUNNER_FILE), "--config", str(job), "--out", str(out)],
                      work / "runner.stdout")
    records, events, last_loss = runner_records(out / "metrics.jsonl")
    return ChildRun("runner", window_throughput(records, warmup), usage, last_loss,
                    events_inside(events, records, warmup))


def measure_plain(job: Path, work: Path, warmup: int) -> tuple[ChildRun, dict[str, Any]]:
    result_path = work / "plain.json"
    usage = run_child_measured([sys.executable, str(Path(__file__).resolve()), "--_plain", str(job),
                       "--_result", str(result_path)], work / "plain.stdout")
    result = json.loads(result_path.read_text())
    records = [(r["step"], r["time"], r["tokens"]) for r in result["steps"]]
    run = ChildRun("plain", window_throughput(records, warmup), usage, result["steps"][-1]["loss"], [])
    return run, result["environment"]


# ---------------------------------------------------------------------------------------------
# The plain peft loop (runs in its own child process)
# ---------------------------------------------------------------------------------------------


def import_runner() -> Any:
    """The runner file as module "qlora_runner"; registered before it runs, because its config
    schema resolves annotations through sys.modules."""
    spec = importlib.util.spec_from_file_location("qlora_runner", RUNNER_FILE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["qlora_runner"] = module
    spec.loader.exec_module(module)
    return module


def load_plain_model(runner: Any, cfg: Any, base: str) -> Any:
    """4-bit base model + LoRA, with peft and transformers directly, set up as the runner does on CPU."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.model.quantization,
                                      bnb_4bit_use_double_quant=cfg.model.double_quant,
                                      bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, device_map={"": "cpu"},
                                                 quantization_config=quantization)
    runner.keep_cpu_4bit_kernel_fixed(model)  # the same CPU 4-bit kernel as the runner
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def shuffled_batches(runner: Any, split: Any, batch_size: int, pad_id: int, seed: int) -> Iterator[dict[str, Any]]:
    """Endless batches: a new permutation each epoch, the short last batch kept (drop_last=False)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    n = len(split.input_ids)
    while True:
        order = torch.randperm(n, generator=generator).tolist()
        for start in range(0, n, batch_size):
            chosen = order[start:start + batch_size]
            yield runner.collate([{"input_ids": split.input_ids[i], "labels": split.labels[i]} for i in chosen], pad_id)


def plain_training(job: Path, result_path: Path) -> None:
    """Train for train.max_steps with a hand-written loop; write each step's timestamp and tokens."""
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    import torch
    from transformers import get_scheduler, set_seed

    runner = import_runner()
    cfg = runner.load_config(job)
    t = cfg.train
    if t.device != "cpu" or cfg.model.quantization == "none":
        raise SystemExit("the plain baseline mirrors the runner's CPU 4-bit path only (train.device: cpu, nf4/fp4)")
    set_seed(t.seed)  # before the model, as the runner does: the same LoRA initialisation
    base, _ = runner.resolve_local(cfg.model.base, job.parent)
    tokenizer = runner.load_tokenizer(base, cfg.model)
    data = runner.prepare_data(cfg, job.parent, tokenizer)
    model = load_plain_model(runner, cfg, base)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=t.lr,
                                  weight_decay=t.weight_decay)
    scheduler = get_scheduler(t.scheduler, optimizer, num_warmup_steps=math.ceil(t.warmup_ratio * t.max_steps),
                              num_training_steps=t.max_steps)
    batches = shuffled_batches(runner, data.train, t.micro_batch_size, tokenizer.pad_token_id, t.seed)
    model.train()
    steps = []
    for step in range(1, t.max_steps + 1):
        tokens, loss_sum = 0, 0.0
        for _ in range(t.grad_accum):
            batch = next(batches)
            loss = model(**batch).loss / t.grad_accum
            loss.backward()
            tokens += int(batch["attention_mask"].sum())
            loss_sum += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        steps.append({"step": step, "time": time.time(), "tokens": tokens, "loss": loss_sum})
    environment = {"torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                   "train_sequences": len(data.train.input_ids)}
    result_path.write_text(json.dumps({"steps": steps, "environment": environment}))


# ---------------------------------------------------------------------------------------------
# The benchmark and its report
# ---------------------------------------------------------------------------------------------


def benchmark(steps: int, repeats: int, warmup: int, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    load_before = os.getloadavg()[0]
    runs: dict[str, list[ChildRun]] = {"runner": [], "plain": []}
    environment: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="runner-overhead-") as tmp:
        job = write_job(Path(tmp) / "job.yaml", steps, settings)
        for repeat in range(1, repeats + 1):
            for side in ("runner", "plain"):
                work = Path(tmp) / f"{side}-{repeat}"
                work.mkdir()
                if side == "runner":
                    run = measure_runner(job, work, warmup)
                else:
                    run, environment = measure_plain(job, work, warmup)
                runs[side].append(run)
                print(f"repeat {repeat}/{repeats} {side:6}  {run.throughput.steps_per_s:6.2f} steps/s  "
                      f"{run.throughput.tokens_per_s:8.0f} tok/s  peak RSS {run.process.peak_rss_mib:.0f} MiB  "
                      f"wall {run.process.wall_s:.1f} s  other processes {run.process.other_cpu_cores:.2f} cores",
                      file=sys.stderr, flush=True)
    return summarize(runs, steps, repeats, warmup, environment, load_before, settings or {})


def median_of(runs: list[ChildRun], key: str) -> float:
    """The median over repeats of a Throughput or a ProcessUsage field."""
    group = "throughput" if key in {f.name for f in fields(Throughput)} else "process"
    return statistics.median(getattr(getattr(r, group), key) for r in runs)


def summarize(runs: dict[str, list[ChildRun]], steps: int, repeats: int, warmup: int, environment: dict[str, Any],
              load_before: float, settings: dict[str, Any]) -> dict[str, Any]:
    keys = ("steps_per_s", "tokens_per_s", "median_step_ms", "peak_rss_mib", "wall_s")
    medians = {side: {k: median_of(side_runs, k) for k in keys} for side, side_runs in runs.items()}
    ratio = medians["runner"]["steps_per_s"] / medians["plain"]["steps_per_s"]
    pair_ratios = [r.throughput.steps_per_s / p.throughput.steps_per_s for r, p in zip(runs["runner"], runs["plain"])]
    all_runs = runs["runner"] + runs["plain"]
    return {
        "host": {"cpu_count": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
                 "python": platform.python_version(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                 "load_avg_1m_before": round(load_before, 2),
                 "other_processes_cpu_cores_max": round(max(r.process.other_cpu_cores for r in all_runs), 3),
                 **environment},
        "config": str(TINY_CONFIG.relative_to(ROOT)),
        "runner_settings": settings,
        "max_steps": steps,
        "warmup_steps_skipped": warmup,
        "timed_steps": steps - warmup,
        "repeats": repeats,
        "median": medians,
        "runner_over_plain_steps_per_s": ratio,
        "overhead_percent": (1 / ratio - 1) * 100,
        "per_repeat_ratio": pair_ratios,
        "runner_events_inside_timed_window": sorted({e for r in runs["runner"] for e in r.window_events}),
        "runs": {side: [asdict(r) for r in side_runs] for side, side_runs in runs.items()},
    }


TABLE_ROWS = (  # label, format, key in the medians
    ("optimizer steps/s", "{:.2f}", "steps_per_s"),
    ("tokens/s (non-padding)", "{:.0f}", "tokens_per_s"),
    ("median step (ms)", "{:.1f}", "median_step_ms"),
    ("peak RSS (MiB)", "{:.0f}", "peak_rss_mib"),
    ("process wall (s)", "{:.1f}", "wall_s"),
)


def format_table(summary: dict[str, Any]) -> str:
    host = summary["host"]
    runner, plain = summary["median"]["runner"], summary["median"]["plain"]
    lines = [
        (f"runner overhead: {summary['config']}, max_steps {summary['max_steps']} (timed: steps "
         f"{summary['warmup_steps_skipped'] + 1}-{summary['max_steps']}), median of {summary['repeats']} "
         "repeats, runner and plain alternating"
         + "".join(f"; runner with {k}={v}" for k, v in summary["runner_settings"].items())),
        (f"host: {host['cpu_count']} CPUs ({host['cpus_usable']} usable), torch {host.get('torch')} with "
         f"{host.get('torch_threads')} threads; other processes (and VM steal) took at most "
         f"{host['other_processes_cpu_cores_max']:.2f} CPU cores during a run"),
        "",
        f"{'':24}{'runner':>12}{'plain peft':>12}{'runner/plain':>14}",
    ]
    for label, fmt, key in TABLE_ROWS:
        lines.append(f"{label:24}{fmt.format(runner[key]):>12}{fmt.format(plain[key]):>12}"
                     f"{runner[key] / plain[key]:>14.2f}")
    per_side = {side: " ".join(f"{r['throughput']['steps_per_s']:.2f}" for r in summary["runs"][side])
                for side in ("runner", "plain")}
    inside = summary["runner_events_inside_timed_window"]
    lines += [
        "",
        (f"overhead: {summary['overhead_percent']:+.1f}% time per optimizer step "
         f"(runner/plain steps/s {summary['runner_over_plain_steps_per_s']:.3f}; "
         f"per repeat {' '.join(f'{x:.3f}' for x in summary['per_repeat_ratio'])})"),
        f"steps/s per repeat: runner {per_side['runner']}; plain {per_side['plain']}",
        "runner saves/evals inside the timed window: " + (", ".join(inside) if inside else "none"),
    ]
    if host["other_processes_cpu_cores_max"] > BUSY_HOST_CORES:
        lines.append(f"WARNING: other processes were using CPU (up to {host['other_processes_cpu_cores_max']:.2f} "
                     "cores); on a shared 2-core host that distorts both sides, rerun on a quiet machine")
    return "\n".join(lines)


def parse_setting(parser: argparse.ArgumentParser, text: str) -> tuple[str, Any]:
    dotted, equals, value = text.partition("=")
    if not equals or "." not in dotted:
        parser.error(f"--set {text!r}: write SECTION.KEY=VALUE, e.g. --set train.kernels=none")
    return dotted, yaml.safe_load(value)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Runner vs plain peft loop throughput and memory (see the docstring).")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per run (train.max_steps)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side, alternating; medians reported")
    parser.add_argument("--warmup", type=int, default=10, help="first steps left out of the timing")
    parser.add_argument("--json", action="store_true", help="print a JSON object instead of the table")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a config value for the runner's side, e.g. train.kernels=none or data.packing=false "
                             "(YAML value; repeatable); the plain loop is unchanged (padded batches, the model's loss)")
    parser.add_argument("--_plain", type=Path, help=argparse.SUPPRESS)  # internal: run the plain loop on this job
    parser.add_argument("--_result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.settings = dict(parse_setting(parser, text) for text in args.settings)
    if args._plain is None and not (1 <= args.warmup <= args.steps - 2 and args.repeats >= 1):
        parser.error("need --repeats >= 1 and 1 <= --warmup <= --steps - 2")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._plain is not None:
        plain_training(args._plain, args._result)
        return 0
    summary = benchmark(args.steps, args.repeats, args.warmup, args.settings)
    print(json.dumps(summary, indent=2) if args.json else format_table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
