"""The run lifecycle (launcher/job.py) on the memory cloud (tests/fakes/memory_provider.py): a
renting provider and a simulated runner in memory, a real job config, real run records in a
temporary state directory, the real planning and renting paths. No process, no socket, no
sleep: each test takes a few milliseconds.

What it pins: a launch ends done with its results here and its machine released once; a
preempted machine is replaced by the next offer and the run resumed there from the checkpoint
pulled here; resources.recover false stops at preempted, resumable; attach and resume find a run
again from its record alone (a new process); down stops, pulls and releases, twice is fine;
Ctrl-C after the start leaves the run running and its machine rented, before the start it
releases the machine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

from launcher import job, planning, renting
from launcher.checkpoints import LocalCheckpoints
from launcher.config import LaunchConfig, load
from launcher.runs import RunRecord, RunStore
from tests.fakes.memory_provider import NAME, MemoryCloud, loss_at, memory_offer
from tests.helpers import tiny_job

STEPS = 40  # tiny_job: max_steps 40, save_every 10, eval_every 20


class Recorder(job.SilentReporter):
    """What the user would have seen; `interrupt` raises KeyboardInterrupt (Ctrl-C) where it says."""

    def __init__(self, interrupt: Optional[Callable[[str, Any], bool]] = None) -> None:
        self.phases: list[str] = []
        self.warnings: list[str] = []
        self.steps: list[int] = []
        self.pulled: list[int] = []
        self.interrupt = interrupt or (lambda kind, what: False)

    def phase(self, text: str) -> None:
        self.phases.append(text)
        if self.interrupt("phase", text):
            raise KeyboardInterrupt

    def warn(self, text: str) -> None:
        self.warnings.append(text)

    def metric(self, event: dict[str, Any], total_steps: Optional[int], spent_usd: float) -> None:
        if event.get("event") == "train":
            self.steps.append(event["step"])
        if self.interrupt("metric", event):
            raise KeyboardInterrupt

    def checkpoint_pulled(self, step: int, path: Path) -> None:
        self.pulled.append(step)


class World:
    """A test's memory cloud, run records, job and runs folder."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.tmp_path = tmp_path
        self.monkeypatch = monkeypatch
        self.cloud = MemoryCloud([memory_offer(3, 0.45), memory_offer(1, 0.20), memory_offer(2, 0.30)])
        self.cloud.register(monkeypatch)
        self.store = RunStore(tmp_path / "home" / "runs.sqlite")
        self.runs_dir = tmp_path / "runs"
        self.plots: list[Path] = []

    def config(self, **resources: Any) -> LaunchConfig:
        return load(tiny_job(self.tmp_path / "job.yaml", resources={"providers": [NAME], **resources}))

    def session(self, **resources: Any) -> job.Session:
        return job.create_run(self.config(**resources), self.runs_dir, self.store, planned_provider=NAME)

    def launch(self, session: job.Session, reporter: Optional[Recorder] = None, **kwargs: Any) -> job.Outcome:
        config = session.loaded_config()
        plan = planning.compute_plan(config, [], lambda text: None, renting=True)
        return job.launch(session, reporter or Recorder(), candidates=plan.candidates, **kwargs)

    def reopen(self, run_id: str) -> job.Session:
        """The run found again from its record alone, as `launch attach|resume|down` in a new process."""
        return job.open_session(RunStore(self.store.path), run_id)

    def record(self, run_id: str) -> RunRecord:
        return self.store.get(run_id)

    def end_reasons(self, run_id: str) -> list[Optional[str]]:
        return [m.end_reason for m in self.store.machines(run_id)]


@pytest.fixture
def world(tmp_path, monkeypatch) -> World:
    monkeypatch.setenv("QLORA_LAUNCH_HOME", str(tmp_path / "home"))
    (tmp_path / "catalogs" / "v8").mkdir(parents=True)  # no catalog rows: the market is the memory cloud's
    monkeypatch.setenv("QLORA_LAUNCH_CATALOG_DIR", str(tmp_path / "catalogs"))
    monkeypatch.setattr(job, "POLL_S", 0.0)
    created = World(tmp_path, monkeypatch)
    # The loss plot is matplotlib's (a second to import): recorded, not drawn.
    monkeypatch.setattr(job, "plot_losses", created.plots.append)
    yield created
    created.store.close()


def train_losses(run_dir: Path) -> dict[int, float]:
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [e["step"] for e in events if e["event"] == "train"]
    assert len(steps) == len(set(steps)), f"a step shows up twice in the run's history: {sorted(steps)}"
    return {e["step"]: e["loss"] for e in events if e["event"] == "train"}


UNINTERRUPTED = {step: loss_at(step) for step in range(1, STEPS + 1)}


# ---------------------------------------------------------------------------------------------
# launch
# ---------------------------------------------------------------------------------------------


