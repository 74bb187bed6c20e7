"""The run lifecycle: launch, attach, resume, pull, down.

A run is a run record (runs.py) plus a folder on the target (<workdir>/runs/<run-id>/) where the
runner writes its files, plus a folder here (runs/<run-id>/) where they are pulled. The runner is
started detached from us (remote.Machine.start), so the launcher can die, the laptop can close and
the SSH connection can drop without the job noticing; everything the launcher needs to find the
job again is in the run record, written at every transition.

cli.py renders; this module does, and talks to the user only through a Reporter."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import secrets
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Protocol

import yaml

from launcher import sync
from launcher.config import LaunchConfig, load as load_config, runner_module
from launcher.paths import CLUSTER_TEMPLATES, RUNNER_FILE, RUNNER_REQUIREMENTS
from launcher.errors import EXIT_ENVIRONMENT, EXIT_TARGET
from launcher.preflight import resolve_workdir
from launcher.providers import provider_for
from launcher.providers.base import MachineSpec, Need, Offer, Provider, ProviderError
from launcher.providers.vast_api import VastError
from launcher.remote import Machine, RemoteError
from launcher.runs import RESUMABLE, RunRecord, RunStore, state_dir

EXIT_CODE_FILE = "exit_code"
LOCAL_CONFIG = "job.local.yaml"  # the job as launched (overrides applied, local paths absolute)
REMOTE_CONFIG = "job.yaml"  # what the runner reads on the target
POLL_S = 2.0  # status/checkpoint probe interval while following
LOST_AFTER_S = 300.0  # no answer from the target for this long: give up following (the job may live on)
STOP_GRACE_S = 120.0  # `down`: time the runner gets to checkpoint after SIGTERM
BOOTSTRAP_FILES = (CLUSTER_TEMPLATES / "bootstrap.sh", CLUSTER_TEMPLATES / "stack_check.py", RUNNER_REQUIREMENTS)
# Runner exit codes after which `resume` can continue: killed (137), SIGTERM (143), SIGINT (130).
RESUMABLE_EXIT_CODES = (130, 137, 143)


LOST_STATES = ("preempted", "gone", "stopped")  # a rented machine in these no longer runs the job
SEEN_FILE = ".launcher-seen"  # in the workdir, touched at every look: the instance watchdog reads it


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
        return 0 if self.detached else (self.record.exit_code if self.record.exit_code is not None else 1)


@dataclass
class Session:
    """One run being driven: its record, its target and the folders on both sides."""

    store: RunStore
    record: RunRecord
    provider: Provider
    machine: Machine

    @property
    def run_dir(self) -> Path:
        return Path(self.record.run_dir)

    @property
    def remote_dir(self) -> str:
        assert self.record.remote_dir, "the run has no folder on the target yet"
        return self.record.remote_dir

    def update(self, **fields: Any) -> RunRecord:
        self.record = self.store.update(self.record.id, **fields)
        return self.record

    def spent_usd(self, now: Optional[float] = None) -> float:
        from launcher.renting import run_usd

        return run_usd(self.store, self.record, now)

    def elapsed_s(self, now: Optional[float] = None) -> float:
        if self.record.status in ("starting", "running"):
            return self.record.runner_seconds(now)
        return self.record.elapsed_s or 0.0

    @property
    def holds_rented_machine(self) -> bool:
        """A rented instance is under this run (a rented run names `vast` until one is up)."""
        return self.provider.owns_machines and self.record.target != "vast"


def new_run_id(config: Path) -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{config.stem}-{secrets.token_hex(2)}"


def machine_spec(run_id: str, identity: Optional[str]) -> MachineSpec:
    home = state_dir()
    return MachineSpec(run_id=run_id, known_hosts=home / "known_hosts" / run_id, control_dir=home / "ssh",
                       identity=Path(identity).expanduser() if identity else None)


def open_session(store: RunStore, run_id: str, log: Any = None) -> Session:
    """Find a recorded run's machine again (after the launcher died, on another day)."""
    record = store.get(run_id)
    try:
        resources = load_config(Path(record.run_dir) / LOCAL_CONFIG).resources
    except Exception:  # noqa: BLE001  (a moved data file must not keep a run from being reached)
        resources = None
    provider = provider_for(record.target, resources, log=log or (lambda text: None))
    machine = provider.reconnect(record.target, machine_spec(record.id, record.identity))
    return Session(store, record, provider, machine)


