"""Every check that can fail before a machine is touched or a cent is spent.

Order: the tools we drive (ssh, rsync) -> the data (exists, parses with the runner's own readers,
every example has its fields; examples counted, long ones warned about) -> the base model (a
local folder has config.json and weights; a hub id answers, when online) -> the checkpoint store
(keys here, the bucket writable and deletable with them) -> the target (reachable with BatchMode
key auth, enough free disk). Each failure is one line saying how to fix it; all of
them are reported at once, so a user fixes everything in one round."""

from __future__ import annotations

import json
import math
import os
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from launcher import estimate
from launcher.config import LaunchConfig, runner_module
from launcher.errors import EXIT_CONFIG, EXIT_DATA, EXIT_ENVIRONMENT, EXIT_MODEL, EXIT_TARGET
from launcher.remote import Machine, RemoteError, Unreachable, shell_path


CHARS_PER_TOKEN = 4.0  # the usual English average; used only when no local tokenizer is at hand
VENV_GB = 8.0  # torch with CUDA + transformers & co. in a fresh venv
HUB_MODEL_GB_GUESS = 20.0  # a 7-8B model's safetensors, when we cannot ask the hub
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


@dataclass(frozen=True)
class Finding:
    level: Literal["error", "warning", "ok"]
    check: str  # tools | data | model | target | disk
    message: str
    exit_code: int = 0


@dataclass
class PreflightReport:
    findings: list[Finding] = field(default_factory=list)
    examples: Optional[int] = None  # in data.path (before the split)
    example_tokens: Optional[list[int]] = None  # each data.path example's length in tokens
    planned_steps: Optional[int] = None
    gpus: list[str] = field(default_factory=list)  # what the target's nvidia-smi lists
    free_disk_gb: Optional[float] = None
    needed_disk_gb: Optional[float] = None

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    @property
    def exit_code(self) -> int:
        return self.errors[0].exit_code if self.errors else 0

    def add(self, level: str, check: str, message: str, exit_code: int = 0) -> None:
        self.findings.append(Finding(level, check, message, exit_code))  # type: ignore[arg-type]


def check_tools(report: PreflightReport, needs_ssh: bool) -> None:
    for tool, package in (("rsync", "rsync"), ("ssh", "openssh-client")):
        if tool == "ssh" and not needs_ssh:
            continue
        if shutil.which(tool) is None:
            report.add("error", "tools", f"`{tool}` is not installed here; install it "
                                         f"(apt install {package} / brew install {tool})", EXIT_ENVIRONMENT)


def check_data(report: PreflightReport, config: LaunchConfig) -> None:
    """Read the data as the runner will, on this machine, so a typo costs nothing."""
    qr = runner_module()
    data = config.job.data
    tokenizer = _local_tokenizer(config)
    for key in ("path", "validation_path", "test_path"):
        value = getattr(data, key)
        path, is_local = qr.resolve_local(value, config.base_dir)
        if value is None:
            continue
        if not is_local:
            report.add("warning", "data", f"data.{key}: {value} is a hub dataset; it is read on the target")
            continue
        try:
            records = qr.read_records(path, True, data, f"data.{key}")
            examples = qr.format_records(records, data, None, f"data.{key}")
        except ImportError as e:  # parquet without pyarrow on the laptop
            report.add("warning", "data", f"data.{key}: not parsed here ({e.name} is not installed); the target reads it")
            continue
        except qr.RunnerError as e:
            report.add("error", "data", str(e), EXIT_DATA)
            continue
        lengths = _token_counts(examples, tokenizer)
        if key == "path":
            report.examples = len(records)
            report.example_tokens = lengths
        too_long = [n for n in lengths if n > data.max_length]
        if too_long:
            approx = "" if tokenizer else "about "
            report.add("warning", "data",
                       f"data.{key}: {len(too_long)} of {len(examples)} examples are longer than data.max_length="
                       f"{data.max_length} tokens (longest {approx}{max(too_long)}); they will be cut: raise "
                       "data.max_length to keep them whole")
    if report.examples is not None:
        try:
            report.planned_steps = planned_steps(config, report.examples)
        except qr.RunnerError as e:
            report.add("error", "data", str(e), EXIT_DATA)


def _token_counts(examples: list[Any], tokenizer: Any) -> list[int]:
    """Tokens per example (+1 for the end-of-sequence token): exact with the model's own
    tokenizer, else estimated from the characters."""
    texts = ["".join(segment.text for segment in example.segments) for example in examples]
    if tokenizer is not None:
        return [len(encoding.ids) + 1 for encoding in tokenizer.encode_batch(texts)]
    return [math.ceil(len(text) / CHARS_PER_TOKEN) + 1 for text in texts]