def test_launch_runs_to_done_on_the_cheapest_offer_and_releases_its_machine_once(world: World):
    session = world.session()
    reporter = Recorder()
    outcome = world.launch(session, reporter)
    record = world.record(session.record.id)
    assert (record.status, record.exit_code, outcome.exit_code) == ("done", 0, 0)
    assert (record.provider, record.machine_id, record.target, record.usd_per_hour) == (NAME, "101", "memory:101", 0.20)
    assert record.step == STEPS and record.pulled_step == STEPS and record.total_steps == STEPS
    assert world.cloud.machines["101"].offer.offer_id == 1  # the cheapest of the plan
    # Results here: adapter, evaluation, samples, the whole history, the newest checkpoints.
    run_dir = Path(record.run_dir)
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert outcome.evaluation and outcome.evaluation["test_loss"] == pytest.approx(loss_at(STEPS) + 0.1)
    assert outcome.samples and train_losses(run_dir) == UNINTERRUPTED
    assert reporter.steps == list(range(1, STEPS + 1)) and reporter.pulled == [10, 20, 30, 40]
    assert LocalCheckpoints(run_dir).steps() == [20, 30, 40]  # storage.keep_checkpoints: 3
    assert world.plots == [run_dir]
    assert record.tokens_per_s is not None
    # Released exactly once; nothing left billing; one machine row with its $.
    assert world.cloud.terminations("101") == 1 and world.cloud.alive() == []
    (machine,) = world.store.machines(record.id)
    assert (machine.target, machine.end_reason, machine.usd_per_hour, machine.gpu) == ("memory:101", "done", 0.20,
                                                                                        "RTX 4090")
    assert machine.ended_at is not None and machine.ended_at >= machine.started_at
    assert machine.usd() == pytest.approx(0.20 * (machine.ended_at - machine.started_at) / 3600)
    assert renting.spent(world.store, record.id) == pytest.approx(machine.usd())


def test_a_failed_provision_is_logged_and_the_next_offer_rented(world: World):
    world.cloud.fail_provision(1)
    session = world.session()
    reporter = Recorder()
    world.launch(session, reporter)
    record = world.record(session.record.id)
    assert record.status == "done" and world.cloud.machines[record.machine_id].offer.offer_id == 2
    assert any("offer 1" in w and "no capacity" in w for w in reporter.warnings)
    assert world.end_reasons(record.id) == ["done"]  # the failed offer rented nothing
    assert renting.tried_offers(Path(record.run_dir)) == ["memory:1", "memory:2"]


def test_a_target_that_cannot_prepare_fails_the_run_and_releases_its_machine(world: World):
    world.cloud.prepare_error = "no CUDA device (nvidia-smi found nothing)"
    session = world.session()
    with pytest.raises(job.JobError, match="no CUDA device"):
        world.launch(session)
    record = world.record(session.record.id)
    assert record.status == "failed" and "no CUDA device" in record.error
    assert world.cloud.terminations("101") == 1 and world.cloud.alive() == []
    assert world.end_reasons(record.id) == ["failed"]


# ---------------------------------------------------------------------------------------------
# a machine lost mid-run
# ---------------------------------------------------------------------------------------------


def test_a_preempted_machine_is_replaced_by_the_next_offer_and_the_run_resumed_there(world: World):
    world.cloud.preempt_at(25)  # checkpoint-20 is here by then
    session = world.session()
    reporter = Recorder()
    outcome = world.launch(session, reporter)
    record = world.record(session.record.id)
    assert outcome.exit_code == 0 and record.status == "done"
    assert (record.machine_id, record.target, record.usd_per_hour) == ("102", "memory:102", 0.30)  # the next offer
    assert any("preempted at step" in w and "checkpoint-20" in w for w in reporter.warnings)
    # The lost machine was destroyed (a preempted one still bills its disk), the second at the end.
    assert world.cloud.terminations("101") == 1 and world.cloud.terminations("102") == 1
    assert world.cloud.alive() == []
    assert world.end_reasons(record.id) == ["preempted", "done"]
    first, second = world.store.machines(record.id)
    assert (first.usd_per_hour, second.usd_per_hour) == (0.20, 0.30) and first.ended_at <= second.started_at + 1
    # The new workspace got checkpoint-20 and the history, and the runner resumed from it.
    folder_calls = [c for c in world.cloud.calls if c[0] == "push_checkpoint"]
    assert folder_calls == [("push_checkpoint", "102", 20, ("metrics.jsonl",))]
    starts = [c for c in world.cloud.calls if c[0] == "start"]
    assert [(c[1], c[3]) for c in starts] == [("101", False), ("102", True)]
    # The same losses as an uninterrupted run, each step once.
    assert train_losses(Path(record.run_dir)) == UNINTERRUPTED
    assert record.step == STEPS and record.pulled_step == STEPS


