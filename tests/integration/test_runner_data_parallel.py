"""Data parallel for real, on the CPU: the tiny 4-bit job under `accelerate launch` with two ranks
(gloo), started by the line the launcher runs (launcher.distributed.runner_command, cpu=True) in a
run folder laid out as the launcher's workspace lays it out (the runner and job.yaml, `--out .`),
inside a wrapper shell that records the exit code, as the launcher's machines start it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import psutil
import pytest

from launcher.distributed import Topology, runner_command, runner_environment
from tests.helpers import RUNNER_FILE, load_runner_module, read_json, tiny_job, train_losses

STEPS = 16
TWO_RANKS = Topology(gpus_per_node=2)
# The same job for one process and for two ranks: one process accumulates 4 micro-batches of 2, each
# rank 2 (train.grad_accum is per process; the global batch, 8, is kept). LoRA dropout 0: each rank
# draws dropout masks from the same seed, so rank 1 gets the masks one process draws for rank 0's
# micro-batch, not for its own; with dropout 0.05 the curves differ by up to 0.14 (measured), a
# difference in randomness, not in training.
JOB = {"train": {"max_steps": STEPS, "micro_batch_size": 2, "grad_accum": 4, "save_every": 5, "eval_every": 8},
       "lora": {"dropout": 0.0}, "eval": {"samples": 1, "max_new_tokens": 4}}
# Same samples in the same micro-batches (accelerate's seeded sampler, batches dealt to the ranks in
# turn); what differs is the order of the float sums (gradients all-reduced across the ranks instead
# of accumulated in one process, the token counts gathered): measured up to 2e-6 over the run.
LOSS_TOLERANCE = 1e-4


def last_step(out: Path) -> int:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return 0
    return max((json.loads(line).get("step", 0) for line in lines if line.endswith("}")), default=0)


def wait_for(predicate: Callable[[], bool], proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended ({proc.returncode}) before the condition held"
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


def run_folder(root: Path) -> Path:
    out = root / "run"
    out.mkdir(parents=True)
    shutil.copy2(RUNNER_FILE, out / RUNNER_FILE.name)
    tiny_job(out / "job.yaml", **JOB)
    return out


def start(out: Path, topology: Topology, *extra: str) -> subprocess.Popen:
    command = runner_command(sys.executable, ["--config", "job.yaml", "--out", ".", *extra], topology, cpu=True)
    # One thread per process: two ranks on two cores, and the same float sums in both runs.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **runner_environment(topology)}
    return subprocess.Popen(["sh", "-c", f"{command}; echo $? > exit_code"], cwd=out, env=env, start_new_session=True,
                            stdout=(out / "console.log").open("w"), stderr=subprocess.STDOUT)


def finish(wrapper: subprocess.Popen, out: Path, timeout: float = 240) -> int:
    try:
        wrapper.wait(timeout=timeout)
    finally:
        if wrapper.poll() is None:
            os.killpg(wrapper.pid, signal.SIGKILL)  # the ranks follow their parent (PR_SET_PDEATHSIG)
    code = int((out / "exit_code").read_text())
    return code


def run(root: Path, topology: Topology) -> Path:
    out = run_folder(root)
    code = finish(start(out, topology), out)
    assert code == 0, (out / "console.log").read_text()[-3000:]
    return out


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    return run(tmp_path_factory.mktemp("one"), Topology())


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    return run(tmp_path_factory.mktemp("two"), TWO_RANKS)


def test_two_ranks_train_and_only_rank_0_writes_the_run(two_ranks):
    out = two_ranks
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "train"] == list(range(1, STEPS + 1))  # one line a step
    assert [r["step"] for r in records if r["event"] == "checkpoint"] == [5, 10, 15, 16]
    assert [r["step"] for r in records if r["event"] == "eval"] == [8, 16]
    assert [r["event"] for r in records].count("base_eval") == 1 and records[-1]["event"] == "done"
    status = read_json(out / "status.json")
    assert (status["phase"], status["step"], status["exit_code"]) == ("done", STEPS, 0)
    assert read_json(out / "eval.json")["train_steps"] == STEPS
    assert len((out / "samples.jsonl").read_text().splitlines()) == 1

    runner = load_runner_module()
    assert [s for s, _ in runner.complete_checkpoints(out / "checkpoints")] == [10, 15, 16]
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in (out / "checkpoints" / "checkpoint-16").iterdir()}
    assert not (out / "checkpoints" / ".incoming").exists()

    log = (out / "runner.log").read_text().splitlines()
    said = [line for line in log if not line.startswith("[rank 1] ")]  # rank 0's lines, and rank 1's marked
    assert sum("data parallel: 2 ranks on 1 node(s), each micro_batch_size 2 x grad_accum 2: global batch 8" in line
               for line in said) == 1
    assert sum("] step 1/16 " in line for line in said) == 1
    assert sum("loading " in line for line in log) == 1


def test_the_loss_curve_matches_one_process_with_the_same_global_batch(one_process, two_ranks):
    expected, got = train_losses(one_process), train_losses(two_ranks)
    assert sorted(got) == sorted(expected) == list(range(1, STEPS + 1))
    assert max(abs(expected[s] - got[s]) for s in expected) < LOSS_TOLERANCE
    one, two = read_json(one_process / "eval.json"), read_json(two_ranks / "eval.json")
    assert two["base_test_loss"] == pytest.approx(one["base_test_loss"], abs=1e-6)  # scored by both ranks, summed
    assert two["test_loss"] == pytest.approx(one["test_loss"], abs=LOSS_TOLERANCE)


def test_sigterm_to_the_launched_process_checkpoints_once_then_resume_completes(two_ranks, tmp_path):
    out = run_folder(tmp_path)
    wrapper = start(out, TWO_RANKS)
    try:
        wait_for(lambda: last_step(out) >= 6, wrapper)
        [launched] = psutil.Process(wrapper.pid).children()  # the launcher TERMs its wrapper's child
        ranks = launched.children()
        assert len(ranks) == 2
        launched.send_signal(signal.SIGTERM)
    finally:
        code = finish(wrapper, out, timeout=120)
    assert code == 143, (out / "console.log").read_text()[-3000:]
    assert not any(p.is_running() for p in ranks)

    status = read_json(out / "status.json")
    stopped = status["step"]
    assert status["phase"] == "preempted" and 6 <= stopped < STEPS
    saved = sorted({s for s in (5, 10, 15) if s < stopped} | {stopped})
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "checkpoint"] == saved  # one save at the stop, by rank 0
    runner = load_runner_module()
    assert [s for s, _ in runner.complete_checkpoints(out / "checkpoints")] == saved[-3:]

    code = finish(start(out, TWO_RANKS, "--resume", "auto"), out)
    assert code == 0, (out / "console.log").read_text()[-3000:]
    assert f"resuming from checkpoint-{stopped}" in (out / "runner.log").read_text()
    expected, got = train_losses(two_ranks), train_losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert max(abs(expected[s] - got[s]) for s in expected) < 1e-5  # each rank's RNG and data position restored
    assert read_json(out / "status.json")["phase"] == "done"
    assert read_json(out / "eval.json")["train_steps"] == STEPS
