"""`launch prune`: what one of your own machines keeps between runs, and removing what no run
needs. A target's workdir holds venvs/<requirements hash>/ (built once, reused), assets/<content
hash>/ (a model or dataset folder, sent once) and runs/<run id>/ (the runner's folder, its
checkpoints included). Rented machines are destroyed with their disks; your own keep all of it.

What is kept, so that nothing is lost: the folder of a run that is live or can still be resumed
(its checkpoints may be newer than the copy here), of a run these records do not know (another
laptop's), and every venv and asset such a kept run uses. What goes: the folders of done and
failed runs (their results came here at the end), venvs and assets no kept run uses."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from typing import Optional

from launcher.remote import Machine
from launcher.runs import RESUMABLE, RunRecord

FOLDERS = {"venv": "venvs", "asset": "assets", "run": "runs"}
LISTING = ("for d in venvs/*/ assets/*/ runs/*/; do [ -d \"$d\" ] && du -sk \"$d\"; done; "
           "for f in runs/*/job.yaml; do [ -f \"$f\" ] && echo \"uses $f $(grep -o 'assets/[0-9a-f]*' \"$f\" | "
           "tr '\\n' ' ')\"; done; true")


@dataclass(frozen=True)
class Entry:
    kind: str  # venv | asset | run
    name: str  # the hash or the run id
    kb: int
    kept_because: Optional[str]  # None: prunable

    @property
    def path(self) -> str:
        return f"{FOLDERS[self.kind]}/{self.name}"


def survey(machine: Machine, workdir: str, records: list[RunRecord]) -> list[Entry]:
    """Every venv, asset and run folder under `workdir` on `machine`, with why it is kept (or not).
    `records`: the run records whose target is this machine."""
    out = machine.run(f"cd {shlex.quote(workdir)} 2>/dev/null || exit 0; {LISTING}", timeout=300).stdout
    sizes: dict[tuple[str, str], int] = {}
    assets_of: dict[str, set[str]] = {}
    for line in out.splitlines():
        if line.startswith("uses "):
            _, path, *assets = line.split()
            assets_of[path.split("/")[1]] = {a.split("/", 1)[1] for a in assets}
            continue
        match = re.fullmatch(r"(\d+)\s+(venvs|assets|runs)/([^/]+)/", line.strip())
        if match:
            kind = next(k for k, folder in FOLDERS.items() if folder == match.group(2))
            sizes[(kind, match.group(3))] = int(match.group(1))
    by_id = {r.id: r for r in records}
    kept_runs = {name: why for (kind, name) in sizes if kind == "run"
                 for why in [_why_keep_run(by_id.get(name))] if why}
    strangers = sorted(name for (kind, name) in sizes if kind == "run" and name not in by_id)
    entries = []
    for (kind, name), kb in sorted(sizes.items()):
        if kind == "run":
            why = kept_runs.get(name)
        elif kind == "venv":
            user = next((r.id for r in records if r.id in kept_runs and f"/venvs/{name}/" in (r.python or "")), None)
            why = f"used by run {user}" if user else None
            if why is None and strangers:  # which venv another laptop's run uses is not recorded here
                why = f"run {strangers[0]} (not in these records) may use it"
        else:
            user = next((i for i, used in sorted(assets_of.items()) if name in used and i in kept_runs), None)
            why = f"used by run {user}" if user else None
        entries.append(Entry(kind, name, kb, why))
    return entries


def _why_keep_run(record: Optional[RunRecord]) -> Optional[str]:
    if record is None:
        return "not in this laptop's run records (another laptop's run?)"
    if record.status in RESUMABLE:
        return f"{record.status}: `launch resume {record.id}` may need its checkpoints"
    return None  # done or failed: its results were pulled at the end


def remove(machine: Machine, workdir: str, entries: list[Entry]) -> None:
    """Remove the prunable `entries` (one command; every path quoted)."""
    paths = " ".join(shlex.quote(e.path) for e in entries if e.kept_because is None)
    if paths:
        machine.run(f"cd {shlex.quote(workdir)} && rm -rf -- {paths}", timeout=600)