# ---------------------------------------------------------------------------------------------
# launch
# ---------------------------------------------------------------------------------------------


def create_run(config: LaunchConfig, target: str, runs_dir: Path, store: RunStore) -> Session:
    """The run record and the local run folder, before anything is touched on the target."""
    provider = provider_for(target, config.resources)
    run_id = new_run_id(config.path)
    run_dir = runs_dir.resolve() / run_id
    run_dir.mkdir(parents=True)
    (run_dir / LOCAL_CONFIG).write_text(_local_config_text(config))
    record = store.create(RunRecord(
        id=run_id, config_path=str(config.path), run_dir=str(run_dir), target=target, provider=provider.name,
        gpu=config.resources.gpu, usd_per_hour=config.resources.usd_per_hour,
        identity=config.resources.ssh_identity, model=config.job.model.base,
        micro_batch=config.job.train.micro_batch_size, gradient_checkpointing=config.job.train.gradient_checkpointing,
    ))
    machine = provider.reconnect(target, machine_spec(run_id, record.identity))
    return Session(store, record, provider, machine)


def launch(session: Session, config: LaunchConfig, reporter: Reporter, *, detach: bool = False,
           candidates: Optional[list[Offer]] = None) -> Outcome:
    """Provision (rent the first of `candidates` that comes up, for a rented target), bootstrap,
    sync, start the runner detached, then follow it to the end (or return at once with
    `detach`). A failure before the runner starts marks the run failed and releases a rented
    machine: nothing is left billing."""
    try:
        if session.provider.owns_machines:
            rent_machine(session, candidates or [], reporter)
        else:
            reporter.phase(f"connecting to {session.record.target}")
            offer = session.provider.offers(Need(), config.resources.usd_per_hour)[0]
            session.machine = session.provider.provision(offer, machine_spec(session.record.id, session.record.identity))
        workdir = resolve_workdir(session.machine, config.resources.workdir or session.provider.default_workdir())
        session.update(status="starting", remote_dir=f"{workdir}/runs/{session.record.id}")
        start_runner(session, config, workdir, reporter, resume=False)
    except KeyboardInterrupt:
        if session.record.status != "running":  # started already: the record says so, leave it
            release(session, "interrupted", reporter)
            session.update(status="interrupted", error="Ctrl-C before the runner started; nothing is running",
                           ended_at=time.time())
        raise
    except (RemoteError, JobError, ProviderError) as e:
        raise failed_to_start(session, e, reporter) from None
    except Exception as e:
        release(session, "failed", reporter)
        session.update(status="failed", error=f"{type(e).__name__}: {e}", ended_at=time.time())
        raise
    if detach:
        return Outcome(session.record, session.run_dir, detached=True)
    return drive(session, reporter)


def failed_to_start(session: Session, e: Exception, reporter: Reporter) -> JobError:
    """The runner did not start: release a rented machine, record the failure; the error to raise."""
    release(session, "failed", reporter)
    code = getattr(e, "exit_code", EXIT_TARGET)
    session.update(status="failed", error=str(e), ended_at=time.time(), exit_code=code)
    return JobError(str(e), code)


