"""What the tests share: repository paths, the runner module, tiny job configs, running the runner."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

ROOT = Path(__file__).resolve().parents[1]
RUNNER_FILE = ROOT / "runner" / "qlora_runner.py"
TINY_CONFIG = ROOT / "configs" / "tiny-cpu.yaml"
TINY_MODEL = ROOT / "configs" / "tiny" / "model"
TINY_DATA = ROOT / "configs" / "tiny" / "data" / "animals.jsonl"


def load_runner_module() -> Any:
    """The runner as a module, the way the launcher imports it (the file, not a package).
    Loaded once: two copies under one name would mix their classes (get_type_hints resolves
    annotations through sys.modules)."""
    loaded = sys.modules.get("qlora_runner")
    if loaded is not None and Path(getattr(loaded, "__file__", "") or "").resolve() == RUNNER_FILE:
        return loaded
    spec = importlib.util.spec_from_file_location("qlora_runner", RUNNER_FILE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["qlora_runner"] = module
    spec.loader.exec_module(module)
    return module


def merge(base: dict, overrides: dict) -> dict:
    out = dict(base)
    for key, value in overrides.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def tiny_job(path: Path, **overrides: Any) -> Path:
    """Write a short version of the tiny config (absolute paths, 40 steps) with `overrides`
    merged in section by section, e.g. tiny_job(p, train={"max_steps": 10})."""
    config = yaml.safe_load(TINY_CONFIG.read_text())
    config["model"]["base"] = str(TINY_MODEL)
    config["data"]["path"] = str(TINY_DATA)
    config["train"].update(max_steps=40, save_every=10, eval_every=20)
    config["eval"].update(samples=2, max_new_tokens=12)
    config = merge(config, overrides)
    path.write_text(yaml.safe_dump(config))
    return path


def runner_command(config: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(RUNNER_FILE), "--config", str(config), "--out", str(out), *extra]


def run_runner(config: Path, out: Path, *extra: str, preexec_fn: Optional[Callable[[], None]] = None,
               timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(runner_command(config, out, *extra), capture_output=True, text=True,
                          timeout=timeout, preexec_fn=preexec_fn)


def uninterrupted_losses(config: Path, out: Path) -> dict[int, float]:
    """The runner's own uninterrupted run of `config` into `out`: the per-step losses a launched,
    resumed or moved run of the same job must match."""
    proc = run_runner(config, out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return train_losses(out)


def train_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["event"] == "train"}


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of a file; [] when it is not there."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def processes_naming(*texts: str) -> list[int]:
    """The processes (but this one) whose command line holds every one of `texts` (Linux /proc)."""
    import os

    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if all(t.encode() in cmdline for t in texts):
                found.append(int(entry.name))
    return found
