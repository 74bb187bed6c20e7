"""Where the launcher finds what it ships: the runner, the cluster templates, the price catalogs
and the ready configs (the embedded default among them). Every other module asks here, so how
these files travel (a clone, an editable install, a wheel) is decided in this one place.

In the repository they are the top-level folders cluster_templates/, catalogs/ and configs/. A
wheel (pip install ., pipx install .) carries them as launcher/_shipped/<folder>/ (pyproject.toml
maps each folder there). Each location is the installed copy when there is one, else the
repository's folder: an editable install and the tests run from the clone read the repository."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Union

import runner

RUNNER_FILE = Path(runner.__file__).resolve().parent / "qlora_runner.py"
RUNNER_REQUIREMENTS = RUNNER_FILE.parent / "requirements.txt"
REPO_ROOT = RUNNER_FILE.parent.parent  # the clone, for an editable install; site-packages for a wheel
SHIPPED = Path(__file__).resolve().parent / "_shipped"  # the wheel's copies of the folders below


def _shipped(folder: str, marker: str) -> Path:
    """The installed copy of a top-level folder when it holds `marker`, else the repository's."""
    installed = SHIPPED / folder
    return installed if (installed / marker).exists() else REPO_ROOT / folder


CLUSTER_TEMPLATES = _shipped("cluster_templates", "bootstrap.sh")  # what goes to the targets
SHIPPED_CATALOGS = _shipped("catalogs", "v8")  # SkyPilot price catalog snapshots (v8/<cloud>/vms.csv)
CONFIGS = _shipped("configs", "tiny-cpu.yaml")  # the ready configs
# The embedded default job: the tiny CPU config.
DEFAULT_CONFIG = CONFIGS / "tiny-cpu.yaml"


def ready_configs() -> list[str]:
    """The ready configs' names: what --config takes in place of a path (e.g. mistral-7b-qlora)."""
    return sorted(p.stem for p in CONFIGS.glob("*.yaml"))


def find_config(text: Union[str, Path]) -> Path:
    """The job YAML that --config names: the path as given when that file exists, else the ready
    config of that name (`mistral-7b-qlora`, with or without .yaml; also `configs/<name>` as the
    README spells it, for an install without the repository); else a UsageError naming them."""
    given = Path(text).expanduser()
    if given.is_file():
        return given
    name = given.name.removesuffix(".yaml").removesuffix(".yml")  # not .stem: "qwen-1.5b-qlora"
    if given.parent in (Path("."), Path("configs")) and name:
        ready = CONFIGS / f"{name}.yaml"
        if ready.is_file():
            return ready
    from launcher.errors import UsageError  # errors.py imports this module: import it late

    if given.is_dir():
        inside = sorted(p.name for p in given.glob("*.y*ml"))
        raise UsageError(f"--config {text} is a folder, not a job file; pass the YAML file"
                         + (f" (in it: {', '.join(inside[:5])})" if inside else ""))
    import difflib

    near = difflib.get_close_matches(name, ready_configs(), n=1, cutoff=0.5) if given.parent in (
        Path("."), Path("configs")) else []
    raise UsageError(f"config file {text} not found; "
                     + (f"did you mean the ready config {near[0]!r}? " if near else "")
                     + f"pass --config PATH, or the name of a ready config: {', '.join(ready_configs())}")


def runner_module() -> Any:
    """runner/qlora_runner.py as a module: stdlib-only at import, so this costs milliseconds."""
    if str(RUNNER_FILE.parent) not in sys.path:
        sys.path.insert(0, str(RUNNER_FILE.parent))
    import qlora_runner
    return qlora_runner