def rent_machine(session: Session, candidates: list[Offer], reporter: Reporter) -> None:
    """Rent the first candidate that comes up; the run record then names the instance."""
    from launcher import renting

    session.provider.log = reporter.warn  # the provider's warnings (price above the quote, ...) go to the user
    try:
        machine, offer = renting.rent(session.store, session.record.id, session.run_dir, session.provider,
                                      candidates, machine_spec(session.record.id, session.record.identity),
                                      reporter.phase, reporter.warn)
    except (renting.NothingRented, VastError) as e:
        raise JobError(str(e), EXIT_TARGET) from None
    session.machine = machine
    session.update(target=machine.name, gpu=offer.gpu_summary, usd_per_hour=machine.usd_per_hour)


def release(session: Session, reason: str, reporter: Reporter, when: Optional[float] = None) -> None:
    """Stop paying for a rented machine (destroy it) and close its record; own boxes: nothing."""
    if not session.holds_rented_machine:
        return
    session.store.end_machine(session.record.id, session.record.target, reason, when)
    try:
        session.provider.terminate(session.machine)
    except (ProviderError, VastError) as e:
        reporter.warn(str(e))


def drive(session: Session, reporter: Reporter) -> Outcome:
    """Follow the run to its end; a rented machine lost under it (preempted, gone) is replaced
    by the next offer and the run resumed there, unless resources.recover is false. At the end
    the rented machine is released (results are pulled by then)."""
    while True:
        try:
            outcome = follow_run(session, reporter)
        except MachineLost as lost:
            if not recover(session, lost.state, reporter):
                return Outcome(session.record, session.run_dir)
            continue
        release(session, outcome.record.status, reporter)
        return outcome


def recover(session: Session, state: str, reporter: Reporter, *, force: bool = False) -> bool:
    """The machine was lost: record when, destroy what is left of it (Vast bills a stopped
    instance's disk), then (resources.recover) rent the next offer and resume there from the
    newest checkpoint pulled here. False: the run is left preempted, resumable."""
    from launcher import renting

    now = time.time()
    lost = session.record.target
    reporter.warn(f"{lost} was {state} at step {session.record.step}; the newest checkpoint here is "
                  f"checkpoint-{session.record.pulled_step}")
    release(session, state, reporter, when=now)
    session.update(status="preempted", elapsed_s=session.elapsed_s(now), started_at=None, ended_at=now,
                   exit_code=143, error=f"{lost} was {state}; `launch resume {session.record.id}` continues on "
                                        "the next offer")
    config = load_config(session.run_dir / LOCAL_CONFIG)
    if not (config.resources.recover or force):
        return False
    reporter.phase("renting the next offer to resume on")
    candidates = renting.next_candidates(config, session.run_dir, reporter.warn)
    rent_machine(session, candidates, reporter)
    try:
        workdir = resolve_workdir(session.machine, config.resources.workdir or session.provider.default_workdir())
        session.update(status="starting", remote_dir=f"{workdir}/runs/{session.record.id}")
        start_runner(session, config, workdir, reporter, resume=True)
    except (RemoteError, JobError) as e:
        raise failed_to_start(session, e, reporter) from None
    return True


def start_runner(session: Session, config: LaunchConfig, workdir: str, reporter: Reporter, *, resume: bool) -> None:
    """Bootstrap the target, put the job there, start the runner detached; record each step."""
    machine = session.machine
    reporter.phase("bootstrapping the target (python environment, GPU stack check)")
    python = bootstrap(machine, workdir, config)
    reporter.phase("syncing data, config and runner")
    remote_dir = session.remote_dir
    assets = sync.local_assets(config)
    placed = sync.sync_assets(machine, workdir, assets)
    machine.run(f"mkdir -p {shlex.quote(remote_dir)}/checkpoints")
    staging = session.run_dir / ".outgoing"
    staging.mkdir(exist_ok=True)
    (staging / REMOTE_CONFIG).write_text(sync.remote_config(config, placed))
    shutil.copy2(RUNNER_FILE, staging / RUNNER_FILE.name)
    machine.put(staging, remote_dir)
    shutil.rmtree(staging)
    if resume:
        push_checkpoint_if_lost(session, reporter)
    command = (f"PYTHONUNBUFFERED=1 {shlex.quote(python)} {RUNNER_FILE.name} --config {REMOTE_CONFIG} --out ."
               + (" --resume auto" if resume else ""))
    pid = machine.start(command, cwd=remote_dir, exit_code_file=EXIT_CODE_FILE)
    session.update(status="running", pid=pid, python=python, started_at=time.time(), exit_code=None, error=None,
                   ended_at=None)
    reporter.started(session.record)


