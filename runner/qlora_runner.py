#!/usr/bin/env python3
# /// script
# requires-python = ">=3.10"
# dependencies = [
#   "torch>=2.4", "transformers>=4.56", "peft>=0.17", "bitsandbytes>=0.49",
#   "datasets>=3.0", "accelerate>=1.0", "pyyaml>=6.0",
# ]
# ///
"""QLoRA fine-tuning runner: one self-contained file, copied to the GPU machine as is.

    python qlora_runner.py --config job.yaml --out DIR                 # a fresh run
    python qlora_runner.py --config job.yaml --out DIR --resume auto   # continue from DIR's newest checkpoint
    python qlora_runner.py accelerate-launch --multi_gpu --num_processes 4 --num_machines 1 \
        --mixed_precision no --dynamo_backend no qlora_runner.py --config job.yaml --out DIR   # data parallel

With storage.kind s3 the runner starts `qlora_runner.py store-upload PID` itself: its checkpoint
uploads run there, at nice 19, so that they take no CPU time from training.

Data parallel (launcher/distributed.py writes the line): `accelerate-launch ARGS` is `accelerate launch
ARGS` run in this file, so that the launched process exits with the codes below; each rank (one per
GPU, a 4-bit model on each) runs this file again. train.grad_accum is what one process accumulates:
with W ranks each accumulates grad_accum / W, so the global batch stays the same. Rank 0 writes the
run's files; each node's first rank seals that node's checkpoints; the others write nothing but
their warnings and errors, marked [rank N]. A signal on any rank stops every rank at the same step.

The phases, in the order they run: load the data (local .jsonl/.json/.csv/.parquet file or
folder, or a Hugging Face dataset id), format and tokenize it (labels only on the answer for
the instruction and chat formats), split it with a fixed seed, load the base model in 4-bit
NF4 (bitsandbytes) or unquantized, attach LoRA (peft), measure the base model's test loss,
train with the Hugging Face Trainer, save the adapter, evaluate on the test split and write
generations for a few held-out prompts.

Everything it writes goes into DIR:
    checkpoints/checkpoint-N/  Trainer checkpoints; a folder appears under this name only once it is
                               complete (written under checkpoints/.incoming/, given a manifest
                               `qlora_complete.json`, then renamed), so a kill -9 mid-save leaves no
                               half checkpoint where a reader or `--resume auto` would take it
    metrics.jsonl              one JSON object per event: train steps, evals, base and final test loss
    status.json                phase (loading, training, evaluating, saving, done, failed, preempted),
                               step, total_steps, error, exit_code; rewritten atomically at every change
    adapter/                   the final LoRA adapter (peft format) and tokenizer
    eval.json                  test loss and perplexity, before (base model) and after fine-tuning
    samples.jsonl              {prompt, reference, before, after} for a few test prompts
    runner.log                 everything the runner printed

Exit codes (each failure prints one line that names the key, file or value and how to fix it;
tracebacks only with --debug):
    0    done                      3  config error         6  out of memory
    1    unexpected internal error 4  data error           7  environment (packages, device, GPU stack)
    2    bad command line          5  model cannot load    130  interrupted (Ctrl-C), checkpoint saved
    143  SIGTERM (a preempted machine): a checkpoint was saved at the current step

Importing this file imports only the standard library, so the launcher reuses its config
schema (`load_config`, `JobConfig`) on a laptop without torch.
"""

from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import difflib
import errno
import functools
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
import traceback
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

# ---------------------------------------------------------------------------------------------
# Exit codes and typed errors
# ---------------------------------------------------------------------------------------------

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_DATA = 4
EXIT_MODEL = 5
EXIT_OOM = 6
EXIT_ENVIRONMENT = 7
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_PREEMPTED = 143  # 128 + SIGTERM


class RunnerError(Exception):
    """An error we can explain in one line; `exit_code` tells its class apart."""

    exit_code = EXIT_INTERNAL
    kind = "error"


class UsageError(RunnerError):
    exit_code = EXIT_USAGE
    kind = "usage error"


class ConfigError(RunnerError):
    exit_code = EXIT_CONFIG
    kind = "config error"


class DataError(RunnerError):
    exit_code = EXIT_DATA
    kind = "data error"


class ModelLoadError(RunnerError):
    exit_code = EXIT_MODEL
    kind = "model error"


class OutOfMemory(RunnerError):
    exit_code = EXIT_OOM
    kind = "out of memory"


class EnvironmentProblem(RunnerError):
    exit_code = EXIT_ENVIRONMENT
    kind = "environment error"


class Stopped(BaseException):
    """Raised by the signal handler outside training, where there is nothing to checkpoint."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# ---------------------------------------------------------------------------------------------
# Config schema: plain dataclasses, checked by `from_dict` (types, unknown and missing keys) and
# by each section's `__post_init__` (values and cross-field rules). The launcher imports these.
# ---------------------------------------------------------------------------------------------


class _Invalid(ValueError):
    """A bad value inside one section; `from_dict` adds the section's key path."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise _Invalid(key, message)


@dataclass
class ModelSection:
    base: str  # hub id (org/name) or a local folder with config.json and weights
    quantization: Literal["nf4", "fp4", "none"] = "nf4"
    double_quant: bool = True  # QLoRA's double quantization of the quantization constants
    revision: Optional[str] = None
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        _require(self.base.strip() != "", "base", "must not be empty; set a hub id or a local model folder")


@dataclass
class SplitsSection:
    train: float = 0.9
    validation: float = 0.05
    test: float = 0.05

    def __post_init__(self) -> None:
        for name in ("train", "validation", "test"):
            value = getattr(self, name)
            _require(0.0 <= value <= 1.0, name, f"must be a fraction between 0 and 1, got {value}")
        _require(self.train > 0, "train", "must be > 0, got 0")
        total = self.train + self.validation + self.test
        _require(
            abs(total - 1.0) < 1e-6,
            "train",
            f"train + validation + test must add up to 1, got {total:g} "
            f"({self.train:g} + {self.validation:g} + {self.test:g})",
        )


PLACEHOLDER_RE = re.compile(r"\{(instruction|input)\}")
DEFAULT_PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
DEFAULT_PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"


@dataclass
class DataSection:
    path: str  # local file or folder (relative to the config file), or a hub dataset id
    format: Literal["completion", "instruction", "chat"] = "instruction"
    max_length: int = 1024
    # Padding-free batches: a micro batch's examples in one row, each attending only to itself.
    # auto: on where the model's attention is known to honour it (see padding_free_refusal) and a
    # packed row costs fewer FLOPs than the padding it removes (see packed_over_padded_flops).
    packing: Union[bool, Literal["auto"]] = "auto"
    splits: SplitsSection = field(default_factory=SplitsSection)
    validation_path: Optional[str] = None  # given split files replace the fractions for that split
    test_path: Optional[str] = None
    split_seed: int = 42  # apart from train.seed, so changing the training seed keeps the test set
    text_field: str = "text"
    instruction_field: str = "instruction"
    input_field: str = "input"
    output_field: str = "output"
    messages_field: str = "messages"
    prompt_template: Optional[str] = None  # with {instruction} and optionally {input}
    subset: Optional[str] = None  # hub datasets: the configuration name
    hub_split: str = "train"  # hub datasets: which split to read

    def __post_init__(self) -> None:
        _require(self.path.strip() != "", "path", "must not be empty; set a data file, folder or hub dataset id")
        _require(self.max_length >= 8, "max_length", f"must be >= 8 tokens, got {self.max_length}")
        if self.prompt_template is not None:
            _require(
                "{instruction}" in self.prompt_template,
                "prompt_template",
                "must contain the placeholder {instruction} (and may contain {input})",
            )


