"""The run lifecycle: launch, attach, resume, pull, down.

A run is a run record (runs.py), a Workspace on its target (workspace.py: the runner's folder
there) and a folder here (runs/<run-id>/) where its files are pulled. The runner runs detached
from us, so the launcher can die, the laptop can close and the connection can drop without the
job noticing; the run record holds all it takes to find the job again, written at every
transition.

In order, a launch: rent a machine (or reach your own) -> open its workspace -> prepare
(bootstrap, stack check) -> upload -> start -> follow (metrics, checkpoint pulls, the provider
asked whether the machine still lives) -> results -> release the machine. A machine lost on the
way is released, the next offer of the same plan rented, the newest checkpoint pushed there and
the run resumed.

This module talks to a Provider and a Workspace only, and to the user through a Reporter;
cli.py renders."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Protocol

import yaml

from launcher import budget, clock, planning, renting, storage, sync
from launcher.checkpoints import LocalCheckpoints
from launcher.config import LaunchConfig, load as load_config
from launcher.errors import EXIT_BUDGET, EXIT_TARGET, EXIT_USAGE
from launcher.distributed import topology_for
from launcher.paths import runner_module
from launcher.providers import provider_for_target, provider_named, renter_name
from launcher.providers.base import (
    LOST_STATES, Machine, MachineSpec, Need, Offer, OutOfQuota, Provider, ProviderError, Restartable,
)
from launcher.runs import RESUMABLE, RunRecord, RunStore, state_dir
from launcher.workspace import Look, PrepareFailed, Workspace, WorkspaceError

LOCAL_CONFIG = "job.local.yaml"  # the job as launched (overrides applied, local paths absolute)
POLL_S = 2.0  # status/checkpoint probe interval while following
LOST_AFTER_S = 300.0  # no answer from the target for this long: give up following (the job may live on)
# A rented machine its provider calls running that SSH has not reached for this long is taken
# for lost (its host is gone or cut off): it bills and trains nothing we can get back, so it is
# released and the run recovers as after a preemption. QLORA_LAUNCH_UNREACHABLE_S sets it.
UNREACHABLE_AFTER_S = 180.0
STOP_GRACE_S = 120.0  # `down`: time the runner gets to checkpoint after SIGTERM
# Runner exit codes after which `resume` can continue: killed (137), SIGTERM (143), SIGINT (130).
RESUMABLE_EXIT_CODES = (130, 137, 143)
HISTORY_FILES = ("metrics.jsonl", "base_eval.json")  # what goes back with a pushed checkpoint


class JobError(Exception):
    """A lifecycle step failed; the message says what to do. exit_code classifies it."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class MachineLost(Exception):
    """The rented machine under a run was preempted, stopped or vanished (its provider says so)."""

    def __init__(self, state: str) -> None:
        super().__init__(state)
        self.state = state


class BudgetReached(Exception):
    """The run's $ so far and one more save-and-pull reach its cap (resources.max_total_usd)."""

    def __init__(self, spend: budget.Spend) -> None:
        super().__init__(spend.line(""))
        self.spend = spend


class SessionEnded(Exception):
    """The target's session ended at its limit with a checkpoint saved (a free notebook's session limit):
    the run continues in a new session on the same machine."""

    def __init__(self, seen: Look) -> None:
        super().__init__("session limit")
        self.seen = seen


class Reporter(Protocol):
    def phase(self, text: str) -> None: ...
    def warn(self, text: str) -> None: ...
    def started(self, record: RunRecord) -> None: ...
    def metric(self, event: dict[str, Any], total_steps: Optional[int], spent_usd: float) -> None: ...
    def checkpoint_pulled(self, step: int, path: Path) -> None: ...
    def stopped_following(self) -> None: ...


class SilentReporter:
    def phase(self, text: str) -> None: pass
    def warn(self, text: str) -> None: pass
    def started(self, record: RunRecord) -> None: pass
    def metric(self, event: dict[str, Any], total_steps: Optional[int], spent_usd: float) -> None: pass
    def checkpoint_pulled(self, step: int, path: Path) -> None: pass
    def stopped_following(self) -> None: pass


@dataclass
class Outcome:
    record: RunRecord
    run_dir: Path
    evaluation: Optional[dict[str, Any]] = None
    samples: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    detached: bool = False

    @property
    def exit_code(self) -> int:
        if self.detached:
            return 0
        if self.record.stop_reason == budget.STOPPED_FOR:
            return EXIT_BUDGET
        return self.record.exit_code if self.record.exit_code is not None else 1


