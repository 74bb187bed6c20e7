"""An in-memory cloud for the lifecycle's tests: a renting provider (MemoryProvider) and the
workspace of its machines (FakeWorkspace), with no process, socket, shell or sleep anywhere.

The cloud (MemoryCloud) holds what a real provider's account holds: offers, rented machines
(their state settable: running, stopped, preempted, gone), every call made to it, and one-shot
faults to inject. A machine's disk holds run folders, each with a simulated runner that keeps
the runner's contract (DESIGN.md, "Runner"): metrics.jsonl one event per step, status.json,
complete checkpoints every save_every steps (with the runner's own manifest, so the launcher's
LocalCheckpoints takes them), the final adapter/eval/samples, `--resume auto` from the newest
complete checkpoint (the history cut at its step), SIGTERM -> a checkpoint and exit 143,
SIGKILL -> exit 137.

Time passes for a runner only when somebody waits on it: each poll of the metrics stream that
finds nothing new advances every live runner `steps_per_poll` steps, and `cloud.tick(n)` is time
passing while nobody watches. So a test is deterministic and fast (set job.POLL_S to 0).

The lifecycle must talk to a Workspace and a Provider only: a MemoryMachine has no shell, and any
shell call on it fails the test.

    cloud = MemoryCloud([memory_offer(1, 0.20), memory_offer(2, 0.30)])
    cloud.register(monkeypatch)           # PROVIDERS["memory"] -> a provider bound to this cloud
    cloud.preempt_at(25)                  # the machine under the runner is preempted at step 25
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Optional

from launcher.paths import runner_module
from launcher.providers.base import (
    LabelledMachine, MachineSpec, MachineState, Need, Offer, Provider, ProviderContext, ProviderError, Provisioned,
    Restartable, Sweepable, label_for,
)
from launcher.remote import Machine, RemoteError, Unreachable
from launcher.workspace import Look, PrepareFailed, Workspace

NAME = "memory"
WORKDIR = "/memory/qlora-launch"
PYTHON = "/memory/venv/bin/python"
SETTABLE_STATES = ("running", "stopped", "preempted", "gone", "unknown")


def memory_offer(offer_id: int, usd_per_hour: float, *, gpu: str = "RTX 4090", gpu_count: int = 1,
                 vram_gb: float = 24.0, interruptible: bool = True, region: str = "mem-1") -> Offer:
    return Offer(provider=NAME, region=region, gpu=gpu, gpu_count=gpu_count, vram_gb=vram_gb,
                 usd_per_hour=usd_per_hour, interruptible=interruptible, instance_type=f"offer {offer_id}",
                 offer_id=offer_id)


def loss_at(step: int) -> float:
    """The simulated runner's training loss: the same at a step however the run got there."""
    return round(3.0 * 0.97 ** step, 6)


@dataclass
class Fault:
    kind: str  # preempt | stop | gone (the machine) | die (the runner alone)
    at_step: int
    exit_code: Optional[int] = None  # die: what the wrapper wrote (None: it died without writing one)


# ---------------------------------------------------------------------------------------------
# the runner's folder on a machine
# ---------------------------------------------------------------------------------------------