def bootstrap(machine: Machine, workdir: str, config: LaunchConfig) -> str:
    """Run cluster_templates/bootstrap.sh on the target; returns the python the runner uses."""
    bin_dir = f"{workdir}/bin"
    with tempfile.TemporaryDirectory() as staging:
        for file in BOOTSTRAP_FILES:
            shutil.copy2(file, Path(staging) / file.name)
        machine.put(Path(staging), bin_dir)  # one transfer for the three files
    env = {"QLORA_WORKDIR": workdir, "QLORA_REQUIREMENTS": f"{bin_dir}/requirements.txt",
           "QLORA_DEVICE": "cpu" if config.job.train.device == "cpu" else "cuda"}
    python = config.resources.python
    if python is None and session_is_local(machine) and _has_runner_packages():
        python = sys.executable  # the local target trains in the launcher's own environment when it can
    if python:
        env["QLORA_PYTHON"] = python
    line = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    seen = shlex.quote(f"{workdir}/{SEEN_FILE}")  # a rented instance's watchdog: the launcher is here
    result = machine.run(f"touch {seen}; {line} sh {shlex.quote(bin_dir)}/bootstrap.sh", check=False, timeout=3600)
    report = next((ln for ln in result.stdout.splitlines() if ln.startswith("QLORA_BOOTSTRAP ")), None)
    if result.returncode != 0 or report is None:
        errors = [ln for ln in (result.stderr + result.stdout).splitlines() if ln.strip()]
        reason = next((ln for ln in reversed(errors) if ln.startswith("bootstrap: error:")), errors[-1] if errors else "")
        detail = next((ln for ln in errors if ln.startswith("stack check:")), "")
        raise JobError(f"{machine.name}: {reason.removeprefix('bootstrap: error: ')}"
                       + (f" ({detail})" if detail else ""), EXIT_ENVIRONMENT)
    return json.loads(report.removeprefix("QLORA_BOOTSTRAP "))["python"]


def session_is_local(machine: Machine) -> bool:
    return machine.name == "local"


def _has_runner_packages() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(n) for n in ("torch", "transformers", "peft", "bitsandbytes", "accelerate"))


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


@dataclass
class Probe:
    """One look at the job on the target."""

    exit_code: Optional[int]  # None while running (or when it died without writing one)
    alive: bool
    complete_steps: list[int]
    status: dict[str, Any]


def probe(session: Session) -> Probe:
    d = shlex.quote(session.remote_dir)
    # No pid yet means nothing was started (`kill -0 0` would ask about our own process group).
    alive_check = f"kill -0 {session.record.pid} 2>/dev/null" if session.record.pid else "false"
    # Liveness first, then the exit code: the wrapper writes exit_code before it exits, so a
    # wrapper seen dead has written it by the time we read it (the other order has a window).
    # Touching the workdir's SEEN_FILE tells a rented instance's watchdog the launcher is about.
    out = session.machine.run(
        f"mkdir -p {d} && cd {d} && touch ../../{SEEN_FILE} && ({alive_check} && echo alive || echo dead) && echo --- && "
        f"(cat {EXIT_CODE_FILE} 2>/dev/null || echo none) && echo --- && "
        f"for c in checkpoints/checkpoint-*; do [ -f \"$c/{runner_module().MANIFEST}\" ] && echo \"$c\"; done; "
        f"echo --- && (cat status.json 2>/dev/null || echo '{{}}')", timeout=60).stdout
    alive, code, checkpoints, status = (part.strip() for part in out.split("---\n", 3))
    steps = sorted(int(line.rsplit("-", 1)[1]) for line in checkpoints.splitlines() if line.strip())
    try:
        status_json = json.loads(status or "{}")
    except ValueError:
        status_json = {}
    return Probe(exit_code=int(code) if code.lstrip("-").isdigit() else None, alive=alive == "alive",
                 complete_steps=steps, status=status_json)