@dataclass
class Session:
    """One run being driven: its record, the job as launched, its provider, machine and workspace
    (a rented run has neither machine nor workspace until one is rented)."""

    store: RunStore
    record: RunRecord
    config: Optional[LaunchConfig]  # None only for a reopened run whose job file no longer loads
    provider: Provider
    machine: Optional[Machine] = None
    workspace: Optional[Workspace] = None
    longest_pull_s: Optional[float] = None  # of this run's checkpoint pulls so far (the budget's margin)
    save_guess: Optional[budget.Guess] = None  # a save's and a pull's time before they are measured

    @property
    def run_dir(self) -> Path:
        return Path(self.record.run_dir)

    @property
    def ws(self) -> Workspace:
        assert self.workspace is not None, "the run has no workspace on a target yet"
        return self.workspace

    def update(self, **fields: Any) -> RunRecord:
        self.record = self.store.update(self.record.id, **fields)
        return self.record

    def spent_usd(self, now: Optional[float] = None) -> float:
        return renting.run_usd(self.store, self.record, now)

    def spend(self, now: Optional[float] = None) -> Optional[budget.Spend]:
        """The run against its cap now; None without a cap."""
        cap = self.config.resources.max_total_usd if self.config else None
        if cap is None or self.config is None:
            return None
        if self.save_guess is None:
            self.save_guess = budget.Guess.for_job(self.config)
        return budget.spend(self.store, self.record, cap, read_metrics(self.run_dir), self.longest_pull_s, POLL_S,
                            self.save_guess, now)

    def elapsed_s(self, now: Optional[float] = None) -> float:
        if self.record.status in ("starting", "running"):
            return self.record.runner_seconds(now)
        return self.record.elapsed_s or 0.0

    @property
    def holds_rented_machine(self) -> bool:
        """A machine we rented is under this run (and must be released)."""
        return self.provider.rents_machines and self.record.machine_id is not None and self.machine is not None

    @property
    def spec(self) -> MachineSpec:
        return machine_spec(self.record.id, self.record.identity)

    def loaded_config(self) -> LaunchConfig:
        if self.config is None:
            raise JobError(f"run {self.record.id}: its job file {self.run_dir / LOCAL_CONFIG} no longer loads (a data "
                           "file moved?); put the files back where they were launched from", EXIT_USAGE)
        return self.config

    def open_workspace(self, fresh: bool) -> None:
        """The run's workspace on its machine: a new folder (fresh: a new run, or a run moved to
        a new machine) or the one the record names."""
        assert self.machine is not None
        config = self.config
        self.workspace = self.provider.open_workspace(
            self.machine, self.record.id, workdir=config.resources.workdir if config else None,
            run_folder=None if fresh else self.record.remote_dir, config=config)
        if fresh:
            self.update(status="starting", remote_dir=self.workspace.folder)


def new_run_id(config: Path) -> str:
    """Date, the config's name, 4 hex digits. The name is cut to letters, digits, `.`, `_` and `-`:
    a run id goes into remote paths, labels, cluster names and store keys."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", config.stem).strip("-.")[:40] or "job"
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{name}-{secrets.token_hex(2)}"


def machine_spec(run_id: str, identity: Optional[str]) -> MachineSpec:
    home = state_dir()
    return MachineSpec(run_id=run_id, known_hosts=home / "known_hosts" / run_id, control_dir=home / "ssh",
                       identity=Path(identity).expanduser() if identity else None)


def open_session(store: RunStore, run_id: str, log: Optional[Callable[[str], None]] = None) -> Session:
    """Find a recorded run's machine and workspace again (after the launcher died, on another day)."""
    record = store.get(run_id)
    try:
        config: Optional[LaunchConfig] = load_config(Path(record.run_dir) / LOCAL_CONFIG)
    except Exception:  # noqa: BLE001  (a moved data file must not keep a run from being reached)
        config = None
    machine_id = record.machine_id or _machine_id_of_older_record(record)
    provider = provider_named(record.provider, config.resources if config else None, address=machine_id,
                              log=log or (lambda text: None))
    session = Session(store, record, config, provider)
    if machine_id is not None:
        session.machine = provider.reconnect(machine_id, session.spec)
        if record.remote_dir:
            session.open_workspace(fresh=False)
    return session


def _machine_id_of_older_record(record: RunRecord) -> Optional[str]:
    """Records written before machine_id existed named the machine by its target alone (a
    rented run's placeholder target was its provider's name)."""
    if record.provider == "local":
        return "local"
    return record.target if record.target and record.target != record.provider else None


# ---------------------------------------------------------------------------------------------
# launch
# ---------------------------------------------------------------------------------------------


def create_run(config: LaunchConfig, runs_dir: Path, store: RunStore, target: Optional[str] = None,
               planned_provider: Optional[str] = None) -> Session:
    """The run record and the local run folder, before anything is touched on the target.
    `target`: your own machine (local or an SSH box); else the run rents on `planned_provider`."""
    provider = provider_for_target(target, config.resources) if target else \
        provider_named(renter_name(planned_provider or ""), config.resources)
    run_id = new_run_id(config.path)
    run_dir = runs_dir.resolve() / run_id
    run_dir.mkdir(parents=True)
    (run_dir / LOCAL_CONFIG).write_text(_local_config_text(config))
    record = store.create(RunRecord(
        id=run_id, config_path=str(config.path), run_dir=str(run_dir), target=target, provider=provider.name,
        machine_id=target, gpu=config.resources.gpu, usd_per_hour=config.resources.usd_per_hour,
        identity=config.resources.ssh_identity, model=config.job.model.base,
        micro_batch=config.job.train.micro_batch_size, gradient_checkpointing=config.job.train.gradient_checkpointing,
    ))
    session = Session(store, record, config, provider)
    if target:
        session.machine = provider.reconnect(target, session.spec)
    return session


def launch(session: Session, reporter: Reporter, *, detach: bool = False,
           candidates: Optional[list[Offer]] = None) -> Outcome:
    """Rent the first of `candidates` that comes up (or reach your own machine), prepare it,
    upload the job, start the runner detached, then follow it to the end (or return at once with
    `detach`). A failure before the runner starts marks the run failed and releases a rented
    machine: nothing is left billing."""
    with starting(session, reporter):
        if session.provider.rents_machines:
            rent_machine(session, candidates or [], reporter)
        else:
            reach_own_machine(session, reporter)
        session.open_workspace(fresh=True)
        start_runner(session, reporter, resume=False)
    if detach:
        return Outcome(session.record, session.run_dir, detached=True)
    return drive(session, reporter)


