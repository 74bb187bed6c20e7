"""The workspace of a Kaggle run (kaggle.py says what the provider is): a private dataset per run
for upload, a pushed script kernel for start, the kernel's status and log for look and stream,
the kernel's output for fetch. No shell of ours reaches the kernel.

- upload: the run's files staged here (runner, job.yaml, requirements.txt, the marker with the
  plan, each local asset as one top-level file: the client uploads only a folder's top level,
  so a folder asset travels as a tar the kernel script unpacks); the dataset is created, or
  versioned only when the content hash changed, then waited for until Kaggle reads it ready.
- start: kernel-metadata.json + the script, pushed private with the GPU on, the machine shape
  explicit, internet on (pip), the dataset attached and the session timeout set; a push problem
  (`error`, invalid sources) is one line and nothing runs. The week's GPU quota left goes into
  the script (it stops the runner before either the session limit or the quota ends); too little
  left for a session is OutOfQuota, before anything is pushed. A resume first republishes the
  previous version's newest checkpoint as the dataset's seed. The config's store is not used in
  the kernel (Kaggle's API gives a kernel no secrets, and keys never go into a dataset).
- push_checkpoint: the checkpoint (a tar) and the run's history as the dataset's seed, in a new
  dataset version; the kernel script puts it into the session's out/ before the runner resumes.
- look: the kernel's status; once it ended, its output (kernel_status.json, out/status.json)
  downloaded into a cache folder here and read from there; a planned stop says which end came
  (Look.session_end: the session limit, or the quota).
- stream: the log stream's `QLORA_METRIC` lines (the script echoes metrics.jsonl).
- fetch: from the downloaded output into runs/<id>/."""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

from launcher import sync
from launcher.config import LaunchConfig
from launcher.distributed import Topology
from launcher.paths import RUNNER_FILE, RUNNER_REQUIREMENTS, runner_module
from launcher.providers import kaggle_client
from launcher.providers.base import OutOfQuota, ProviderError
from launcher.providers.kaggle import KaggleKernel, KaggleSettings, kernel_plan, kernel_script, marker_name
from launcher.remote import RemoteError
from launcher.runs import state_dir
from launcher.workspace import REMOTE_CONFIG, Look, Workspace

METRIC_PREFIX = "QLORA_METRIC "
LICENSE = "CC0-1.0"
PUSH_HINTS = {"phone": "verify your phone number at https://www.kaggle.com/settings (GPUs and internet need it)",
              "session": "Kaggle allows few GPU sessions at once: wait for the running one to end"}
SEED_FILE = "seed.json"  # in the staged seed folder: the plan's "seed" entry