@dataclass
class RunnerFolder:
    """<workdir>/runs/<run-id>/ on a machine's disk, and the (simulated) runner in it."""

    uploaded: bool = False
    total_steps: int = 40
    save_every: int = 10
    eval_every: int = 20
    keep: int = 3
    job: Optional[int] = None  # the running job's id (what look/signal take)
    alive: bool = False
    exit_code: Optional[int] = None
    step: int = 0
    phase: str = "created"
    metrics: list[str] = field(default_factory=list)  # metrics.jsonl, line by line
    checkpoints: dict[int, dict[str, bytes]] = field(default_factory=dict)  # complete ones only
    base_eval: Optional[str] = None  # base_eval.json
    log: list[str] = field(default_factory=list)  # runner.log
    done_files: dict[str, str] = field(default_factory=dict)  # eval.json, samples.jsonl at the end
    starts: list[dict[str, Any]] = field(default_factory=list)  # each start: job, resume, from_step
    pushed: list[int] = field(default_factory=list)  # checkpoints pushed back by the launcher
    history_pushed: list[str] = field(default_factory=list)  # history files pushed with them
    env: dict[str, str] = field(default_factory=dict)  # the runner's environment from the last start

    @property
    def running(self) -> bool:
        return self.alive and self.exit_code is None

    def status(self) -> dict[str, Any]:
        return {"phase": self.phase, "step": self.step, "total_steps": self.total_steps, "updated_at": time.time(),
                "train_seq_tokens": 48.0, **({"error": "simulated failure"} if self.phase == "failed" else {})}

    def start(self, job: int, resume: bool) -> None:
        if not self.uploaded:
            raise RemoteError("start: the job was never uploaded here (no job.yaml, no runner)")
        newest = max(self.checkpoints, default=0) if resume else 0
        if resume:  # the runner cuts the history at the checkpoint's step and appends
            self.metrics = [line for line in self.metrics if json.loads(line).get("step", 0) <= newest]
        else:
            self.metrics, self.checkpoints, self.done_files = [], {}, {}
            self.base_eval = json.dumps({"base_test_loss": 3.2})
        self.step, self.job, self.alive, self.exit_code, self.phase = newest, job, True, None, "training"
        self.starts.append({"job": job, "resume": resume, "from_step": newest})
        self.log.append(f"started job {job}" + (f", resumed from checkpoint-{newest}" if resume else ""))

    def advance(self, steps: int, cloud: "MemoryCloud", machine: "MemoryMachine") -> None:
        for _ in range(steps):
            if not self.running:
                return
            self.step += 1
            s = self.step
            self.metrics.append(json.dumps({"event": "train", "step": s, "loss": loss_at(s), "lr": 1e-3,
                                            "tokens_per_s": 1000.0 + s, "epoch": s / self.total_steps,
                                            "time": time.time()}))
            if s % self.eval_every == 0:
                self.metrics.append(json.dumps({"event": "eval", "step": s, "eval_loss": loss_at(s) + 0.1}))
            if s % self.save_every == 0 or s == self.total_steps:
                self.save_checkpoint()
            if s == self.total_steps:
                self.finish()
                return
            fault = cloud.take_fault(s)
            if fault is not None:
                if fault.kind == "die":
                    self.alive, self.exit_code, self.phase = False, fault.exit_code, "training"
                    self.log.append(f"died at step {s}")
                else:
                    cloud.set_state(machine.machine_id, {"preempt": "preempted", "stop": "stopped",
                                                         "gone": "gone"}[fault.kind])
                return

    def save_checkpoint(self) -> None:
        if self.step <= 0:
            return
        self.checkpoints[self.step] = checkpoint_files(self.step)
        for old in sorted(self.checkpoints)[:-self.keep]:
            del self.checkpoints[old]

    def finish(self) -> None:
        self.metrics.append(json.dumps({"event": "test", "step": self.step, "test_loss": loss_at(self.step) + 0.1,
                                        "base_test_loss": 3.2}))
        self.done_files = {"eval.json": json.dumps({"test_loss": loss_at(self.step) + 0.1, "perplexity": 1.5}),
                           "samples.jsonl": json.dumps({"prompt": "a cat", "output": "says meow"}) + "\n"}
        self.alive, self.exit_code, self.phase = False, 0, "done"
        self.log.append("done")

    def terminate_signal(self, signal_name: str) -> None:
        """TERM: a checkpoint at the current step, exit 143; KILL: gone at once, exit 137."""
        if not self.running:
            return
        if signal_name == "TERM":
            self.save_checkpoint()
            self.alive, self.exit_code, self.phase = False, 143, "preempted"
        elif signal_name == "KILL":
            self.alive, self.exit_code = False, 137
        else:
            raise RemoteError(f"signal {signal_name}: the runner only handles TERM and KILL")

    def files(self) -> dict[str, str]:
        """The run's files but its checkpoints, as fetch_results brings them."""
        out = {"metrics.jsonl": "".join(line + "\n" for line in self.metrics), "status.json": json.dumps(self.status()),
               "runner.log": "".join(line + "\n" for line in self.log), **self.done_files}
        if self.base_eval is not None:
            out["base_eval.json"] = self.base_eval
        if self.exit_code is not None:
            out["exit_code"] = f"{self.exit_code}\n"
        return out


