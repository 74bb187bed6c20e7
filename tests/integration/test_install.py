"""The project installs like a package: the wheel carries the cluster templates, the price
catalogs and the ready configs (the embedded tiny job's model and data among them), and the
installed `launch` finds them there, run from a folder that is not the repository.

The wheel is built from a copy of the working tree (what git tracks or would track), so the
build leaves nothing in the repository (no build/, whose stale files a later wheel would carry).
It is installed into a fresh venv with the base dependencies only: `launch --help` and
`launch plan` must work without torch. For the embedded tiny job the runner's packages are then
borrowed from this test's own environment rather than installed: `pip install <wheel>[runner]
-c constraints/cpu.txt` takes about 2.5 minutes here even with every file on local disk (torch,
transformers, datasets & co. are 1.7 GB unpacked), over this test's budget; so a `.pth` file
appends this environment's site-packages AFTER the venv's own: torch & co. are found, and the
installed launcher still wins over anything of the same name here. Each command checks that
`launcher` is imported from the fresh venv.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import ROOT

CONSTRAINTS = ROOT / "constraints" / "cpu.txt"
BOOTSTRAP_FILES = ("bootstrap.sh", "stack_check.py", "idle_watchdog.py")
NOT_COPIED = {".git", ".venv", "build", "dist", "runs", "__pycache__", ".pytest_cache"}


def _run(argv: list, cwd: Path, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _output(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"


def _pip_env() -> dict:
    """This environment for pip (its index and find-links settings), less what would point
    Python at the repository or at this venv."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}


def _copy_sources(dest: Path) -> None:
    """The working tree as git sees it (tracked, and untracked but not ignored): what a clone
    plus the files being added would build."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                            cwd=ROOT, capture_output=True)
    if listed.returncode == 0 and listed.stdout:
        for name in listed.stdout.decode().split("\0"):
            source = ROOT / name
            if name and source.is_file():  # a tracked file deleted in the working tree is skipped
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, dest / name)
        return
    # Not a git checkout: the tree, less the usual build and environment folders.
    shutil.copytree(ROOT, dest, dirs_exist_ok=True,
                    ignore=lambda folder, names: [n for n in names if n in NOT_COPIED or n.endswith(".egg-info")])


def _fresh_venv(path: Path) -> Path:
    """A venv without pip (pip of this environment installs into it with --python): quicker."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    return path / "bin" / "python"


def _site_packages(python: Path) -> Path:
    out = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True, env=_pip_env())
    return Path(out.stdout.strip())


def _borrow_this_environment(site_packages: Path) -> Path:
    """The .pth that puts this environment's packages after the venv's own (see the module doc)."""
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    pth = site_packages / "zz_borrowed_from_the_test_environment.pth"
    pth.write_text("".join(f"{p}\n" for p in sorted(ours)))
    return pth


@dataclass
class Installed:
    venv: Path
    python: Path
    launch: Path
    site_packages: Path
    wheel: Path
    source: Path
    work: Path  # the folder the commands run in: neither the repository nor the source copy
    base_deps_installed: bool  # False when the base dependencies could not be installed (offline)

    def env(self) -> dict:
        # No PYTHONPATH: Python finds the launcher where the user's would, in the venv.
        return {"PATH": f"{self.venv / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}",
                "HOME": os.environ.get("HOME", "/root"), "QLORA_LAUNCH_HOME": str(self.work / "home"),
                "HF_HUB_OFFLINE": "1", "COLUMNS": "200", "LANG": os.environ.get("LANG", "C.UTF-8")}

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return _run([self.launch, *args], self.work, self.env(), timeout)

    def python_says(self, code: str) -> str:
        proc = _run([self.python, "-c", code], self.work, self.env(), 120)
        assert proc.returncode == 0, _output(proc)
        return proc.stdout.strip()

    def assert_launcher_is_installed(self) -> None:
        where = Path(self.python_says("import launcher; print(launcher.__file__)"))
        assert where.is_relative_to(self.site_packages), where


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    top = tmp_path_factory.mktemp("install")
    source, wheels, work = top / "source", top / "wheels", top / "work"
    for folder in (source, wheels, work):
        folder.mkdir()
    _copy_sources(source)
    # This environment's setuptools, no build isolation: quick, and it needs no index.
    built = _run([sys.executable, "-m", "pip", "wheel", source, "--no-deps", "--no-build-isolation", "-w", wheels],
                 source, _pip_env())
    assert built.returncode == 0, _output(built)
    (wheel,) = wheels.glob("qlora_launch-*.whl")
    venv = top / "venv"
    python = _fresh_venv(venv)
    site_packages = _site_packages(python)
    pip = [sys.executable, "-m", "pip", "--python", python, "install", "--no-compile", "--timeout", "20",
           "--retries", "1"]
    # The base dependencies for real, as a user gets them (they may come from PyPI).
    base = _run([*pip, wheel, "-c", CONSTRAINTS], work, _pip_env(), 600)
    base_deps_installed = base.returncode == 0
    if not base_deps_installed:  # no index reachable: the wheel alone, its dependencies borrowed
        alone = _run([*pip, "--no-deps", wheel], work, _pip_env(), 300)
        assert alone.returncode == 0, _output(base) + _output(alone)
        _borrow_this_environment(site_packages)
    return Installed(venv, python, venv / "bin" / "launch", site_packages, wheel, source, work,
                     base_deps_installed)