@dataclass
class LoraSection:
    r: int = 16
    alpha: float = 32
    dropout: float = 0.05
    target_modules: Union[str, list[str]] = "all-linear"  # all linear layers but the output head

    def __post_init__(self) -> None:
        _require(self.r > 0, "r", f"must be > 0, got {self.r}")
        _require(self.alpha > 0, "alpha", f"must be > 0, got {self.alpha}")
        _require(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")
        _require(bool(self.target_modules), "target_modules", "must name at least one module, or be all-linear")


@dataclass
class TrainSection:
    epochs: float = 1.0
    max_steps: Optional[int] = None  # optimizer steps; overrides epochs when set
    micro_batch_size: int = 2
    grad_accum: int = 4
    lr: float = 2.0e-4
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = True
    save_every: int = 50  # optimizer steps between checkpoints
    eval_every: int = 50  # optimizer steps between validation evals
    keep_checkpoints: int = 3  # newest complete checkpoints kept in DIR/checkpoints
    seed: int = 42
    device: Literal["auto", "cuda", "cpu"] = "auto"
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 where supported, else fp16; fp32 on CPU
    optimizer: Literal["auto", "adamw_torch", "paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit"] = "auto"
    # auto: Liger's kernels on CUDA when liger-kernel is installed, else our chunked loss; liger:
    # Liger or an error; none: the model's own loss, full logits and all (see "Kernels and the loss").
    kernels: Literal["auto", "liger", "none"] = "auto"

    def __post_init__(self) -> None:
        _require(self.epochs > 0, "epochs", f"must be > 0, got {self.epochs}")
        if self.max_steps is not None:
            _require(self.max_steps > 0, "max_steps", f"must be > 0 or null, got {self.max_steps}")
        for name in ("micro_batch_size", "grad_accum", "save_every", "eval_every", "keep_checkpoints"):
            value = getattr(self, name)
            _require(value >= 1, name, f"must be >= 1, got {value}")
        _require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        _require(0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        _require(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        _require(self.max_grad_norm > 0, "max_grad_norm", f"must be > 0, got {self.max_grad_norm}")
        if self.device == "cpu":
            _require(
                self.precision in ("auto", "fp32"), "precision", f"must be auto or fp32 on the CPU, got {self.precision}"
            )
            _require(self.kernels != "liger", "kernels",
                     "liger needs a CUDA GPU (its kernels are Triton); use auto or none with train.device: cpu")


@dataclass
class EvalSection:
    samples: int = 4  # held-out prompts generated before and after fine-tuning
    max_new_tokens: int = 64
    batch_size: Optional[int] = None  # test-loss batch; defaults to train.micro_batch_size

    def __post_init__(self) -> None:
        _require(self.samples >= 0, "samples", f"must be >= 0, got {self.samples}")
        _require(self.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        if self.batch_size is not None:
            _require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")


S3_KEY_ENV = "QLORA_S3_ACCESS_KEY_ID"  # the store's keys reach the runner in these variables only
S3_SECRET_ENV = "QLORA_S3_SECRET_ACCESS_KEY"
S3_TOKEN_ENV = "QLORA_S3_SESSION_TOKEN"
RUN_ID_ENV = "QLORA_RUN_ID"  # the run's name in the store; default: the name of --out
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")  # S3's rule, which R2, B2 and MinIO share


@dataclass
class StorageSection:
    """Where checkpoints live besides the target. `local`: pulled to the laptop only. `s3`: also in
    an S3-compatible bucket (AWS S3, Cloudflare R2, Backblaze B2, MinIO), under
    s3://bucket/prefix/<run>/, uploaded by the runner itself, so they outlive the machine and the laptop.
    The launcher reads the credential keys (profile, *_env) on the laptop; the runner gets the keys
    in its environment (S3_KEY_ENV...), or uses boto3's own chain when they are not set."""

    kind: Literal["local", "s3"] = "local"
    keep_checkpoints: int = 3  # newest checkpoints pulled and kept on the laptop
    bucket: Optional[str] = None
    prefix: str = "qlora-launch"
    endpoint_url: Optional[str] = None  # R2, B2, MinIO...; unset: AWS S3
    region: Optional[str] = None
    keep: int = 3  # newest complete checkpoints kept in the store
    profile: Optional[str] = None  # the laptop's AWS profile to take the keys from (default: AWS's own chain)
    access_key_env: Optional[str] = None  # or the names of the laptop's variables holding the store's own keys
    secret_key_env: Optional[str] = None

    def __post_init__(self) -> None:
        _require(self.keep_checkpoints >= 1, "keep_checkpoints", f"must be >= 1, got {self.keep_checkpoints}")
        _require(self.keep >= 1, "keep", f"must be >= 1, got {self.keep}")
        if self.kind == "local":
            return
        _require(bool(self.bucket), "bucket", "must be set for kind: s3 (the bucket's name, e.g. my-checkpoints)")
        _require(bool(BUCKET_RE.match(self.bucket or "")), "bucket",
                 f"{self.bucket!r} is not a bucket name: 3-63 lowercase letters, digits, dots and hyphens "
                 "(a name, not an s3:// URL)")
        _require(self.prefix.strip("/") != "" and "//" not in self.prefix, "prefix",
                 f"must be a non-empty key prefix without '//', got {self.prefix!r}")
        if self.endpoint_url is not None:
            _require(self.endpoint_url.startswith(("http://", "https://")), "endpoint_url",
                     f"must start with https:// (or http://), got {self.endpoint_url!r}")
        _require((self.access_key_env is None) == (self.secret_key_env is None), "access_key_env",
                 "set both access_key_env and secret_key_env, or neither (then the AWS chain or `profile` is used)")
        for name in ("access_key_env", "secret_key_env"):
            value = getattr(self, name)
            _require(value is None or bool(ENV_NAME_RE.match(value)), name,
                     "must be the NAME of an environment variable holding the key (e.g. R2_ACCESS_KEY_ID), "
                     "never the key itself")
        _require(self.profile is None or self.access_key_env is None, "profile",
                 "set either profile or access_key_env/secret_key_env, not both")

    @property
    def enabled(self) -> bool:
        return self.kind == "s3"


@dataclass
class JobConfig:
    model: ModelSection
    data: DataSection
    lora: LoraSection = field(default_factory=LoraSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    # The launcher's section: the same file travels to the GPU machine, so the runner accepts it;
    # the launcher validates it with its own schema.
    resources: Optional[dict] = None
    storage: StorageSection = field(default_factory=StorageSection)  # read here too: the runner uploads


# The names other tools use for our keys (transformers' TrainingArguments, axolotl), so a user
# who types theirs is told ours.
KEY_ALIASES = {
    "learning_rate": "lr", "num_epochs": "epochs", "num_train_epochs": "epochs",
    "batch_size": "micro_batch_size", "per_device_train_batch_size": "micro_batch_size",
    "micro_batch": "micro_batch_size", "gradient_accumulation_steps": "grad_accum",
    "lr_scheduler": "scheduler", "lr_scheduler_type": "scheduler", "save_steps": "save_every",
    "eval_steps": "eval_every", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
    "sequence_len": "max_length", "max_seq_length": "max_length", "base_model": "base",
}

def did_you_mean(key: str, fields: list[str]) -> Optional[str]:
    """The key meant: an alias's (learning_rate -> lr), or the nearest key or alias by spelling
    (lerning_rate -> learning_rate -> lr)."""
    if KEY_ALIASES.get(key) in fields:
        return KEY_ALIASES[key]
    names = fields + [alias for alias, target in KEY_ALIASES.items() if target in fields]
    close = difflib.get_close_matches(key, names, n=1)
    return KEY_ALIASES.get(close[0], close[0]) if close else None


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping"}


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it (numbers widened to float)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, key)
            except ConfigError as e:
                errors.append(e)
        wanted = " or ".join(_type_word(a) for a in args)
        raise ConfigError(f"{key}: expected {wanted}, got {_describe(value)}")
    if origin is Literal:
        if value in args:
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{key}: must be one of {', '.join(map(str, args))}, got {value!r}{hint}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {_describe(value)}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if tp is float:
        # YAML 1.1 reads 2e-4 (no dot) as a string; accept what is plainly a number.
        number = None
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        if number is not None:
            if not math.isfinite(number):
                raise ConfigError(f"{key}: must be a finite number, got {value!r}")
            return number
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is dict:
        if isinstance(value, dict):
            return value
    elif isinstance(value, tp):
        return value
    if value is None:
        raise ConfigError(f"{key}: must be set (expected {_type_word(tp)}), got null")
    raise ConfigError(f"{key}: expected {_type_word(tp)}, got {_describe(value)}")


def _type_word(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) is Literal:
        return " or ".join(map(str, typing.get_args(tp)))
    if typing.get_origin(tp) is list:
        return "a list"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return _TYPE_WORDS.get(tp, getattr(tp, "__name__", str(tp)))


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass `cls` from a mapping: unknown keys, missing keys and wrong types are
    ConfigErrors that name the full key path (`train.lr`) and suggest the closest valid key."""
    prefix = f"{path}." if path else ""
    if not isinstance(data, dict):
        where = path or "the config file"
        raise ConfigError(f"{where}: expected a mapping of keys to values, got {_describe(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            close = did_you_mean(str(key), list(fields))
            hint = f"did you mean {close!r}? " if close else ""
            raise ConfigError(f"{prefix}{key}: unknown key; {hint}valid keys here: {', '.join(fields)}")
    values = {}
    for name, f in fields.items():
        if name in data:
            values[name] = _coerce(data[name], hints[name], f"{prefix}{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{prefix}{name}: required key is missing; add it to the config")
    try:
        return cls(**values)
    except _Invalid as e:
        raise ConfigError(f"{prefix}{e.key}: {e}") from None


def load_config(path: str | Path) -> JobConfig:
    """Read and validate a job YAML. Raises ConfigError naming the file and key."""
    path = Path(path)
    try:
        import yaml
    except ImportError:
        raise EnvironmentProblem("PyYAML is not installed: pip install -r runner/requirements.txt") from None
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file ({e.strerror}); check the --config path") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: the config file is not UTF-8 text; re-save it as UTF-8") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if data is None:
        raise ConfigError(f"{path}: the config file is empty; see configs/tiny-cpu.yaml for an example")
    try:
        return from_dict(JobConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


# ---------------------------------------------------------------------------------------------
# Paths: relative paths in the config are relative to the config file.
# ---------------------------------------------------------------------------------------------

LOCAL_DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def _looks_local(value: str) -> bool:
    return value.startswith((".", "/", "~")) or value.endswith(LOCAL_DATA_SUFFIXES) or value.count("/") > 1


def resolve_local(value: Optional[str], base_dir: Path) -> tuple[Optional[str], bool]:
    """Return (value, is_local): an absolute path for what exists or looks like a path,
    else the value itself, taken as a Hugging Face hub id."""
    if value is None:
        return None, False
    candidate = Path(value).expanduser()
    if not candidate.is_absolute():
        candidate = base_dir / candidate
    if candidate.exists() or _looks_local(value):
        return str(candidate.resolve()), True
    return value, False


# ---------------------------------------------------------------------------------------------
# Run directory: status, metrics, log, atomic writes
# ---------------------------------------------------------------------------------------------


def write_text_atomic(path: Path, text: str) -> None:
    """Readers (the launcher, a resumed run) see the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


class RunDir:
    """DIR and what the runner writes there. `writes` is false on every rank but 0 of a data-parallel
    run: status and metrics are then left to rank 0 (the other ranks' calls do nothing)."""

    def __init__(self, root: Path, writes: bool = True) -> None:
        self.root = root
        self.writes = writes
        self.checkpoints = root / "checkpoints"
        self.incoming = self.checkpoints / ".incoming"  # where the Trainer writes before we rename
        self.status_path = root / "status.json"
        self.metrics_path = root / "metrics.jsonl"
        self.log_path = root / "runner.log"
        self.adapter = root / "adapter"
        self.eval_path = root / "eval.json"
        self.base_eval_path = root / "base_eval.json"  # kept so a resumed run need not redo it
        self.samples_path = root / "samples.jsonl"
        self.outgoing = self.checkpoints / ".outgoing"  # checkpoints waiting for their upload to the store
        self._status: dict[str, Any] = {}
        self._status_lock = threading.Lock()  # the store's uploader thread notes its progress too
        self.config: Optional[JobConfig] = None  # set once loaded, for error messages

    def set_status(self, phase: Optional[str] = None, **fields: Any) -> None:
        """Rewrite status.json with `fields` changed (and the phase, unless None: the same phase)."""
        if not self.writes:
            return
        with self._status_lock:
            self._status.update(fields)
            if phase is not None or "phase" not in self._status:
                self._status["phase"] = phase or "loading"
            self._status.update(updated_at=time.time(), pid=os.getpid())
            write_json_atomic(self.status_path, self._status)

    def read_status(self) -> dict[str, Any]:
        try:
            return json.loads(self.status_path.read_text())
        except (OSError, ValueError):
            return {}

    def append_metric(self, record: dict[str, Any]) -> None:
        if not self.writes:
            return
        record = {k: v for k, v in record.items() if v is not None}
        record.setdefault("time", time.time())
        with self._status_lock, self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def copy_history_into(self, checkpoint: Path) -> None:
        """The history so far goes into the checkpoint (covered by its manifest): wherever the
        checkpoint travels (pulled, stored, republished), the steps before it travel with it,
        even when the copy of metrics.jsonl beside it lags (a stream cut before its last lines)."""
        if self.writes and self.metrics_path.exists():
            with self._status_lock:
                (checkpoint / HISTORY_IN_CHECKPOINT).write_bytes(self.metrics_path.read_bytes())

    def restore_history(self, checkpoint: Path, step: int) -> None:
        """Before a resume from `checkpoint`: metrics.jsonl holds every record of the checkpoint's
        own copy of the history (lines it lacks are put back first) and nothing past `step`."""
        saved = checkpoint / HISTORY_IN_CHECKPOINT
        if self.writes and saved.is_file():
            ours = self.metrics_path.read_text().splitlines() if self.metrics_path.exists() else []
            theirs = saved.read_text().splitlines()
            known = set(theirs)
            if not known <= set(ours):
                write_text_atomic(self.metrics_path, "".join(line + "\n" for line in
                                                            theirs + [ln for ln in ours if ln not in known]))
        self.truncate_metrics_after(step)

    def truncate_metrics_after(self, step: int) -> None:
        """A resumed run repeats the steps after its checkpoint: drop what the dead run logged
        past it, so metrics.jsonl keeps one record per step."""
        if not self.writes or not self.metrics_path.exists():
            return
        kept = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut short by a kill
            if record.get("event") in ("train", "eval") and record.get("step", 0) > step:
                continue
            if record.get("event") in ("test", "done"):
                continue
            kept.append(line)
        write_text_atomic(self.metrics_path, "".join(line + "\n" for line in kept))


class Tee:
    """Writes what the runner prints to the terminal and to runner.log."""

    def __init__(self, stream: Any, log_file: Any) -> None:
        self.stream = stream
        self.log_file = log_file

    def write(self, text: str) -> int:
        self.stream.write(text)
        self.log_file.write(text)
        self.log_file.flush()
        return len(text)

    def flush(self) -> None:
        self.stream.flush()
        self.log_file.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.stream.fileno()


class Prefixed:
    """A stream that starts each line with `prefix`: which rank said it."""

    def __init__(self, stream: Any, prefix: str) -> None:
        self.stream = stream
        self.prefix = prefix
        self.at_line_start = True

    def write(self, text: str) -> int:
        if text:
            lines = text.splitlines(keepends=True)
            self.stream.write("".join(self.prefix + line if i or self.at_line_start else line
                                      for i, line in enumerate(lines)))
            self.at_line_start = text.endswith("\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.stream.fileno()


LOG_SINK: Optional[typing.Callable[[str], None]] = None  # set in the store's upload worker: lines go to the runner


def log(message: str) -> None:
    if LOG_SINK is not None:
        LOG_SINK(message)
        return
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------------------------------------
# Checkpoints: complete only once renamed into place with a manifest
# ---------------------------------------------------------------------------------------------

MANIFEST = "qlora_complete.json"
HISTORY_IN_CHECKPOINT = "metrics.jsonl"  # the history up to a checkpoint, inside it
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_is_complete(path: Path) -> bool:
    """A checkpoint is complete when its manifest exists and every file has the listed size,
    so a half-copied folder (an interrupted rsync, say) is not taken for a good one."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        return all((path / name).stat().st_size == size for name, size in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def complete_checkpoints(checkpoints_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    found = []
    if checkpoints_dir.is_dir():
        for child in checkpoints_dir.iterdir():
            match = CHECKPOINT_RE.match(child.name)
            if match and child.is_dir() and checkpoint_is_complete(child):
                found.append((int(match.group(1)), child))
    return sorted(found)


def finalize_checkpoint(run: RunDir, step: int, keep: int) -> Path:
    """Move the Trainer's freshly written checkpoint into place, then drop the oldest."""
    src = run.incoming / f"checkpoint-{step}"
    run.copy_history_into(src)
    files = {}
    for p in sorted(src.rglob("*")):
        if p.is_file():
            with p.open("rb") as f:
                os.fsync(f.fileno())
            files[str(p.relative_to(src))] = p.stat().st_size
    write_json_atomic(src / MANIFEST, {"step": step, "files": files, "time": time.time()})
    dst = run.checkpoints / f"checkpoint-{step}"
    if dst.exists():  # e.g. SIGTERM at a step that was just saved: keep the newer copy
        shutil.rmtree(dst)
    os.replace(src, dst)
    for _, old in complete_checkpoints(run.checkpoints)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return dst


def discard_partial_checkpoints(run: RunDir) -> None:
    """What a kill -9 left half written is useless; remove it so nothing mistakes it for a checkpoint."""
    if run.incoming.exists():
        shutil.rmtree(run.incoming)
    if run.checkpoints.is_dir():
        for child in run.checkpoints.iterdir():
            if CHECKPOINT_RE.match(child.name) and not checkpoint_is_complete(child):
                log(f"removing incomplete checkpoint {child.name} (no valid {MANIFEST})")
                shutil.rmtree(child)


# ---------------------------------------------------------------------------------------------
# The checkpoint store: S3-compatible, written by the runner itself (boto3 imported only here)
# ---------------------------------------------------------------------------------------------

STORE_HISTORY = ("metrics.jsonl", "base_eval.json")  # uploaded with each checkpoint, before its manifest
STORE_RESULTS = ("eval.json", "samples.jsonl", "metrics.jsonl", "base_eval.json")  # and the adapter/, at the end
STORE_STOP_FLUSH_S = 90.0  # after SIGTERM: time for the last checkpoint's upload (the launcher waits 120 s)
STORE_DONE_FLUSH_S = 3600.0
STORE_MANIFEST_KEY_RE = re.compile(r"checkpoints/checkpoint-(\d+)/" + re.escape(MANIFEST) + "$")
STORE_CHECKPOINT_KEY_RE = re.compile(r"checkpoints/checkpoint-(\d+)/")


class StoreError(RunnerError):
    kind = "storage error"
    exit_code = EXIT_ENVIRONMENT


def s3_client(storage: StorageSection, env: Optional[dict[str, str]] = None, quick: bool = False) -> Any:
    """A boto3 S3 client for the store: the keys in S3_KEY_ENV/S3_SECRET_ENV (what the launcher
    passes), else boto3's own chain (AWS_* variables, ~/.aws, an instance role). Path-style
    addressing with an endpoint (MinIO and most S3-compatible services need it). quick: short
    timeouts and no retries, for a probe that must answer at once."""
    env = os.environ if env is None else env
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise EnvironmentProblem("storage.kind is s3 but boto3 is not installed: pip install boto3") from None
    keys = {}
    if env.get(S3_KEY_ENV):
        keys = {"aws_access_key_id": env[S3_KEY_ENV], "aws_secret_access_key": env.get(S3_SECRET_ENV, ""),
                "aws_session_token": env.get(S3_TOKEN_ENV) or None}
    config = Config(s3={"addressing_style": "path"} if storage.endpoint_url else {},
                    retries={"max_attempts": 1 if quick else 4, "mode": "standard"},
                    connect_timeout=5 if quick else 10, read_timeout=10 if quick else 120)
    return boto3.client("s3", endpoint_url=storage.endpoint_url, region_name=storage.region, config=config, **keys)


def sha256_of(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def store_error_text(e: BaseException) -> str:
    """botocore's errors as one short line (its code and message when it has them)."""
    error = getattr(e, "response", {}).get("Error", {}) if hasattr(e, "response") else {}
    if error:
        return f"{error.get('Code')}: {error.get('Message') or 'no message'}"
    return f"{type(e).__name__}: {e}"


class CheckpointStore:
    """One run's folder in the bucket: s3://bucket/prefix/<run>/ with checkpoints/checkpoint-N/
    (Trainer files, then MANIFEST: every file's size and sha256, put last and only if absent, so a
    checkpoint without one is an unfinished upload and never read), metrics.jsonl, base_eval.json,
    and at the end adapter/, eval.json, samples.jsonl, status.json."""

    def __init__(self, storage: StorageSection, run_name: str, client: Any = None) -> None:
        self.storage = storage
        self.run_name = run_name
        self.bucket = storage.bucket or ""
        self.root = f"{storage.prefix.strip('/')}/{run_name}/"
        self.client = client if client is not None else s3_client(storage)
        self.conditional_put = True  # cleared once if the service refuses If-None-Match

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.root}"

    def key(self, name: str) -> str:
        return self.root + name

    # ---- reading ----------------------------------------------------------------------------

    def keys_under(self, under: str) -> list[str]:
        """Every key under the run's `under` (a folder name ending in /)."""
        keys = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.key(under)):
            keys += [item["Key"] for item in page.get("Contents", [])]
        return keys

    def complete_steps(self) -> list[int]:
        """Steps of the checkpoints whose manifest is in place, oldest first."""
        steps = []
        for key in self.keys_under("checkpoints/"):
            match = STORE_MANIFEST_KEY_RE.search(key)
            if match:
                steps.append(int(match.group(1)))
        return sorted(steps)

    def manifest(self, step: int) -> dict[str, Any]:
        body = self.client.get_object(Bucket=self.bucket, Key=self.key(f"checkpoints/checkpoint-{step}/{MANIFEST}"))
        return json.loads(body["Body"].read())

    def download_file(self, name: str, local: Path) -> bool:
        """The run's file `name` into `local` (atomically); False when the store has none."""
        from botocore.exceptions import ClientError

        tmp = local.with_name(f".{local.name}.download")
        try:
            self.client.download_file(self.bucket, self.key(name), str(tmp))
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
                return False
            raise
        os.replace(tmp, local)
        return True

    def download_checkpoint(self, step: int, dest: Path) -> Path:
        """checkpoint-<step> into `dest`, each file checked against the manifest's size and sha256;
        the local manifest is written last, so an interrupted download is not a checkpoint."""
        manifest = self.manifest(step)
        staging = dest.parent / ".incoming" / dest.name
        shutil.rmtree(staging, ignore_errors=True)
        for name, size in manifest["files"].items():
            target = staging / name
            target.parent.mkdir(parents=True, exist_ok=True)
            self.client.download_file(self.bucket, self.key(f"checkpoints/checkpoint-{step}/{name}"), str(target))
            if target.stat().st_size != size or sha256_of(target) != manifest["sha256"][name]:
                raise StoreError(f"{self.url}checkpoints/checkpoint-{step}/{name} does not match its manifest "
                                 "(size or sha256); the store's copy is damaged: delete that checkpoint's manifest "
                                 "to fall back to the one before")
        write_json_atomic(staging / MANIFEST, manifest)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(staging, dest)
        return dest

    # ---- writing ----------------------------------------------------------------------------

    def upload_file(self, local: Path, name: str) -> None:
        from boto3.s3.transfer import TransferConfig

        # The transfer manager: multipart (8 MiB parts, in parallel) for the large files.
        self.client.upload_file(str(local), self.bucket, self.key(name), Config=TransferConfig(max_concurrency=4))

    def upload_checkpoint(self, step: int, folder: Path, run: "RunDir",
                          before_manifest: Optional[typing.Callable[[], None]] = None) -> bool:
        """Files first, then the run's history, then the manifest (only if absent). False when
        the store already holds a complete checkpoint-<step>. before_manifest may raise to leave
        the checkpoint incomplete (the upload worker: when the runner is gone)."""
        if step in self.complete_steps():
            return False
        files, sums = {}, {}
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
            name = str(path.relative_to(folder))
            files[name], sums[name] = path.stat().st_size, sha256_of(path)
            self.upload_file(path, f"checkpoints/checkpoint-{step}/{name}")
        for name in STORE_HISTORY:
            if (run.root / name).is_file():
                self.upload_file(run.root / name, name)
        if before_manifest is not None:
            before_manifest()
        manifest = {"step": step, "files": files, "sha256": sums, "time": time.time()}
        self._put_once(f"checkpoints/checkpoint-{step}/{MANIFEST}", json.dumps(manifest).encode())
        return True

    def _put_once(self, name: str, body: bytes) -> None:
        from botocore.exceptions import ClientError

        if self.conditional_put:
            try:
                self.client.put_object(Bucket=self.bucket, Key=self.key(name), Body=body, IfNoneMatch="*")
                return
            except ClientError as e:
                code = e.response.get("Error", {}).get("Code")
                if code in ("PreconditionFailed", "ConditionalRequestConflict"):
                    return  # another writer completed it first: the checkpoint is complete either way
                if code not in ("NotImplemented", "InvalidArgument", "501"):
                    raise
                log(f"storage: {self.bucket} does not take conditional writes ({code}); manifests are put plainly")
                self.conditional_put = False
        self.client.put_object(Bucket=self.bucket, Key=self.key(name), Body=body)

    def rotate(self, keep: int) -> list[int]:
        """Keep the newest `keep` complete checkpoints: an older one loses its manifest first (it
        is then no longer complete), then its files; leftovers of unfinished uploads older than
        the newest complete one go too. Returns the steps removed."""
        by_step: dict[int, list[str]] = {}
        complete = set()
        for key in self.keys_under("checkpoints/"):
            match = STORE_CHECKPOINT_KEY_RE.search(key)
            if match:
                by_step.setdefault(int(match.group(1)), []).append(key)
                if STORE_MANIFEST_KEY_RE.search(key):
                    complete.add(int(match.group(1)))
        if not complete:
            return []
        kept = sorted(complete)[-keep:]
        doomed = [step for step in sorted(by_step) if step < kept[0] or (step not in complete and step < kept[-1])]
        for step in doomed:
            if step in complete:
                self.client.delete_object(Bucket=self.bucket, Key=self.key(f"checkpoints/checkpoint-{step}/{MANIFEST}"))
            rest = [{"Key": k} for k in by_step[step] if not k.endswith("/" + MANIFEST)]
            for i in range(0, len(rest), 1000):
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": rest[i:i + 1000], "Quiet": True})
        return doomed

    def upload_results(self, run: "RunDir") -> None:
        """The adapter, eval.json, samples.jsonl, the history and status.json: a finished run, whole."""
        if run.adapter.is_dir():
            for path in sorted(p for p in run.adapter.rglob("*") if p.is_file()):
                self.upload_file(path, f"adapter/{path.relative_to(run.adapter)}")
        for name in STORE_RESULTS + ("status.json",):
            if (run.root / name).is_file():
                self.upload_file(run.root / name, name)


def open_store(cfg: JobConfig, run: "RunDir") -> Optional[CheckpointStore]:
    """The run's store when storage.kind is s3 (the run's name: $QLORA_RUN_ID, else DIR's name)."""
    if not cfg.storage.enabled:
        return None
    return CheckpointStore(cfg.storage, os.environ.get(RUN_ID_ENV) or run.root.name)


def fetch_from_store(store: CheckpointStore, run: "RunDir") -> Optional[int]:
    """Before `--resume auto`: when the store holds a newer complete checkpoint than DIR (an empty
    DIR: a new machine), download it with the run's history. The step taken, or None."""
    try:
        stored = store.complete_steps()
        local = complete_checkpoints(run.checkpoints)
        if not stored or (local and local[-1][0] >= stored[-1]):
            return None
        step = stored[-1]
        log(f"storage: downloading checkpoint-{step} from {store.url}")
        started = time.time()
        store.download_checkpoint(step, run.checkpoints / f"checkpoint-{step}")
        for name in STORE_HISTORY:
            store.download_file(name, run.root / name)
    except StoreError:
        raise
    except Exception as e:  # noqa: BLE001  (botocore's many errors: one line)
        raise StoreError(f"cannot read {store.url} ({store_error_text(e)}); check storage.* and the credentials, "
                         "or set storage.kind: local to resume from this machine's checkpoints only") from None
    log(f"storage: checkpoint-{step} downloaded in {time.time() - started:.1f} s")
    return step


STORE_WORKER = "store-upload"  # `qlora_runner.py store-upload RUNNER_PID`: StoreUploader's child process
STORE_WORKER_NICE = 19  # the lowest CPU priority: an upload may take longer, a training step must not


class StoreUploader:
    """Uploads checkpoints in order, off the training process, so a training step waits for no
    upload: `submit` hard-links the sealed checkpoint into DIR/checkpoints/.outgoing/ (instant, and
    the local rotation cannot delete it under the upload) and returns. A thread hands the checkpoints
    one by one to a child process (`store_worker`, at nice 19) that hashes and uploads them and
    rotates the store: in a thread of the runner, boto3's Python took the GIL and the CPU from
    training (benchmarks/storage.py measures the step with uploads on and off). A checkpoint with
    `keep` newer ones already waiting is skipped: it would be rotated away on arrival. A failed
    upload (or a worker that died: a new one takes the next checkpoint) is logged and training
    goes on."""

    def __init__(self, store: CheckpointStore, run: "RunDir", keep: int) -> None:
        self.store, self.run, self.keep = store, run, keep
        self.pending: list[tuple[int, Path]] = []
        self.busy = False
        self.failures = 0
        self.cond = threading.Condition()
        self.closed = False
        self.worker: Optional[Any] = None  # subprocess.Popen of store_worker
        shutil.rmtree(run.outgoing, ignore_errors=True)
        self.thread = threading.Thread(target=self._work, name="store-uploader", daemon=True)
        self.thread.start()

    def submit(self, step: int, checkpoint: Path) -> None:
        staged = self.run.outgoing / checkpoint.name
        shutil.rmtree(staged, ignore_errors=True)
        shutil.copytree(checkpoint, staged, copy_function=os.link)
        with self.cond:
            self.pending.append((step, staged))
            while len(self.pending) > self.keep:
                _, dropped = self.pending.pop(0)
                shutil.rmtree(dropped, ignore_errors=True)
            self.cond.notify_all()

    def _start_worker(self) -> Any:
        """Started from this uploader's thread: on Linux the worker is killed when the thread that
        started it ends (PR_SET_PDEATHSIG), so it never outlives the runner, even a kill -9. Its own
        session, so a Ctrl-C or a TERM to the runner's process group leaves the last upload to it.
        The store's keys reach it in the inherited environment only, never its command line."""
        import subprocess

        worker = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), STORE_WORKER, str(os.getpid())],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
        worker.stdin.write(json.dumps({"storage": dataclasses.asdict(self.store.storage),
                                       "run_name": self.store.run_name, "root": str(self.run.root)}) + "\n")
        worker.stdin.flush()
        return worker

    def _upload(self, step: int, staged: Path) -> dict[str, Any]:
        """One checkpoint through the worker: its reply, the worker's log lines passed on meanwhile."""
        if self.worker is None or self.worker.poll() is not None:
            self.worker = self._start_worker()
        try:
            self.worker.stdin.write(json.dumps({"step": step, "folder": str(staged), "keep": self.keep}) + "\n")
            self.worker.stdin.flush()
        except OSError:
            pass  # it died: the read below says so
        for line in self.worker.stdout:
            reply = json.loads(line)
            if "log" in reply:
                log(reply["log"])
            else:
                return reply
        return {"step": step, "error": f"the upload worker exited ({self.worker.wait()})"}

    def _work(self) -> None:
        try:
            self.worker = self._start_worker()  # now, so its start-up (Python, boto3) is paid before training
        except OSError:
            pass  # each checkpoint tries again, and its failure is logged
        while True:
            with self.cond:
                while not self.pending and not self.closed:
                    self.cond.wait()
                if self.closed:  # after a flush (nothing left), or close() gave up on what is left
                    break
                step, staged = self.pending.pop(0)
                self.busy = True
            try:
                self._note(step, self._upload(step, staged))
            except Exception as e:  # noqa: BLE001  (the store is a copy: training goes on without it)
                self._note(step, {"step": step, "error": f"{type(e).__name__}: {e}"})
            finally:
                shutil.rmtree(staged, ignore_errors=True)
                with self.cond:
                    self.busy = False
                    self.cond.notify_all()
        if self.worker is not None and self.worker.poll() is None:
            self.worker.stdin.close()  # its end of input: it exits
            self.worker.wait()

    def _note(self, step: int, reply: dict[str, Any]) -> None:
        """The worker's answer in the log, status.json and metrics.jsonl."""
        if self.closed and "error" in reply:
            return  # close() gave up and stopped the worker: it said which checkpoint is not stored
        if "error" in reply:
            self.failures += 1
            log(f"storage: uploading checkpoint-{step} failed ({reply['error']}); training goes on, "
                "the next checkpoint is uploaded as usual")
            return
        if reply["uploaded"]:
            removed = reply["removed"]
            gone = f"; removed checkpoint {', '.join(map(str, removed))} there" if removed else ""
            log(f"storage: checkpoint-{step} uploaded to {self.store.url} in {reply['seconds']:.1f} s{gone}")
        self.run.set_status(stored_step=step, store=self.store.url)
        self.run.append_metric({"event": "stored", "step": step})

    def flush(self, timeout: float) -> bool:
        """Wait until every submitted checkpoint is uploaded (or failed); False on the timeout."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.pending or self.busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(min(left, 1.0))
        return True

    def close(self, timeout: float) -> bool:
        done = self.flush(timeout)
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        if not done:
            waiting = [f"checkpoint-{step}" for step, _ in self.pending]
            log(f"storage: stopped waiting for the upload after {timeout:.0f} s; not in the store: "
                f"{', '.join(waiting) or 'the one being uploaded'}")
            worker = self.worker
            if worker is not None:
                worker.kill()  # mid-upload: it leaves no manifest, so the store never takes that checkpoint
        self.thread.join(10)
        return done


def store_worker(argv: list[str]) -> int:
    """`qlora_runner.py store-upload RUNNER_PID`: StoreUploader's upload process. Reads the store
    (one JSON line: storage, run_name, root), then one checkpoint per line (step, folder, keep);
    answers each with one JSON line ({"log": ...} lines before it), in order, until its input ends."""
    runner_pid = int(argv[0])
    os.nice(STORE_WORKER_NICE)
    die_with_parent()  # SIGKILL when the uploader's thread ends, a kill -9 of the runner included
    if os.getppid() != runner_pid:
        return EXIT_OK  # the runner died before the line above took effect
    replies, sys.stdout = sys.stdout, sys.stderr  # stdout is the answers' channel: a stray print must not enter it

    def send(reply: dict[str, Any]) -> None:
        replies.write(json.dumps(reply) + "\n")
        replies.flush()

    def forward_log(message: str) -> None:
        send({"log": message})

    global LOG_SINK
    LOG_SINK = forward_log
    hello = json.loads(sys.stdin.readline() or "null")
    if hello is None:
        return EXIT_OK
    run = RunDir(Path(hello["root"]), writes=False)  # read only: its history files go up with each checkpoint

    def open_worker_store() -> CheckpointStore:
        return CheckpointStore(from_dict(StorageSection, hello["storage"], "storage"), hello["run_name"])

    try:
        store: Optional[CheckpointStore] = open_worker_store()  # boto3's import now, before the first checkpoint
    except Exception:  # noqa: BLE001  (each checkpoint tries again and says why)
        store = None

    def runner_alive() -> None:  # where PR_SET_PDEATHSIG is not: no manifest for a runner that is gone
        if os.getppid() != runner_pid:
            raise StoreError("the runner is gone")

    for line in sys.stdin:
        job = json.loads(line)
        step, started = job["step"], time.time()
        try:
            store = store or open_worker_store()
            if not store.upload_checkpoint(step, Path(job["folder"]), run, before_manifest=runner_alive):
                send({"step": step, "uploaded": False})
                continue
            removed = store.rotate(job["keep"])
            send({"step": step, "uploaded": True, "removed": removed, "seconds": time.time() - started})
        except Exception as e:  # noqa: BLE001  (one line for the runner's log; the next checkpoint is tried)
            send({"step": step, "error": store_error_text(e)})
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# Data: read records, check them, split, render to (text, trained?) segments, tokenize
# ---------------------------------------------------------------------------------------------


def read_csv(path: Path, key: str) -> list[dict[str, Any]]:
    """A CSV file's rows by its header. strict: a quote that is never closed is an error (the lax
    reader would swallow every line after it into one field and report a missing column)."""
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, strict=True)
        rows: list[dict[str, Any]] = []
        last_good_line = 1  # the header's
        try:
            for row in reader:
                rows.append(row)
                last_good_line = reader.line_num
        except csv.Error as e:
            raise DataError(f"{key}: {path} is not valid CSV from line {last_good_line + 1} ({e}): a quote opened "
                            "there is never closed, or stray text follows a closing one; close the quote, or write "
                            'a quote inside a quoted field as two ("")') from None
    return rows


def read_records(path: str, is_local: bool, data: DataSection, key: str) -> list[dict[str, Any]]:
    """Read examples from a local file or folder, or a hub dataset, as a list of dicts."""
    if not is_local:
        return _read_hub_dataset(path, data, key)
    p = Path(path)
    if not p.exists():
        raise DataError(f"{key}: {p} does not exist; check the path (relative paths are relative to the config file)")
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in LOCAL_DATA_SUFFIXES)
        if not files:
            raise DataError(f"{key}: folder {p} has no {', '.join(LOCAL_DATA_SUFFIXES)} files")
        records = [r for f in files for r in _read_file(f, key)]
    else:
        records = _read_file(p, key)
    if not records:
        raise DataError(f"{key}: {p} has no examples; add some, or point {key} at the right file")
    return records


def _read_file(p: Path, key: str) -> list[dict[str, Any]]:
    suffix = p.suffix.lower()
    try:
        if suffix == ".jsonl":
            records = []
            with p.open(encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            records.append(json.loads(line))
                        except ValueError as e:
                            raise DataError(f"{key}: {p} line {number} is not valid JSON ({e}); fix or remove it") from None
        elif suffix == ".json":
            loaded = json.loads(p.read_text(encoding="utf-8"))
            records = loaded.get("data", loaded) if isinstance(loaded, dict) else loaded
            if not isinstance(records, list):
                raise DataError(f"{key}: {p} must hold a JSON list of examples (or {{\"data\": [...]}})")
        elif suffix == ".csv":
            records = read_csv(p, key)
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            records = pq.read_table(p).to_pylist()
        else:
            raise DataError(f"{key}: cannot read {p.name}: unknown file format {suffix!r}; use .jsonl, .json, .csv or .parquet")
    except UnicodeDecodeError:
        raise DataError(f"{key}: {p} is not UTF-8 text; re-save it as UTF-8") from None
    except ValueError as e:  # invalid .json, or a parquet/csv reader's complaint
        raise DataError(f"{key}: cannot parse {p}: {e}") from None
    for number, record in enumerate(records, 1):
        if not isinstance(record, dict):
            raise DataError(f"{key}: {p} example {number} is {type(record).__name__}, expected an object with fields")
    return records


def _read_hub_dataset(name: str, data: DataSection, key: str) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise EnvironmentProblem("the datasets package is missing: pip install -r runner/requirements.txt") from None
    try:
        loaded = datasets.load_dataset(name, data.subset, split=data.hub_split)
    except Exception as e:  # the hub raises many kinds; all mean "cannot read this dataset"
        raise DataError(
            f"{key}: cannot load hub dataset {name!r} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "check the id, data.subset and data.hub_split, or use a local file"
        ) from None
    return [dict(r) for r in loaded]


def split_records(records: list, fractions: SplitsSection, seed: int, has_val_file: bool, has_test_file: bool):
    """Shuffle with `seed` and cut into train/validation/test. Split files given in the config
    replace their fraction; the train split takes the rest. Same seed, same data -> same split."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n = len(records)
    frac_val = 0.0 if has_val_file else fractions.validation
    frac_test = 0.0 if has_test_file else fractions.test
    n_test = _split_size(n, frac_test)
    n_val = _split_size(n, frac_val)
    if n - n_test - n_val < 1:
        raise DataError(
            f"data.path: {n} examples are too few for splits {fractions.train:g}/{fractions.validation:g}/"
            f"{fractions.test:g}; add examples or lower data.splits.validation and data.splits.test"
        )
    test = [records[i] for i in order[:n_test]]
    val = [records[i] for i in order[n_test : n_test + n_val]]
    train = [records[i] for i in order[n_test + n_val :]]
    return train, val, test


def _split_size(n: int, fraction: float) -> int:
    if fraction <= 0:
        return 0
    return max(1, round(n * fraction))  # a split asked for is never silently empty


@dataclass
class Segment:
    text: str
    trained: bool  # labels on these tokens; -100 otherwise
    eos_after: bool = False  # append the tokenizer's end-of-sequence token (trained with the segment)


@dataclass
class Example:
    segments: list[Segment]

    @property
    def prompt(self) -> list[Segment]:
        """Everything before the last trained segment: what a generation starts from."""
        last = max(i for i, s in enumerate(self.segments) if s.trained)
        return self.segments[:last]

    @property
    def reference(self) -> str:
        return [s for s in self.segments if s.trained][-1].text


def _field(record: dict, name: str, number: int, data: DataSection, key: str, setting: str) -> Any:
    value = record.get(name)
    if value is None or value == "":
        raise DataError(
            f"{key}: example {number} has no field {name!r} (data.format {data.format} needs it; "
            f"present fields: {', '.join(map(str, record)) or 'none'}); set data.{setting} if it has another name"
        )
    return value


def format_records(records: list[dict], data: DataSection, tokenizer: Any, key: str) -> list[Example]:
    """Render each record as segments per data.format."""
    examples = []
    for number, record in enumerate(records, 1):
        if data.format == "completion":
            text = str(_field(record, data.text_field, number, data, key, "text_field"))
            examples.append(Example([Segment(text, trained=True, eos_after=True)]))
        elif data.format == "instruction":
            instruction = str(_field(record, data.instruction_field, number, data, key, "instruction_field"))
            output = str(_field(record, data.output_field, number, data, key, "output_field"))
            extra = record.get(data.input_field) or ""
            template = data.prompt_template or (DEFAULT_PROMPT_WITH_INPUT if extra else DEFAULT_PROMPT_NO_INPUT)
            # One pass over the template, so "{input}" inside the user's own text stays as written.
            values = {"instruction": instruction, "input": str(extra)}
            prompt = PLACEHOLDER_RE.sub(lambda m: values[m.group(1)], template)
            examples.append(Example([Segment(prompt, trained=False), Segment(output, trained=True, eos_after=True)]))
        else:
            messages = _field(record, data.messages_field, number, data, key, "messages_field")
            examples.append(Example(render_chat(_check_messages(messages, number, key), tokenizer)))
    return examples


def _check_messages(messages: Any, number: int, key: str) -> list[dict[str, str]]:
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)  # csv cells hold the list as JSON text
        except ValueError:
            pass
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
    ):
        raise DataError(f"{key}: example {number}: messages must be a list of {{role, content}} objects")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{key}: example {number} has no assistant message to learn from")
    return messages


