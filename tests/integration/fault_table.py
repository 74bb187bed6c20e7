"""The fault matrix's rows. Each fault test measures what its fault cost and reports it here;
with QLORA_FAULTS_TABLE set (benchmarks/faults.py sets it) the row is appended to that file as
one JSON line, so the table the README quotes comes from the tests' own runs, not a copy."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from tests.helpers import read_jsonl

TABLE_ENV = "QLORA_FAULTS_TABLE"


def report(fault: str, target: str, *, recovered: bool, end_state: str, steps_redone: Optional[int] = None,
           billed_usd: Optional[float] = None, orphans: int = 0, recover_s: Optional[float] = None) -> None:
    """One row: `recovered` is the run reaching its documented end with nothing lost;
    `billed_usd` what the provider billed for the whole run (the table subtracts a clean run's)."""
    path = os.environ.get(TABLE_ENV)
    if not path:
        return
    row = {"fault": fault, "target": target, "recovered": recovered, "end_state": end_state,
           "steps_redone": steps_redone, "billed_usd": billed_usd, "orphans": orphans, "recover_s": recover_s}
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def status_step(status_json: Path) -> Optional[int]:
    """The step a runner's status.json last said it reached."""
    try:
        return json.loads(status_json.read_text()).get("step") or 0
    except (OSError, ValueError):
        return None


def steps_redone(reached: Optional[int], run_dir: Path) -> Optional[int]:
    """Steps the interrupted runner trained past the checkpoint the run went on from: the step
    it had reached minus the step of the final history's last resume."""
    resumes = [e["step"] for e in read_jsonl(run_dir / "metrics.jsonl") if e.get("event") == "resume"]
    if reached is None or not resumes:
        return None
    return max(0, reached - resumes[-1])


def recover_s(run_dir: Path, fault_at: float) -> Optional[float]:
    """From the fault to the first training step after the run's last resume (the runner's clock)."""
    events = read_jsonl(run_dir / "metrics.jsonl")
    resumed = [i for i, e in enumerate(events) if e.get("event") == "resume"]
    if not resumed:
        return None
    after = [e["time"] for e in events[resumed[-1]:] if e.get("event") == "train" and "time" in e]
    return round(after[0] - fault_at, 1) if after else None