def raise_if_lost(session: Session) -> None:
    """MachineLost when the provider says a rented machine under the run is preempted, gone or stopped."""
    if session.provider.owns_machines:
        machine_state = session.provider.state(session.machine)
        if machine_state in LOST_STATES:
            raise MachineLost(machine_state) from None


def follow_run(session: Session, reporter: Reporter) -> Outcome:
    """Stream metrics until the runner ends, pulling each new complete checkpoint; then the
    final pull. Survives dropped connections; after LOST_AFTER_S without an answer it stops
    following and leaves the run `running` (it may well be), with how to attach."""
    state: dict[str, Any] = {"done": None, "last_poll": 0.0, "last_contact": time.monotonic(), "total": None,
                             "warned": False}

    def poll() -> None:
        try:
            look = probe(session)
        except RemoteError as e:
            raise_if_lost(session)
            if not state["warned"]:
                reporter.warn(f"lost contact with {session.machine.name} ({e}); retrying")
                state["warned"] = True
            if time.monotonic() - state["last_contact"] > LOST_AFTER_S:
                raise JobError(f"no answer from {session.machine.name} for {LOST_AFTER_S:.0f} s; the job may still "
                               f"be running: `launch attach {session.record.id}` when it is back", EXIT_TARGET) from None
            return
        state["last_contact"], state["warned"] = time.monotonic(), False
        state["total"] = look.status.get("total_steps") or state["total"]
        if look.status.get("step") is not None and look.status.get("step") != session.record.step:
            session.update(step=look.status.get("step"), total_steps=state["total"])
        pull_new_checkpoints(session, look.complete_steps, reporter)
        if look.exit_code is not None or not look.alive:
            if look.exit_code != 0:
                # Killed as its machine went down (we may look in during the shutdown): the
                # provider tells a lost machine from a runner that died on a healthy one.
                raise_if_lost(session)
            state["done"] = look

    def show(line: str) -> None:
        try:
            event = json.loads(line)
        except ValueError:
            return
        if isinstance(event, dict):
            reporter.metric(event, state["total"], session.spent_usd())

    metrics_path = f"{session.remote_dir}/metrics.jsonl"
    lines_shown = 0
    stream = session.machine.follow(metrics_path, stop=lambda: state["done"] is not None)
    # The stream starts at the file's first line: mirror it here as it comes, so a machine
    # lost mid-run leaves the run's history on this side (a resume elsewhere pushes it back).
    mirror = (session.run_dir / "metrics.jsonl").open("w", buffering=1)
    with contextlib.closing(stream), mirror:  # a lost machine ends the stream (and its ssh) at once
        for line in stream:
            if line:
                lines_shown += 1
                mirror.write(line + "\n")
                show(line)
            if time.monotonic() - state["last_poll"] >= POLL_S:
                state["last_poll"] = time.monotonic()
                poll()
    # The runner ended between two reads of the stream: show its last lines from the pulled copy.
    pull_files(session)
    pulled_metrics = session.run_dir / "metrics.jsonl"
    for line in (pulled_metrics.read_text() if pulled_metrics.is_file() else "").splitlines()[lines_shown:]:
        show(line)
    reporter.stopped_following()
    return finish(session, state["done"], reporter, files_pulled=True)