FALLBACK_ROLE_HEADERS = {"system": "### System:\n", "user": "### User:\n", "assistant": "### Assistant:\n"}


def render_chat(messages: list[dict[str, str]], tokenizer: Any) -> list[Segment]:
    """Segments for a conversation; every assistant turn is trained.

    With the tokenizer's chat template, each assistant turn is the text the template adds
    between the prompt for that turn and the conversation through that turn. Templates that
    rewrite earlier turns (reasoning models strip old <think> blocks) break that prefix rule;
    then only the last assistant turn is trained. Without a template, a plain built-in one."""
    if getattr(tokenizer, "chat_template", None):
        def render(msgs: list, gen: bool) -> str:
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

        segments: list[Segment] = []
        done = ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = render(messages[:i], True)
            full = render(messages[: i + 1], False)
            if not (prompt.startswith(done) and full.startswith(prompt)):
                prompt, full = render(messages[:-1], True), render(messages, False)
                if messages[-1]["role"] != "assistant" or not full.startswith(prompt):
                    raise DataError("the tokenizer's chat template does not render prompts as prefixes; use data.format: completion")
                return [Segment(prompt, trained=False), Segment(full[len(prompt) :], trained=True)]
            segments += [Segment(prompt[len(done) :], trained=False), Segment(full[len(prompt) :], trained=True)]
            done = full
        return [s for s in segments if s.text]
    segments = []
    pending = ""
    for m in messages:
        header = FALLBACK_ROLE_HEADERS.get(m["role"], f"### {m['role'].capitalize()}:\n")
        if m["role"] == "assistant":
            segments += [Segment(pending + header, trained=False), Segment(m["content"], trained=True, eos_after=True)]
            pending = "\n\n"
        else:
            pending += f"{header}{m['content']}\n\n"
    return [s for s in segments if s.text]


