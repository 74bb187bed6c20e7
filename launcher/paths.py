"""Where the launcher finds the runner, the embedded default config and the runs folder."""

from __future__ import annotations

from pathlib import Path

import runner

RUNNER_FILE = Path(runner.__file__).resolve().parent / "qlora_runner.py"
REPO_ROOT = RUNNER_FILE.parent.parent
# The embedded default job: the tiny CPU config that ships with the repository.
DEFAULT_CONFIG = REPO_ROOT / "configs" / "tiny-cpu.yaml"
