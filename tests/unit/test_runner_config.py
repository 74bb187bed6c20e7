"""Config schema of runner/qlora_runner.py: `from_dict` / `load_config` and the ConfigError messages.

Every error test checks three things: the exception is a ConfigError, its exit code is 3, and the
message names the exact key path (plus the file, for errors raised by load_config)."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import load_runner_module
import yaml

ROOT = Path(__file__).resolve().parents[2]
RUNNER_PATH = ROOT / "runner" / "qlora_runner.py"
EXAMPLE_CONFIG = ROOT / "configs" / "tiny-cpu.yaml"


runner = load_runner_module()

# The smallest valid job: only the two required values.
MINIMAL = {"model": {"base": "org/some-model"}, "data": {"path": "data.jsonl"}}


def job(**sections) -> dict:
    """MINIMAL with the given sections merged in (one level deep); a value of None drops the section."""
    config = copy.deepcopy(MINIMAL)
    for name, values in sections.items():
        if values is None:
            config.pop(name, None)
        elif isinstance(values, dict):
            config.setdefault(name, {}).update(values)
        else:
            config[name] = values
    return config


def write_config(tmp_path: Path, config, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    if isinstance(config, str):
        path.write_text(config)
    else:
        path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def config_error(tmp_path: Path, config) -> str:
    """Load `config` (a dict or YAML text) through load_config; return the ConfigError message."""
    path = write_config(tmp_path, config)
    with pytest.raises(runner.ConfigError) as excinfo:
        runner.load_config(path)
    err = excinfo.value
    assert err.exit_code == 3 == runner.EXIT_CONFIG
    message = str(err)
    assert str(path) in message, "load_config errors name the file"
    return message


# ---------------------------------------------------------------------------------------------
# Positive cases
# ---------------------------------------------------------------------------------------------


def test_example_config_loads():
    cfg = runner.load_config(EXAMPLE_CONFIG)
    assert isinstance(cfg, runner.JobConfig)
    assert cfg.model.base == "tiny/model"
    assert cfg.data.path == "tiny/data/animals.jsonl"
    assert cfg.data.format == "instruction"
    assert isinstance(cfg.data.splits, runner.SplitsSection)
    assert abs(cfg.data.splits.train + cfg.data.splits.validation + cfg.data.splits.test - 1.0) < 1e-6
    assert isinstance(cfg.train, runner.TrainSection) and cfg.train.lr > 0
    assert isinstance(cfg.train.lr, float) and isinstance(cfg.train.epochs, float)
    assert isinstance(cfg.lora, runner.LoraSection) and isinstance(cfg.eval, runner.EvalSection)
    assert isinstance(cfg.resources, dict) and isinstance(cfg.storage, runner.StorageSection)


def test_minimal_config_gets_defaults(tmp_path):
    cfg = runner.load_config(write_config(tmp_path, MINIMAL))
    assert cfg.model.base == "org/some-model" and cfg.model.quantization == "nf4"
    assert cfg.data.format == "instruction" and cfg.data.max_length == 1024
    assert (cfg.data.splits.train, cfg.data.splits.validation, cfg.data.splits.test) == (0.9, 0.05, 0.05)
    assert cfg.train.lr == 2.0e-4 and cfg.lora.target_modules == "all-linear"
    assert cfg.resources is None and cfg.storage == runner.StorageSection() and not cfg.storage.enabled


def test_lr_written_as_2e_4_is_a_float(tmp_path):
    # PyYAML (YAML 1.1) reads 2e-4 without a dot as the string "2e-4".
    text = "model: {base: m}\ndata: {path: d.jsonl}\ntrain:\n  lr: 2e-4\n"
    assert yaml.safe_load(text)["train"]["lr"] == "2e-4"
    cfg = runner.load_config(write_config(tmp_path, text))
    assert type(cfg.train.lr) is float
    assert cfg.train.lr == 2e-4


def test_ints_widen_to_floats(tmp_path):
    text = (
        "model: {base: m}\ndata:\n  path: d.jsonl\n  splits: {train: 1, validation: 0, test: 0}\n"
        "lora: {alpha: 32}\ntrain: {epochs: 2, lr: 1, max_grad_norm: 3}\n"
    )
    cfg = runner.load_config(write_config(tmp_path, text))
    for value, expected in [
        (cfg.train.epochs, 2.0),
        (cfg.train.lr, 1.0),
        (cfg.train.max_grad_norm, 3.0),
        (cfg.lora.alpha, 32.0),
        (cfg.data.splits.train, 1.0),
        (cfg.data.splits.validation, 0.0),
    ]:
        assert type(value) is float and value == expected


def test_integral_float_accepted_for_int(tmp_path):
    cfg = runner.load_config(write_config(tmp_path, job(train={"micro_batch_size": 4.0})))
    assert cfg.train.micro_batch_size == 4 and type(cfg.train.micro_batch_size) is int


@pytest.mark.parametrize("modules", ["q_proj", ["q_proj", "v_proj"], "all-linear"])
def test_target_modules_accepts_string_or_list(tmp_path, modules):
    cfg = runner.load_config(write_config(tmp_path, job(lora={"target_modules": modules})))
    assert cfg.lora.target_modules == modules
    assert type(cfg.lora.target_modules) is type(modules)


def test_resources_pass_through(tmp_path):
    resources = {"gpu": "A100", "providers": ["runpod", "local"], "max_price": 1.5}
    cfg = runner.load_config(write_config(tmp_path, job(resources=resources)))
    assert cfg.resources == resources and isinstance(cfg.resources, dict)


def test_storage_is_read_by_the_runner(tmp_path):
    # The runner uploads checkpoints itself, so it reads (and checks) the storage section.
    storage = {"kind": "s3", "bucket": "my-ckpts", "endpoint_url": "https://acct.r2.cloudflarestorage.com",
               "region": "auto", "keep": 2, "access_key_env": "R2_KEY", "secret_key_env": "R2_SECRET"}
    cfg = runner.load_config(write_config(tmp_path, job(storage=storage)))
    assert cfg.storage.enabled and (cfg.storage.bucket, cfg.storage.keep, cfg.storage.prefix) == ("my-ckpts", 2, "qlora-launch")


@pytest.mark.parametrize("storage, message", [
    ({"kind": "s3"}, "storage.bucket: must be set for kind: s3"),
    ({"kind": "s3", "bucket": "s3://my-ckpts"}, "storage.bucket: 's3://my-ckpts' is not a bucket name"),
    ({"kind": "s3", "bucket": "b1x", "endpoint_url": "r2.example.com"}, "storage.endpoint_url: must start with https://"),
    ({"kind": "s3", "bucket": "b1x", "access_key_env": "KEY"}, "storage.access_key_env: set both access_key_env and"),
    ({"kind": "s3", "bucket": "b1x", "access_key_env": "AKIA+2/xyz", "secret_key_env": "S"},
     "storage.access_key_env: must be the NAME of an environment variable"),
    ({"kind": "s3", "bucket": "b1x", "keep": 0}, "storage.keep: must be >= 1, got 0"),
    ({"kind": "s3", "bucket": "b1x", "buckets": "x"}, "storage.buckets: unknown key; did you mean 'bucket'?"),
])
def test_bad_storage_names_the_key(tmp_path, storage, message):
    with pytest.raises(runner.ConfigError, match=re.escape(message)):
        runner.load_config(write_config(tmp_path, job(storage=storage)))


def test_from_dict_builds_sections_directly():
    data = runner.from_dict(runner.DataSection, {"path": "x.jsonl", "splits": {"train": 0.5, "validation": 0.25, "test": 0.25}}, "data")
    assert isinstance(data.splits, runner.SplitsSection) and data.splits.test == 0.25


# ---------------------------------------------------------------------------------------------
# Unknown keys
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "section, key, suggestion",
    [
        ("train", "warmup_ration", "warmup_ratio"),
        ("train", "epoch", "epochs"),
        ("data", "max_len", "max_length"),
        ("model", "quantisation", "quantization"),
        ("lora", "target_module", "target_modules"),
    ],
)
def test_unknown_key_suggests_closest(tmp_path, section, key, suggestion):
    message = config_error(tmp_path, job(**{section: {key: 1}}))
    assert f"{section}.{key}: unknown key" in message
    assert f"did you mean {suggestion!r}?" in message


def test_unknown_key_learning_rate_suggests_lr(tmp_path):
    message = config_error(tmp_path, job(train={"learning_rate": 1e-4}))
    assert "train.learning_rate: unknown key" in message
    assert "valid keys here:" in message and "lr" in message.split("valid keys here:")[1]
    # The one key a user means by learning_rate is lr; the message must say so.
    assert "did you mean 'lr'?" in message, message


def test_unknown_top_level_section(tmp_path):
    message = config_error(tmp_path, job(trian={"lr": 1e-4}))
    assert "trian: unknown key" in message
    assert "did you mean 'train'?" in message


def test_unknown_key_in_nested_splits(tmp_path):
    message = config_error(tmp_path, job(data={"splits": {"train": 0.9, "valid": 0.1}}))
    assert "data.splits.valid: unknown key" in message
    assert "did you mean 'validation'?" in message


# ---------------------------------------------------------------------------------------------
# Types
# ---------------------------------------------------------------------------------------------


def test_wrong_type_string_for_int(tmp_path):
    message = config_error(tmp_path, job(train={"micro_batch_size": "two"}))
    assert "train.micro_batch_size: expected an integer, got 'two' (str)" in message


@pytest.mark.parametrize(
    "section, key",
    [("train", "micro_batch_size"), ("data", "max_length"), ("lora", "r"), ("train", "seed")],
)
def test_bool_is_not_an_int(tmp_path, section, key):
    message = config_error(tmp_path, job(**{section: {key: True}}))
    assert f"{section}.{key}: expected an integer, got True (bool)" in message


def test_bool_is_not_a_number(tmp_path):
    message = config_error(tmp_path, job(train={"lr": True}))
    assert "train.lr: expected a number, got True (bool)" in message


def test_bool_for_optional_int(tmp_path):
    message = config_error(tmp_path, job(train={"max_steps": False}))
    assert "train.max_steps: expected an integer or null" in message


def test_non_integral_float_for_int(tmp_path):
    message = config_error(tmp_path, job(train={"grad_accum": 2.5}))
    assert "train.grad_accum: expected an integer, got 2.5 (float)" in message


def test_string_for_bool(tmp_path):
    message = config_error(tmp_path, job(data={"packing": "yes"}))
    assert "data.packing: expected true or false" in message


def test_target_modules_wrong_type_and_empty(tmp_path):
    message = config_error(tmp_path, job(lora={"target_modules": 3}))
    assert "lora.target_modules: expected a string or a list" in message
    message = config_error(tmp_path, job(lora={"target_modules": []}))
    assert "lora.target_modules: must name at least one module" in message


def test_section_that_is_not_a_mapping(tmp_path):
    message = config_error(tmp_path, job(train=["lr", 1]))
    assert "train: expected a mapping of keys to values" in message


# ---------------------------------------------------------------------------------------------
# Required values
# ---------------------------------------------------------------------------------------------


def test_missing_model_base(tmp_path):
    config = job()
    config["model"] = {"quantization": "nf4"}
    message = config_error(tmp_path, config)
    assert "model.base: required key is missing" in message


def test_null_model_base(tmp_path):
    message = config_error(tmp_path, job(model={"base": None}))
    assert "model.base: must be set" in message and "got null" in message


def test_empty_model_base(tmp_path):
    message = config_error(tmp_path, job(model={"base": "  "}))
    assert "model.base: must not be empty" in message


def test_missing_data_path(tmp_path):
    config = job()
    config["data"] = {"format": "completion"}
    message = config_error(tmp_path, config)
    assert "data.path: required key is missing" in message


def test_null_data_path(tmp_path):
    message = config_error(tmp_path, job(data={"path": None}))
    assert "data.path: must be set" in message


def test_config_without_model_section(tmp_path):
    message = config_error(tmp_path, job(model=None))
    assert "model: required key is missing" in message


# ---------------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------------


def test_splits_must_add_up_to_one(tmp_path):
    message = config_error(tmp_path, job(data={"splits": {"train": 0.8, "validation": 0.1, "test": 0.2}}))
    assert "data.splits.train: train + validation + test must add up to 1, got 1.1" in message


def test_splits_default_fractions_count_when_only_train_given(tmp_path):
    # validation and test default to 0.05 each, so train 0.5 sums to 0.6.
    message = config_error(tmp_path, job(data={"splits": {"train": 0.5}}))
    assert "data.splits.train: train + validation + test must add up to 1, got 0.6" in message


def test_negative_split_fraction(tmp_path):
    message = config_error(tmp_path, job(data={"splits": {"train": 1.0, "validation": -0.1, "test": 0.1}}))
    assert "data.splits.validation: must be a fraction between 0 and 1, got -0.1" in message


def test_train_fraction_zero(tmp_path):
    message = config_error(tmp_path, job(data={"splits": {"train": 0, "validation": 0.5, "test": 0.5}}))
    assert "data.splits.train: must be > 0" in message


def test_float_rounding_in_splits_is_tolerated(tmp_path):
    # 0.7 + 0.2 + 0.1 is 0.9999999999999999 in floating point.
    cfg = runner.load_config(write_config(tmp_path, job(data={"splits": {"train": 0.7, "validation": 0.2, "test": 0.1}})))
    assert cfg.data.splits.train == 0.7


def test_bad_data_format(tmp_path):
    message = config_error(tmp_path, job(data={"format": "xml"}))
    assert "data.format: must be one of completion, instruction, chat, got 'xml'" in message


def test_bad_scheduler_with_suggestion(tmp_path):
    message = config_error(tmp_path, job(train={"scheduler": "cosin"}))
    assert "train.scheduler: must be one of cosine, linear, constant, constant_with_warmup, got 'cosin'" in message
    assert "did you mean 'cosine'?" in message


def test_bad_scheduler_without_suggestion(tmp_path):
    message = config_error(tmp_path, job(train={"scheduler": "polynomial"}))
    assert "train.scheduler: must be one of" in message and "'polynomial'" in message


@pytest.mark.parametrize("lr", [-1, 0, "0", -1e-4])
def test_lr_must_be_positive(tmp_path, lr):
    message = config_error(tmp_path, job(train={"lr": lr}))
    assert "train.lr: must be > 0, got" in message


def test_lr_message_shows_value(tmp_path):
    message = config_error(tmp_path, job(train={"lr": -1}))
    assert "train.lr: must be > 0, got -1.0" in message


@pytest.mark.parametrize("ratio", [1, 1.0, 1.5, -0.1])
def test_warmup_ratio_out_of_range(tmp_path, ratio):
    message = config_error(tmp_path, job(train={"warmup_ratio": ratio}))
    assert "train.warmup_ratio: must be in [0, 1)" in message


def test_prompt_template_needs_instruction_placeholder(tmp_path):
    message = config_error(tmp_path, job(data={"prompt_template": "Question: {question}\nAnswer: "}))
    assert "data.prompt_template: must contain the placeholder {instruction}" in message


def test_prompt_template_with_placeholder_is_accepted(tmp_path):
    template = "Q: {instruction}\nInput: {input}\nA: "
    cfg = runner.load_config(write_config(tmp_path, job(data={"prompt_template": template})))
    assert cfg.data.prompt_template == template


def test_max_length_minimum(tmp_path):
    message = config_error(tmp_path, job(data={"max_length": 4}))
    assert "data.max_length: must be >= 8 tokens, got 4" in message


def test_fp16_on_cpu_rejected(tmp_path):
    message = config_error(tmp_path, job(train={"device": "cpu", "precision": "fp16"}))
    assert "train.precision: must be auto or fp32 on the CPU" in message


@pytest.mark.parametrize("key, value", [("epochs", ".inf"), ("lr", ".inf")])
def test_non_finite_numbers_rejected(tmp_path, key, value):
    # YAML .inf is float('inf'): "epochs: .inf" passes "> 0" and crashes later in the Trainer
    # (math.ceil of infinity, exit code 1); "lr: .inf" trains on NaNs. Both are config errors.
    text = f"model: {{base: m}}\ndata: {{path: d.jsonl}}\ntrain:\n  {key}: {value}\n"
    message = config_error(tmp_path, text)
    assert f"train.{key}:" in message


# ---------------------------------------------------------------------------------------------
# The file itself
# ---------------------------------------------------------------------------------------------


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    text = "model:\n  base: m\ndata:\n  path: a: b\n"  # line 4: a second ': ' inside a plain value
    message = config_error(tmp_path, text)
    assert "not valid YAML at line 4" in message


def test_yaml_tab_indentation_names_line(tmp_path):
    text = "model:\n  base: m\n\tdata: 1\n"
    message = config_error(tmp_path, text)
    assert "not valid YAML at line 3" in message


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"])
def test_empty_config_file(tmp_path, text):
    message = config_error(tmp_path, text)
    assert "the config file is empty" in message


def test_config_file_that_is_a_list(tmp_path):
    message = config_error(tmp_path, "- model\n- data\n")
    assert "expected a mapping of keys to values" in message


def test_missing_config_file(tmp_path):
    path = tmp_path / "nope" / "job.yaml"
    with pytest.raises(runner.ConfigError) as excinfo:
        runner.load_config(path)
    assert excinfo.value.exit_code == 3
    message = str(excinfo.value)
    assert str(path) in message and "cannot read the config file" in message


def test_config_path_is_a_directory(tmp_path):
    with pytest.raises(runner.ConfigError) as excinfo:
        runner.load_config(tmp_path)
    assert excinfo.value.exit_code == 3
    assert str(tmp_path) in str(excinfo.value) and "cannot read the config file" in str(excinfo.value)


def test_config_file_not_utf8(tmp_path):
    # A config saved in another encoding must be a ConfigError naming the file (exit 3), not an
    # escaped UnicodeDecodeError that main() reports as an internal error (exit 1).
    path = tmp_path / "job.yaml"
    path.write_bytes(b"model:\n  base: caf\xe9\ndata:\n  path: d.jsonl\n")
    with pytest.raises(runner.ConfigError) as excinfo:
        runner.load_config(path)
    assert excinfo.value.exit_code == 3
    assert str(path) in str(excinfo.value)


def test_error_without_load_config_has_no_file_prefix():
    with pytest.raises(runner.ConfigError) as excinfo:
        runner.from_dict(runner.JobConfig, job(train={"lr": -1}))
    assert str(excinfo.value) == "train.lr: must be > 0, got -1.0"


# ---------------------------------------------------------------------------------------------
# Importing the runner stays light
# ---------------------------------------------------------------------------------------------


def test_import_is_stdlib_only(tmp_path):
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('qlora_runner', {str(RUNNER_PATH)!r})\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['qlora_runner'] = m\n"
        "spec.loader.exec_module(m)\n"
        "assert callable(m.load_config) and m.JobConfig\n"
        "heavy = ('torch', 'transformers', 'yaml', 'datasets', 'peft', 'bitsandbytes', 'accelerate', 'pyarrow')\n"
        "print('HEAVY=' + ','.join(n for n in heavy if n in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "HEAVY=\n" in result.stdout, result.stdout
