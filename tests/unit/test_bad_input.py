"""Bad input through the real CLI (`python -m launcher`, a process of its own, as a new user runs
it): each a clear one-line error with its exit code, no traceback, and nothing created — no run
record, no run folder. The cases issue 15 found ending in "internal error" or in the wrong advice."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT

TINY = ROOT / "configs" / "tiny-cpu.yaml"
MISTRAL = ROOT / "configs" / "mistral-7b-qlora.yaml"


@pytest.fixture
def folder(tmp_path) -> Path:
    """The tiny config and its assets in a folder of their own (relative paths as shipped)."""
    shutil.copytree(ROOT / "configs" / "tiny", tmp_path / "tiny")
    shutil.copy2(TINY, tmp_path / "tiny-cpu.yaml")
    return tmp_path


def edited(folder: Path, name: str, section: str, **values) -> Path:
    config = yaml.safe_load((folder / "tiny-cpu.yaml").read_text())
    config[section].update(values)
    path = folder / name
    path.write_text(yaml.safe_dump(config))
    return path


def launch(folder: Path, *args: str) -> tuple[int, str]:
    env = {"PATH": os.environ["PATH"], "HOME": str(folder / "home"), "QLORA_LAUNCH_HOME": str(folder / "state"),
           "HF_HUB_OFFLINE": "1", "COLUMNS": "300", "LANG": os.environ.get("LANG", "C.UTF-8")}
    proc = subprocess.run([sys.executable, "-m", "launcher", *args, "--runs-dir", str(folder / "runs")]
                          if not args or args[0].startswith("--") else [sys.executable, "-m", "launcher", *args],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout + proc.stderr


def one_error(output: str) -> str:
    assert "Traceback" not in output and "internal error" not in output, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output[-3000:]
    return errors[0]


def nothing_created(folder: Path) -> None:
    assert not (folder / "runs").exists() or not any((folder / "runs").iterdir())
    code, out = launch(folder, "runs", "--json")
    assert code == 0 and out.strip() in ("[]", ""), out


def test_a_local_model_folder_that_does_not_exist(folder):
    code, out = launch(folder, "--config", str(edited(folder, "job.yaml", "model", base="./models/llama")), "--yes")
    line = one_error(out)
    assert code == 5 and f"{folder}/models/llama is not a folder" in line
    nothing_created(folder)


def test_a_data_file_that_does_not_exist(folder):
    code, out = launch(folder, "--config", str(edited(folder, "job.yaml", "data", path="tiny/data/animal.jsonl")),
                       "--yes")
    line = one_error(out)
    assert code == 4 and "tiny/data/animal.jsonl does not exist" in line
    nothing_created(folder)


def test_an_org_name_model_that_is_neither_a_folder_nor_reachable_names_both_readings(folder):
    """`tiny/modle` reads as a hub id and as a folder next to the config: with the hub off here,
    where the job runs, it fails in a second naming both, not after a minute of the hub's retries."""
    code, out = launch(folder, "--config", str(edited(folder, "job.yaml", "model", base="tiny/modle")), "--yes")
    line = one_error(out)
    assert code == 5 and f"no folder {folder}/tiny/modle" in line and "HF_HUB_OFFLINE" in line
    nothing_created(folder)


def test_a_misspelt_alias_is_told_the_key_it_means(folder):
    config = (folder / "tiny-cpu.yaml").read_text().replace("  lr: 3.0e-3", "  lerning_rate: 3.0e-3")
    (folder / "job.yaml").write_text(config)
    code, out = launch(folder, "--config", str(folder / "job.yaml"), "--yes")
    line = one_error(out)
    assert code == 3 and "train.lerning_rate: unknown key; did you mean 'lr'?" in line
    nothing_created(folder)


@pytest.mark.parametrize("name, says", [("foo", "'foo' is not a provider we know; known: local, ssh, vast"),
                                        ("vats", "did you mean 'vast'?")])
def test_an_unknown_provider_names_the_known_ones(folder, name, says):
    code, out = launch(folder, "--config", str(MISTRAL), "--providers", name, "--yes")
    line = one_error(out)
    assert code == 2 and says in line and "kaggle" in line


def test_a_near_miss_on_the_market_says_the_market_flag_not_the_micro_batch(folder):
    """The Mistral config asks for spot; an A10 is on demand only: the fix is --on-demand."""
    code, out = launch(folder, "--config", str(MISTRAL), "--gpu", "A10", "--yes")
    line = one_error(out)
    assert code == 9 and "near miss is 1x A10" in line and ": on-demand. Try --on-demand" in line
    assert "micro_batch_size" not in line
    nothing_created(folder)


def test_a_negative_price_cap_is_refused(folder):
    code, out = launch(folder, "--config", str(MISTRAL), "--max-price", "-1", "--yes")
    line = one_error(out)
    assert code == 3 and "resources.max_price (from --max-price): must be > 0" in line
    nothing_created(folder)