def finish(session: Session, look: Probe, reporter: Reporter, files_pulled: bool = False) -> Outcome:
    """The runner has ended: pull everything (the files once), plot, record the outcome."""
    reporter.phase("pulling results")
    pull_new_checkpoints(session, look.complete_steps, reporter)
    if not files_pulled:
        pull_files(session)
    now = time.time()
    # The runner's last status write is when it ended (we may attach hours later); the
    # target's clock may be off from ours, so it only ever shortens the segment.
    ended = look.status.get("updated_at")
    started = session.record.started_at
    end = min(now, ended) if isinstance(ended, (int, float)) and started and ended > started else now
    elapsed = session.elapsed_s(end)
    code = look.exit_code
    status = run_status(code)
    error = look.status.get("error")
    if code is None:
        error = ("the runner died without an exit status (its machine rebooted, or it was killed with its wrapper); "
                 f"`launch resume {session.record.id}` continues from the newest checkpoint")
    elif code == 137:
        error = (f"the runner was killed (SIGKILL) at step {look.status.get('step')}; "
                 f"`launch resume {session.record.id}` continues from the newest checkpoint")
    session.update(status=status, exit_code=code, ended_at=now, elapsed_s=elapsed,
                   started_at=None, step=look.status.get("step", session.record.step),
                   total_steps=look.status.get("total_steps", session.record.total_steps), error=error,
                   tokens_per_s=measured_tokens_per_s(session.run_dir),
                   seq_tokens=look.status.get("train_seq_tokens", session.record.seq_tokens))
    plot_losses(session.run_dir)
    return Outcome(session.record, session.run_dir, evaluation=_read_json(session.run_dir / "eval.json"),
                   samples=_read_jsonl(session.run_dir / "samples.jsonl"))


def run_status(exit_code: Optional[int]) -> str:
    """The runner's exit code as a run record status."""
    if exit_code is None:
        return "interrupted"
    return {0: "done", 143: "preempted", 130: "interrupted", 137: "interrupted"}.get(exit_code, "failed")


# ---------------------------------------------------------------------------------------------
# pulling and pushing
# ---------------------------------------------------------------------------------------------


def pull_files(session: Session) -> None:
    """Everything of the run but the checkpoints: adapter, eval, samples, metrics, logs, status."""
    session.machine.get(f"{session.remote_dir}/", session.run_dir, exclude=("checkpoints", ".*.tmp", RUNNER_FILE.name))


def local_checkpoints(run_dir: Path) -> list[int]:
    qr = runner_module()
    return [step for step, _ in qr.complete_checkpoints(run_dir / "checkpoints")]


def pull_new_checkpoints(session: Session, remote_steps: list[int], reporter: Reporter) -> None:
    """Pull the newest complete checkpoint if it is newer than ours, verify it against its
    manifest, move it into place, and keep the newest K here. Only the newest: older ones are
    what the runner rotates away next, and a resume needs only the newest."""
    qr = runner_module()
    keep = _keep_checkpoints(session)
    newest_here = max(local_checkpoints(session.run_dir), default=-1)
    newer = [s for s in remote_steps if s > newest_here]
    for step in newer[-1:]:
        folder = session.run_dir / "checkpoints"
        incoming = folder / f".incoming-{step}"  # rsync --partial resumes into it next time
        incoming.mkdir(parents=True, exist_ok=True)
        try:
            session.machine.get(f"{session.remote_dir}/checkpoints/checkpoint-{step}/", incoming)
        except RemoteError as e:
            # Rotated away while we copied (a newer one exists), or the connection dropped:
            # the next look tries again; a half copy is never taken for a checkpoint.
            reporter.warn(f"checkpoint-{step} not pulled this time ({e})")
            continue
        if not qr.checkpoint_is_complete(incoming):
            continue
        final = folder / f"checkpoint-{step}"
        shutil.rmtree(final, ignore_errors=True)
        incoming.rename(final)
        session.update(pulled_step=step)
        reporter.checkpoint_pulled(step, final)
    folder = session.run_dir / "checkpoints"
    for step in local_checkpoints(session.run_dir)[:-keep]:
        shutil.rmtree(folder / f"checkpoint-{step}", ignore_errors=True)
    newest_here = max(local_checkpoints(session.run_dir), default=-1)
    for stale in folder.glob(".incoming-*") if folder.is_dir() else []:
        if int(stale.name.rsplit("-", 1)[1]) <= newest_here:
            shutil.rmtree(stale, ignore_errors=True)