def test_without_recover_the_run_stops_at_preempted_and_resume_moves_it_on(world: World):
    world.cloud.preempt_at(15)
    session = world.session(recover=False)
    outcome = world.launch(session)
    record = world.record(session.record.id)
    assert outcome.exit_code == 143 and record.status == "preempted"
    assert f"launch resume {record.id}" in record.error and record.pulled_step == 10
    assert world.cloud.alive() == [] and world.end_reasons(record.id) == ["preempted"]  # destroyed all the same
    assert len(world.cloud.called("provision")) == 1  # nothing else rented
    # `launch resume` in a new process: the run goes on on the next offer.
    resumed = job.resume(world.reopen(record.id), Recorder())
    record = world.record(record.id)
    assert resumed.exit_code == 0 and record.status == "done" and record.machine_id == "102"
    assert world.end_reasons(record.id) == ["preempted", "done"] and world.cloud.alive() == []
    assert [c[2] for c in world.cloud.called("push_checkpoint")] == [10]
    assert train_losses(Path(record.run_dir)) == UNINTERRUPTED


def test_a_runner_that_dies_ends_the_run_interrupted_and_resume_continues_on_the_next_offer(world: World):
    world.cloud.die_at(15)  # no exit code: the runner went with its wrapper
    session = world.session()
    world.launch(session)
    record = world.record(session.record.id)
    assert record.status == "interrupted" and record.exit_code is None and "launch resume" in record.error
    assert world.cloud.alive() == [] and world.end_reasons(record.id) == ["interrupted"]
    job.resume(world.reopen(record.id), Recorder())
    record = world.record(record.id)
    assert record.status == "done" and record.machine_id == "102"
    assert [c[2] for c in world.cloud.called("push_checkpoint")] == [10]
    assert train_losses(Path(record.run_dir)) == UNINTERRUPTED


# ---------------------------------------------------------------------------------------------
# Ctrl-C, attach, resume
# ---------------------------------------------------------------------------------------------


def test_ctrl_c_after_the_start_leaves_the_run_running_and_attach_follows_it_to_done(world: World):
    session = world.session()
    ctrl_c = Recorder(interrupt=lambda kind, what: kind == "metric" and what.get("step") == 12)
    with pytest.raises(KeyboardInterrupt):
        world.launch(session, ctrl_c)
    record = world.record(session.record.id)
    assert record.status == "running" and record.pid is not None and record.remote_dir
    assert world.cloud.terminations("101") == 0 and world.cloud.alive() == ["101"]  # NOT released
    assert world.store.machines(record.id)[0].ended_at is None  # still billing, and counted
    world.cloud.tick(10)  # the job goes on while the launcher is gone
    reopened = world.reopen(record.id)
    assert reopened.machine is world.cloud.machines["101"] and reopened.workspace.folder == record.remote_dir
    outcome = job.attach(reopened, Recorder())
    record = world.record(record.id)
    assert outcome.exit_code == 0 and record.status == "done"
    assert world.cloud.terminations("101") == 1 and world.cloud.alive() == []
    assert world.end_reasons(record.id) == ["done"]
    assert [(c[1], c[3]) for c in world.cloud.called("start")] == [("101", False)]  # followed, not restarted
    assert train_losses(Path(record.run_dir)) == UNINTERRUPTED


def test_attach_to_a_detached_run_from_a_new_process(world: World):
    session = world.session()
    outcome = world.launch(session, detach=True)
    assert outcome.detached and outcome.exit_code == 0
    record = world.record(session.record.id)
    assert record.status == "running" and world.cloud.alive() == ["101"]
    world.cloud.tick(7)
    outcome = job.attach(world.reopen(record.id), Recorder())
    assert outcome.record.status == "done" and world.cloud.terminations("101") == 1
    assert train_losses(Path(record.run_dir)) == UNINTERRUPTED


def test_ctrl_c_before_the_runner_started_releases_the_machine(world: World):
    session = world.session()
    ctrl_c = Recorder(interrupt=lambda kind, what: kind == "phase" and what.startswith("syncing"))
    with pytest.raises(KeyboardInterrupt):
        world.launch(session, ctrl_c)
    record = world.record(session.record.id)
    assert record.status == "interrupted" and "Ctrl-C before the runner started" in record.error
    assert world.cloud.called("start") == []
    assert world.cloud.terminations("101") == 1 and world.cloud.alive() == []
    assert world.end_reasons(record.id) == ["interrupted"]