def checkpoint_files(step: int) -> dict[str, bytes]:
    """A small checkpoint in the Trainer's layout, with the runner's manifest (qlora_complete.json)."""
    files = {"adapter_model.safetensors": b"\0" * 64 + step.to_bytes(4, "little"),
             "adapter_config.json": b'{"r": 16}',
             "trainer_state.json": json.dumps({"global_step": step}).encode(),
             "optimizer.pt": b"\1" * 32, "rng_state.pth": b"\2" * 16}
    manifest = {"step": step, "files": {name: len(data) for name, data in files.items()}, "time": time.time()}
    return {**files, runner_module().MANIFEST: json.dumps(manifest).encode()}


# ---------------------------------------------------------------------------------------------
# machines and the cloud
# ---------------------------------------------------------------------------------------------


class MemoryMachine(Machine):
    """A rented machine of the memory cloud. It has no shell: the lifecycle reaches it only
    through its provider and its workspace."""

    def __init__(self, machine_id: str, offer: Optional[Offer], label: Optional[str], state: str = "running") -> None:
        super().__init__()
        self.machine_id = machine_id
        self.name = f"{NAME}:{machine_id}"
        self.offer = offer
        self.label = label
        self.state = state
        self.disk: dict[str, RunnerFolder] = {}
        self.started_at = time.time()
        self.terminated_at: Optional[float] = None

    def ensure_connected(self) -> None:
        if self.state != "running":
            raise Unreachable(f"{self.name} does not answer (it is {self.state})")

    def close(self) -> None:
        pass

    def command(self, remote_command: str) -> list[str]:
        raise AssertionError(f"the lifecycle ran a shell command on {self.name} ({remote_command!r}); "
                             "it must go through the Workspace")

    def _no_shell(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"the lifecycle used {self.name}'s shell; it must go through the Workspace")

    run = put = get = start = follow = is_alive = signal_job = _no_shell  # type: ignore[assignment]