@contextlib.contextmanager
def starting(session: Session, reporter: Reporter) -> Iterator[None]:
    """Until the runner runs, nothing may be left billing: Ctrl-C or a failure releases a rented
    machine and records why (once the runner runs, Ctrl-C only detaches: the record says so)."""
    try:
        yield
    except KeyboardInterrupt:
        if session.record.status != "running":
            release(session, "interrupted", reporter)
            session.update(status="interrupted", error="Ctrl-C before the runner started; nothing is running",
                           ended_at=clock.now())
        raise
    except (WorkspaceError, PrepareFailed, JobError, ProviderError) as e:
        raise failed_to_start(session, e, reporter) from None
    except Exception as e:
        release(session, "failed", reporter)
        session.update(status="failed", error=f"{type(e).__name__}: {e}", ended_at=clock.now())
        raise


def reach_own_machine(session: Session, reporter: Reporter) -> None:
    reporter.phase(f"connecting to {session.record.target}")
    session.machine = own_machine(session.provider, session.spec, session.loaded_config().resources.usd_per_hour)


def own_machine(provider: Provider, spec: MachineSpec, usd_per_hour: float = 0.0) -> Machine:
    """The one machine of a provider that rents nothing (this one, an SSH box), reached."""
    return provider.provision(provider.offers(Need(), usd_per_hour)[0], spec).machine


def failed_to_start(session: Session, e: Exception, reporter: Reporter) -> JobError:
    """The runner did not start: release a rented machine, record the failure; the error to raise."""
    release(session, "failed", reporter)
    code = getattr(e, "exit_code", EXIT_TARGET)
    session.update(status="failed", error=str(e), ended_at=clock.now(), exit_code=code)
    return JobError(str(e), code)


def rent_machine(session: Session, candidates: list[Offer], reporter: Reporter) -> None:
    """Rent the first candidate that comes up; the run record then names the machine."""
    try:
        provider, rented, offer = renting.rent(session.store, session.record.id, session.run_dir, candidates,
                                               session.loaded_config().resources, session.spec, reporter.phase,
                                               reporter.warn)
    except ProviderError as e:
        raise JobError(str(e), EXIT_TARGET) from None
    session.provider, session.machine, session.workspace = provider, rented.machine, None
    session.update(provider=provider.name, machine_id=rented.machine_id, target=rented.machine.name,
                   gpu=offer.gpu_summary, usd_per_hour=rented.usd_per_hour)


def release(session: Session, reason: str, reporter: Reporter, when: Optional[float] = None) -> None:
    """Stop paying for a rented machine (destroy it) and close its record; own boxes: nothing.
    A destroy that fails leaves the machine's record open: counted as billing (as it may well
    be) until a later `launch down RUN` destroys it."""
    if not session.holds_rented_machine:
        return
    assert session.machine is not None and session.record.target is not None
    try:
        session.provider.terminate(session.machine)
    except ProviderError as e:
        reporter.warn(f"{e}; until then run {session.record.id} counts {session.record.target} as billing "
                      f"(`launch down {session.record.id}` tries again)")
        return
    session.store.end_machine(session.record.id, session.record.target, reason, when or clock.now())


def drive(session: Session, reporter: Reporter) -> Outcome:
    """Follow the run to its end; a rented machine lost under it (preempted, gone) is replaced
    by the next offer and the run resumed there, unless resources.recover is false. At the end
    the rented machine is released (results are pulled by then)."""
    resumed_from = -1  # the checkpoint the current session started from (a session must pass it)
    while True:
        try:
            outcome = follow_run(session, reporter)
        except MachineLost as lost:
            if not recover(session, lost.state, reporter):
                return Outcome(session.record, session.run_dir)
            continue
        except SessionEnded as ended:
            resumed_from = next_session(session, ended.seen, resumed_from, reporter)
            if resumed_from is None:
                return Outcome(session.record, session.run_dir)
            continue
        except BudgetReached as reached:
            return stop_for_budget(session, reached.spend, reporter)
        release(session, outcome.record.status, reporter)
        return outcome


def stop_for_budget(session: Session, spend: budget.Spend, reporter: Reporter) -> Outcome:
    """The cap is one save-and-pull away: the runner checkpoints and stops, the checkpoint and
    results come here, every machine is released; the run is `stopped` (resumable) for the budget."""
    line = spend.line(session.record.id)
    reporter.warn(line)
    seen: Optional[Look] = None
    if session.ws.stoppable and session.record.pid:
        reporter.phase("stopping the runner for the budget (it saves a checkpoint first)")
        try:
            seen = stop_with_grace(session.ws, session.record.pid, STOP_GRACE_S)
        except WorkspaceError as e:  # the machine goes anyway: the cap is what the user asked for
            reporter.warn(f"could not reach the runner to stop it ({e}); releasing its machine")
    if seen is not None:  # what must come off the machine, before it is released (it bills until then)
        pull_new_checkpoints(session, seen.complete_steps, reporter)
        session.ws.fetch_results(session.run_dir)
    release(session, "stopped", reporter)
    renting.may_rent_again(session.run_dir)
    outcome = finish(session, seen, reporter, files_pulled=True) if seen is not None else \
        Outcome(session.record, session.run_dir)
    now = clock.now()
    spent = session.spent_usd(now)
    session.update(status="stopped", stop_reason=budget.STOPPED_FOR, ended_at=now, started_at=None,
                   elapsed_s=session.elapsed_s(now) if seen is None else session.record.elapsed_s,
                   error=dataclasses.replace(spend, spent_usd=spent).line(session.record.id))
    outcome.record = session.record
    return outcome


