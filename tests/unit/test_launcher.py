"""The laptop side stays light, and the ready configs are valid for the runner's schema."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib.metadata import requires
from pathlib import Path

import pytest

from tests.helpers import ROOT, load_runner_module

HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "datasets", "accelerate")


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement.strip(), maxsplit=1)[0].lower()


def test_laptop_install_does_not_pull_torch():
    """Read from the installed package's own metadata: what `pip install -e .` really asks for."""
    declared = requires("qlora-launch") or []
    laptop = {_name(r) for r in declared if "extra ==" not in r}
    runner_extra = {_name(r) for r in declared if 'extra == "runner"' in r}
    assert laptop and not laptop & set(HEAVY)
    requirements = {_name(line) for line in (ROOT / "runner" / "requirements.txt").read_text().splitlines()
                    if line.strip() and not line.startswith("#")}
    assert set(HEAVY) <= runner_extra == requirements  # the extra and the remote machine's list agree


def test_launcher_imports_nothing_heavy():
    """Every launcher module, imported as `launch` starts: no torch & co., and no matplotlib
    (only a finished run draws its loss curve)."""
    modules = sorted(f"launcher.{p.stem}" for p in (ROOT / "launcher").glob("*.py") if p.stem != "__main__")
    modules += sorted(f"launcher.providers.{p.stem}" for p in (ROOT / "launcher" / "providers").glob("*.py"))
    assert "launcher.job" in modules and "launcher.providers.ssh" in modules
    code = (f"import sys, importlib; [importlib.import_module(m) for m in {modules!r}]; "
            f"print([m for m in {HEAVY + ('matplotlib',)!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("config", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_ready_configs_are_valid(config: Path):
    cfg = load_runner_module().load_config(config)
    assert cfg.model.quantization == "nf4"
    assert cfg.train.gradient_checkpointing or cfg.train.device == "cpu"


def test_ready_configs_cover_the_models_users_tune():
    bases = {load_runner_module().load_config(p).model.base for p in (ROOT / "configs").glob("*.yaml")}
    assert {"mistralai/Mistral-7B-v0.3", "meta-llama/Llama-3.1-8B-Instruct",
            "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "tiny/model"} <= bases


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    command = next(line.strip() for line in readme.splitlines() if "pytest" in line and "pip install" in line)
    assert command in (ROOT / ".ci" / "run").read_text()
