"""Each failure class exits with its own code and one line naming what to fix; no traceback
unless --debug. Real failures, not simulated: a missing file, an empty model folder, a real
allocation failure under an address-space limit."""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import time


from tests.helpers import read_json, run_runner, runner_command, tiny_job


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("qlora_runner: ")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def test_config_error_exit_3_names_the_key(tmp_path):
    config = tiny_job(tmp_path / "job.yaml", train={"lr": -1})
    proc = run_runner(config, tmp_path / "out")
    assert proc.returncode == 3
    assert "train.lr: must be > 0, got -1.0" in one_line_error(proc)
    status = read_json(tmp_path / "out" / "status.json")
    assert status["phase"] == "failed" and status["exit_code"] == 3 and "train.lr" in status["error"]


def test_data_error_exit_4_names_the_file(tmp_path):
    config = tiny_job(tmp_path / "job.yaml", data={"path": str(tmp_path / "missing.jsonl")})
    proc = run_runner(config, tmp_path / "out")
    assert proc.returncode == 4
    line = one_line_error(proc)
    assert "data.path" in line and "missing.jsonl" in line and "does not exist" in line


def test_model_that_cannot_load_exit_5(tmp_path):
    empty = tmp_path / "empty-model"
    empty.mkdir()
    config = tiny_job(tmp_path / "job.yaml", model={"base": str(empty)})
    proc = run_runner(config, tmp_path / "out")
    assert proc.returncode == 5
    line = one_line_error(proc)
    assert "model.base" in line and "empty-model" in line


def test_debug_shows_the_traceback(tmp_path):
    empty = tmp_path / "empty-model"
    empty.mkdir()
    config = tiny_job(tmp_path / "job.yaml", model={"base": str(empty)})
    proc = run_runner(config, tmp_path / "out", "--debug")
    assert proc.returncode == 5
    assert "Traceback" in proc.stderr


def test_out_of_memory_exit_6(tmp_path):
    """A batch whose attention scores need ~8 GB, under an 8 GB address-space limit: the CPU
    allocator really fails, and the runner says which knobs to turn."""
    words = "the cat says meow and the dog lives in a house".split()
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(words[i % len(words)] for i in range(3000))}) + "\n"
                            for _ in range(40)))
    config = tiny_job(tmp_path / "job.yaml", data={"path": str(data), "format": "completion", "max_length": 4096},
                      train={"micro_batch_size": 32, "max_steps": 2})

    def limit_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))

    proc = run_runner(config, tmp_path / "out", preexec_fn=limit_memory)
    assert proc.returncode == 6, proc.stderr[-2000:]
    line = one_line_error(proc)
    assert "out of memory" in line and "micro_batch_size 32" in line and "max_length 4096" in line


def test_refuses_to_train_over_an_existing_run(tmp_path):
    config = tiny_job(tmp_path / "job.yaml", train={"max_steps": 2, "save_every": 1})
    out = tmp_path / "out"
    assert run_runner(config, out).returncode == 0
    again = run_runner(config, out)
    assert again.returncode == 2
    assert "--resume auto" in one_line_error(again)
    done = run_runner(config, out, "--resume", "auto")  # resuming a finished run is a no-op
    assert done.returncode == 0 and "already done" in done.stdout


def test_sigterm_before_training_exits_143(tmp_path):
    config = tiny_job(tmp_path / "job.yaml")
    out = tmp_path / "out"
    proc = subprocess.Popen(runner_command(config, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (out / "status.json").exists():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    status = read_json(out / "status.json")
    assert status["phase"] == "preempted" and status["exit_code"] == 143
    assert not (out / "checkpoints").exists()