def refuse_over_budget(session: Session, usd_per_hour: float) -> None:
    """Before a machine is started again (a resume, a recovery): the cap must leave room for at
    least one more save-and-pull at `usd_per_hour`, else nothing is started."""
    spend = session.spend()
    if spend is None:
        return
    spend = dataclasses.replace(spend, usd_per_hour=usd_per_hour)
    if spend.reached:
        session.update(status="stopped", stop_reason=budget.STOPPED_FOR, error=spend.line(session.record.id))
        raise JobError(spend.line(session.record.id), EXIT_BUDGET)


def next_session(session: Session, seen: Look, resumed_from: int, reporter: Reporter) -> Optional[int]:
    """The session ended at its limit: start the runner again (a new session: the workspace's
    start opens one) from the newest checkpoint; the step it resumes from, or None when the run
    stopped instead (the quota cannot hold another session: `stopped`, resumable)."""
    now = clock.now()
    newest = max(seen.complete_steps, default=-1)
    session.update(elapsed_s=session.elapsed_s(now), started_at=None, step=seen.status.get("step", session.record.step))
    if newest <= resumed_from:
        return stop_between_sessions(session, reporter, now, "no progress", (
            f"{session.record.target}: a whole session ended without a new checkpoint (still at checkpoint-{newest}); "
            f"lower train.save_every, then `launch resume {session.record.id}`"))
    reporter.warn(f"{session.record.target}: the session reached its limit at step {seen.status.get('step')}; "
                  f"continuing in a new session from checkpoint-{newest}")
    try:
        start_runner(session, reporter, resume=True)
    except OutOfQuota as e:
        return stop_between_sessions(session, reporter, now, "quota", str(e))
    except (WorkspaceError, PrepareFailed, JobError, ProviderError) as e:
        raise failed_to_start(session, e, reporter) from None
    return newest


def stop_between_sessions(session: Session, reporter: Reporter, when: float, reason: str, why: str) -> None:
    """No next session: the run is `stopped` (resumable, its checkpoint here), and says why."""
    release(session, "stopped", reporter)
    session.update(status="stopped", stop_reason=reason, exit_code=143, ended_at=when, error=why)
    reporter.warn(why)


def recover(session: Session, state: str, reporter: Reporter, *, force: bool = False) -> bool:
    """The machine was lost: record when, destroy what is left of it (a stopped instance still
    bills its disk), then (resources.recover) rent the next offer of the job's plan, ranked as
    `launch` ranks it, and resume there from the newest checkpoint pulled here. False: the run
    is left preempted, resumable. A run that was `stopped` (we released its machine: `launch down`,
    the budget) is not a loss: it keeps its record and goes on on a machine rented now."""
    if session.record.status == "stopped":
        reporter.phase(f"{session.record.target} was released when the run stopped; renting a machine to resume on")
    else:
        now = clock.now()
        lost = session.record.target
        reporter.warn(f"{lost} was {state} at step {session.record.step}; the newest checkpoint here is "
                      f"checkpoint-{session.record.pulled_step}")
        release(session, state, reporter, when=now)
        session.update(status="preempted", elapsed_s=session.elapsed_s(now), started_at=None, ended_at=now,
                       exit_code=143, error=f"{lost} was {state}; `launch resume {session.record.id}` continues on "
                                            "the next offer")
    config = session.loaded_config()
    if not (config.resources.recover or force):
        return False
    machines = session.store.machines(session.record.id)
    if machines:  # what the lost machines cost counts: the cap is the run's, not the machine's
        refuse_over_budget(session, machines[-1].usd_per_hour)
    reporter.phase("renting the next offer to resume on")
    try:
        plan = planning.compute_plan(config, session.store.measured_speeds(config.job.model.base), reporter.warn,
                                     example_tokens=planning.example_tokens(config), renting=True)
    except planning.PlanError as e:
        raise JobError(str(e), e.exit_code) from None
    if plan.candidates:
        refuse_over_budget(session, plan.candidates[0].usd_per_hour)
    rent_machine(session, plan.candidates, reporter)
    with starting(session, reporter):
        session.open_workspace(fresh=True)
        start_runner(session, reporter, resume=True)
    return True


def start_runner(session: Session, reporter: Reporter, *, resume: bool) -> None:
    """Prepare the target, put the job there, start the runner detached; record each step."""
    config = session.loaded_config()
    reporter.phase("bootstrapping the target (python environment, GPU stack check)")
    python = session.ws.prepare(config)
    reporter.phase("syncing data, config and runner")
    session.ws.upload(config)
    if resume:
        push_checkpoint_if_lost(session, reporter)
    try:
        # The run's name in the store, and the store's keys: the runner's environment only.
        env = {runner_module().RUN_ID_ENV: session.record.id, **storage.runner_environment(config)}
    except storage.StorageProblem as e:
        raise JobError(str(e), e.exit_code) from None
    job = session.ws.start(python, resume=resume, topology=topology_for(config.resources), env=env)
    session.update(status="running", pid=job, python=python, started_at=clock.now(), exit_code=None, error=None,
                   ended_at=None, stop_reason=None)
    reporter.started(session.record)


def _local_config_text(config: LaunchConfig) -> str:
    """The job as launched, with local paths made absolute, so resume works from any folder."""
    raw = json.loads(json.dumps(config.raw))
    for asset in sync.local_assets(config):
        section, name = asset.key.split(".")
        raw[section][name] = str(asset.local)
    return f"# The job as launched from {config.path}\n" + yaml.safe_dump(raw, sort_keys=False)


# ---------------------------------------------------------------------------------------------
# following a running job
# ---------------------------------------------------------------------------------------------


def look(session: Session) -> Look:
    """The job as it is now on its target (one round trip)."""
    return session.ws.look(session.record.pid)


