"""What a finished run hands to `launch merge`, `push` and `chat`: its adapter folder here, its
base model (a hub id, or a local folder made absolute) and revision, and the packages these
commands need on this machine.

The base comes from the run's own job file (runs/<run-id>/job.local.yaml, local paths absolute),
never from the user's YAML as it is now: the adapter belongs to the model it was trained on."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from launcher.config import load as load_config
from launcher.errors import EXIT_ENVIRONMENT, EXIT_USAGE
from launcher.job import LOCAL_CONFIG, JobError
from launcher.paths import runner_module
from launcher.runs import RunRecord

ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"
ADAPTER_CONFIG = "adapter_config.json"
DEPLOY_PACKAGES = ("torch", "transformers", "peft", "safetensors")
HUB_PACKAGES = ("huggingface_hub",)


@dataclass(frozen=True)
class RunModel:
    """The model a run trained: base + adapter, and the data format it learned."""

    run_id: str
    run_dir: Path
    base: str  # a hub id, or an absolute local folder
    base_is_local: bool
    revision: Optional[str]
    trust_remote_code: bool
    adapter: Path
    job: Any  # the runner's JobConfig, as launched

    @property
    def merged(self) -> Path:
        return self.run_dir / MERGED_DIR


def require_packages(names: tuple[str, ...] = DEPLOY_PACKAGES) -> None:
    """The deploy commands' libraries, or one line saying how to get them (never an ImportError)."""
    missing = [name for name in names if importlib.util.find_spec(name) is None]
    if missing:
        raise JobError(f"{', '.join(missing)} not installed here; pip install 'qlora-launch[deploy]' "
                       "(the laptop's base install has no torch)", EXIT_ENVIRONMENT)


def run_model(record: RunRecord, need_adapter: bool = True) -> RunModel:
    """The run's base and adapter, from its folder here (its machine is not needed, nor touched);
    without an adapter, an error naming the folder and the command that brings it (a run still
    training, failed, or done but not pulled)."""
    run_dir = Path(record.run_dir)
    try:
        config = load_config(run_dir / LOCAL_CONFIG)
    except Exception as e:  # noqa: BLE001  (a missing or moved file: say which, whatever the kind)
        raise JobError(f"run {record.id}: its job file {run_dir / LOCAL_CONFIG} does not load ({e}); "
                       "put the run folder back where it was launched from", EXIT_USAGE) from None
    model = config.job.model
    base, is_local = runner_module().resolve_local(model.base, config.base_dir)
    adapter = run_dir / ADAPTER_DIR
    if need_adapter and not (adapter / ADAPTER_CONFIG).is_file():
        raise JobError(f"run {record.id} has no adapter in {adapter} ({_why_no_adapter(record.status, record.id)})",
                       EXIT_USAGE)
    return RunModel(run_id=record.id, run_dir=run_dir, base=base, base_is_local=is_local,
                    revision=model.revision, trust_remote_code=model.trust_remote_code, adapter=adapter,
                    job=config.job)


def _why_no_adapter(status: str, run_id: str) -> str:
    if status in ("created", "starting", "running"):
        return f"it is {status}: the adapter is written when training ends; `launch attach {run_id}` follows it"
    if status in ("preempted", "interrupted", "stopped"):
        return f"it is {status}; `launch resume {run_id}` finishes it"
    if status == "failed":
        return f"it failed before writing one; `launch logs {run_id}` says why"
    return f"not pulled yet; `launch pull {run_id}` fetches it"
