"""The workspace of a SkyPilot managed job (sky_managed.py says what managed mode is): the run
folder staged here and handed to SkyPilot as the task's file mount; the job looked at through
SkyPilot's job queue and the checkpoint store; progress followed through the job's log (the
task's run prints metrics.jsonl there); results and checkpoints read from the store; a stop
is a cancel. No shell of ours reaches the job's cluster."""

from __future__ import annotations

import json
import shlex
import shutil
import tempfile
import threading
import time
from pathlib import Path
from queue import Empty, Queue
from typing import Any, Callable, Iterator, Mapping, Optional

import yaml

from launcher import storage, sync
from launcher.config import LaunchConfig
from launcher.distributed import Topology, runner_command, runner_environment
from launcher.paths import CLUSTER_TEMPLATES, RUNNER_FILE
from launcher.providers import sky_client
from launcher.providers.base import ProviderError
from launcher.providers.sky_managed import ENDED, ManagedJob, cancel, field_of, status_of, managed_record
from launcher.remote import RemoteError
from launcher.runs import state_dir
from launcher.workspace import BOOTSTRAP_FILES, REMOTE_CONFIG, Look, Workspace

TEMPLATE = CLUSTER_TEMPLATES / "sky_managed_task.yaml"
METRIC_PREFIX = "QLORA_METRIC "  # how the task's run prints metrics.jsonl lines into the job's log
START_POLL_S = 5.0  # how often the queue is asked while SkyPilot launches the job's first cluster
PYTHON_SLOT = "__QLORA_PYTHON__"  # the runner's python in the command line; the node's setup finds it


def task_config(run_id: str, run_folder: Path, runner_line: str, envs: Mapping[str, str]) -> dict[str, Any]:
    """The template as a dict: the run's envs, its staged folder as a file mount."""
    config = yaml.safe_load(TEMPLATE.read_text())
    config["envs"] = {**config.get("envs", {}), **envs, "QLORA_RUN_ID": run_id, "QLORA_RUNNER_COMMAND": runner_line}
    config["file_mounts"] = {f"{config['envs']['QLORA_WORKDIR']}/runs/{run_id}": str(run_folder)}
    return config


def runner_line(topology: Topology) -> str:
    """The runner's command line in its run folder, always `--resume auto` (every restart is one)."""
    settings = runner_environment(topology)
    line = runner_command(PYTHON_SLOT, ["--config", REMOTE_CONFIG, "--out", ".", "--resume", "auto"], topology)
    line = line.replace(PYTHON_SLOT, '"$QLORA_RUNNER_PYTHON"')
    return (f"export {' '.join(f'{k}={shlex.quote(v)}' for k, v in settings.items())}; " if settings else "") + line


# ---------------------------------------------------------------------------------------------
# the workspace
# ---------------------------------------------------------------------------------------------