def test_the_wheel_carries_templates_catalogs_configs_and_facts(installed: Installed):
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    expected = {f"launcher/_shipped/cluster_templates/{name}" for name in BOOTSTRAP_FILES}
    expected |= {"runner/requirements.txt", "runner/qlora_runner.py"}
    expected |= {f"launcher/{p.name}" for p in (installed.source / "launcher").glob("*.json")}
    for folder in ("catalogs", "configs"):
        expected |= {f"launcher/_shipped/{folder}/{p.relative_to(installed.source / folder).as_posix()}"
                     for p in (installed.source / folder).rglob("*")
                     if p.is_file() and "__pycache__" not in p.parts}
    assert "launcher/model_facts.json" in expected and "launcher/_shipped/configs/tiny/model/model.safetensors" in expected
    assert sorted(expected - names) == []


def test_installed_launch_plans_from_any_folder_without_the_runner_extra(installed: Installed):
    installed.assert_launcher_is_installed()
    if installed.base_deps_installed:  # the laptop side imports no torch, and here there is none
        assert installed.python_says("import importlib.util as u; print(u.find_spec('torch'))") == "None"
    # Every shipped location is the venv's copy, and a rented run's bootstrap files are there.
    located = json.loads(installed.python_says(
        "import json; from launcher import paths; print(json.dumps({k: str(getattr(paths, k)) for k in "
        "('CLUSTER_TEMPLATES', 'RUNNER_FILE', 'RUNNER_REQUIREMENTS', 'SHIPPED_CATALOGS', 'CONFIGS', 'DEFAULT_CONFIG')}))"))
    for name, where in located.items():
        assert Path(where).is_relative_to(installed.site_packages), (name, where)
        assert Path(where).exists(), (name, where)
    for name in BOOTSTRAP_FILES:
        assert (Path(located["CLUSTER_TEMPLATES"]) / name).is_file()
    assert list(Path(located["SHIPPED_CATALOGS"]).glob("v8/*/vms.csv"))

    help_ = installed.run("--help")
    assert help_.returncode == 0 and "usage: launch" in help_.stdout, _output(help_)

    # A ready config by name, as a pipx user without the repository has it: a table of offers.
    by_name = installed.run("plan", "--config", "mistral-7b-qlora")
    assert by_name.returncode == 0, _output(by_name)
    assert "offers, cheapest whole job first" in by_name.stdout and "→" in by_name.stdout  # → : the pick
    # ... and by its path inside the installed package, with .yaml.
    ready = Path(located["CONFIGS"]) / "llama-3.1-8b-qlora.yaml"
    by_path = installed.run("plan", "--config", str(ready), "--json")
    assert by_path.returncode == 0, _output(by_path)
    plan = json.loads(by_path.stdout)
    assert len(plan["offers"]) > 10 and plan["choice"] is not None and plan["offers"][plan["choice"]]["fits"]

    # The tiny config plans too (its provider is the local machine, which no catalog sells: 9).
    tiny = installed.run("plan", "--config", "tiny-cpu.yaml")
    assert tiny.returncode in (0, 9) and "internal error" not in tiny.stderr, _output(tiny)
    assert "need:" in tiny.stdout

    unknown = installed.run("plan", "--config", "no-such-config")
    assert unknown.returncode == 2, _output(unknown)
    assert "no-such-config not found" in unknown.stderr and "mistral-7b-qlora" in unknown.stderr


def test_installed_launch_runs_the_embedded_tiny_job(installed: Installed):
    _borrow_this_environment(installed.site_packages)
    assert installed.python_says("import torch, transformers, peft; print('ok')") == "ok"
    installed.assert_launcher_is_installed()  # the venv's launcher still comes first
    proc = installed.run(timeout=1800)  # about a minute on 2 idle cores; 15 minutes seen under load 10
    assert proc.returncode == 0, _output(proc)
    assert "running the embedded default" in proc.stdout
    (adapter,) = (installed.work / "runs").glob("*/adapter")
    assert (adapter / "adapter_model.safetensors").is_file()
    assert "status: done" in proc.stdout


def test_editable_install_reads_the_repository_folders(installed: Installed, tmp_path):
    python = _fresh_venv(tmp_path / "venv")
    site_packages = _site_packages(python)
    _borrow_this_environment(site_packages)  # setuptools for the build, the base dependencies
    proc = _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-build-isolation",
                 "-e", installed.source], tmp_path, _pip_env())
    assert proc.returncode == 0, _output(proc)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/root")}
    out = _run([python, "-c", "import json, launcher; from launcher import paths; print(json.dumps("
                "[launcher.__file__, str(paths.CLUSTER_TEMPLATES), str(paths.SHIPPED_CATALOGS), str(paths.CONFIGS),"
                " str(paths.find_config('mistral-7b-qlora'))]))"], installed.work, env, 120)
    assert out.returncode == 0, _output(out)
    module, templates, catalogs, configs, mistral = map(Path, json.loads(out.stdout))
    source = installed.source.resolve()
    assert module == source / "launcher" / "__init__.py"
    assert (templates, catalogs, configs) == (source / "cluster_templates", source / "catalogs", source / "configs")
    assert mistral == source / "configs" / "mistral-7b-qlora.yaml"
    # A file of that name in the current folder wins over the ready config.
    (installed.work / "elsewhere").mkdir()
    (installed.work / "elsewhere" / "mistral-7b-qlora.yaml").write_text("model: {base: mine}\n")
    mine = _run([python, "-c", "from launcher import paths; print(paths.find_config('mistral-7b-qlora.yaml'))"],
                installed.work / "elsewhere", env, 120)
    assert mine.stdout.strip() == "mistral-7b-qlora.yaml", _output(mine)