@dataclass
class TokenizedSplit:
    input_ids: list[list[int]]
    labels: list[list[int]]
    examples: list[Example]  # kept for samples, aligned with input_ids when not packed
    truncated: int = 0
    dropped: int = 0

    @property
    def tokens(self) -> int:
        return sum(len(ids) for ids in self.input_ids)

    @property
    def trained_tokens(self) -> int:
        return sum(sum(1 for x in labels if x != -100) for labels in self.labels)


def adds_bos(tokenizer: Any) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def encode_segments(tokenizer: Any, segments: list[Segment], bos: bool) -> tuple[list[int], list[int]]:
    """Token ids and labels for segments, each tokenized on its own so the prompt tokenizes the
    same in training and in generation."""
    texts = [s.text for s in segments]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    ids: list[int] = []
    labels: list[int] = []
    if bos and not (encoded and encoded[0][:1] == [tokenizer.bos_token_id]):
        ids.append(tokenizer.bos_token_id)
        labels.append(-100)
    for segment, seg_ids in zip(segments, encoded):
        if segment.eos_after:
            seg_ids = seg_ids + [tokenizer.eos_token_id]
        ids += seg_ids
        labels += seg_ids if segment.trained else [-100] * len(seg_ids)
    return ids, labels


def tokenize_split(examples: list[Example], tokenizer: Any, max_length: int) -> TokenizedSplit:
    bos = adds_bos(tokenizer)
    out = TokenizedSplit([], [], [])
    for example in examples:
        ids, labels = encode_segments(tokenizer, example.segments, bos)
        if len(ids) > max_length:
            out.truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
        if all(x == -100 for x in labels):
            out.dropped += 1  # the prompt alone fills max_length: nothing left to learn from
            continue
        out.input_ids.append(ids)
        out.labels.append(labels)
        out.examples.append(example)
    return out