class ManagedWorkspace(Workspace):
    """A run as a SkyPilot managed job: staged here, run by SkyPilot, read from the store."""

    def __init__(self, sky: Callable[[], Any], job: ManagedJob, run_id: str, resources: Callable[[], Any],
                 config: Optional[LaunchConfig], timeout_s: float, start_timeout_s: float) -> None:
        self._sky = sky
        self.job = job
        self.run_id = run_id
        self.resources = resources  # sky.Resources of the planned offer, region open (built at a start)
        self.config = config
        self.timeout_s = timeout_s  # until SkyPilot has queued the job
        self.start_timeout_s = start_timeout_s  # until the job first runs (SkyPilot's first launch never gives up)
        self.folder = f"{job.machine_id}/runs/{run_id}"  # what the run record keeps: the job and the run
        self.staged = state_dir() / "managed" / run_id
        self._last_status: dict[str, Any] = {}

    @property
    def sky(self) -> Any:
        return self._sky()

    def _store(self) -> storage.RunInStore:
        if self.config is None or not self.config.storage.enabled:
            raise RemoteError(f"{self.job.name}: a managed run is read from its checkpoint store, and this run's "
                              "job file names none (or no longer loads)")
        try:
            return storage.RunInStore(self.config.storage, self.run_id)
        except storage.StorageProblem as e:
            raise RemoteError(str(e)) from None

    def _guard(self, action: Callable[[], Any]) -> Any:
        try:
            return action()
        except storage.StorageProblem as e:
            raise RemoteError(str(e)) from None

    # ---- prepare, upload, start -------------------------------------------------------------

    def prepare(self, config: LaunchConfig) -> str:
        """Nothing to prepare here: the task's setup bootstraps every node SkyPilot rents."""
        return config.resources.python or "python3"

    def upload(self, config: LaunchConfig) -> None:
        """Stage the run folder here (runner, job.yaml, bootstrap files, the job's local assets):
        SkyPilot copies it to every node it rents for the job, recoveries included."""
        shutil.rmtree(self.staged, ignore_errors=True)
        (self.staged / "bin").mkdir(parents=True)
        placed = {}
        for asset in sync.local_assets(config):
            where = Path("assets") / asset.digest / asset.remote_name
            (self.staged / where).parent.mkdir(parents=True, exist_ok=True)
            copy = shutil.copytree if asset.local.is_dir() else shutil.copy2
            copy(asset.local, self.staged / where)
            placed[asset.key] = str(where)  # relative: the runner resolves it from its run folder
        (self.staged / REMOTE_CONFIG).write_text(sync.remote_config(config, placed))
        shutil.copy2(RUNNER_FILE, self.staged / RUNNER_FILE.name)
        for file in BOOTSTRAP_FILES:
            shutil.copy2(file, self.staged / "bin" / file.name)

    def start(self, python: str, *, resume: bool, topology: Topology = Topology(),
              env: Optional[Mapping[str, str]] = None) -> int:
        """Submit the managed job (the first start and a resume alike: the runner always resumes
        from the store); its SkyPilot job id."""
        config = self.config
        assert config is not None, "a managed job is started from its job file"
        if topology.nodes > 1:
            raise ProviderError("managed mode trains on one node (several GPUs of it are fine); for several nodes "
                                "leave resources.sky.managed (--managed) off")
        envs = {"QLORA_DEVICE": "cpu" if config.job.train.device == "cpu" else "cuda"}
        if config.resources.python:
            envs["QLORA_PYTHON"] = config.resources.python
        env = dict(env or {})
        run_id = env.pop("QLORA_RUN_ID", self.run_id)
        sky = self.sky
        task = sky.Task.from_yaml_config(task_config(run_id, self.staged, runner_line(topology), envs))
        task.update_secrets(env)  # the store's keys: the job's environment only
        task.set_resources(self.resources())
        request = sky_client.bounded("the managed-job launch", lambda: sky.jobs.launch(task, name=self.job.job_name),
                                     120)
        job_ids, _ = sky_client.bounded("the managed-job launch", lambda: sky.stream_and_get(request), self.timeout_s)
        ids = job_ids if isinstance(job_ids, list) else [job_ids]
        if not ids or ids[0] is None:
            raise ProviderError(f"SkyPilot did not queue the managed job {self.job.job_name}")
        self._wait_until_running(int(ids[0]))
        return int(ids[0])

    def _wait_until_running(self, job_id: int) -> None:
        """Until SkyPilot has a cluster running the job: its first launch retries forever when the
        cloud has no capacity, with the controller billing, so after start_timeout_s it is cancelled
        and the start fails (nothing left queued or billing)."""
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            status = status_of(self.record(job_id))
            if status not in ("PENDING", "STARTING", None):
                return
            if time.monotonic() > deadline:
                cancel(self.sky, [job_id])
                raise ProviderError(f"SkyPilot did not start the managed job within {self.start_timeout_s / 60:.0f} "
                                    f"min ({status}: no capacity for the offer?); cancelled. `launch resume "
                                    f"{self.run_id}` submits it again; resources.sky.managed_start_timeout_s sets "
                                    "the wait")
            time.sleep(START_POLL_S)

    # ---- looking ----------------------------------------------------------------------------

    def record(self, job_id: Optional[int]) -> Optional[Any]:
        """SkyPilot's queue record of the job (by id; else the newest of its name)."""
        return managed_record(self.sky, self.job.job_name, job_id)

    def look(self, job: Optional[int]) -> Look:
        record = self.record(job) if job else None
        status = status_of(record)
        store = self._store()
        steps = self._guard(store.complete_steps)
        seen = dict(self._last_status)
        stored_status = self._guard(lambda: _read_store_file(store, "status.json"))
        if stored_status:
            try:
                seen.update(json.loads(stored_status))
            except ValueError:
                pass
        seen["managed_status"] = status
        seen["recovery_count"] = field_of(record, "recovery_count") or 0
        if steps:
            seen["stored_step"], seen["store"] = steps[-1], store.url
        if status is None or status not in ENDED:
            recovered = seen["recovery_count"]
            seen["phase"] = (f"{(status or 'not queued').lower()} (SkyPilot managed job"
                             + (f", recovered {recovered}x" if recovered else "") + ")")
            return Look(exit_code=None, alive=record is not None, complete_steps=steps, status=seen)
        code = ENDED[status]
        written = seen.get("updated_at")
        if status == "FAILED" and isinstance(seen.get("exit_code"), int) and isinstance(written, (int, float)) \
                and written >= (field_of(record, "submitted_at") or 0):
            code = seen["exit_code"]  # the runner's own code (config error, OOM, ...), if this job's status says it
        if code != 0:
            reason = field_of(record, "failure_reason")
            seen["error"] = f"SkyPilot: managed job {status}" + (f": {reason}" if reason else "")
        return Look(exit_code=code, alive=False, complete_steps=steps, status=seen)

    def stream(self, name: str, *, stop: Callable[[], bool], start_line: int = 0) -> Iterator[str]:
        """The job's metric lines, from its log (`sky jobs logs`), each once by (event, step)."""
        lines: "Queue[str]" = Queue()
        job_id = self._job_id()
        seen: set[tuple[Any, Any]] = set()

        class Sink:
            buffer = ""

            def write(self, text: str) -> int:
                self.buffer += text
                *done, self.buffer = self.buffer.split("\n")
                for line in done:
                    if METRIC_PREFIX in line:
                        lines.put(line.split(METRIC_PREFIX, 1)[1])
                return len(text)

            def flush(self) -> None:
                pass

        closed = threading.Event()  # the caller stopped reading (the run ended, or it gave up on it)

        def follow() -> None:
            while not stop() and not closed.is_set():
                try:
                    self.sky.jobs.tail_logs(job_id=job_id, follow=True, output_stream=Sink())
                except Exception:  # noqa: BLE001  (the log is for progress; the looks decide the outcome)
                    pass
                time.sleep(2.0)

        threading.Thread(target=follow, name="managed-job log", daemon=True).start()
        try:
            while not stop():
                try:
                    line = lines.get(timeout=1.0)
                except Empty:
                    yield ""
                    continue
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                key = (event.get("event"), event.get("step"))
                if key in seen:
                    continue  # a restart prints the history it resumed with again
                seen.add(key)
                if isinstance(event.get("step"), int):
                    self._last_status["step"] = event["step"]
                yield line
        finally:
            closed.set()

    def _job_id(self) -> Optional[int]:
        record = self.record(None)
        return field_of(record, "job_id")

    def read(self, name: str) -> str:
        if name == "runner.log":  # the job's log: setup and run, every restart
            sink = _TextSink()
            try:
                self.sky.jobs.tail_logs(job_id=self._job_id(), follow=False, output_stream=sink)
            except Exception as e:  # noqa: BLE001
                raise RemoteError(f"{self.job.name}: its log cannot be read ({sky_client.first_line(e)})") from None
            return sink.text
        store = self._store()
        return self._guard(lambda: _read_store_file(store, name)) or ""

    # ---- files ------------------------------------------------------------------------------

    def fetch_results(self, local_dir: Path) -> None:
        store = self._store()
        self._guard(lambda: store.pull_results(local_dir))
        log_text = ""
        try:
            log_text = self.read("runner.log")
        except RemoteError:
            pass
        if log_text:
            (local_dir / "runner.log").write_text(log_text)

    def fetch_checkpoint(self, step: int, into: Path) -> None:
        store = self._store()
        # `into` is checkpoints/.incoming/checkpoint-<step> here: download beside it, then move in.
        with tempfile.TemporaryDirectory(dir=into.parent.parent) as scratch:
            got = self._guard(lambda: store.pull_checkpoint(step, Path(scratch)))
            if into.exists():
                shutil.rmtree(into)
            into.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(got), into)

    def push_checkpoint(self, checkpoint: Path, step: int, history: list[Path]) -> None:
        """A checkpoint only here goes to the store, where every restart of the job looks."""
        store = self._store()
        self._guard(lambda: store.push_checkpoint(checkpoint, step, history))

    def signal(self, job: int, signal_name: str) -> None:
        """Cancel the managed job (SkyPilot stops its run, which checkpoints and uploads on SIGTERM,
        then tears its cluster down); KILL as TERM: SkyPilot has one way to stop a job."""
        cancel(self.sky, [job])


class _TextSink:
    def __init__(self) -> None:
        self.text = ""

    def write(self, text: str) -> int:
        self.text += text
        return len(text)

    def flush(self) -> None:
        pass


def _read_store_file(store: storage.RunInStore, name: str) -> Optional[str]:
    return store.read_text(name)
