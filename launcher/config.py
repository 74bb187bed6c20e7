"""The whole job YAML, validated before anything starts.

The runner's sections (model, data, lora, train, eval, and storage, since the runner uploads the
checkpoints itself) are validated by the runner's own dataclass schema, imported from
runner/qlora_runner.py, so the launcher and the runner can never disagree about them. The
launcher's own section (resources) is a pydantic model here.
Every error names the key path and the file: `job.yaml: train.lr: must be > 0, got -1`.
Command-line flags override `resources` (the overrides are validated like the file)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from launcher.errors import EXIT_CONFIG
from launcher.paths import runner_module


class ConfigError(Exception):
    """A config problem; the message names the file, the key path and how to fix it."""

    exit_code = EXIT_CONFIG


class ResourcesBase(BaseModel):
    """Where and on what the job runs. Flags such as --target and --gpu override these. Each
    registered provider with settings adds its own section (resources.<provider>), see Resources."""

    model_config = ConfigDict(extra="forbid")

    target: Optional[str] = None  # local | ssh://user@host[:port] | an ~/.ssh/config alias
    gpu: Optional[str] = None  # e.g. A10G, or A10G:2; `any` (or unset): whichever GPU the plan picks
    gpus: Optional[int] = Field(None, ge=1)  # GPUs per machine; unset: as many as the job needs
    # Machines (SkyPilot nodes) training together, data parallel; more than 1 rents on the clouds
    # SkyPilot can make several nodes on (not RunPod, not Vast.ai).
    nodes: int = Field(1, ge=1)
    max_price: Optional[float] = Field(None, gt=0)  # USD per hour
    max_total_usd: Optional[float] = Field(None, gt=0)
    providers: Optional[list[str]] = None
    interruptible: Optional[bool] = None  # None: either market; true: spot only; false: on-demand only
    disk_gb: Optional[float] = Field(None, gt=0)  # free disk the target must have; default: estimated
    usd_per_hour: float = Field(0.0, ge=0)  # what your own box costs you; 0 for local and own boxes
    python: Optional[str] = None  # an interpreter on the target that already has the runner's packages
    workdir: Optional[str] = None  # the launcher's folder on the target; default ~/qlora-launch
    ssh_identity: Optional[str] = None  # private key for the ssh target; default: ssh's own choice
    recover: bool = True  # a preempted or vanished rented machine: resume on the next offer (--no-recover)


def _resources_model() -> type[ResourcesBase]:
    """Resources: the common keys plus one section per provider that has settings, from the
    provider registry (a new provider brings its own section; nothing is listed here by hand)."""
    from launcher.providers import settings_models

    sections: dict[str, Any] = {name: (model, Field(default_factory=model)) for name, model in settings_models().items()}
    return create_model("Resources", __base__=ResourcesBase, **sections)


Resources = _resources_model()


@dataclass(frozen=True)
class LaunchConfig:
    path: Path  # the YAML file, absolute
    raw: dict[str, Any]  # the file as read, with the overrides applied: what travels to the target
    job: Any  # the runner's JobConfig
    resources: Any  # Resources (built from the provider registry)

    @property
    def storage(self) -> Any:
        """The runner's StorageSection: the runner reads it too (it uploads the checkpoints)."""
        return self.job.storage

    @property
    def base_dir(self) -> Path:
        return self.path.parent


def load(path: Path, overrides: Optional[dict[str, Any]] = None) -> LaunchConfig:
    """Read, override and validate a job YAML. Raises ConfigError."""
    qr = runner_module()
    path = Path(path).expanduser().resolve()
    try:
        # The runner reads the same file on the target: its errors (file, YAML, the runner's
        # sections) are the ones the user would meet there, so they are the ones we show.
        job = qr.load_config(path)
    except qr.RunnerError as e:
        raise ConfigError(str(e)) from None
    import yaml

    raw = yaml.safe_load(path.read_text())
    resources_raw = raw.get("resources") or {}
    if not isinstance(resources_raw, dict):
        raise ConfigError(f"{path}: resources: expected a mapping, got {resources_raw!r}")
    resources_raw = _overridden(resources_raw, overrides or {})
    raw = {**raw, "resources": resources_raw}
    resources = _validate(Resources, resources_raw, "resources", path, overrides)
    return LaunchConfig(path=path, raw=raw, job=job, resources=resources)


def _overridden(resources: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """resources with the flags' values set; a dotted key (`sky.managed`) sets a provider section's key."""
    out = dict(resources)
    for key, value in overrides.items():
        if value is None:
            continue
        section, dot, name = key.partition(".")
        if dot:
            inner = out.get(section) or {}
            out[section] = {**(inner if isinstance(inner, dict) else {}), name: value}
        else:
            out[key] = value
    return out


def _validate(model: type[BaseModel], data: Any, section: str, path: Path, overrides: Optional[dict]) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: {section}: expected a mapping, got {data!r}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        key = ".".join(str(part) for part in (section, *first["loc"]))
        field_name = str(first["loc"][0]) if first["loc"] else ""
        message = _message(first, list(model.model_fields))
        flag_name = FLAGS.get(field_name, field_name.replace("_", "-"))
        flag = f" (from --{flag_name})" if overrides and overrides.get(field_name) is not None else ""
        raise ConfigError(f"{path}: {key}{flag}: {message}") from None


# The flags whose names are not their key's (the others are --<key with dashes>).
FLAGS = {"max_price": "max-price", "max_total_usd": "max-total", "interruptible": "spot/--on-demand",
         "ssh_identity": "identity", "gpus": "gpu NAME:N"}
_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def _message(error: dict[str, Any], valid_keys: list[str]) -> str:
    """A pydantic error in the words the runner uses for its own sections."""
    kind, ctx, given = error["type"], error.get("ctx") or {}, error.get("input")
    if kind == "extra_forbidden":
        close = difflib.get_close_matches(str(error["loc"][-1]), valid_keys, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"unknown key; {hint}valid keys here: {', '.join(valid_keys)}"
    if kind in _BOUNDS:
        bound = next(iter(ctx.values()))
        return f"must be {_BOUNDS[kind]} {bound}, got {given!r}"
    return f"{error['msg'][0].lower()}{error['msg'][1:]}, got {given!r}"
