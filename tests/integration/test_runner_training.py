"""The runner trains a real (tiny) Llama in 4-bit NF4 on the CPU, and survives SIGTERM and kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration import fault_table
from tests.helpers import load_runner_module, read_json, run_runner, runner_command, tiny_job, train_losses

STEPS = 40


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path]:
    """One uninterrupted run: the outputs under test and the losses a resumed run must match."""
    root = tmp_path_factory.mktemp("reference")
    config = tiny_job(root / "job.yaml")
    out = root / "out"
    proc = run_runner(config, out)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return config, out


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120, interval: float = 0.01) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"runner exited with {proc.returncode} before the condition held"
        assert time.time() < deadline, "timed out"
        time.sleep(interval)


def last_step(out: Path) -> int:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return 0
    steps = [json.loads(line).get("step", 0) for line in lines if line.endswith("}")]
    return max(steps, default=0)


def test_training_in_4bit_lowers_the_test_loss(reference):
    _, out = reference
    report = read_json(out / "eval.json")
    assert report["train_steps"] == STEPS
    assert report["test_loss"] < 0.5 * report["base_test_loss"], report
    assert report["test_perplexity"] == pytest.approx(2.718281828 ** report["test_loss"], rel=1e-6)
    status = read_json(out / "status.json")
    assert (status["phase"], status["step"], status["total_steps"], status["exit_code"]) == ("done", STEPS, STEPS, 0)
    assert 8 < status["train_seq_tokens"] < 64  # the mean training sequence: short facts, max_length 64


def test_run_directory_matches_the_contract(reference):
    _, out = reference
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["event"] == "train"]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert all({"loss", "lr", "tokens_per_s", "epoch", "time"} <= set(r) for r in train)
    assert all(r["tokens_per_s"] > 0 for r in train)
    assert [r["step"] for r in records if r["event"] == "eval"] == [20, 40]
    assert [r["event"] for r in records][0] == "base_eval" and records[-1]["event"] == "done"

    runner = load_runner_module()
    kept = runner.complete_checkpoints(out / "checkpoints")
    assert [step for step, _ in kept] == [20, 30, 40]  # keep_checkpoints: 3, oldest dropped
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-20", "checkpoint-30", "checkpoint-40"]
    for _, path in kept:
        assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json",
                runner.MANIFEST} <= {p.name for p in path.iterdir()}

    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2
    for s in samples:
        assert set(s) == {"prompt", "reference", "before", "after"}
        assert s["prompt"].startswith("### Instruction:") and s["reference"].startswith("A ")
    log = (out / "runner.log").read_text()
    assert "base model test loss" in log and "done" in log


def test_adapter_loads_back_with_peft_and_generates_the_same(reference):
    import bitsandbytes as bnb
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    runner = load_runner_module()
    config, out = reference
    cfg = runner.load_config(config)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(cfg.model.base, quantization_config=quant, device_map={"": "cpu"})
    runner.keep_cpu_4bit_kernel_fixed(base)
    model = PeftModel.from_pretrained(base, out / "adapter")
    tokenizer = AutoTokenizer.from_pretrained(out / "adapter")
    assert isinstance(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)

    sample = json.loads((out / "samples.jsonl").read_text().splitlines()[0])
    ids = tokenizer(sample["prompt"], add_special_tokens=True, return_tensors="pt")["input_ids"]
    generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                               do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True).strip() == sample["after"]


def test_sigterm_checkpoints_and_resume_matches_uninterrupted(reference, tmp_path):
    config, ref_out = reference
    out = tmp_path / "out"
    proc = subprocess.Popen(runner_command(config, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: last_step(out) >= 13, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr

    status = read_json(out / "status.json")
    stopped = status["step"]
    assert status["phase"] == "preempted" and 13 <= stopped < STEPS
    runner = load_runner_module()
    assert runner.complete_checkpoints(out / "checkpoints")[-1][0] == stopped  # saved at the current step

    resumed = run_runner(config, out, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from checkpoint-{stopped}" in resumed.stdout
    expected, got = train_losses(ref_out), train_losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert max(abs(expected[s] - got[s]) for s in expected) < 1e-5
    assert read_json(out / "eval.json")["test_loss"] == pytest.approx(read_json(ref_out / "eval.json")["test_loss"], abs=1e-5)
    fault_table.report("runner SIGTERM (it checkpoints), then resume", "runner", recovered=True, end_state="done",
                       steps_redone=0)


def test_a_checkpoint_carries_its_history_and_a_resume_puts_back_lines_the_run_folder_lost(reference, tmp_path):
    """The launcher's copy of metrics.jsonl can lag the checkpoint it pulled (its stream cut
    before the last lines): a resume from that checkpoint takes the steps before it from the
    checkpoint's own copy, so the history holds every step once."""
    config, ref_out = reference
    out = tmp_path / "out"
    proc = subprocess.Popen(runner_command(config, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: last_step(out) >= 13, proc)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    runner = load_runner_module()
    stopped, checkpoint = runner.complete_checkpoints(out / "checkpoints")[-1]
    assert (checkpoint / "metrics.jsonl").is_file()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("".join(line + "\n" for line in lines[:4]))  # the lagging copy
    resumed = run_runner(config, out, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [e["step"] for e in events if e["event"] == "train"]
    assert sorted(steps) == list(range(1, STEPS + 1)) and len(steps) == len(set(steps))
    expected, got = train_losses(ref_out), train_losses(out)
    assert max(abs(expected[s] - got[s]) for s in expected) < 1e-5


def test_kill9_during_save_leaves_no_checkpoint_and_resume_ignores_it(reference, tmp_path):
    config, ref_out = reference
    out = tmp_path / "out"
    incoming = out / "checkpoints" / ".incoming"
    proc = subprocess.Popen(runner_command(config, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = None
    while proc.poll() is None and partial is None:  # kill -9 the moment a save has begun
        try:
            partial = next((e.name for e in os.scandir(incoming) if e.name.startswith("checkpoint-")), None)
        except FileNotFoundError:
            pass
        if partial:
            proc.kill()
        else:
            time.sleep(0.0005)
    proc.wait()
    assert partial is not None, "the run ended before a save could be caught mid-way"
    assert proc.returncode == -signal.SIGKILL
    runner = load_runner_module()
    killed_at = int(partial.split("-")[1])
    assert killed_at not in [step for step, _ in runner.complete_checkpoints(out / "checkpoints")]

    resumed = run_runner(config, out, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    previous = killed_at - 10
    expected_line = f"resuming from checkpoint-{previous}" if previous > 0 else "no complete checkpoint yet"
    assert expected_line in resumed.stdout
    assert not incoming.exists()
    expected, got = train_losses(ref_out), train_losses(out)
    assert max(abs(expected[s] - got[s]) for s in expected) < 1e-5
    fault_table.report("runner SIGKILL while writing a checkpoint, then resume", "runner", recovered=True,
                       end_state="done", steps_redone=killed_at - max(previous, 0))
