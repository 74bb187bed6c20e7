"""Run records survive the process that wrote them and refuse what they cannot hold."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from launcher.job import run_status
from launcher.runs import MeasuredSpeed, RunNotFound, RunRecord, RunStore, state_dir
from tests.helpers import ROOT


def record(run_id: str) -> RunRecord:
    return RunRecord(id=run_id, config_path="/c.yaml", run_dir=f"/runs/{run_id}", target="local")


def test_records_persist_across_connections_and_processes(tmp_path):
    path = tmp_path / "runs.sqlite"
    store = RunStore(path)
    store.create(record("a"))
    store.update("a", status="running", step=3, total_steps=10)
    store.close()
    # Another process (a launcher started after this one died) sees what was recorded.
    code = ("import sys; from launcher.runs import RunStore; r = RunStore(__import__('pathlib').Path(sys.argv[1]))"
            ".get('a'); print(r.status, r.step, r.total_steps)")
    out = subprocess.run([sys.executable, "-c", code, str(path)], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["running", "3", "10"]


def test_list_is_newest_first_and_get_unknown_is_clear(tmp_path):
    store = RunStore(tmp_path / "runs.sqlite")
    for run_id in ("first", "second", "third"):
        store.create(record(run_id))
    assert [r.id for r in store.list()] == ["third", "second", "first"]
    assert [r.id for r in store.list(limit=1)] == ["third"]
    with pytest.raises(RunNotFound, match="launch runs"):
        store.get("nope")
    with pytest.raises(RunNotFound):
        store.update("nope", status="done")


def test_update_refuses_unknown_fields_and_statuses(tmp_path):
    store = RunStore(tmp_path / "runs.sqlite")
    store.create(record("a"))
    with pytest.raises(ValueError, match="api_key"):
        store.update("a", api_key="secret")
    with pytest.raises(ValueError, match="id"):
        store.update("a", id="b")
    with pytest.raises(ValueError, match="unknown run status"):
        store.update("a", status="finished")
    assert store.get("a").status == "created"


def test_state_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("QLORA_LAUNCH_HOME", str(tmp_path / "home"))
    assert state_dir() == tmp_path / "home"
    monkeypatch.delenv("QLORA_LAUNCH_HOME")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert state_dir() == tmp_path / "xdg" / "qlora-launch"
    monkeypatch.delenv("XDG_STATE_HOME")
    assert state_dir() == Path.home() / ".local" / "state" / "qlora-launch"


@pytest.mark.parametrize("code, status", [(0, "done"), (143, "preempted"), (130, "interrupted"), (3, "failed"),
                                          (6, "failed"), (-9, "failed"),
                                          (137, "interrupted"), (None, "interrupted")])
def test_runner_exit_codes_map_to_statuses(code, status):
    assert run_status(code) == status


def test_records_of_an_older_launcher_gain_the_new_columns(tmp_path):
    import sqlite3

    path = tmp_path / "runs.sqlite"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE runs (id TEXT PRIMARY KEY, config_path TEXT, run_dir TEXT, target TEXT, status TEXT, "
               "gpu TEXT, step INTEGER, total_steps INTEGER, usd_per_hour REAL, exit_code INTEGER, error TEXT, "
               "created_at REAL, updated_at REAL, ended_at REAL)")
    db.execute("INSERT INTO runs VALUES ('old', 'c.yaml', 'runs/old', 'local', 'done', NULL, 5, 5, 0, 0, NULL, 1, 1, 2)")
    db.commit()
    db.close()
    store = RunStore(path)
    old = store.get("old")
    assert (old.status, old.step, old.remote_dir, old.pid) == ("done", 5, None, None)
    assert store.update("old", pulled_step=5).pulled_step == 5


def test_measured_speeds_are_the_finished_runs_of_the_model_with_their_shape(tmp_path):
    store = RunStore(tmp_path / "runs.sqlite")
    for i, (gpu, rate, status) in enumerate([("NVIDIA A10G", 1000.0, "done"), ("NVIDIA A10G", 9.0, "failed"),
                                             ("NVIDIA L4", 800.0, "done")]):
        store.create(RunRecord(id=f"r{i}", config_path="c", run_dir="d", target="t", model="m", micro_batch=2,
                               gradient_checkpointing=i == 0, ended_at=float(i)))
        store.update(f"r{i}", gpu=gpu, tokens_per_s=rate, status=status, seq_tokens=300.5)
    store.create(RunRecord(id="old", config_path="c", run_dir="d", target="t", model="m", ended_at=9.0))
    store.update("old", gpu="NVIDIA L4", tokens_per_s=700.0, status="done")  # no shape: an older record
    store.create(RunRecord(id="other", config_path="c", run_dir="d", target="t", model="another"))
    store.update("other", gpu="NVIDIA L4", tokens_per_s=5.0, status="done")
    assert store.measured_speeds("m") == [
        MeasuredSpeed("NVIDIA A10G", 1000.0, 2, 300.5, True), MeasuredSpeed("NVIDIA L4", 800.0, 2, 300.5, False),
        MeasuredSpeed("NVIDIA L4", 700.0)]
