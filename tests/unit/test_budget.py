"""The budget held while a run goes (launcher/budget.py, job.py's looks): on the memory cloud of
test_lifecycle, with real run records. Time on a machine is made by moving its record's start
back (an hour at $0.20/h is $0.20), so nothing waits and the figures are exact.

What it pins: the cap reached mid-run stops the runner with a checkpoint (TERM, not KILL), pulls
it, releases the machine, records `stopped: budget` with the resume line, and the launcher exits
10; a resume over the cap starts nothing, a resume with a higher --max-total goes on to the same
losses; a recovery after a preemption counts what the lost machine cost; the margin is measured
from the run's own metrics; `launch runs`' month total counts machine time inside the month."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from launcher import budget, job
from launcher.errors import EXIT_BUDGET
from launcher.runs import MachineRecord, RunRecord, RunStore
from tests.unit.test_lifecycle import UNINTERRUPTED, Recorder, World, train_losses, world  # noqa: F401  (fixture)


def an_hour_passes_at_step(world: World, session: job.Session, step: int) -> Recorder:
    """A reporter that, when step `step` is shown, moves the run's open machine's start an hour
    back: from then on it has cost $/h more than it had."""
    def hook(kind: str, what: object) -> bool:
        if kind == "metric" and isinstance(what, dict) and what.get("step") == step:
            world.store._db.execute("UPDATE machines SET started_at = started_at - 3600 WHERE run_id = ? "
                                    "AND ended_at IS NULL", [session.record.id])
        return False

    return Recorder(interrupt=hook)


def test_the_cap_reached_mid_run_checkpoints_pulls_releases_and_records_stopped_budget(world: World):
    session = world.session(max_total_usd=0.15)
    at_step_12 = an_hour_passes_at_step(world, session, 12)
    outcome = world.launch(session, at_step_12)
    record = world.record(session.record.id)
    assert (record.status, record.stop_reason, record.exit_code, outcome.exit_code) == ("stopped", "budget", 143,
                                                                                       EXIT_BUDGET)
    # Told to checkpoint (TERM, no KILL), that checkpoint pulled here, the machine released once.
    assert world.cloud.called("signal") == [("signal", "101", record.pid, "TERM")]
    assert record.pulled_step == record.step and record.step < 40
    assert world.cloud.terminations("101") == 1 and world.cloud.alive() == []
    assert world.end_reasons(record.id) == ["stopped"]
    assert record.error.startswith("budget: $0.2") and "$0.15 cap" in record.error
    assert f"launch resume {record.id} --max-total 1.20" in record.error
    assert any(w.startswith("budget:") for w in at_step_12.warnings)

    # Resumed under the same cap: nothing is rented, the run stays stopped for the budget.
    with pytest.raises(job.JobError) as refused:
        job.resume(world.reopen(record.id), Recorder())
    assert refused.value.exit_code == EXIT_BUDGET and "--max-total" in str(refused.value)
    assert len(world.cloud.called("provision")) == 1 and world.record(record.id).stop_reason == "budget"

    # A higher cap: the run goes on to the uninterrupted run's losses, each step once; the new
    # cap is kept in the run's job file for later recoveries.
    resumed = job.resume(world.reopen(record.id), Recorder(), max_total_usd=5.0)
    record = world.record(record.id)
    assert (resumed.exit_code, record.status, record.stop_reason) == (0, "done", None)
    assert train_losses(Path(record.run_dir)) == UNINTERRUPTED
    assert world.reopen(record.id).loaded_config().resources.max_total_usd == 5.0
    assert world.cloud.alive() == []


def test_a_recovery_counts_what_the_lost_machine_cost(world: World):
    world.cloud.preempt_at(15)
    session = world.session(max_total_usd=0.25, recover=False)
    world.launch(session)
    run_id = session.record.id
    assert world.record(run_id).status == "preempted"
    # The lost machine ran an hour at $0.20: $0.20 of the $0.25 is gone before the next one starts.
    world.store._db.execute("UPDATE machines SET started_at = ended_at - 3600 WHERE run_id = ?", [run_id])
    with pytest.raises(job.JobError) as refused:
        job.resume(world.reopen(run_id), Recorder(), max_total_usd=0.2001)
    assert refused.value.exit_code == EXIT_BUDGET and "$0.2000 of the run's $0.20 cap" in str(refused.value)
    assert len(world.cloud.called("provision")) == 1 and world.cloud.alive() == []  # nothing rented
    resumed = job.resume(world.reopen(run_id), Recorder(), max_total_usd=0.25)
    assert resumed.exit_code == 0 and world.record(run_id).status == "done"
    assert world.end_reasons(run_id) == ["preempted", "done"]


def test_a_run_under_its_cap_is_not_touched(world: World):
    session = world.session(max_total_usd=100.0)
    outcome = world.launch(session)
    assert outcome.exit_code == 0 and world.cloud.called("signal") == []


def test_the_margin_is_the_runs_own_step_save_and_pull():
    metrics = [{"event": "train", "step": s, "time": 100.0 + 2 * s} for s in range(1, 11)]
    metrics.insert(5, {"event": "checkpoint", "step": 5, "time": 110.0 + 3.5})  # step 5 logged at 110, saved 3.5 s on
    assert budget.step_s(metrics) == pytest.approx(2.0)
    assert budget.save_s(metrics) == pytest.approx(3.5)
    assert budget.margin_s(metrics, longest_pull_s=4.0, poll_s=2.0) == pytest.approx(2.0 + 2.0 + 3.5 + 2 * 4.0
                                                                                   + budget.STOP_S)
    # Before anything is measured: the guesses (from the checkpoint's size).
    guess = budget.Guess(save_s=7.0, pull_s=9.0)
    assert budget.margin_s([], longest_pull_s=None, poll_s=2.0, guess=guess) == pytest.approx(
        2.0 + 0 + 7.0 + 2 * 9.0 + budget.STOP_S)
    spend = budget.Spend(cap_usd=1.0, spent_usd=0.99, usd_per_hour=3.6, margin_s=10.0)  # $0.01 margin
    assert spend.margin_usd == pytest.approx(0.01) and spend.reached
    assert not budget.Spend(cap_usd=1.0, spent_usd=0.98, usd_per_hour=3.6, margin_s=10.0).reached


def test_the_guess_scales_with_the_adapter(tmp_path):
    from launcher.config import load
    from tests.helpers import tiny_job

    small = budget.Guess.for_job(load(tiny_job(tmp_path / "a.yaml", lora={"r": 4})))
    large = budget.Guess.for_job(load(tiny_job(tmp_path / "b.yaml", lora={"r": 64})))
    assert 1.0 < small.save_s < large.save_s and 2.0 < small.pull_s < large.pull_s


def test_the_month_total_counts_machine_time_inside_the_month(tmp_path):
    store = RunStore(tmp_path / "runs.sqlite")
    since = budget.month_start()
    store.create(RunRecord(id="old", config_path="c", run_dir="r", provider="memory"))
    store.add_machine(MachineRecord(run_id="old", target="m:1", provider="memory", usd_per_hour=3.6,
                                    started_at=since - 1000, ended_at=since + 100))  # 100 s this month: $0.10
    store.create(RunRecord(id="own", config_path="c", run_dir="r", usd_per_hour=36.0, elapsed_s=10.0))  # $0.10
    assert budget.month_usd(store, since) == pytest.approx(0.20)
    assert budget.month_start() <= time.time() and time.localtime(since).tm_mday == 1


def test_launch_runs_shows_why_a_run_stopped_and_the_months_spend(world: World, capsys):
    import argparse

    from rich.console import Console

    from launcher.cli_runs import cmd_runs

    session = world.session(max_total_usd=0.15)
    world.launch(session, an_hour_passes_at_step(world, session, 12))
    console = Console(width=200, record=True)
    assert cmd_runs(argparse.Namespace(limit=50, json=False), world.store, console, console) == 0
    text = console.export_text()
    assert "stopped: budget" in text and "spent this month: $0.2" in text
    listed = Console(width=200, record=True)
    cmd_runs(argparse.Namespace(limit=50, json=True), world.store, listed, listed)
    (row,) = json.loads(listed.export_text())
    assert row["stop_reason"] == "budget" and row["spent_usd"] == pytest.approx(0.20, abs=0.01)