def raise_if_lost(session: Session) -> None:
    """MachineLost when the provider says a rented machine under the run is preempted, gone or stopped."""
    if session.holds_rented_machine:
        assert session.machine is not None
        machine_state = session.provider.state(session.machine)
        if machine_state in LOST_STATES:
            raise MachineLost(machine_state) from None


def unreachable_after_s() -> float:
    return float(os.environ.get("QLORA_LAUNCH_UNREACHABLE_S") or UNREACHABLE_AFTER_S)


def follow_run(session: Session, reporter: Reporter) -> Outcome:
    """Stream metrics until the runner ends, pulling each new complete checkpoint; then the
    final pull. Survives dropped connections; after LOST_AFTER_S without an answer it stops
    following and leaves the run `running` (it may well be), with how to attach. A rented
    machine silent for unreachable_after_s() while its provider says it runs is lost."""
    state: dict[str, Any] = {"done": None, "last_poll": 0.0, "last_contact": time.monotonic(), "total": None,
                             "warned": False}

    def poll() -> None:
        try:
            seen = look(session)
        except WorkspaceError as e:
            raise_if_lost(session)
            if not state["warned"]:
                reporter.warn(f"lost contact with {session.record.target} ({e}); retrying")
                state["warned"] = True
            silent_s = time.monotonic() - state["last_contact"]
            if session.holds_rented_machine and silent_s > unreachable_after_s():
                raise MachineLost("unreachable") from None
            if silent_s > LOST_AFTER_S:
                raise JobError(f"no answer from {session.record.target} for {LOST_AFTER_S:.0f} s; the job may still "
                               f"be running: `launch attach {session.record.id}` when it is back", EXIT_TARGET) from None
            return
        state["last_contact"], state["warned"] = time.monotonic(), False
        state["total"] = seen.status.get("total_steps") or state["total"]
        if seen.status.get("step") is not None and seen.status.get("step") != session.record.step:
            session.update(step=seen.status.get("step"), total_steps=state["total"])
        note_stored(session, seen.status)
        pull_new_checkpoints(session, seen.complete_steps, reporter)
        if seen.running:
            spend = session.spend()
            if spend is not None and spend.reached:
                raise BudgetReached(spend)
        if not seen.running:
            if seen.session_end == "session_limit":
                raise SessionEnded(seen)
            if seen.exit_code != 0:
                # Killed as its machine went down (we may look in during the shutdown): the
                # provider tells a lost machine from a runner that died on a healthy one.
                raise_if_lost(session)
            state["done"] = seen

    def show(line: str) -> None:
        try:
            event = json.loads(line)
        except ValueError:
            return
        if isinstance(event, dict):
            reporter.metric(event, state["total"], session.spent_usd())

    lines_shown = 0
    stream = session.ws.stream("metrics.jsonl", stop=lambda: state["done"] is not None)
    # The stream starts at the file's first line: mirror it here as it comes, so a machine
    # lost mid-run leaves the run's history on this side (a resume elsewhere pushes it back).
    mirror = (session.run_dir / "metrics.jsonl").open("w", buffering=1)
    with contextlib.closing(stream), mirror:  # a lost machine ends the stream (and its connection) at once
        for line in stream:
            if line:
                lines_shown += 1
                mirror.write(line + "\n")
                show(line)
            if time.monotonic() - state["last_poll"] >= POLL_S:
                state["last_poll"] = time.monotonic()
                poll()
    # The runner ended between two reads of the stream: show its last lines from the pulled copy.
    session.ws.fetch_results(session.run_dir)
    pulled_metrics = session.run_dir / "metrics.jsonl"
    for line in (pulled_metrics.read_text() if pulled_metrics.is_file() else "").splitlines()[lines_shown:]:
        show(line)
    reporter.stopped_following()
    return finish(session, state["done"], reporter, files_pulled=True)


def finish(session: Session, seen: Look, reporter: Reporter, files_pulled: bool = False) -> Outcome:
    """The runner has ended: pull everything (the files once), plot, record the outcome."""
    reporter.phase("pulling results")
    note_stored(session, seen.status)
    pull_new_checkpoints(session, seen.complete_steps, reporter)
    if not files_pulled:
        session.ws.fetch_results(session.run_dir)
    now = clock.now()
    # The runner's last status write is when it ended (we may attach hours later); the
    # target's clock may be off from ours, so it only ever shortens the segment.
    ended = seen.status.get("updated_at")
    started = session.record.started_at
    end = min(now, ended) if isinstance(ended, (int, float)) and started and ended > started else now
    elapsed = session.elapsed_s(end)
    code = seen.exit_code
    status = "stopped" if seen.session_end == "quota" else run_status(code)  # resumable, nothing failed
    error = seen.status.get("error")
    if code is None:
        error = ("the runner died without an exit status (its machine rebooted, or it was killed with its wrapper); "
                 f"`launch resume {session.record.id}` continues from the newest checkpoint")
    elif code == 137:
        error = (f"the runner was killed (SIGKILL) at step {seen.status.get('step')}; "
                 f"`launch resume {session.record.id}` continues from the newest checkpoint")
    session.update(status=status, exit_code=code, ended_at=now, elapsed_s=elapsed,
                   started_at=None, step=seen.status.get("step", session.record.step),
                   total_steps=seen.status.get("total_steps", session.record.total_steps), error=error,
                   tokens_per_s=measured_tokens_per_s(session.run_dir),
                   seq_tokens=seen.status.get("train_seq_tokens", session.record.seq_tokens),
                   stop_reason="quota" if status == "stopped" else None)
    plot_losses(session.run_dir)
    return Outcome(session.record, session.run_dir, evaluation=_read_json(session.run_dir / "eval.json"),
                   samples=_read_jsonl(session.run_dir / "samples.jsonl"))


