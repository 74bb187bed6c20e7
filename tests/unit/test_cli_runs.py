"""The run commands as a person reads them, run in-process at 80 columns: `launch runs` keeps the
ids whole, a unique start of an id names its run everywhere, `launch status` reads as a report,
and the summary says which train loss it shows."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console

from launcher import cli, job
from launcher.cli_runs import fit_columns, render_summary
from launcher.errors import UsageError
from launcher.runs import MachineRecord, RunNotFound, RunRecord, RunStore

LONG_ID = "20261201-221210-llama-3.1-8b-alpaca-8bcd"  # 40 characters: a real config's stem


@pytest.fixture
def store(monkeypatch, tmp_path) -> RunStore:
    monkeypatch.setenv("QLORA_LAUNCH_HOME", str(tmp_path / "home"))
    store = RunStore.default()
    yield store
    store.close()


def add(store: RunStore, run_id: str, tmp_path: Path, **fields) -> RunRecord:
    run_dir = tmp_path / "runs" / run_id
    run_dir.mkdir(parents=True)
    store.create(RunRecord(id=run_id, config_path="/c.yaml", run_dir=str(run_dir), target="local"))
    return store.update(run_id, **fields) if fields else store.get(run_id)


def launch(*argv: str) -> tuple[int, str, str]:
    out, err = Console(width=80, record=True), Console(width=300, record=True)
    code = cli.main(list(argv), console=out, errors=err)
    return code, out.export_text(), err.export_text()


def write_metrics(run_dir: Path, losses: list[float], evals: dict[int, float]) -> None:
    events = [{"event": "train", "step": i + 1, "loss": loss} for i, loss in enumerate(losses)]
    events += [{"event": "eval", "step": step, "eval_loss": loss} for step, loss in evals.items()]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))


# -- launch runs ---------------------------------------------------------------------------------


def test_runs_keeps_every_id_whole_at_80_columns(store, tmp_path):
    add(store, LONG_ID, tmp_path, status="running", target="ssh://someone@gpu-box.example.org:2222",
        gpu="NVIDIA RTX A6000", step=1234, total_steps=2000, started_at=time.time() - 3725)
    add(store, "20261201-221210-tiny-cpu-8bcd", tmp_path, status="interrupted", step=60, total_steps=120,
        elapsed_s=25.198313236236572)
    code, out, _ = launch("runs")
    assert code == 0
    assert LONG_ID in out and "20261201-221210-tiny-cpu-8bcd" in out
    assert "…" not in out
    assert max(map(len, out.splitlines())) <= 80
    assert "interrupted" in out and "1234/2000" in out  # status and steps stay; wide columns go first


def test_runs_drops_columns_in_order_and_never_cuts_the_id():
    columns = {"id": [LONG_ID], "status": ["running"], "target": ["vast:12345678"], "GPU": ["-"],
               "steps": ["1/2"], "elapsed": ["0:00:01"], "$": ["0.00"]}
    assert fit_columns(columns, 200) == list(columns)
    assert "GPU" not in fit_columns(columns, 80)  # an all-empty column is the first to go
    assert fit_columns(columns, 64) == ["id", "status", "steps"]
    assert fit_columns(columns, 20) is None  # then `launch runs` prints plain lines


def test_runs_narrower_than_an_id_prints_plain_lines(store, tmp_path, monkeypatch):
    add(store, LONG_ID, tmp_path, status="done")
    out = Console(width=30, record=True)
    assert cli.main(["runs"], console=out, errors=Console(record=True)) == 0
    assert f"{LONG_ID} done" in out.export_text()


# -- a unique start of a run id ------------------------------------------------------------------


def test_resolve_exact_then_unique_prefix_then_clear_errors(store, tmp_path):
    for run_id in ("20261201-221210-tiny-cpu-8bcd", "20261201-221210-tiny-cpu-8bcd2", "20261202-090000-big-0a1b"):
        add(store, run_id, tmp_path)
    assert store.resolve("20261201-221210-tiny-cpu-8bcd") == "20261201-221210-tiny-cpu-8bcd"  # exact wins
    assert store.resolve("20261202") == "20261202-090000-big-0a1b"
    with pytest.raises(UsageError, match="starts 2 run ids .*tiny-cpu-8bcd2.*type more characters"):
        store.resolve("20261201")
    with pytest.raises(RunNotFound, match="launch runs"):
        store.resolve("2027")
    with pytest.raises(RunNotFound):
        store.resolve("")  # not every run
    with pytest.raises(RunNotFound):
        store.resolve("2026_")  # _ is a character here, not a wildcard


def test_an_ambiguous_prefix_lists_five_candidates_and_exits_2(store, tmp_path):
    for i in range(7):
        add(store, f"20261201-00000{i}-tiny-cpu-abcd", tmp_path)
    code, _, err = launch("status", "2026")
    assert code == 2
    assert "'2026' starts 7 run ids" in err and "and 2 more" in err and "type more characters" in err
    assert err.count("-tiny-cpu-abcd") == 5


@pytest.mark.parametrize("argv", [["status"], ["logs"], ["logs", "-f"], ["attach"], ["resume"], ["pull"],
                                  ["down"], ["status", "--json"]])
def test_every_run_command_takes_a_prefix(store, tmp_path, monkeypatch, argv):
    add(store, LONG_ID, tmp_path)
    add(store, "20261202-090000-big-0a1b", tmp_path)

    def opened(store, run_id, *args, **kwargs):
        raise job.JobError(f"opened {run_id}", 2)

    monkeypatch.setattr(job, "open_session", opened)
    code, _, err = launch(argv[0], "20261201", *argv[1:])
    assert (code, err.strip()) == (2, f"error: opened {LONG_ID}")


def test_an_unknown_run_keeps_its_message(store):
    code, _, err = launch("status", "no-such-run")
    assert (code, err.strip()) == (2, "error: no run 'no-such-run' in the run records; `launch runs` lists them")


# -- launch status -------------------------------------------------------------------------------


def test_status_of_a_finished_run_reads_as_a_report(store, tmp_path):
    record = add(store, "20261201-221210-tiny-cpu-8bcd", tmp_path, status="done", exit_code=0, step=120,
                 total_steps=120, elapsed_s=365.0764183998108, gpu="NVIDIA A10G")
    run_dir = Path(record.run_dir)
    write_metrics(run_dir, [2.0] * 110 + [0.1] * 10, {80: 0.17, 120: 0.16015434})
    (run_dir / "eval.json").write_text(json.dumps({"test_loss": 0.18213716, "base_test_loss": 2.15458728}))
    code, out, _ = launch("status", "20261201")
    assert code == 0
    assert "20261201-221210-tiny-cpu-8bcd" in out and "done (exit code 0)" in out and "120/120" in out
    assert "0.1000 (the mean of the last 10 steps)" in out
    assert "0.1602 (at step 120)" in out and "0.1821 (the base model: 2.1546)" in out
    assert "local, GPU: NVIDIA A10G" in out and "0:06:05" in out and "$0 (your machine" in out
    assert "365.07" not in out and "elapsed_s" not in out  # no raw record
    assert f"`launch pull {record.id}` fetches the adapter" in out  # done, but no adapter here


def test_status_of_an_interrupted_run_names_the_error_and_resume(store, tmp_path):
    record = add(store, "20261201-221210-tiny-cpu-8bcd", tmp_path, status="interrupted", exit_code=137, step=60,
                 total_steps=120, elapsed_s=25.198313236236572, usd_per_hour=0.5,
                 error="the runner was killed (SIGKILL) at step 60")
    code, out, _ = launch("status", record.id)
    assert code == 0
    assert "interrupted (exit code 137)" in out and "killed (SIGKILL) at step 60" in out
    assert "0:00:25" in out and "$0.003" in out  # 25 s at $0.50/h, rounded
    assert f"`launch resume {record.id}` continues it" in out
    assert re.search(rf"\n  folder +{re.escape(record.run_dir)}\n", out)  # one line, never folded


def test_status_of_a_running_run_shows_the_runners_phase(store, tmp_path, monkeypatch):
    record = add(store, LONG_ID, tmp_path, status="running", remote_dir="/remote/run", pid=42, step=10,
                 total_steps=200, started_at=time.time() - 65)
    monkeypatch.setattr(job, "open_session", lambda store, run_id, **kw: SimpleNamespace(
        record=store.get(run_id), run_dir=Path(record.run_dir), holds_rented_machine=False, workspace=object(),
        machine=None, config=None))
    look = SimpleNamespace(alive=True, exit_code=None, complete_steps=[50],
                           status={"phase": "training", "step": 57, "total_steps": 200})
    monkeypatch.setattr(job, "look", lambda session: look)
    code, out, _ = launch("status", LONG_ID[:12])
    assert code == 0
    assert "running: training" in out and "57/200" in out and "0:01:0" in out and "so far" in out
    assert f"`launch attach {LONG_ID}` follows it" in out and f"`launch down {LONG_ID}` stops it" in out
    as_json = json.loads(launch("status", LONG_ID, "--json")[1])  # the JSON stays the record and the look
    assert as_json["run"]["id"] == LONG_ID and as_json["run"]["started_at"] == record.started_at
    assert as_json["live"] == {"alive": True, "exit_code": None, "phase": "training", "step": 57,
                               "total_steps": 200, "checkpoints_on_target": [50]}
    assert as_json["machines"] == [] and as_json["spent_usd"] is None


def test_status_of_a_rented_run_lists_its_machines_and_their_cost(store, tmp_path, monkeypatch):
    record = add(store, LONG_ID, tmp_path, status="preempted", exit_code=143, target="vast:222", provider="vast",
                 gpu="RTX 4090", step=300, total_steps=1000, elapsed_s=4000.4)
    now = time.time()
    store.add_machine(MachineRecord(LONG_ID, "vast:111", "vast", 0.35, now - 7200, gpu="RTX 4090", ended_at=now - 3600,
                                    end_reason="preempted"))
    store.add_machine(MachineRecord(LONG_ID, "vast:222", "vast", 0.40, now - 1800, gpu="RTX 4090", ended_at=now - 10,
                                    end_reason="preempted"))
    monkeypatch.setattr(job, "open_session", lambda store, run_id, **kw: SimpleNamespace(
        record=store.get(run_id), run_dir=Path(record.run_dir), holds_rented_machine=False, workspace=object(),
        machine=None, config=None))
    code, out, _ = launch("status", LONG_ID[:-1])
    assert code == 0
    assert "preempted (exit code 143)" in out and "vast:222, GPU: RTX 4090" in out
    assert "vast:111 RTX 4090 at $0.350/h for 1:00:00: $0.350, preempted" in out
    assert "1:06:40" in out and "$0.549" in out  # 0.35 + 0.40 * 1790 / 3600, rounded
    assert f"`launch resume {LONG_ID}` continues it from its newest checkpoint" in out


# -- the summary after a run ---------------------------------------------------------------------


def test_summary_names_the_train_loss_it_shows(store, tmp_path):
    record = add(store, "20261201-221210-tiny-cpu-8bcd", tmp_path, status="done", exit_code=0, step=40,
                 total_steps=40)
    run_dir = Path(record.run_dir)
    write_metrics(run_dir, [1.0] * 30 + [0.2, 0.4] * 5, {40: 0.35})
    console = Console(width=80, record=True)
    render_summary(console, job.Outcome(record, run_dir, evaluation={
        "test_loss": 0.31, "test_perplexity": 1.36, "base_test_loss": 2.1, "base_test_perplexity": 8.2}), [], 0.0)
    out = console.export_text()
    assert "train (last 10 steps)" in out and "the mean of the last 10 steps' losses" in out
    assert "0.3000" in out and "0.4000" not in out  # the mean of 0.2 and 0.4, not the last step
    assert "fine-tuned" in out and "base model" in out