def _local_tokenizer(config: LaunchConfig) -> Any:
    """The model's own tokenizer when it is a local folder and `tokenizers` is installed."""
    qr = runner_module()
    path, is_local = qr.resolve_local(config.job.model.base, config.base_dir)
    tokenizer_file = Path(path) / "tokenizer.json" if is_local else None
    if tokenizer_file is None or not tokenizer_file.is_file():
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None
    try:
        return Tokenizer.from_file(str(tokenizer_file))
    except Exception:  # noqa: BLE001  (an unreadable tokenizer only costs us the exact count)
        return None


def planned_steps(config: LaunchConfig, examples: int) -> int:
    """Optimizer steps the runner will take (its own split and batch arithmetic)."""
    train = config.job.train
    if train.max_steps:
        return train.max_steps
    data = config.job.data
    train_part, _, _ = runner_module().split_records(list(range(examples)), data.splits, data.split_seed,
                                                     bool(data.validation_path), bool(data.test_path))
    train_examples = max(1, len(train_part))
    per_epoch = math.ceil(math.ceil(train_examples / train.micro_batch_size) / train.grad_accum)
    return max(1, math.ceil(per_epoch * train.epochs))


def check_identity(report: PreflightReport, config: LaunchConfig) -> None:
    """resources.ssh_identity names a key file here (ssh would only warn, then try others)."""
    identity = config.resources.ssh_identity
    if identity and not Path(identity).expanduser().is_file():
        report.add("error", "config", f"resources.ssh_identity (--identity): {identity} is not a file here; pass "
                                      "the path of the private key the target accepts (e.g. ~/.ssh/id_ed25519)",
                   EXIT_CONFIG)


def check_model(report: PreflightReport, config: LaunchConfig, runs_here: bool = False) -> None:
    """model.base: a local folder with a model in it, or a hub id the hub knows. `runs_here`: the
    runner runs on this machine, so a hub this machine cannot reach fails it too (after a minute of
    the hub client's retries): an error, not a warning."""
    qr = runner_module()
    base = config.job.model.base
    path, is_local = qr.resolve_local(base, config.base_dir)
    if is_local:
        folder = Path(path)
        if not folder.is_dir():
            report.add("error", "model", f"model.base: {folder} is not a folder; point it at a model folder "
                                         "(config.json + weights) or a hub id such as mistralai/Mistral-7B-v0.3",
                       EXIT_MODEL)
        elif not (folder / "config.json").is_file():
            report.add("error", "model", f"model.base: {folder} has no config.json; is it a Hugging Face model folder?",
                       EXIT_MODEL)
        elif not any(p.suffix in WEIGHT_SUFFIXES for p in folder.iterdir()):
            report.add("error", "model", f"model.base: {folder} has no weights (*.safetensors or *.bin); "
                                         "download them into the folder", EXIT_MODEL)
        return
    # `org/name` reads as a hub id, and as a folder relative to the config: say both when neither is found.
    not_a_folder = f"no folder {config.base_dir / base} either"
    if os.environ.get("HF_HUB_OFFLINE") == "1" and runs_here:
        report.add("error", "model", f"model.base: {base}: there is no folder {config.base_dir / base}, and "
                                     "HF_HUB_OFFLINE=1 keeps the hub (a hub id's source) from this machine, where "
                                     "the job runs; fix the folder's path (relative to the config file), or unset "
                                     "HF_HUB_OFFLINE", EXIT_MODEL)
        return
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("QLORA_LAUNCH_OFFLINE") == "1":
        report.add("warning", "model", f"model.base: {base} not checked on the hub (offline mode; {not_a_folder})")
        return
    url = f"https://huggingface.co/api/models/{base}"
    if config.job.model.revision:
        url += f"/revision/{config.job.model.revision}"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=5):
            pass
    except urllib.error.HTTPError as e:
        if e.code == 404:
            report.add("error", "model", f"model.base: {base} is not on the Hugging Face hub (404), and there is "
                                         f"{not_a_folder}; check the id and model.revision, or the folder's path "
                                         "(relative to the config file)", EXIT_MODEL)
        elif e.code in (401, 403):
            report.add("warning", "model", f"model.base: {base} is gated or private; accept its licence on "
                                           "huggingface.co and make HF_TOKEN available on the target")
        else:
            report.add("warning", "model", f"model.base: the hub answered HTTP {e.code}; not checked")
    except (urllib.error.URLError, TimeoutError, OSError):
        if runs_here:
            report.add("error", "model", f"model.base: {base}: there is no folder {config.base_dir / base}, and "
                                         "huggingface.co (a hub id's source) cannot be reached from this machine, "
                                         "where the job runs; fix the folder's path (relative to the config file), "
                                         "or connect", EXIT_MODEL)
        else:
            report.add("warning", "model", f"model.base: could not reach huggingface.co to check {base}; not "
                                           f"checked ({not_a_folder})")