class KaggleWorkspace(Workspace):
    stoppable = False  # Kaggle's API has no call that stops a running kernel
    def __init__(self, api: Callable[[], Any], kernel: KaggleKernel, run_id: str, settings: KaggleSettings,
                 config: Optional[LaunchConfig]) -> None:
        self._api = api
        self.kernel = kernel
        self.run_id = run_id
        self.settings = settings
        self.config = config
        self.folder = f"{kernel.machine_id}/runs/{run_id}"
        self.staged = state_dir() / "kaggle" / run_id
        self.output = self.staged / "output"  # the kernel's output, downloaded once it ended
        self.seed = self.staged / "seed"  # the checkpoint the next version starts from (push_checkpoint)

    @property
    def api(self) -> Any:
        return self._api()

    @property
    def dataset_ref(self) -> str:
        return self.kernel.ref  # the run's dataset and kernel share owner and slug

    # ---- prepare, upload, start -------------------------------------------------------------

    def prepare(self, config: LaunchConfig) -> str:
        """Nothing here: the kernel script installs the runner's requirements in the session."""
        return "python3"

    def upload(self, config: LaunchConfig) -> None:
        self.config = config
        folder = self.staged / "dataset"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        placed, unpack = {}, {}
        for asset in sync.local_assets(config):
            name = f"{asset.digest[:12]}-{asset.remote_name}"
            if asset.local.is_dir():
                with tarfile.open(folder / f"{name}.tar", "w") as tar:
                    tar.add(asset.local, arcname=name)
                unpack[f"{name}.tar"] = name
            else:
                shutil.copy2(asset.local, folder / name)
            placed[asset.key] = name  # relative to job.yaml: the runner resolves it from there
        # No store inside a kernel: Kaggle's API gives a kernel no secrets, and keys never go into a
        # dataset. A new version continues from the previous one's output instead (its seed).
        (folder / REMOTE_CONFIG).write_text(sync.remote_config(config, placed, without=("storage",)))
        shutil.copy2(RUNNER_FILE, folder / RUNNER_FILE.name)
        shutil.copy2(RUNNER_REQUIREMENTS, folder / "requirements.txt")
        plan = {**kernel_plan(self.run_id, self.settings), "unpack": unpack}
        if (self.seed / SEED_FILE).is_file():
            plan["seed"] = json.loads((self.seed / SEED_FILE).read_text())
            for path in self.seed.iterdir():
                if path.name != SEED_FILE:
                    shutil.copy2(path, folder / path.name)
        (folder / marker_name(self.run_id)).write_text(json.dumps(plan, indent=1))
        self._publish(folder)

    def _publish(self, folder: Path) -> None:
        """The staged folder as the run's dataset: created, or a new version when its content changed."""
        digest = content_hash(folder)
        (folder / "dataset-metadata.json").write_text(json.dumps(
            {"id": self.dataset_ref, "title": f"qlora-launch run {self.run_id}"[:50], "licenses": [{"name": LICENSE}]}))
        hash_file = self.staged / "dataset.sha256"
        exists = self._dataset_exists()
        if exists and hash_file.is_file() and hash_file.read_text() == digest:
            return self._wait_ready()
        api = self.api
        if not exists:
            reply = kaggle_client.guarded("creating the run's dataset", lambda: api.dataset_create_new(
                str(folder), public=False, quiet=True, dir_mode="tar"))
        else:
            reply = kaggle_client.guarded("versioning the run's dataset", lambda: api.dataset_create_version(
                str(folder), f"content {digest[:12]}", quiet=True, dir_mode="tar"))
        if getattr(reply, "error", "") or getattr(reply, "status", "") == "error":
            raise ProviderError(f"Kaggle refused the run's dataset {self.dataset_ref}: {reply.error}")
        hash_file.write_text(digest)
        self._wait_ready()

    def _dataset_exists(self) -> bool:
        try:
            kaggle_client.guarded("the run's dataset", lambda: self.api.dataset_status(self.dataset_ref))
            return True
        except kaggle_client.KaggleCredentialsError:
            raise
        except ProviderError:
            return False

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.settings.dataset_ready_timeout_s
        while True:
            status = kaggle_client.guarded("the run's dataset", lambda: self.api.dataset_status(self.dataset_ref))
            if str(status).lower() == "ready":
                return
            if time.monotonic() > deadline:
                raise ProviderError(f"Kaggle's dataset {self.dataset_ref} is not ready after "
                                    f"{self.settings.dataset_ready_timeout_s:.0f} s ({status})")
            time.sleep(min(self.settings.poll_s, 2.0))

    def start(self, python: str, *, resume: bool, topology: Topology = Topology(),
              env: Optional[Mapping[str, str]] = None) -> int:
        """Push the kernel (a new version of it on a resume: it continues from its output's checkpoint)."""
        if topology.nodes > 1:
            raise ProviderError("a Kaggle kernel is one machine: set resources.nodes to 1")
        quota_left_s = self._quota_for_a_session()
        if resume:
            self._seed_from_previous_output()
        folder = self.staged / "kernel"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        (folder / "run.py").write_text(kernel_script(self.run_id, {"quota_left_s": round(quota_left_s)}))
        (folder / "kernel-metadata.json").write_text(json.dumps({
            "id": self.kernel.ref, "title": f"qlora-launch {self.run_id}"[:50], "code_file": "run.py",
            "language": "python", "kernel_type": "script", "is_private": True, "enable_gpu": True,
            "enable_tpu": False, "enable_internet": self.settings.internet, "dataset_sources": [self.dataset_ref],
            "competition_sources": [], "kernel_sources": [], "model_sources": [],
            "machine_shape": self.settings.accelerator}))
        timeout = str(round(self.settings.session_limit_h * 3600))
        pushed = kaggle_client.guarded("pushing the kernel", lambda: self.api.kernels_push(
            str(folder), timeout=timeout, acc=self.settings.accelerator))
        problem = getattr(pushed, "error", "") or ""
        invalid = list(getattr(pushed, "invalid_dataset_sources", None) or [])
        if problem:
            hint = next((h for key, h in PUSH_HINTS.items() if key in problem.lower()), "")
            raise ProviderError(f"Kaggle refused the kernel push: {problem}" + (f"; {hint}" if hint else ""))
        if invalid:
            raise ProviderError(f"Kaggle does not see the run's dataset {', '.join(invalid)} (not ready, or private "
                                "to another account)")
        shutil.rmtree(self.output, ignore_errors=True)
        return int(getattr(pushed, "version_number", None) or 1)

    def _quota_for_a_session(self) -> float:
        """The week's GPU seconds left; OutOfQuota when they do not hold a session worth starting."""
        quota = kaggle_client.quota(self.api)
        left_s = quota.left_h * 3600
        if left_s < (self.settings.stop_before_limit_minutes + self.settings.min_session_minutes) * 60:
            raise OutOfQuota(f"Kaggle's weekly GPU quota is spent ({quota.used_h + quota.reserved_h:.1f} h of "
                             f"{quota.total_h:.1f} h used): {self.quota_line(quota)}")
        return left_s

    def quota_line(self, quota: Optional[kaggle_client.Quota] = None) -> str:
        quota = quota or kaggle_client.quota(self.api)
        return (f"it refreshes {quota.refresh_text()}, then `launch resume {self.run_id}`; to go on now on a paid "
                f"GPU: `launch resume {self.run_id} --providers vast`")

    def _seed_from_previous_output(self) -> None:
        """The next version starts from what the last one left: its newest checkpoint,
        republished (the new session's working folder starts empty)."""
        try:
            ended = self._status()[0] in ENDED
        except ProviderError:
            return  # never pushed
        if not ended:
            return
        out = self._download() / "out"
        steps = complete_steps(out / "checkpoints")
        seeded = json.loads((self.seed / SEED_FILE).read_text())["step"] if (self.seed / SEED_FILE).is_file() else -1
        if steps and steps[-1] > seeded:
            history = [out / name for name in ("metrics.jsonl", "base_eval.json") if (out / name).is_file()]
            self.push_checkpoint(out / "checkpoints" / f"checkpoint-{steps[-1]}", steps[-1], history)

    # ---- looking ----------------------------------------------------------------------------

    def _status(self) -> tuple[str, str]:
        reply = kaggle_client.guarded("the kernel's status", lambda: self.api.kernels_status(self.kernel.ref))
        name = getattr(getattr(reply, "status", None), "name", None) or str(getattr(reply, "status", ""))
        return name, getattr(reply, "failure_message", "") or ""

    def _download(self) -> Path:
        """The ended kernel's output, downloaded once (the caller knows it ended)."""
        if not (self.output / ".complete").is_file():
            shutil.rmtree(self.output, ignore_errors=True)
            self.output.mkdir(parents=True)
            kaggle_client.guarded("downloading the kernel's output", lambda: self.api.kernels_output(
                self.kernel.ref, str(self.output), quiet=True))
            (self.output / ".complete").touch()
        return self.output

    def look(self, job: Optional[int]) -> Look:
        name, failure = self._status()
        if name in ("QUEUED", "RUNNING", "NEW_SCRIPT", "CANCEL_REQUESTED"):
            return Look(exit_code=None, alive=True, complete_steps=[], status={"phase": f"{name.lower()} (Kaggle)"})
        if name not in ENDED:
            return Look(exit_code=None, alive=False, complete_steps=[], status={"phase": f"{name or 'unknown'} (Kaggle)"})
        output = self._download()
        status = _json(output / "out" / "status.json")
        kernel = _json(output / "kernel_status.json")
        code = kernel.get("exit_code")
        session_end = kernel.get("stopped") if kernel.get("stopped") in ("session_limit", "quota") else None
        if session_end:
            code = 143  # a planned stop with a checkpoint: a new version (or `launch resume`) continues
        if session_end == "quota":
            status["error"] = (f"Kaggle's weekly GPU quota ran out at step {status.get('step')} (checkpoint saved); "
                               + self.quota_line())
        if not isinstance(code, int) and name == "CANCEL_ACKNOWLEDGED":
            code = 130  # stopped on kaggle.com: interrupted, resumable
            status["error"] = f"the kernel was stopped on Kaggle; `launch resume {self.run_id}` continues it"
        if not isinstance(code, int):
            code = 0 if name == "COMPLETE" else 1
        if code and kernel.get("error"):
            status["error"] = kernel["error"]
        elif code and failure:
            status["error"] = f"Kaggle: {failure}"
        return Look(exit_code=code, alive=False, complete_steps=complete_steps(output / "out" / "checkpoints"),
                    status=status, session_end=session_end)

    def stream(self, name: str, *, stop: Callable[[], bool], start_line: int = 0) -> Iterator[str]:
        """The kernel's live log: its `QLORA_METRIC` lines for metrics.jsonl, the other lines for
        any other name (runner.log: the script's and the runner's output)."""
        metrics = name == "metrics.jsonl"
        seen = 0
        while not stop():
            try:
                for event in self.api.kernels_logs_stream(self.kernel.ref):
                    for line in str(event.get("data", "")).splitlines():
                        if line.startswith(METRIC_PREFIX) != metrics:
                            continue
                        seen += 1
                        if seen > start_line:
                            yield line.removeprefix(METRIC_PREFIX)
                    if stop():
                        return
            except Exception:  # noqa: BLE001  (the log is for progress; look() decides the outcome)
                pass
            yield ""
            time.sleep(1.0)
            seen = 0  # a new stream replays the log from its start

    def read(self, name: str) -> str:
        path = self.output / "out" / name
        if path.is_file():
            return path.read_text()
        if name == "runner.log":
            return (f"{self.kernel.name}: Kaggle gives a running kernel's log only as a stream: "
                    "`launch logs RUN -f` follows it\n")
        return ""

    # ---- files ------------------------------------------------------------------------------

    def _ended_output(self) -> Optional[Path]:
        """out/ of the kernel's output once it ended; None while it runs (nothing final yet)."""
        if (self.output / ".complete").is_file():
            return self.output / "out"
        return self._download() / "out" if self._status()[0] in ENDED else None

    def fetch_results(self, local_dir: Path) -> None:
        out = self._ended_output()
        if out is None:
            return
        for path in out.iterdir() if out.is_dir() else []:
            if path.name == "checkpoints":
                continue
            target = local_dir / path.name
            if path.is_dir():
                shutil.copytree(path, target, dirs_exist_ok=True)
            else:
                shutil.copy2(path, target)

    def fetch_checkpoint(self, step: int, into: Path) -> None:
        out = self._ended_output()
        source = out / "checkpoints" / f"checkpoint-{step}" if out is not None else None
        if source is None or not source.is_dir():
            raise RemoteError(f"{self.kernel.name}: checkpoint-{step} is not in the kernel's output")
        shutil.copytree(source, into, dirs_exist_ok=True)

    def push_checkpoint(self, checkpoint: Path, step: int, history: list[Path]) -> None:
        """The checkpoint and the run's history as the dataset's seed (a new dataset version)."""
        if self.config is None:
            raise RemoteError(f"{self.kernel.name}: the run's dataset is not staged here; `launch resume` stages it")
        staging = self.staged / "seed.new"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        tar_name = f"seed-checkpoint-{step}.tar"
        with tarfile.open(staging / tar_name, "w") as tar:
            tar.add(checkpoint, arcname=f"checkpoint-{step}")
        seeded = {}
        for path in history:
            seeded[path.name] = f"seed-{path.name}"
            shutil.copy2(path, staging / seeded[path.name])
        (staging / SEED_FILE).write_text(json.dumps({"step": step, "checkpoint": tar_name, "history": seeded}))
        shutil.rmtree(self.seed, ignore_errors=True)
        staging.rename(self.seed)
        self.upload(self.config)

    def signal(self, job: int, signal_name: str) -> None:
        """Kaggle's API cannot stop a kernel: it stops itself before its session limit."""


ENDED = ("COMPLETE", "ERROR", "CANCEL_ACKNOWLEDGED")  # KernelWorkerStatus names of a kernel that ended


def complete_steps(checkpoints: Path) -> list[int]:
    manifest = runner_module().MANIFEST  # written last: the checkpoint is complete
    return sorted(int(p.name.rsplit("-", 1)[1]) for p in checkpoints.glob("checkpoint-*") if (p / manifest).is_file())


def content_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
            with path.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}

