"""`launch merge RUN`: the run's adapter merged into its base, unquantized, saved as a standard
model folder (runs/<run-id>/merged by default).

The merge itself is runner/merge_adapter.py, one stdlib-at-import file: imported here for a merge
on this machine, copied into the run's folder on the target for `--remote` (while the run's
machine is up: the base is there already, and a GPU box has the memory a laptop may lack). A
remote merge is fetched back into the run folder here: a rented machine is released when its run
ends, and what was left on it would be lost; push and chat read it here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

import runner.merge_adapter as merge_tool
from launcher.deploy import MERGED_DIR, RunModel, require_packages, run_model
from launcher.errors import EXIT_TARGET, EXIT_USAGE
from launcher.job import JobError, Session
from launcher.runs import RunRecord
from launcher.workspace import REMOTE_CONFIG

MERGE_TOOL = Path(merge_tool.__file__).resolve()  # what travels to the target for --remote
REMOTE_TIMEOUT_S = 3 * 3600.0  # a 70B base takes a while to load


def merge_here(record: RunRecord, dtype: str, out: Optional[Path], force: bool,
               log: Callable[[str], None]) -> dict[str, Any]:
    """Merge on this machine (its GPU when it has one that can, else the CPU)."""
    model = run_model(record)
    destination = out or model.merged
    _check_out(destination, force)
    require_packages()
    try:
        return merge_tool.merge(model.base, model.adapter, destination, dtype, model.revision, "auto", force,
                                model.trust_remote_code, log=log)
    except merge_tool.MergeError as e:
        raise JobError(str(e), e.exit_code) from None


def merge_remote(session: Session, dtype: str, out: Optional[Path], force: bool,
                 log: Callable[[str], None]) -> dict[str, Any]:
    """Merge on the run's machine, in its run folder, with the run's python; fetch it back."""
    model = run_model(session.record, need_adapter=False)  # the adapter that counts is the one there
    record = session.record
    destination = out or model.merged
    _check_out(destination, force)
    if session.workspace is None or (session.provider.rents_machines and not session.holds_rented_machine):
        raise JobError(f"run {record.id} has no machine up to merge on (it was released); merge here: "
                       f"`launch merge {record.id}`", EXIT_TARGET)
    if not record.python:
        raise JobError(f"run {record.id} records no python on its target (it never started); merge here: "
                       f"`launch merge {record.id}`", EXIT_USAGE)
    base, revision = _remote_base(session.workspace.read(REMOTE_CONFIG), model)
    args = ["--base", base, "--adapter", "adapter", "--out", MERGED_DIR, "--dtype", dtype,
            *(["--revision", revision] if revision else []), *(["--force"] if force else []),
            *(["--trust-remote-code"] if model.trust_remote_code else [])]
    log(f"merging on {record.target} in {session.workspace.folder}")
    stdout = session.workspace.run_tool(MERGE_TOOL, args, record.python, timeout=REMOTE_TIMEOUT_S)
    result = _result_line(stdout)
    log(f"fetching {MERGED_DIR}/ back into {session.run_dir}")
    local = session.run_dir / MERGED_DIR
    if force and local.exists() and local != destination:
        shutil.rmtree(local)  # rsync adds to a folder: an older merge's extra shards would stay
    if force and destination.exists():
        shutil.rmtree(destination)
    session.workspace.fetch_results(session.run_dir)
    if destination != local:
        destination.parent.mkdir(parents=True, exist_ok=True)
        local.rename(destination)
    return {**result, "out": str(destination), "remote_out": f"{session.workspace.folder}/{MERGED_DIR}"}


def _check_out(out: Path, force: bool) -> None:
    try:
        merge_tool.check_out(out, force)
    except merge_tool.MergeError as e:
        raise JobError(str(e), e.exit_code) from None


def _remote_base(config_text: str, model: RunModel) -> tuple[str, Optional[str]]:
    """The base as the target has it: the job file there has local paths rewritten to its copies."""
    try:
        section = (yaml.safe_load(config_text) or {}).get("model") or {}
    except yaml.YAMLError:
        section = {}
    base = section.get("base")
    if not base:
        raise JobError(f"run {model.run_id}: no {REMOTE_CONFIG} with model.base in its folder on the target; "
                       f"merge here: `launch merge {model.run_id}`", EXIT_TARGET)
    return str(base), section.get("revision") or model.revision


def _result_line(stdout: str) -> dict[str, Any]:
    line = next((ln for ln in reversed(stdout.splitlines()) if ln.startswith(merge_tool.RESULT_PREFIX)), None)
    if line is None:
        raise JobError("the merge on the target printed no result line; see its output with --debug", EXIT_TARGET)
    return json.loads(line.removeprefix(merge_tool.RESULT_PREFIX))