@dataclass
class PreparedData:
    train: TokenizedSplit
    validation: Optional[TokenizedSplit]
    test: Optional[TokenizedSplit]
    total_examples: int


def prepare_data(cfg: JobConfig, config_dir: Path, tokenizer: Any) -> PreparedData:
    data = cfg.data
    path, local = resolve_local(data.path, config_dir)
    records = read_records(path, local, data, "data.path")
    val_path, _ = resolve_local(data.validation_path, config_dir)
    test_path, _ = resolve_local(data.test_path, config_dir)
    train_r, val_r, test_r = split_records(records, data.splits, data.split_seed, bool(val_path), bool(test_path))
    if val_path:
        val_r = read_records(val_path, True, data, "data.validation_path")
    if test_path:
        test_r = read_records(test_path, True, data, "data.test_path")

    splits = {}
    sources = (("train", train_r, "data.path"),
               ("validation", val_r, "data.validation_path" if val_path else "data.path"),
               ("test", test_r, "data.test_path" if test_path else "data.path"))
    for name, rs, key in sources:
        if not rs:
            splits[name] = None
            continue
        examples = format_records(rs, data, tokenizer, key)
        splits[name] = tokenize_split(examples, tokenizer, data.max_length)
    train = splits["train"]
    if not train.input_ids:
        longest = max(len(encode_segments(tokenizer, e.prompt, False)[0]) for e in format_records(train_r[:200], data, tokenizer, "data.path"))
        raise DataError(
            f"data.path: every example is longer than data.max_length={data.max_length} tokens before its answer "
            f"(longest prompt seen: {longest} tokens); raise data.max_length or shorten the prompts"
        )
    for name, split in splits.items():
        if split is not None and (split.truncated or split.dropped):
            log(f"warning: {name}: {split.truncated} examples cut to data.max_length={data.max_length}, "
                f"{split.dropped} dropped (prompt alone too long)")
        if name != "train" and split is not None and not split.input_ids:
            log(f"warning: every {name} example was dropped; there is no {name} split")
            splits[name] = None
    return PreparedData(train, splits["validation"], splits["test"], len(records))


# ---------------------------------------------------------------------------------------------
# Device, precision, model
# ---------------------------------------------------------------------------------------------


@dataclass
class DevicePlan:
    device: str  # "cuda" or "cpu"
    dtype_name: str  # "bfloat16", "float16" or "float32": compute dtype and Trainer precision
    device_map: Any  # for from_pretrained
    gpu_name: Optional[str] = None


def choose_precision(requested: str, device: str, bf16_supported: bool) -> str:
    """bf16 where the GPU has it (Ampere and newer), else fp16 (T4, V100, P100); fp32 on the CPU."""
    if requested == "fp32" or device == "cpu":
        return "float32"
    if requested == "bf16":
        if not bf16_supported:
            raise ConfigError("train.precision: bf16 is not supported by this GPU; use auto or fp16")
        return "bfloat16"
    if requested == "fp16":
        return "float16"
    return "bfloat16" if bf16_supported else "float16"


def has_native_bf16(cuda: Any, index: int) -> bool:
    """Compute capability 8.0 and up (Ampere, Ada, Hopper...). Not torch.cuda.is_bf16_supported():
    by default (including_emulation=True) it says True on a T4 (7.5), whose bf16 is emulated and slow."""
    return cuda.get_device_capability(index)[0] >= 8


def choose_device_map(device: str, gpu_count: int, local_rank: Optional[int]) -> Any:
    """One process per GPU under torchrun/accelerate (LOCAL_RANK set); otherwise one process
    spreading a model too big for one GPU over all of them; or all on the CPU."""
    if device == "cpu":
        return {"": "cpu"}
    if local_rank is not None:
        return {"": local_rank}
    return "auto" if gpu_count > 1 else {"": 0}


def plan_device(train: TrainSection, ranks: Optional[Ranks] = None) -> DevicePlan:
    import torch

    has_cuda = torch.cuda.is_available()
    if train.device == "cuda" and not has_cuda:
        raise EnvironmentProblem(
            "train.device is cuda but no CUDA GPU is visible (check nvidia-smi and that torch is a CUDA build); "
            "set train.device: cpu to train on the CPU"
        )
    device = "cuda" if has_cuda and train.device != "cpu" else "cpu"
    index = 0  # this process's GPU
    if device == "cuda" and ranks is not None and ranks.world > 1:
        index = ranks.local_rank
        torch.cuda.set_device(index)  # before anything else touches CUDA: else every rank opens a context on GPU 0
    bf16 = device == "cuda" and has_native_bf16(torch.cuda, index)
    dtype = choose_precision(train.precision, device, bf16)
    rank = os.environ.get("LOCAL_RANK")
    device_map = choose_device_map(device, torch.cuda.device_count() if device == "cuda" else 0, int(rank) if rank else None)
    gpu = torch.cuda.get_device_name(index) if device == "cuda" else None
    return DevicePlan(device, dtype, device_map, gpu)


def load_tokenizer(base: str, cfg: ModelSection) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(base, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except Exception as e:  # OSError, ValueError, HTTP errors: all "cannot load this model"
        raise ModelLoadError(_model_error("tokenizer", base, e)) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # labels are masked separately, so pad = eos is safe
    return tokenizer


def _model_error(what: str, base: str, e: Exception) -> str:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:240]
    return (
        f"model.base: cannot load the {what} of {base!r} ({type(e).__name__}: {first}); a local folder needs "
        "config.json, weights and tokenizer files, a hub id must exist (check model.revision and HF_TOKEN for gated models)"
    )


def load_model(base: str, cfg: JobConfig, plan: DevicePlan) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = getattr(torch, plan.dtype_name)
    kwargs: dict[str, Any] = {"dtype": dtype, "device_map": plan.device_map, "revision": cfg.model.revision,
                              "trust_remote_code": cfg.model.trust_remote_code}
    if cfg.model.quantization != "none":
        try:
            import bitsandbytes  # noqa: F401  (fail here with a clear message, not deep inside transformers)
        except Exception as e:
            raise EnvironmentProblem(f"bitsandbytes cannot be imported ({e}); pip install -r runner/requirements.txt, "
                                     "or set model.quantization: none") from None
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=cfg.model.quantization,
            bnb_4bit_use_double_quant=cfg.model.double_quant,
            bnb_4bit_compute_dtype=dtype,
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    except Exception as e:
        if is_oom(e):
            raise  # main() reports it as out of memory, not as a model that cannot load
        raise ModelLoadError(_model_error("model", base, e)) from None
    if plan.device == "cpu":
        keep_cpu_4bit_kernel_fixed(model)
    return model


def keep_cpu_4bit_kernel_fixed(model: Any) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights for a faster kernel the first
    time a layer runs in eval mode without grad, and keeps them repacked. Training then runs
    on the other kernel, whose sums differ in the last bits, so a run that evaluated before a
    step and a resumed run that did not would drift apart. One kernel throughout keeps resume exact."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def attach_lora(model: Any, cfg: JobConfig) -> Any:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    gc_kwargs = {"use_reentrant": False}
    if cfg.model.quantization != "none":
        # Casts norms and the head to fp32 and enables input grads: the QLoRA recipe.
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.train.gradient_checkpointing, gradient_checkpointing_kwargs=gc_kwargs
        )
    elif cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
        model.enable_input_require_grads()
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, lora)
    except ValueError as e:
        raise ConfigError(f"lora.target_modules: {e}") from None


def is_oom(e: BaseException) -> bool:
    """CUDA's OutOfMemoryError, and the allocators' out-of-memory RuntimeErrors (CPU and CUDA)."""
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
LOW_DISK_BYTES = 64 * 2**20  # a write that failed with less free than this: the disk is why