class MemoryCloud:
    """The account: offers, rented machines, the calls made, the faults to inject."""

    def __init__(self, offers: list[Offer], *, steps_per_poll: int = 5) -> None:
        self.offers = list(offers)
        self.steps_per_poll = steps_per_poll
        self.machines: dict[str, MemoryMachine] = {}
        self.calls: list[tuple[Any, ...]] = []
        self.failing_offers: set[int] = set()  # provision of these fails (no capacity)
        self.failing_terminations = 0  # the next terminate calls fail (the provider's API is down)
        self.prepare_error: Optional[str] = None  # prepare fails with this reason
        self.faults: list[Fault] = []
        self._next_machine = 100
        self._next_job = 7000

    # ---- what tests set ---------------------------------------------------------------------

    def provider_class(self) -> type["MemoryProvider"]:
        return type("MemoryProvider", (MemoryProvider,), {"cloud": self})

    def register(self, monkeypatch: Any) -> type["MemoryProvider"]:
        """PROVIDERS["memory"] (the one registry planning, renting and open_session read) for this test."""
        from launcher import providers

        cls = self.provider_class()
        monkeypatch.setitem(providers.PROVIDERS, NAME, cls)
        return cls

    def fail_provision(self, *offer_ids: int) -> None:
        self.failing_offers.update(offer_ids)

    def preempt_at(self, step: int) -> None:
        """The machine under the runner is preempted once the runner reaches `step` (once)."""
        self.faults.append(Fault("preempt", step))

    def stop_at(self, step: int) -> None:
        """The machine is stopped (its idle watchdog) at `step`: the runner is gone, its disk kept."""
        self.faults.append(Fault("stop", step))

    def die_at(self, step: int, exit_code: Optional[int] = None) -> None:
        """The runner dies at `step` (its machine lives on): `exit_code` written, or none."""
        self.faults.append(Fault("die", step, exit_code))

    def set_state(self, machine_id: str, state: str) -> None:
        """A machine as its provider will report it. Preempted, stopped: the runner on it gets
        SIGTERM (checkpoint, exit 143) as its processes are killed; gone: the disk goes with it."""
        assert state in SETTABLE_STATES, state
        machine = self.machines[machine_id]
        if state in ("preempted", "stopped", "gone"):
            for folder in machine.disk.values():
                folder.terminate_signal("TERM")
        if state == "gone":
            machine.disk.clear()
        machine.state = state

    def tick(self, steps: int) -> None:
        """Time passes while nobody looks: every live runner advances `steps` steps."""
        for machine in list(self.machines.values()):
            if machine.state == "running":
                for folder in list(machine.disk.values()):
                    folder.advance(steps, self, machine)

    # ---- what tests ask ---------------------------------------------------------------------

    def alive(self) -> list[str]:
        """Machines still billing: not terminated and not vanished (a stopped or preempted
        machine still bills its disk until it is destroyed)."""
        return [m.machine_id for m in self.machines.values() if m.terminated_at is None and m.state != "gone"]

    def called(self, name: str) -> list[tuple[Any, ...]]:
        return [c for c in self.calls if c[0] == name]

    def terminations(self, machine_id: str) -> int:
        return len([c for c in self.calls if c[0] == "terminate" and c[1] == machine_id])

    def folder(self, machine_id: str) -> RunnerFolder:
        """The one run folder on a machine."""
        (folder,) = self.machines[machine_id].disk.values()
        return folder

    # ---- what the provider and workspaces use -----------------------------------------------

    def take_fault(self, step: int) -> Optional[Fault]:
        for fault in self.faults:
            if fault.at_step == step:
                self.faults.remove(fault)
                return fault
        return None

    def new_machine(self, offer: Offer, label: str) -> MemoryMachine:
        self._next_machine += 1
        machine = MemoryMachine(str(self._next_machine), offer, label)
        self.machines[machine.machine_id] = machine
        return machine

    def new_job(self) -> int:
        self._next_job += 1
        return self._next_job


# ---------------------------------------------------------------------------------------------
# the provider
# ---------------------------------------------------------------------------------------------


