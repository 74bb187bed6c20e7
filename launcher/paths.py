"""Where the launcher finds the runner, the embedded default config and the runs folder."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import runner

RUNNER_FILE = Path(runner.__file__).resolve().parent / "qlora_runner.py"
REPO_ROOT = RUNNER_FILE.parent.parent
# The embedded default job: the tiny CPU config that ships with the repository.
DEFAULT_CONFIG = REPO_ROOT / "configs" / "tiny-cpu.yaml"


def runner_module() -> Any:
    """runner/qlora_runner.py as a module: stdlib-only at import, so this costs milliseconds."""
    if str(RUNNER_FILE.parent) not in sys.path:
        sys.path.insert(0, str(RUNNER_FILE.parent))
    import qlora_runner

    return qlora_runner