def is_disk_full(e: BaseException, folder: Path) -> bool:
    """A write that failed for want of disk: ENOSPC/EDQUOT anywhere in the exception's chain, the
    text safetensors gives it ("StorageFull"), or torch's "file write failed" (PytorchStreamWriter
    drops the errno) on a disk that is nearly full."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in DISK_FULL_ERRNOS:
            return True
        text = str(seen)
        if "No space left on device" in text or "StorageFull" in text or "Disk quota exceeded" in text:
            return True
        if "write failed" in text and _free_bytes(folder) < LOW_DISK_BYTES:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _free_bytes(folder: Path) -> int:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return 0


def disk_full_message(run: RunDir) -> str:
    """One line, after the half-written save is removed: where, what is kept, what to change."""
    step = run.read_status().get("step", 0)
    complete = complete_checkpoints(run.checkpoints)
    kept = f"checkpoint-{complete[-1][0]} is the newest complete checkpoint (kept)" if complete else \
        "no checkpoint was complete yet"
    return (f"disk full at step {step}: {_free_bytes(run.root) / 2**20:.1f} MB free on the disk of {run.root} "
            f"(the half-written checkpoint is removed); {kept}; free space there or give the machine a bigger "
            "disk, or keep fewer checkpoints (train.keep_checkpoints), then `launch resume`")


# ---------------------------------------------------------------------------------------------
# Data parallel: one process (rank) per GPU, started by accelerate launch (torch's elastic agent)
# ---------------------------------------------------------------------------------------------

ACCELERATE_LAUNCH = "accelerate-launch"  # first argument: run `accelerate launch` here (see main)


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks, from the variables torchrun sets; a run started
    plainly is rank 0 of 1."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @classmethod
    def from_env(cls, env: Optional[dict[str, str]] = None) -> "Ranks":
        env = os.environ if env is None else env
        world = int(env.get("WORLD_SIZE") or 1)
        return cls(rank=int(env.get("RANK") or 0), world=world, local_rank=int(env.get("LOCAL_RANK") or 0),
                   local_world=int(env.get("LOCAL_WORLD_SIZE") or world))

    @property
    def is_main(self) -> bool:
        """Writes the run's files: status, metrics, runner.log, adapter, eval, samples."""
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        """Seals (and on resume, cleans) the checkpoints folder on its node's disk."""
        return self.local_rank == 0

    @property
    def nodes(self) -> int:
        return max(1, self.world // max(1, self.local_world))


def per_rank_grad_accum(grad_accum: int, world: int) -> int:
    """train.grad_accum is what one process would accumulate; each of `world` ranks accumulates
    grad_accum / world, so the global batch (micro x accum x ranks) stays. When world does not
    divide it, the nearest count (halves up: the global batch closest to the planned one), never 0."""
    return max(1, (2 * grad_accum + world) // (2 * world))


def all_ranks_max(values: list[int], device: Any) -> list[int]:
    """Element-wise max over the ranks (a collective: every rank calls it, which also makes it a
    barrier). `device`: the rank's own (NCCL reduces GPU tensors only)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [int(v) for v in t.tolist()]


def die_with_parent() -> None:
    """A rank ends when its launcher does. The elastic agent starts each rank in a session of its
    own and stops them itself on a TERM, but if the agent is SIGKILLed (the launcher's last resort,
    the OOM killer) its ranks would train on, orphaned, holding the GPU and writing into DIR."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))


def fetch_before_ranks(runner_argv: list[str]) -> None:
    """Data parallel with a store, `--resume auto`: this node's newer checkpoint from the store,
    fetched once per node before its ranks start (each node has a disk of its own)."""
    parser = argparse.ArgumentParser(add_help=False)  # the ranks check the command line; only read it here
    for name in ("--config", "--out"):
        parser.add_argument(name, type=Path)
    parser.add_argument("--resume", default="never")
    args, _ = parser.parse_known_args(runner_argv)
    if args.resume != "auto" or args.config is None or args.out is None:
        return
    cfg = load_config(args.config)
    run = RunDir(args.out.resolve())
    store = open_store(cfg, run)
    if store is not None:
        run.root.mkdir(parents=True, exist_ok=True)
        discard_partial_checkpoints(run)
        fetch_from_store(store, run)


def accelerate_launch(argv: list[str]) -> int:
    """`qlora_runner.py accelerate-launch ARGS`: `accelerate launch ARGS` in this process, exiting
    with the runner's codes. accelerate's own command exits 1 whatever happened: torch's elastic
    agent raises SignalException after it has passed a TERM/INT on to every rank and waited for
    them (TORCH_ELASTIC_SHUTDOWN_TIMEOUT; they checkpoint and exit), and ChildFailedError when a
    rank exits non-zero. Here the first becomes 128 + the signal (143 after SIGTERM, as one process
    exits), the second the exit code of the rank that failed first (the agent lists the ranks it
    found failed before those it stopped after them): a config error stays 3, out of memory 6."""
    try:
        from accelerate.commands.launch import launch_command, launch_command_parser
        from torch.distributed.elastic.multiprocessing import SignalException
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    except Exception as e:  # a broken install raises more than ImportError
        print(f"qlora_runner: environment error: cannot import accelerate or torch ({type(e).__name__}: {e}); "
              "pip install -r runner/requirements.txt", file=sys.stderr, flush=True)
        return EXIT_ENVIRONMENT
    args = launch_command_parser().parse_args(argv)
    try:
        fetch_before_ranks(args.training_script_args)
    except RunnerError as e:
        print(f"qlora_runner: {e.kind}: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    try:
        launch_command(args)
    except SignalException as e:
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        rank, failure = next(iter(e.failures.items()))
        code = 128 - failure.exitcode if failure.exitcode < 0 else failure.exitcode
        print(f"qlora_runner: rank {rank} exited with {code}", file=sys.stderr, flush=True)
        return code
    except Exception as e:  # noqa: BLE001  (a rendezvous timeout, a port in use: the machines, not the job)
        print(f"qlora_runner: environment error: accelerate launch failed: {type(e).__name__}: {e}",
              file=sys.stderr, flush=True)
        return EXIT_ENVIRONMENT
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# Kernels and the loss
# ---------------------------------------------------------------------------------------------
#
# A causal LM's own loss materialises the LM head's output for every token: [tokens x vocabulary]
# logits, their fp32 copy and their gradient (3.7 GB per 2k tokens at Qwen2's 152k vocabulary),
# often the largest tensors of a QLoRA step. Both ways below never hold more than one chunk of
# them: Liger's fused linear cross-entropy (Triton, CUDA only, with its RMSNorm/SwiGLU/RoPE
# kernels), applied by transformers' own integration (TrainingArguments.use_liger_kernel), or our
# chunked loss, which computes each chunk's gradient in the forward pass, as Liger does, so the
# backward pass has nothing to recompute.

KERNEL_WORDS = {"liger": "Liger (fused linear cross-entropy, RMSNorm, SwiGLU, RoPE)",
                "chunked": "chunked loss (no full logits)", "none": "the model's own loss"}
LOSS_CHUNK_BYTES = 256 * 2**20  # one chunk's fp32 logits; its gradient takes as much again
# Config keys of softcapped or scaled logits: the chunked loss would skip that step, so such models keep their own.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def choose_kernels(requested: str, device: str, liger_importable: bool, liger_types: frozenset[str],
                   model_type: str) -> str:
    """"liger", "chunked" or "none" for train.kernels on this machine and model."""
    if requested == "none":
        return "none"
    liger_fits = device == "cuda" and liger_importable and model_type in liger_types
    if requested == "liger" and not liger_fits:
        if device != "cuda":
            raise ConfigError("train.kernels: liger needs a CUDA GPU (its kernels are Triton); use auto or none")
        if not liger_importable:
            raise EnvironmentProblem("train.kernels: liger, but liger-kernel cannot be imported; "
                                     "pip install liger-kernel, or use train.kernels: auto")
        raise ConfigError(f"train.kernels: Liger has no kernels for model type {model_type!r}; use auto "
                          "(our chunked loss) or none")
    return "liger" if liger_fits else "chunked"


def liger_model_types() -> tuple[bool, frozenset[str]]:
    """(whether liger-kernel imports, the model types it patches)."""
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except Exception:  # not installed, or no Triton (a CPU machine): the chunked loss instead
        return False, frozenset()
    return True, frozenset(MODEL_TYPE_TO_APPLY_LIGER_FN)


def chunked_loss_applies(model: Any) -> Optional[str]:
    """Why our chunked loss cannot stand in for this model's own loss, or None when it can: a
    decoder (`model.<base_model_prefix>`) and a plain linear LM head, no transform of the logits."""
    import torch

    head = getattr(model, "lm_head", None)
    if getattr(model, getattr(model, "base_model_prefix", ""), None) is None or type(head) is not torch.nn.Linear:
        return f"{type(model).__name__} is not a decoder with a plain linear lm_head"
    config = getattr(model, "config", None)
    for name in _LOGIT_TRANSFORMS:
        if getattr(config, name, None) not in (None, 1, 1.0):
            return f"its logits are transformed ({name})"
    return None


def chunked_causal_lm_loss(hidden: Any, head: Any, labels: Any, num_items_in_batch: Any = None,
                           chunk_tokens: Optional[int] = None) -> Any:
    """The causal LM loss of transformers' ForCausalLMLoss (labels shifted by one, -100 ignored,
    summed over num_items_in_batch when given, else the mean), from the last hidden states and the
    LM head, one chunk of tokens at a time."""
    import torch

    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].reshape(-1).to(hidden.device)
    flat = hidden.reshape(-1, hidden.size(-1))
    if num_items_in_batch is None:
        denominator = (shifted != -100).sum().clamp(min=1).to(torch.float32)
    else:
        denominator = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=hidden.device)
    chunk = chunk_tokens or max(16, LOSS_CHUNK_BYTES // (4 * head.weight.size(0)))
    return _chunked_cross_entropy().apply(flat, head.weight, head.bias, shifted, denominator, chunk)


@functools.lru_cache(maxsize=1)
def _chunked_cross_entropy() -> Any:
    """The autograd function, made on first use (torch is imported only when training)."""
    import torch

    class ChunkedLinearCrossEntropy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight, bias, labels, denominator, chunk):  # type: ignore[override]
            wants = ctx.needs_input_grad
            # The gradients are kept as d(sum of losses): values of order one, which fp16 and its
            # matmuls under autocast hold; the 1/denominator (about 1/tokens, a subnormal in fp16)
            # is applied in backward, in fp32, together with the loss scale.
            grad_hidden = torch.zeros_like(hidden) if wants[0] else None
            grad_weight = torch.zeros_like(weight, dtype=torch.float32) if wants[1] else None
            grad_bias = torch.zeros_like(bias, dtype=torch.float32) if bias is not None and wants[2] else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for start in range(0, hidden.size(0), chunk):
                h, y = hidden[start:start + chunk], labels[start:start + chunk]
                logits = torch.nn.functional.linear(h, weight, bias).float()  # as lm_head(h).float()
                valid = y != -100
                target = y.clamp(min=0).unsqueeze(1)
                log_z = torch.logsumexp(logits, dim=-1)
                total += ((log_z - logits.gather(1, target).squeeze(1)) * valid).sum()
                if grad_hidden is None and grad_weight is None and grad_bias is None:
                    continue
                # d(sum of losses)/d(logits) = softmax - one_hot, for the counted tokens only
                grad = logits.sub_(log_z.unsqueeze(1)).exp_()  # in place: one chunk-sized buffer
                grad.scatter_add_(1, target, torch.full_like(target, -1, dtype=grad.dtype))
                grad.mul_(valid.to(grad.dtype).unsqueeze(1))
                if grad_hidden is not None:
                    grad_hidden[start:start + chunk] = (grad.to(weight.dtype) @ weight).to(hidden.dtype)
                if grad_weight is not None:
                    grad_weight += grad.t() @ h.float()
                if grad_bias is not None:
                    grad_bias += grad.sum(0)
            ctx.save_for_backward(denominator, *(t for t in (grad_hidden, grad_weight, grad_bias) if t is not None))
            ctx.present = (grad_hidden is not None, grad_weight is not None, grad_bias is not None)
            ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
            return total / denominator

        @staticmethod
        def backward(ctx, grad_output):  # type: ignore[override]
            denominator, *saved = ctx.saved_tensors
            factor = grad_output.float() / denominator
            grads = iter(saved)
            out = [(next(grads).float() * factor).to(dtype) if present else None
                   for present, dtype in zip(ctx.present, ctx.dtypes)]
            return out[0], out[1], out[2], None, None, None

    return ChunkedLinearCrossEntropy


def use_chunked_loss(model: Any) -> None:
    """This model's forward computes the loss chunk by chunk whenever labels are given (training
    and validation), returning no logits then; without labels (scoring, generation) it is the
    model's own. Patched on the instance, as Liger does, so peft and DDP call it unchanged."""
    import types

    from transformers.modeling_outputs import CausalLMOutputWithPast

    own_forward = model.forward

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, **kwargs):
        if labels is None:
            return own_forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        for unused in ("logits_to_keep", "return_dict"):
            kwargs.pop(unused, None)
        decoder = getattr(self, self.base_model_prefix)
        outputs = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
        loss = chunked_causal_lm_loss(outputs.last_hidden_state, self.lm_head, labels, num_items_in_batch)
        return CausalLMOutputWithPast(loss=loss, hidden_states=outputs.hidden_states, attentions=outputs.attentions)

    model.forward = types.MethodType(forward, model)


def apply_kernels(model: Any, cfg: "JobConfig", plan: DevicePlan) -> str:
    """Decide train.kernels for this model and set the chunked loss up; "liger" is applied by the
    Trainer (training_arguments). Returns what was chosen, for the log."""
    importable, types_ = liger_model_types() if plan.device == "cuda" else (False, frozenset())
    model_type = getattr(getattr(model, "config", None), "model_type", "") or ""
    chosen = choose_kernels(cfg.train.kernels, plan.device, importable, types_, model_type)
    if chosen == "chunked":
        why_not = chunked_loss_applies(model)
        if why_not:
            log(f"train.kernels: the model's own loss ({why_not})")
            return "none"
        use_chunked_loss(model)
    return chosen


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def collate(features: list[dict[str, list[int]]], pad_id: int, multiple_of: int = 1) -> dict[str, Any]:
    """Right-pad a batch; labels pad with -100 so padding never counts in the loss."""
    import torch

    longest = max(len(f["input_ids"]) for f in features)
    longest = -(-longest // multiple_of) * multiple_of
    ids, labels, mask = [], [], []
    for f in features:
        pad = longest - len(f["input_ids"])
        ids.append(f["input_ids"] + [pad_id] * pad)
        labels.append(f["labels"] + [-100] * pad)
        mask.append([1] * len(f["input_ids"]) + [0] * pad)
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "attention_mask": torch.tensor(mask)}


def collate_padding_free(features: list[dict[str, list[int]]]) -> dict[str, Any]:
    """A micro batch as one row without padding: position ids restart at each example, which is
    how transformers limits attention to each example (a block-diagonal mask for SDPA and eager
    attention, variable-length kernels for flash-attention). An example's first label is -100 so
    the one before it never learns to predict it (DataCollatorWithFlattening does the same). No
    cache: transformers reads packed position ids only when there is none (masking_utils), and a
    model whose config says use_cache would otherwise let the examples see each other."""
    import torch

    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for f in features:
        ids += f["input_ids"]
        labels += [-100] + f["labels"][1:]
        positions += range(len(f["input_ids"]))
    return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]), "position_ids": torch.tensor([positions]),
            "use_cache": False}


# Model types whose transformers attention builds its mask from packed position ids
# (masking_utils.find_packed_sequence_indices) or runs flash-attention's variable-length path.
PADDING_FREE_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2"})
PADDING_FREE_ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")


def padding_free_refusal(model_type: str, trust_remote_code: bool, attention: Optional[str] = None) -> Optional[str]:
    """Why padding-free batches are not known to be safe for this model, or None when they are:
    elsewhere, examples sharing a row could attend to each other."""
    if trust_remote_code:
        return "the model runs its own code (model.trust_remote_code), whose attention may ignore position ids"
    if model_type not in PADDING_FREE_MODEL_TYPES:
        return (f"model type {model_type!r} is not one whose attention is known to keep packed examples apart "
                f"({', '.join(sorted(PADDING_FREE_MODEL_TYPES))})")
    if attention is not None and attention not in PADDING_FREE_ATTENTION:
        return f"attention implementation {attention!r} is not one of {', '.join(PADDING_FREE_ATTENTION)}"
    return None