class MemoryProvider(Provider, Restartable, Sweepable):
    """A renting provider over a MemoryCloud (`cloud.provider_class()` binds one)."""

    name = NAME
    title = "the memory cloud"
    rents_machines = True
    cloud: ClassVar[MemoryCloud]

    def __init__(self, cloud: Optional[MemoryCloud] = None, log: Callable[[str], None] = lambda text: None) -> None:
        self.cloud = cloud or type(self).cloud
        self.log = log

    @classmethod
    def from_context(cls, context: ProviderContext) -> "MemoryProvider":
        return cls(cls.cloud, context.log)

    def offers(self, need: Need, usd_per_hour: float = 0.0) -> list[Offer]:
        self.cloud.calls.append(("offers", need))

        def fits(o: Offer) -> bool:
            return ((need.gpu is None or (o.gpu or "").replace(" ", "").lower() == need.gpu.replace(" ", "").lower())
                    and (need.gpu is None or o.gpu_count == need.gpu_count)
                    and (need.max_usd_per_hour is None or o.usd_per_hour <= need.max_usd_per_hour)
                    and (need.interruptible is None or o.interruptible == need.interruptible)
                    and (need.min_vram_gb is None or (o.vram_gb or 0) * o.gpu_count >= need.min_vram_gb))

        return [o for o in self.cloud.offers if fits(o)]

    def provision(self, offer: Offer, spec: MachineSpec) -> Provisioned:
        self.cloud.calls.append(("provision", offer.offer_id, spec.run_id))
        if offer.provider != NAME or offer.offer_id not in {o.offer_id for o in self.cloud.offers}:
            raise ProviderError(f"offer {offer.offer_id}: not an offer of the memory cloud")
        if offer.offer_id in self.cloud.failing_offers:
            raise ProviderError(f"offer {offer.offer_id}: no capacity (the test said so); nothing was rented")
        machine = self.cloud.new_machine(offer, label_for(spec.run_id))
        return Provisioned(machine, machine.machine_id, offer.usd_per_hour, machine.started_at)

    def reconnect(self, machine_id: str, spec: MachineSpec) -> Machine:
        self.cloud.calls.append(("reconnect", machine_id))
        machine = self.cloud.machines.get(machine_id)
        return machine if machine is not None else MemoryMachine(machine_id, None, None, state="gone")

    def state(self, machine: Machine) -> MachineState:
        known = self.cloud.machines.get(getattr(machine, "machine_id", ""))
        state = "gone" if known is None or known.terminated_at is not None else known.state
        self.cloud.calls.append(("state", getattr(machine, "machine_id", None), state))
        return state  # type: ignore[return-value]

    def terminate(self, machine: Machine) -> None:
        machine_id = getattr(machine, "machine_id", None)
        self.cloud.calls.append(("terminate", machine_id))
        if self.cloud.failing_terminations:
            self.cloud.failing_terminations -= 1
            raise ProviderError(f"{machine.name} may still be billing: destroying it failed (HTTP 500)")
        known = self.cloud.machines.get(machine_id or "")
        if known is not None and known.terminated_at is None:
            known.terminated_at = time.time()
            known.disk.clear()
            known.state = "gone"

    def restart(self, machine: Machine, spec: MachineSpec) -> Machine:
        machine_id = getattr(machine, "machine_id", "")
        self.cloud.calls.append(("restart", machine_id))
        known = self.cloud.machines.get(machine_id)
        if known is None or known.state != "stopped" or known.terminated_at is not None:
            raise ProviderError(f"{machine.name} is not stopped; it cannot be started again")
        known.state = "running"
        return known

    def labelled_machines(self) -> list[LabelledMachine]:
        self.cloud.calls.append(("labelled_machines",))
        return [LabelledMachine(m.machine_id, m.name, m.label or "", m.state, m.offer.usd_per_hour if m.offer else 0.0)
                for m in self.cloud.machines.values() if m.terminated_at is None and m.state != "gone" and m.label]

    def destroy_machine(self, machine_id: str) -> None:
        self.terminate(self.reconnect(machine_id, MachineSpec("", Path("."), Path("."))))

    def default_workdir(self) -> str:
        return WORKDIR

    def open_workspace(self, machine: Machine, run_id: str, workdir: Optional[str] = None,
                       run_folder: Optional[str] = None, config: Any = None) -> "FakeWorkspace":
        assert isinstance(machine, MemoryMachine), machine
        return FakeWorkspace(self.cloud, machine, run_folder or f"{workdir or WORKDIR}/runs/{run_id}")


# ---------------------------------------------------------------------------------------------
# the workspace
# ---------------------------------------------------------------------------------------------


