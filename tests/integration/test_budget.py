"""The budget holds mid-run, through the real CLI: on a rented instance of the fake Vast.ai (real
sshd, real rsync, the tiny job trained for real) and on the local target with a $/h of your own.

The cap is set at about half a minute of the machine, on a job far longer than that, so the stop
lands mid-run however loaded the machine is. After the stop: the runner's checkpoint
of the step it stopped at is here, no instance is alive, the run cost no more than its cap and
its record matches what the fake billed; `launch resume` under the same cap starts nothing; with
a higher `--max-total` it goes on from that checkpoint (and stops again at the new cap), each
step once, with the losses of an uninterrupted run. The schedule is constant, so an
uninterrupted run of as many steps is the reference."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from launcher.estimate import STARTUP_HOURS
from launcher.runs import RunRecord
from tests.fakes.vast_api import FakeVast
from tests.helpers import tiny_job, train_losses, uninterrupted_losses
from tests.integration import fault_table
from tests.integration.conftest import Launcher, VastLauncher, output_of
from tests.integration.test_vast import assert_spent_matches, machines_of

LONG = 2000  # steps: minutes of training on the CPU, never reached under these caps
EXIT_BUDGET = 10


def long_job(path: Path, **resources) -> Path:
    return tiny_job(path, train={"max_steps": LONG, "save_every": 10, "eval_every": 1000, "scheduler": "constant",
                                 "warmup_ratio": 0.0},
                    resources={"python": sys.executable, **resources})


def checkpoint_steps(record: RunRecord) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (Path(record.run_dir) / "checkpoints").glob("checkpoint-*"))


def test_the_cap_stops_a_rented_run_mid_way_and_a_higher_cap_continues_it(tmp_path, vast: FakeVast):
    """The instances bill 27x their quote (a market that moved; the launcher warns): the plan,
    priced at the quote, lets the job in under a cap of its estimate, and the cap then holds at
    the $/h the instances really bill, about 40 s of one."""
    launcher = VastLauncher(tmp_path)
    launcher.fake = vast
    vast.price_drift = 26.0
    config = long_job(tmp_path / "job.yaml", providers=["vast"],
                      vast={"ssh_timeout_s": 5, "pull_stall_s": 3, "max_offers_tried": 2})
    plan = json.loads(launcher.run("plan", "--config", str(config), "--json").stdout)
    chosen = plan["offers"][plan["choice"]]
    cap = round(chosen["usd_per_hour"] * (chosen["est_hours"] + STARTUP_HOURS) * 1.05, 6)  # the estimate, +5 %
    billed_per_hour = chosen["usd_per_hour"] * 27

    proc = launcher.run("--config", str(config), "--yes", "--max-total", str(cap), timeout=300)
    out = output_of(proc)
    assert proc.returncode == EXIT_BUDGET, out[-4000:]
    (record,) = launcher.records()
    assert (record.status, record.stop_reason, record.exit_code) == ("stopped", "budget", 143)
    assert record.error.startswith("budget: ") and f"launch resume {record.id} --max-total" in record.error
    assert "stopped: budget" in out and "above the $" in out  # the summary; the price warning
    first_stop = record.step
    assert 0 < first_stop < LONG and record.pulled_step == first_stop  # the stop's own checkpoint, here
    assert vast.alive() == []
    machines = machines_of(launcher, record.id)
    assert [m["end_reason"] for m in machines] == ["stopped"]
    assert machines[0]["usd_per_hour"] == pytest.approx(billed_per_hour, rel=1e-3)  # counted at what it bills
    assert_spent_matches(machines, vast)
    assert vast.billed_usd() <= cap  # what the provider billed is within the cap

    refused = launcher.run("resume", record.id)
    assert refused.returncode == EXIT_BUDGET and "--max-total" in refused.stderr, output_of(refused)
    assert len(vast.instances) == 1  # nothing rented

    second_cap = round(cap + billed_per_hour * 30 / 3600, 6)  # half a minute more
    resumed = launcher.run("resume", record.id, "--max-total", str(second_cap), timeout=300)
    assert resumed.returncode == EXIT_BUDGET, output_of(resumed)[-4000:]
    (record,) = launcher.records()
    assert record.stop_reason == "budget" and record.step > first_stop
    assert f"pushing checkpoint-{first_stop}" in output_of(resumed)  # to the new instance, resumed from
    assert vast.alive() == [] and len(vast.instances) == 2
    machines = machines_of(launcher, record.id)
    assert [m["end_reason"] for m in machines] == ["stopped", "stopped"]
    assert_spent_matches(machines, vast)
    assert vast.billed_usd() <= second_cap

    got = train_losses(Path(record.run_dir))
    assert sorted(got) == list(range(1, record.step + 1))  # every step once
    reference = uninterrupted_losses(tiny_job(tmp_path / "ref.yaml", **_same_job(config, record.step)),
                                     tmp_path / "ref")
    assert got == pytest.approx(reference, abs=1e-5)
    # Not $ wasted: the job is longer than the clean run's; what the cap let it spend.
    fault_table.report("budget cap reached mid-run, then resume with a higher cap", "vast", recovered=True,
                       end_state="stopped: budget (twice)", steps_redone=0, orphans=len(vast.alive()))


def test_the_cap_holds_on_your_own_box_at_the_price_you_gave(launcher: Launcher):
    config = long_job(launcher.folder / "job.yaml")
    proc = launcher.run("--config", str(config), "--yes", "--usd-per-hour", "36", "--max-total", "0.30")  # 30 s
    out = output_of(proc)
    assert proc.returncode == EXIT_BUDGET, out[-4000:]
    (record,) = launcher.records()
    assert (record.status, record.stop_reason) == ("stopped", "budget") and 0 < record.step < LONG
    assert record.pulled_step == record.step and checkpoint_steps(record)[-1] == record.step
    assert 36 * record.elapsed_s / 3600 <= 0.30  # the runner's time, at the price given, within the cap
    listed = launcher.run("runs")
    assert "stopped: budget" in listed.stdout and "spent this month: $0.2" in listed.stdout
    refused = launcher.run("resume", record.id)
    assert refused.returncode == EXIT_BUDGET and len(refused.stderr.strip().splitlines()) == 1
    assert launcher.records()[0].started_at is None  # no runner started


def test_a_cap_on_a_free_box_is_refused_before_anything_runs(launcher: Launcher):
    config = long_job(launcher.folder / "job.yaml")
    proc = launcher.run("--config", str(config), "--yes", "--max-total", "5")
    assert proc.returncode == 2 and "--usd-per-hour" in proc.stderr
    assert launcher.records() == []


def _same_job(config: Path, steps: int) -> dict:
    """tiny_job overrides for the launched job's training, cut at `steps`."""
    import yaml

    raw = yaml.safe_load(config.read_text())
    return {"train": {**raw["train"], "max_steps": steps}}