def run_status(exit_code: Optional[int]) -> str:
    """The runner's exit code as a run record status."""
    if exit_code is None:
        return "interrupted"
    return {0: "done", 143: "preempted", 130: "interrupted", 137: "interrupted"}.get(exit_code, "failed")


# ---------------------------------------------------------------------------------------------
# checkpoints: pulled here as they appear, pushed back to a new machine
# ---------------------------------------------------------------------------------------------


def pull_new_checkpoints(session: Session, remote_steps: list[int], reporter: Reporter) -> None:
    """Pull the newest complete checkpoint if it is newer than ours, verified against its
    manifest before it is taken, and keep the newest K here. Only the newest: older ones are
    what the runner rotates away next, and a resume needs only the newest."""
    local = LocalCheckpoints(session.run_dir)
    for step in [s for s in remote_steps if s > local.newest()][-1:]:
        started = time.monotonic()
        try:
            session.ws.fetch_checkpoint(step, local.incoming(step))
            session.longest_pull_s = max(session.longest_pull_s or 0.0, time.monotonic() - started)
        except WorkspaceError as e:
            # Rotated away while we copied (a newer one exists), or the connection dropped:
            # the next look tries again; a half copy is never taken for a checkpoint.
            reporter.warn(f"checkpoint-{step} not pulled this time ({e})")
            continue
        if local.adopt(step):
            session.update(pulled_step=step)
            reporter.checkpoint_pulled(step, local.path(step))
    local.prune(session.config.storage.keep_checkpoints if session.config else 3)


def note_stored(session: Session, status: dict[str, Any]) -> None:
    """The runner's word on its newest checkpoint in the store, kept in the run record."""
    stored = status.get("stored_step")
    if isinstance(stored, int) and stored != session.record.stored_step:
        session.update(stored_step=stored, store_url=status.get("store") or session.record.store_url)


def stored_steps(session: Session, reporter: Reporter) -> list[int]:
    """The run's complete checkpoints in its store ([] without one, or when it cannot be read:
    said, and then this machine's copies are what is used)."""
    try:
        listing = storage.stored_checkpoints(session.config, session.record.id)
    except storage.StorageProblem as e:
        reporter.warn(str(e))
        return []
    if listing is None:
        return []
    url, steps = listing
    if steps and steps[-1] != session.record.stored_step:
        session.update(stored_step=steps[-1], store_url=url)
    return steps


def push_checkpoint_if_lost(session: Session, reporter: Reporter) -> None:
    """Before a resume: if the target lacks our newest complete checkpoint (a new or wiped
    machine), put it back, with the run's history (the runner cuts metrics.jsonl at the
    checkpoint's step and appends, and reuses the cached base-model evaluation). A store holding
    one as new: the runner downloads that itself, from wherever it runs."""
    on_target = max(look(session).complete_steps, default=-1)
    local = LocalCheckpoints(session.run_dir)
    stored = stored_steps(session, reporter)
    if stored and stored[-1] > on_target and stored[-1] >= local.newest():
        reporter.phase(f"the runner resumes from checkpoint-{stored[-1]} in {session.record.store_url}")
        return
    if not local.steps() or on_target >= local.newest():
        return
    step = local.newest()
    reporter.phase(f"pushing checkpoint-{step} back to the target")
    history = [session.run_dir / name for name in HISTORY_FILES if (session.run_dir / name).is_file()]
    session.ws.push_checkpoint(local.path(step), step, history)


# ---------------------------------------------------------------------------------------------
# attach, resume, pull, down
# ---------------------------------------------------------------------------------------------


def check_rented(session: Session, reporter: Reporter) -> Optional[str]:
    """A rented machine as it is now: stopped (by its watchdog) and restartable -> started again,
    so what it holds can be pulled; lost (preempted, gone, stopped for good) -> that state is
    returned. None: reachable."""
    if not session.holds_rented_machine:
        return None
    assert session.machine is not None
    state = session.provider.state(session.machine)
    if state == "stopped" and isinstance(session.provider, Restartable):
        reporter.phase(f"{session.record.target} was stopped (idle); starting it again to reach the run")
        try:
            session.machine = session.provider.restart(session.machine, session.spec)
        except (ProviderError, WorkspaceError) as e:
            raise JobError(f"{session.record.target} is stopped and did not start again: {e}", EXIT_TARGET) from None
        session.open_workspace(fresh=False)
        return None
    return state if state in LOST_STATES else None


def attach(session: Session, reporter: Reporter) -> Outcome:
    """Follow a run again. Running: follow it. Ended while we were away: pull and record.
    Dead (killed, machine restarted): resume it. Its rented machine lost: resume on the next offer."""
    if session.record.remote_dir is None:
        raise JobError(f"run {session.record.id} never started on its target ({session.record.status}: "
                       f"{session.record.error}); launch it again", EXIT_USAGE)
    moved = resume_elsewhere_if_lost(session, reporter)
    if moved:
        return moved
    seen = _look_or_fail(session)
    if seen.running:
        reporter.started(session.record)
        return drive(session, reporter)
    if seen.exit_code is None or seen.exit_code in RESUMABLE_EXIT_CODES:
        reporter.warn(f"the runner is not running (exit code {seen.exit_code}); resuming from the newest checkpoint")
        return resume(session, reporter)
    return finish_and_release(session, seen, reporter)


def resume_elsewhere_if_lost(session: Session, reporter: Reporter) -> Optional[Outcome]:
    """A run whose rented machine is lost: rent the next offer, resume and follow it there."""
    lost = check_rented(session, reporter)
    if not lost:
        return None
    recover(session, lost, reporter, force=True)  # forced: it rents and resumes, or raises
    return drive(session, reporter)