class FakeWorkspace(Workspace):
    """A run's folder on a MemoryMachine; every call fails (WorkspaceError) while the machine
    does not answer."""

    def __init__(self, cloud: MemoryCloud, machine: MemoryMachine, folder: str) -> None:
        self.cloud = cloud
        self.machine = machine
        self.folder = folder

    def _run(self, what: str, *detail: Any) -> RunnerFolder:
        self.cloud.calls.append((what, self.machine.machine_id, *detail))
        self.machine.ensure_connected()  # Unreachable is a WorkspaceError
        return self.machine.disk.setdefault(self.folder, RunnerFolder())

    def prepare(self, config: Any) -> str:
        self._run("prepare")
        if self.cloud.prepare_error:
            raise PrepareFailed(f"{self.machine.name}: {self.cloud.prepare_error}")
        return PYTHON

    def upload(self, config: Any) -> None:
        folder = self._run("upload")
        train = config.job.train
        folder.total_steps = train.max_steps or 40
        folder.save_every, folder.eval_every = train.save_every, train.eval_every
        folder.keep = getattr(train, "keep_checkpoints", 3)
        folder.uploaded = True

    def start(self, python: str, *, resume: bool, topology: Any = None, env: Any = None) -> int:
        folder = self._run("start", python, resume)
        folder.env = dict(env or {})
        job = self.cloud.new_job()
        folder.start(job, resume)
        return job

    def look(self, job: Optional[int]) -> Look:
        folder = self._run("look", job)
        alive = job is not None and folder.job == job and folder.alive
        return Look(exit_code=folder.exit_code, alive=alive, complete_steps=sorted(folder.checkpoints),
                    status=folder.status() if folder.phase != "created" else {})

    def stream(self, name: str, *, stop: Callable[[], bool], start_line: int = 0) -> Iterator[str]:
        self.cloud.calls.append(("stream", self.machine.machine_id, name))
        sent = start_line
        while not stop():
            try:
                self.machine.ensure_connected()
            except RemoteError:
                yield ""  # the connection dropped: keep yielding, the caller's probes tell a lost machine
                continue
            lines = self.read(name).splitlines()
            if sent < len(lines):
                sent += 1
                yield lines[sent - 1]
            else:
                self.cloud.tick(self.cloud.steps_per_poll)  # nothing new: time passes while we wait
                yield ""

    def read(self, name: str) -> str:
        self.machine.ensure_connected()
        return self.machine.disk.setdefault(self.folder, RunnerFolder()).files().get(name, "")

    def fetch_results(self, local_dir: Path) -> None:
        folder = self._run("fetch_results")
        local_dir.mkdir(parents=True, exist_ok=True)
        for name, text in folder.files().items():
            (local_dir / name).write_text(text)
        if folder.phase == "done":
            (local_dir / "adapter").mkdir(exist_ok=True)
            for name, data in checkpoint_files(folder.step).items():
                if name.startswith("adapter_"):
                    (local_dir / "adapter" / name).write_bytes(data)

    def fetch_checkpoint(self, step: int, into: Path) -> None:
        folder = self._run("fetch_checkpoint", step)
        if step not in folder.checkpoints:
            raise RemoteError(f"{self.machine.name}: checkpoint-{step} is not there (rotated away?)")
        into.mkdir(parents=True, exist_ok=True)
        for name, data in folder.checkpoints[step].items():
            (into / name).write_bytes(data)

    def push_checkpoint(self, checkpoint: Path, step: int, history: list[Path]) -> None:
        folder = self._run("push_checkpoint", step, tuple(p.name for p in history))
        if not runner_module().checkpoint_is_complete(checkpoint):
            raise AssertionError(f"the launcher pushed {checkpoint}, which is not a complete checkpoint")
        for path in history:
            if path.name == "metrics.jsonl":
                folder.metrics = path.read_text().splitlines()
            elif path.name == "base_eval.json":
                folder.base_eval = path.read_text()
            folder.history_pushed.append(path.name)
        folder.checkpoints[step] = {p.name: p.read_bytes() for p in checkpoint.iterdir() if p.is_file()}
        folder.pushed.append(step)

    def signal(self, job: int, signal_name: str) -> None:
        folder = self._run("signal", job, signal_name)
        if folder.job == job:
            folder.terminate_signal(signal_name)
