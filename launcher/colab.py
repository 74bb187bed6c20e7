"""`launch export --colab`: the job as one Colab notebook that carries everything it needs.

    launch export --colab --config job.yaml [--output job-colab.ipynb] [--gpu T4] [--force]

The notebook (nbformat 4.5, Colab's GPU runtime in its metadata) holds, cell by cell: the settings
(run name, where the run folder is), the Google Drive mount, the pip install of the runner's
pinned requirements (runner/requirements.txt, embedded), the files (the runner, the job config,
and the job's local assets when they fit in EMBED_LIMIT_BYTES; larger ones are expected on
Drive, and the notebook says where and how big), the run (`qlora_runner.py --out RUN_DIR
--resume auto`, its output streamed: step, loss, tokens/s), and a loss plot from metrics.jsonl.

The run folder is on Drive (MyDrive/qlora-launch/<run name>), so after a disconnect "Run all"
in a new session continues from the newest checkpoint there. Off Colab (a test, a local
Jupyter) the Drive mount and the pip cell are skipped, and so they are on Colab with
QLORA_COLAB_SKIP_SETUP=1; QLORA_COLAB_DRIVE_DIR names the folder that stands for
MyDrive/qlora-launch (default off Colab: ~/qlora-launch).

The notebook is JSON written here by hand: the laptop install needs no nbformat for it (the
tests validate it with nbformat and execute it with nbclient)."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
import pprint
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from launcher.config import LaunchConfig
from launcher.errors import UsageError
from launcher.paths import RUNNER_FILE, RUNNER_REQUIREMENTS
from launcher.sync import Asset, _size, local_assets

EMBED_LIMIT_BYTES = 20_000_000  # local assets up to this much in all travel inside the notebook
GPU_TYPES = ("T4", "L4", "A100")  # what Colab's runtime picker writes as metadata.colab.gpuType
SKIP_ENV = "QLORA_COLAB_SKIP_SETUP"
DRIVE_DIR_ENV = "QLORA_COLAB_DRIVE_DIR"
DRIVE_HOME = "/content/drive/MyDrive/qlora-launch"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")


@dataclass(frozen=True)
class Export:
    """What was written: for the command's summary and the tests."""
    path: Path
    run_name: str
    cells: int
    bytes: int
    embedded: list[str]  # asset keys carried inside, e.g. data.path
    on_drive: list[tuple[str, str, int]]  # (key, name, bytes) the user uploads to Drive
    warnings: list[str]