def check_packing(report: PreflightReport, config: LaunchConfig) -> None:
    """data.packing: true on a model whose attention is not known to keep packed examples apart
    would fail on the machine (the runner refuses it): said here, before anything is rented."""
    job = config.job
    if job.data.packing is not True:
        return
    path, is_local = runner_module().resolve_local(job.model.base, config.base_dir)
    try:
        facts = estimate.model_facts(job.model.base, path if is_local else None)
    except estimate.UnknownModel:
        return  # no config.json here: the runner decides on the machine
    refusal = runner_module().padding_free_refusal(facts.model_type, job.model.trust_remote_code)
    if refusal:
        report.add("error", "config", f"data.packing: true, but {refusal}; set data.packing: false (or auto)",
                   EXIT_CONFIG)


def needed_disk_gb(config: LaunchConfig, assets_bytes: int, has_python: bool) -> float:
    if config.resources.disk_gb:
        return config.resources.disk_gb
    qr = runner_module()
    _, model_is_local = qr.resolve_local(config.job.model.base, config.base_dir)
    need = assets_bytes / 1e9 * 1.1 + (0 if has_python else VENV_GB) + (0 if model_is_local else HUB_MODEL_GB_GUESS)
    return round(need + 1.0, 1)  # + checkpoints and logs


def check_provider_settings(report: PreflightReport, config: LaunchConfig) -> None:
    """A provider's settings that need another section of the job (managed mode: a store)."""
    from launcher.errors import EXIT_CONFIG
    from launcher.providers import PROVIDERS

    for cls in PROVIDERS.values():
        problem = cls.job_problem(config)
        if problem:
            report.add("error", "config", problem, EXIT_CONFIG)


def check_storage(report: PreflightReport, config: LaunchConfig) -> None:
    """storage.kind s3: the keys are here, and the bucket answers, takes a write and a delete with them."""
    if not config.storage.enabled:
        return
    from launcher import storage

    try:
        _, warnings = storage.check(config.storage)
    except storage.StorageProblem as e:
        report.add("error", "storage", str(e), e.exit_code)
        return
    for warning in warnings:
        report.add("warning", "storage", warning)
    report.add("ok", "storage", f"s3://{config.storage.bucket}/{config.storage.prefix.strip('/')}/ is writable")


def check_target(report: PreflightReport, machine: Machine, workdir: str, need_gb: float, needs_gpu: bool) -> None:
    """Reachable (BatchMode key auth), the workdir writable, enough free disk, GPUs listed."""
    try:
        machine.ensure_connected()
        out = machine.run(
            f"mkdir -p {shell_path(workdir)} && cd {shell_path(workdir)} && df -Pk . | tail -1 && "
            "(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || true)", timeout=60).stdout
    except Unreachable as e:
        report.add("error", "target", str(e), EXIT_TARGET)
        return
    except RemoteError as e:
        report.add("error", "target", f"{e}; check that resources.workdir ({workdir}) is writable there", EXIT_TARGET)
        return
    lines = out.strip().splitlines()
    free_kb = int(lines[0].split()[3])
    report.free_disk_gb = round(free_kb / 1e6, 1)
    report.needed_disk_gb = need_gb
    report.gpus = [line.strip() for line in lines[1:] if line.strip()]
    if report.free_disk_gb < need_gb:
        report.add("error", "disk", f"{machine.name}: {report.free_disk_gb} GB free under {workdir}, the job needs "
                                    f"about {need_gb} GB; free some space, or set resources.workdir to a bigger disk "
                                    "(resources.disk_gb overrides the estimate)", EXIT_TARGET)
    if needs_gpu and not report.gpus:
        report.add("warning", "target", f"{machine.name}: nvidia-smi lists no GPU; the bootstrap will stop unless "
                                        "train.device is cpu")


def summary_json(report: PreflightReport) -> str:
    return json.dumps({"examples": report.examples, "planned_steps": report.planned_steps, "gpus": report.gpus,
                       "findings": [f.__dict__ for f in report.findings]})
