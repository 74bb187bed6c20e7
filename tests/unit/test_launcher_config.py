"""launcher/config.py, the SSH address parser, content hashing and planned steps."""

from __future__ import annotations

import pytest
import yaml

from launcher import config as launch_config
from launcher.preflight import planned_steps
from launcher.remote import SSHAddress
from launcher.sync import content_hash, local_assets, remote_config
from tests.helpers import ROOT, TINY_CONFIG, tiny_job


def test_flags_override_resources():
    cfg = launch_config.load(TINY_CONFIG, {"target": "ssh://me@box:2222", "usd_per_hour": 0.5, "python": None})
    assert (cfg.resources.target, cfg.resources.usd_per_hour, cfg.resources.python) == ("ssh://me@box:2222", 0.5, None)
    assert cfg.raw["resources"]["target"] == "ssh://me@box:2222"  # what travels to the target says the same
    assert cfg.job.train.max_steps is None and cfg.job.data.max_length == 64  # the runner's schema read the rest


@pytest.mark.parametrize("text, message", [
    ("train: {lr: -1}", "train.lr: must be > 0, got -1"),
    ("resources: {max_price: 0}", "resources.max_price: must be > 0.0, got 0"),
    ("resources: {gpuz: A10G}", "resources.gpuz: unknown key; did you mean 'gpu'?"),
    ("resources: {gpus: two}", "resources.gpus: input should be a valid integer"),
    ("storage: {kind: s4}", "storage.kind: must be one of local, s3, got 's4'"),
    ("resources: [a, b]", "resources: expected a mapping"),
])
def test_errors_name_the_file_and_key_path(tmp_path, text, message):
    path = tmp_path / "job.yaml"
    path.write_text(f"model: {{base: x/y}}\ndata: {{path: d.jsonl}}\n{text}\n")
    with pytest.raises(launch_config.ConfigError) as e:
        launch_config.load(path)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value)


def test_an_override_error_names_its_flag(tmp_path):
    with pytest.raises(launch_config.ConfigError, match=r"resources.gpus \(from --gpu NAME:N\): must be >= 1, got 0"):
        launch_config.load(TINY_CONFIG, {"gpus": 0})


@pytest.mark.parametrize("spec, expected", [
    ("ssh://me@box:2222", SSHAddress("box", "me", 2222)),
    ("me@box", SSHAddress("box", "me", None)),
    ("gpu-box", SSHAddress("gpu-box", None, None)),
    ("ssh://10.0.0.5", SSHAddress("10.0.0.5", None, None)),
])
def test_ssh_targets_parse(spec, expected):
    assert SSHAddress.parse(spec) == expected


@pytest.mark.parametrize("spec", ["ssh://me@box:notaport", "ssh://me@box/path", "ssh://"])
def test_malformed_ssh_targets_say_what_is_expected(spec):
    with pytest.raises(ValueError, match="ssh://user@host"):
        SSHAddress.parse(spec)


def test_content_hash_follows_content_not_time(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "a.bin").write_bytes(b"weights")
    first = content_hash(folder)
    (folder / "a.bin").write_bytes(b"weights")  # rewritten, same bytes
    assert content_hash(folder) == first
    (folder / "b.txt").write_text("x")
    assert content_hash(folder) != first
    # Same size, new bytes: the remembered digest is not reused (the mtime changed).
    import os

    second = content_hash(folder)
    (folder / "a.bin").write_bytes(b"WEIGHTS")
    stat = (folder / "a.bin").stat()
    os.utime(folder / "a.bin", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert content_hash(folder) != second


def test_remote_config_points_at_the_synced_copies(tmp_path):
    cfg = launch_config.load(tiny_job(tmp_path / "job.yaml"))
    assets = local_assets(cfg)
    assert [a.key for a in assets] == ["model.base", "data.path"]
    placed = {a.key: f"/remote/assets/{a.digest}/{a.remote_name}" for a in assets}
    sent = yaml.safe_load(remote_config(cfg, placed))
    assert sent["model"]["base"] == placed["model.base"] and sent["data"]["path"] == placed["data.path"]
    assert sent["train"] == cfg.raw["train"]


def test_planned_steps_follow_the_runner_arithmetic(tmp_path):
    cfg = launch_config.load(TINY_CONFIG)
    # 384 examples: 38 test + 38 validation + 308 train; 308 / micro batch 16 -> 20 steps per epoch; 6 epochs.
    assert planned_steps(cfg, 384) == 120  # what the runner itself reports as total_steps for this config
    capped = launch_config.load(tiny_job(tmp_path / "capped.yaml", train={"max_steps": 7}))
    assert planned_steps(capped, 384) == 7


def test_the_repository_configs_load(tmp_path):
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        assert launch_config.load(path).resources is not None


def test_the_gpu_column_counts_identical_gpus():
    from launcher.cli import _gpu_summary

    assert _gpu_summary(["NVIDIA A10G", "NVIDIA A10G"]) == "2x NVIDIA A10G"
    assert _gpu_summary(["NVIDIA L4", "NVIDIA T4"]) == "NVIDIA L4, NVIDIA T4"