def test_resume_of_a_run_whose_runner_was_killed_while_the_launcher_was_away(world: World):
    session = world.session()
    with pytest.raises(KeyboardInterrupt):
        world.launch(session, Recorder(interrupt=lambda kind, what: kind == "metric" and what.get("step") == 13))
    world.cloud.folder("101").terminate_signal("KILL")  # the runner is killed on its (healthy) machine
    resumed = job.resume(world.reopen(session.record.id), Recorder())
    record = world.record(session.record.id)
    assert resumed.exit_code == 0 and record.status == "done" and record.machine_id == "101"  # the same machine
    assert [(c[1], c[3]) for c in world.cloud.called("start")] == [("101", False), ("101", True)]
    assert world.cloud.called("push_checkpoint") == []  # the target kept its checkpoints
    assert world.cloud.terminations("101") == 1 and world.end_reasons(record.id) == ["done"]
    assert train_losses(Path(record.run_dir)) == UNINTERRUPTED


def test_attach_starts_a_machine_its_watchdog_stopped_and_resumes_there(world: World):
    session = world.session()
    world.launch(session, detach=True)
    world.cloud.tick(10)
    world.cloud.set_state("101", "stopped")  # idle watchdog: the runner got SIGTERM, the disk is kept
    outcome = job.attach(world.reopen(session.record.id), Recorder())
    record = world.record(session.record.id)
    assert outcome.exit_code == 0 and record.status == "done" and record.machine_id == "101"
    assert world.cloud.called("restart") == [("restart", "101")]
    assert [(c[1], c[3]) for c in world.cloud.called("start")] == [("101", False), ("101", True)]
    assert world.cloud.alive() == []


# ---------------------------------------------------------------------------------------------
# down
# ---------------------------------------------------------------------------------------------


def test_down_stops_the_runner_pulls_its_checkpoint_releases_the_machine_and_can_be_repeated(world: World):
    session = world.session()
    world.launch(session, detach=True)
    world.cloud.tick(13)
    record = job.down(world.reopen(session.record.id), Recorder())
    assert (record.status, record.exit_code, record.step) == ("stopped", 143, 13)
    assert world.cloud.called("signal") == [("signal", "101", record.pid, "TERM")]  # it checkpointed, no KILL
    assert record.pulled_step == 13 and LocalCheckpoints(Path(record.run_dir)).steps() == [13]
    assert world.cloud.terminations("101") == 1 and world.cloud.alive() == []
    assert world.end_reasons(record.id) == ["stopped"]
    again = job.down(world.reopen(record.id), Recorder())
    assert again.status == "stopped" and world.end_reasons(record.id) == ["stopped"]
    assert (again.exit_code, again.ended_at, again.step) == (143, record.ended_at, 13)  # the record as it was
    assert world.cloud.alive() == [] and len(world.cloud.called("signal")) == 1
    # And the run can go on from there.
    job.resume(world.reopen(record.id), Recorder())
    record = world.record(record.id)
    assert record.status == "done" and [c[2] for c in world.cloud.called("push_checkpoint")] == [13]
    assert train_losses(Path(record.run_dir)) == UNINTERRUPTED


def test_ctrl_c_while_the_next_machine_is_prepared_after_a_preemption_releases_it(world: World):
    """launch's promise (Ctrl-C before the runner started: the machine released, the run
    interrupted) holds for the machine rented by a recovery as well."""
    world.cloud.preempt_at(15)
    session = world.session()
    syncs: list[str] = []

    def on_the_second_machine(kind: str, what: Any) -> bool:
        if kind == "phase" and what.startswith("syncing"):
            syncs.append(what)
        return len(syncs) == 2

    ctrl_c = Recorder(interrupt=on_the_second_machine)
    with pytest.raises(KeyboardInterrupt):
        world.launch(session, ctrl_c)
    record = world.record(session.record.id)
    assert world.cloud.called("provision")[-1][1] == 2 and record.machine_id == "102"
    assert world.cloud.alive() == [], "the machine rented for the recovery is left billing"
    assert record.status == "interrupted"


def test_a_destroy_that_fails_keeps_the_machine_billing_in_the_record_until_down_destroys_it(world: World):
    world.cloud.failing_terminations = 1  # the provider's API is down when the run ends
    session = world.session()
    reporter = Recorder()
    world.launch(session, reporter)
    record = world.record(session.record.id)
    assert record.status == "done" and world.cloud.alive() == ["101"]
    assert any("may still be billing" in w and f"`launch down {record.id}` tries again" in w for w in reporter.warnings)
    (machine,) = world.store.machines(record.id)
    assert machine.ended_at is None  # counted as billing, as it is
    spent_then = renting.spent(world.store, record.id)
    assert renting.spent(world.store, record.id, now=machine.started_at + 3600) == pytest.approx(0.20)
    job.down(world.reopen(record.id), Recorder())
    assert world.cloud.alive() == [] and world.record(record.id).status == "done"
    (machine,) = world.store.machines(record.id)
    assert machine.ended_at is not None and renting.spent(world.store, record.id) >= spent_then