def finish_and_release(session: Session, seen: Look, reporter: Reporter) -> Outcome:
    outcome = finish(session, seen, reporter)
    release(session, outcome.record.status, reporter)
    return outcome


def resume(session: Session, reporter: Reporter, max_total_usd: Optional[float] = None) -> Outcome:
    """Continue from the newest complete checkpoint (pushed back if the target lost it); the
    runner restores optimizer, scheduler, RNG and data position, so losses match an
    uninterrupted run. A run whose rented machine is gone resumes on the next offer.
    `max_total_usd`: the run's new cap (`launch resume RUN --max-total`), kept in its job file."""
    record = session.record
    if record.status == "done":
        raise JobError(f"run {record.id} is done; nothing to resume", EXIT_USAGE)
    if record.status not in RESUMABLE and record.status != "failed":
        raise JobError(f"run {record.id} is {record.status}; it cannot be resumed", EXIT_USAGE)
    if max_total_usd is not None:
        session.config = _moved_config(session, {"max_total_usd": max_total_usd})
    moved = resume_elsewhere_if_lost(session, reporter)
    if moved:
        return moved
    if session.machine is None:
        raise JobError(f"run {record.id} never got a machine ({record.status}: {record.error}); launch it again",
                       EXIT_USAGE)
    try:
        session.machine.ensure_connected()
        if session.workspace is not None:
            seen = look(session)
            if seen.running:
                reporter.warn("the runner is still running; following it instead")
                reporter.started(record)
                return drive(session, reporter)
            if seen.exit_code == 0:
                return finish_and_release(session, seen, reporter)
        refuse_over_budget(session, budget.usd_per_hour_held(session.store, session.record))
        session.open_workspace(fresh=True)
        start_runner(session, reporter, resume=True)
    except OutOfQuota as e:
        session.update(status="stopped", stop_reason="quota", error=str(e))
        raise JobError(str(e), EXIT_TARGET) from None
    except WorkspaceError as e:
        raise JobError(str(e), EXIT_TARGET) from None
    except PrepareFailed as e:
        raise JobError(str(e), e.exit_code) from None
    return drive(session, reporter)


def resume_elsewhere(session: Session, reporter: Reporter, overrides: dict[str, Any]) -> Outcome:
    """`launch resume RUN --target T` (your own machine) or `--providers P` (rent the cheapest
    fitting offer there): continue a stopped, preempted or interrupted run on another machine.
    The old machine is released (a rented one destroyed); the new one gets the run's newest
    checkpoint from its store (the runner downloads it itself) or from this machine (pushed).
    The run's job.local.yaml records the new choice, so later recoveries keep to it."""
    record = session.record
    if record.status == "done":
        raise JobError(f"run {record.id} is done; nothing to resume", EXIT_USAGE)
    if record.status in ("starting", "running"):
        raise JobError(f"run {record.id} is {record.status} on {record.target}; stop it first with `launch down "
                       f"{record.id}` (it saves a checkpoint), then resume it elsewhere", EXIT_USAGE)
    config = _moved_config(session, overrides)
    if not LocalCheckpoints(session.run_dir).steps() and not stored_steps(session, reporter):
        reporter.warn("no checkpoint of this run here or in a store: it starts again from the beginning")
    release(session, "moved", reporter)
    session.config, session.workspace, session.machine = config, None, None
    target = config.resources.target
    with starting(session, reporter):
        if target:
            session.provider = provider_for_target(target, config.resources)
            session.update(provider=session.provider.name, target=target, machine_id=target, remote_dir=None,
                           usd_per_hour=config.resources.usd_per_hour, identity=config.resources.ssh_identity)
            refuse_over_budget(session, config.resources.usd_per_hour)
            reach_own_machine(session, reporter)
        else:
            reporter.phase("planning where to resume")
            try:
                plan = planning.compute_plan(config, session.store.measured_speeds(config.job.model.base),
                                             reporter.warn, example_tokens=planning.example_tokens(config),
                                             renting=True)
            except planning.PlanError as e:
                raise JobError(str(e), e.exit_code) from None
            session.update(remote_dir=None)
            if plan.candidates:
                refuse_over_budget(session, plan.candidates[0].usd_per_hour)
            rent_machine(session, plan.candidates, reporter)
        session.open_workspace(fresh=True)
        start_runner(session, reporter, resume=True)
    return drive(session, reporter)


def _moved_config(session: Session, resources: dict[str, Any]) -> LaunchConfig:
    """The run's job with these resources set (None: removed, e.g. the old --target), checked,
    then written over job.local.yaml; a bad value leaves the file as it was."""
    path = session.run_dir / LOCAL_CONFIG
    raw = yaml.safe_load(path.read_text())
    section = {k: v for k, v in (raw.get("resources") or {}).items() if k not in resources}
    raw["resources"] = {**section, **{k: v for k, v in resources.items() if v is not None}}
    candidate = path.with_name(f".{LOCAL_CONFIG}.new")
    candidate.write_text(f"# The job as launched from {session.record.config_path}, then moved by `launch resume`\n"
                         + yaml.safe_dump(raw, sort_keys=False))
    try:
        load_config(candidate)
    except Exception as e:  # noqa: BLE001  (a ConfigError names the key; anything else: a data file moved)
        candidate.unlink()
        raise JobError(f"run {session.record.id}: {e}", EXIT_USAGE) from None
    candidate.replace(path)
    return load_config(path)


