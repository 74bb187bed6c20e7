"""The checkpoints pulled to this machine: runs/<run-id>/checkpoints/checkpoint-N/.

A checkpoint is copied into `.incoming-N` first (a cut copy is resumed there next time) and
moved into place only once its manifest says it is whole, so a half copy is never taken for a
checkpoint. Only the newest `keep` are kept: a resume needs only the newest."""

from __future__ import annotations

import shutil
from pathlib import Path

from launcher.paths import runner_module


class LocalCheckpoints:
    def __init__(self, run_dir: Path) -> None:
        self.folder = run_dir / "checkpoints"

    def steps(self) -> list[int]:
        """The complete checkpoints here, oldest first."""
        return [step for step, _ in runner_module().complete_checkpoints(self.folder)]

    def newest(self) -> int:
        return max(self.steps(), default=-1)

    def path(self, step: int) -> Path:
        return self.folder / f"checkpoint-{step}"

    def incoming(self, step: int) -> Path:
        """Where checkpoint-<step> is copied to before it is checked (created if needed)."""
        folder = self.folder / f".incoming-{step}"
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def adopt(self, step: int) -> bool:
        """Move a fully copied checkpoint into place; False when the copy is not complete yet."""
        incoming = self.folder / f".incoming-{step}"
        if not runner_module().checkpoint_is_complete(incoming):
            return False
        final = self.path(step)
        shutil.rmtree(final, ignore_errors=True)
        incoming.rename(final)
        return True

    def prune(self, keep: int) -> None:
        """Keep the newest `keep` checkpoints; drop cut copies older than the newest one."""
        for step in self.steps()[:-keep]:
            shutil.rmtree(self.path(step), ignore_errors=True)
        newest = self.newest()
        for stale in self.folder.glob(".incoming-*") if self.folder.is_dir() else []:
            if int(stale.name.rsplit("-", 1)[1]) <= newest:
                shutil.rmtree(stale, ignore_errors=True)
