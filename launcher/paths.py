"""Where the launcher finds what it ships: the runner, the cluster templates, the price catalogs
and the ready configs (the embedded default among them). Every other module asks here, so how
these files travel (a clone, an editable install, a wheel) is decided in this one place."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import runner

RUNNER_FILE = Path(runner.__file__).resolve().parent / "qlora_runner.py"
RUNNER_REQUIREMENTS = RUNNER_FILE.parent / "requirements.txt"
REPO_ROOT = RUNNER_FILE.parent.parent
CLUSTER_TEMPLATES = REPO_ROOT / "cluster_templates"  # what goes to the targets: bootstrap, watchdog
SHIPPED_CATALOGS = REPO_ROOT / "catalogs"  # SkyPilot price catalog snapshots (v8/<cloud>/vms.csv)
CONFIGS = REPO_ROOT / "configs"  # the ready configs
# The embedded default job: the tiny CPU config.
DEFAULT_CONFIG = CONFIGS / "tiny-cpu.yaml"


def runner_module() -> Any:
    """runner/qlora_runner.py as a module: stdlib-only at import, so this costs milliseconds."""
    if str(RUNNER_FILE.parent) not in sys.path:
        sys.path.insert(0, str(RUNNER_FILE.parent))
    import qlora_runner
    return qlora_runner