def _keep_checkpoints(session: Session) -> int:
    try:
        raw = yaml.safe_load((session.run_dir / LOCAL_CONFIG).read_text())
        return int((raw.get("storage") or {}).get("keep_checkpoints", 3))
    except (OSError, ValueError, AttributeError):
        return 3


def push_checkpoint_if_lost(session: Session, reporter: Reporter) -> None:
    """Before a resume: if the target lacks our newest complete checkpoint (a new or wiped
    machine), put it back (with the metrics so far), marked complete only once whole."""
    remote = probe(session).complete_steps
    local = local_checkpoints(session.run_dir)
    if not local or (remote and max(remote) >= max(local)):
        return
    step = max(local)
    reporter.phase(f"pushing checkpoint-{step} back to the target")
    # The run's history goes back with it: the runner cuts metrics.jsonl at the checkpoint's
    # step and appends, and reuses the cached base-model evaluation.
    for name in ("metrics.jsonl", "base_eval.json"):
        if (session.run_dir / name).is_file():
            session.machine.put(session.run_dir / name, f"{session.remote_dir}/{name}")
    remote_root = f"{session.remote_dir}/checkpoints"
    session.machine.put(session.run_dir / "checkpoints" / f"checkpoint-{step}", f"{remote_root}/.incoming/checkpoint-{step}")
    session.machine.run(f"cd {shlex.quote(remote_root)} && rm -rf checkpoint-{step} && "
                        f"mv .incoming/checkpoint-{step} checkpoint-{step}")


# ---------------------------------------------------------------------------------------------
# attach, resume, pull, down
# ---------------------------------------------------------------------------------------------


def check_rented(session: Session, reporter: Reporter) -> Optional[str]:
    """A rented machine as it is now: stopped (by its watchdog) -> started again, so what it
    holds can be pulled; preempted or gone -> that state is returned. None: reachable."""
    if not session.holds_rented_machine:
        return None
    state = session.provider.state(session.machine)
    if state == "stopped":
        reporter.phase(f"{session.record.target} was stopped (idle); starting it again to reach the run")
        try:
            session.machine = session.provider.wake(session.machine, machine_spec(session.record.id,
                                                                                  session.record.identity))
        except (ProviderError, VastError, RemoteError) as e:
            raise JobError(f"{session.record.target} is stopped and did not start again: {e}", EXIT_TARGET) from None
        return None
    return state if state in LOST_STATES else None


def attach(session: Session, reporter: Reporter) -> Outcome:
    """Follow a run again. Running: follow it. Ended while we were away: pull and record.
    Dead (killed, machine restarted): resume it. Its rented machine lost: resume on the next offer."""
    if session.record.remote_dir is None:
        raise JobError(f"run {session.record.id} never started on its target ({session.record.status}: "
                       f"{session.record.error}); launch it again", 2)
    moved = resume_elsewhere_if_lost(session, reporter)
    if moved:
        return moved
    look = _probe_or_fail(session)
    if look.alive and look.exit_code is None:
        reporter.started(session.record)
        return drive(session, reporter)
    if look.exit_code is None or look.exit_code in RESUMABLE_EXIT_CODES:
        reporter.warn(f"the runner is not running (exit code {look.exit_code}); resuming from the newest checkpoint")
        return resume(session, reporter)
    return finish_and_release(session, look, reporter)


def resume_elsewhere_if_lost(session: Session, reporter: Reporter) -> Optional[Outcome]:
    """A run whose rented machine is lost: rent the next offer, resume and follow it there."""
    lost = check_rented(session, reporter)
    if not lost:
        return None
    recover(session, lost, reporter, force=True)  # forced: it rents and resumes, or raises
    return drive(session, reporter)