def export_colab(config: LaunchConfig, output: Path, force: bool = False, gpu: str = "T4",
                 name: Optional[str] = None, embed_limit_bytes: int = EMBED_LIMIT_BYTES) -> Export:
    """Write the notebook for `config` to `output`. Raises UsageError (an existing output without
    force, a bad name or GPU type) before anything is written."""
    if gpu not in GPU_TYPES:
        raise UsageError(f"--gpu {gpu}: Colab offers {', '.join(GPU_TYPES)}")
    if output.exists() and not force:
        raise UsageError(f"{output} exists; pass --force to replace it, or --output another file")
    if not output.parent.is_dir():
        raise UsageError(f"--output {output}: folder {output.parent} does not exist")
    if name is not None and not NAME_RE.match(name):
        raise UsageError(f"--name {name!r}: letters, digits, '.', '_' and '-' only (it names a folder on Drive)")

    assets = sorted(local_assets(config), key=lambda a: _size(a.local))
    embedded: list[Asset] = []
    on_drive: list[tuple[str, str, int]] = []
    total = 0
    for asset in assets:  # smallest first: as many as fit
        size = _size(asset.local)
        if total + size <= embed_limit_bytes:
            embedded.append(asset)
            total += size
        else:
            on_drive.append((asset.key, asset.local.name, size))
    files = {"qlora_runner.py": RUNNER_FILE.read_bytes()}
    asset_paths = {}
    for asset in embedded:
        rel = f"assets/{asset.key}/{asset.local.name}"
        asset_paths[asset.key] = rel
        for file in sorted(p for p in asset.local.rglob("*") if p.is_file()) if asset.local.is_dir() else [asset.local]:
            inner = file.relative_to(asset.local).as_posix() if asset.local.is_dir() else ""
            files[f"{rel}/{inner}" if inner else rel] = file.read_bytes()

    job = copy.deepcopy(config.raw)
    for key, _ in (*asset_paths.items(), *((k, n) for k, n, _ in on_drive)):
        section, field = key.split(".")
        job[section][field] = None  # set by the notebook, where its folders are known
    digest = hashlib.sha256(json.dumps(job, sort_keys=True, default=str).encode())
    for asset in assets:
        digest.update(f"{asset.key}={asset.digest}".encode())
    run_name = name or f"{_slug(config.path.stem)}-{digest.hexdigest()[:8]}"

    warnings = []
    if config.job.train.device == "cpu":
        warnings.append(f"train.device: cpu in {config.path.name}: the notebook trains on the CPU, even on a GPU "
                        "runtime; set train.device: auto to train on Colab's GPU")
    if getattr(config.storage, "kind", "local") != "local":
        warnings.append(f"storage.kind: {config.storage.kind}: the runner on Colab needs the store's keys: set them "
                        "in the notebook's environment (os.environ) before the Train cell")
    for key, asset_name, size in on_drive:
        warnings.append(f"{key}: {asset_name} ({size / 1e6:.1f} MB) is over the {embed_limit_bytes / 1e6:g} MB the "
                        f"notebook carries: upload it to Google Drive as MyDrive/qlora-launch/assets/{asset_name}")

    notebook = build_notebook(config, run_name, gpu, job, files, asset_paths, on_drive)
    text = json.dumps(notebook, indent=1, ensure_ascii=False) + "\n"
    scratch = output.with_name(f".{output.name}.partial")
    scratch.write_text(text, encoding="utf-8")
    os.replace(scratch, output)
    return Export(path=output, run_name=run_name, cells=len(notebook["cells"]), bytes=len(text.encode()),
                  embedded=list(asset_paths), on_drive=on_drive, warnings=warnings)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")[:60] or "job"


def _pack(data: bytes) -> str:
    return base64.b64encode(zlib.compress(data, 9)).decode()


# ---------------------------------------------------------------------------------------------
# the notebook
# ---------------------------------------------------------------------------------------------