@dataclass(frozen=True)
class ComputeShape:
    """What a training step's FLOPs depend on: the matmul weights every token passes through
    (decoder linears and the LM head) and the attention's layers and width."""
    matmul_params: int
    layers: int
    attention_width: int  # query heads x head dim

    @classmethod
    def of(cls, config: Any) -> Optional["ComputeShape"]:
        """From a transformers model config (a dense decoder's fields); None when one is missing."""
        try:
            h, layers, heads = config.hidden_size, config.num_hidden_layers, config.num_attention_heads
            width = (getattr(config, "head_dim", None) or h // heads) * heads
            kv = (getattr(config, "num_key_value_heads", None) or heads) * (width // heads)
            per_layer = h * width + 2 * h * kv + width * h + 3 * h * config.intermediate_size
            return cls(layers * per_layer + h * config.vocab_size, layers, width)
        except (AttributeError, TypeError, ZeroDivisionError):
            return None


def packed_over_padded_flops(shape: ComputeShape, batch: int, mean_tokens: float, mean_longest: float) -> float:
    """Forward FLOPs of a padding-free micro batch over a padded one (backward scales both alike).
    A padded batch computes `batch` rows of its longest example; a packed row computes only real
    tokens, but SDPA and eager attention run over the whole row under a block-diagonal mask, so
    its attention grows with batch x mean tokens: on a narrow model (small attention_width
    against matmul_params per layer) with short, even examples, packing costs more than it saves."""
    def row(tokens: float) -> float:  # 2 FLOPs per weight per token; QK^T and AV: 4 x context x width per layer
        return tokens * (2 * shape.matmul_params + 4 * shape.layers * tokens * shape.attention_width)

    return row(batch * mean_tokens) / (batch * row(mean_longest))


def mean_longest_of(counts: list[tuple[int, int]], batch: int) -> float:
    """E[the longest of `batch` examples drawn at random]: the row a padded micro batch pads to.
    `counts`: (length, examples) ascending by length. Exact over the counts (draws with
    replacement): sum of length x (F(length)^batch - F(length-)^batch). The launcher's
    LengthStats uses it too."""
    total, below, expected = sum(count for _, count in counts), 0, 0.0
    for length, count in counts:
        expected += length * (((below + count) / total) ** batch - (below / total) ** batch)
        below += count
    return expected


def choose_padding_free(packing: Union[bool, str], model: Any, trust_remote_code: bool,
                        lengths: list[int], batch: int) -> tuple[bool, str]:
    """(padding-free, why) for data.packing on this model and these training sequence lengths:
    true insists (an error where it is not safe), auto takes it where it is safe and costs less."""
    if packing is False:
        return False, "data.packing: false"
    config = getattr(model, "config", None)
    attention = getattr(config, "_attn_implementation", None)
    refusal = padding_free_refusal(getattr(config, "model_type", "") or "", trust_remote_code, attention)
    if refusal and packing is True:
        raise ConfigError(f"data.packing: true, but {refusal}; set data.packing: false (or auto)")
    if refusal:
        return False, refusal
    if packing is True:
        return True, "data.packing: true"
    if str(attention).startswith("flash_attention"):  # variable-length kernels: no work across examples
        return True, f"{attention} attends within each example"
    shape = ComputeShape.of(config)
    if shape is None or not lengths:
        return True, "the model's shape or the lengths are unknown"
    counts = sorted(collections.Counter(lengths).items())
    ratio = packed_over_padded_flops(shape, batch, sum(lengths) / len(lengths), mean_longest_of(counts, batch))
    return ratio < 1, f"a packed micro batch computes {ratio:.2f}x a padded one"


def to_dataset(split: TokenizedSplit) -> Any:
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": split.input_ids, "labels": split.labels})


class _StopFlag:
    """Set by SIGTERM/SIGINT during training; the Trainer callback saves and stops at the step's end."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self.training = False

    def handler(self, signum: int, _frame: Any) -> None:
        if self.training:
            if self.signum is None:
                log(f"{signal.Signals(signum).name}: saving a checkpoint at the end of this step, then stopping")
            self.signum = signum
        elif self.signum is None:
            raise Stopped(signum)
        # else: already stopped and on the way out (the elastic agent passes a TERM on to a rank
        # that stopped with the others): the checkpoint is saved; nothing to interrupt.


def make_callbacks(run: RunDir, cfg: JobConfig, stop: _StopFlag, plan: DevicePlan, ranks: Ranks,
                   uploader: Optional[StoreUploader] = None) -> list:
    import torch
    from transformers import TrainerCallback

    class RunnerCallback(TrainerCallback):
        """metrics.jsonl, status.json, progress lines, checkpoint finalizing, stop on signal."""

        def __init__(self) -> None:
            self.last_time = time.time()
            self.last_tokens = 0
            self.print_every = 1

        def on_train_begin(self, args, state, control, **kwargs):
            self.last_time, self.last_tokens = time.time(), state.num_input_tokens_seen
            self.print_every = max(1, state.max_steps // 25)
            run.set_status("training", step=state.global_step, total_steps=state.max_steps)

        def on_step_end(self, args, state, control, **kwargs):
            if ranks.world > 1:
                # All ranks stop at the same step, whichever got the signal: the checkpoint is
                # written by all of them, and a rank that went on alone would wait for the rest forever.
                stop.signum = all_ranks_max([stop.signum or 0], args.device)[0] or None
            if stop.signum is not None or state.global_step >= state.max_steps:
                control.should_save = True  # the last step, and a preempted one, always leave a checkpoint
            if stop.signum is not None:
                control.should_training_stop = True
            return control

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            now = time.time()
            if "loss" in logs:
                tokens = state.num_input_tokens_seen - self.last_tokens
                record = {
                    "event": "train",
                    "step": state.global_step,
                    "epoch": round(state.epoch or 0.0, 4),
                    "loss": logs["loss"],
                    "lr": logs.get("learning_rate"),
                    "grad_norm": logs.get("grad_norm"),
                    "tokens_per_s": round(tokens / max(now - self.last_time, 1e-9), 1),
                    "gpu_mem_gb": round(torch.cuda.max_memory_allocated() / 1e9, 3) if plan.device == "cuda" else None,
                    # what the caching allocator holds: the tensors' peak plus its free blocks, the figure an OOM meets
                    "gpu_reserved_gb": round(torch.cuda.max_memory_reserved() / 1e9, 3) if plan.device == "cuda" else None,
                    "time": now,
                }
                run.append_metric(record)
                self.last_time, self.last_tokens = now, state.num_input_tokens_seen
                run.set_status("training", step=state.global_step, total_steps=state.max_steps)
                if state.global_step % self.print_every == 0 or state.global_step == state.max_steps:
                    log(f"step {state.global_step}/{state.max_steps}  loss {logs['loss']:.4f}  "
                        f"lr {logs.get('learning_rate', 0):.2e}  {record['tokens_per_s']:.0f} tok/s")
            if "eval_loss" in logs:
                run.append_metric({"event": "eval", "step": state.global_step, "eval_loss": logs["eval_loss"], "time": now})
                log(f"step {state.global_step}/{state.max_steps}  eval loss {logs['eval_loss']:.4f}")

        def on_save(self, args, state, control, **kwargs):
            if ranks.world > 1:
                all_ranks_max([0], args.device)  # every rank has written its part (rng_state_<rank>.pth)
            if ranks.is_local_main:
                dst = finalize_checkpoint(run, state.global_step, cfg.train.keep_checkpoints)
                run.append_metric({"event": "checkpoint", "step": state.global_step,
                                   "path": str(dst.relative_to(run.root))})
                log(f"checkpoint {dst.name} saved")
                if uploader is not None:
                    uploader.submit(state.global_step, dst)
            if ranks.world > 1:
                all_ranks_max([0], args.device)  # and none goes on (or exits, after a stop) before it is sealed

    return [RunnerCallback()]


def training_arguments(run: RunDir, cfg: JobConfig, plan: DevicePlan, has_validation: bool, ranks: Ranks) -> Any:
    from transformers import TrainingArguments

    t = cfg.train
    optimizer = t.optimizer
    if optimizer == "auto":
        # Paged 8-bit AdamW is the QLoRA paper's memory saver; it needs CUDA.
        optimizer = "paged_adamw_8bit" if plan.device == "cuda" else "adamw_torch"
    return TrainingArguments(
        output_dir=str(run.incoming),
        per_device_train_batch_size=t.micro_batch_size,
        per_device_eval_batch_size=cfg.eval.batch_size or t.micro_batch_size,
        gradient_accumulation_steps=per_rank_grad_accum(t.grad_accum, ranks.world),
        learning_rate=t.lr,
        lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        optim=optimizer,
        bf16=plan.dtype_name == "bfloat16",
        fp16=plan.dtype_name == "float16",
        use_cpu=plan.device == "cpu",
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=1,
        save_strategy="steps",
        save_steps=t.save_every,
        save_total_limit=None,  # we rotate ourselves, after a new checkpoint is complete
        eval_strategy="steps" if has_validation else "no",
        eval_steps=t.eval_every,
        seed=t.seed,
        data_seed=t.seed,
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        label_names=["labels"],
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        dataloader_pin_memory=plan.device == "cuda",
        ddp_find_unused_parameters=False,  # every LoRA weight takes part in every forward pass
        # Several nodes have a disk each (SkyPilot's): each writes the whole checkpoint, with its ranks'
        # RNG states, so each can resume from its own. On one node this changes nothing.
        save_on_each_node=ranks.nodes > 1,
    )


# ---------------------------------------------------------------------------------------------
# Evaluation and samples
# ---------------------------------------------------------------------------------------------


def evaluate_loss(model: Any, split: TokenizedSplit, batch_size: int, pad_id: int,
                  ranks: Optional[Ranks] = None) -> dict[str, float]:
    """Token-weighted mean cross-entropy over the answer tokens of a split, and its perplexity.
    With several ranks, each scores every world-th batch and the sums are added up (every rank
    must call this): the batches, and so their padding, are those of one process."""
    import torch

    ranks = ranks or Ranks()
    model.eval()
    total_loss, total_tokens = 0.0, 0
    device = next(p.device for p in model.parameters())
    with torch.no_grad():
        for index, start in enumerate(range(0, len(split.input_ids), batch_size)):
            if index % ranks.world != ranks.rank:
                continue
            features = [{"input_ids": i, "labels": l} for i, l in
                        zip(split.input_ids[start : start + batch_size], split.labels[start : start + batch_size])]
            batch = {k: v.to(device) for k, v in collate(features, pad_id).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            shift_logits, shift_labels = logits[:, :-1], batch["labels"][:, 1:]
            loss = torch.nn.functional.cross_entropy(
                shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), ignore_index=-100, reduction="sum"
            )
            total_loss += loss.item()
            total_tokens += int((shift_labels != -100).sum())
    if ranks.world > 1:
        import torch.distributed as dist

        sums = torch.tensor([total_loss, float(total_tokens)], dtype=torch.float64, device=device)
        dist.all_reduce(sums)
        total_loss, total_tokens = sums[0].item(), int(sums[1].item())
    mean = total_loss / max(total_tokens, 1)
    return {"loss": mean, "perplexity": math.exp(mean) if mean < 50 else None, "tokens": total_tokens}


def generate(model: Any, tokenizer: Any, example: Example, max_new_tokens: int) -> str:
    import torch

    ids, _ = encode_segments(tokenizer, example.prompt, adds_bos(tokenizer))
    device = next(p.device for p in model.parameters())
    inputs = torch.tensor([ids], device=device)
    with torch.no_grad():
        out = model.generate(
            input_ids=inputs,
            attention_mask=torch.ones_like(inputs),
            max_new_tokens=max_new_tokens,
            do_sample=False,  # greedy: the same prompt gives the same text before and after
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    return tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True).strip()


def write_samples(model: Any, tokenizer: Any, examples: list[Example], cfg: EvalSection, path: Path) -> list[dict]:
    """Generations for held-out prompts with the adapter off (the base model) and on."""
    model.eval()
    model.config.use_cache = True
    samples = []
    for example in examples[: cfg.samples]:
        with model.disable_adapter():
            before = generate(model, tokenizer, example, cfg.max_new_tokens)
        after = generate(model, tokenizer, example, cfg.max_new_tokens)
        prompt = "".join(s.text for s in example.prompt)
        samples.append({"prompt": prompt, "reference": example.reference, "before": before, "after": after})
    write_text_atomic(path, "".join(json.dumps(s) + "\n" for s in samples))
    return samples


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def check_dependencies() -> None:
    missing = []
    for name in ("torch", "transformers", "peft", "datasets", "accelerate"):
        try:
            __import__(name)
        except Exception as e:  # a broken install raises more than ImportError
            missing.append(f"{name} ({type(e).__name__}: {e})")
    if missing:
        raise EnvironmentProblem(f"cannot import {', '.join(missing)}; pip install -r runner/requirements.txt")


def quiet_libraries() -> None:
    """Library chatter (progress bars, deprecation notes) would bury our progress lines."""
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch.utils.checkpoint")
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()


def run_job(config_path: Path, run: RunDir, resume: str, stop: _StopFlag, ranks: Optional[Ranks] = None) -> int:
    ranks = ranks or Ranks()
    started = time.time()
    cfg = load_config(config_path)
    run.config = cfg
    run.set_status("loading", step=0, total_steps=None, error=None, exit_code=None)
    check_dependencies()
    quiet_libraries()

    store = open_store(cfg, run)
    if store is not None and resume == "never" and ranks.is_main and store.complete_steps():
        raise UsageError(f"{store.url} already holds checkpoints of a run of this name; continue it with "
                         f"--resume auto, or give the new run another name ({RUN_ID_ENV}, or another --out)")
    resume_from = None
    if resume != "never":
        if ranks.is_local_main:  # the other ranks only read; they take complete checkpoints only
            discard_partial_checkpoints(run)
        if resume == "auto" and store is not None and ranks.world == 1:  # ranks: fetched before they start
            fetch_from_store(store, run)
        if resume == "auto":
            found = complete_checkpoints(run.checkpoints)
            resume_from = found[-1][1] if found else None
            if resume_from is None:
                log("--resume auto: no complete checkpoint yet, starting from the beginning")
        else:
            resume_from = Path(resume).resolve()
            if not checkpoint_is_complete(resume_from):
                raise UsageError(f"--resume {resume}: not a complete checkpoint (no valid {MANIFEST})")
    resume_step = int(CHECKPOINT_RE.match(resume_from.name).group(1)) if resume_from is not None else 0
    if resume_from is not None:
        run.restore_history(resume_from, resume_step)
        run.append_metric({"event": "resume", "step": resume_step})
        log(f"resuming from {resume_from.name}")

    import torch
    from transformers import PrinterCallback, Trainer, set_seed

    set_seed(cfg.train.seed)
    plan = plan_device(cfg.train, ranks)
    log(f"device {plan.gpu_name or 'cpu'}, compute dtype {plan.dtype_name}, quantization {cfg.model.quantization}")
    base, _ = resolve_local(cfg.model.base, config_path.parent)
    tokenizer = load_tokenizer(base, cfg.model)

    data = prepare_data(cfg, config_path.parent, tokenizer)
    # Tokens per training sequence (non-padding): the launcher calibrates later estimates with it.
    run.set_status("loading", train_seq_tokens=round(data.train.tokens / max(1, len(data.train.input_ids)), 1))
    log(f"data: {data.total_examples} examples -> train {len(data.train.input_ids)} sequences "
        f"({data.train.tokens} tokens, {data.train.trained_tokens} trained), "
        f"validation {len(data.validation.input_ids) if data.validation else 0}, test {len(data.test.input_ids) if data.test else 0}")

    args = training_arguments(run, cfg, plan, data.validation is not None, ranks)
    if ranks.world > 1:
        start_data_parallel(args, cfg.train, ranks, resume_step)

    log(f"loading {cfg.model.base}")
    model = load_model(base, cfg, plan)
    kernels = apply_kernels(model, cfg, plan)
    args.use_liger_kernel = kernels == "liger"  # transformers applies Liger's kernels as training starts
    padding_free, why = choose_padding_free(cfg.data.packing, model, cfg.model.trust_remote_code,
                                            [len(ids) for ids in data.train.input_ids], cfg.train.micro_batch_size)
    if padding_free:  # no attention mask to count by, and no padding to leave out of the count
        args.include_num_input_tokens_seen = "all"
    log(f"kernels: {KERNEL_WORDS[kernels]}; batches: {'padding-free' if padding_free else 'padded'} ({why})")
    model = attach_lora(model, cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"LoRA r={cfg.lora.r} on {cfg.lora.target_modules}: {trainable:,} trainable parameters")

    eval_batch = cfg.eval.batch_size or cfg.train.micro_batch_size
    base_eval = None
    if data.test is not None:
        if run.base_eval_path.exists():
            base_eval = json.loads(run.base_eval_path.read_text())
        if ranks.world > 1 and all_ranks_max([base_eval is None], args.device)[0]:
            base_eval = None  # a node without the file: the ranks all score it together
        if base_eval is None:
            run.set_status("evaluating")
            with model.disable_adapter():
                base_eval = evaluate_loss(model, data.test, eval_batch, tokenizer.pad_token_id, ranks)
            if ranks.is_main:
                write_json_atomic(run.base_eval_path, base_eval)
            run.append_metric({"event": "base_eval", "test_loss": base_eval["loss"]})
        log(f"base model test loss {base_eval['loss']:.4f}")

    # Only rank 0 uploads; the other ranks' checkpoints are on their own disks.
    uploader = StoreUploader(store, run, cfg.storage.keep) if store is not None and ranks.is_main else None
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=to_dataset(data.train),
        eval_dataset=to_dataset(data.validation) if data.validation else None,
        data_collator=(collate_padding_free if padding_free else
                       lambda f: collate(f, tokenizer.pad_token_id, 8 if plan.device == "cuda" else 1)),
        callbacks=make_callbacks(run, cfg, stop, plan, ranks, uploader),
    )
    trainer.remove_callback(PrinterCallback)  # our callback prints (and records) progress
    stop.training = True
    try:
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except BaseException:
        if uploader is not None:  # out of memory, say: what was saved before still goes to the store
            uploader.close(STORE_STOP_FLUSH_S)
        raise
    finally:
        stop.training = False
    if uploader is not None and stop.signum is not None:  # a preempted machine: the last checkpoint first
        uploader.close(STORE_STOP_FLUSH_S)
    if stop.signum is not None:
        code = EXIT_PREEMPTED if stop.signum == signal.SIGTERM else EXIT_INTERRUPTED
        step = trainer.state.global_step
        run.set_status("preempted", step=step, exit_code=code,
                       error=f"stopped by {signal.Signals(stop.signum).name} at step {step}; resume with --resume auto")
        log(f"stopped at step {step}; checkpoint-{step} saved; continue with --resume auto")
        if store is not None and ranks.is_main:
            upload_quietly(store, run, ("metrics.jsonl", "status.json"))
        return code

    if ranks.world > 1:
        # Every rank's Trainer lists .incoming as train() ends (transformers' sort_checkpoints):
        # removed under a rank still returning, it killed that rank (FileNotFoundError) and with
        # it the run, at random.
        all_ranks_max([0], args.device)
    if ranks.is_local_main and run.incoming.exists():
        shutil.rmtree(run.incoming)
    run.set_status("saving", step=trainer.state.global_step)
    if ranks.is_main:
        tmp = run.root / ".adapter.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(run.adapter, ignore_errors=True)
        os.replace(tmp, run.adapter)
        log(f"adapter saved to {run.adapter}")

    run.set_status("evaluating")
    report: dict[str, Any] = {"train_steps": trainer.state.global_step, "train_loss": result.training_loss}
    if data.test is not None:
        final = evaluate_loss(model, data.test, eval_batch, tokenizer.pad_token_id, ranks)
        if not ranks.is_main:
            return EXIT_OK  # rank 0 writes the samples and the report
        report.update(test_loss=final["loss"], test_perplexity=final["perplexity"], test_tokens=final["tokens"],
                      test_examples=len(data.test.input_ids), base_test_loss=base_eval["loss"],
                      base_test_perplexity=base_eval["perplexity"])
        run.append_metric({"event": "test", "test_loss": final["loss"], "base_test_loss": base_eval["loss"]})
        log(f"test loss {base_eval['loss']:.4f} (base) -> {final['loss']:.4f} (fine-tuned)")
        if cfg.eval.samples:
            samples = write_samples(model, tokenizer, data.test.examples, cfg.eval, run.samples_path)
            for s in samples[:2]:
                log(f"sample: {s['prompt']!r}\n    before: {s['before'][:120]!r}\n    after:  {s['after'][:120]!r}")
    else:
        report["test_loss"] = None
        report["note"] = "no test split (data.splits.test is 0 and no data.test_path)"
    if not ranks.is_main:
        return EXIT_OK
    if plan.device == "cuda":
        report["peak_gpu_mem_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 3)
        report["peak_gpu_reserved_gb"] = round(torch.cuda.max_memory_reserved() / 1e9, 3)
    report["runtime_s"] = round(time.time() - started, 1)
    write_json_atomic(run.eval_path, report)
    run.append_metric({"event": "done", "step": trainer.state.global_step})
    if uploader is not None:
        run.set_status("uploading")
        uploader.close(STORE_DONE_FLUSH_S)
        upload_quietly(store, run, None)
    run.set_status("done", step=trainer.state.global_step, exit_code=EXIT_OK)
    if store is not None:
        upload_quietly(store, run, ("status.json",))
    log("done")
    return EXIT_OK


def upload_quietly(store: CheckpointStore, run: RunDir, names: Optional[tuple[str, ...]]) -> None:
    """The run's files to the store (`names`, or every result): a failure is logged, not raised,
    since the files are also in DIR, where the launcher fetches them."""
    try:
        if names is None:
            store.upload_results(run)
            log(f"storage: adapter and results uploaded to {store.url}")
        else:
            for name in names:
                if (run.root / name).is_file():
                    store.upload_file(run.root / name, name)
    except Exception as e:  # noqa: BLE001
        log(f"storage: uploading the results failed ({store_error_text(e)}); they are in {run.root}")


def start_data_parallel(args: Any, train: TrainSection, ranks: Ranks, resume_step: int) -> None:
    """Join the ranks (the Trainer's arguments start torch.distributed), check they resume from the
    same step, and say once how the batch is split."""
    high, neg_low = all_ranks_max([resume_step, -resume_step], args.device)  # args.device: joins the group
    if high != -neg_low:
        raise EnvironmentProblem(
            f"the ranks found different newest checkpoints (steps {-neg_low} to {high}); every node needs "
            "the same checkpoints/ in its run folder: copy the newest complete one to each node, then --resume auto"
        )
    accum = args.gradient_accumulation_steps
    global_batch = train.micro_batch_size * accum * ranks.world
    planned = train.micro_batch_size * train.grad_accum
    note = "" if global_batch == planned else (
        f", not the planned {planned} (train.micro_batch_size x train.grad_accum): {ranks.world} ranks do not divide "
        f"train.grad_accum {train.grad_accum}, so each accumulates the nearest whole number")
    log(f"data parallel: {ranks.world} ranks on {ranks.nodes} node(s), each micro_batch_size {train.micro_batch_size} "
        f"x grad_accum {accum}: global batch {global_batch}{note}")


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="QLoRA fine-tuning runner (see the module docstring).")
    parser.add_argument("--config", required=True, type=Path, help="job YAML")
    parser.add_argument("--out", required=True, type=Path, help="run directory (created if missing)")
    parser.add_argument("--resume", default="never",
                        help="auto: continue from DIR's newest complete checkpoint (or start fresh if none); "
                             "never (default); or a checkpoint folder")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [ACCELERATE_LAUNCH]:
        return accelerate_launch(argv[1:])
    if argv[:1] == [STORE_WORKER]:
        return store_worker(argv[1:])
    args = parse_args(argv)
    ranks = Ranks.from_env()
    run = RunDir(args.out.resolve(), writes=ranks.is_main)
    run.root.mkdir(parents=True, exist_ok=True)
    log_file = run.log_path.open("a", buffering=1)
    if ranks.is_main:
        sys.stdout, sys.stderr = Tee(sys.__stdout__, log_file), Tee(sys.__stderr__, log_file)
    else:
        # Rank 0 says everything once; the others keep to their warnings and errors, marked.
        sys.stdout = open(os.devnull, "w")
        sys.stderr = Prefixed(Tee(sys.__stderr__, log_file), f"[rank {ranks.rank}] ")
    if ranks.world > 1:
        die_with_parent()
    stop = _StopFlag()
    signal.signal(signal.SIGTERM, stop.handler)
    signal.signal(signal.SIGINT, stop.handler)
    # An existing run is left exactly as it is: refusing must not overwrite its status.
    previous = run.read_status()
    if args.resume == "never" and (previous.get("phase") == "done" or complete_checkpoints(run.checkpoints)):
        if ranks.is_main:  # every rank refuses; one says why
            print(f"qlora_runner: usage error: {run.root} already holds a run; continue it with --resume auto, "
                  "or pick a new --out", file=sys.stderr, flush=True)
        return EXIT_USAGE
    if args.resume != "never" and previous.get("phase") == "done":
        log(f"{run.root} is already done; nothing to resume")
        return EXIT_OK
    code = EXIT_INTERNAL
    try:
        code = run_job(args.config.resolve(), run, args.resume, stop, ranks)
    except Stopped as e:
        code = EXIT_PREEMPTED if e.signum == signal.SIGTERM else EXIT_INTERRUPTED
        run.set_status("preempted", exit_code=code, error=f"stopped by {e} before training; rerun with --resume auto")
        log(f"stopped by {e} before training started; nothing to checkpoint")
    except RunnerError as e:
        code = e.exit_code
        _fail(run, code, f"{e.kind}: {e}", args.debug)
    except Exception as e:  # noqa: BLE001  (the last line of defence: classify, record, one line)
        if is_oom(e):
            code = EXIT_OOM
            _fail(run, code, oom_message(e, run), args.debug)
        elif is_disk_full(e, run.root):
            code = EXIT_ENVIRONMENT
            shutil.rmtree(run.incoming, ignore_errors=True)  # the partial save: space for the status
            _fail(run, code, disk_full_message(run), args.debug)
        else:
            code = EXIT_INTERNAL
            _fail(run, code, f"internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", args.debug)
    finally:
        sys.stdout.flush()
    return code


def oom_message(e: BaseException, run: RunDir) -> str:
    """One line: where it ran out, what it tried to allocate, and the knobs that lower the need."""
    detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    detail = detail.split("DefaultCPUAllocator: ")[-1].split(". Error code")[0]  # drop the allocator's preamble
    step = run.read_status().get("step", 0)
    cfg = run.config
    now = ""
    if cfg is not None:
        gc = "on" if cfg.train.gradient_checkpointing else "off"
        now = (f" (now micro_batch_size {cfg.train.micro_batch_size}, max_length {cfg.data.max_length}, "
               f"gradient_checkpointing {gc})")
    return (f"out of memory at step {step}: {detail[:200]}; lower train.micro_batch_size or data.max_length, "
            f"turn on train.gradient_checkpointing, or use a GPU with more memory{now}")


def _fail(run: RunDir, code: int, message: str, debug: bool) -> None:
    if not run.writes and code in (EXIT_USAGE, EXIT_CONFIG, EXIT_DATA):
        return  # the same on every rank: rank 0 tells it once
    if debug:
        traceback.print_exc()
    try:
        run.set_status("failed", exit_code=code, error=message)
    except OSError:
        pass
    print(f"qlora_runner: {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