def finish_and_release(session: Session, look: Probe, reporter: Reporter) -> Outcome:
    outcome = finish(session, look, reporter)
    release(session, outcome.record.status, reporter)
    return outcome


def resume(session: Session, reporter: Reporter) -> Outcome:
    """Continue from the newest complete checkpoint (pushed back if the target lost it); the
    runner restores optimizer, scheduler, RNG and data position, so losses match an
    uninterrupted run. A run whose rented machine is gone resumes on the next offer."""
    record = session.record
    if record.status == "done":
        raise JobError(f"run {record.id} is done; nothing to resume", 2)
    if record.status not in RESUMABLE and record.status != "failed":
        raise JobError(f"run {record.id} is {record.status}; it cannot be resumed", 2)
    moved = resume_elsewhere_if_lost(session, reporter)
    if moved:
        return moved
    config = load_config(session.run_dir / LOCAL_CONFIG)
    try:
        session.machine.ensure_connected()
        if record.remote_dir:
            look = probe(session)
            if look.alive and look.exit_code is None:
                reporter.warn("the runner is still running; following it instead")
                reporter.started(record)
                return drive(session, reporter)
            if look.exit_code == 0:
                return finish_and_release(session, look, reporter)
        workdir = resolve_workdir(session.machine, config.resources.workdir or session.provider.default_workdir())
        session.update(status="starting", remote_dir=f"{workdir}/runs/{record.id}")
        start_runner(session, config, workdir, reporter, resume=True)
    except RemoteError as e:
        raise JobError(str(e), EXIT_TARGET) from None
    return drive(session, reporter)


def pull(session: Session, reporter: Reporter) -> list[int]:
    """Fetch new checkpoints, metrics, logs and (when there) the adapter now; returns the
    checkpoint steps held here afterwards."""
    lost = check_rented(session, reporter)
    if lost:
        raise JobError(f"{session.record.target} is {lost}: nothing more can be pulled from it; what was pulled "
                       f"is in {session.run_dir} (`launch resume {session.record.id}` continues the run)", EXIT_TARGET)
    look = _probe_or_fail(session)
    pull_new_checkpoints(session, look.complete_steps, reporter)
    pull_files(session)
    return local_checkpoints(session.run_dir)


def down(session: Session, reporter: Reporter) -> RunRecord:
    """Stop the job (SIGTERM: it checkpoints; SIGKILL after STOP_GRACE_S), pull what it left,
    release the machine (a rented one is destroyed). Safe to repeat."""
    look = None
    lost = check_rented(session, reporter)
    if session.record.remote_dir and not lost:  # (a rented run has a folder only once its machine is up)
        look = _probe_or_fail(session)
        if look.alive and look.exit_code is None and session.record.pid:
            reporter.phase("stopping the runner (it saves a checkpoint first)")
            session.machine.signal_job(session.record.pid, "TERM")
            deadline = time.monotonic() + STOP_GRACE_S
            while time.monotonic() < deadline:
                look = probe(session)
                if not look.alive or look.exit_code is not None:
                    break
                time.sleep(1)
            else:
                session.machine.signal_job(session.record.pid, "KILL")
                look = probe(session)
        pull_new_checkpoints(session, look.complete_steps, reporter)
        pull_files(session)
    if session.provider.owns_machines:
        release(session, lost or "stopped", reporter)
    else:
        session.provider.terminate(session.machine)
    if session.record.status in ("done", "failed"):
        return session.record
    now = time.time()
    return session.update(status="stopped", ended_at=now, elapsed_s=session.elapsed_s(now), started_at=None,
                          exit_code=look.exit_code if look else None,
                          step=(look.status.get("step") if look else None) or session.record.step,
                          error=f"stopped by `launch down`; `launch resume {session.record.id}` continues it")


def _probe_or_fail(session: Session) -> Probe:
    try:
        return probe(session)
    except RemoteError as e:
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