def pull(session: Session, reporter: Reporter) -> list[int]:
    """Fetch new checkpoints, metrics, logs and (when there) the adapter now; returns the
    checkpoint steps held here afterwards. A machine that is gone or does not answer: from the
    run's store, when it has one."""
    lost = check_rented(session, reporter)
    if lost:
        if pull_from_store(session, reporter):
            return LocalCheckpoints(session.run_dir).steps()
        raise JobError(f"{session.record.target} is {lost}: nothing more can be pulled from it; what was pulled "
                       f"is in {session.run_dir} (`launch resume {session.record.id}` continues the run)", EXIT_TARGET)
    if session.workspace is None:
        pull_from_store(session, reporter)
        return LocalCheckpoints(session.run_dir).steps()
    try:
        seen = look(session)
    except WorkspaceError as e:
        if not pull_from_store(session, reporter, because=f"{session.record.target} does not answer ({e})"):
            raise JobError(f"{e}; the run record keeps the run: try again when the target answers",
                           EXIT_TARGET) from None
        return LocalCheckpoints(session.run_dir).steps()
    pull_new_checkpoints(session, seen.complete_steps, reporter)
    session.ws.fetch_results(session.run_dir)
    return LocalCheckpoints(session.run_dir).steps()


def pull_from_store(session: Session, reporter: Reporter, because: str = "") -> bool:
    """The newest complete checkpoint in the run's store (checked against its manifest) and the
    run's files there (adapter, eval, samples, metrics, status); False when it has no store."""
    config = session.config
    if config is None or not config.storage.enabled:
        return False
    try:
        found = storage.RunInStore(config.storage, session.record.id)
        reporter.phase(f"pulling from {found.url}" + (f": {because}" if because else ""))
        steps = found.complete_steps()
        local = LocalCheckpoints(session.run_dir)
        if steps and steps[-1] > local.newest():
            found.pull_checkpoint(steps[-1], local.folder)
            session.update(pulled_step=steps[-1])
            reporter.checkpoint_pulled(steps[-1], local.path(steps[-1]))
        if steps:
            session.update(stored_step=steps[-1], store_url=found.url)
        found.pull_results(session.run_dir)
    except storage.StorageProblem as e:
        raise JobError(str(e), e.exit_code) from None
    local.prune(config.storage.keep_checkpoints)
    return True


def down(session: Session, reporter: Reporter) -> RunRecord:
    """Stop the job (SIGTERM: it checkpoints; SIGKILL after STOP_GRACE_S), pull what it left,
    release the machine (a rented one is destroyed). Safe to repeat."""
    seen = None
    lost = check_rented(session, reporter)
    if session.workspace is not None and not lost:
        seen = _look_or_fail(session)
        if seen.running and session.record.pid and session.ws.stoppable:
            reporter.phase("stopping the runner (it saves a checkpoint first)")
            seen = stop_with_grace(session.ws, session.record.pid, STOP_GRACE_S)
        note_stored(session, seen.status)
        pull_new_checkpoints(session, seen.complete_steps, reporter)
        session.ws.fetch_results(session.run_dir)
    if session.provider.rents_machines:
        release(session, lost or "stopped", reporter)
        if not lost:
            renting.may_rent_again(session.run_dir)
    elif session.machine is not None:
        session.provider.terminate(session.machine)
    if session.record.status in ("done", "failed", "stopped"):  # stopped: a repeated `down`
        return session.record
    now = clock.now()
    return session.update(status="stopped", stop_reason="down", ended_at=now, elapsed_s=session.elapsed_s(now),
                          started_at=None,
                          exit_code=seen.exit_code if seen else None,
                          step=(seen.status.get("step") if seen else None) or session.record.step,
                          error=f"stopped by `launch down`; `launch resume {session.record.id}` continues it")


def stop_with_grace(workspace: Workspace, job: int, grace_s: float) -> Look:
    """SIGTERM (the runner checkpoints and exits 143), SIGKILL if it has not ended in grace_s."""
    workspace.signal(job, "TERM")
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        seen = workspace.look(job)
        if not seen.running:
            return seen
        time.sleep(1)
    workspace.signal(job, "KILL")
    return workspace.look(job)


def _look_or_fail(session: Session) -> Look:
    try:
        return look(session)
    except WorkspaceError as e:
        raise JobError(f"{e}; the run record keeps the run: try again when the target answers", EXIT_TARGET) from None


# ---------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    return _read_jsonl(run_dir / "metrics.jsonl")


def measured_tokens_per_s(run_dir: Path) -> Optional[float]:
    """The median training throughput of a run (the first steps, which warm up, left out)."""
    rates = [e["tokens_per_s"] for e in read_metrics(run_dir)
             if e.get("event") == "train" and e.get("tokens_per_s") and e.get("step", 0) > 2]
    return sorted(rates)[len(rates) // 2] if rates else None


def plot_losses(run_dir: Path) -> Optional[Path]:
    """loss.png: training loss per step and validation loss, as pulled. None without metrics."""
    events = read_metrics(run_dir)
    train = {e["step"]: e["loss"] for e in events if e.get("event") == "train" and e.get("loss") is not None}
    evals = {e["step"]: e["eval_loss"] for e in events if e.get("event") == "eval"}
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display needed (and none wanted) on a laptop's background job
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
    axes.plot(list(train), list(train.values()), label="train loss", linewidth=1.2)
    if evals:
        axes.plot(list(evals), list(evals.values()), "o-", label="validation loss")
    base = next((e.get("base_test_loss") for e in events if e.get("event") == "test"), None)
    if base is not None and math.isfinite(base):
        axes.axhline(base, color="grey", linestyle="--", linewidth=1, label="base model test loss")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss")
    axes.set_title(run_dir.name, fontsize=9)
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    path = run_dir / "loss.png"
    figure.savefig(path)
    plt.close(figure)
    return path


def _read_json(path: Path) -> Optional[dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return []