def build_notebook(config: LaunchConfig, run_name: str, gpu: str, job: dict[str, Any], files: dict[str, bytes],
                   asset_paths: dict[str, str], on_drive: list[tuple[str, str, int]]) -> dict[str, Any]:
    requirements = RUNNER_REQUIREMENTS.read_text()
    cells = [
        _markdown(INTRO.format(config=config.path.name, run_name=run_name, gpu=gpu,
                               model=config.raw.get("model", {}).get("base"),
                               steps=config.job.train.max_steps or f"{config.job.train.epochs} epochs")),
        _code(SETTINGS.format(run_name=repr(run_name), skip_env=SKIP_ENV, drive_env=DRIVE_DIR_ENV,
                              drive_home=repr(DRIVE_HOME))),
        _code(MOUNT),
        _code(PIP.format(requirements=repr(requirements))),
        _code(FILES_CELL.format(
            embedded="{\n" + "".join(f"    {k!r}: {_pack(v)!r},\n" for k, v in files.items()) + "}",
            asset_paths=pprint.pformat(asset_paths, sort_dicts=False),
            on_drive=pprint.pformat({k: (n, s) for k, n, s in on_drive}, sort_dicts=False),
            job=pprint.pformat(job, sort_dicts=False, width=100))),
        _code(TRAIN),
        _code(PLOT),
        _markdown(OUTRO),
    ]
    for index, cell in enumerate(cells):
        cell["id"] = f"qlora-{index}"
    return {
        "cells": cells,
        "metadata": {
            "accelerator": "GPU",
            "colab": {"gpuType": gpu, "provenance": [], "name": f"{run_name}.ipynb"},
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }


def _lines(text: str) -> list[str]:
    return text.strip("\n").splitlines(keepends=True)


def _markdown(text: str) -> dict[str, Any]:
    return {"cell_type": "markdown", "metadata": {}, "source": _lines(text)}


def _code(text: str) -> dict[str, Any]:
    # Colab shows a cell whose first line is `#@title` as its title (the code folded in form view).
    return {"cell_type": "code", "execution_count": None, "metadata": {"cellView": "form"}, "outputs": [],
            "source": _lines(text)}


INTRO = """\
# QLoRA fine-tuning: {config}

Written by `launch export --colab` (qlora-launch). Model `{model}`, {steps} steps.

1. **Runtime → Change runtime type → {gpu} GPU**, then **Runtime → Run all**.
2. Allow access to Google Drive when asked: the run folder `MyDrive/qlora-launch/{run_name}` holds
   the checkpoints, the metrics and, at the end, the adapter.
3. Disconnected, or the session ran out? Open the notebook again and **Run all**: the runner
   continues from the newest checkpoint on Drive (`--resume auto`) with the same losses as an
   uninterrupted run. A run that is done is not trained again.

The stop button (■) makes the runner save a checkpoint at the end of its step and stop.
"""

SETTINGS = """\
#@title Settings
import os, pathlib, sys

RUN_NAME = {run_name}  # the run folder's name: the same job exported again resumes the same run
try:
    import google.colab  # noqa: F401  (only on Colab)
    ON_COLAB = True
except ImportError:
    ON_COLAB = False
# Not on Colab, or {skip_env}=1: no Drive mount, no pip install (the packages are there).
SKIP_SETUP = not ON_COLAB or os.environ.get("{skip_env}", "") not in ("", "0")
if os.environ.get("{drive_env}"):
    HOME = pathlib.Path(os.environ["{drive_env}"])  # stands for MyDrive/qlora-launch
elif ON_COLAB and not SKIP_SETUP:
    HOME = pathlib.Path({drive_home})
else:
    HOME = pathlib.Path.home() / "qlora-launch"
RUN_DIR = HOME / RUN_NAME  # the runner's --out: checkpoints, metrics.jsonl, runner.log, adapter/
# The runner, the config and the embedded data: on the session's own disk on Colab.
FILES = (pathlib.Path("/content/qlora-launch") if ON_COLAB else HOME / ".files") / RUN_NAME
print(f"run folder: {{RUN_DIR}}" + ("" if ON_COLAB and not SKIP_SETUP else "  (not on Google Drive)"))
"""

MOUNT = """\
#@title Mount Google Drive (the run folder lives there)
if SKIP_SETUP:
    print("Drive not mounted: not on Colab, or QLORA_COLAB_SKIP_SETUP is set")
else:
    from google.colab import drive
    drive.mount("/content/drive")
"""

PIP = """\
#@title Install the runner's pinned requirements
REQUIREMENTS = {requirements}
if SKIP_SETUP:
    print("pip install skipped: not on Colab, or QLORA_COLAB_SKIP_SETUP is set")
else:
    import subprocess
    FILES.mkdir(parents=True, exist_ok=True)
    (FILES / "requirements.txt").write_text(REQUIREMENTS)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-r", str(FILES / "requirements.txt")], check=True)
"""

FILES_CELL = """\
#@title Write the runner, the job config and the data (carried in this notebook)
import base64, zlib
import yaml

EMBEDDED = {embedded}  # path under FILES -> zlib, base64
ASSET_PATHS = {asset_paths}  # config key -> its copy under FILES
ON_DRIVE = {on_drive}  # config key -> (name, bytes): too large to carry, expected under HOME/assets
JOB = {job}

for rel, packed in EMBEDDED.items():
    path = FILES / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(zlib.decompress(base64.b64decode(packed)))
for key, rel in ASSET_PATHS.items():
    section, field = key.split(".")
    JOB[section][field] = str(FILES / rel)
for key, (name, size) in ON_DRIVE.items():
    path = HOME / "assets" / name
    if not path.exists():
        raise FileNotFoundError(f"{{key}}: {{name}} ({{size / 1e6:.1f}} MB) is too large to carry in this notebook: "
                                f"upload it to Google Drive as {{path}}, then Runtime > Run all")
    section, field = key.split(".")
    JOB[section][field] = str(path)
RUN_DIR.mkdir(parents=True, exist_ok=True)
(FILES / "job.yaml").write_text(yaml.safe_dump(JOB, sort_keys=False))
print(f"{{len(EMBEDDED)}} files written to {{FILES}}")
"""

TRAIN = """\
#@title Train (the runner's output: step, loss, tokens/s)
import shutil, signal, subprocess

if ON_COLAB and JOB.get("train", {}).get("device", "auto") != "cpu" and shutil.which("nvidia-smi") is None:
    raise RuntimeError("this runtime has no GPU: Runtime > Change runtime type > T4 GPU, then Runtime > Run all")
command = [sys.executable, str(FILES / "qlora_runner.py"), "--config", str(FILES / "job.yaml"),
           "--out", str(RUN_DIR), "--resume", "auto"]
print("$", " ".join(command), flush=True)
runner = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
try:
    for line in runner.stdout:
        print(line, end="", flush=True)
    code = runner.wait()
except KeyboardInterrupt:
    # The stop button signals the kernel's process group, the runner with it: it saves a
    # checkpoint at the end of its step and stops. Pressed again: stop it at once.
    try:
        runner.wait(timeout=5)
    except subprocess.TimeoutExpired:
        runner.send_signal(signal.SIGINT)
    try:
        runner.wait()
    except KeyboardInterrupt:
        runner.kill()
    print(f"stopped; Runtime > Run all continues from the newest checkpoint in {RUN_DIR / 'checkpoints'}")
    raise
if code != 0:
    raise RuntimeError(f"the runner exited with code {code} (its output is above, all of it in "
                       f"{RUN_DIR / 'runner.log'}); Runtime > Run all continues from the newest checkpoint")
print(f"done: the adapter is in {RUN_DIR / 'adapter'}")
"""

PLOT = """\
#@title Loss curve (metrics.jsonl)
import json

records = []
for line in (RUN_DIR / "metrics.jsonl").read_text().splitlines():
    try:
        records.append(json.loads(line))
    except ValueError:
        pass  # a line cut short by a disconnect
train = [(r["step"], r["loss"]) for r in records if r.get("event") == "train"]
evals = [(r["step"], r["eval_loss"]) for r in records if r.get("event") == "eval"]
print(f"{len(train)} steps, loss {train[0][1]:.4f} -> {train[-1][1]:.4f}" if train else "no steps yet")
try:
    import matplotlib.pyplot as plt
except ImportError:
    print("matplotlib is not installed: no plot")
else:
    figure, axes = plt.subplots(figsize=(7, 4))
    if train:
        axes.plot(*zip(*train), label="train")
    if evals:
        axes.plot(*zip(*evals), "o-", label="validation")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.legend()
    figure.savefig(RUN_DIR / "loss.png", dpi=100)
    plt.show()
"""

OUTRO = """\
## What the run folder holds

`MyDrive/qlora-launch/<run name>/`: `adapter/` (the LoRA adapter: load it with peft on the base
model), `eval.json` (test loss before and after), `samples.jsonl`, `metrics.jsonl`, `runner.log`,
`status.json`, `checkpoints/` (the newest few, each complete with its manifest), `loss.png`.
"""
